"""The emulation loader: an ELF file mapped into Unicorn as it would run.

ET_REL files are laid out section by section and their own relocations
(REL and RELA) are applied, so a stale relocation left inside a rewritten
site changes the bytes that run.  Undefined symbols are bound to stubs that
stop the emulation (`hlt`), to a table the verifier fills (the ops table),
or to a hostile C function (call targets left for the linker).  ET_EXEC and
ET_DYN files have their PT_LOAD segments mapped, ET_DYN at a non-zero base
with RELATIVE relocations applied.

Next to the image sits a small runtime written in machine code: a harness
that loads the register file from memory and jumps to the code under test,
an exit routine that stores the register file back (one `mem_read` per run
instead of slow register calls), and the hostile callees.  Unicorn is
imported inside functions only: `pvpatch --help` must not load it.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from .arch import Arch
from .elf import (
    PT_LOAD,
    SHN_ABS,
    SHN_COMMON,
    SHN_LORESERVE,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_REL,
    SHT_RELA,
    STT_SECTION,
    ElfFile,
)
from .errors import VerifyError

PAGE = 0x1000
HLT = 0xF4
Convention = Literal["c", "callee-save"]

# -- address plan --------------------------------------------------------------
# Everything the harness addresses absolutely sits below 2 GiB, so 64-bit code
# can use sign-extended disp32 operands.  The scratch area that pointer
# arguments point into is above 4 GiB on x86-64, so truncating a pointer shows.
RUNTIME = 0x7000_0000  # harness, hostile callees, reference models
RUNTIME_SIZE = 0x10000
MODELS = RUNTIME + 0x1000
MODEL_SLOT = 0x40
STACK_LO = 0x7010_0000
BLOCK = 0x7011_0000  # per-run block: stack window, state in, hostile values, state out
BELOW = 2048  # randomised stack bytes below the entry stack pointer
ABOVE = 256  # ... and above it (the caller's frame, compared)
ENTRY_SP = BLOCK + BELOW
STATE = ENTRY_SP + ABOVE
HOST = STATE + 0x100
OUT = HOST + 0x100
OUT_SIZE = 0x100
BLOCK_LEN = OUT + OUT_SIZE - BLOCK
STACK_HI = (BLOCK + BLOCK_LEN + PAGE - 1) // PAGE * PAGE
REL_BASE = 0x0100_0000  # ET_REL sections
EXT_BASE = 0x0080_0000  # ET_REL undefined symbols
EXT_LIMIT = REL_BASE
SCRATCH_SIZE = 0x10000
INSN_LIMIT = 50_000  # per run: a runaway loop ends as a failure, not a hang

# Tables read by the module loader, objtool or the unwinder, never by code at
# a site: their (many) relocations are not applied.
METADATA_SECTIONS = (".orc_unwind", ".return_sites", ".call_sites", ".retpoline_sites",
                     ".ibt_endbr_seal", "__mcount_loc", "__patchable_function_entries",
                     "__bug_table", ".static_call_sites", "__ksymtab", "__kcrctab", ".smp_locks",
                     "__ex_table", ".altinstructions", ".parainstructions", "__jump_table",
                     "__dyndbg", ".discard")

OPS_TABLE_SIZE = 0x1000
STUB_SIZE = 16

# State-block word indices after the register file (n = number of GPRs).
#   regs[n], flags, rip, cr0, cr2, cr3
# Out-block words: regs[n], flags, cr0, cr2, cr3, done, callee rsp


@dataclass(frozen=True)
class ArchRuntime:
    """Per-architecture constants of the runtime."""

    arch: Arch
    regs: tuple[str, ...]  # register file order (= ModRM numbering)
    scratch: int
    dyn_base: int
    args: tuple[str, ...]  # registers that carry pointer arguments

    @property
    def word(self) -> int:
        return self.arch.ptr_size

    @property
    def fmt(self) -> str:
        return "Q" if self.word == 8 else "I"

    @property
    def nregs(self) -> int:
        return len(self.regs)

    # state offsets (from BLOCK)
    def st(self, k: int) -> int:
        return STATE - BLOCK + k * self.word

    def st_addr(self, k: int) -> int:
        return STATE + k * self.word

    def out_addr(self, k: int) -> int:
        return OUT + k * self.word

    @property
    def st_flags(self) -> int:
        return self.nregs

    @property
    def st_rip(self) -> int:
        return self.nregs + 1

    @property
    def st_cr(self) -> int:  # cr0, cr2, cr3 follow
        return self.nregs + 2

    @property
    def out_flags(self) -> int:
        return self.nregs

    @property
    def out_cr(self) -> int:
        return self.nregs + 1

    @property
    def out_done(self) -> int:
        return self.nregs + 4

    @property
    def out_callee_sp(self) -> int:
        return self.nregs + 5

    @property
    def out_words(self) -> int:
        return self.nregs + 6

    def index(self, reg: str) -> int:
        return self.regs.index(reg)


def arch_runtime(arch: Arch) -> ArchRuntime:
    regs = tuple(sorted(arch.reg_numbers, key=lambda r: arch.reg_numbers[r]))
    if arch.ptr_size == 8:
        return ArchRuntime(arch, regs, 0x7F00_0000_0000, 0x5555_5555_4000,
                           ("rdi", "rsi", "rdx", "rcx", "r8", "r9"))
    return ArchRuntime(arch, regs, 0x6000_0000, 0x5655_5000, ("eax", "edx", "ecx"))


# -- a tiny encoder for the runtime's instructions ------------------------------


class _Asm:
    """Absolute-addressed moves, pushes and jumps: all the runtime needs."""

    def __init__(self, rt: ArchRuntime) -> None:
        self.rt = rt
        self.b64 = rt.word == 8
        self.code = bytearray()

    def _mem(self, opcode: bytes, reg: int, addr: int, rex_w: bool = True) -> None:
        if self.b64:
            rex = (0x48 if rex_w else 0x40) | ((reg >> 3) << 2)
            if rex != 0x40:
                self.code.append(rex)
            self.code += opcode + bytes([((reg & 7) << 3) | 4, 0x25])
        else:
            self.code += opcode + bytes([((reg & 7) << 3) | 5])
        self.code += (addr & 0xFFFFFFFF).to_bytes(4, "little")

    def load(self, reg: int, addr: int) -> None:  # mov reg, [addr]
        self._mem(b"\x8b", reg, addr)

    def store(self, reg: int, addr: int) -> None:  # mov [addr], reg
        self._mem(b"\x89", reg, addr)

    def or_load(self, reg: int, addr: int) -> None:  # or reg, [addr]
        self._mem(b"\x0b", reg, addr)

    def push_mem(self, addr: int) -> None:
        self._mem(b"\xff", 6, addr, rex_w=False)

    def pop_mem(self, addr: int) -> None:
        self._mem(b"\x8f", 0, addr, rex_w=False)

    def jmp_mem(self, addr: int) -> None:
        self._mem(b"\xff", 4, addr, rex_w=False)

    def store_byte(self, addr: int, value: int) -> None:
        self._mem(b"\xc6", 0, addr, rex_w=False)
        self.code.append(value)

    def raw(self, hexbytes: str) -> None:
        self.code += bytes.fromhex(hexbytes)

    def mov_from_cr(self, cr: int) -> None:  # mov eax/rax, crN
        self.code += bytes([0x0F, 0x20, 0xC0 | cr << 3])

    def mov_to_cr(self, cr: int) -> None:  # mov crN, eax/rax
        self.code += bytes([0x0F, 0x22, 0xC0 | cr << 3])


CRS = (0, 2, 3)
ARITH_FLAGS = 0x8D5  # CF PF AF ZF SF OF
IF_FLAG, DF_FLAG, AC_FLAG = 0x200, 0x400, 0x40000
CR0_TS = 0x8


@dataclass(frozen=True)
class Runtime:
    """The runtime region's code and the entry points inside it."""

    rt: ArchRuntime
    code: bytes
    entry: int
    entry_cr: int
    exit: int
    exit_cr: int
    hostile: Mapping[str, int]  # convention -> address
    models: Mapping[str, int] = field(default_factory=dict)  # op -> address


