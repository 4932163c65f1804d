"""The ELF-to-emulator loader: a file laid out in memory as it would run.

ET_REL files are laid out section by section and their own relocations
(REL and RELA) are applied, so a stale relocation left inside a rewritten
site changes the bytes that run.  When nothing but the sites' own bytes can
run (inline and nop rewrites, no thunk), only the sections holding sites are
laid out and only the relocations touching the sites applied (`only`).
Undefined symbols are bound to stubs that stop the emulation (`hlt`), to a
table the verifier fills (the ops table), or to a hostile C function (call
targets left for the linker), or to a plain `ret` (the kernel's return thunk).
ET_EXEC and ET_DYN files have their PT_LOAD segments mapped, ET_DYN at a non-zero
base with RELATIVE relocations applied, and load-time relocations against symbols
the file defines applied as the dynamic loader would (i386 shared objects reach
pv_ops so);
an x86-64 kernel's top-of-memory segments (which Unicorn cannot map) are
moved down as one block.
"""

from __future__ import annotations

import bisect
import contextlib
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..arch import ARCHES, Arch
from ..elf.reader import (
    ET_DYN,
    PT_LOAD,
    SHN_ABS,
    SHN_COMMON,
    SHN_UNDEF,
    SHT_DYNSYM,
    SHT_NOBITS,
    SHT_REL,
    SHT_RELA,
    STT_SECTION,
    ElfFile,
    Section,
    Symbol,
)
from ..errors import ElfFormatError, VerifyError
from ..scan.sites import is_ops_table
from .runtime import (
    EXT_BASE,
    EXT_LIMIT,
    HIGH_HALF,
    HIGH_SPAN,
    HLT,
    PAGE,
    REL_BASE,
    ArchRuntime,
    Convention,
    Runtime,
    max_mapped,
)

# Tables read by the module loader, objtool or the unwinder, never by code at
# a site: their (many) relocations are not applied.
METADATA_SECTIONS = (".orc_unwind", ".return_sites", ".call_sites", ".retpoline_sites",
                     ".ibt_endbr_seal", "__mcount_loc", "__patchable_function_entries",
                     "__bug_table", ".static_call_sites", "__ksymtab", "__kcrctab", ".smp_locks",
                     "__ex_table", ".altinstructions", ".parainstructions", "__jump_table",
                     "__dyndbg", ".discard")

OPS_TABLE_SIZE = 0x1000
STUB_SIZE = 16
# Undefined symbols that are a plain return at run time: the kernel's return thunk
# (CONFIG_RETHUNK code, and pvpatch's thunks in such objects, return through it).
RETURN_STUBS = frozenset({"__x86_return_thunk"})


