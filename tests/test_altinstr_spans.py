"""altinstr._Spans: the one-sweep pre-check never lets an overlapping site through.

The exact check (every entry's range against the site's) runs only for the locations
the sweep marks; this compares the sweep with that rule, by brute force, on random
tables (zero-length entries, several entries at one place, two sections)."""

from __future__ import annotations

import random
from types import MappingProxyType

from pvpatch.scan.altinstr import ALT_LAYOUTS, Decoded, Loc, _Spans


def _decoded(instr: list[Loc | None], instrlen: list[int]) -> Decoded:
    n = len(instr)
    return Decoded(ALT_LAYOUTS["linux-alt-6.3"], (0,) * n, (0,) * n, tuple(instrlen),
                   (0,) * n, tuple(instr), (None,) * n, MappingProxyType({}))


def _overlapped(d: Decoded, loc: Loc, length: int) -> bool:
    """The exact rule: another entry's range meets the site's without starting at it."""
    start, end = loc[1], loc[1] + length
    return any(other is not None and other[0] == loc[0] and other[1] != start
               and other[1] < end and other[1] + d.instrlen[j] > start
               for j, other in enumerate(d.instr))


def test_sweep_marks_every_overlapping_site() -> None:
    rng = random.Random(7)
    marked = 0
    for _trial in range(300):
        n = rng.randrange(1, 40)
        instr: list[Loc | None] = [
            None if rng.random() < 0.05 else (rng.randrange(1, 3), rng.randrange(0, 120))
            for _ in range(n)]
        instrlen = [rng.choice((0, 1, 2, 5, 6, 6, 6, 11)) for _ in range(n)]
        d = _decoded(instr, instrlen)
        by_loc: dict[Loc, list[int]] = {}
        for i, loc in enumerate(instr):
            if loc is not None:
                by_loc.setdefault(loc, []).append(i)
        spans = _Spans(d, by_loc)
        for loc, group in by_loc.items():
            # Marked exactly when some entry there (the site's among them) is overlapped.
            hit = any(_overlapped(d, loc, instrlen[i]) for i in group)
            assert (loc in spans.suspect) == hit, (instr, instrlen, loc)
            marked += hit
        assert spans.rows == sorted((loc[0], loc[1], loc[1] + instrlen[i], i)
                                    for i, loc in enumerate(instr) if loc is not None)
    assert marked > 100  # the random tables do overlap


def test_sweep_on_a_tidy_table_marks_nothing() -> None:
    """Calls six bytes long, each with its NOT partner at the same address, apart."""
    instr: list[Loc | None] = [(1, 16 * (k // 2)) for k in range(200)]
    d = _decoded(instr, [6] * 200)
    by_loc: dict[Loc, list[int]] = {}
    for i, loc in enumerate(instr):
        assert loc is not None
        by_loc.setdefault(loc, []).append(i)
    assert _Spans(d, by_loc).suspect == set()
