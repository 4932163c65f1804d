"""What a run must leave: the flags and registers a contract keeps, and the comparison of
a patched run with its reference (or with its start)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..arch import Arch
from .engine import FilePair
from .machine import RunResult
from .runtime import AC_FLAG, ARITH_FLAGS, DF_FLAG, IF_FLAG, entry_sp

if TYPE_CHECKING:
    pass


MAX_DETAIL = 12


# The flags a site's contract keeps (compared with the reference, or with the start
# when only the contract is proven).
SYSTEM_FLAGS = 0xFFFFFFFF & ~ARITH_FLAGS & ~0x2
KEPT_FLAGS = SYSTEM_FLAGS & ~IF_FLAG  # a call to an unknown target may change IF only
FLAG_NAMES = (("CF", 0x1), ("PF", 0x4), ("AF", 0x10), ("ZF", 0x40), ("SF", 0x80),
              ("TF", 0x100), ("IF", IF_FLAG), ("DF", DF_FLAG), ("OF", 0x800),
              ("IOPL", 0x3000), ("NT", 0x4000), ("RF", 0x10000), ("VM", 0x20000),
              ("AC", AC_FLAG), ("VIF", 0x80000), ("VIP", 0x100000), ("ID", 0x200000))

CALLEE_SAVED = {"x86_64": ("rbx", "rbp", "r12", "r13", "r14", "r15"),
                "i386": ("ebx", "ebp", "esi", "edi")}
# Registers a site may return a value in (i386: 64-bit values in edx:eax).
RESULT_REGS = {"x86_64": ("rax",), "i386": ("eax", "edx")}


def hex_word(v: int) -> str:
    return f"{v:#x}"


def _flag_problems(want: int, got: int, mask: int, why: str = "") -> list[str]:
    out = []
    for name, bits in FLAG_NAMES:
        if (want ^ got) & mask & bits:
            shift = (bits & -bits).bit_length() - 1
            out.append(f"{name}: expected {(want & bits) >> shift} got {(got & bits) >> shift}"
                       + why)
    return out


def compare_runs(ctx: FilePair, k: int, init: list[int], preserved: Iterable[int],
             results: Iterable[int], ref: RunResult | None, pat: RunResult,
             with_cr: bool, flag_mask: int = SYSTEM_FLAGS) -> list[str]:
    rt = ctx.rt
    regs = rt.regs
    if not pat.done:
        return [f"the patched run did not end at the site end: {pat.error}"]
    out = pat.out
    problems: list[str] = []
    sp0 = entry_sp(k)
    if out[ctx.sp] != sp0:
        problems.append(f"{regs[ctx.sp]}: expected {hex_word(sp0)} got {hex_word(out[ctx.sp])}")
    for i in preserved:
        if out[i] != init[i]:
            problems.append(f"{regs[i]}: expected {hex_word(init[i])} got {hex_word(out[i])} "
                            "(outside the clobber mask)")
    fl = rt.out_flags
    if ref is None:
        return problems + _flag_problems(init[fl], out[fl], KEPT_FLAGS, " (kept by the site)")
    r = ref.out
    for i in results:
        if out[i] != r[i]:
            problems.append(f"{regs[i]}: expected {hex_word(r[i])} got {hex_word(out[i])} (result)")
    # IF first: the flag most ops are about.
    problems += _flag_problems(r[fl], out[fl], flag_mask & IF_FLAG)
    problems += _flag_problems(r[fl], out[fl], flag_mask & ~IF_FLAG)
    if with_cr:
        for j, name in enumerate(("cr0", "cr2", "cr3")):
            a, b = r[rt.out_cr + j], out[rt.out_cr + j]
            if a != b:
                problems.append(f"{name}: expected {hex_word(a)} got {hex_word(b)}")
    if ref.writes or pat.writes:
        for addr in sorted(set(ref.writes) | set(pat.writes)):
            want = ref.writes.get(addr)
            if want is None:
                want = ctx.m_o.initial_byte(addr)
            got = pat.writes.get(addr)
            if got is None:
                got = ctx.m_p.initial_byte(addr)
            if want != got:
                problems.append(f"memory {addr:#x}: expected {want:#04x} got {got:#04x}")
    return problems


def disasm_text(arch: Arch, code: bytes, addr: int) -> str:
    from ..disasm import disassemble

    return f"{code.hex()}: " + "; ".join(i.text for i in disassemble(arch, code, addr))
