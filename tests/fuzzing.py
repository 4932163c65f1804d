"""Structure-aware mutation of ELF fixtures, shared by the fuzz tests and scripts/fuzz.

A mutation targets what a parser trusts: ELF and section header fields, the
paravirt table's bytes, relocation and symbol entries, and truncation at every
structure boundary.  Choices come from a `draw(lo, hi)` callable, so the same code
runs under hypothesis (which can shrink a failure) and under a plain random loop.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from paths import FIX

import pvpatch
from pvpatch.elf.reader import SHT_REL, SHT_RELA, SHT_SYMTAB, ElfFile

SEEDS = [
    FIX / "x86_64" / "kernel61.o",
    FIX / "x86_64" / "seed.o",
    FIX / "x86_64" / "legacy.o",
    FIX / "x86_64" / "prog.o",
    FIX / "x86_64" / "prog",
    FIX / "x86_64" / "prog-pie",
    FIX / "i386" / "kernel61.o",
    FIX / "i386" / "prog.o",
    FIX / "i386" / "prog-pie",
    FIX / "x86_64" / "kernel612.o",
    FIX / "x86_64" / "prog68",
    FIX / "i386" / "kernel612.o",
]
SPEC = FIX / "specs" / "prog.toml"

Draw = Callable[[int, int], int]


@dataclass(frozen=True)
class Field:
    offset: int
    size: int
    what: str


def fields_of(data: bytes) -> list[Field]:
    """Every header, table, relocation and symbol field of a (valid) seed file."""
    elf = ElfFile(data)
    cls = elf.cls
    wide = cls.bits == 64
    out: list[Field] = []
    # ELF header: e_type .. e_shstrndx
    ehdr = [(16, 2), (18, 2), (20, 4)] + (
        [(24, 8), (32, 8), (40, 8), (48, 4)] if wide else [(24, 4), (28, 4), (32, 4), (36, 4)])
    base = 52 if wide else 40
    ehdr += [(base + 2 * k, 2) for k in range(6)]
    out += [Field(o, s, "ehdr") for o, s in ehdr]
    shdr_fields = ([(0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (32, 8), (40, 4), (44, 4),
                    (48, 8), (56, 8)] if wide else [(4 * k, 4) for k in range(10)])
    for i in range(len(elf.sections)):
        at = elf.e_shoff + i * cls.shdr.size
        out += [Field(at + o, s, f"shdr[{i}]") for o, s in shdr_fields]
    for i in range(len(elf.segments)):
        at = elf.e_phoff + i * cls.phdr.size
        step = 8 if wide else 4
        out += [Field(at + o, step if o else 4, f"phdr[{i}]")
                for o in range(0, cls.phdr.size, step)]
    for name in (".parainstructions", ".altinstructions"):
        table = elf.section(name)
        if table is not None:
            out += [Field(table.offset + k, 1, "table") for k in range(table.size)]
    for sec in elf.sections:
        if sec.type in (SHT_REL, SHT_RELA):
            fmt = cls.rela if sec.type == SHT_RELA else cls.rel
            word = 8 if wide else 4
            for k in range(sec.size // fmt.size):
                at = sec.offset + k * fmt.size
                out += [Field(at + o, word, f"reloc {sec.name}")
                        for o in range(0, fmt.size, word)]
        if sec.type == SHT_SYMTAB:
            for k in range(sec.size // cls.sym.size):
                at = sec.offset + k * cls.sym.size
                layout = [(0, 4), (4, 1), (5, 1), (6, 2), (8, 8), (16, 8)] if wide else \
                    [(0, 4), (4, 4), (8, 4), (12, 1), (13, 1), (14, 2)]
                out += [Field(at + o, s, "symbol") for o, s in layout]
    return out


def boundaries_of(data: bytes) -> list[int]:
    elf = ElfFile(data)
    points = {elf.cls.ehdr.size, elf.e_shoff, len(data)}
    for sec in elf.sections:
        points |= {sec.offset, sec.offset + sec.file_size}
    for i in range(len(elf.sections)):
        points.add(elf.e_shoff + i * elf.cls.shdr.size)
    return sorted(p for p in points if 0 <= p <= len(data))


def interesting(size: int, file_size: int, draw: Draw) -> int:
    top = (1 << (8 * size)) - 1
    choices = [0, 1, 2, 3, 4, 7, 8, 16, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 40, (1 << 63) - 1, 1 << 63, top,
               file_size, file_size - 1, file_size + 1, file_size // 2]
    k = draw(0, len(choices))
    value = choices[k] if k < len(choices) else draw(0, min(top, (1 << 62)))
    return value & top


def mutate(data: bytes, draw: Draw, fields: list[Field], cuts: list[int]) -> bytes:
    """Apply one to three structure-aware mutations."""
    buf = bytearray(data)
    for _ in range(draw(1, 3)):
        kind = draw(0, 5)
        if kind <= 3 and fields:
            if kind == 3:  # prefer the table and relocations: where sites come from
                pool = [f for f in fields if f.what in ("table",) or f.what.startswith("reloc")]
                pool = pool or fields
            else:
                pool = fields
            f = pool[draw(0, len(pool) - 1)]
            if f.offset + f.size <= len(buf):
                value = interesting(f.size, len(data), draw)
                buf[f.offset : f.offset + f.size] = value.to_bytes(f.size, "little")
        elif kind == 4 and cuts:
            cut = cuts[draw(0, len(cuts) - 1)] + draw(0, 16) - 8
            del buf[max(cut, 0) :]
        else:
            if buf:
                pos = draw(0, len(buf) - 1)
                buf[pos] = draw(0, 255)
    return bytes(buf)


# -- entry lies: lengths, places and overlaps ------------------------------------------

# (table section, entry size, where `len` is, where the site pointer is or None when a
# relocation carries it, how wide that pointer is) per family and pointer size.
ENTRY_LAYOUTS = {
    (".parainstructions", 8): (16, 9, 0, 8),
    (".parainstructions", 4): (8, 5, 0, 4),
    (".altinstructions", 8): (14, 12, 0, 4),
    (".altinstructions", 4): (14, 12, 0, 4),
}


def mutate_entries(data: bytes, draw: Draw) -> bytes:
    """Make one to three table entries lie, the way a toolchain bug or a hostile file
    would: a length a little off or covering what follows, a site pointer moved into
    the middle of an instruction or onto a neighbour, one entry copied over another
    (duplicates, nested and overlapping sites).  In relocatable files the pointer is a
    relocation's addend, which moves instead."""
    elf = ElfFile(data)
    buf = bytearray(data)
    for name in (".parainstructions", ".altinstructions"):
        sec = elf.section(name)
        if sec is None or sec.size == 0:
            continue
        stride, len_at, ptr_at, width = ENTRY_LAYOUTS[(name, elf.arch.ptr_size)]
        count = sec.size // stride
        if count == 0:
            continue
        addends = _addend_fields(elf, sec, stride, ptr_at)
        for _ in range(draw(1, 3)):
            i = draw(0, count - 1)
            base = sec.offset + i * stride
            kind = draw(0, 3)
            if kind == 0:  # the length, near its value or anywhere
                old = buf[base + len_at]
                buf[base + len_at] = (old + draw(-8, 16)) & 0xFF if draw(0, 3) else draw(0, 255)
            elif kind in (1, 2):  # the site pointer, a few bytes either way
                at, size = addends.get(i, (base + ptr_at, width))
                value = int.from_bytes(buf[at : at + size], "little", signed=True)
                value += draw(-12, 12) or 1
                buf[at : at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            else:  # another entry's fields over this one's (duplicates, nesting)
                j = draw(0, count - 1)
                src = sec.offset + j * stride
                buf[base : base + stride] = buf[src : src + stride]
                if i in addends and j in addends:
                    (a, size), (b, _) = addends[i], addends[j]
                    buf[a : a + size] = buf[b : b + size]
    return bytes(buf)


def _addend_fields(elf: ElfFile, sec: object, stride: int, ptr_at: int
                   ) -> dict[int, tuple[int, int]]:
    """Entry index -> (file offset, size) of the addend that places its site (RELA files:
    the relocation's r_addend; REL files: the implicit addend in the entry itself)."""
    from pvpatch.elf.reader import Section

    assert isinstance(sec, Section)
    out: dict[int, tuple[int, int]] = {}
    if not elf.is_relocatable:
        return out
    for relsec in elf.relocation_sections(sec):
        if relsec.type != SHT_RELA:
            continue
        fmt = elf.cls.rela
        for k in range(relsec.size // fmt.size):
            at = relsec.offset + k * fmt.size
            r_offset = int.from_bytes(elf.data[at : at + (fmt.size // 3)], "little")
            if r_offset % stride == ptr_at:
                out[r_offset // stride] = (at + 2 * (fmt.size // 3), fmt.size // 3)
    return out


# -- .altinstructions: what a hostile table can say ---------------------------------------

ALT_STRIDE = 14  # linux-alt-6.3: s32 instr, s32 repl, u16 cpuid, u16 flags, u8 instrlen,
# u8 repllen
ALT_NOT, ALT_DIRECT_CALL = 1, 2
X86_FEATURE_XENPV, X86_FEATURE_ALWAYS = 8 * 32 + 16, 3 * 32 + 21


@dataclass(frozen=True)
class _TableReloc:
    record: int  # file offset of the relocation record
    sym: int
    rtype: int
    addend_at: int | None  # file offset of r_addend; None: REL, the addend is the field


class AltTable:
    """A seed's `.altinstructions` and the means to aim its entries anywhere: in a linked
    file a field is self-relative, in a relocatable one a relocation (a symbol plus an
    addend, in the relocation record or, REL, in the field) places it."""

    def __init__(self, data: bytes) -> None:
        elf = self.elf = ElfFile(data)
        table = elf.section(".altinstructions")
        if table is None or table.size < ALT_STRIDE:
            raise ValueError("no .altinstructions table")
        self.table = table
        self.replacement = elf.section(".altinstr_replacement")
        self.count = table.size // ALT_STRIDE
        self.wide = elf.cls.bits == 64
        self.relocs: dict[int, _TableReloc] = {}  # field offset in the table -> relocation
        if elf.is_relocatable:
            for relsec in elf.relocation_sections(table):
                rela = relsec.type == SHT_RELA
                fmt = elf.cls.rela if rela else elf.cls.rel
                word = fmt.size // (3 if rela else 2)
                for k in range(relsec.size // fmt.size):
                    at = relsec.offset + k * fmt.size
                    r_offset, info = fmt.unpack_from(data, at)[:2]
                    sym, rtype = elf.cls.split_info(info)
                    self.relocs[r_offset] = _TableReloc(at, sym, rtype,
                                                        at + 2 * word if rela else None)
        self.execs = [s for s in elf.sections if s.is_exec and s.size and s.file_size]

    def entry(self, i: int) -> int:
        """File offset of entry i."""
        return self.table.offset + i * ALT_STRIDE

    def _symbol_in(self, sec_index: int) -> tuple[int, int] | None:
        """(index, value) of a symbol defined in section `sec_index`, a section symbol
        first."""
        found = [(s.type != 3, s.index, s.value) for s in self.elf.symbols
                 if s.defined and s.section_index == sec_index]
        return min(found)[1:] if found else None

    def aim(self, buf: bytearray, i: int, field: int, sec_index: int, offset: int) -> bool:
        """Point entry i's instr (field 0) or repl (field 4) at `offset` in section
        `sec_index`; False when this file cannot say that (no symbol there)."""
        field_at = i * ALT_STRIDE + field
        at = self.table.offset + field_at
        if not self.elf.is_relocatable:
            sec = self.elf.sections[sec_index]
            value = (sec.addr + offset) - (self.table.addr + field_at)
            buf[at : at + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
            return True
        r = self.relocs.get(field_at)
        sym = self._symbol_in(sec_index)
        if r is None or sym is None:
            return False
        self.set_reloc(buf, r, sym[0], r.rtype, offset - sym[1], field_at)
        return True

    def set_reloc(self, buf: bytearray, r: _TableReloc, sym: int, rtype: int, addend: int,
                  field_at: int) -> None:
        cls = self.elf.cls
        word = 8 if self.wide else 4
        buf[r.record + word : r.record + 2 * word] = \
            cls.r_info(sym, rtype).to_bytes(word, "little")
        if r.addend_at is not None:
            buf[r.addend_at : r.addend_at + word] = \
                (addend & ((1 << (8 * word)) - 1)).to_bytes(word, "little")
        else:  # REL: the addend is the field's own bytes
            at = self.table.offset + field_at
            buf[at : at + 4] = (addend & 0xFFFFFFFF).to_bytes(4, "little")

    def set_flags(self, buf: bytearray, sec_index: int, add: int) -> None:
        """sh_flags |= add for a section."""
        at = self.elf.e_shoff + sec_index * self.elf.cls.shdr.size + 8
        word = 8 if self.wide else 4
        old = int.from_bytes(buf[at : at + word], "little")
        buf[at : at + word] = (old | add).to_bytes(word, "little")

    def where(self, i: int, field: int = 0) -> tuple[int, int] | None:
        """(section index, offset) entry i's instr (field 0) or repl (field 4) leads to,
        when this file says so plainly."""
        field_at = i * ALT_STRIDE + field
        if self.elf.is_relocatable:
            r = self.relocs.get(field_at)
            if r is None or r.sym >= len(self.elf.symbols):
                return None
            sym = self.elf.symbols[r.sym]
            if not sym.defined:
                return None
            if r.addend_at is None:
                addend = self._field(i, field)
            else:
                width = 8 if self.wide else 4
                addend = int.from_bytes(self.elf.data[r.addend_at : r.addend_at + width],
                                        "little", signed=True)
            return sym.section_index, sym.value + addend
        addr = self.elf.arch.wrap(self.table.addr + field_at + self._field(i, field))
        sec = self.elf.section_for_addr(addr)
        return None if sec is None else (sec.index, addr - sec.addr)

    def _field(self, i: int, field: int) -> int:
        at = self.entry(i) + field
        return int.from_bytes(self.elf.data[at : at + 4], "little", signed=True)

    def pv_ops_call(self, slot: int, at_addr: int) -> bytes:
        """`call *pv_ops+slot` as a linked file at `at_addr` holds it (rip-relative on
        x86-64, absolute on i386), or b"" without a pv_ops symbol."""
        sym = self.elf.symbols_by_name.get("pv_ops") if self.elf.symtab is not None else None
        if sym is None or not sym.defined:
            return b""
        target = sym.value + slot * self.elf.arch.ptr_size
        disp = target - (at_addr + 6) if self.wide else target
        return b"\xff\x15" + (disp & 0xFFFFFFFF).to_bytes(4, "little")


def mutate_alt(data: bytes, draw: Draw, kind: int | None = None) -> bytes:
    """One to three structure-aware lies of `.altinstructions` entries, as a hostile file
    would tell them: offsets out of range, instrlen/replacementlen past their sections,
    DIRECT_CALL on entries whose bytes are no call, duplicate and nested entries, and
    entries (and a call planted there) inside the table itself.  `kind` (0-6, in that
    order, 6 the feature word) makes one lie of that kind."""
    alt = AltTable(data)
    buf = bytearray(data)
    for k in range(1 if kind is not None else draw(1, 3)):
        kind = kind if k == 0 and kind is not None else draw(0, 6)
        i = draw(0, alt.count - 1)
        base = alt.entry(i)
        if kind == 0:  # a pointer out of range: past, before, or far from its section
            field = 4 * draw(0, 1)
            loc = alt.where(i)
            sec_index = loc[0] if loc is not None else alt.table.index
            if field == 4 and alt.replacement is not None:
                sec_index = alt.replacement.index
            size = alt.elf.sections[sec_index].size
            offset = (size + draw(-6, 16), -draw(1, 64), draw(-(1 << 31), (1 << 31) - 1),
                      (1 << 31) - 1)[draw(0, 3)]
            if not alt.aim(buf, i, field, sec_index, offset):
                r = alt.relocs.get(i * ALT_STRIDE + field)
                if r is not None:  # a symbol index past the table, or undefined (0)
                    alt.set_reloc(buf, r, (0, draw(1, 1 << 20))[draw(0, 1)], r.rtype, 0,
                                  i * ALT_STRIDE + field)
        elif kind == 1:  # lengths past the replacement section, or past the site's
            rep = alt.replacement
            if rep is not None and draw(0, 1):
                end = draw(0, 8)
                alt.aim(buf, i, 4, rep.index, max(rep.size - end, 0))
                buf[base + 13] = min(end + draw(1, 16), 255)
            else:
                buf[base + 12 + draw(0, 1)] = (0, 1, 5, 7, 15, 16, 127, 255)[draw(0, 7)]
        elif kind == 2:  # DIRECT_CALL on an entry whose bytes are no call
            flags = int.from_bytes(buf[base + 10 : base + 12], "little")
            buf[base + 10 : base + 12] = (flags | ALT_DIRECT_CALL).to_bytes(2, "little")
            buf[base + 12] = 6
            loc = alt.where(i)
            if alt.execs and (loc is None or draw(0, 1)):
                sec = alt.execs[draw(0, len(alt.execs) - 1)]
                loc = (sec.index, draw(0, max(sec.size - 1, 0)))
            if loc is not None:
                alt.aim(buf, i, 0, loc[0], loc[1] + draw(1, 5))
        elif kind == 3:  # a duplicate of another entry, or one nested inside it
            j = draw(0, alt.count - 1)
            src = alt.entry(j)
            places = [alt.where(j, 0), alt.where(j, 4)]
            buf[base : base + ALT_STRIDE] = buf[src : src + ALT_STRIDE]
            shift = 0
            if draw(0, 1):  # nested: starts inside j's site, ends no later
                length = buf[src + 12]
                shift = draw(1, max(length - 1, 1))
                buf[base + 12] = draw(1, max(length - shift, 1))
            for field, loc in zip((0, 4), places, strict=True):
                if loc is not None:
                    alt.aim(buf, i, field, loc[0], loc[1] + (shift if field == 0 else 0))
        elif kind == 4:  # an entry pointing into the table itself (maybe made executable)
            if draw(0, 1):
                alt.set_flags(buf, alt.table.index, 0x4)  # SHF_EXECINSTR
            target = draw(0, alt.table.size - 1)
            if not alt.aim(buf, i, 4 * draw(0, 1), alt.table.index, target):
                _plant_in_relocatable_table(alt, buf, i, draw)
        elif kind == 5:  # a call planted inside the (executable) table, and entries at it
            _plant_call_in_table(alt, buf, i, draw)
        else:  # the feature word and flags: neutral, native partner, anything
            pair = ((X86_FEATURE_ALWAYS, ALT_NOT), (X86_FEATURE_XENPV, ALT_NOT),
                    (X86_FEATURE_XENPV, ALT_NOT | ALT_DIRECT_CALL),
                    (draw(0, 0xFFFF), draw(0, 0xFFFF)))[draw(0, 3)]
            buf[base + 8 : base + 12] = struct.pack("<HH", *pair)
    return bytes(buf)


def _plant_call_in_table(alt: AltTable, buf: bytearray, i: int, draw: Draw) -> None:
    """Make the table executable, write a real `call *pv_ops+slot` into it, and aim entry
    i (DIRECT_CALL, 6 bytes) and a NOT XENPV partner at it: a paravirt site whose bytes
    are the table's own, which a rewrite would have to edit alongside the entries."""
    table = alt.table
    alt.set_flags(buf, table.index, 0x4)
    k = draw(0, table.size - 6)
    if alt.elf.is_relocatable:
        _plant_in_relocatable_table(alt, buf, i, draw)
        return
    call = alt.pv_ops_call(draw(0, 40), table.addr + k)
    if not call:
        return
    buf[table.offset + k : table.offset + k + 6] = call
    for j, flags, feature in ((i, ALT_DIRECT_CALL, 0),
                              (draw(0, alt.count - 1), ALT_NOT, X86_FEATURE_XENPV)):
        at = alt.entry(j)
        buf[at + 8 : at + 12] = struct.pack("<HH", feature, flags)
        buf[at + 12] = 6
        alt.aim(buf, j, 0, table.index, k)


def _plant_in_relocatable_table(alt: AltTable, buf: bytearray, i: int, draw: Draw) -> None:
    """Relocatable: no symbol lies in the table, so the section symbol of the sites'
    section is moved onto it (every site pointer now leads into the table), and one
    field's relocation is made the pv_ops operand of a call written over the bytes before
    it."""
    r = alt.relocs.get(i * ALT_STRIDE)
    if r is None or r.sym >= len(alt.elf.symbols) or alt.count < 2:
        return  # (a table of one entry has no other to hold the call's operand)
    symtab = alt.elf.symtab
    if symtab is None:
        return
    shndx_at = symtab.offset + r.sym * alt.elf.cls.sym.size + (6 if alt.wide else 14)
    buf[shndx_at : shndx_at + 2] = alt.table.index.to_bytes(2, "little")
    alt.set_flags(buf, alt.table.index, 0x4)
    pv_ops = alt.elf.symbols_by_name.get("pv_ops") if alt.elf.symtab is not None else None
    m = draw(1, alt.count - 1)
    field_at = m * ALT_STRIDE + 4 * draw(0, 1)  # the operand: an entry's field
    op = alt.relocs.get(field_at)
    if pv_ops is None or op is None:
        return
    slot = draw(0, 40) * alt.elf.arch.ptr_size
    rtype, addend = (alt.elf.arch.r_pc32, slot - 4) if alt.wide else (1, slot)  # R_386_32
    alt.set_reloc(buf, op, pv_ops.index, rtype, addend, field_at)
    at = alt.table.offset + field_at - 2
    buf[at : at + 2] = b"\xff\x15"
    site = field_at - 2 - alt.elf.symbols[r.sym].value  # the moved symbol's addend
    for j, flags, feature in ((i, ALT_DIRECT_CALL, 0),
                              (draw(0, alt.count - 1), ALT_NOT, X86_FEATURE_XENPV)):
        e = alt.entry(j)
        buf[e + 8 : e + 12] = struct.pack("<HH", feature, flags)
        buf[e + 12] = 6
        rj = alt.relocs.get(j * ALT_STRIDE)
        if rj is not None:
            alt.set_reloc(buf, rj, r.sym, rj.rtype, site, j * ALT_STRIDE)


def rewrites_only_honest_sites(data: bytes, spec: Path | None = None) -> str:
    """The oracle for lying entries: whatever the table says, every site a plan rewrites
    holds a paravirt call (or a form pvpatch writes) padded with NOPs, overlaps no other
    site, and the patch gives bytes.  Returns the outcome like `exercise`."""
    from pvpatch.scan.integrity import site_form

    try:
        elf = ElfFile(data, "<fuzz>")
        res = pvpatch.scan_file(elf, ops="catalog:linux-6.1-x86_64" if elf.arch.ptr_size == 8
                                else f"catalog:{FIX / 'catalogs' / 'fixtures-i386.toml'}")
        backend = str(spec) if spec is not None else "native"
        plan = pvpatch.make_plan(res, backend)
        spans = sorted((d.site.section_index, d.site.offset, d.site.end) for d in plan.decisions)
        for d in plan.decisions:
            if not d.rewrites:
                continue
            s = d.site
            if site_form(elf.arch, s.code) is None and d.code != s.code:
                native = d.code if d.action == "inline" else None
                if native is None or not s.code.startswith(native[: len(native)]):
                    raise Unexpected(f"rewrote site {s.index} at {s.section}+{s.offset:#x} "
                                     f"whose bytes {s.code.hex()} are no call and NOPs")
            for sec_index, start, end in spans:
                if sec_index == s.section_index and start < s.end and s.offset < end \
                        and (start, end) != (s.offset, s.end):
                    raise Unexpected(f"rewrote site {s.index} at {s.section}+{s.offset:#x}, "
                                     f"which overlaps another site ({start:#x}..{end:#x})")
        _written_as_planned(plan, pvpatch.apply_plan(plan).data)
        return "ok"
    except pvpatch.PvpatchError as exc:
        return type(exc).__name__
    except Unexpected:
        raise
    except Exception as exc:
        raise Unexpected(f"{type(exc).__name__}: {exc}") from exc



def _written_as_planned(plan: pvpatch.Plan, output: bytes) -> None:
    """Every rewritten site holds, in the output, what its decision wrote: no other edit
    (an entry neutralised, a relocation applied) landed on it."""
    out = ElfFile(output, "<fuzz output>")
    for d in plan.decisions:
        s = d.site
        if not d.rewrites or s.section_index >= len(out.sections):
            continue
        sec = out.sections[s.section_index]
        if sec.name != s.section:
            continue
        got = out.section_data(sec)[s.offset : s.offset + s.len]
        if d.code is not None and d.action in ("inline", "nop", "ud2"):
            if got != d.code:
                raise Unexpected(f"site {s.index} at {s.section}+{s.offset:#x} holds "
                                 f"{got.hex()}, its plan wrote {d.code.hex()}")
        elif got[:1] not in (b"\xe8", b"\xe9"):
            raise Unexpected(f"site {s.index} at {s.section}+{s.offset:#x} ({d.action}) "
                             f"holds {got.hex()}, not a call or jump")

class Unexpected(AssertionError):
    """An exception that is not the package's own error type."""


def exercise(data: bytes, *, verify: bool = False, spec: Path | None = None) -> str:
    """Every library entry point on `data`: it must succeed or raise PvpatchError."""
    from pvpatch.check import CheckOptions, check_elf
    from pvpatch.report.sarif import ArtifactFindings, sarif_log

    try:
        elf = ElfFile(data, "<fuzz>")
        checked = check_elf(elf, CheckOptions())  # `pvpatch check`: findings, never a crash
        sarif_log([ArtifactFindings("fuzz.elf", tuple(checked.findings), len(data))],
                  exit_code=0, arguments=[])
        for ops in ("none", "auto"):
            res = pvpatch.scan_file(elf, ops=ops)
        res = pvpatch.scan_file(elf, ops="catalog:linux-6.1-x86_64" if elf.arch.ptr_size == 8
                                else f"catalog:{FIX / 'catalogs' / 'fixtures-i386.toml'}")
        plan = pvpatch.make_plan(res, "native", drop_patched=elf.is_relocatable)
        rw = pvpatch.apply_plan(plan)
        _ = rw.data
        if spec is not None:
            rw = pvpatch.apply_plan(pvpatch.make_plan(res, str(spec)))
            _ = rw.data
        if verify:
            pvpatch.verify_rewrite(rw, trials=1, workers=1)
        return "ok"
    except pvpatch.PvpatchError as exc:
        return type(exc).__name__
    except RecursionError as exc:
        raise Unexpected(f"RecursionError: {exc}") from exc
    except Exception as exc:
        raise Unexpected(f"{type(exc).__name__}: {exc}") from exc


def bounded(data: bytes, limit_factor: int = 40, slack: int = 16 << 20,
            seconds: float = 10.0) -> tuple[str, int, float]:
    """`exercise` under tracemalloc: (outcome, peak bytes, seconds), checked against bounds."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        outcome = exercise(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    took = time.perf_counter() - start
    assert peak <= limit_factor * len(data) + slack, f"peak {peak} for {len(data)} bytes"
    assert took <= seconds, f"took {took:.1f} s"
    return outcome, peak, took


# -- compressed containers: xz, zstd, gzip around ELF payloads --------------------------

# The decompression limit while fuzzing a seed: twice its payload, at least 1 MiB, so a
# mutated stream that inflates is stopped in milliseconds.
FUZZ_LIMIT_MIN = 1 << 20


@dataclass(frozen=True)
class Packed:
    """A compressed seed and where its structure is: header fields, sizes and checks
    (`fields`), the boundaries of its blocks, chunks and index (`cuts`), the spans of its
    blocks or chunks (`units`, which a mutation repeats or drops), and the CRC32s that
    guard xz's headers and index ((crc at, start, end) of what they cover)."""

    path: Path
    fmt: str
    data: bytes
    payload: bytes
    fields: tuple[Field, ...]
    cuts: tuple[int, ...]
    units: tuple[tuple[int, int], ...]
    crcs: tuple[tuple[int, int, int], ...]

    @property
    def limit(self) -> int:
        return max(FUZZ_LIMIT_MIN, 2 * len(self.payload))


@dataclass
class _Layout:
    fields: list[Field]
    cuts: list[int]
    units: list[tuple[int, int]]
    crcs: list[tuple[int, int, int]]


def _varint_end(data: bytes, at: int) -> int:
    while data[at] & 0x80:
        at += 1
    return at + 1


def _xz_check_size(check_id: int) -> int:
    return 0 if check_id == 0 else 4 << ((check_id - 1) // 3)  # the .xz format, 2.1.1.2


def _xz_layout(data: bytes, out: _Layout) -> None:
    out.fields += [Field(0, 6, "xz magic"), Field(6, 2, "xz stream flags"),
                   Field(8, 4, "xz header crc")]
    out.crcs.append((8, 6, 8))
    check = _xz_check_size(data[7] & 0x0F)
    at = 12
    while data[at]:  # a block header's size byte; 0 starts the index
        size = (data[at] + 1) * 4
        flags = data[at + 1]
        out.fields += [Field(at, 1, "xz block header size"), Field(at + 1, 1, "xz block flags")]
        out.cuts += [at, at + size]
        p = at + 2
        for bit, what in ((0x40, "xz compressed size"), (0x80, "xz uncompressed size")):
            if flags & bit:
                q = _varint_end(data, p)
                out.fields.append(Field(p, min(q - p, 8), what))
                p = q
        for _ in range((flags & 3) + 1):
            q = _varint_end(data, p)
            out.fields.append(Field(p, q - p, "xz filter id"))
            r = _varint_end(data, q)
            out.fields += [Field(q, r - q, "xz filter properties size")]
            props = data[q]
            out.fields += [Field(r + k, 1, "xz filter property") for k in range(props)]
            p = r + props
        out.fields.append(Field(at + size - 4, 4, "xz block header crc"))
        out.crcs.append((at + size - 4, at, at + size - 4))
        p = at + size
        while data[p]:  # LZMA2 chunks
            ctrl = data[p]
            out.cuts.append(p)
            out.fields.append(Field(p, 1, "lzma2 control"))
            if ctrl in (1, 2):
                out.fields.append(Field(p + 1, 2, "lzma2 size"))
                n = 3 + int.from_bytes(data[p + 1 : p + 3], "big") + 1
            elif ctrl >= 0x80:
                out.fields += [Field(p + 1, 2, "lzma2 unpacked size"),
                               Field(p + 3, 2, "lzma2 packed size")]
                if ctrl >= 0xC0:
                    out.fields.append(Field(p + 5, 1, "lzma2 properties"))
                n = 6 + (ctrl >= 0xC0) + int.from_bytes(data[p + 3 : p + 5], "big")
                out.fields.append(Field(p + n - 1, 1, "lzma2 data"))
            else:
                return
            out.units.append((p, p + n))
            p += n
        p += 1  # the end marker
        p += -(p - at) % 4  # block padding
        out.cuts += [p, p + check]
        if check:
            out.fields.append(Field(p, min(check, 8), "xz check"))
        at = p + check
    index = at
    out.cuts.append(index)
    out.fields.append(Field(at, 1, "xz index indicator"))
    p = _varint_end(data, at + 1)
    out.fields.append(Field(at + 1, min(p - at - 1, 8), "xz index records"))
    for _ in range(2 * int(data[at + 1] & 0x7F)):
        q = _varint_end(data, p)
        out.fields.append(Field(p, min(q - p, 8), "xz index record"))
        p = q
    p += -(p - index) % 4
    out.fields.append(Field(p, 4, "xz index crc"))
    out.crcs.append((p, index, p))
    footer = p + 4
    out.cuts += [footer, len(data)]
    out.fields += [Field(footer, 4, "xz footer crc"),
                   Field(footer + 4, 4, "xz backward size"),
                   Field(footer + 8, 2, "xz footer flags"),
                   Field(footer + 10, 2, "xz footer magic")]
    out.crcs.append((footer, footer + 4, footer + 10))


def _zstd_layout(data: bytes, out: _Layout) -> None:
    fhd = data[4]
    fcs_flag, single, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    out.fields.append(Field(4, 1, "zstd frame header"))
    at = 5
    if not single:
        out.fields.append(Field(at, 1, "zstd window"))
        at += 1
    dict_size = (0, 1, 2, 4)[dict_flag]
    if dict_size:
        out.fields.append(Field(at, dict_size, "zstd dictionary id"))
        at += dict_size
    fcs = (single, 2, 4, 8)[fcs_flag]
    if fcs:
        out.fields.append(Field(at, fcs, "zstd content size"))
        at += fcs
    while True:
        header = int.from_bytes(data[at : at + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        out.cuts.append(at)
        out.fields.append(Field(at, 3, "zstd block header"))
        n = 3 + (1 if kind == 1 else size)
        if kind == 2 and size:  # compressed: the literals section header comes first
            out.fields.append(Field(at + 3, 1, "zstd literals header"))
            out.fields.append(Field(at + n - 1, 1, "zstd sequences end"))
        out.units.append((at, at + n))
        at += n
        if last or at >= len(data):
            break
    out.cuts.append(at)
    if checksum:
        out.fields.append(Field(at, 4, "zstd checksum"))
        out.cuts.append(at + 4)


def _gzip_layout(data: bytes, out: _Layout) -> None:
    out.fields += [Field(2, 1, "gzip method"), Field(3, 1, "gzip flags"),
                   Field(4, 4, "gzip mtime"), Field(8, 1, "gzip extra flags"),
                   Field(9, 1, "gzip os")]
    flags, at = data[3], 10
    if flags & 4:  # FEXTRA
        out.fields.append(Field(at, 2, "gzip extra length"))
        at += 2 + int.from_bytes(data[at : at + 2], "little")
    for bit in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & bit:
            end = data.index(b"\0", at)
            out.fields.append(Field(end, 1, "gzip string end"))
            at = end + 1
    if flags & 2:  # FHCRC
        out.fields.append(Field(at, 2, "gzip header crc"))
        at += 2
    out.cuts.append(at)
    while data[at] & 6 == 0 and at + 5 <= len(data) - 8:  # stored deflate blocks
        size = int.from_bytes(data[at + 1 : at + 3], "little")
        out.fields += [Field(at, 1, "deflate block header"), Field(at + 1, 2, "deflate LEN"),
                       Field(at + 3, 2, "deflate NLEN")]
        out.units.append((at, at + 5 + size))
        out.cuts.append(at)
        final = data[at] & 1
        at += 5 + size
        if final:
            break
    out.fields += [Field(len(data) - 8, 4, "gzip crc32"), Field(len(data) - 4, 4, "gzip isize")]
    out.cuts += [len(data) - 8, len(data) - 4, len(data)]


def packed_seed(path: Path, fmt: str, data: bytes, payload: bytes) -> Packed:
    """`data` (the `fmt` container of `payload`) with its structure laid out."""
    out = _Layout([], [], [], [])
    # A seed the walker does not follow to its end: what was found is used.
    with contextlib.suppress(IndexError, ValueError):
        {"xz": _xz_layout, "zstd": _zstd_layout, "gzip": _gzip_layout}[fmt](data, out)
    fields = tuple(f for f in out.fields if f.offset >= 0 and f.offset + f.size <= len(data))
    return Packed(path, fmt, data, payload, fields,
                  tuple(sorted({c for c in out.cuts if 0 <= c <= len(data)})),
                  tuple(out.units), tuple(out.crcs))


def _xz_by_hand(payload: bytes, pieces: int, sizes: bool, check: int) -> bytes:
    """An xz stream with `pieces` blocks, their sizes in the block headers or not, and
    check 0 (none) or 10 (SHA-256): what liblzma's own encoder never writes."""
    import hashlib
    import lzma
    import zlib

    def crc(data: bytes) -> bytes:
        return struct.pack("<I", zlib.crc32(data))

    def varint(n: int) -> bytes:
        out = bytearray()
        while n >= 0x80:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        return bytes(out + bytes([n]))

    flags = bytes([0, check])
    stream = bytearray(b"\xfd7zXZ\0" + flags + crc(flags))
    records = []
    step = -(-len(payload) // pieces)
    for at in range(0, len(payload), step):
        piece = payload[at : at + step]
        lzma2 = lzma.compress(piece, format=lzma.FORMAT_RAW,
                              filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}])
        body = (varint(len(lzma2)) + varint(len(piece))) if sizes else b""
        header = bytes([0xC0 if sizes else 0]) + body + b"\x21\x01\x10"
        header = bytes([(len(header) + 1 + 4 + 3) // 4 - 1]) + header
        header += bytes(-(len(header) + 4) % 4)
        header += crc(header)
        digest = hashlib.sha256(piece).digest() if check == 10 else b""
        stream += header + lzma2 + bytes(-len(lzma2) % 4) + digest
        records.append((len(header) + len(lzma2) + len(digest), len(piece)))
    index = b"\0" + varint(len(records)) + b"".join(varint(u) + varint(n) for u, n in records)
    index += bytes(-len(index) % 4)
    index += crc(index)
    footer = struct.pack("<I", len(index) // 4 - 1) + flags
    return bytes(stream + index + crc(footer) + footer + b"YZ")


def _gzip_by_hand(payload: bytes, level: int) -> bytes:
    """A gzip member with every optional header field (FEXTRA, FNAME, FCOMMENT, FHCRC)."""
    import zlib

    header = b"\x1f\x8b\x08\x1e" + bytes(4) + b"\x00\x03" + (4).to_bytes(2, "little") + \
        b"PV\0\0" + b"fuzz.ko\0" + b"a comment\0"
    header += (zlib.crc32(header) & 0xFFFF).to_bytes(2, "little")
    enc = zlib.compressobj(level, zlib.DEFLATED, -15)
    body = enc.compress(payload) + enc.flush()
    return header + body + struct.pack("<II", zlib.crc32(payload), len(payload) & 0xFFFFFFFF)


def pack_variants(payload: bytes) -> list[tuple[str, bytes]]:
    """`payload` in every container, written as kbuild does and as other tools might: xz
    with CRC64 (xz's default), SHA-256 or no check, several blocks, sizes in the block
    headers; zstd without checksum or size, in 1 KiB blocks; gzip with every header field,
    and stored (uncompressed) deflate blocks."""
    import lzma

    import zstandard

    from pvpatch.elf import compress
    small_blocks = zstandard.ZstdCompressionParameters.from_level(3, window_log=10,
                                                                   write_checksum=True)
    return [
        ("xz", compress.compress(payload, "xz")),
        ("xz", lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64)),
        ("xz", _xz_by_hand(payload, 2, True, 10)),
        ("xz", _xz_by_hand(payload, 1, False, 0)),
        ("zstd", compress.compress(payload, "zstd")),
        ("zstd", zstandard.ZstdCompressor(level=1, write_checksum=False,
                                          write_content_size=False).compress(payload)),
        ("zstd", zstandard.ZstdCompressor(compression_params=small_blocks).compress(payload)),
        ("gzip", compress.compress(payload, "gzip")),
        ("gzip", _gzip_by_hand(payload, 6)),
        ("gzip", _gzip_by_hand(payload, 0)),
    ]


def load_container_seeds(paths: list[Path] | None = None,
                         variants: bool = True) -> list[Packed]:
    """Compressed seeds: every fixture (or each of `paths`) in every container; a file
    that is already compressed (a shipped .ko.xz) is a seed as it is, too."""
    from pvpatch.elf import compress
    out = []
    for path in paths or SEEDS:
        data = path.read_bytes()
        container = compress.detect(data)
        payload = ElfFile.open(path).data if container is not None else data
        if container is not None:
            out.append(packed_seed(path, container.name, data, bytes(payload)))
        if variants or container is None:
            out += [packed_seed(path, fmt, packed, bytes(payload))
                    for fmt, packed in pack_variants(bytes(payload))]
    return out


def mutate_container(seed: Packed, draw: Draw) -> bytes:
    """One to three structure-aware mutations of a compressed seed: a header, size or check
    field set to an interesting value, a cut at (or near) a block, chunk or index
    boundary, a byte inside the compressed data, a block or chunk repeated or dropped,
    something after the stream (another stream, a skippable frame, NUL padding, garbage),
    or the ELF payload mutated and compressed again.  xz's header and index CRC32s are
    recomputed half the time, so what they guard is reached."""
    from pvpatch.elf import compress
    buf = bytearray(seed.data)
    for _ in range(draw(1, 3)):
        kind = draw(0, 8)
        if kind <= 2 and seed.fields:
            f = seed.fields[draw(0, len(seed.fields) - 1)]
            if f.offset + f.size > len(buf):
                continue
            old = int.from_bytes(buf[f.offset : f.offset + f.size], "little")
            top = (1 << (8 * f.size)) - 1
            if kind == 0:
                value = interesting(f.size, len(seed.payload), draw)
            elif kind == 1:
                value = old + draw(-2, 2)
            else:
                value = old ^ (1 << draw(0, 8 * f.size - 1))
            buf[f.offset : f.offset + f.size] = (value & top).to_bytes(f.size, "little")
        elif kind == 3 and seed.cuts:
            cut = seed.cuts[draw(0, len(seed.cuts) - 1)] + draw(-3, 3)
            del buf[max(cut, 1) :]
        elif kind == 4 and buf:
            at = draw(0, len(buf) - 1)
            buf[at] = draw(0, 255) if draw(0, 1) else buf[at] ^ (1 << draw(0, 7))
        elif kind == 5 and seed.units:
            start, end = seed.units[draw(0, len(seed.units) - 1)]
            if end <= len(buf):
                unit = bytes(buf[start:end])
                if draw(0, 1):
                    buf[start:start] = unit * draw(1, 3)  # repeated
                else:
                    del buf[start:end]  # dropped
        elif kind == 6:
            tails = (seed.data, b"garbage!", bytes(4 * draw(1, 3)), bytes(draw(1, 3)),
                     bytes.fromhex("502a4d18") + (4).to_bytes(4, "little") + b"skip",
                     seed.data[: draw(1, len(seed.data))])
            buf += tails[draw(0, len(tails) - 1)]
        elif kind == 7:
            fields, cuts = fields_of(seed.payload), boundaries_of(seed.payload)
            payload = mutate(seed.payload, draw, fields, cuts)
            buf = bytearray(compress.compress(payload, seed.fmt))
        elif kind == 8:  # the payload's end moved: the stream holds more or less than ELF
            payload = seed.payload[: draw(0, len(seed.payload))] + bytes(draw(0, 64))
            buf = bytearray(compress.compress(payload, seed.fmt))
    if seed.fmt == "xz" and draw(0, 1):
        import zlib

        for at, start, end in seed.crcs:
            if end <= len(buf) and at + 4 <= len(buf):
                buf[at : at + 4] = struct.pack("<I", zlib.crc32(buf[start:end]))
    return bytes(buf)


def exercise_container(data: bytes, *, limit: int, verify: bool = False,
                       path: Path | None = None) -> str:
    """A compressed input through the library: decompressed (from a file through
    ElfFile.open when `path` is given, else from memory) and, when it gives an ELF
    file, through every entry point like `exercise`, and written back (compressed again,
    the same payload).  Every failure must be one line of pvpatch's own."""
    return _exercise_container(data, limit, verify, path)[0]


def _exercise_container(data: bytes, limit: int, verify: bool, path: Path | None
                        ) -> tuple[str, int]:
    """`exercise_container`, and the size of the payload it decompressed (0: none)."""
    from pvpatch.elf import compress
    try:
        if path is not None:
            path.write_bytes(data)
            elf = ElfFile.open(path, max_decompressed=limit)
            payload, fmt = bytes(elf.data), elf.compression
            if isinstance(elf.data, mmap.mmap):  # a plain file is mapped
                elf.data.close()
        else:
            unpacked, fmt = compress.unpack(data, "fuzz.ko.xz", limit)
            payload = bytes(unpacked)
    except pvpatch.PvpatchError as exc:
        if "\n" in str(exc):
            raise Unexpected(f"an error of more than one line: {exc!r}") from exc
        return "container:" + type(exc).__name__, 0
    except Exception as exc:
        raise Unexpected(f"{type(exc).__name__}: {exc}") from exc
    if fmt is not None and len(payload) > limit:
        raise Unexpected(f"{len(payload)} bytes decompressed past the limit {limit}")
    outcome = exercise(payload, verify=verify)
    if fmt is not None:
        again, fmt2 = compress.unpack(compress.compress(payload, fmt), "again", limit)
        if again != payload or fmt2 != fmt:
            raise Unexpected("the payload compressed again does not decompress to itself")
    return outcome, len(payload)


def bounded_container(data: bytes, limit: int, seconds: float = 10.0
                      ) -> tuple[str, int, float]:
    """`exercise_container` under tracemalloc: Python's memory stays within what decoding
    to the limit may take (the output, one decoder burst) plus what `exercise` may take
    for the payload (40 times it), the time within `seconds`."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        outcome, size = _exercise_container(data, limit, False, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    took = time.perf_counter() - start
    bound = 40 * size + 2 * limit + (48 << 20)
    assert peak <= bound, f"peak {peak} for a {size}-byte payload, limit {limit}"
    assert took <= seconds, f"took {took:.1f} s"
    return outcome, peak, took


def load_seeds(paths: list[Path] | None = None) -> list[tuple[Path, bytes, list[Field],
                                                            list[int]]]:
    """ELF seeds with their fields and boundaries; a compressed file (a shipped .ko.xz)
    gives its payload."""
    out = []
    for path in paths or SEEDS:
        data = bytes(ElfFile.open(path).data)
        out.append((path, data, fields_of(data), boundaries_of(data)))
    return out


def u32(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", data, at)[0])
