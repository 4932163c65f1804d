"""The emulation loader: an ELF file mapped into Unicorn as it would run.

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

Next to the image sits a small runtime written in machine code.  It runs a
*batch* of trials per `emu_start`: trial k has its own slot (a stack window
with the caller's frame above it, the register file to start with, the
hostile callee's values) and its own scratch area; `entry_k` loads the
register file and jumps to the code under test, whose end jumps (through a
control word) to `exit_k`, which stores the register file in trial k's out
record and goes on to `entry_k+1`.  The trial slots are written once per
batch of trial states, not per site, and the harness code is translated
once: per site only the site-end jump is poked.  An engine (`Machine`)
outlives the files: `attach` maps the next image in place of the last, and
the runtime stays mapped and translated.  Unicorn is imported inside
functions only: `pvpatch --help` must not load it.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import itertools
import random
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from ..arch import Arch, convention_changes
from ..elf import (
    PT_LOAD,
    SHN_ABS,
    SHN_COMMON,
    SHN_UNDEF,
    SHN_XINDEX,
    SHT_DYNSYM,
    SHT_NOBITS,
    SHT_REL,
    SHT_RELA,
    SHT_STRTAB,
    STT_SECTION,
    ElfFile,
    Section,
    Symbol,
)
from ..errors import ElfFormatError, VerifyError

PAGE = 0x1000
HLT = 0xF4
Convention = Literal["c", "callee-save"]

# -- address plan --------------------------------------------------------------
# Everything the harness addresses absolutely sits below 2 GiB, so 64-bit code
# can use sign-extended disp32 operands.  The scratch areas that pointer
# arguments point into are above 4 GiB on x86-64, so truncating a pointer shows.
TRIAL_SLOTS = 16  # trials per batch (one emu_start)
RUNTIME = 0x7000_0000  # fixed code, reference models, control words, out records, harness
RUNTIME_SIZE = 0x20000
MODELS = RUNTIME + 0x1000
MODEL_SLOT = 0x40
MODELS_END = RUNTIME + 0x8000
CONTROL = RUNTIME + 0x8000  # data page: words the harness jumps through (8 bytes apart)
C_EXIT = CONTROL  # this trial's exit routine
C_HOST_C = CONTROL + 0x08  # this trial's hostile callees
C_HOST_CS = CONTROL + 0x10
C_SITE = CONTROL + 0x18  # where every entry jumps: the code under test
C_REF = CONTROL + 0x20  # what the caller stub calls
C_NEXT = CONTROL + 0x40  # after trial k: entry k+1, or the halt
OUTS = RUNTIME + 0x9000  # out records, one per trial
OUT_SIZE = 0x100
EXIT_SP = RUNTIME + 0xB000  # the exit routines' own stack (top)
HARNESS = RUNTIME + 0x10000  # per-trial entry, exit and hostile code
HARNESS_STRIDE = 0x800
# Trial slots, contiguous and each ending in its block: the stack of trial k
# runs on into the slots of trials already run; below slot 0 is plain stack.
STACK_LO = 0x700F_0000
BANK = 0x7010_0000
SLOT_STRIDE = 0x1000
BANK_LEN = TRIAL_SLOTS * SLOT_STRIDE
BELOW = 2048  # randomised stack bytes below the entry stack pointer
ABOVE = 256  # ... and above it (the caller's frame, compared)
# A trial's block (relative to its start): stack window, caller's frame, state
# in, hostile values.
ENTRY_OFF = BELOW
STATE_OFF = BELOW + ABOVE
HOST_OFF = STATE_OFF + 0x100
BLOCK_LEN = HOST_OFF + 0x100
REL_BASE = 0x0100_0000  # ET_REL sections
EXT_BASE = 0x0080_0000  # ET_REL undefined symbols
EXT_LIMIT = REL_BASE
SCRATCH_SIZE = 0x4000  # per trial
HIGH_HALF = 1 << 63  # x86-64 kernel addresses: mapped lower (Image.emu_addr)
HIGH_SPAN = 0x7000_0000_0000
MAPPED_SLACK = 256 << 20  # memory beyond the file size an image may need (bss, layout)


def max_mapped(file_size: int) -> int:
    """Bytes of memory an image of a file may take: a small multiple of the file.

    A header claiming a huge bss or section must not make the verifier allocate it.
    """
    return 4 * file_size + MAPPED_SLACK
KEEP_MAPPED = 16 << 20  # an engine keeps an image this large mapped between files
INSN_LIMIT = 50_000  # per run: a runaway loop ends as a failure, not a hang


def block_addr(k: int) -> int:
    """Start of trial slot k's block."""
    return BANK + (k + 1) * SLOT_STRIDE - BLOCK_LEN


