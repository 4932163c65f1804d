"""The verify stage's records: a verdict per site and per thunk, and the report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from ..record import record

if TYPE_CHECKING:
    from .accounting import Difference, SectionNote


Status = Literal["pass", "fail", "skip"]


@record
class SiteVerdict:
    """One changed site's verdict: `status` and its `reason` (a pass's says when only the
    contract was checked), after `trials` trials (0: none ran)."""

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


@record
class ThunkVerdict:
    """One thunk's verdict, as `SiteVerdict` for a site; `target`: the function it calls ("?"
    for a thunk the plan does not make)."""

    symbol: str
    target: str
    address: int | None
    status: Status
    reason: str | None
    trials: int
    seed: int | None = None
    detail: tuple[str, ...] = ()


@record
class VerifyReport:
    """What verifying one patched file found: a verdict per changed site and per thunk, and
    what the byte accounting could not explain."""

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