@dataclass
class Image:
    """A file laid out in memory: regions to map and where things are."""

    elf: ElfFile
    arch: Arch
    regions: list[tuple[int, bytearray]]
    section_addr: dict[int, int]  # section index -> address
    externals: dict[str, int]  # undefined symbols -> address
    ext_kind: dict[str, str]  # "stub" | "table" | "return" | "hostile-c" | ...
    unsupported: list[tuple[int, str]]  # relocations not applied: (address, type name)
    base: int = 0  # ET_DYN load bias
    rel_keys: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    ext_end: int = EXT_BASE
    rel_end: int = REL_BASE
    high: int = 0  # subtracted from kernel-half addresses (Unicorn cannot map them)
    # Only the relocations inside these ranges were applied (None: all of them).
    partial: Mapping[tuple[str, int], Sequence[tuple[int, int]]] | None = None
    _symbols: dict[str, int] | None = field(default=None, repr=False)

    @property
    def symbols(self) -> dict[str, int]:
        """Defined symbols -> address (worked out on first use: a kernel has many)."""
        if self._symbols is None:
            self._symbols = self._defined_symbols()
        return self._symbols

    def _defined_symbols(self) -> dict[str, int]:
        out: dict[str, int] = {}
        mask = (1 << (8 * self.arch.ptr_size)) - 1
        rel = self.elf.is_relocatable
        for name, sym in self.elf.symbols_by_name.items():
            if rel:
                where = self.section_addr.get(sym.section_index) if sym.defined else None
                if where is not None and sym.type != STT_SECTION:
                    out[name] = (where + sym.value) & mask  # a hostile st_value wraps
            elif sym.defined:
                out[name] = self.emu_addr(sym.value)
        return out

    def emu_addr(self, vaddr: int) -> int:
        """Where the file's virtual address `vaddr` is in the emulator."""
        if self.high and vaddr >= HIGH_HALF:
            return vaddr - self.high
        # Wraps like the CPU's address arithmetic (a hostile value must not overflow).
        return self.arch.wrap(self.base + vaddr)

    def link_addr(self, addr: int) -> int:
        """The file's virtual address of emulator address `addr` (linked files)."""
        if self.high and addr + self.high >= HIGH_HALF:
            return addr + self.high
        return addr - self.base

    def region_of(self, addr: int) -> tuple[int, bytearray] | None:
        for start, buf in self.regions:
            if start <= addr < start + len(buf):
                return start, buf
        return None

    def read(self, addr: int, size: int) -> bytes:
        hit = self.region_of(addr)
        if hit is None:
            raise VerifyError(f"address {addr:#x} is not mapped", self.elf.path)
        start, buf = hit
        return bytes(buf[addr - start : addr - start + size])

    def write(self, addr: int, data: bytes) -> None:
        hit = self.region_of(addr)
        if hit is None or addr + len(data) > hit[0] + len(hit[1]):
            raise VerifyError(f"write of {len(data)} bytes at {addr:#x} is not mapped",
                              self.elf.path)
        start, buf = hit
        buf[addr - start : addr - start + len(data)] = data

    def section_index(self, name: str, nth: int = 0) -> int | None:
        """Index of the nth allocated section called `name`."""
        seen = 0
        for sec in self.elf.sections:
            if sec.name == name and sec.is_alloc:
                if seen == nth:
                    return sec.index
                seen += 1
        return None

    def section_address(self, name: str, nth: int = 0) -> int | None:
        found = self.rel_keys.get((name, nth))
        if found is not None:
            return found[0]
        seen = 0
        for sec in self.elf.sections:
            if sec.name == name and sec.index in self.section_addr:
                if seen == nth:
                    return self.section_addr[sec.index]
                seen += 1
        return None

    def symbol_at(self, addr: int) -> str | None:
        for name, where in self.externals.items():
            if where <= addr < where + STUB_SIZE:
                return name
        return None


def load_image(elf: ElfFile, runtime: Runtime, *,
               call_targets: Mapping[str, Convention] | None = None,
               like: Image | None = None,
               only: Mapping[tuple[str, int], Sequence[tuple[int, int]]] | None = None,
               ) -> Image:
    """Lay `elf` out for emulation.

    `call_targets` are undefined symbols that are called (bound to a hostile
    C function of that convention); `like` is the image of the same file
    before rewriting, whose addresses are reused for what both share.  `only`
    (relocatable files), when the code that runs is known to be these byte
    ranges and nothing else of the file, by section (name, occurrence) ->
    [(start, end) offsets]: only those sections are laid out, and only the
    relocations that touch the ranges applied (a symbol of a section left out
    is at 0).
    """
    if elf.is_relocatable:
        return _load_rel(elf, runtime, call_targets or {}, like, only)
    return _load_linked(elf, runtime.rt)


def _nth_keys(elf: ElfFile) -> dict[int, tuple[str, int]]:
    seen: dict[str, int] = {}
    out: dict[int, tuple[str, int]] = {}
    for sec in elf.sections:
        if sec.is_alloc:
            k = seen.get(sec.name, 0)
            seen[sec.name] = k + 1
            out[sec.index] = (sec.name, k)
    return out


def _align(v: int, a: int) -> int:
    return (v + a - 1) // a * a