def build_runtime(rt: ArchRuntime, models: Mapping[str, bytes]) -> Runtime:
    arch = rt.arch
    a = _Asm(rt)
    sp = rt.index(arch.stack_pointer)
    ax = 0

    def entry(with_cr: bool) -> int:
        at = RUNTIME + len(a.code)
        a.load(sp, rt.st_addr(sp))
        a.push_mem(rt.st_addr(rt.st_flags))
        a.raw("9d")  # popf: arithmetic flags, IF, AC, DF from the state
        if with_cr:
            for k, cr in enumerate(CRS):
                a.load(ax, rt.st_addr(rt.st_cr + k))
                a.mov_to_cr(cr)
        for n in range(rt.nregs):
            if n != sp:
                a.load(n, rt.st_addr(n))
        a.jmp_mem(rt.st_addr(rt.st_rip))
        return at

    def exit_(with_cr: bool) -> int:
        at = RUNTIME + len(a.code)
        for n in range(rt.nregs):
            a.store(n, rt.out_addr(n))
        a.raw("9c")  # pushf; pop [out.flags]
        a.pop_mem(rt.out_addr(rt.out_flags))
        if with_cr:
            for k, cr in enumerate(CRS):
                a.mov_from_cr(cr)
                a.store(ax, rt.out_addr(rt.out_cr + k))
        a.store_byte(rt.out_addr(rt.out_done), 1)
        a.raw("f4")
        return at

    def hostile(changes: Iterable[str]) -> int:
        # Obeys its convention and nothing more: records the stack pointer it
        # sees, scrambles the arithmetic flags and every register it may change.
        at = RUNTIME + len(a.code)
        a.store(sp, rt.out_addr(rt.out_callee_sp))
        a.raw("9c58")  # pushf; pop %rax
        if rt.word == 8:
            a.raw("48252af7ffff")  # and $~0x8d5, %rax
        else:
            a.raw("252af7ffff")
        a.or_load(ax, HOST + rt.nregs * rt.word)
        a.raw("509d")  # push %rax; popf
        for reg in changes:
            n = rt.index(reg)
            a.load(n, HOST + n * rt.word)
        a.raw("c3")
        return at

    ent = entry(False)
    ent_cr = entry(True)
    ex = exit_(False)
    ex_cr = exit_(True)
    h_c = hostile((*arch.return_regs, *arch.caller_saved))
    h_cs = hostile(arch.return_regs)
    if len(a.code) > MODELS - RUNTIME:
        raise VerifyError("internal: the runtime code outgrew its area")
    code = bytearray(a.code) + bytes(MODELS - RUNTIME - len(a.code))
    placed: dict[str, int] = {}
    by_bytes: dict[bytes, int] = {}
    for op, body in models.items():
        if len(body) > MODEL_SLOT:
            raise VerifyError(f"reference model for {op} is longer than {MODEL_SLOT} bytes")
        if body not in by_bytes:
            by_bytes[body] = RUNTIME + len(code)
            code += body + bytes([HLT]) * (MODEL_SLOT - len(body))
        placed[op] = by_bytes[body]
    if len(code) > RUNTIME_SIZE:
        raise VerifyError("internal: too many reference models for the runtime area")
    return Runtime(rt, bytes(code), ent, ent_cr, ex, ex_cr,
                   {"c": h_c, "callee-save": h_cs}, placed)