def entry_sp(k: int) -> int:
    return block_addr(k) + ENTRY_OFF


def out_addr(k: int) -> int:
    return OUTS + k * OUT_SIZE


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

# State words (from a block's STATE_OFF), n = number of GPRs:
#   regs[n], flags, rip (unused), cr0, cr2, cr3
# Out-record words: regs[n], flags, cr0, cr2, cr3, done, callee rsp


# Bytes of translated code an engine may cache (see Machine.__init__).
TCG_BUFFER = 32 << 20


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

    def st_addr(self, trial: int, k: int) -> int:
        return block_addr(trial) + STATE_OFF + k * self.word

    def host_addr(self, trial: int, k: int) -> int:
        return block_addr(trial) + HOST_OFF + k * self.word

    def out_addr(self, trial: int, k: int) -> int:
        return out_addr(trial) + k * self.word

    def scratch_of(self, trial: int) -> int:
        return self.scratch + trial * SCRATCH_SIZE

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


# Per architecture: where the runtime's scratch area and a shared object go, and the
# registers that carry a C function's first arguments (i386 kernel code: -mregparm=3).
_RUNTIME_LAYOUT: dict[str, tuple[int, int, tuple[str, ...]]] = {
    "x86_64": (0x7F00_0000_0000, 0x5555_5555_4000, ("rdi", "rsi", "rdx", "rcx", "r8", "r9")),
    "i386": (0x6000_0000, 0x5655_5000, ("eax", "edx", "ecx")),
}


def arch_runtime(arch: Arch) -> ArchRuntime:
    regs = tuple(sorted(arch.reg_numbers, key=lambda r: arch.reg_numbers[r]))
    scratch, dyn_base, args = _RUNTIME_LAYOUT[arch.name]
    return ArchRuntime(arch, regs, scratch, dyn_base, args)


# -- a tiny encoder for the runtime's instructions ------------------------------


class _Asm:
    """Absolute-addressed moves, pushes and jumps: all the runtime needs."""

    def __init__(self, rt: ArchRuntime, origin: int) -> None:
        self.rt = rt
        self.b64 = rt.word == 8
        self.origin = origin
        self.code = bytearray()

    @property
    def here(self) -> int:
        return self.origin + len(self.code)

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

    def store_imm(self, addr: int, value: int) -> None:  # mov word [addr], imm32
        self._mem(b"\xc7", 0, addr)
        self.code += (value & 0xFFFFFFFF).to_bytes(4, "little")

    def or_load(self, reg: int, addr: int) -> None:  # or reg, [addr]
        self._mem(b"\x0b", reg, addr)

    def push_mem(self, addr: int) -> None:
        self._mem(b"\xff", 6, addr, rex_w=False)

    def pop_mem(self, addr: int) -> None:
        self._mem(b"\x8f", 0, addr, rex_w=False)

    def jmp_mem(self, addr: int) -> None:
        self._mem(b"\xff", 4, addr, rex_w=False)

    def call_mem(self, addr: int) -> None:
        self._mem(b"\xff", 2, addr, rex_w=False)

    def store_byte(self, addr: int, value: int) -> None:
        self._mem(b"\xc6", 0, addr, rex_w=False)
        self.code.append(value)

    def raw(self, hexbytes: str) -> None:
        self.code += bytes.fromhex(hexbytes)

    def mov_from_cr(self, cr: int) -> None:  # mov eax/rax, crN
        self.code += bytes([0x0F, 0x20, 0xC0 | cr << 3])

    def mov_to_cr(self, cr: int) -> None:  # mov crN, eax/rax
        self.code += bytes([0x0F, 0x22, 0xC0 | cr << 3])


def jump_through(rt: ArchRuntime, word: int) -> bytes:
    """`jmp *[word]`: the same bytes wherever they are placed."""
    a = _Asm(rt, 0)
    a.jmp_mem(word)
    return bytes(a.code)


