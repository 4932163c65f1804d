"""output._coalesced: fewer writes, the same bytes as writing each edit in turn."""

from __future__ import annotations

import os
import random
from pathlib import Path

from pvpatch.rewrite.output import COALESCE_GAP, OutputFile, _coalesced


def _one_by_one(base: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(base)
    for offset, data in edits:
        end = offset + len(data)
        if end > len(out):
            out.extend(bytes(end - len(out)))
        out[offset:end] = data
    return bytes(out)


def _written(base: bytes, writes: list[tuple[int, bytes]], path: Path) -> bytes:
    path.write_bytes(base)
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in writes:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    return path.read_bytes()


def test_random_edits_same_bytes_fewer_writes(tmp_path: Path) -> None:
    rng = random.Random(12)
    for trial in range(200):
        base = rng.randbytes(rng.randrange(1, 6000))
        edits = []
        for _ in range(rng.randrange(0, 60)):
            offset = rng.randrange(0, len(base) + 40)  # some past the end of the input
            edits.append((offset, rng.randbytes(rng.randrange(1, 20))))
        if trial % 3 == 0 and edits:  # exact overwrites: the later edit must win
            offset, data = edits[0]
            edits.append((offset, bytes(len(data))))
        writes = _coalesced(base, edits)
        assert _written(base, writes, tmp_path / "f") == _one_by_one(base, edits), trial
        assert len(writes) <= len(edits)


def test_table_edits_become_one_write() -> None:
    """A table's 4-byte edits 14 bytes apart (the .altinstructions stride) join one run;
    edits farther apart than the gap stay separate."""
    base = bytes(range(256)) * 64
    edits = [(100 + 14 * i + 8, b"\x75\x00\x01\x00") for i in range(300)]
    assert len(_coalesced(base, edits)) == 1
    far = [(0, b"\x90"), (COALESCE_GAP + 2, b"\x90")]
    assert _coalesced(base, far) == far


def test_commit_edits_writes_the_edited_copy(tmp_path: Path) -> None:
    src = tmp_path / "in"
    base = random.Random(3).randbytes(50_000)
    src.write_bytes(base)
    edits = [(i * 97 % 49_990, bytes([i % 256]) * 7) for i in range(500)]
    with OutputFile(tmp_path / "out") as out:
        out.commit_edits(str(src), base, edits, None)
    assert (tmp_path / "out").read_bytes() == _one_by_one(base, edits)
    assert src.read_bytes() == base