def _load_rel(elf: ElfFile, runtime: Runtime, call_targets: Mapping[str, Convention],
              like: Image | None,
              only: Mapping[tuple[str, int], Sequence[tuple[int, int]]] | None) -> Image:
    keys = _nth_keys(elf)
    addrs: dict[int, int] = {}
    rel_keys: dict[tuple[str, int], tuple[int, int]] = {}
    cursor = like.rel_end if like is not None else REL_BASE
    for sec in elf.sections:
        if not sec.is_alloc:
            continue
        key = keys[sec.index]
        if only is not None and key not in only:
            continue  # no code that runs reaches it: not laid out
        old = like.rel_keys.get(key) if like is not None else None
        if old is not None and old[1] >= sec.size:
            addrs[sec.index] = old[0]
        else:
            cursor = _align(cursor, max(sec.addralign, 16))
            addrs[sec.index] = cursor
            # Room after every section for the exit jump placed past a site.
            cursor += sec.size + 32
        rel_keys[key] = (addrs[sec.index], sec.size)
    end = max(_align(cursor, PAGE), REL_BASE + PAGE)
    if end - REL_BASE > max_mapped(len(elf.data)):
        raise VerifyError("the sections are too large to lay out for emulation", elf.path)
    image = bytearray(end - REL_BASE)
    for sec in elf.sections:
        if sec.index in addrs and sec.type != SHT_NOBITS and sec.size:
            at = addrs[sec.index] - REL_BASE
            image[at : at + sec.size] = elf.section_data(sec)
    relocs = _rel_records(elf, addrs, keys, only)
    # Undefined and common symbols.
    externals: dict[str, int] = {}
    kinds: dict[str, str] = {}
    ext_cursor = like.ext_end if like is not None else EXT_BASE
    ext_blobs: list[tuple[int, bytes]] = []
    symbols: dict[str, int] = {}
    mask = (1 << (8 * elf.arch.ptr_size)) - 1

    def bind(sym: Symbol) -> int:
        nonlocal ext_cursor
        value = 0
        if sym.shndx == SHN_UNDEF:
            if sym.index == 0 or not sym.name:
                return 0
            if sym.name in externals:
                value = externals[sym.name]
            elif sym.name in call_targets:
                conv = call_targets[sym.name]
                value = runtime.hostile[conv]
                kinds[sym.name] = f"hostile-{conv}"
            else:
                old_ext = like.externals.get(sym.name) if like is not None else None
                table = is_ops_table(sym.name)
                ret = sym.name in RETURN_STUBS
                kind = "table" if table else "return" if ret else "stub"
                if old_ext is not None and like is not None \
                        and like.ext_kind.get(sym.name) == kind:
                    value = old_ext
                else:
                    size = OPS_TABLE_SIZE if table else STUB_SIZE
                    ext_cursor = _align(ext_cursor, 16)
                    value = ext_cursor
                    ext_cursor += size
                kinds[sym.name] = kind
                ext_blobs.append((value, bytes(OPS_TABLE_SIZE) if table else
                                  (b"\xc3" if ret else b"") + bytes([HLT]) * (STUB_SIZE - ret)))
            externals[sym.name] = value
        elif sym.shndx == SHN_COMMON:
            ext_cursor = _align(ext_cursor, max(sym.value, 16))
            value = ext_cursor
            ext_cursor += max(sym.size, 1)
            ext_blobs.append((value, bytes(max(sym.size, 1))))
            if sym.name:
                symbols[sym.name] = value
        elif sym.shndx == SHN_ABS:
            value = sym.value
        elif sym.defined and sym.section_index in addrs:
            value = (addrs[sym.section_index] + (0 if sym.type == STT_SECTION else sym.value)) \
                & mask  # a hostile st_value wraps
            if sym.name and sym.type != STT_SECTION:
                symbols.setdefault(sym.name, value)
        return value

    sym_addr: dict[int, int]
    if only is None:
        sym_addr = {i: bind(sym) for i, sym in enumerate(elf.symbols)}
    else:
        # Only the symbols the selected relocations name (a module has hundreds).
        shift = elf.cls.info_shift
        wanted = sorted({rec[1] >> shift for _sec, recs in relocs for rec in recs})
        sym_addr = {i: bind(sym) for i, sym in elf.symbols_at(wanted)}
    if ext_cursor > EXT_LIMIT:
        raise VerifyError("too many undefined symbols to lay out", elf.path)
    ext_start = EXT_BASE
    ext_buf = bytearray(_align(ext_cursor - ext_start, PAGE) or PAGE)
    for at, blob in ext_blobs:
        ext_buf[at - ext_start : at - ext_start + len(blob)] = blob
    img = Image(elf, elf.arch, [(ext_start, ext_buf), (REL_BASE, image)], addrs,
                externals, kinds, [], 0, rel_keys, ext_cursor, end, partial=only,
                _symbols=symbols if only is None else None)
    _apply_rel_relocs(img, sym_addr, relocs)
    return img


