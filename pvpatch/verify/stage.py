"""The verify stage: prove by emulation that PATCHED keeps ORIGINAL's site contracts,
and account for every other byte that differs.

What is checked comes from what differs (pvpatch/accounting.py), not from a plan:
every site whose bytes or relocations differ is emulated, every new thunk too, and
every other difference must be one pvpatch's rewriter makes by construction (table
entries of proven sites neutralised or dropped, relocations, symbols, headers...),
or verification fails naming section+offset and file offset.  The plan re-made from
ORIGINAL says what each changed site was meant to become (its reference); a changed
site the plan keeps has nothing to be proven against, and fails.

For each site to prove and each of N random trials (registers, arithmetic flags, IF,
AC, DF, stack contents, CR2/CR3 for control-register ops), the *reference* run
executes the original site with the op's slot pointing at a reference
implementation: for inline and nop rewrites a model of the kernel's native function
(pvpatch/data/reference/ARCH.toml, kept apart from the backends' byte tables); for
call and thunk rewrites the target function's own code in the file.  The *patched*
run executes the rewritten site (through its thunk, if any) in the patched file,
loaded with its own relocations.

The patched run must end exactly at the site's end with the stack pointer and every
register outside the site's clobber mask unchanged, and leave the return register,
the system flags (TF, IF, DF, AC, IOPL, NT: all flags for an op whose result is the
flags, restore_fl), the control registers (for CR ops) and every byte of memory the
reference wrote as the reference left them.  An op whose argument is a flags image
(restore_fl) gets one that popf can load in the emulator: arithmetic flags, IF, DF
and AC at random, TF clear (a set TF would trap both runs).

Verdicts: `pass`; `fail` with the failing trial's seed and what differed; `skip`
with a reason (tail ops, traps, instructions a snippet cannot run, a reference that
does not complete).  A skip proves nothing: it fails verification unless the caller
allows skips (`allow_skip`, `--allow-skip`).  A call target that is not in the file
(left for the linker) is replaced by a hostile C function in the patched run: the
contract is still proven, the result is not compared ("contract only").

Every thunk is also run alone against a hostile callee that changes every
caller-saved register and the arithmetic flags: each register the thunk saves must
come back, the callee's return value must pass through, and on x86-64 the callee
must be entered with rsp ≡ 8 (mod 16).
"""

from __future__ import annotations

import bisect
import os
import random
import struct
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache, lru_cache
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..arch import Arch
from ..elf import SHT_NOBITS, Buffer, ElfFile
from ..errors import PvpatchError, VerifyError
from ..rules import Finding
from .emu import (
    AC_FLAG,
    ARITH_FLAGS,
    BLOCK_LEN,
    CR0_TS,
    DF_FLAG,
    EXT_BASE,
    HOST_OFF,
    IF_FLAG,
    SCRATCH_SIZE,
    STATE_OFF,
    TRIAL_SLOTS,
    ArchRuntime,
    Image,
    Machine,
    RunResult,
    Runtime,
    arch_runtime,
    build_runtime,
    entry_sp,
    exit_jump,
    load_image,
)

EH_FRAME = ".eh_frame"
PT_GNU_EH_FRAME = 0x6474E550
ORC_UNWIND, ORC_UNWIND_IP, ORC_HEADER = ".orc_unwind", ".orc_unwind_ip", ".orc_header"

if TYPE_CHECKING:
    from ..accounting import Difference, SectionNote
    from ..plan import Decision, Plan
    from ..rewrite import Rewrite
    from ..scan import ScanResult
    from ..unwind import CfaRow, OrcEntry

Status = Literal["pass", "fail", "skip"]
DEFAULT_TRIALS = 16
POOL_SIZE = 1 << 18  # random bytes each trial's state is cut from
MAX_DETAIL = 12
MAX_SHOWN = 256  # bytes of a thunk disassembled in a report
PARALLEL_TRIALS = 8_000  # below this many trials more processes cost more than they save

# The flags a site's contract keeps (compared with the reference, or with the start
# when only the contract is proven), and those an op's flags-image argument may carry.
SYSTEM_FLAGS = 0xFFFFFFFF & ~ARITH_FLAGS & ~0x2
KEPT_FLAGS = SYSTEM_FLAGS & ~IF_FLAG  # a call to an unknown target may change IF only
ARG_FLAGS = ARITH_FLAGS | IF_FLAG | DF_FLAG | AC_FLAG
FLAG_NAMES = (("CF", 0x1), ("PF", 0x4), ("AF", 0x10), ("ZF", 0x40), ("SF", 0x80),
              ("TF", 0x100), ("IF", IF_FLAG), ("DF", DF_FLAG), ("OF", 0x800),
              ("IOPL", 0x3000), ("NT", 0x4000), ("RF", 0x10000), ("VM", 0x20000),
              ("AC", AC_FLAG), ("VIF", 0x80000), ("VIP", 0x100000), ("ID", 0x200000))

CALLEE_SAVED = {"x86_64": ("rbx", "rbp", "r12", "r13", "r14", "r15"),
                "i386": ("ebx", "ebp", "esi", "edi")}
# Registers a site may return a value in (i386: 64-bit values in edx:eax).
RESULT_REGS = {"x86_64": ("rax",), "i386": ("eax", "edx")}


@dataclass(frozen=True)
class SiteVerdict:
    index: int
    section: str
    offset: int
    address: int | None
    op: str | None
    action: str
    status: Status
    reason: str | None
    trials: int
    seed: int | None = None  # the failing trial's seed
    detail: tuple[str, ...] = ()  # what differed, and both versions disassembled