# -- images ----------------------------------------------------------------------


@dataclass
class Image:
    """A file laid out in memory: regions to map and where things are."""

    elf: ElfFile
    arch: Arch
    regions: list[tuple[int, bytearray]]
    section_addr: dict[int, int]  # section index -> address
    symbols: dict[str, int]  # defined symbols -> address
    externals: dict[str, int]  # undefined symbols -> address
    ext_kind: dict[str, str]  # "stub" | "table" | "hostile-c" | "hostile-callee-save" | ...
    unsupported: list[tuple[int, str]]  # relocations not applied: (address, type name)
    base: int = 0  # ET_DYN load bias
    rel_keys: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    ext_end: int = EXT_BASE
    rel_end: int = REL_BASE

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


def is_ops_table(name: str) -> bool:
    """`pv_ops`, or a 2.6.30-era group such as `pv_irq_ops`."""
    return name == "pv_ops" or (name.startswith("pv_") and name.endswith("_ops"))


def load_image(elf: ElfFile, runtime: Runtime, *,
               call_targets: Mapping[str, Convention] | None = None,
               like: Image | None = None) -> Image:
    """Lay `elf` out for emulation.

    `call_targets` are undefined symbols that are called (bound to a hostile
    C function of that convention); `like` is the image of the same file
    before rewriting, whose addresses are reused for what both share.
    """
    if elf.is_relocatable:
        return _load_rel(elf, runtime, call_targets or {}, like)
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
              like: Image | None) -> Image:
    keys = _nth_keys(elf)
    addrs: dict[int, int] = {}
    rel_keys: dict[tuple[str, int], tuple[int, int]] = {}
    cursor = like.rel_end if like is not None else REL_BASE
    for sec in elf.sections:
        if not sec.is_alloc:
            continue
        key = keys[sec.index]
        old = like.rel_keys.get(key) if like is not None else None
        if old is not None and old[1] >= sec.size:
            addrs[sec.index] = old[0]
        else:
            cursor = _align(cursor, max(sec.addralign, 16))
            addrs[sec.index] = cursor
            # Room after every section for the exit jump placed past a site.
            cursor += sec.size + 32
        rel_keys[key] = (addrs[sec.index], sec.size)
    end = _align(cursor, PAGE)
    image = bytearray(end - REL_BASE)
    for sec in elf.sections:
        if sec.index in addrs and sec.type != SHT_NOBITS and sec.size:
            at = addrs[sec.index] - REL_BASE
            image[at : at + sec.size] = elf.section_data(sec)
    # Undefined and common symbols.
    externals: dict[str, int] = {}
    kinds: dict[str, str] = {}
    ext_cursor = like.ext_end if like is not None else EXT_BASE
    ext_blobs: list[tuple[int, bytes]] = []
    symbols: dict[str, int] = {}
    sym_addr: list[int] = []
    for sym in elf.symbols:
        value = 0
        if sym.shndx == SHN_UNDEF:
            if sym.index == 0 or not sym.name:
                sym_addr.append(0)
                continue
            if sym.name in externals:
                value = externals[sym.name]
            elif sym.name in call_targets:
                conv = call_targets[sym.name]
                value = runtime.hostile[conv]
                kinds[sym.name] = f"hostile-{conv}"
            else:
                old_ext = like.externals.get(sym.name) if like is not None else None
                table = is_ops_table(sym.name)
                if old_ext is not None and like is not None \
                        and like.ext_kind.get(sym.name) in ("stub", "table"):
                    value = old_ext
                else:
                    size = OPS_TABLE_SIZE if table else STUB_SIZE
                    ext_cursor = _align(ext_cursor, 16)
                    value = ext_cursor
                    ext_cursor += size
                kinds[sym.name] = "table" if table else "stub"
                ext_blobs.append((value, bytes(OPS_TABLE_SIZE) if table
                                  else bytes([HLT]) * STUB_SIZE))
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
        elif sym.shndx < SHN_LORESERVE and sym.shndx in addrs:
            value = addrs[sym.shndx] + (0 if sym.type == STT_SECTION else sym.value)
            if sym.name and sym.type != STT_SECTION:
                symbols.setdefault(sym.name, value)
        sym_addr.append(value)
    if ext_cursor > EXT_LIMIT:
        raise VerifyError("too many undefined symbols to lay out", elf.path)
    ext_start = EXT_BASE
    ext_buf = bytearray(_align(ext_cursor - ext_start, PAGE) or PAGE)
    for at, blob in ext_blobs:
        ext_buf[at - ext_start : at - ext_start + len(blob)] = blob
    img = Image(elf, elf.arch, [(ext_start, ext_buf), (REL_BASE, image)], addrs, symbols,
                externals, kinds, [], 0, rel_keys, ext_cursor, end)
    _apply_rel_relocs(img, sym_addr)
    return img