def _rel_records(elf: ElfFile, addrs: Mapping[int, int], keys: Mapping[int, tuple[str, int]],
                 only: Mapping[tuple[str, int], Sequence[tuple[int, int]]] | None,
                 ) -> list[tuple[Section, list[tuple[int, ...]]]]:
    """The relocation records to apply, by the section they patch: all of them, or
    (`only`) those that may touch a byte inside the given (start, end) offsets.  Raw
    records, not the reader's `relocations` (which decodes a whole section into records
    with their addends: a module's take longer than loading both of its images)."""
    cls = elf.cls
    out: list[tuple[Section, list[tuple[int, ...]]]] = []
    for relsec in elf.sections:
        if relsec.type not in (SHT_REL, SHT_RELA) or relsec.is_alloc:
            continue
        if relsec.info not in addrs or elf.sections[relsec.info].name.startswith(
                METADATA_SECTIONS):
            continue  # relocations of debug or metadata sections
        ranges = None
        if only is not None:
            ranges = only.get(keys[relsec.info])
            if not ranges:
                continue
        fmt = cls.rela if relsec.type == SHT_RELA else cls.rel
        data = elf.section_data(relsec)
        if relsec.entsize != fmt.size or relsec.size % fmt.size or len(data) % fmt.size:
            raise VerifyError(f"relocation section {relsec.name!r} has a bad entry size",
                              elf.path)
        if ranges is None:
            out.append((elf.sections[relsec.info], list(fmt.iter_unpack(data))))
            continue
        word = cls.bits // 8
        if sys.byteorder == "little":
            offs = memoryview(data).cast("Q" if word == 8 else "I")[:: fmt.size // word].tolist()
        else:
            offs = [rec[0] for rec in fmt.iter_unpack(data)]
        # A relocation is at most 8 bytes wide: one starting 7 bytes early reaches in.
        picked: set[int] = set()
        if offs == sorted(offs):
            for lo, hi in ranges:
                picked.update(range(bisect.bisect_left(offs, lo - 7),
                                    bisect.bisect_left(offs, hi)))
        else:
            picked.update(k for k, o in enumerate(offs)
                          if any(lo - 7 <= o < hi for lo, hi in ranges))
        if picked:
            out.append((elf.sections[relsec.info],
                        [fmt.unpack_from(data, k * fmt.size) for k in sorted(picked)]))
    return out


def _apply_rel_relocs(img: Image, sym_addr: Mapping[int, int],
                      relocs: Sequence[tuple[Section, Sequence[tuple[int, ...]]]]) -> None:
    elf = img.elf
    arch = elf.arch
    kinds = _RELOC_KINDS[arch.name]
    cls = elf.cls
    buf = img.regions[1][1]
    signed_of = {1: struct.Struct("<b"), 2: struct.Struct("<h"), 4: struct.Struct("<i"),
                 8: struct.Struct("<q")}
    unsigned_of = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"),
                   8: struct.Struct("<Q")}
    get = sym_addr.get
    shift = cls.info_shift
    tmask = (1 << shift) - 1
    # Hot loop (thousands of entries in a module): raw records, locals.
    for target, records in relocs:
        base = img.section_addr[target.index]
        rela = len(records[0]) == 3 if records else False
        sec_off = base - REL_BASE
        for rec in records:
            offset, info = rec[0], rec[1]
            rtype = info & tmask
            kind = kinds.get(rtype)
            p = base + offset
            if kind is None:
                if rtype != 0:
                    img.unsupported.append((p, arch.reloc_name(rtype)))
                continue
            width, pc, lo, hi = kind
            sym = info >> shift
            s = get(sym, 0)
            at = sec_off + offset
            if at < 0 or at + width > len(buf):
                raise VerifyError(f"relocation at {p:#x} is outside its section", elf.path)
            a = rec[2] if rela else signed_of[width].unpack_from(buf, at)[0]
            value = s + a - (p if pc else 0)
            if not lo <= value <= hi:
                img.unsupported.append((p, arch.reloc_name(rtype) + " (overflow)"))
                continue
            unsigned_of[width].pack_into(buf, at, value & ((1 << (8 * width)) - 1))


def _kind(width: int, pc: bool, signed: bool) -> tuple[int, bool, int, int]:
    """(width, pc-relative, lowest and highest value that fits)."""
    bits = 8 * width
    if width == 8:
        return width, pc, -(1 << 63), (1 << 64) - 1
    if signed:
        return width, pc, -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return width, pc, 0, (1 << bits) - 1


