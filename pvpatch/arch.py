"""Everything that differs between x86-64 and i386, in one place per architecture.

The rest of pvpatch asks an `Arch` instead of testing the ELF class: register
names, calling convention, relocation numbers and widths, NOP forms.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from functools import cached_property
from types import MappingProxyType
from typing import Any

from .record import record

# ELF e_machine values.
EM_386 = 3
EM_X86_64 = 62

# The Intel SDM's recommended multi-byte NOPs (Vol. 2B, NOP), one instruction
# each; Linux's P6 table (BYTES_NOP1..8) is the same.  Index = length.
P6_NOPS: tuple[bytes, ...] = (
    b"",
    bytes.fromhex("90"),
    bytes.fromhex("6690"),
    bytes.fromhex("0f1f00"),
    bytes.fromhex("0f1f4000"),
    bytes.fromhex("0f1f440000"),
    bytes.fromhex("660f1f440000"),
    bytes.fromhex("0f1f8000000000"),
    bytes.fromhex("0f1f840000000000"),
)


def _hexes(*forms: str) -> frozenset[bytes]:
    return frozenset(bytes.fromhex(f.replace(" ", "")) for f in forms)


# Every NOP instruction a site may be padded with: the kernel's NOP tables of every era
# (P6, K8, and on i386 GENERIC, K7 and 6.1's x86_nops), and the longer forms GNU as's
# `.nops` writes.  Recognising padding is a table lookup, not a disassembly.
_COMMON_NOPS = (
    "90", "6690", "0f1f00", "0f1f4000", "0f1f440000", "660f1f440000", "0f1f8000000000",
    "0f1f840000000000", "660f1f840000000000", "662e0f1f840000000000",
    "66662e0f1f840000000000", "666690", "66666690",
)
X86_64_NOP_FORMS = _hexes(*_COMMON_NOPS)
I386_NOP_FORMS = _hexes(
    *_COMMON_NOPS,
    "89f6", "8d7600", "8d742600", "3e8d742600", "8db600000000", "8db42600000000",
    "3e8db42600000000", "8bc0", "8d0420", "8d442000", "8d8000000000", "8d040500000000",
)


@record
class RelocType:
    """One relocation type: its name, how many bytes it patches, how it is computed."""

    number: int
    name: str
    width: int  # bytes written at r_offset (0 for NONE)
    pc_relative: bool = False
    # What the verifier's loader (pvpatch/verify/loader.py) writes, from S (the
    # symbol), A (the addend) and P (the place): "S+A", "S+A-P" or "S"; "" for a
    # type it leaves unapplied (and reports).
    formula: str = ""
    signed: bool = False  # the value must fit as a signed number (else unsigned)
    at_load: bool = False  # the dynamic loader applies it against a symbol it binds


@record
class Arch:
    """What pvpatch needs to know of one architecture: registers, calling convention,
    relocation types and NOP forms."""

    name: str
    machine: int
    elf_class: int  # 32 or 64
    ptr_size: int
    uses_rela: bool  # relocatable files carry explicit addends
    # Registers, in the order a register-saving thunk pushes them.
    caller_saved: tuple[str, ...]
    return_regs: tuple[str, ...]  # what a C function may leave changed on purpose
    # What a callee-save (PV_CALLEE_SAVE) function may change: the kernel's thunks
    # save everything else (i386 saves only ecx: eax and edx are return registers).
    callee_save_changes: tuple[str, ...]
    stack_pointer: str
    reloc_types: Mapping[int, RelocType]
    r_abs_ptr: int  # pointer-sized absolute (table entries)
    r_call: int  # what a direct call's rel32 gets in a relocatable output
    r_pc32: int
    r_relative: int  # dynamic RELATIVE
    reg_numbers: Mapping[str, int]  # ModRM/opcode register numbers
    endbr: bytes  # endbr64 / endbr32
    rex_w: bytes  # the prefix that makes an instruction pointer-sized (none on i386)
    # Registers a C function preserves (the psABI's callee-saved set).
    preserved: tuple[str, ...]
    word: struct.Struct  # a pointer-sized little-endian word
    # A rel32 branch reaches every address (a 32-bit address space wraps around); on
    # x86-64 a distance past +/-2 GiB is refused rather than wrapped through the top.
    rel32_wraps: bool
    nops: tuple[bytes, ...] = P6_NOPS
    nop_forms: frozenset[bytes] = X86_64_NOP_FORMS  # what counts as padding when read
    stack_align: int = 16  # alignment the psABI wants at a call instruction

    def push(self, reg: str) -> bytes:
        n = self.reg_numbers[reg]
        return (b"\x41" if n >= 8 else b"") + bytes([0x50 + (n & 7)])

    def pop(self, reg: str) -> bytes:
        n = self.reg_numbers[reg]
        return (b"\x41" if n >= 8 else b"") + bytes([0x58 + (n & 7)])

    def adjust_sp(self, delta: int) -> bytes:
        """`lea delta(%rsp),%rsp`: moves the stack pointer without touching the flags."""
        return self.rex_w + b"\x8d\x64\x24" + (delta & 0xFF).to_bytes(1, "little")

    def reloc(self, number: int) -> RelocType:
        found = self.reloc_types.get(number)
        # An unknown type is assumed to patch 4 bytes (most x86 types do), so that a
        # relocation near a site is still seen as touching it.
        return found if found is not None else RelocType(number, f"R_{self.name}_{number}", 4)

    def reloc_name(self, number: int) -> str:
        return self.reloc(number).name

    @cached_property
    def field32_relocs(self) -> Mapping[bool, frozenset[int]]:
        """The types that fill a 32-bit instruction field with a symbol's address:
        pc-relative (True: PC32, PLT32) or absolute (False: 32, 32S; R_386_32)."""
        return MappingProxyType({pc: frozenset(
            r.number for r in self.reloc_types.values()
            if r.width == 4 and r.formula == ("S+A-P" if pc else "S+A")) for pc in (True, False)})

    def wrap(self, value: int) -> int:
        """`value` as an address of this architecture (modulo the address width)."""
        return value & ((1 << (8 * self.ptr_size)) - 1)

    def signed(self, value: int) -> int:
        """`value` modulo the address width, as a signed offset (addresses wrap around)."""
        half = 1 << (8 * self.ptr_size - 1)
        return self.wrap(value + half) - half

    def is_nop_fill(self, code: bytes) -> bool:
        """`code` is nothing but NOP instructions (empty included)."""
        forms, pos = self.nop_forms, 0
        longest = 11
        while pos < len(code):
            for n in range(min(longest, len(code) - pos), 0, -1):
                if code[pos : pos + n] in forms:
                    pos += n
                    break
            else:
                return False
        return True

    def nop_fill(self, length: int) -> bytes:
        """The fewest recommended NOP instructions covering exactly `length` bytes."""
        longest = len(self.nops) - 1
        out = bytearray()
        while length > 0:
            step = min(length, longest)
            out += self.nops[step]
            length -= step
        return bytes(out)


def _relocs(*entries: tuple[Any, ...]) -> Mapping[int, RelocType]:
    """Rows (number, name, width, pc-relative[, formula, "signed", "load"])."""
    out = {}
    for n, name, w, pc, *recipe in entries:
        formula, flags = (recipe[0], recipe[1:]) if recipe else ("", ())
        out[n] = RelocType(n, name, w, pc, formula, "signed" in flags, "load" in flags)
    return MappingProxyType(out)


X86_64 = Arch(
    name="x86_64",
    machine=EM_X86_64,
    elf_class=64,
    ptr_size=8,
    uses_rela=True,
    caller_saved=("rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"),
    return_regs=("rax",),
    callee_save_changes=("rax",),
    stack_pointer="rsp",
    reloc_types=_relocs(
        (0, "R_X86_64_NONE", 0, False),
        (1, "R_X86_64_64", 8, False, "S+A", "load"),
        (2, "R_X86_64_PC32", 4, True, "S+A-P", "signed", "load"),
        (3, "R_X86_64_GOT32", 4, False),
        (4, "R_X86_64_PLT32", 4, True, "S+A-P", "signed"),
        (5, "R_X86_64_COPY", 0, False),
        (6, "R_X86_64_GLOB_DAT", 8, False, "S", "load"),
        (7, "R_X86_64_JUMP_SLOT", 8, False, "S", "load"),
        (8, "R_X86_64_RELATIVE", 8, False),
        (9, "R_X86_64_GOTPCREL", 4, True),
        (10, "R_X86_64_32", 4, False, "S+A", "load"),
        (11, "R_X86_64_32S", 4, False, "S+A", "signed", "load"),
        (12, "R_X86_64_16", 2, False, "S+A"),
        (13, "R_X86_64_PC16", 2, True, "S+A-P", "signed"),
        (14, "R_X86_64_8", 1, False, "S+A"),
        (15, "R_X86_64_PC8", 1, True, "S+A-P", "signed"),
        (16, "R_X86_64_DTPMOD64", 8, False),
        (17, "R_X86_64_DTPOFF64", 8, False),
        (18, "R_X86_64_TPOFF64", 8, False),
        (19, "R_X86_64_TLSGD", 4, True),
        (20, "R_X86_64_TLSLD", 4, True),
        (21, "R_X86_64_DTPOFF32", 4, False),
        (22, "R_X86_64_GOTTPOFF", 4, True),
        (23, "R_X86_64_TPOFF32", 4, False),
        (24, "R_X86_64_PC64", 8, True, "S+A-P", "signed"),
        (25, "R_X86_64_GOTOFF64", 8, False),
        (26, "R_X86_64_GOTPC32", 4, True),
        (32, "R_X86_64_SIZE32", 4, False),
        (33, "R_X86_64_SIZE64", 8, False),
        (34, "R_X86_64_GOTPC32_TLSDESC", 4, True),
        (35, "R_X86_64_TLSDESC_CALL", 0, False),
        (36, "R_X86_64_TLSDESC", 16, False),
        (37, "R_X86_64_IRELATIVE", 8, False),
        (38, "R_X86_64_RELATIVE64", 8, False),
        (41, "R_X86_64_GOTPCRELX", 4, True),
        (42, "R_X86_64_REX_GOTPCRELX", 4, True),
        (43, "R_X86_64_CODE_4_GOTPCRELX", 4, True),
        (44, "R_X86_64_CODE_4_GOTTPOFF", 4, True),
        (45, "R_X86_64_CODE_4_GOTPC32_TLSDESC", 4, True),
    ),
    r_abs_ptr=1,
    r_call=4,  # R_X86_64_PLT32, what GNU as emits for `call sym`
    r_pc32=2,
    r_relative=8,
    reg_numbers=MappingProxyType({
        r: i for i, r in enumerate(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                                    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))
    }),
    endbr=bytes.fromhex("f30f1efa"),
    rex_w=b"\x48",
    preserved=("rbx", "rbp", "r12", "r13", "r14", "r15"),
    word=struct.Struct("<Q"),
    rel32_wraps=False,
)

I386 = Arch(
    name="i386",
    machine=EM_386,
    elf_class=32,
    ptr_size=4,
    uses_rela=False,
    # Kernel i386 code passes arguments in eax, edx, ecx (-mregparm=3).
    caller_saved=("ecx", "edx"),
    return_regs=("eax",),
    callee_save_changes=("eax", "edx"),
    stack_pointer="esp",
    reloc_types=_relocs(
        (0, "R_386_NONE", 0, False),
        (1, "R_386_32", 4, False, "S+A", "load"),
        (2, "R_386_PC32", 4, True, "S+A-P", "signed", "load"),
        (3, "R_386_GOT32", 4, False),
        (4, "R_386_PLT32", 4, True, "S+A-P", "signed"),
        (5, "R_386_COPY", 0, False),
        (6, "R_386_GLOB_DAT", 4, False, "S", "load"),
        (7, "R_386_JMP_SLOT", 4, False, "S", "load"),
        (8, "R_386_RELATIVE", 4, False),
        (9, "R_386_GOTOFF", 4, False),
        (10, "R_386_GOTPC", 4, True),
        (11, "R_386_32PLT", 4, False),
        (14, "R_386_TLS_TPOFF", 4, False),
        (15, "R_386_TLS_IE", 4, False),
        (16, "R_386_TLS_GOTIE", 4, False),
        (17, "R_386_TLS_LE", 4, False),
        (18, "R_386_TLS_GD", 4, False),
        (19, "R_386_TLS_LDM", 4, False),
        (20, "R_386_16", 2, False, "S+A"),
        (21, "R_386_PC16", 2, True, "S+A-P", "signed"),
        (22, "R_386_8", 1, False, "S+A"),
        (23, "R_386_PC8", 1, True, "S+A-P", "signed"),
        (24, "R_386_TLS_GD_32", 4, False),
        (25, "R_386_TLS_GD_PUSH", 4, False),
        (26, "R_386_TLS_GD_CALL", 4, False),
        (27, "R_386_TLS_GD_POP", 4, False),
        (28, "R_386_TLS_LDM_32", 4, False),
        (29, "R_386_TLS_LDM_PUSH", 4, False),
        (30, "R_386_TLS_LDM_CALL", 4, False),
        (31, "R_386_TLS_LDM_POP", 4, False),
        (32, "R_386_TLS_LDO_32", 4, False),
        (33, "R_386_TLS_IE_32", 4, False),
        (34, "R_386_TLS_LE_32", 4, False),
        (35, "R_386_TLS_DTPMOD32", 4, False),
        (36, "R_386_TLS_DTPOFF32", 4, False),
        (37, "R_386_TLS_TPOFF32", 4, False),
        (38, "R_386_SIZE32", 4, False),
        (39, "R_386_TLS_GOTDESC", 4, False),
        (40, "R_386_TLS_DESC_CALL", 0, False),
        (41, "R_386_TLS_DESC", 4, False),
        (42, "R_386_IRELATIVE", 4, False),
        (43, "R_386_GOT32X", 4, False),
    ),
    r_abs_ptr=1,
    r_call=2,  # R_386_PC32 with the implicit -4 stored in the bytes
    r_pc32=2,
    r_relative=8,
    reg_numbers=MappingProxyType({
        r: i for i, r in enumerate(("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"))
    }),
    endbr=bytes.fromhex("f30f1efb"),
    rex_w=b"",
    preserved=("ebx", "ebp", "esi", "edi"),
    word=struct.Struct("<I"),
    rel32_wraps=True,
    nop_forms=I386_NOP_FORMS,
)

ARCHES: Mapping[str, Arch] = MappingProxyType({a.name: a for a in (X86_64, I386)})
BY_MACHINE: Mapping[tuple[int, int], Arch] = MappingProxyType(
    {(a.machine, a.elf_class): a for a in (X86_64, I386)}
)


def convention_changes(arch: Arch, convention: str) -> tuple[str, ...]:
    """Registers a function of `convention` ("c" or "callee-save") may change, in push order."""
    if convention == "callee-save":
        return arch.callee_save_changes
    return tuple(dict.fromkeys((*arch.return_regs, *arch.caller_saved)))