CRS = (0, 2, 3)
ARITH_FLAGS = 0x8D5  # CF PF AF ZF SF OF
IF_FLAG, DF_FLAG, AC_FLAG = 0x200, 0x400, 0x40000
CR0_TS = 0x8


@dataclass(frozen=True)
class Runtime:
    """The runtime region's code and the entry points inside it."""

    rt: ArchRuntime
    code: bytes  # mapped at RUNTIME
    entry: tuple[int, ...]  # per trial slot
    entry_cr: tuple[int, ...]
    exit: int  # jumps to the current trial's exit routine
    halt: int
    caller: int  # calls *C_REF, then exits: runs a function as if called from a site
    hostile: Mapping[str, int]  # convention -> address (dispatches to the trial's own)
    models: Mapping[str, int] = field(default_factory=dict)  # op -> address

    @property
    def site_end(self) -> bytes:
        """What is placed at the end of the code under test."""
        return jump_through(self.rt, C_EXIT)


def build_runtime(rt: ArchRuntime, models: Mapping[str, bytes]) -> Runtime:
    arch = rt.arch
    sp = rt.index(arch.stack_pointer)
    ax = 0
    a = _Asm(rt, RUNTIME)
    halt = a.here
    a.raw("f4")
    ex = a.here
    a.jmp_mem(C_EXIT)
    caller = a.here
    a.call_mem(C_REF)
    a.jmp_mem(C_EXIT)
    host_c = a.here
    a.jmp_mem(C_HOST_C)
    host_cs = a.here
    a.jmp_mem(C_HOST_CS)
    fixed = a.code

    h = _Asm(rt, HARNESS)
    entries: list[int] = []
    entries_cr: list[int] = []
    for k in range(TRIAL_SLOTS):
        h.code += bytes(k * HARNESS_STRIDE - len(h.code))

        def exit_(with_cr: bool, k: int = k) -> int:
            at = h.here
            for n in range(rt.nregs):
                h.store(n, rt.out_addr(k, n))
            # Own stack: the trial's is left as the code under test left it.
            h.raw(("48c7c4" if rt.word == 8 else "bc") + EXIT_SP.to_bytes(4, "little").hex())
            h.raw("9c")  # pushf; pop [out.flags]
            h.pop_mem(rt.out_addr(k, rt.out_flags))
            if with_cr:
                for j, cr in enumerate(CRS):
                    h.mov_from_cr(cr)
                    h.store(ax, rt.out_addr(k, rt.out_cr + j))
            h.store_byte(rt.out_addr(k, rt.out_done), 1)
            h.jmp_mem(C_NEXT + k * rt.word)
            return at

        def hostile(changes: Iterable[str], k: int = k) -> int:
            # Obeys its convention and nothing more: records the stack pointer it
            # sees, scrambles the arithmetic flags and every register it may change.
            at = h.here
            h.store(sp, rt.out_addr(k, rt.out_callee_sp))
            h.raw("9c58")  # pushf; pop %rax
            h.raw("48252af7ffff" if rt.word == 8 else "252af7ffff")  # and $~0x8d5, %rax
            h.or_load(ax, rt.host_addr(k, rt.nregs))
            h.raw("509d")  # push %rax; popf
            for reg in changes:
                n = rt.index(reg)
                h.load(n, rt.host_addr(k, n))
            h.raw("c3")
            return at

        exit_plain, exit_cr = exit_(False), exit_(True)
        h_c = hostile(convention_changes(arch, "c"))
        h_cs = hostile(convention_changes(arch, "callee-save"))

        def entry(with_cr: bool, k: int = k, exit_plain: int = exit_plain,
                  exit_cr: int = exit_cr, h_c: int = h_c, h_cs: int = h_cs) -> int:
            at = h.here
            h.store_imm(C_EXIT, exit_cr if with_cr else exit_plain)
            h.store_imm(C_HOST_C, h_c)
            h.store_imm(C_HOST_CS, h_cs)
            h.store_byte(rt.out_addr(k, rt.out_done), 0)
            h.store_imm(rt.out_addr(k, rt.out_callee_sp), 0)
            h.load(sp, rt.st_addr(k, sp))
            h.push_mem(rt.st_addr(k, rt.st_flags))
            h.raw("9d")  # popf: arithmetic flags, IF, AC, DF from the state
            if with_cr:
                for j, cr in enumerate(CRS):
                    h.load(ax, rt.st_addr(k, rt.st_cr + j))
                    h.mov_to_cr(cr)
            for n in range(rt.nregs):
                if n != sp:
                    h.load(n, rt.st_addr(k, n))
            h.jmp_mem(C_SITE)
            return at

        entries.append(entry(False))
        entries_cr.append(entry(True))
        if len(h.code) > (k + 1) * HARNESS_STRIDE:
            raise VerifyError("internal: the harness outgrew its slot")
    if len(fixed) > MODELS - RUNTIME:
        raise VerifyError("internal: the runtime code outgrew its area")
    code = bytearray(fixed) + bytes(MODELS - RUNTIME - len(fixed))
    placed: dict[str, int] = {}
    by_bytes: dict[bytes, int] = {}
    for op, body in models.items():
        if len(body) > MODEL_SLOT:
            raise VerifyError(f"reference model for {op} is longer than {MODEL_SLOT} bytes")
        if body not in by_bytes:
            by_bytes[body] = RUNTIME + len(code)
            code += body + bytes([HLT]) * (MODEL_SLOT - len(body))
        placed[op] = by_bytes[body]
    if len(code) > MODELS_END - RUNTIME:
        raise VerifyError("internal: too many reference models for the runtime area")
    code += bytes(HARNESS - RUNTIME - len(code))
    code += h.code
    return Runtime(rt, bytes(code), tuple(entries), tuple(entries_cr), ex, halt, caller,
                   {"c": host_c, "callee-save": host_cs}, placed)


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


