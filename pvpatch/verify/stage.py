"""The verify stage: prove by emulation that PATCHED keeps ORIGINAL's site contracts,
and account for every other byte that differs.

What is checked comes from what differs (pvpatch/verify/accounting.py), not from a plan:
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

import os
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..elf.reader import ElfFile
from ..errors import VerifyError
from .engine import FilePair
from .jobs import FileJob, SiteJob, ThunkJob, called_targets, site_job, unplanned
from .records import SiteVerdict, ThunkVerdict, VerifyReport
from .sitecheck import SiteCheck
from .thunkcheck import check_thunk

if TYPE_CHECKING:
    from ..plan.stage import Plan
    from ..rewrite.stage import Rewrite
    from ..scan.stage import ScanResult


DEFAULT_TRIALS = 16
PARALLEL_TRIALS = 8_000  # below this many trials more processes cost more than they save


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
    from .accounting import account

    if trials < 1:
        raise VerifyError("trials must be at least 1")
    acc = account(plan, patched)
    decisions = {d.site.index: d for d in plan.decisions}
    sites: list[SiteJob] = []
    refused: list[SiteVerdict] = []
    for index in acc.changed_sites:
        d = decisions[index]
        if d.rewrites:
            sites.append(site_job(plan, d))
        else:
            refused.append(unplanned(d))
    specs = {t.symbol: t for t in plan.thunks}
    thunks: list[ThunkJob] = []
    strays: list[ThunkVerdict] = []
    for t in acc.thunks:
        spec = specs.get(t.symbol)
        if spec is None:
            strays.append(ThunkVerdict(t.symbol, "?", t.address, "fail", "a thunk the plan "
                                       "does not make: there is nothing to prove it against",
                                       0))
        else:
            thunks.append(ThunkJob(spec.symbol, spec.target, spec.saves, t.section,
                                    t.offset, t.size, t.address))
    site_v, thunk_v = _emulate(plan, patched, tuple(sites), tuple(thunks), trials, seed,
                               workers)
    all_sites = tuple(sorted((*site_v, *refused), key=lambda v: v.index))
    all_thunks = (*thunk_v, *strays)
    unaccounted = acc.unaccounted({v.index: v.status for v in all_sites},
                                  {t.symbol: t.status for t in all_thunks})
    return VerifyReport(all_sites, all_thunks, allow_skip, acc.sections, unaccounted,
                        acc.omitted)


def _emulate(plan: Plan, patched: ElfFile, sites: tuple[SiteJob, ...],
             thunks: tuple[ThunkJob, ...], trials: int, seed: int,
             workers: int | None) -> tuple[list[SiteVerdict], list[ThunkVerdict]]:
    if not sites and not thunks:
        return [], []  # nothing differs that needs running: no image is loaded
    base = FileJob(plan.scan.elf.data, plan.scan.path, patched.data, sites, thunks,
                    called_targets(plan), trials, seed, plan.scan.elf, patched)
    n = min(_worker_count(len(sites) * trials, workers), len(sites))
    if n <= 1:
        return verify_job(base)
    results = _verify_parallel(base, n)
    return ([v for r in results for v in r[0]], [v for r in results for v in r[1]])


# The loaded file a forked worker inherits (set while the workers start).
_FORKED: FilePair | None = None


def _forked_part(k: int, n: int) -> tuple[list[SiteVerdict], list[ThunkVerdict]]:
    ctx = _FORKED
    if ctx is None:
        raise VerifyError("internal: a verify worker started without its file")
    return _run_job(ctx, ctx.job.sites[k::n], ())


def _verify_parallel(base: FileJob,
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
        ctx = FilePair(base)
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


# -- one job (the unit a worker process runs) ---------------------------------------


def verify_job(job: FileJob) -> tuple[list[SiteVerdict], list[ThunkVerdict]]:
    """Verify the sites and thunks of one job (the unit a worker process runs)."""
    try:
        ctx = FilePair(job)
    except VerifyError as exc:
        return _not_emulated(job, exc)
    try:
        return _run_job(ctx, job.sites, job.thunks)
    finally:
        ctx.close()


def _not_emulated(job: FileJob,
                  exc: VerifyError) -> tuple[list[SiteVerdict], list[ThunkVerdict]]:
    # The file cannot be laid out in the emulator at all: nothing is proven,
    # which is a skip for every site and thunk, never a pass.
    why = f"cannot be emulated: {exc.message}"
    return ([SiteVerdict(sj.index, sj.section, sj.offset, sj.address, sj.op, sj.action,
                         "skip", why, 0) for sj in job.sites],
            [ThunkVerdict(tj.symbol, tj.target, tj.address, "skip", why, 0)
             for tj in job.thunks])


def _run_job(ctx: FilePair, site_jobs: Iterable[SiteJob],
             thunk_jobs: Iterable[ThunkJob]) -> tuple[list[SiteVerdict], list[ThunkVerdict]]:
    sites = []
    for sj in site_jobs:
        try:
            sites.append(SiteCheck(ctx, sj).run())
        except VerifyError as exc:  # the site reaches outside the emulated image
            sites.append(SiteVerdict(sj.index, sj.section, sj.offset, sj.address, sj.op,
                                     sj.action, "fail", exc.message, 0))
    thunks = []
    for tj in thunk_jobs:
        try:
            thunks.append(check_thunk(ctx, tj))
        except VerifyError as exc:
            thunks.append(ThunkVerdict(tj.symbol, tj.target, tj.address, "fail", exc.message,
                                       0))
    return sites, thunks
