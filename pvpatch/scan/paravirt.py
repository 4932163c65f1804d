"""The `.parainstructions` family (Linux 2.6.x to 6.7): decode its entries into `Site`s.

Each entry is {pointer to the site, type (the pv_ops slot index), len, clobbers},
aligned to twice the pointer size.  Decoding is driven by a `TableLayout` (data);
problems with individual entries become `Finding`s so that the rest of the table
is still usable.
"""

from __future__ import annotations

import itertools
from collections import Counter
from operator import attrgetter
from typing import NamedTuple

from ..elf.reader import PT_LOAD, ElfFile, Relocation, Section
from ..errors import TableError, UsageError
from ..rules import Finding
from .layouts import AUTO_LAYOUTS, LAYOUTS, TableLayout
from .ops import OpCatalog
from .sites import (
    MAX_PATCH_LEN,
    RelocIndex,
    ScanResult,
    Site,
    Table,
    call_operand,
    call_slot_rel,
    site_finding,
)

SECTION = ".parainstructions"


def choose_layout(elf: ElfFile, table: Section, name: str = "auto") -> TableLayout:
    if name != "auto":
        layout = LAYOUTS.get(name)
        if layout is None:
            raise UsageError(f"unknown layout {name!r} (known: {', '.join(sorted(LAYOUTS))})")
        if layout.arch != elf.arch.name:
            raise UsageError(f"layout {name!r} is for {layout.arch}, the file is {elf.arch.name}")
        return layout
    reasons = []
    for cand_name in AUTO_LAYOUTS[elf.arch.name]:
        cand = LAYOUTS[cand_name]
        why = _layout_misfit(elf, table, cand)
        if why is None:
            return cand
        reasons.append(f"{cand_name}: {why}")
    raise TableError(f"{table.name}: no layout fits ({'; '.join(reasons)})", elf.path)


def _layout_misfit(elf: ElfFile, table: Section, layout: TableLayout) -> str | None:
    if layout.count_for(table.size) is None:
        return (
            f"size {table.size} is not a whole number of {layout.stride}-byte entries "
            f"(a short last entry must hold {layout.entry_bytes} bytes)"
        )
    if table.addralign > layout.stride:
        return f"section alignment {table.addralign} exceeds the {layout.stride}-byte stride"
    if elf.is_relocatable:
        for r in elf.relocations_for(table):
            if (r.offset - layout.instr.offset) % layout.stride:
                return f"a relocation at {r.offset:#x} is off the {layout.stride}-byte stride"
    return None


def scan_paravirt(elf: ElfFile, table: Section, layout: str, ops: OpCatalog | None
                  ) -> ScanResult:
    """Decode every entry of `table` into sites, with findings."""
    return _Scanner(elf, table, choose_layout(elf, table, layout), ops).run()


class _Entry(NamedTuple):
    """A table entry located in the code: its number and offset in the table, the section
    and offset its site pointer names, and the entry's type, len and clobber mask."""

    entry: int
    base: int
    section: Section
    offset: int
    type: int
    len: int
    clobbers: int