@dataclass(frozen=True)
class ThunkVerdict:
    symbol: str
    target: str
    address: int | None
    status: Status
    reason: str | None
    trials: int
    seed: int | None = None
    detail: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifyReport:
    sites: tuple[SiteVerdict, ...]
    thunks: tuple[ThunkVerdict, ...]
    allow_skip: bool = False  # a skip (nothing proven) is accepted
    # Every section of PATCHED that differs and the rule that accounted for it; the
    # differences nothing accounts for (each a failure), and how many more were cut.
    sections: tuple[SectionNote, ...] = ()
    unaccounted: tuple[Difference, ...] = ()
    omitted: int = 0

    @property
    def verdicts(self) -> tuple[SiteVerdict | ThunkVerdict, ...]:
        return (*self.sites, *self.thunks)

    @property
    def summary(self) -> dict[str, int]:
        """Sites by status (the thunks have their own: `thunk_summary`)."""
        return _count(self.sites)

    @property
    def thunk_summary(self) -> dict[str, int]:
        return _count(self.thunks)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.unaccounted and not self.omitted

    @property
    def failures(self) -> tuple[SiteVerdict | ThunkVerdict, ...]:
        """Verdicts that fail verification: `fail`, and `skip` unless skips are allowed."""
        bad = ("fail",) if self.allow_skip else ("fail", "skip")
        return tuple(v for v in self.verdicts if v.status in bad)

    @property
    def unproven(self) -> tuple[SiteVerdict | ThunkVerdict, ...]:
        """Every site and thunk not proven (failed or skipped), allowed or not."""
        return tuple(v for v in self.verdicts if v.status != "pass")


def _count(verdicts: Iterable[SiteVerdict | ThunkVerdict]) -> dict[str, int]:
    out = {"pass": 0, "fail": 0, "skip": 0}
    for v in verdicts:
        out[v.status] += 1
    return out


# -- reference models --------------------------------------------------------------


@dataclass(frozen=True)
class RefModel:
    op: str
    code: bytes | None
    cr: bool = False
    skip: str | None = None
    flags_arg: bool = False  # the first argument is a flags image (popf loads it)
    flags_result: bool = False  # the op sets every flag: all are compared


@cache
def reference_models(arch_name: str) -> Mapping[str, RefModel]:
    """Op name (and alias) -> model, from pvpatch/data/reference/ARCH.toml."""
    text = (Path(__file__).parent.parent / "data" / "reference" / f"{arch_name}.toml").read_text()
    doc = tomllib.loads(text)
    out: dict[str, RefModel] = {}
    for name, body in doc.get("ops", {}).items():
        raw = body.get("bytes")
        model = RefModel(name, bytes.fromhex(raw) if raw is not None else None,
                         bool(body.get("cr", False)), body.get("skip"),
                         bool(body.get("flags_arg", False)),
                         bool(body.get("flags_result", False)))
        if model.code is None and model.skip is None:
            raise VerifyError(f"reference model {name} has neither bytes nor skip")
        for alias in (name, *body.get("aliases", [])):
            out[alias] = model
    return out


# -- jobs: everything a worker needs, picklable --------------------------------------


@dataclass(frozen=True)
class _SiteJob:
    index: int
    section: str
    nth: int  # occurrence of the section name among allocated sections
    offset: int
    length: int
    address: int | None
    op: str | None
    action: str
    tail: bool
    clobbers: tuple[str, ...]
    target: str | None
    convention: str
    # Where a linked file's target is when no symbol says so (the image's export table,
    # a symbol file): the planner found it, and the reference runs the code there.
    target_addr: int | None = None


@dataclass(frozen=True)
class _ThunkJob:
    symbol: str
    target: str
    saves: tuple[str, ...]
    section: str
    offset: int  # in the section
    size: int
    address: int | None = None  # link-time address, when known (linked files)


@dataclass(frozen=True)
class _FileJob:
    orig_data: Buffer
    orig_path: str
    patched_data: Buffer
    sites: tuple[_SiteJob, ...]
    thunks: tuple[_ThunkJob, ...]
    call_targets: tuple[tuple[str, str], ...]
    trials: int
    seed: int
    # The files already parsed, when the job runs in the process that has them
    # (not sent to a worker: it parses the bytes again).
    orig_elf: ElfFile | None = field(default=None, compare=False, repr=False)
    patched_elf: ElfFile | None = field(default=None, compare=False, repr=False)

    def portable(self) -> _FileJob:
        """The job without the parsed files, to send to another process."""
        # A mapped file does not pickle: send its bytes.
        return replace(self, orig_data=self.orig_data[:], patched_data=self.patched_data[:],
                       orig_elf=None, patched_elf=None)


def _section_nth(elf: ElfFile, index: int) -> int:
    name = elf.sections[index].name
    return sum(1 for s in elf.sections[:index] if s.is_alloc and s.name == name)


def _site_job(plan: Plan, d: Decision) -> _SiteJob:
    s = d.site
    rule = d.rule
    target = rule.target if rule is not None and d.action in ("call", "thunk", "jmp") \
        else d.target
    found = plan.targets.get(target) if target is not None else None
    return _SiteJob(s.index, s.section, _section_nth(plan.scan.elf, s.section_index), s.offset,
                    s.len, s.address, s.op, d.action, d.tail, s.clobber_regs, target,
                    rule.convention if rule is not None else "c",
                    found.address if found is not None else None)


def _site_jobs(plan: Plan) -> tuple[_SiteJob, ...]:
    """A job for every site the plan rewrites."""
    return tuple(_site_job(plan, d) for d in plan.decisions if d.rewrites)


def _unplanned(d: Decision) -> SiteVerdict:
    """A site that differs although the plan keeps it: nothing says what it should do."""
    s = d.site
    why = d.reason or "the backend keeps it"
    return SiteVerdict(s.index, s.section, s.offset, s.address, s.op, "keep", "fail",
                       f"the site's bytes or relocations changed, but the plan keeps it "
                       f"({why}): there is nothing to prove them against", 0)


def _call_targets(plan: Plan) -> tuple[tuple[str, str], ...]:
    found: dict[str, str] = {}
    for d in plan.decisions:
        if d.action in ("call", "thunk") and d.rule is not None and d.rule.target:
            conv = "c" if d.action == "thunk" else d.rule.convention
            # The more hostile convention wins when a target is reached both ways.
            if found.get(d.rule.target) != "c":
                found[d.rule.target] = conv
    return tuple(sorted(found.items()))


# -- the public entry points ------------------------------------------------------------


def verify_rewrite(rw: Rewrite, *, trials: int = DEFAULT_TRIALS, seed: int = 0,
                   workers: int | None = None, allow_skip: bool = False) -> VerifyReport:
    """Verify a rewrite in memory (before it is written): original vs `rw.data`.

    `workers`: processes to spread the sites over; None decides from the
    amount of work, 1 keeps everything in this process.  `allow_skip`: a site
    or thunk that cannot be run (skip) does not fail verification.
    """
    plan = rw.plan
    patched = ElfFile(rw.data, plan.scan.path + " (patched)")
    return _verify(plan, patched, trials, seed, workers, allow_skip)