# The relocations of a relocatable file the loader computes, per architecture (from
# arch.RelocType's recipes): number -> _kind (a plain dict: the hot loop's lookup).
_RELOC_KINDS = {a.name: {n: _kind(r.width, r.formula == "S+A-P", r.signed)
                         for n, r in a.reloc_types.items() if r.formula in ("S+A", "S+A-P")}
                for a in ARCHES.values()}


def _load_linked(elf: ElfFile, rt: ArchRuntime) -> Image:
    loads = sorted((s for s in elf.segments if s.type == PT_LOAD), key=lambda s: s.vaddr)
    if not loads:
        raise VerifyError("no PT_LOAD segment to map", elf.path)
    base = rt.dyn_base if elf.e_type == ET_DYN else 0
    # A kernel lives in the top of the address space (0xffffffff81000000), which
    # Unicorn cannot map: the kernel half is moved down as one block, keeping the
    # low 32 bits, so rip-relative references between segments still hold.
    high = 0
    tops = [s.vaddr for s in loads if rt.word == 8 and s.vaddr >= HIGH_HALF]
    if tops:
        high = min(tops) & ~0xFFFF_FFFF
        if max(s.vaddr + s.memsz for s in loads if s.vaddr >= HIGH_HALF) - high > HIGH_SPAN:
            raise VerifyError("the kernel-half segments span too much to map", elf.path)
    img = Image(elf, elf.arch, [], {}, {}, {}, [], base, high=high)
    # Cluster segments whose pages are close, map each cluster as one region.
    clusters: list[list[int]] = []
    for s in sorted(loads, key=lambda s: img.emu_addr(s.vaddr)):
        start = img.emu_addr(s.vaddr)
        lo = start // PAGE * PAGE
        hi = _align(start + s.memsz, PAGE) + PAGE  # slack for the exit jump
        if clusters and lo <= clusters[-1][1] + 0x100000:
            clusters[-1][1] = max(clusters[-1][1], hi)
        else:
            clusters.append([lo, hi])
    if sum(hi - lo for lo, hi in clusters) > max_mapped(len(elf.data)):
        raise VerifyError("the PT_LOAD segments are too large to map for emulation", elf.path)
    img.regions.extend((lo, bytearray(hi - lo)) for lo, hi in clusters)
    for s in loads:
        if s.filesz:
            data = elf.data[s.offset : s.offset + s.filesz]
            img.write(img.emu_addr(s.vaddr), data)
    if base:
        arch = elf.arch
        for addr, value in elf.relative_relocations.items():
            img.write(base + addr, arch.word.pack(arch.wrap(base + value)))
    _apply_symbolic(img)
    for sec in elf.sections:
        # Only sections a PT_LOAD covers are in memory at run time (and here).
        if sec.is_alloc and sec.addr and any(
                s.vaddr <= sec.addr and sec.addr + sec.size <= s.vaddr + s.memsz for s in loads):
            img.section_addr[sec.index] = img.emu_addr(sec.addr)
    return img


# Load-time relocations naming a symbol, as the dynamic loader applies them when the
# symbol is the file's own (arch.RelocType.at_load): (width, pc-relative, adds the addend).
_DYN_KINDS = {a.name: {n: (r.width, r.formula == "S+A-P", "A" in r.formula)
                       for n, r in a.reloc_types.items() if r.at_load}
              for a in ARCHES.values()}


def _apply_symbolic(img: Image) -> None:
    """Symbolic load-time relocations against symbols the file defines (i386 shared
    objects reach pv_ops and their own globals through them); others stay as written."""
    elf = img.elf
    try:
        relocs = elf.symbolic_dynamic_relocations
    except ElfFormatError:
        return  # unreadable: what depends on them stops, and says so
    if not relocs:
        return
    defined: dict[str, int] = {}
    for sec in elf.sections:
        if sec.type == SHT_DYNSYM:
            for sym in elf.dynamic_symbols(sec):
                if sym.defined and sym.name:
                    defined.setdefault(sym.name, sym.value)
    kinds = _DYN_KINDS[elf.arch.name]
    for addr, (rtype, name, addend) in relocs.items():
        kind = kinds.get(rtype)
        value = defined.get(name)
        if kind is None or value is None:
            continue
        width, pc, add = kind
        at = img.emu_addr(addr)
        result = img.emu_addr(value) + (addend if add else 0) - (at if pc else 0)
        with contextlib.suppress(VerifyError):  # outside every segment: not loaded
            img.write(at, (result & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))
