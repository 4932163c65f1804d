"""Disassembly of site bytes (capstone, imported on first use, AT&T syntax like objdump)."""

from __future__ import annotations

from functools import cache
from typing import Any

from .arch import ARCHES, Arch
from .record import record


@record
class Insn:
    """One decoded instruction: where it starts in the bytes, its size and its text."""

    offset: int  # from the start of the decoded bytes
    size: int
    text: str


def capstone_mode(arch_name: str) -> int:
    """capstone's mode for an architecture (CS_MODE_64 / CS_MODE_32)."""
    import capstone

    return int(getattr(capstone, f"CS_MODE_{ARCHES[arch_name].elf_class}"))


@cache
def engine(arch_name: str) -> Any:
    """capstone's x86 decoder for an architecture (AT&T syntax), made once."""
    import capstone  # heavy: only when something is disassembled

    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone_mode(arch_name))
    cs.syntax = capstone.CS_OPT_SYNTAX_ATT
    return cs


def disassemble(arch: Arch, code: bytes, address: int = 0) -> list[Insn]:
    """Decode `code`; bytes that do not decode come out as `.byte` lines."""
    out: list[Insn] = []
    pos = 0
    cs = engine(arch.name)
    while pos < len(code):
        # disasm_lite stops at the first byte it cannot decode.
        for _addr, size, mnemonic, op_str in cs.disasm_lite(code[pos:], address + pos):
            out.append(Insn(pos, size, f"{mnemonic} {op_str}".strip()))
            pos += size
        if pos < len(code):
            out.append(Insn(pos, 1, f".byte {code[pos]:#04x}"))
            pos += 1
    return out


def insn_starts(arch: Arch, code: bytes) -> tuple[list[int], int]:
    """Instruction start offsets decoding `code` from its first byte, and where decoding
    stopped: `len(code)` when every byte belongs to a whole instruction, less when a byte
    does not decode or the last instruction would run past the end."""
    starts: list[int] = []
    pos = 0
    # disasm_lite skips formatting nothing we need, so it is the cheap path for lengths.
    for _addr, size, _mnemonic, _op_str in engine(arch.name).disasm_lite(code, 0):
        starts.append(pos)
        pos += size
    return starts, pos
