"""The family-neutral site model shared by every table family, and what a call
through the ops table looks like.

A `Site` is one paravirt call site, whichever table named it (`.parainstructions`
before Linux 6.8, `.altinstructions` DIRECT_CALL entries since); a `Table` is the
table it came from; a `ScanResult` is what the scan stage hands to the planner.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..arch import Arch
from ..elf.reader import ElfFile, Relocation, Section
from ..record import fast_init, record
from ..rules import Finding
from .layouts import TableLayout
from .ops import OpCatalog

MAX_PATCH_LEN = 254  # the kernel's patch buffer: BUG_ON(len > MAX_PATCH_LEN)


class EntryLayout(Protocol):
    """What every family's entry layout offers the generic stages."""

    @property
    def name(self) -> str: ...

    @property
    def stride(self) -> int: ...

    @property
    def description(self) -> str: ...


@record
class Table:
    """The site table a scan read: its section, entry layout, entry count and family."""

    section: Section
    layout: EntryLayout
    count: int
    family: str = "paravirt"  # the key of the family in scan.FAMILIES

    @property
    def entry_size(self) -> int:
        return self.layout.stride


@fast_init
@dataclass(frozen=True, slots=True)
class Site:
    """One paravirt call site, as its table entry describes it."""

    index: int  # position of the entry in the table
    section: str
    section_index: int
    offset: int  # of the site inside `section`
    address: int | None  # virtual address (None in relocatable files)
    type: int  # the ops slot index (the .parainstructions type byte was that index)
    len: int
    clobbers: int  # registers the site lets the callee change, as a CLBR mask
    clobber_regs: tuple[str, ...]
    op: str | None
    code: bytes  # the site's bytes as they are in the file
    file_offset: int
    entry_offset: int  # of the entry inside the table section
    slot: int | None = None  # ops slot named by the call at the site, when recognised
    # The kernel's own native replacement carried in the file (.altinstructions), if any.
    native: bytes | None = None
    # Every table entry at this site (the kernel would apply each of them); empty means
    # just `index`.
    entries: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.offset + self.len

    @property
    def entry_indices(self) -> tuple[int, ...]:
        return self.entries or (self.index,)


@record
class ScanResult:
    """What the scan stage hands to the planner: the file, its table, sites and findings."""

    elf: ElfFile = field(compare=False, repr=False)
    path: str
    arch: Arch
    table: Table | None
    sites: tuple[Site, ...]
    findings: tuple[Finding, ...]
    ops: OpCatalog | None
    layout: TableLayout | None  # the CLBR bit layout the sites' masks are written in
    # Sites with an error finding, and the partners of overlapping sites: their
    # bytes or relocations are not what the table says, so nothing may rewrite them.
    unsafe: frozenset[int] = frozenset()

    @property
    def elf_type(self) -> str:
        return self.elf.elf_type

    @property
    def family(self) -> str | None:
        return self.table.family if self.table is not None else None


class RelocIndex:
    """Relocations of one section, sorted by offset, for range queries."""

    def __init__(self, relocs: Sequence[Relocation]) -> None:
        self.relocs = sorted(relocs, key=lambda r: r.offset)
        self.offsets = [r.offset for r in self.relocs]

    def between(self, start: int, end: int) -> list[Relocation]:
        lo = bisect.bisect_left(self.offsets, start)
        hi = bisect.bisect_left(self.offsets, end)
        return self.relocs[lo:hi]


def site_finding(rule: str, site: Site, message: str) -> Finding:
    return Finding(
        rule,
        message,
        section=site.section,
        offset=site.offset,
        address=site.address,
        site_index=site.index,
        op=site.op,
        file_offset=site.file_offset,
        length=site.len,
    )


def entry_finding(table: Section, stride: int, index: int, message: str,
                  rule: str = "PV102") -> Finding:
    """A finding about one table entry (not yet, or never, a site)."""
    base = index * stride
    return Finding(rule, f"entry {index}: {message}", section=table.name, offset=base,
                   site_index=index, file_offset=table.offset + base, length=stride)
# Indirect-call encodings the kernel emits at a site, as data:
# (opcode bytes before the 32-bit field, architecture, the field is rip-relative).
CALL_FORMS: tuple[tuple[bytes, str, bool], ...] = (
    (b"\xff\x15", "x86_64", True),  # 2.6.29, 5.19 .. 6.x: call *pv_ops+off(%rip)
    (b"\xff\x14\x25", "x86_64", False),  # 2.6.30 .. 5.17: call *pv_ops+off (abs32)
    (b"\xff\x15", "i386", False),  # call *pv_ops+off
    (b"\x2e\xff\x15", "i386", False),  # asm sites: call *%cs:pv_ops+off
)


@functools.cache
def is_ops_table(name: str) -> bool:
    """A table sites call through: pv_ops (4.20 on) or the per-group tables of older
    kernels (pv_irq_ops, ...).  The scanner and the verifier's loader both ask this."""
    return name.startswith("pv_") and name.endswith("ops")


@functools.cache
def call_forms(arch: str) -> tuple[tuple[bytes, bool], ...]:
    """CALL_FORMS of one architecture: (opcode bytes, the field is rip-relative)."""
    return tuple((opcode, rip) for opcode, form_arch, rip in CALL_FORMS if form_arch == arch)


def _call_form_at(arch: str, code: bytes, field_at: int) -> tuple[bytes, bool] | None:
    for opcode, rip in call_forms(arch):
        start = field_at - len(opcode)
        if start >= 0 and code[start:field_at] == opcode:
            return opcode, rip
    return None


def call_slot_rel(
    elf: ElfFile, code: bytes, field_at: int, r: Relocation, ops: OpCatalog | None
) -> int | None:
    """The ops slot a relocated indirect call in `code` uses, if it is one.

    `field_at` is where the relocated field starts inside `code`.
    """
    sym = elf.symbol(r.sym)
    if not is_ops_table(sym.name):
        return None
    form = _call_form_at(elf.arch.name, code, field_at)
    if form is None:
        return None
    _opcode, rip = form
    # The field's relocation must compute what the encoding reads: pc-relative for a
    # rip-relative operand, absolute otherwise (a GOT-relative one names no slot).
    if r.type not in elf.arch.field32_relocs[rip]:
        return None
    # A rip-relative field ends the instruction: memory = S + A + 4 - 4 (P is the field).
    offset = r.addend + 4 if rip else r.addend
    ptr = elf.arch.ptr_size
    if offset % ptr:
        return None
    slot = offset // ptr
    if sym.name == "pv_ops":
        return slot
    # 2.6.30-era kernels call through per-group tables (pv_irq_ops, ...): the
    # template index is the group's first slot plus the slot inside the group.
    if ops is not None:
        group = [t for t, name in ops.slots.items() if name.startswith(sym.name + ".")]
        if group:
            return min(group) + slot
    return None


def call_operand(arch: Arch, code: bytes, address: int) -> int | None:
    """The memory operand of the first known indirect-call form in `code` at `address`."""
    for opcode, form_arch, rip in CALL_FORMS:
        if form_arch != arch.name:
            continue
        pos = code.find(opcode)
        while pos >= 0:
            field_at = pos + len(opcode)
            if field_at + 4 <= len(code):
                disp = int.from_bytes(code[field_at : field_at + 4], "little", signed=True)
                if rip:
                    return address + field_at + 4 + disp
                return arch.wrap(disp)  # an absolute operand, sign-extended on x86-64
            pos = code.find(opcode, pos + 1)
    return None