class _Scanner:
    def __init__(
        self, elf: ElfFile, table: Section, layout: TableLayout, ops: OpCatalog | None
    ) -> None:
        self.elf = elf
        self.relocatable = elf.is_relocatable
        self.table = table
        self.layout = layout
        self.ops = ops
        self.findings: list[Finding] = []
        self._reloc_index: dict[int, RelocIndex] = {}
        self._overlapped: set[int] = set()
        self._regs_cache: dict[int, tuple[str, ...]] = {}
        self._entry_targets: dict[int, tuple[Section, int] | str] = {}
        self._loaded_sections: dict[int, bool] = {}
        self._widths: dict[int, int] = {}  # relocation type -> bytes it patches
        self._slots: dict[tuple[int, int, int, bytes], int | None] = {}  # see _check_relocs

    def run(self) -> ScanResult:
        elf, lay, table = self.elf, self.layout, self.table
        count = lay.count_for(table.size)
        if count is None:  # only reachable with an explicit --layout
            raise TableError(
                f"{table.name}: size {table.size} is not a whole number of "
                f"{lay.stride}-byte entries of layout {lay.name}",
                elf.path,
            )
        data = elf.section_data(table)
        # The last entry may be short; pad it so field reads stay in bounds.
        data = data + bytes(count * lay.stride - len(data))
        found: list[_Entry] = []
        if elf.is_relocatable:
            entry_relocs = self._entry_relocations()
            for i, (stype, slen, clob) in enumerate(lay.entries(data)):
                base = i * lay.stride
                where = self._locate_rel(i, base, entry_relocs)
                if where is not None:
                    found.append(_Entry(i, base, *where, stype, slen, clob))
        else:
            self._locate_linked(data, found)
        # Linked files: the slot each call reads is known only once the table base is
        # inferred from all of them.
        slots = {} if elf.is_relocatable else self._exec_slots(found)
        sites: list[Site] = []
        for i, base, sec, off, stype, slen, clob in found:
            site = self._make_site(i, base, sec, off, stype, slen, clob, slots.get(i))
            if site is not None:
                sites.append(site)
        self._check_overlaps(sites)
        unsafe = {f.site_index for f in self.findings
                  if f.severity == "error" and f.site_index is not None} | self._overlapped
        # Entries naming the same bytes stand or fall together: rewriting them through a
        # duplicate would bypass what was found about the site.
        bad = {(s.section_index, s.offset, s.len) for s in sites if s.index in unsafe}
        unsafe |= {s.index for s in sites if (s.section_index, s.offset, s.len) in bad}
        return ScanResult(
            elf,
            elf.path,
            elf.arch,
            Table(table, lay, count),
            tuple(sites),
            tuple(self.findings),
            self.ops,
            lay,
            frozenset(unsafe),
        )

    # -- entries -> (section, offset) -----------------------------------

    def _entry_relocations(self) -> dict[int, Relocation]:
        out: dict[int, Relocation] = {}
        for r in self.elf.relocations_for(self.table):
            out[r.offset] = r
        return out

    def _entry_finding(self, index: int, base: int, message: str, rule: str = "PV102") -> None:
        self.findings.append(
            Finding(
                rule,
                f"entry {index}: {message}",
                section=self.table.name,
                offset=base,
                site_index=index,
                file_offset=self.table.offset + base,
                length=self.layout.stride,
            )
        )

    def _locate_rel(
        self, index: int, base: int, entry_relocs: dict[int, Relocation]
    ) -> tuple[Section, int] | None:
        """Relocatable file: the site pointer is the relocation's symbol plus addend."""
        elf, lay = self.elf, self.layout
        r = entry_relocs.get(base + lay.instr.offset)
        if r is None:
            self._entry_finding(index, base, "no relocation for the site pointer", "PV108")
            return None
        if r.type != elf.arch.r_abs_ptr:
            self._entry_finding(
                index, base, f"pointer relocated by {elf.arch.reloc_name(r.type)}", "PV108"
            )
            return None
        # Entries point through a few symbols (usually .text's section symbol): what each
        # one resolves to is worked out once.
        target = self._entry_targets.get(r.sym)
        if target is None:
            target = self._entry_targets[r.sym] = self._entry_target(r.sym)
        if isinstance(target, str):
            self._entry_finding(index, base, target)
            return None
        sec, value = target
        return sec, value + r.addend

    def _entry_target(self, sym_index: int) -> tuple[Section, int] | str:
        """The executable section and value a symbol gives a site pointer, or why not."""
        elf = self.elf
        sym = elf.symbol(sym_index)
        if not sym.defined:
            return (f"points at symbol {sym.name or sym_index!r}, "
                    "which is not in a section of this file")
        sec = elf.section_at(sym.section_index)
        if not sec.is_exec:
            return f"points into non-executable section {sec.name}"
        return sec, sym.value

    def _locate_linked(
        self, data: bytes, found: list[_Entry]
    ) -> None:
        """Linked file: the site pointer is an address (or a RELATIVE relocation's value).
        Thousands of entries point into one or two sections: the last one found is
        tried first."""
        elf, lay = self.elf, self.layout
        relative = elf.relative_relocations
        stride, ptr_at = lay.stride, self.table.addr + lay.instr.offset
        last: Section | None = None
        for i, (ptr, (stype, slen, clob)) in enumerate(
                zip(lay.pointers(data), lay.entries(data), strict=True)):
            base = i * stride
            if relative:
                ptr = relative.get(ptr_at + base, ptr)
            if last is None or not last.contains_addr(ptr):
                last = elf.section_for_addr(ptr, exec_only=True)
                if last is None:
                    self._entry_finding(i, base, f"points at {ptr:#x}, outside every "
                                        "executable section")
                    continue
            if not self._loaded(last):
                self._entry_finding(i, base, f"points into {last.name}, which no PT_LOAD "
                                    "segment loads")
                continue
            found.append(_Entry(i, base, last, ptr - last.addr, stype, slen, clob))

    def _loaded(self, sec: Section) -> bool:
        """A PT_LOAD segment covers the whole section: it is in memory at run time."""
        found = self._loaded_sections.get(sec.index)
        if found is None:
            end = sec.addr + sec.size
            found = self._loaded_sections[sec.index] = any(
                s.type == PT_LOAD and s.vaddr <= sec.addr and end <= s.vaddr + s.memsz
                for s in self.elf.segments)
        return found

    def _make_site(
        self, index: int, base: int, sec: Section, off: int, stype: int, slen: int, clob: int,
        exec_slot: int | None = None,
    ) -> Site | None:
        elf = self.elf
        relocatable = self.relocatable
        address = None if relocatable else sec.addr + off
        op = self.ops.name_of(stype) if self.ops is not None else None
        problem = None
        if sec.file_size == 0:
            problem = ("PV102", f"site at {sec.name}+{off:#x} is in a section with no bytes in "
                       "the file (SHT_NOBITS)")
        elif sec.index == self.table.index:
            problem = ("PV102", f"site at {sec.name}+{off:#x} is inside the table itself")
        elif off < 0 or off + slen > sec.size:
            problem = ("PV103", f"site of {slen} bytes at {sec.name}+{off:#x} runs past the end "
                       f"of {sec.name} ({sec.size:#x} bytes)")
        elif slen == 0 or slen > MAX_PATCH_LEN:
            problem = ("PV109", f"site length {slen} (must be 1..{MAX_PATCH_LEN})")
        if problem is not None:
            self.findings.append(Finding(
                problem[0], problem[1], section=sec.name, offset=off, address=address,
                site_index=index, op=op, file_offset=sec.offset + off, length=slen))
            return None
        regs = self._regs_cache.get(clob)
        if regs is None:
            regs = self._regs_cache[clob] = self.layout.regs(clob)
        start = sec.offset + off
        code = elf.data[start : start + slen]
        if relocatable:
            slot, crossings = self._check_relocs(sec.index, off, slen, code)
        else:
            slot, crossings = exec_slot, []
        # Positional, in field order: thousands of these are made per file.
        site = Site(index, sec.name, sec.index, off, address, stype, slen, clob, regs, op, code,
                    start, base, slot)
        for message in crossings:
            self._site_finding("PV107", site, message)
        if slot is not None and slot != stype:
            self._slot_mismatch(site, slot)
        if clob & ~self.layout.any_mask:
            self._site_finding(
                "PV205", site, f"clobbers {clob:#x} has bits no register of layout "
                f"{self.layout.name} stands for ({clob & ~self.layout.any_mask:#x}); they are "
                "ignored")
        return site

    # -- checks ------------------------------------------------------------

    def _site_finding(self, rule: str, site: Site, message: str) -> None:
        self.findings.append(site_finding(rule, site, message))

    def _check_overlaps(self, sites: list[Site]) -> None:
        """Every pair of overlapping sites, not just neighbours: a site nested in a longer
        one overlaps it even when a third lies between them.  Entries naming one site
        twice are a warning when they agree and an error when they do not."""
        # attrgetter keys: this runs over every site, so no Python-level lambda per site
        seen = Counter(map(attrgetter("section_index", "offset", "len"), sites))
        reported: set[tuple[int, int, int]] = set()
        ordered = sorted(sites, key=attrgetter("section_index", "offset", "index"))
        reach: Site | None = None  # the site reaching furthest so far in this section
        for prev, cur in itertools.pairwise(ordered):
            if prev.section_index != cur.section_index:
                reach = None
                continue
            if reach is None or prev.end > reach.end or reach.section_index != prev.section_index:
                reach = prev
            key = (cur.section_index, cur.offset, cur.len)
            if (prev.offset, prev.len) == (cur.offset, cur.len):
                if key not in reported and seen[key] > 1:
                    reported.add(key)
                    self._duplicates(cur, [s for s in ordered if (s.section_index, s.offset,
                                                                  s.len) == key])
                continue
            if cur.offset < reach.end:
                self._overlapped.add(reach.index)
                self._site_finding(
                    "PV104", cur, f"site {cur.index} at {cur.section}+{cur.offset:#x} overlaps "
                    f"site {reach.index} ({reach.section}+{reach.offset:#x}, {reach.len} bytes)")

    def _duplicates(self, site: Site, same: list[Site]) -> None:
        if len({(s.type, s.clobbers) for s in same}) == 1:
            self._site_finding("PV204", site, f"{len(same)} entries name the site at "
                               f"{site.section}+{site.offset:#x}")
            return
        what = ", ".join(f"entry {s.index}: type {s.type}, clobbers {s.clobbers:#x}"
                         for s in same)
        for s in same:
            self._site_finding("PV112", s, f"the entries naming the site at "
                               f"{s.section}+{s.offset:#x} disagree ({what})")

    def _relocs_of(self, sec_index: int) -> RelocIndex:
        idx = self._reloc_index.get(sec_index)
        if idx is None:
            sec = self.elf.section_at(sec_index)
            idx = self._reloc_index[sec_index] = RelocIndex(list(self.elf.relocations_for(sec)))
        return idx

    def _check_relocs(
        self, sec_index: int, off: int, slen: int, code: bytes
    ) -> tuple[int | None, list[str]]:
        """The ops slot the site's call names, and relocations crossing its edges."""
        elf = self.elf
        arch = elf.arch
        slot = None
        crossings = []
        end = off + slen
        widths, slots = self._widths, self._slots
        for r in self._relocs_of(sec_index).between(off - 8, end):
            width = widths.get(r.type)
            if width is None:
                width = widths[r.type] = arch.reloc(r.type).width
            if r.offset + width <= off:
                continue
            if r.offset < off or r.offset + width > end:
                name = elf.sections[sec_index].name
                crossings.append(
                    f"{arch.reloc_name(r.type)} at {name}+{r.offset:#x} crosses the edge of "
                    f"the site at {name}+{off:#x} ({slen} bytes)")
                continue
            # The slot a call names depends only on the relocation and the opcode bytes
            # before its field; thousands of sites share a handful of these.
            field_at = r.offset - off
            key = (r.sym, r.type, r.addend, code[max(0, field_at - 3) : field_at])
            found = slots.get(key, -1)
            if found == -1:
                found = slots[key] = call_slot_rel(elf, code, field_at, r, self.ops)
            if found is not None:
                slot = found
        return slot, crossings

    def _slot_mismatch(self, site: Site, slot: int) -> None:
        name = self.ops.name_of(slot) if self.ops is not None else None
        self._site_finding(
            "PV106", site, f"the call at the site uses ops slot {slot}"
            f"{f' ({name})' if name else ''}, the entry says type {site.type}"
            f"{f' ({site.op})' if site.op else ''}")

    def _exec_slots(self, found: list[_Entry]
                    ) -> dict[int, int]:
        """In a linked file, the ops slot each site's call reads: from `pv_ops` when the
        file names it, else from the table base most calls agree on."""
        elf = self.elf
        arch = elf.arch
        ptr = arch.ptr_size
        targets: dict[int, tuple[int | None, int, int, int]] = {}
        for i, _base, sec, off, stype, slen, _clob in found:
            if off >= 0 and off + slen <= sec.size:
                start = sec.offset + off
                addr = sec.addr + off
                code = elf.data[start : start + slen]
                targets[i] = (call_operand(arch, code, addr), stype, addr, slen)
        sym = elf.symbols_by_name.get("pv_ops") if elf.symtab is not None else None
        if sym is not None and sym.defined:
            table: int | None = sym.value
        else:
            votes = Counter(t - stype * ptr for t, stype, _a, _n in targets.values()
                            if t is not None)
            table = votes.most_common(1)[0][0] if votes else None
        dyn = elf.symbolic_dynamic_relocations
        slots = {}
        for i, (t, _stype, addr, length) in targets.items():
            bound = _dynamic_slot(elf, addr, length, dyn) if dyn else None
            if bound is not None:
                slots[i] = bound
            elif table is not None and t is not None and (t - table) % ptr == 0:
                slots[i] = (t - table) // ptr
        return slots


def _dynamic_slot(elf: ElfFile, address: int, length: int,
                  dyn: dict[int, tuple[int, str, int]]) -> int | None:
    """The slot of a call whose operand the loader fills against `pv_ops` (i386 .so)."""
    for k in range(length):
        found = dyn.get(address + k)
        if found is None:
            continue
        rtype, name, addend = found
        if name == "pv_ops" and rtype == elf.arch.r_abs_ptr and addend % elf.arch.ptr_size == 0:
            return addend // elf.arch.ptr_size
    return None
