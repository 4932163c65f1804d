"""A file pair loaded for emulation (`FilePair`): both images in their engines, the idle
engines kept per process, and the trial states in batches shared by every file."""

from __future__ import annotations

import bisect
import random
import struct
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING

from ..elf.reader import ElfFile
from ..record import record
from .jobs import FileJob
from .loader import Image, load_image
from .machine import Machine, RunResult
from .models import reference_models
from .runtime import (
    ARG_FLAGS,
    ARITH_FLAGS,
    BLOCK_LEN,
    CR0_TS,
    EXT_BASE,
    HOST_OFF,
    SCRATCH_SIZE,
    STATE_OFF,
    TRIAL_SLOTS,
    ArchRuntime,
    Runtime,
    arch_runtime,
    build_runtime,
    entry_sp,
)

if TYPE_CHECKING:
    pass


POOL_SIZE = 1 << 18  # random bytes each trial's state is cut from


def _mix(*values: int) -> int:
    """splitmix64 over the values: a trial's seed from (seed, trial)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x


_RUNTIMES: dict[str, Runtime] = {}


def _runtime(arch_name: str, rt: ArchRuntime) -> Runtime:
    """The runtime of an architecture, built once per process."""
    found = _RUNTIMES.get(arch_name)
    if found is None:
        models = reference_models(arch_name)
        found = _RUNTIMES[arch_name] = build_runtime(
            rt, {op: m.code for op, m in models.items() if m.code is not None})
    return found


# Idle engines, by (architecture, role): one pair per process is enough, and
# reusing it saves a new engine and the translation of the harness per file.
_IDLE: dict[tuple[str, str], list[Machine]] = {}


def _machine(arch_name: str, role: str, runtime: Runtime) -> Machine:
    idle = _IDLE.setdefault((arch_name, role), [])
    try:
        return idle.pop()
    except IndexError:  # none made yet, or in use (a nested or concurrent job)
        return Machine(runtime)


def _release(arch_name: str, role: str, m: Machine) -> None:
    m.release()
    idle = _IDLE.setdefault((arch_name, role), [])
    if not idle:
        idle.append(m)


@lru_cache(maxsize=4)
def _pool(seed: int) -> bytes:
    return random.Random(seed).randbytes(POOL_SIZE)


# Trial batches, the same for every file verified with the same seed:
# (arch, seed, batch number, trials in it, flags_arg) -> batch.
_BATCHES: dict[tuple[str, int, int, int, bool], _Batch] = {}
MAX_BATCHES = 256
# Reference runs shared by sites (of any file) that run the same code from the
# same states: (batch key, what runs) -> runs.  The code is a reference model,
# called from the caller stub or through the site's own `call *slot` (the
# site's address shows only in the return address, below the stack pointer).
REF_RUNS: dict[tuple[object, ...], list[RunResult]] = {}
MAX_REF_RUNS = 4096


def _batch_key(arch_name: str, job: FileJob, c: int,
               flags_arg: bool = False) -> tuple[str, int, int, int, bool]:
    return arch_name, job.seed, c, min(TRIAL_SLOTS, job.trials - c * TRIAL_SLOTS), flags_arg


def _partial(job: FileJob) -> dict[tuple[str, int], list[tuple[int, int]]] | None:
    """The byte ranges whose relocations matter, when only the sites' own bytes run:
    every rewrite is inline (or a nop) and there is no thunk (None: load it all).

    The original runs its site with the ops slot pointing at a reference model
    and the patched file runs its site's new bytes, each straight into the
    exit jump; neither reaches any other code or data of the file.
    """
    if job.thunks:
        return None
    out: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for sj in job.sites:
        if sj.action in ("jmp", "ud2") or sj.tail:
            continue  # skipped: never run
        if sj.action not in ("inline", "nop"):
            return None
        out.setdefault((sj.section, sj.nth), []).append((sj.offset, sj.offset + sj.length))
    return out


class FilePair:
    """One file pair loaded for emulation, and the trial states (in batches of
    TRIAL_SLOTS, the same for every site)."""

    def __init__(self, job: FileJob) -> None:
        self.job = job
        orig = job.orig_elf or ElfFile(job.orig_data, job.orig_path)
        patched = job.patched_elf or ElfFile(job.patched_data, job.orig_path + " (patched)")
        self.arch = orig.arch
        name = orig.arch.name
        rt = self.rt = arch_runtime(orig.arch)
        self.models = reference_models(name)
        self.runtime: Runtime = _runtime(name, rt)
        only = _partial(job) if orig.is_relocatable else None
        self.img_o: Image = load_image(orig, self.runtime, only=only)
        self.img_p: Image = load_image(
            patched, self.runtime, call_targets=dict(job.call_targets),  # type: ignore[arg-type]
            like=self.img_o if orig.is_relocatable else None, only=only)
        self.m_o = _machine(name, "original", self.runtime)
        self.m_p = _machine(name, "patched", self.runtime)
        try:
            self.m_o.attach(self.img_o)
            self.m_p.attach(self.img_p)
        except BaseException:
            self.close()
            raise
        self.pool = _pool(job.seed)
        w = rt.word
        self.word = w
        self.wfmt = "<" + rt.fmt
        self.state_fmt = struct.Struct("<" + rt.fmt * (rt.nregs + 5))
        self.sp = rt.index(orig.arch.stack_pointer)
        self.arg_idx = tuple(rt.index(r) for r in rt.args)
        self.wmask = (1 << (8 * w)) - 1
        self.cr0 = self.m_o.cr0
        self.cr3_mask = 0xFF_FFFF_F000 if w == 8 else 0xFFFF_F000
        self._data: dict[int, bool] = {}
        chunks = range((job.trials + TRIAL_SLOTS - 1) // TRIAL_SLOTS)
        # Per variant of the trial states: plain, or the first argument a flags image.
        self.batch_keys = {v: [_batch_key(self.arch.name, job, c, v) for c in chunks]
                           for v in (False, True)}
        self._unsupported = sorted(self.img_p.unsupported)
        self._unsupported_at = [a for a, _ in self._unsupported]

    def all_shared(self, ref_key: tuple[object, ...] | None, flags_arg: bool = False) -> bool:
        """Every batch of the reference runs of `ref_key` is known already."""
        return ref_key is not None and all((b, ref_key) in REF_RUNS
                                           for b in self.batch_keys[flags_arg])

    def close(self) -> None:
        """Give the engines back (their images unmapped) for the next file."""
        name = self.arch.name
        _release(name, "original", self.m_o)
        _release(name, "patched", self.m_p)

    def in_data(self, addr: int) -> bool:
        """`addr` is in the original's ops table or a section no code runs from."""
        found = self._data.get(addr)
        if found is None:
            img = self.img_o
            if img.elf.is_relocatable:
                found = EXT_BASE <= addr < img.ext_end  # the ops table is an undefined symbol
            else:
                sec = img.elf.section_for_addr(img.link_addr(addr))
                found = sec is not None and not sec.is_exec
            self._data[addr] = found
        return found

    def unsupported_in(self, addr: int, size: int) -> list[str]:
        """Relocations the loader could not apply inside [addr, addr+size)."""
        lo = bisect.bisect_left(self._unsupported_at, addr)
        hi = bisect.bisect_left(self._unsupported_at, addr + size)
        return [f"{name} at {a:#x}" for a, name in self._unsupported[lo:hi]]

    def batches(self, flags_arg: bool = False) -> Iterable[_Batch]:
        """The trials in batches, each loaded into both machines when it comes up."""
        for c, key in enumerate(self.batch_keys[flags_arg]):
            batch = _BATCHES.get(key)
            if batch is None:
                count = key[3]
                seeds = [_mix(self.job.seed, c * TRIAL_SLOTS + k) for k in range(count)]
                made = [self.block(k, tseed, flags_arg) for k, tseed in enumerate(seeds)]
                if len(_BATCHES) >= MAX_BATCHES:
                    _BATCHES.clear()
                batch = _BATCHES[key] = _Batch(key, c * TRIAL_SLOTS, seeds,
                                               [b for b, _ in made], [i for _, i in made])
            self.m_o.load_bank(key, batch.blocks)
            self.m_p.load_bank(key, batch.blocks)
            yield batch

    def block(self, k: int, tseed: int, flags_arg: bool = False) -> tuple[bytes, list[int]]:
        """Trial slot k's block for the trial with seed `tseed`, and the register
        file (and flags) it starts with.  `flags_arg`: the first argument register
        holds a flags image popf can load (TF, IOPL, NT clear: the same trial
        otherwise)."""
        rt = self.rt
        off = tseed % (POOL_SIZE - BLOCK_LEN)
        blk = bytearray(self.pool[off : off + BLOCK_LEN])
        st = STATE_OFF
        vals = list(self.state_fmt.unpack_from(blk, st))
        n = rt.nregs
        first_arg = vals[self.arg_idx[0]]
        vals[self.sp] = entry_sp(k)
        scratch = rt.scratch_of(k)
        for i in self.arg_idx:
            vals[i] = scratch + 64 + vals[i] % (SCRATCH_SIZE - 128)
        if flags_arg:
            vals[self.arg_idx[0]] = first_arg & ARG_FLAGS | 2
        vals[n] = (vals[n] & ARG_FLAGS) | 2
        vals[n + 1] = 0
        vals[n + 2] = self.cr0 & ~CR0_TS | (vals[n + 2] & CR0_TS)
        vals[n + 4] &= self.cr3_mask
        self.state_fmt.pack_into(blk, st, *vals)
        # The hostile callee's flags word holds arithmetic flags only.
        hf = HOST_OFF + n * self.word
        struct.pack_into(self.wfmt, blk, hf,
                         struct.unpack_from(self.wfmt, blk, hf)[0] & ARITH_FLAGS)
        return bytes(blk), [*vals[:n], vals[n]]

    def first_seed(self) -> int:
        """The seed of trial 1 (what a single extra run, like the unwind check, uses)."""
        return _mix(self.job.seed, 0)

    def host_word(self, batch: _Batch, k: int, reg: int) -> int:
        return int(struct.unpack_from(self.wfmt, batch.blocks[k], HOST_OFF + reg * self.word)[0])


@record
class _Batch:
    """Up to TRIAL_SLOTS trial states, the same for every file verified with the same seed
    (kept in `_BATCHES`): per slot, the trial's seed and the block both machines load."""

    key: tuple[str, int, int, int, bool]  # (arch, seed, batch number, trials, flags_arg)
    first: int  # the first trial's number
    seeds: list[int]
    blocks: list[bytes]
    inits: list[list[int]]  # per slot: the register file and flags the trial starts with
