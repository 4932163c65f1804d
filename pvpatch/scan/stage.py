"""The scan stage: find the paravirt site table, decode its entries into `Site`s.

Each table family is one module behind one seam, as BOLT's LinuxKernelRewriter
has one reader per kernel table: `.parainstructions` (Linux 2.6.x to 6.7,
`paravirt.py`) and `.altinstructions` DIRECT_CALL entries (6.8 and later,
`altinstr.py`).  A family says which section it reads, which layouts it knows,
whether a file's table is one of its own, how to decode it, and how an entry is
made one the kernel skips (`entry_edit`).  The rest of pvpatch sees only `Site`s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from ..elf.reader import SHT_NOBITS, ElfFile, Section
from ..errors import TableError, UsageError
from ..record import record
from . import altinstr, paravirt
from .layouts import AUTO_LAYOUTS, LAYOUTS
from .ops import OpCatalog
from .sites import (
    CALL_FORMS,
    MAX_PATCH_LEN,
    ScanResult,
    Site,
    Table,
    call_operand,
    call_slot_rel,
    site_finding,
)

__all__ = [
    "CALL_FORMS",
    "DEFAULT_SECTION",
    "FAMILIES",
    "MAX_PATCH_LEN",
    "ScanResult",
    "Site",
    "Table",
    "TableFamily",
    "call_operand",
    "call_slot_rel",
    "scan_elf",
    "site_finding",
]

DEFAULT_SECTION = "auto"  # each family's own section, the first family that claims the file


@record
class TableFamily:
    """One kind of site table, as data plus its reader (objtool's special.c rows)."""

    name: str
    section: str  # the table section's name in kernels of this family
    layouts: tuple[str, ...]  # names --layout accepts for it
    kernels: str
    # The file's table, decoded enough to say it is this family's (an opaque token for
    # `scan`), or None; raises nothing for a table of another era.
    claim: Callable[[ElfFile, Section, str], object | None]
    scan: Callable[[ElfFile, Section, str, OpCatalog | None, object], ScanResult]
    # (offset inside the entry, bytes) that make the kernel skip an entry at a rewritten
    # site, or None when the family's entries may stay as they are.
    entry_edit: Callable[[Table], tuple[int, bytes] | None]
    must_neutralise: bool  # the kernel would undo or BUG() on a rewritten site


def _claim_paravirt(elf: ElfFile, sec: Section, layout: str) -> object | None:
    return True


def _scan_paravirt(elf: ElfFile, sec: Section, layout: str, ops: OpCatalog | None,
                   token: object) -> ScanResult:
    return paravirt.scan_paravirt(elf, sec, layout, ops)


def _claim_alt(elf: ElfFile, sec: Section, layout: str) -> object | None:
    found = altinstr.probe(elf, sec, layout)
    if isinstance(found, str):
        if layout != "auto":
            raise TableError(f"{sec.name}: layout {layout} does not fit ({found})", elf.path)
        return None
    return found if found.paravirt else None


def _scan_alt(elf: ElfFile, sec: Section, layout: str, ops: OpCatalog | None,
              token: object) -> ScanResult:
    decoded = token if isinstance(token, altinstr.Decoded) else None
    return altinstr.scan_alternatives(elf, sec, layout, ops, decoded)


def _alt_edit(table: Table) -> tuple[int, bytes] | None:
    lay = altinstr.ALT_LAYOUTS.get(table.layout.name)
    return lay.neutral if lay is not None else None


FAMILIES: Mapping[str, TableFamily] = MappingProxyType({
    f.name: f for f in (
        TableFamily("paravirt", paravirt.SECTION, tuple(LAYOUTS), "Linux 2.6.x to 6.7",
                    _claim_paravirt, _scan_paravirt, lambda table: None, False),
        TableFamily("altinstructions", altinstr.SECTION, tuple(altinstr.ALT_LAYOUTS),
                    "Linux 6.8 and later (DIRECT_CALL alternatives)",
                    _claim_alt, _scan_alt, _alt_edit, True),
    )
})


def family_of(table: Table) -> TableFamily:
    return FAMILIES[table.family]


def _candidates(section: str, layout: str) -> list[tuple[TableFamily, str]]:
    """(family, section name) pairs to try, in order."""
    if layout != "auto":
        owners = [f for f in FAMILIES.values() if layout in f.layouts]
        if not owners:
            known = sorted(name for f in FAMILIES.values() for name in f.layouts)
            raise UsageError(f"unknown layout {layout!r} (known: {', '.join(known)})")
        fam = owners[0]
        return [(fam, fam.section if section == "auto" else section)]
    if section == "auto":
        return [(f, f.section) for f in FAMILIES.values()]
    named = [f for f in FAMILIES.values() if f.section == section]
    # A table under another name is read as .parainstructions, as before families.
    return [(named[0] if named else FAMILIES["paravirt"], section)]


def table_section(elf: ElfFile, section: str = DEFAULT_SECTION, layout: str = "auto"
                  ) -> Section | None:
    """The first table section a family would read in `elf` (for reporting a table that
    cannot be decoded)."""
    for _family, name in _candidates(section, layout):
        sec = elf.section(name)
        if sec is not None and sec.type != SHT_NOBITS:
            return sec
    return None


def scan_elf(
    elf: ElfFile,
    *,
    layout: str = "auto",
    section: str = DEFAULT_SECTION,
    ops: OpCatalog | Callable[[], OpCatalog | None] | None = None,
) -> ScanResult:
    """Find the file's site table and decode every entry into sites, with findings.

    `ops` may be a function giving the catalog: it is called only once a family claims
    a table (a file without one keeps `ops` None)."""
    for family, name in _candidates(section, layout):
        sec = elf.section(name)
        if sec is None or sec.type == SHT_NOBITS:
            continue
        token = family.claim(elf, sec, layout)
        if token is not None:
            return family.scan(elf, sec, layout, ops() if callable(ops) else ops, token)
    lay = LAYOUTS[AUTO_LAYOUTS[elf.arch.name][0]] if layout == "auto" else None
    return ScanResult(elf, elf.path, elf.arch, None, (), (),
                      None if callable(ops) else ops, lay)