def _apply_rel_relocs(img: Image, sym_addr: list[int]) -> None:
    elf = img.elf
    arch = elf.arch
    kinds = _X64_KINDS if arch.ptr_size == 8 else _I386_KINDS
    cls = elf.cls
    buf = img.regions[1][1]
    nsyms = len(sym_addr)
    signed_of = {1: struct.Struct("<b"), 2: struct.Struct("<h"), 4: struct.Struct("<i"),
                 8: struct.Struct("<q")}
    unsigned_of = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"),
                   8: struct.Struct("<Q")}
    # Hot loop (hundreds of thousands of entries in a module): raw records, locals.
    for relsec in elf.sections:
        if relsec.type not in (SHT_REL, SHT_RELA) or relsec.is_alloc:
            continue
        base = img.section_addr.get(relsec.info)
        if base is None or elf.sections[relsec.info].name.startswith(METADATA_SECTIONS):
            continue  # relocations of debug or metadata sections
        rela = relsec.type == SHT_RELA
        fmt = cls.rela if rela else cls.rel
        if relsec.entsize != fmt.size or relsec.size % fmt.size:
            raise VerifyError(f"relocation section {relsec.name!r} has a bad entry size",
                              elf.path)
        shift = cls.info_shift
        tmask = (1 << shift) - 1
        sec_off = base - REL_BASE
        for rec in fmt.iter_unpack(elf.section_data(relsec)):
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
            s = sym_addr[sym] if sym < nsyms else 0
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


