"""Job marshalling: everything a worker needs to verify a file, picklable, made from a plan."""

from __future__ import annotations

from dataclasses import field, replace
from typing import TYPE_CHECKING

from ..elf.reader import Buffer, ElfFile
from ..record import record
from .records import SiteVerdict

if TYPE_CHECKING:
    from ..plan.stage import Decision, Plan


@record
class SiteJob:
    """A changed site for a worker to verify: where it is (the same in both files), what the
    plan made of it (`action`; `tail`: control does not come back to the site's end;
    `target`, the function that finally runs, and its `convention`), what its op may clobber."""

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


@record
class ThunkJob:
    """A thunk of PATCHED for a worker to verify: the plan's spec, and where PATCHED holds it."""

    symbol: str
    target: str
    saves: tuple[str, ...]
    section: str
    offset: int  # in the section
    size: int
    address: int | None = None  # link-time address, when known (linked files)


@record
class FileJob:
    """Everything a worker needs to verify one file pair: both files' bytes, the sites and
    thunks to emulate, the trials to run and their seed; `call_targets`: each function a
    rewritten site calls, and the convention it is held to."""

    orig_data: Buffer
    orig_path: str
    patched_data: Buffer
    sites: tuple[SiteJob, ...]
    thunks: tuple[ThunkJob, ...]
    call_targets: tuple[tuple[str, str], ...]
    trials: int
    seed: int
    # The files already parsed, when the job runs in the process that has them
    # (not sent to a worker: it parses the bytes again).
    orig_elf: ElfFile | None = field(default=None, compare=False, repr=False)
    patched_elf: ElfFile | None = field(default=None, compare=False, repr=False)

    def portable(self) -> FileJob:
        """The job without the parsed files, to send to another process."""
        # A mapped file does not pickle: send its bytes.
        return replace(self, orig_data=self.orig_data[:], patched_data=self.patched_data[:],
                       orig_elf=None, patched_elf=None)


def _section_nth(elf: ElfFile, index: int) -> int:
    name = elf.sections[index].name
    return sum(1 for s in elf.sections[:index] if s.is_alloc and s.name == name)


def site_job(plan: Plan, d: Decision) -> SiteJob:
    s = d.site
    rule = d.rule
    branch = d.branch  # the function that finally runs, through a thunk or not
    target = branch.target if branch is not None else None
    found = plan.targets.get(target) if target is not None else None
    return SiteJob(s.index, s.section, _section_nth(plan.scan.elf, s.section_index), s.offset,
                    s.len, s.address, s.op, d.action, d.tail, s.clobber_regs, target,
                    rule.convention if rule is not None else "c",
                    found.address if found is not None else None)


def site_jobs(plan: Plan) -> tuple[SiteJob, ...]:
    """A job for every site the plan rewrites."""
    return tuple(site_job(plan, d) for d in plan.decisions if d.rewrites)


def unplanned(d: Decision) -> SiteVerdict:
    """A site that differs although the plan keeps it: nothing says what it should do."""
    s = d.site
    why = d.reason or "the backend keeps it"
    return SiteVerdict(s.index, s.section, s.offset, s.address, s.op, "keep", "fail",
                       f"the site's bytes or relocations changed, but the plan keeps it "
                       f"({why}): there is nothing to prove them against", 0)


def called_targets(plan: Plan) -> tuple[tuple[str, str], ...]:
    found: dict[str, str] = {}
    for d in plan.decisions:
        b = d.branch
        if b is not None and b.opcode == "call" and d.rule is not None and b.target:
            conv = "c" if b.thunk is not None else d.rule.convention
            # The more hostile convention wins when a target is reached both ways.
            if found.get(b.target) != "c":
                found[b.target] = conv
    return tuple(sorted(found.items()))
