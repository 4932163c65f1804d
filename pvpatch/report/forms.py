"""How the native forms read, so that a patch summary needs no disassembler.

A patch summary says what each group of sites becomes (`irq.save_fl -> pushf; pop
%rax`).  Decoding that takes capstone, and importing capstone costs more than the
rest of patching a vmlinux.  The forms a summary shows are few: the kernel's native
replacements, which both the native backend and 6.8+ kernels' own NOT-XENPV
alternatives hold.  Each is here with the text the symboliser gives it (objdump's);
tests/test_forms.py checks every row against objdump and against the symboliser, and
any other form is still decoded.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ..arch import Arch

# (architecture, bytes) -> text.  No row ends in an instruction that counts as NOP fill,
# none has an operand naming an address: the text is the same wherever the form is.
SHOWN: Mapping[tuple[str, bytes], str] = MappingProxyType({
    (arch, bytes.fromhex(code)): text for arch, code, text in (
        ("x86_64", "fa", "cli"),
        ("x86_64", "fb", "sti"),
        ("x86_64", "9c58", "pushf; pop %rax"),
        ("x86_64", "579d", "push %rdi; popf"),
        ("x86_64", "0f20d0", "mov %cr2,%rax"),
        ("x86_64", "0f20d8", "mov %cr3,%rax"),
        ("x86_64", "0f22df", "mov %rdi,%cr3"),
        ("x86_64", "0f013f", "invlpg (%rdi)"),
        ("x86_64", "0f09", "wbinvd"),
        ("x86_64", "0f06", "clts"),
        ("x86_64", "0f01f8", "swapgs"),
        ("x86_64", "48cf", "iretq"),
        ("x86_64", "0f01f8480f07", "swapgs; sysretq"),
        ("x86_64", "0f01f80f07", "swapgs; sysretl"),
        ("x86_64", "0f01f8fb0f35", "swapgs; sti; sysexitl"),
        ("x86_64", "4889f8", "mov %rdi,%rax"),
        ("x86_64", "c60700", "movb $0,(%rdi)"),
        ("x86_64", "4831c0", "xor %rax,%rax"),
        ("i386", "fa", "cli"),
        ("i386", "fb", "sti"),
        ("i386", "9c58", "pushf; pop %eax"),
        ("i386", "509d", "push %eax; popf"),
        ("i386", "0f20d0", "mov %cr2,%eax"),
        ("i386", "0f20d8", "mov %cr3,%eax"),
        ("i386", "0f22d8", "mov %eax,%cr3"),
        ("i386", "0f06", "clts"),
        ("i386", "0f09", "wbinvd"),
        ("i386", "0f31", "rdtsc"),
        ("i386", "cf", "iretl"),
        ("i386", "fb0f35", "sti; sysexitl"),
        ("i386", "c60000", "movb $0,(%eax)"),
        ("i386", "31c0", "xor %eax,%eax"),
    )
})
_LONGEST = max(len(code) for _arch, code in SHOWN)


def shown(arch: Arch, code: bytes) -> str | None:
    """The text of `code` without its NOP padding when it is a known form followed only by
    NOP fill (what decoding it and dropping the trailing NOPs gives), else None."""
    for n in range(min(len(code), _LONGEST), 0, -1):  # the longest form that fits first
        text = SHOWN.get((arch.name, code[:n]))
        if text is not None and arch.is_nop_fill(code[n:]):
            return text
    return None