_X64_KINDS = {1: _kind(8, False, False), 2: _kind(4, True, True), 4: _kind(4, True, True),
              10: _kind(4, False, False), 11: _kind(4, False, True), 12: _kind(2, False, False),
              13: _kind(2, True, True), 14: _kind(1, False, False), 15: _kind(1, True, True),
              24: _kind(8, True, True)}
_I386_KINDS = {1: _kind(4, False, False), 2: _kind(4, True, True), 4: _kind(4, True, True),
               20: _kind(2, False, False), 21: _kind(2, True, True), 22: _kind(1, False, False),
               23: _kind(1, True, True)}


def _load_linked(elf: ElfFile, rt: ArchRuntime) -> Image:
    loads = sorted((s for s in elf.segments if s.type == PT_LOAD), key=lambda s: s.vaddr)
    if not loads:
        raise VerifyError("no PT_LOAD segment to map", elf.path)
    base = rt.dyn_base if elf.e_type == 3 else 0
    # Cluster segments whose pages are close, map each cluster as one region.
    clusters: list[list[int]] = []
    for s in loads:
        lo = (base + s.vaddr) // PAGE * PAGE
        hi = _align(base + s.vaddr + s.memsz, PAGE) + PAGE  # slack for the exit jump
        if clusters and lo <= clusters[-1][1] + 0x100000:
            clusters[-1][1] = max(clusters[-1][1], hi)
        else:
            clusters.append([lo, hi])
    regions = [(lo, bytearray(hi - lo)) for lo, hi in clusters]
    img = Image(elf, elf.arch, regions, {}, {}, {}, {}, [], base)
    for s in loads:
        if s.filesz:
            data = elf.data[s.offset : s.offset + s.filesz]
            img.write(base + s.vaddr, data)
    if base:
        fmt = "<Q" if elf.arch.ptr_size == 8 else "<I"
        mask = (1 << (8 * elf.arch.ptr_size)) - 1
        for addr, value in elf.relative_relocations.items():
            img.write(base + addr, struct.pack(fmt, (base + value) & mask))
    for sec in elf.sections:
        if sec.is_alloc and sec.addr:
            img.section_addr[sec.index] = base + sec.addr
    for name, sym in elf.symbols_by_name.items():
        if sym.shndx != SHN_UNDEF and sym.shndx < SHN_LORESERVE:
            img.symbols[name] = base + sym.value
    return img


# -- the machine -------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    out: tuple[int, ...]  # the out block's words
    writes: Mapping[int, int]  # byte address -> final value, for every byte written
    error: str | None

    @property
    def done(self) -> bool:
        return self.error is None and bool(self.out[-2] & 0xFF)


@cache
def _scratch_bytes() -> bytes:
    return random.Random(0x5C7A7C4).randbytes(SCRATCH_SIZE)