def verify_files(original: ScanResult, patched: ElfFile, plan: Plan, *,
                 trials: int = DEFAULT_TRIALS, seed: int = 0,
                 workers: int | None = None, allow_skip: bool = False) -> VerifyReport:
    """Verify a patched file against its original, given the plan that says what each
    site was meant to become (re-planned from the original by the caller).

    The sites and thunks checked are those that differ, found in the patched file by
    (section name, offset), so a patched file whose table entries were dropped is
    verified all the same; every other difference must be accounted for.
    """
    if plan.scan is not original and plan.scan.path != original.path:
        raise VerifyError("the plan was not made from this original", original.path)
    if patched.arch != original.arch:
        raise VerifyError(f"the patched file is {patched.arch.name}, the original "
                          f"{original.arch.name}", patched.path)
    if patched.is_relocatable != original.elf.is_relocatable:
        raise VerifyError("the patched file is not the same kind of ELF file as the original",
                          patched.path)
    return _verify(plan, patched, trials, seed, workers, allow_skip)


def _verify(plan: Plan, patched: ElfFile, trials: int, seed: int, workers: int | None,
            allow_skip: bool) -> VerifyReport:
    from ..accounting import account

    if trials < 1:
        raise VerifyError("trials must be at least 1")
    acc = account(plan, patched)
    decisions = {d.site.index: d for d in plan.decisions}
    sites: list[_SiteJob] = []
    refused: list[SiteVerdict] = []
    for index in acc.changed_sites:
        d = decisions[index]
        if d.rewrites:
            sites.append(_site_job(plan, d))
        else:
            refused.append(_unplanned(d))
    specs = {t.symbol: t for t in plan.thunks}
    thunks: list[_ThunkJob] = []
    strays: list[ThunkVerdict] = []
    for t in acc.thunks:
        spec = specs.get(t.symbol)
        if spec is None:
            strays.append(ThunkVerdict(t.symbol, "?", t.address, "fail", "a thunk the plan "
                                       "does not make: there is nothing to prove it against",
                                       0))
        else:
            thunks.append(_ThunkJob(spec.symbol, spec.target, spec.saves, t.section,
                                    t.offset, t.size, t.address))
    site_v, thunk_v = _emulate(plan, patched, tuple(sites), tuple(thunks), trials, seed,
                               workers)
    all_sites = tuple(sorted((*site_v, *refused), key=lambda v: v.index))
    all_thunks = (*thunk_v, *strays)
    unaccounted = acc.unaccounted({v.index: v.status for v in all_sites},
                                  {t.symbol: t.status for t in all_thunks})
    return VerifyReport(all_sites, all_thunks, allow_skip, acc.sections, unaccounted,
                        acc.omitted)


def _emulate(plan: Plan, patched: ElfFile, sites: tuple[_SiteJob, ...],
             thunks: tuple[_ThunkJob, ...], trials: int, seed: int,
             workers: int | None) -> tuple[list[SiteVerdict], list[ThunkVerdict]]:
    if not sites and not thunks:
        return [], []  # nothing differs that needs running: no image is loaded
    base = _FileJob(plan.scan.elf.data, plan.scan.path, patched.data, sites, thunks,
                    _call_targets(plan), trials, seed, plan.scan.elf, patched)
    n = min(_worker_count(len(sites) * trials, workers), len(sites))
    if n <= 1:
        return verify_job(base)
    results = _verify_parallel(base, n)
    return ([v for r in results for v in r[0]], [v for r in results for v in r[1]])


# The loaded file a forked worker inherits (set while the workers start).
_FORKED: _Context | None = None


def _forked_part(k: int, n: int) -> tuple[list[SiteVerdict], list[ThunkVerdict]]:
    ctx = _FORKED
    if ctx is None:
        raise VerifyError("internal: a verify worker started without its file")
    return _run_job(ctx, ctx.job.sites[k::n], ())


def _verify_parallel(base: _FileJob,
                     n: int) -> list[tuple[list[SiteVerdict], list[ThunkVerdict]]]:
    """Every nth site in each of n processes (this one included)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    global _FORKED
    if "fork" not in multiprocessing.get_all_start_methods():
        jobs = [replace(base.portable(), sites=base.sites[k::n],
                        thunks=base.thunks if k == 0 else ()) for k in range(n)]
        with ProcessPoolExecutor(max_workers=n) as pool:
            return list(pool.map(verify_job, jobs))
    # The file is loaded and mapped once, here; the workers inherit it that way.
    try:
        ctx = _Context(base)
    except VerifyError as exc:
        return [_not_emulated(base, exc)]
    try:
        _FORKED = ctx
        with ProcessPoolExecutor(max_workers=n - 1,
                                 mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(_forked_part, k, n) for k in range(1, n)]
            _FORKED = None  # the workers exist (all of them start on the first submit)
            mine = _run_job(ctx, base.sites[0::n], base.thunks)
            return [mine, *(f.result() for f in futures)]
    finally:
        _FORKED = None
        ctx.close()


def _worker_count(total_trials: int, workers: int | None) -> int:
    if workers is not None:
        return max(1, workers)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not cpus or total_trials < PARALLEL_TRIALS:
        return 1
    return min(cpus, total_trials // (PARALLEL_TRIALS // 2))


def _where(v: SiteVerdict | ThunkVerdict) -> str:
    if isinstance(v, ThunkVerdict):
        return f"thunk {v.symbol}" + (f" at {v.address:#x}" if v.address is not None else "")
    at = f"{v.address:#x} " if v.address is not None else ""
    return f"site {v.index} {at}{v.section}+{v.offset:#x} {v.op or '?'} ({v.action})"


def verify_json(report: VerifyReport) -> dict[str, Any]:
    def one(v: SiteVerdict) -> dict[str, Any]:
        return {"index": v.index, "section": v.section, "offset": v.offset,
                "address": v.address, "op": v.op, "action": v.action, "status": v.status,
                "reason": v.reason, "trials": v.trials, "seed": v.seed,
                "detail": list(v.detail)}

    return {
        "sites": [one(v) for v in report.sites],
        "thunks": [{"symbol": t.symbol, "target": t.target, "address": t.address,
                    "status": t.status, "reason": t.reason, "trials": t.trials,
                    "seed": t.seed, "detail": list(t.detail)} for t in report.thunks],
        "summary": report.summary,
        "thunk_summary": report.thunk_summary,
        "allow_skip": report.allow_skip,
        "unproven": [{"site": v.index if isinstance(v, SiteVerdict) else None,
                      "thunk": v.symbol if isinstance(v, ThunkVerdict) else None,
                      "where": _where(v), "status": v.status, "reason": v.reason,
                      "allowed": v.status == "skip" and report.allow_skip}
                     for v in report.unproven],
        "accounting": {
            "sections": [{"section": n.section, "kind": n.kind, "rule": n.rule}
                         for n in report.sections],
            "unaccounted": [{"section": d.section, "offset": d.offset,
                             "file_offset": d.file_offset, "length": d.length,
                             "what": d.what} for d in report.unaccounted],
            "omitted": report.omitted,
        },
        "ok": report.ok,
    }


def verify_text(report: VerifyReport, path: str = "") -> list[str]:
    """Readable lines: the summary, then every site and thunk not proven (and why), then
    every difference nothing accounts for."""
    s, t = report.summary, report.thunk_summary
    bad = len(report.unaccounted) + report.omitted
    lines = [f"{path + ': ' if path else ''}verify: sites {s['pass']} pass, {s['fail']} fail, "
             f"{s['skip']} skip"
             + (f"; thunks {t['pass']} pass, {t['fail']} fail, {t['skip']} skip"
                if report.thunks else "")
             + f"; {len(report.sections)} changed sections, "
             + (f"{bad} differences not accounted for" if bad else "every difference "
                "accounted for")]
    for v in report.verdicts:
        if v.status == "pass" and not v.reason:
            continue
        note = ""
        if v.status == "skip":
            note = " (not proven: allowed by --allow-skip)" if report.allow_skip else \
                " (not proven: a failure without --allow-skip)"
        lines.append(f"  {v.status:4} {_where(v)}: {v.reason}{note}"
                     + (f" [seed {v.seed}]" if v.seed is not None else ""))
        if v.status == "fail":
            lines.extend(f"         {d}" for d in v.detail)
    for d in report.unaccounted:
        lines.append(f"  diff {d.where()}: {d.what}")
    if report.omitted:
        lines.append(f"  diff ... and {report.omitted} more")
    return lines


# -- the engine (runs in a worker or in-process) ------------------------------------


def _mix(*values: int) -> int:
    """splitmix64 over the values: a trial's seed from (seed, trial)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x


