"""The Unicorn machine: one engine holding the runtime and, in turn, one image.

An engine (`Machine`) outlives the files: `attach` maps the next image in place
of the last, and the runtime stays mapped and translated.  Unicorn is imported
inside functions only: `pvpatch --help` must not load it.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import random
import struct
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from typing import Any

from ..errors import VerifyError
from ..record import record
from .loader import Image
from .runtime import (
    ABOVE,
    BANK,
    BANK_LEN,
    C_NEXT,
    C_SITE,
    CONTROL,
    ENTRY_OFF,
    HARNESS,
    INSN_LIMIT,
    KEEP_MAPPED,
    OUT_SIZE,
    RUNTIME,
    RUNTIME_SIZE,
    SCRATCH_SIZE,
    SLOT_STRIDE,
    STACK_LO,
    TRIAL_SLOTS,
    Runtime,
    block_addr,
    out_addr,
)

# Bytes of translated code an engine may cache (see Machine.__init__).
TCG_BUFFER = 32 << 20


@record
class RunResult:
    """One trial's run: its out record and the bytes it wrote (restored since); `error`: why it
    stopped short of its exit (None when it got there)."""

    out: tuple[int, ...]  # the out record's words
    writes: Mapping[int, int]  # byte address -> final value, for every byte written
    error: str | None

    @property
    def done(self) -> bool:
        return self.error is None and bool(self.out[-2] & 0xFF)


@record
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
