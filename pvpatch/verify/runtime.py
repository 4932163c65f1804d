"""The harness runtime: the address plan, the per-architecture constants, and the
machine code placed next to an image that runs a batch of trials per `emu_start`.

Trial k has its own slot (a stack window with the caller's frame above it, the
register file to start with, the hostile callee's values) and its own scratch
area; `entry_k` loads the register file and jumps to the code under test, whose
end jumps (through a control word) to `exit_k`, which stores the register file in
trial k's out record and goes on to `entry_k+1`.  The harness code is translated
once: per site only the site-end jump is poked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import field
from typing import Literal

from ..arch import Arch, convention_changes
from ..errors import VerifyError
from ..record import record

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


# State words (from a block's STATE_OFF), n = number of GPRs:
#   regs[n], flags, rip (unused), cr0, cr2, cr3
# Out-record words: regs[n], flags, cr0, cr2, cr3, done, callee rsp


@record
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
# The flags an op's flags-image argument may carry (popf loads them in a trial).
ARG_FLAGS = ARITH_FLAGS | IF_FLAG | DF_FLAG | AC_FLAG


@record
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


def exit_jump(rt: ArchRuntime, at: int, target: int) -> bytes:
    """A jump from `at` to `target`: rel32 when it reaches, else through memory."""
    disp = target - (at + 5)
    if rt.word == 4 or -(1 << 31) <= disp < (1 << 31):
        return b"\xe9" + (disp & 0xFFFFFFFF).to_bytes(4, "little")
    return b"\xff\x25\x00\x00\x00\x00" + target.to_bytes(8, "little")