@cache
def _capstone(arch_name: str) -> Any:
    import capstone

    from ..disasm import capstone_mode

    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone_mode(arch_name))
    cs.detail = True
    return cs


_CALL_FORMS = {"x86_64": ((b"\xff\x15", True), (b"\xff\x14\x25", False)),
               "i386": ((b"\xff\x15", False), (b"\x2e\xff\x15", False))}


def _call_slot(arch: Arch, code: bytes, addr: int) -> int | None:
    """The memory slot of the first `call *mem` (absolute or rip-relative) in `code`."""
    from capstone import x86 as cx

    mask = (1 << (8 * arch.ptr_size)) - 1
    # The forms the kernel emits, at the start of the site, without a disassembler.
    for opcode, rip in _CALL_FORMS[arch.name]:
        if code.startswith(opcode) and len(code) >= len(opcode) + 4:
            disp = int.from_bytes(code[len(opcode) : len(opcode) + 4], "little", signed=True)
            return (addr + len(opcode) + 4 + disp if rip else disp) & mask
    for insn in _capstone(arch.name).disasm(code, addr):
        if insn.id != cx.X86_INS_CALL or len(insn.operands) != 1:
            continue
        op = insn.operands[0]
        if op.type != cx.X86_OP_MEM or op.mem.index != 0:
            continue
        if op.mem.base == cx.X86_REG_RIP:
            return int(insn.address + insn.size + op.mem.disp) & mask
        if op.mem.base == 0:
            return int(op.mem.disp) & mask
    return None


def _plain_call(arch: Arch, code: bytes) -> bool:
    """`code` is one indirect call of a form `_call_slot` reads without a disassembler."""
    return any(code.startswith(opcode) and len(code) == len(opcode) + 4
               for opcode, _rip in _CALL_FORMS[arch.name])


def _boundaries(arch: Arch, code: bytes) -> list[int]:
    """Every instruction boundary decoding `code` from its start, including the end."""
    from ..disasm import insn_starts

    starts, stop = insn_starts(arch, code)
    return [*starts, stop]


def _disasm(arch: Arch, code: bytes, addr: int) -> str:
    from ..disasm import disassemble

    return f"{code.hex()}: " + "; ".join(i.text for i in disassemble(arch, code, addr))


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
_REF_RUNS: dict[tuple[object, ...], list[RunResult]] = {}
MAX_REF_RUNS = 4096


def _batch_key(arch_name: str, job: _FileJob, c: int,
               flags_arg: bool = False) -> tuple[str, int, int, int, bool]:
    return arch_name, job.seed, c, min(TRIAL_SLOTS, job.trials - c * TRIAL_SLOTS), flags_arg


def _partial(job: _FileJob) -> dict[tuple[str, int], list[tuple[int, int]]] | None:
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