def is_ops_table(name: str) -> bool:
    """`pv_ops`, or a 2.6.30-era group such as `pv_irq_ops`."""
    return name == "pv_ops" or (name.startswith("pv_") and name.endswith("_ops"))


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
        sym_addr = {i: bind(sym) for i, sym in _some_symbols(elf, wanted)}
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


def _some_symbols(elf: ElfFile, wanted: Sequence[int]) -> Iterator[tuple[int, Symbol]]:
    """The symbols with these indices (those that exist), read without the whole table."""
    sec = elf.symtab
    if sec is None or not wanted:
        return
    fmt = elf.cls.sym
    strsec = elf.sections[sec.link] if sec.link < len(elf.sections) else None
    if sec.entsize != fmt.size or sec.size % fmt.size or strsec is None \
            or strsec.type != SHT_STRTAB:
        keep = set(wanted)
        yield from ((i, s) for i, s in enumerate(elf.symbols) if i in keep)  # or its error
        return
    data = elf.section_data(sec)
    strings = elf.section_data(strsec)
    count = len(data) // fmt.size
    for i in wanted:
        if i >= count:
            continue
        name_off, info, other, shndx, value, size = elf.cls.unpack_sym(data, i * fmt.size)
        name = ""
        if name_off:
            stop = strings.find(b"\0", name_off)
            if name_off >= len(strings) or stop < 0:
                yield i, elf.symbols[i]  # the whole table's reading says what is wrong
                continue
            name = strings[name_off:stop].decode("utf-8", "replace")
        if shndx == SHN_XINDEX:  # the real index is in .symtab_shndx: the full reading has it
            yield i, elf.symbols[i]
            continue
        yield i, Symbol(i, name, value, size, info & 0xF, info >> 4, other, shndx, name_off,
                        shndx)


def _rel_records(elf: ElfFile, addrs: Mapping[int, int], keys: Mapping[int, tuple[str, int]],
                 only: Mapping[tuple[str, int], Sequence[tuple[int, int]]] | None,
                 ) -> list[tuple[Section, list[tuple[int, ...]]]]:
    """The relocation records to apply, by the section they patch: all of them, or
    (`only`) those that may touch a byte inside the given (start, end) offsets."""
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


_X64_KINDS = {1: _kind(8, False, False), 2: _kind(4, True, True), 4: _kind(4, True, True),
              10: _kind(4, False, False), 11: _kind(4, False, True), 12: _kind(2, False, False),
              13: _kind(2, True, True), 14: _kind(1, False, False), 15: _kind(1, True, True),
              24: _kind(8, True, True)}
