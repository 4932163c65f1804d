"""Compare ``pvpatch scan --json`` with the independent decoder on Debian's real 6.1 kernels.

The corpus (see scripts/fetch-corpus) is fetched when missing rather than skipped.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import corpus
import independent
import pytest

pytestmark = pytest.mark.corpus

BATCH = 64


def _scan(paths: list[Path]) -> dict[Path, dict[str, Any]]:
    """Run ``pvpatch scan --json`` in batches; map each resolved path to its file record."""
    result: dict[Path, dict[str, Any]] = {}
    for start in range(0, len(paths), BATCH):
        batch = [str(p) for p in paths[start : start + BATCH]]
        proc = subprocess.run(
            [sys.executable, "-m", "pvpatch", "scan", "--json", *batch],
            capture_output=True,
            text=True,
            cwd=corpus.REPO,  # so the checkout's pvpatch is found even when not installed
        )
        assert proc.returncode == 0, proc.stderr
        for record in json.loads(proc.stdout)["files"]:
            result[Path(record["path"]).resolve()] = record
    assert set(result) == {p.resolve() for p in paths}
    return result


@functools.cache
def _x86_64_modules() -> tuple[Path, ...]:
    return tuple(corpus.x86_64_pv_modules())


def _compare(path: Path, record: dict[str, Any], ref: independent.Decoded) -> list[str]:
    """Differences between pvpatch's record and the reference decoding (empty when equal)."""
    errors: list[str] = []

    def check(what: str, got: object, want: object) -> None:
        if got != want:
            errors.append(f"{path.name}: {what}: pvpatch {got!r}, expected {want!r}")

    check("arch", record["arch"], ref.arch)
    check("elf_type", record["elf_type"], ref.elf_type)
    table = record["table"]
    if table is None:
        return [*errors, f"{path.name}: table is null"]
    check("table.section", table["section"], independent.TABLE)
    check("table.entry_size", table["entry_size"], ref.entry_size)
    check("table.count", table["count"], len(ref.sites))
    if not isinstance(table["layout"], str):
        errors.append(f"{path.name}: table.layout is not a str: {table['layout']!r}")
    sites = record["sites"]
    check("site count", len(sites), len(ref.sites))
    for got, want in zip(sites, ref.sites, strict=False):
        tag = f"site {want.index}"
        check(f"{tag} index", got["index"], want.index)
        check(f"{tag} section", got["section"], want.section)
        check(f"{tag} offset", got["offset"], want.offset)
        check(f"{tag} type", got["type"], want.type)
        check(f"{tag} len", got["len"], want.len)
        check(f"{tag} clobbers", got["clobbers"], want.clobbers)
        check(f"{tag} bytes", str(got["bytes"]).replace(" ", "").lower(), want.bytes)
        if ref.elf_type == "REL":
            check(f"{tag} address", got["address"], None)
        else:
            check(f"{tag} address", got["address"], want.address)
        regs = got["clobber_regs"]
        if not (isinstance(regs, list) and all(isinstance(r, str) for r in regs)):
            errors.append(f"{path.name}: {tag} clobber_regs is not a list of str: {regs!r}")
        elif len(regs) != want.clobbers.bit_count():
            errors.append(f"{path.name}: {tag} clobber_regs {regs} vs mask {want.clobbers:#x}")
        if not (got["op"] is None or isinstance(got["op"], str)):
            errors.append(f"{path.name}: {tag} op is not str|null: {got['op']!r}")
        if not isinstance(got["insns"], list):
            errors.append(f"{path.name}: {tag} insns is not a list: {got['insns']!r}")
    return errors


def _assert_scan_matches(paths: list[Path]) -> int:
    records = _scan(paths)
    errors: list[str] = []
    total = 0
    for path in paths:
        ref = independent.decode(path)
        total += len(ref.sites)
        errors += _compare(path, records[path.resolve()], ref)
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
