"""Compare ``pvpatch scan --json`` with the independent decoder on Debian's real 6.1 kernels.

The corpus (see scripts/fetch-corpus) is fetched when missing rather than skipped.
"""

from __future__ import annotations

import functools
from pathlib import Path

import corpus
import independent
import pytest
from clirun import scan_records
from independent import compare_record

pytestmark = pytest.mark.corpus

@functools.cache
def _x86_64_modules() -> tuple[Path, ...]:
    return tuple(corpus.x86_64_pv_modules())


def _assert_scan_matches(paths: list[Path]) -> int:
    records = scan_records(paths)
    errors: list[str] = []
    total = 0
    for path in paths:
        ref = independent.decode(path)
        total += len(ref.sites)
        errors += compare_record(path, records[path.resolve()], ref)
    assert not errors, f"{len(errors)} differences, first ones:\n" + "\n".join(errors[:30])
    return total


def test_x86_64_corpus_is_big_enough() -> None:
    mods = _x86_64_modules()
    total = sum(len(independent.decode(p).sites) for p in mods)
    assert len(mods) > 40
    assert total > 400


def test_x86_64_call_slot_equals_type() -> None:
    # 6.1 encoding: ff 15 + R_X86_64_PC32 pv_ops+(8*slot-4); the slot must be the entry's type.
    bad = [
        f"{p.name}[{s.index}] type {s.type} slot {s.slot}"
        for p in _x86_64_modules()
        for s in independent.decode(p).sites
        if s.slot != s.type
    ]
    assert not bad, bad[:20]


def test_scan_x86_64_modules() -> None:
    assert _assert_scan_matches(list(_x86_64_modules())) > 400


def test_scan_x86_64_vmlinux() -> None:
    vmlinux = corpus.x86_64_vmlinux()
    assert vmlinux is not None
    assert _assert_scan_matches([vmlinux]) > 3000


def test_scan_i386_modules() -> None:
    mods = corpus.i386_pv_modules()
    assert len(mods) > 40
    assert _assert_scan_matches(mods) > 400