_I386_KINDS = {1: _kind(4, False, False), 2: _kind(4, True, True), 4: _kind(4, True, True),
               20: _kind(2, False, False), 21: _kind(2, True, True), 22: _kind(1, False, False),
               23: _kind(1, True, True)}
_RELOC_KINDS = {"x86_64": _X64_KINDS, "i386": _I386_KINDS}


def _load_linked(elf: ElfFile, rt: ArchRuntime) -> Image:
    loads = sorted((s for s in elf.segments if s.type == PT_LOAD), key=lambda s: s.vaddr)
    if not loads:
        raise VerifyError("no PT_LOAD segment to map", elf.path)
    base = rt.dyn_base if elf.e_type == 3 else 0
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
# symbol is the file's own: (width, pc-relative, adds the addend).
_DYN_KINDS: dict[str, dict[int, tuple[int, bool, bool]]] = {
    "x86_64": {1: (8, False, True), 2: (4, True, True), 6: (8, False, False),
               7: (8, False, False), 10: (4, False, True), 11: (4, False, True)},
    "i386": {1: (4, False, True), 2: (4, True, True), 6: (4, False, False),
             7: (4, False, False)},
}


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
            for sym in elf._dynamic_symbols(sec):
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


# -- the machine -------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    out: tuple[int, ...]  # the out record's words
    writes: Mapping[int, int]  # byte address -> final value, for every byte written
    error: str | None

    @property
    def done(self) -> bool:
        return self.error is None and bool(self.out[-2] & 0xFF)


@dataclass(frozen=True)
class Step:
    """One instruction about to run (`Machine.trace`)."""

    pc: int
    regs: tuple[int, ...]  # in ArchRuntime.regs order
    stack: bytes  # from the stack pointer up


@cache
def _scratch_bytes() -> bytes:
    return random.Random(0x5C7A7C4).randbytes(SCRATCH_SIZE * TRIAL_SLOTS)