class _Context:
    """One file pair loaded for emulation, and the trial states (in batches of
    TRIAL_SLOTS, the same for every site)."""

    def __init__(self, job: _FileJob) -> None:
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
        return ref_key is not None and all((b, ref_key) in _REF_RUNS
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


@dataclass(frozen=True)
class _Batch:
    key: tuple[str, int, int, int, bool]  # (arch, seed, batch number, trials, flags_arg)
    first: int  # the first trial's number
    seeds: list[int]
    blocks: list[bytes]
    inits: list[list[int]]  # per slot: the register file and flags the trial starts with


def verify_job(job: _FileJob) -> tuple[list[SiteVerdict], list[ThunkVerdict]]:
    """Verify the sites and thunks of one job (the unit a worker process runs)."""
    try:
        ctx = _Context(job)
    except VerifyError as exc:
        return _not_emulated(job, exc)
    try:
        return _run_job(ctx, job.sites, job.thunks)
    finally:
        ctx.close()


def _not_emulated(job: _FileJob,
                  exc: VerifyError) -> tuple[list[SiteVerdict], list[ThunkVerdict]]:
    # The file cannot be laid out in the emulator at all: nothing is proven,
    # which is a skip for every site and thunk, never a pass.
    why = f"cannot be emulated: {exc.message}"
    return ([SiteVerdict(sj.index, sj.section, sj.offset, sj.address, sj.op, sj.action,
                         "skip", why, 0) for sj in job.sites],
            [ThunkVerdict(tj.symbol, tj.target, tj.address, "skip", why, 0)
             for tj in job.thunks])


def _run_job(ctx: _Context, site_jobs: Iterable[_SiteJob],
             thunk_jobs: Iterable[_ThunkJob]) -> tuple[list[SiteVerdict], list[ThunkVerdict]]:
    sites = []
    for sj in site_jobs:
        try:
            sites.append(_SiteCheck(ctx, sj).run())
        except VerifyError as exc:  # the site reaches outside the emulated image
            sites.append(SiteVerdict(sj.index, sj.section, sj.offset, sj.address, sj.op,
                                     sj.action, "fail", exc.message, 0))
    thunks = []
    for tj in thunk_jobs:
        try:
            thunks.append(_check_thunk(ctx, tj))
        except VerifyError as exc:
            thunks.append(ThunkVerdict(tj.symbol, tj.target, tj.address, "fail", exc.message,
                                       0))
    return sites, thunks


class _SiteCheck:
    def __init__(self, ctx: _Context, sj: _SiteJob) -> None:
        self.ctx = ctx
        self.sj = sj
        self.pokes: list[tuple[Machine, int, bytes, bool]] = []
        self.versions: Callable[[], tuple[str, ...]] = tuple

    def verdict(self, status: Status, reason: str | None, trials: int = 0,
                seed: int | None = None, detail: Sequence[str] = ()) -> SiteVerdict:
        sj = self.sj
        return SiteVerdict(sj.index, sj.section, sj.offset, sj.address, sj.op, sj.action,
                           status, reason, trials, seed, tuple(detail))

    def poke(self, m: Machine, addr: int, data: bytes, code: bool = True) -> None:
        self.pokes.append((m, addr, m.poke(addr, data, code), code))

    def run(self) -> SiteVerdict:
        try:
            return self._run()
        finally:
            for m, addr, old, code in reversed(self.pokes):
                m.poke(addr, old, code)

    def _run(self) -> SiteVerdict:
        ctx, sj = self.ctx, self.sj
        if sj.action == "jmp" or sj.tail:
            return self.verdict("skip", "tail: control does not return to the site")
        if sj.action == "ud2":
            return self.verdict("skip", "ud2: the site traps by design")
        contract: str | None = None
        ref_addr: int | None = None
        model: RefModel | None = None
        with_cr = False
        # What the op's argument is does not depend on how the site is rewritten.
        op_model = ctx.models.get(sj.op) if sj.op is not None else None
        flags_arg = op_model is not None and op_model.flags_arg
        if sj.action in ("inline", "nop"):
            model = ctx.models.get(sj.op) if sj.op is not None else None
            if model is not None and model.skip is not None:
                return self.verdict("skip", model.skip)
            if model is None:
                contract = f"contract only: no reference model for {sj.op or 'an unnamed op'}"
            else:
                ref_addr = ctx.runtime.models[model.op]
                with_cr = model.cr
        else:
            assert sj.target is not None
            ref_addr = _target_in(ctx.img_o, sj.target, sj.target_addr)
            if ref_addr is None:
                contract = "contract only: target not in file"
        o_sec = ctx.img_o.section_address(sj.section, sj.nth)
        p_sec = ctx.img_p.section_address(sj.section, sj.nth)
        if o_sec is None:
            return self.verdict("skip", f"section {sj.section} is not loaded")
        if p_sec is None:
            return self.verdict("fail", f"section {sj.section} is missing from the patched file")
        o_addr, p_addr = o_sec + sj.offset, p_sec + sj.offset
        n = sj.length
        arch = ctx.arch
        orig_code = ctx.m_o.read(o_addr, n)
        pat_code = ctx.m_p.read(p_addr, n)
        self.versions = lambda: (f"original: {_disasm(arch, orig_code, o_addr)}",
                                 f"patched:  {_disasm(arch, pat_code, p_addr)}")
        unsupported = ctx.unsupported_in(p_addr, n)
        if unsupported:
            return self.verdict("fail", "relocation inside the site: " + ", ".join(unsupported),
                                detail=self.versions())
        # A load-time relocation may change only a call's displacement; inline
        # code must run as written (a stale relocation can leave a harmless-looking
        # NOP for one load address and not for another).
        p_index = ctx.img_p.section_index(sj.section, sj.nth)
        if p_index is not None:
            sec = ctx.img_p.elf.sections[p_index]
            raw = b""
            if sec.type != SHT_NOBITS and sj.offset + n <= sec.size:
                at = sec.offset + sj.offset
                raw = ctx.img_p.elf.data[at : at + n]
            if len(raw) == n:
                moved = [k for k in range(n) if raw[k] != pat_code[k]
                         and not (sj.action in ("call", "thunk") and 1 <= k < 5)]
                if moved:
                    return self.verdict(
                        "fail", f"a relocation changes byte {moved[0]} of the rewritten site",
                        detail=(f"as written: {_disasm(arch, raw, p_addr)}", *self.versions()))
        site_end = ctx.runtime.site_end
        self.poke(ctx.m_p, p_addr + n, site_end)
        # Static half of "ends exactly at the site's end": no instruction straddles it.
        if n not in _boundaries(arch, ctx.m_p.read(p_addr, n + 16)):
            return self.verdict("fail", "an instruction straddles the site end",
                                detail=self.versions())
        ref_site = o_addr
        ref_key: tuple[object, ...] | None = None
        if contract is None:
            assert ref_addr is not None
            slot = _call_slot(arch, orig_code, o_addr)
            if slot is not None and ctx.img_o.region_of(slot) is not None:
                if model is not None and _plain_call(arch, orig_code):
                    # Nothing but the call: every such site runs the same code
                    # (the model, from the same states), so its runs are shared.
                    ref_key = (orig_code[: n - 4], ref_addr, with_cr)
                # The slot the site's call reads points at the reference.
                if not ctx.all_shared(ref_key, flags_arg):
                    word_mask = (1 << (8 * ctx.rt.word)) - 1  # a hostile value wraps
                    self.poke(ctx.m_o, slot, (ref_addr & word_mask).to_bytes(ctx.rt.word,
                                                                           "little"),
                              code=not ctx.in_data(slot))
            else:
                ref_site = ctx.runtime.caller  # not an indirect call: call the reference
                if model is not None:
                    ref_key = ("caller", ref_addr, with_cr)
            if not ctx.all_shared(ref_key, flags_arg):
                self.poke(ctx.m_o, o_addr + n, site_end)
        # The flags compared with the reference: the system flags, and all of them when
        # the reference is a model of an op that sets every flag (restore_fl).
        flag_mask = SYSTEM_FLAGS | (ARITH_FLAGS if model is not None and model.flags_result
                                    else 0)
        return self._trials(ref_site, p_addr, ref_addr or 0, with_cr, contract, ref_key,
                            flags_arg, flag_mask)

    def _trials(self, ref_site: int, p_addr: int, ref_fn: int, with_cr: bool,
                contract: str | None, ref_key: tuple[object, ...] | None, flags_arg: bool,
                flag_mask: int) -> SiteVerdict:
        ctx, sj = self.ctx, self.sj
        rt = ctx.rt
        allowed = set(sj.clobbers)
        preserved = [i for i, r in enumerate(rt.regs) if i != ctx.sp and r not in allowed]
        results = [rt.index(r) for r in RESULT_REGS[ctx.arch.name] if r in allowed]
        # The usual outcome, checked at C speed; anything else is looked at closely.
        keep = itemgetter(*preserved, ctx.sp)  # = the initial values (sp: the entry sp)
        compared = [*results, *(range(rt.out_cr, rt.out_cr + 3) if with_cr else ())]
        same = itemgetter(*compared, rt.out_done)  # = the reference's
        fl = rt.out_flags
        for batch in ctx.batches(flags_arg):
            count = len(batch.seeds)
            refs: list[RunResult] = []
            if contract is None:
                cached = _REF_RUNS.get((batch.key, ref_key)) if ref_key is not None else None
                if cached is not None:
                    refs = cached
                else:
                    refs = ctx.m_o.run_trials(count, ref_site, ref_fn, with_cr)
                    if ref_key is not None:
                        if len(_REF_RUNS) >= MAX_REF_RUNS:
                            _REF_RUNS.clear()
                        _REF_RUNS[batch.key, ref_key] = refs
            pats = ctx.m_p.run_trials(count, p_addr, 0, with_cr)
            for k in range(count):
                t = batch.first + k
                ref: RunResult | None = None
                if contract is None:
                    ref = refs[k]
                    if not ref.done:
                        return self.verdict("skip", f"the reference run did not complete: "
                                            f"{ref.error}", t, batch.seeds[k], self.versions())
                pat = pats[k]
                init = batch.inits[k]
                if pat.done and not pat.writes and keep(pat.out) == keep(init) and (
                        (ref is None and not (pat.out[fl] ^ init[fl]) & KEPT_FLAGS)
                        or (ref is not None and not ref.writes
                            and not (pat.out[fl] ^ ref.out[fl]) & flag_mask
                            and same(pat.out) == same(ref.out))):
                    continue
                problems = _compare(ctx, k, init, preserved, results, ref, pat, with_cr,
                                    flag_mask)
                if problems:
                    return self.verdict("fail", problems[0], t + 1, batch.seeds[k],
                                        [*problems[:MAX_DETAIL], *self.versions()])
        return self.verdict("pass", contract, ctx.job.trials)


def _target_in(img: Image, name: str, addr: int | None) -> int | None:
    """The emulator address of a spec target: the symbol the linker's rule binds
    (pvpatch.targets, as the planner and the rewriter bind it), else the address the
    planner found for a linked image (export table, symbol file)."""
    from ..targets import resolve_target

    try:
        sym = resolve_target(img.elf, name)
    except VerifyError:
        raise
    except PvpatchError:
        sym = None  # ambiguous: the planner refused the name before any site used it
    if sym is not None and sym.defined:
        if img.elf.is_relocatable:
            base = img.section_addr.get(sym.section_index)
            if base is not None:
                return img.arch.wrap(base + sym.value)
        else:
            return img.emu_addr(sym.value)
    if addr is not None and not img.elf.is_relocatable:
        return img.emu_addr(addr)
    return img.symbols.get(name)


def _hex(v: int) -> str:
    return f"{v:#x}"


def _flag_problems(want: int, got: int, mask: int, why: str = "") -> list[str]:
    out = []
    for name, bits in FLAG_NAMES:
        if (want ^ got) & mask & bits:
            shift = (bits & -bits).bit_length() - 1
            out.append(f"{name}: expected {(want & bits) >> shift} got {(got & bits) >> shift}"
                       + why)
    return out


def _compare(ctx: _Context, k: int, init: list[int], preserved: Iterable[int],
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
        problems.append(f"{regs[ctx.sp]}: expected {_hex(sp0)} got {_hex(out[ctx.sp])}")
    for i in preserved:
        if out[i] != init[i]:
            problems.append(f"{regs[i]}: expected {_hex(init[i])} got {_hex(out[i])} "
                            "(outside the clobber mask)")
    fl = rt.out_flags
    if ref is None:
        return problems + _flag_problems(init[fl], out[fl], KEPT_FLAGS, " (kept by the site)")
    r = ref.out
    for i in results:
        if out[i] != r[i]:
            problems.append(f"{regs[i]}: expected {_hex(r[i])} got {_hex(out[i])} (result)")
    # IF first: the flag most ops are about.
    problems += _flag_problems(r[fl], out[fl], flag_mask & IF_FLAG)
    problems += _flag_problems(r[fl], out[fl], flag_mask & ~IF_FLAG)
    if with_cr:
        for j, name in enumerate(("cr0", "cr2", "cr3")):
            a, b = r[rt.out_cr + j], out[rt.out_cr + j]
            if a != b:
                problems.append(f"{name}: expected {_hex(a)} got {_hex(b)}")
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


def _thunk_address(ctx: _Context, tj: _ThunkJob) -> int | None:
    img = ctx.img_p
    if tj.address is not None:
        return img.emu_addr(tj.address)
    if img.elf.is_relocatable:
        sym = img.elf.symbols_by_name.get(tj.symbol)
        if sym is not None and sym.defined and sym.section_index in img.section_addr:
            return img.section_addr[sym.section_index] + sym.value
    sec = img.section_address(tj.section)
    return sec + tj.offset if sec is not None else None


def _check_thunk(ctx: _Context, tj: _ThunkJob) -> ThunkVerdict:
    def verdict(status: Status, reason: str | None, trials: int = 0, seed: int | None = None,
                detail: Sequence[str] = ()) -> ThunkVerdict:
        shown = None if addr is None or ctx.img_p.elf.is_relocatable \
            else ctx.img_p.link_addr(addr)
        return ThunkVerdict(tj.symbol, tj.target, shown, status, reason, trials, seed,
                            tuple(detail))

    addr = _thunk_address(ctx, tj)
    if addr is None:
        return verdict("fail", f"thunk {tj.symbol} not found in the patched file")
    rt, m = ctx.rt, ctx.m_p
    img = ctx.img_p
    hostile = ctx.runtime.hostile["c"]
    target = img.symbols.get(tj.target, img.externals.get(tj.target))
    if target is None:
        return verdict("skip", f"target {tj.target} is not in the patched file")
    pokes: list[tuple[int, bytes]] = []
    if target != hostile:
        # Whatever the target is, the thunk alone meets the hostile callee.
        jump = exit_jump(rt, target, hostile)
        pokes.append((target, m.poke(target, jump)))
    try:
        keep = [rt.index(r) for r in (*tj.saves, *CALLEE_SAVED[ctx.arch.name])]
        ret = rt.index(ctx.arch.return_regs[0])
        code = m.read(addr, min(tj.size, MAX_SHOWN))  # for the report only
        for batch in ctx.batches():
            # As if called from a site: the caller stub calls the thunk.
            runs = m.run_trials(len(batch.seeds), ctx.runtime.caller, addr)
            for k, tseed in enumerate(batch.seeds):
                init = batch.inits[k]
                res = runs[k]
                problems: list[str] = []
                sp0 = entry_sp(k)
                if not res.done:
                    problems.append(f"the thunk did not return: {res.error}")
                else:
                    out = res.out
                    host_ret = ctx.host_word(batch, k, ret)
                    callee_sp = out[rt.out_callee_sp]
                    if out[ctx.sp] != sp0:
                        problems.append(f"{rt.regs[ctx.sp]}: expected {_hex(sp0)} "
                                        f"got {_hex(out[ctx.sp])}")
                    for i in keep:
                        if out[i] != init[i]:
                            problems.append(f"{rt.regs[i]}: expected {_hex(init[i])} "
                                            f"got {_hex(out[i])} (saved by the thunk)")
                    if callee_sp == 0:
                        problems.append(f"the thunk never called {tj.target}")
                    else:
                        if out[ret] != host_ret:
                            problems.append(f"{rt.regs[ret]}: expected {_hex(host_ret)} got "
                                            f"{_hex(out[ret])} (the callee's return value)")
                        if rt.word == 8 and (callee_sp + 8) % 16:
                            problems.append(f"the callee is entered with rsp={_hex(callee_sp)},"
                                            " not ≡ 8 (mod 16)")
                if problems:
                    return verdict("fail", problems[0], batch.first + k + 1, tseed,
                                   [*problems[:MAX_DETAIL],
                                    f"thunk: {_disasm(ctx.arch, code, addr)}"])
        problems = _check_unwind(ctx, tj, addr)
        if problems:
            return verdict("fail", problems[0], 1, ctx.first_seed(),
                           [*problems[:MAX_DETAIL], f"thunk: {_disasm(ctx.arch, code, addr)}"])
        return verdict("pass", None, ctx.job.trials)
    finally:
        for at, old in reversed(pokes):
            m.poke(at, old)


# Bytes of stack read at each traced instruction: the deepest thunk frame and then some.
TRACE_WINDOW = 512


def _thunk_cfi(ctx: _Context, addr: int) -> list[CfaRow] | str | None:
    """The CFA rules the patched file gives the thunk at emulator address `addr`, read
    as an unwinder does (a linked file: PT_GNU_EH_FRAME's binary-search table, then the
    FDE it names; an object: its relocated `.eh_frame`); a reason when they cannot be
    read; None when there are none for it (nothing to check: the rewriter says why in
    `Rewrite.unwind`, and accounting that the tables are the ones it writes)."""
    from ..unwind import UnwindError, cfa_rows, find_fde, hdr_lookup, parse_eh_frame
    from ..unwind import fde_at as fde_at_offset

    img = ctx.img_p
    elf = img.elf
    word = ctx.arch.ptr_size
    try:
        if elf.is_relocatable:
            index = img.section_index(EH_FRAME)
            if index is None or index not in img.section_addr:
                return None
            at = img.section_addr[index]
            eh = parse_eh_frame(img.read(at, elf.sections[index].size), at, word)
            fde = find_fde(eh, addr)
        else:
            seg = next((g for g in elf.segments if g.type == PT_GNU_EH_FRAME), None)
            if seg is None:
                return None
            hdr_at = img.emu_addr(seg.vaddr)
            fde_at = hdr_lookup(img.read(hdr_at, seg.memsz), hdr_at, addr)
            sec = elf.section_for_addr(img.link_addr(fde_at)) if fde_at is not None else None
            if sec is None:
                return None
            at = img.emu_addr(sec.addr)
            assert fde_at is not None
            found = fde_at_offset(img.read(at, sec.size), at, word, fde_at - at)
            fde = found if found.pc_begin <= addr < found.pc_begin + found.pc_range else None
    except UnwindError:
        return None  # none that an unwinder reads either: nothing to check
    try:
        return cfa_rows(fde) if fde is not None else None
    except UnwindError as exc:
        return f"its call-frame information cannot be read: {exc.message}"


def _thunk_orc(ctx: _Context, tj: _ThunkJob) -> list[tuple[int, OrcEntry]] | str | None:
    """A kernel object's ORC entries for the thunk: (offset into the thunk, entry), read
    through `.orc_unwind_ip`'s relocations against the thunk's symbol; None when there
    are none."""
    from ..unwind import ORC_ENTRY, ORC_IP_SIZE, decode_orc, orc_layout

    elf = ctx.img_p.elf
    orc, ip = elf.section(ORC_UNWIND), elf.section(ORC_UNWIND_IP)
    if not elf.is_relocatable or orc is None or ip is None:
        return None
    sym = elf.symbols_by_name.get(tj.symbol)
    data = elf.section_data(orc)
    raw = []
    for relsec in elf.relocation_sections(ip):
        for r in elf.relocations(relsec):
            if sym is not None and r.sym == sym.index and 0 <= r.addend <= tj.size:
                at = r.offset // ORC_IP_SIZE * ORC_ENTRY.size
                raw.append((r.addend, data[at : at + ORC_ENTRY.size]))
    if not raw:
        return None
    header = elf.section(ORC_HEADER)
    layout = orc_layout(elf.section_data(header) if header is not None else None)
    if layout is None:
        return "its module's .orc_header names an ORC format pvpatch does not know"
    if any(len(e) != ORC_ENTRY.size for _a, e in raw):
        return "an .orc_unwind_ip slot past the end of .orc_unwind"
    return sorted(((a, decode_orc(layout, e)) for a, e in raw), key=lambda e: e[0])


def _check_unwind(ctx: _Context, tj: _ThunkJob, addr: int) -> list[str]:
    """Run the thunk once more, stopping at each of its instructions: the CFA its CFI row
    states (stack pointer + offset) must be the real one (the stack pointer at entry plus
    the return address), and every slot the row names must hold the return address or
    the saved register's value at entry."""
    from ..disasm import disassemble
    from ..unwind import DWARF_REGS, ORC_REG_SP, RETURN_COLUMN, row_for

    rows = _thunk_cfi(ctx, addr)
    orc = _thunk_orc(ctx, tj)
    if rows is None and orc is None:
        return []
    for found in (rows, orc):
        if isinstance(found, str):
            return [found]
    rt, m = ctx.rt, ctx.m_p
    arch = ctx.arch
    sp_name = arch.stack_pointer
    texts = {addr + i.offset: i.text for i in disassemble(arch, m.read(addr, tj.size), addr)}
    columns = {v: k for k, v in DWARF_REGS[arch.name].items()}
    for _batch in ctx.batches():
        with m.trace(addr, addr + tj.size, TRACE_WINDOW) as steps:
            runs = m.run_trials(1, ctx.runtime.caller, addr)
        break
    else:
        return []
    entry = steps[0] if steps and steps[0].pc == addr else None
    if entry is None or not runs or not runs[0].done:
        return ["the traced run did not go through the thunk"]
    word = rt.word
    sp0 = entry.regs[ctx.sp]
    cfa_real = sp0 + word  # above the return address the call pushed
    ret_addr = int.from_bytes(entry.stack[:word], "little")
    for step in steps:
        where = f"at {tj.symbol}+{step.pc - addr:#x} ({texts.get(step.pc, '?')})"
        sp = step.regs[ctx.sp]
        if isinstance(orc, list):
            entry_at = [e for off, e in orc if off <= step.pc - addr]
            orc_e = entry_at[-1] if entry_at else None
            if orc_e is None or orc_e.sp_reg != ORC_REG_SP or \
                    orc_e.sp_offset != cfa_real - sp:
                said = "none" if orc_e is None else \
                    f"sp_reg {orc_e.sp_reg}, sp_offset {orc_e.sp_offset:+d}"
                return [f"{where}: its ORC entry says {said}, the stack pointer there makes "
                        f"the previous frame {sp_name}{cfa_real - sp:+d}"]
        if not isinstance(rows, list):
            continue
        row = row_for(rows, step.pc)
        if row is None or row.reg != DWARF_REGS[arch.name][sp_name]:
            return [f"{where}: the CFI gives no {sp_name}-based CFA"]
        if sp + row.offset != cfa_real:
            return [f"{where}: the CFI says CFA = {sp_name}{row.offset:+d}, the stack "
                    f"pointer there makes it {sp_name}{cfa_real - sp:+d}"]
        for column, slot in row.saved:
            name = columns.get(column, f"r{column}")
            at = cfa_real + slot - sp
            got = int.from_bytes(step.stack[at : at + word], "little") \
                if 0 <= at <= len(step.stack) - word else None
            want = ret_addr if name == RETURN_COLUMN[arch.name] else \
                entry.regs[rt.index(name)] if name in rt.regs else None
            if got is None or got != want:
                shown = "?" if got is None else _hex(got)
                return [f"{where}: the CFI says {name} is saved at CFA{slot:+d}, which "
                        f"holds {shown}, not {name}'s {_hex(want) if want is not None else '?'}"]
    return []


def report_failures(report: VerifyReport) -> VerifyError | None:
    """A VerifyError naming every failed (or unallowed skipped) site and thunk and every
    difference nothing accounts for, or None if verification passed."""
    parts = []
    for v in report.failures:
        if isinstance(v, SiteVerdict):
            parts.append(f"site {v.index} ({v.section}+{v.offset:#x} {v.op or '?'}): "
                         f"{v.reason}" + (" (skipped)" if v.status == "skip" else ""))
        else:
            parts.append(f"thunk {v.symbol}: {v.reason}")
    parts += [f"{d.where()}: {d.what}" for d in report.unaccounted]
    if not parts and not report.omitted:
        return None
    more = len(parts) - 5 + report.omitted
    return VerifyError(f"verification failed: {'; '.join(parts[:5])}"
                       + (f" and {more} more" if more > 0 else ""))


def verify_findings(report: VerifyReport, plan: Plan | None = None,
                    elf: ElfFile | None = None) -> list[Finding]:
    """PV301 findings for every failure: sites and thunks that fail (or are skipped when
    skips are not allowed), and differences nothing accounts for.  `elf`: the file the
    locations point into (PATCHED for `verify`); default the original."""
    sites = {d.site.index: d.site for d in plan.decisions} if plan is not None else {}
    out = []
    for v in report.failures:
        if isinstance(v, SiteVerdict):
            site = sites.get(v.index)
            file_offset = site.file_offset if site is not None else None
            if elf is not None:
                sec = elf.section(v.section)
                file_offset = sec.offset + v.offset if sec is not None else None
            what = "not proven (skipped)" if v.status == "skip" else v.action
            out.append(Finding("PV301", f"site {v.index} ({what}): {v.reason}",
                               section=v.section, offset=v.offset, address=v.address,
                               site_index=v.index, op=v.op, file_offset=file_offset,
                               length=site.len if site is not None else None))
        else:
            out.append(Finding("PV301", f"thunk {v.symbol} (calls {v.target}): {v.reason}",
                               address=v.address))
    for d in report.unaccounted:
        out.append(Finding("PV301", f"not accounted for: {d.what}", section=d.section,
                           offset=d.offset, file_offset=d.file_offset,
                           length=d.length or None))
    return out
