"""Hostile input: structure-aware mutations of every fixture, through every entry point:
ELF structures, the entries of both table families, and the xz, zstd and gzip containers
around them.

Each input must give a result or the package's own error, in bounded time and
memory.  The budget is set so the whole file adds well under a minute to CI;
`scripts/fuzz` runs the same mutations for as long as you like.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta
from pathlib import Path

import corpus
import fuzzing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pvpatch

SEEDS = fuzzing.load_seeds()
# The seeds with an .altinstructions table: kernel612.o (x86-64 RELA, i386 REL), prog68.
ALT_SEEDS = [s for s in SEEDS if s[0].name in ("kernel612.o", "prog68")]
# Every seed in every container (xz, zstd, gzip; as kbuild and other tools write them).
PACKED = fuzzing.load_container_seeds()
# 12 seeds x 600 examples: over 7,000 mutated inputs per run, the same ones every run
# (derandomized); PVPATCH_FUZZ_EXAMPLES raises it, scripts/fuzz runs for hours.
EXAMPLES = int(os.environ.get("PVPATCH_FUZZ_EXAMPLES", "600"))
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


@settings(COMMON, max_examples=EXAMPLES // 2)  # 300 inputs: 4 s
@given(data=st.data())
def test_hostile_altinstructions(data: st.DataObject) -> None:
    """Entries out of range, lengths past the replacement section, DIRECT_CALL on bytes
    that are no call, duplicates and nesting, entries and a planted call inside the table
    itself: every site still rewritten is a call and NOPs overlapping nothing and holds
    what its plan wrote; one input in eight also through every entry point."""
    draw = _draw_from(data)
    path, seed, _fields, _cuts = ALT_SEEDS[draw(0, len(ALT_SEEDS) - 1)]
    mutated = fuzzing.mutate_alt(seed, draw)
    spec = fuzzing.SPEC if path.name.startswith("prog") else None
    fuzzing.rewrites_only_honest_sites(mutated, spec)
    if draw(0, 7) == 0:
        fuzzing.exercise(mutated, verify=VERIFY, spec=spec)


# mutate_alt's kinds -> what each must make pvpatch see at least once in 30 inputs per seed
# ("in-table": a site, or an entry's finding, inside .altinstructions itself).
ALT_AIMS = {
    0: {"PV102", "PV113"},  # offsets out of range
    1: {"PV113"},  # replacementlen past .altinstr_replacement
    2: {"PV110"},  # DIRECT_CALL on bytes that are no call
    3: {"PV104", "PV204"},  # nested, duplicate
    4: {"in-table"},  # pointing into the table
    5: {"in-table"},  # a call planted in the table
    6: {"PV112"},  # feature words: two native forms, a NOT DIRECT_CALL
}


def test_alt_mutations_reach_what_they_aim_at() -> None:
    from pvpatch.check import CheckOptions, check_elf
    from pvpatch.elf.reader import ElfFile
    from pvpatch.errors import PvpatchError

    for kind, aims in ALT_AIMS.items():
        seen: set[str] = set()
        rng = random.Random(kind)
        for _path, seed, _fields, _cuts in ALT_SEEDS:
            for _ in range(30):
                mutated = fuzzing.mutate_alt(seed, rng.randint, kind)
                try:
                    elf = ElfFile(mutated)
                    findings = check_elf(elf, CheckOptions()).findings
                    sites = pvpatch.scan_file(elf, ops="none").sites
                except PvpatchError:
                    continue
                seen |= {f.rule for f in findings}
                if any(".altinstructions+" in f.message for f in findings) or any(
                        s.section == ".altinstructions" for s in sites):
                    seen.add("in-table")
        assert aims <= seen, (kind, sorted(seen))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the examples' files (they run one at a time)."""
    return tmp_path_factory.mktemp("containers")


@settings(COMMON, max_examples=EXAMPLES)  # 600 inputs over 120 seeds: 4 s
@given(data=st.data())
def test_hostile_containers(data: st.DataObject, scratch: Path) -> None:
    """xz, zstd and gzip streams around every seed with their headers, sizes, checks,
    blocks and tails mutated: a result or one line of pvpatch's own, within the limit;
    one input in eight read from a file, one in eight bounded in memory and time."""
    draw = _draw_from(data)
    seed = PACKED[draw(0, len(PACKED) - 1)]
    mutated = fuzzing.mutate_container(seed, draw)
    kind = draw(0, 7)
    if kind == 0:
        fuzzing.bounded_container(mutated, seed.limit)
    else:
        path = scratch / f"fuzz.ko.{seed.fmt}" if kind == 1 else None
        fuzzing.exercise_container(mutated, limit=seed.limit, path=path)


def test_container_seeds_are_clean() -> None:
    """Every variant decodes to its seed and goes through clean; the layouts found what
    the mutations aim at (fields and boundaries in each, blocks or chunks in most)."""
    for seed in PACKED:
        assert fuzzing.exercise_container(seed.data, limit=seed.limit) == "ok", seed.path
        assert seed.fields and len(seed.cuts) >= 2, (seed.path, seed.fmt)
    assert sum(bool(seed.units) for seed in PACKED) >= len(PACKED) * 2 // 3
    assert {seed.fmt for seed in PACKED} == {"xz", "zstd", "gzip"}


@pytest.mark.corpus
@settings(COMMON, max_examples=max(EXAMPLES // 6, 10))
@given(data=st.data())
def test_hostile_debian_modules(data: st.DataObject) -> None:
    """Debian's 6.12 .ko.xz as shipped, and their payloads' .altinstructions, mutated."""
    draw = _draw_from(data)
    seeds = _debian_seeds()
    seed = seeds[draw(0, len(seeds) - 1)]
    if draw(0, 1):
        fuzzing.exercise_container(fuzzing.mutate_container(seed, draw), limit=seed.limit)
    else:
        fuzzing.rewrites_only_honest_sites(fuzzing.mutate_alt(seed.payload, draw))


_DEBIAN: list[fuzzing.Packed] = []


def _debian_seeds() -> list[fuzzing.Packed]:
    """Two small shipped modules with DIRECT_CALL sites (6 and 8), as they are (kbuild's
    xz)."""
    if not _DEBIAN:
        by_name = {p.name: p for p in corpus.x86_64_612_modules()}
        paths = [by_name[n] for n in ("aes_ti.ko.xz", "power.ko.xz")]
        _DEBIAN.extend(fuzzing.load_container_seeds(paths, variants=False))
    return _DEBIAN


def test_fuzz_script_runs(tmp_path: Path) -> None:
    """scripts/fuzz, the long-running form of this file, runs: every kind of mutation,
    a few seconds, nothing found (it once failed at import after a module moved)."""
    import re
    import subprocess
    import sys

    from paths import REPO

    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "fuzz"), "--seconds", "3",
                           "--seed", "7"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = re.search(r"fuzz: (\d+) inputs in .* (\d+) found, (\d+) fuzzer bugs; outcomes (.*)",
                     proc.stderr + proc.stdout)
    assert done is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert int(done[1]) > 100 and done[2] == "0" and done[3] == "0"
    for kind in ("lies:ok", "alt:ok", "containers:ok"):
        assert f"'{kind}'" in done[4], kind
