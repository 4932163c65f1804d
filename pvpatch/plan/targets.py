"""Which symbol a spec's `target` names: one rule for the planner, the rewriter and verify.

A relocatable file made by `ld -r` may define several symbols of one name: a static
function in each object it joined, or a static beside a global.  A call to the name
means what the linker would bind it to, so the rule is the linker's:

- the one global (STB_GLOBAL or STB_WEAK) definition, when there is exactly one;
- else the one local definition, when there is exactly one;
- else the name is ambiguous and refused (SpecError naming every candidate);
- with no definition, the undefined reference (left for the linker), or None.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

from ..elf.reader import STB_GLOBAL, STB_LOCAL, STB_WEAK, STT_FILE, STT_SECTION, ElfFile, Symbol
from ..errors import InputError, SpecError
from ..record import record


def candidates(elf: ElfFile, name: str) -> list[Symbol]:
    """Every symbol-table entry called `name` (file and section symbols aside)."""
    if not name:
        return []
    return [s for s in elf.symbols
            if s.name == name and s.type not in (STT_FILE, STT_SECTION)]


def _where(elf: ElfFile, sym: Symbol) -> str:
    sections = elf.sections
    if sym.section_index >= len(sections):
        return f"section {sym.section_index}+{sym.value:#x}"
    sec = sections[sym.section_index]
    if elf.is_relocatable:
        return f"{sec.name}+{sym.value:#x}"
    return f"{sec.name}+{sym.value - sec.addr:#x} at {sym.value:#x}"  # a linked file's address


def resolve_target(elf: ElfFile, name: str) -> Symbol | None:
    """The symbol a call to `name` binds to (see the module docstring).

    None when the file has no symbol of that name.  Raises SpecError when several
    definitions could be meant.
    """
    found = candidates(elf, name)
    defined = [s for s in found if s.defined]
    for binds, what in (((STB_GLOBAL, STB_WEAK), "global"), ((STB_LOCAL,), "local")):
        picked = [s for s in defined if s.bind in binds]
        if len(picked) == 1:
            return picked[0]
        if picked:
            where = ", ".join(_where(elf, s) for s in picked)
            extra = "" if what == "global" else " and no global one"
            raise SpecError(f"target {name} is ambiguous: {len(picked)} {what} definitions "
                            f"({where}){extra}", elf.path)
    if defined:
        # Other bindings (STB_GNU_UNIQUE, processor-specific): only one makes sense.
        if len(defined) == 1:
            return defined[0]
        where = ", ".join(_where(elf, s) for s in defined)
        raise SpecError(f"target {name} is ambiguous: {len(defined)} definitions ({where})",
                        elf.path)
    return found[0] if found else None


@record
class TargetAddress:
    """Where a spec target is in a linked file, and what said so."""

    name: str
    address: int
    source: str  # ".symtab", "export table", or the symbol file's path


def target_address(elf: ElfFile, name: str,
                   symbols: SymbolMap | None = None) -> TargetAddress | None:
    """A linked file's address for `name`: its `.symtab` (by the linker's rule above), else
    the kernel image's own export table (distributions strip `.symtab`, but every
    EXPORT_SYMBOL is in `__ksymtab`), else a symbol file the user gave; None when nothing
    knows it."""
    sym = resolve_target(elf, name)
    if sym is not None and sym.defined:
        return TargetAddress(name, sym.value, ".symtab")
    from ..elf.ksymtab import export_address

    addr = export_address(elf, name)
    if addr is not None:
        return TargetAddress(name, addr, "export table")
    if symbols is not None and name in symbols.addresses:
        return TargetAddress(name, symbols.addresses[name], symbols.path)
    return None


@record
class SymbolMap:
    """Addresses from a System.map or /proc/kallsyms file (`ADDRESS TYPE NAME [MODULE]`)."""

    path: str
    addresses: Mapping[str, int]

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> SymbolMap:
        from pathlib import Path

        try:
            text = Path(path).read_text(errors="replace")
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from None
        out: dict[str, int] = {}
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 3 or len(parts[1]) != 1:
                raise InputError(f"line {n} is not a System.map or kallsyms line", str(path))
            try:
                value = int(parts[0], 16)
            except ValueError:
                raise InputError(f"line {n}: {parts[0]!r} is not an address",
                                 str(path)) from None
            # A module's symbol ("[mod]") is not in the image; text symbols win over data.
            if len(parts) > 3 or value == 0:
                continue
            if parts[2] not in out or parts[1] in "tT":
                out[parts[2]] = value
        return cls(str(path), MappingProxyType(out))
