"""Hostile input: structure-aware mutations of every fixture, through every entry point.

Each input must give a result or the package's own error, in bounded time and
memory.  The budget is set so the whole file adds well under a minute to CI;
`scripts/fuzz` runs the same mutations for as long as you like.
"""

from __future__ import annotations

import os
from datetime import timedelta

import fuzzing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SEEDS = fuzzing.load_seeds()
# 12 seeds x 1,200 examples: over 14,000 mutated inputs per run.
EXAMPLES = int(os.environ.get("PVPATCH_FUZZ_EXAMPLES", "1200"))
VERIFY = os.environ.get("PVPATCH_FUZZ_VERIFY", "1") != "0"
COMMON = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),  # a hang or a pathological loop fails the example
    derandomize=os.environ.get("PVPATCH_FUZZ_RANDOM") is None,  # reproducible in CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def _draw_from(data: st.DataObject):  # type: ignore[no-untyped-def]
    def draw(lo: int, hi: int) -> int:
        return int(data.draw(st.integers(lo, hi)))

    return draw


def _fuzz_one(index: int, data: st.DataObject) -> None:
    _path, seed, fields, cuts = SEEDS[index]
    draw = _draw_from(data)
    mutated = fuzzing.mutate(seed, draw, fields, cuts)
    # Verification and the thunk spec are slower: a share of the inputs gets them;
    # another share runs under tracemalloc, bounded in memory and time.
    kind = draw(0, 15)
    if kind == 0:
        fuzzing.exercise(mutated, verify=VERIFY, spec=fuzzing.SPEC)
    elif kind <= 2:
        fuzzing.bounded(mutated)
    else:
        fuzzing.exercise(mutated)


def _make(index: int):  # type: ignore[no-untyped-def]
    @COMMON
    @given(data=st.data())
    def test(data: st.DataObject) -> None:
        _fuzz_one(index, data)

    test.__name__ = f"test_fuzz_{SEEDS[index][0].parent.name}_{SEEDS[index][0].name}"
    return test


for _i in range(len(SEEDS)):
    _t = _make(_i)
    globals()[_t.__name__] = _t


@settings(COMMON, max_examples=EXAMPLES * 2)
@given(data=st.data())
def test_lying_entries_are_never_rewritten(data: st.DataObject) -> None:
    """Entries made to lie about lengths and places, with duplicates and nesting: every
    site a plan still rewrites holds a call and NOPs and overlaps no other site."""
    draw = _draw_from(data)
    path, seed, _fields, _cuts = SEEDS[draw(0, len(SEEDS) - 1)]
    mutated = fuzzing.mutate_entries(seed, draw)
    spec = fuzzing.SPEC if path.name.startswith("prog") else None
    fuzzing.rewrites_only_honest_sites(mutated, spec)


def test_seeds_are_clean() -> None:
    for path, data, fields, cuts in SEEDS:
        assert fuzzing.exercise(data, verify=True) == "ok", path
        assert fields and cuts