class Machine:
    """One Unicorn engine holding one image and the runtime; reused for every run."""

    def __init__(self, image: Image, runtime: Runtime) -> None:
        import importlib

        # Typed as Any: the binding's own annotations are partial.
        unicorn: Any = importlib.import_module("unicorn")
        rt = runtime.rt
        self.image = image
        self.runtime = runtime
        self.rt = rt
        mode = unicorn.UC_MODE_64 if rt.word == 8 else unicorn.UC_MODE_32
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, mode)
        self.uc: Any = uc
        self._UcError = unicorn.UcError
        spans = [(RUNTIME, RUNTIME_SIZE), (STACK_LO, STACK_HI - STACK_LO),
                 (rt.scratch, SCRATCH_SIZE)]
        spans += [(start, len(buf)) for start, buf in image.regions]
        ordered = sorted(spans)
        for (a0, s0), (a1, _s1) in itertools.pairwise(ordered):
            if a0 + s0 > a1:
                raise VerifyError(f"the image overlaps the emulator's own memory at {a1:#x}",
                                  image.elf.path)
        for start, size in spans:
            uc.mem_map(start, size, unicorn.UC_PROT_ALL)
        uc.mem_write(RUNTIME, runtime.code)
        # Pointer arguments point here: fixed random bytes, restored after writes.
        scratch = bytearray(_scratch_bytes())
        uc.mem_write(rt.scratch, bytes(scratch))
        self.pristine: list[tuple[int, bytearray]] = [(rt.scratch, scratch)]
        for start, buf in image.regions:
            uc.mem_write(start, bytes(buf))
            self.pristine.append((start, bytearray(buf)))
        self._log: list[tuple[int, int]] = []
        log = self._log

        def on_write(_uc: Any, _access: int, address: int, size: int, _value: int,
                     _data: Any) -> None:
            log.append((address, size))

        for start, size in [(ENTRY_SP, ABOVE), *((a, len(b)) for a, b in self.pristine)]:
            uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, on_write, begin=start,
                        end=start + size - 1)
        self._out_fmt = struct.Struct("<" + rt.fmt * rt.out_words)

    # memory the verifier itself changes (code or data): mirrored in `pristine`
    def poke(self, addr: int, data: bytes) -> bytes:
        old = bytes(self.uc.mem_read(addr, len(data)))
        self.uc.mem_write(addr, data)
        self.uc.ctl_remove_cache(addr, addr + len(data))
        for start, buf in self.pristine:
            if start <= addr < start + len(buf):
                buf[addr - start : addr - start + len(data)] = data
        return old

    def read(self, addr: int, size: int) -> bytes:
        return bytes(self.uc.mem_read(addr, size))

    def initial_byte(self, addr: int, block: bytes | bytearray) -> int:
        if BLOCK <= addr < BLOCK + len(block):
            return block[addr - BLOCK]
        for start, buf in self.pristine:
            if start <= addr < start + len(buf):
                return buf[addr - start]
        return 0

    def run(self, block: bytes | bytearray, with_cr: bool = False) -> RunResult:
        uc = self.uc
        log = self._log
        log.clear()
        uc.mem_write(BLOCK, bytes(block))
        error = None
        entry = self.runtime.entry_cr if with_cr else self.runtime.entry
        try:
            uc.emu_start(entry, 0, 0, INSN_LIMIT)
        except self._UcError as exc:
            error = str(exc)
        out = self._out_fmt.unpack(uc.mem_read(OUT, self._out_fmt.size))
        writes: dict[int, int] = {}
        if log:
            for address, size in log:
                data = uc.mem_read(address, size)
                for k in range(size):
                    writes[address + k] = data[k]
            self._restore(writes)
        if error is None and not out[-2] & 0xFF:
            error = self._why_stopped()
        return RunResult(out, writes, error)

    def _restore(self, writes: Mapping[int, int]) -> None:
        for start, buf in self.pristine:
            end = start + len(buf)
            for addr in writes:
                if start <= addr < end:
                    self.uc.mem_write(addr, bytes(buf[addr - start : addr - start + 1]))

    def _why_stopped(self) -> str:
        from unicorn.x86_const import UC_X86_REG_EIP, UC_X86_REG_RIP

        pc = self.uc.reg_read(UC_X86_REG_RIP if self.rt.word == 8 else UC_X86_REG_EIP)
        name = self.image.symbol_at(pc - 1)
        if name is not None:
            return f"reached undefined symbol {name} (stub at {pc - 1:#x})"
        return f"stopped at {pc:#x} without reaching the site end"

    def pc(self) -> int:
        from unicorn.x86_const import UC_X86_REG_EIP, UC_X86_REG_RIP

        return int(self.uc.reg_read(UC_X86_REG_RIP if self.rt.word == 8 else UC_X86_REG_EIP))


def exit_jump(rt: ArchRuntime, at: int, target: int) -> bytes:
    """A jump from `at` to `target`: rel32 when it reaches, else through memory."""
    disp = target - (at + 5)
    if rt.word == 4 or -(1 << 31) <= disp < (1 << 31):
        return b"\xe9" + (disp & 0xFFFFFFFF).to_bytes(4, "little")
    return b"\xff\x25\x00\x00\x00\x00" + target.to_bytes(8, "little")