class Machine:
    """One Unicorn engine holding the runtime and, in turn, one image at a time.

    The engine outlives the files: `attach` maps a file's image in place of the
    last one (the runtime's code stays mapped and translated).  The trial slots
    hold one batch of trial states (`load_bank`); `run_trials` runs the code at
    an address once per slot and restores every byte the runs wrote.
    """

    def __init__(self, runtime: Runtime) -> None:
        import importlib

        # Typed as Any: the binding's own annotations are partial.
        unicorn: Any = importlib.import_module("unicorn")
        from unicorn.x86_const import UC_X86_REG_CR0, UC_X86_REG_EFLAGS

        rt = runtime.rt
        self.runtime = runtime
        self.rt = rt
        mode = unicorn.UC_MODE_64 if rt.word == 8 else unicorn.UC_MODE_32
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, mode)
        # Unicorn reserves a 1 GiB translation buffer per engine by default; a
        # verify pool would then die under a modest address-space limit.  The
        # code run here is a few KiB of thunks and sites.
        uc.ctl_set_tcg_buffer_size(TCG_BUFFER)
        self.uc: Any = uc
        self._UcError = unicorn.UcError
        self._prot = unicorn.UC_PROT_ALL
        scratch_len = SCRATCH_SIZE * TRIAL_SLOTS
        self.spans = [(RUNTIME, RUNTIME_SIZE), (rt.scratch, scratch_len),
                      (STACK_LO, BANK + BANK_LEN - STACK_LO)]
        for start, size in self.spans:
            uc.mem_map(start, size, unicorn.UC_PROT_ALL)
        uc.mem_write(RUNTIME, runtime.code)
        self.cr0 = int(uc.reg_read(UC_X86_REG_CR0))  # as the engine starts
        self._eflags = UC_X86_REG_EFLAGS
        # Pointer arguments point here: fixed random bytes, restored after writes.
        scratch = bytearray(_scratch_bytes())
        uc.mem_write(rt.scratch, bytes(scratch))
        self._scratch = (rt.scratch, scratch)
        self.pristine: list[tuple[int, bytearray]] = [self._scratch]
        self.image: Image | None = None
        self._mapped: list[tuple[int, int]] = []
        self.bank = bytes(BANK_LEN)
        self.bank_key: object = None
        self._log: list[tuple[int, int]] = []
        log = self._log

        def on_write(_uc: Any, _access: int, address: int, size: int, _value: int,
                     _data: Any) -> None:
            log.append((address, size))

        # Every address but the runtime's and the trial slots': the scratch areas
        # and any image (the callers' frames are compared after the run: a hook
        # per slot would slow every write down).  Set once, for every image.
        top = (1 << (8 * rt.word)) - 1
        for lo, hi in ((0, RUNTIME - 1), (RUNTIME + RUNTIME_SIZE, STACK_LO - 1),
                       (BANK + BANK_LEN, top)):
            uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, on_write, begin=lo, end=hi)
        self._out_fmt = struct.Struct("<" + rt.fmt * rt.out_words)
        self._word = struct.Struct("<" + rt.fmt)
        self._ctl = struct.Struct("<" + rt.fmt + ("4x" if rt.word == 4 else "") + rt.fmt)
        self._next_key: tuple[int, int, bool] | None = None
        self._scratch_end = rt.scratch + scratch_len
        # The runtime's code (not its control words and out records), to check
        # that no run of an earlier file changed it.
        self._code_spans = [(RUNTIME, runtime.code[: CONTROL - RUNTIME]),
                            (HARNESS, runtime.code[HARNESS - RUNTIME :])]

    def attach(self, image: Image) -> None:
        """Map `image` in place of the image mapped before (if any).

        A region at the same place and of the same size as one of the last
        image's is kept mapped and overwritten (the usual case for the small
        table of undefined symbols); code translated from it is forgotten.
        """
        path = image.elf.path
        spans = [*self.spans, *((start, len(buf)) for start, buf in image.regions)]
        for (a0, s0), (a1, _s1) in itertools.pairwise(sorted(spans)):
            if a0 + s0 > a1:
                self.detach()
                raise VerifyError(f"the image overlaps the emulator's own memory at {a1:#x}",
                                  path)
        uc = self.uc
        for addr, code in self._code_spans:
            if uc.mem_read(addr, len(code)) != code:
                uc.mem_write(addr, code)
                uc.ctl_remove_cache(addr, addr + len(code))
        wanted = {(start, len(buf)) for start, buf in image.regions}
        kept = [span for span in self._mapped if span in wanted]
        for start, size in self._mapped:
            if (start, size) not in wanted:
                uc.mem_unmap(start, size)
        self._mapped = kept
        self.image = None
        self.pristine = [self._scratch]
        try:
            for start, buf in image.regions:
                if (start, len(buf)) not in kept:
                    try:
                        uc.mem_map(start, len(buf), self._prot)
                    except self._UcError as exc:
                        raise VerifyError(f"cannot map {len(buf):#x} bytes at {start:#x} for "
                                          f"emulation: {exc}", path) from None
                    self._mapped.append((start, len(buf)))
                _write_buffer(uc, start, buf)
                # What an earlier file's code at these addresses was translated to.
                uc.ctl_remove_cache(start, start + len(buf))
        except BaseException:
            self.detach()
            raise
        # The image's own buffers: pokes change both, and are undone in both.
        self.pristine = [self._scratch, *image.regions]
        self.image = image

    def detach(self) -> None:
        """Unmap the image."""
        uc = self.uc
        for start, size in self._mapped:
            uc.mem_unmap(start, size)
        self._mapped.clear()
        self.pristine = [self._scratch]
        self.image = None

    def release(self) -> None:
        """Done with the image: a small one stays mapped (the next may reuse its
        regions), a large one is unmapped (not to hold its memory)."""
        if sum(size for _start, size in self._mapped) > KEEP_MAPPED:
            self.detach()

    # memory the verifier itself changes (code or data): mirrored in `pristine`
    def poke(self, addr: int, data: bytes, code: bool = True) -> bytes:
        """Write `data` at `addr` (forgetting code translated from it, for `code`);
        the bytes it replaced."""
        for start, buf in self.pristine:
            if start <= addr < start + len(buf):
                at = addr - start
                old = bytes(buf[at : at + len(data)])
                if len(old) == len(data):
                    buf[at : at + len(data)] = data
                    break
        else:
            try:
                old = bytes(self.uc.mem_read(addr, len(data)))
            except self._UcError:
                raise VerifyError(f"address {addr:#x} is not mapped in the emulated image",
                                  self.image.elf.path if self.image else None) from None
        self.uc.mem_write(addr, data)
        if code:
            self.uc.ctl_remove_cache(addr, addr + len(data))
        return old

    def read(self, addr: int, size: int) -> bytes:
        try:
            return bytes(self.uc.mem_read(addr, size))
        except self._UcError:  # a size from the file (a thunk symbol's) reaching out
            raise VerifyError(f"{size} bytes at {addr:#x} are not mapped in the emulated "
                              "image", self.image.elf.path if self.image else None) from None

    def load_bank(self, key: object, blocks: Sequence[bytes]) -> None:
        """Put one batch of trial blocks (at most TRIAL_SLOTS) in the slots."""
        if key == self.bank_key:
            return
        bank = bytearray(BANK_LEN)
        for k, blk in enumerate(blocks):
            at = block_addr(k) - BANK
            bank[at : at + len(blk)] = blk
        self.bank = bytes(bank)
        self.uc.mem_write(BANK, self.bank)
        self.bank_key = key

    def initial_byte(self, addr: int) -> int:
        """A byte as it was before the runs (trial slots, scratch, image)."""
        if BANK <= addr < BANK + BANK_LEN:
            return self.bank[addr - BANK]
        for start, buf in self.pristine:
            if start <= addr < start + len(buf):
                return buf[addr - start]
        return 0

    def run_trials(self, count: int, site: int, ref: int = 0,
                   with_cr: bool = False) -> list[RunResult]:
        """Run the code at `site` once per slot 0..count-1 (`ref`: what the caller
        stub calls, when `site` is `runtime.caller`).  Results in slot order, up
        to the first run that did not complete."""
        results, shared = self._batch(range(count), site, ref, with_cr)
        if shared and count > 1:
            # A run wrote the image: the next trials would not start from the
            # file's own memory.  One trial per emu_start, restored in between.
            results = []
            for k in range(count):
                one, _ = self._batch(range(k, k + 1), site, ref, with_cr)
                results += one
                if not one[0].done:
                    break
        return results

    def _batch(self, slots: range, site: int, ref: int,
               with_cr: bool) -> tuple[list[RunResult], bool]:
        uc = self.uc
        first, count = slots[0], len(slots)
        entries = self.runtime.entry_cr if with_cr else self.runtime.entry
        uc.mem_write(C_SITE, self._ctl.pack(site, ref))
        key = (first, count, with_cr)
        if key != self._next_key:
            nxt = [entries[k + 1] for k in slots[:-1]] + [self.runtime.halt]
            uc.mem_write(C_NEXT + first * self.rt.word,
                         b"".join(self._word.pack(a) for a in nxt))
            self._next_key = key
        log = self._log
        log.clear()
        error = None
        # A run that stopped on a trap (TF from a popf, say) leaves its flags in the
        # CPU: the next entry's first instruction would trap too.
        uc.reg_write(self._eflags, 2)
        try:
            uc.emu_start(entries[first], 0, 0, INSN_LIMIT * count)
        except self._UcError as exc:
            error = str(exc)
        raw = uc.mem_read(out_addr(first), OUT_SIZE * count)
        unpack = self._out_fmt.unpack_from
        outs = [unpack(raw, j * OUT_SIZE) for j in range(count)]
        per: list[dict[int, int]] = [{} for _ in slots]
        # The callers' frames and the rest of the slots, read back and restored.
        lo, hi = first * SLOT_STRIDE, (first + count) * SLOT_STRIDE
        now = uc.mem_read(BANK + lo, hi - lo)
        if now != self.bank[lo:hi]:
            for j, k in enumerate(slots):
                at = block_addr(k) + ENTRY_OFF - BANK
                was, got = self.bank[at : at + ABOVE], now[at - lo : at - lo + ABOVE]
                if was != got:
                    per[j].update((BANK + at + i, got[i]) for i in range(ABOVE)
                                  if was[i] != got[i])
            uc.mem_write(BANK + lo, self.bank[lo:hi])
        shared = False
        dirty: dict[int, int] = {}
        if log:
            for address, size in log:
                try:
                    data = uc.mem_read(address, size)
                except self._UcError:  # (partly) unmapped: the write faulted
                    for i in range(size):
                        with contextlib.suppress(self._UcError):
                            dirty[address + i] = uc.mem_read(address + i, 1)[0]
                    continue
                for i in range(size):
                    dirty[address + i] = data[i]
            for addr, value in dirty.items():
                owner = self._owner(addr)
                if owner is None:
                    shared = True
                    owner = first if count == 1 else self._running(outs, slots)
                k = owner
                if first <= k < first + count:
                    per[k - first][addr] = value
            self._restore(dirty)
        results = []
        for j, out in enumerate(outs):
            if out[-2] & 0xFF:
                results.append(RunResult(out, per[j], None))
            else:
                results.append(RunResult(out, per[j], error or self._why_stopped()))
                break
        return results, shared

    def _owner(self, addr: int) -> int | None:
        """The trial slot a written byte of scratch belongs to (None: the image)."""
        if self.rt.scratch <= addr < self._scratch_end:
            return (addr - self.rt.scratch) // SCRATCH_SIZE
        return None

    @staticmethod
    def _running(outs: Sequence[tuple[int, ...]], slots: range) -> int:
        """The slot that was running when the batch stopped (the first not done)."""
        for k, out in zip(slots, outs, strict=True):
            if not out[-2] & 0xFF:
                return k
        return slots[-1]

    def _restore(self, dirty: Mapping[int, int]) -> None:
        for start, buf in self.pristine:
            end = start + len(buf)
            for addr in dirty:
                if start <= addr < end:
                    self.uc.mem_write(addr, bytes(buf[addr - start : addr - start + 1]))

    def _why_stopped(self) -> str:
        pc = self.pc()
        name = self.image.symbol_at(pc - 1) if self.image is not None else None
        if name is not None:
            return f"reached undefined symbol {name} (stub at {pc - 1:#x})"
        return f"stopped at {pc:#x} without reaching the site end"

    @contextlib.contextmanager
    def trace(self, begin: int, end: int, window: int) -> Iterator[list[Step]]:
        """While the block runs, record each instruction executed in [begin, end): its
        address, the register file (in `rt.regs` order) and `window` bytes of stack from
        the stack pointer up, as they are before it executes."""
        import importlib

        unicorn: Any = importlib.import_module("unicorn")
        consts: Any = importlib.import_module("unicorn.x86_const")
        ids = [getattr(consts, f"UC_X86_REG_{r.upper()}") for r in self.rt.regs]
        sp = self.rt.index(self.rt.arch.stack_pointer)
        steps: list[Step] = []

        def on_code(uc: Any, address: int, _size: int, _data: Any) -> None:
            regs = tuple(int(uc.reg_read(i)) for i in ids)
            try:
                stack = bytes(uc.mem_read(regs[sp], window))
            except self._UcError:
                stack = b""
            steps.append(Step(address, regs, stack))

        hook = self.uc.hook_add(unicorn.UC_HOOK_CODE, on_code, begin=begin, end=end - 1)
        # Code translated before the hook existed would run without it (and after, with).
        self.uc.ctl_remove_cache(begin, end)
        try:
            yield steps
        finally:
            self.uc.hook_del(hook)
            self.uc.ctl_remove_cache(begin, end)

    def pc(self) -> int:
        from unicorn.x86_const import UC_X86_REG_EIP, UC_X86_REG_RIP

        return int(self.uc.reg_read(UC_X86_REG_RIP if self.rt.word == 8 else UC_X86_REG_EIP))


def _write_buffer(uc: Any, addr: int, buf: bytearray) -> None:
    """`uc.mem_write` of a bytearray without copying it first (when the binding lets)."""
    try:
        uc.mem_write(addr, (ctypes.c_char * len(buf)).from_buffer(buf))
    except TypeError:
        uc.mem_write(addr, bytes(buf))


def exit_jump(rt: ArchRuntime, at: int, target: int) -> bytes:
    """A jump from `at` to `target`: rel32 when it reaches, else through memory."""
    disp = target - (at + 5)
    if rt.word == 4 or -(1 << 31) <= disp < (1 << 31):
        return b"\xe9" + (disp & 0xFFFFFFFF).to_bytes(4, "little")
    return b"\xff\x25\x00\x00\x00\x00" + target.to_bytes(8, "little")
