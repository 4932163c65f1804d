"""The regression corpus of hostile files (fixtures/malformed): clear answers, bounded costs."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import fuzzing
import pytest
from clirun import pvpatch_cli as cli
from paths import PROG_SPEC, REPO

from pvpatch.elf import compress
from pvpatch.errors import InputError

FOLDER = REPO / "fixtures" / "malformed"
EXPECTED: dict[str, dict[str, Any]] = tomllib.loads((FOLDER / "expected.toml").read_text())
OPS = "catalog:linux-6.1-x86_64"
OPS_I386 = f"catalog:{REPO / 'fixtures' / 'catalogs' / 'fixtures-i386.toml'}"


def test_corpus_is_complete_and_current() -> None:
    files = {p.name for p in FOLDER.iterdir() if p.name != "expected.toml"}
    assert files == set(EXPECTED)
    # every class of the robustness issue has a file
    assert len([n for n in EXPECTED if not n.startswith("found-")]) >= 20
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build-malformed"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scan_and_patch(name: str, tmp_path: Path) -> None:
    path = FOLDER / name
    want = EXPECTED[name]
    ops = OPS_I386 if _payload(path)[4:5] == b"\x01" else OPS  # ELFCLASS32
    scan = cli("scan", "--ops", ops, str(path))
    out = tmp_path / "out"
    patch = cli("patch", str(path), "-o", str(out), "--ops", ops, "--json")
    for proc in (scan, patch):
        assert "Traceback" not in proc.stderr
    if "accept" in want:
        assert scan.returncode == 0, scan.stderr
        spec = cli("patch", str(path), "-o", str(tmp_path / "spec-out"), "--ops", "none",
                   "--backend", str(PROG_SPEC))
        # The answer each file earned when it was found (expected.toml `exits`): a
        # verification failure (1) or a refusal in one clear line (2) must stay one.
        assert [patch.returncode, spec.returncode] == want["exits"], (patch.stderr, spec.stderr)
        assert "Traceback" not in spec.stderr, spec.stderr
        if spec.returncode == 2:
            assert len(spec.stderr.strip().splitlines()) == 1, spec.stderr
    elif "error" in want:
        for proc in (scan, patch):
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and want["error"] in lines[0] and str(path) in lines[0]
        assert not out.exists()
        assert not list(tmp_path.iterdir())
    else:
        rule = want["finding"]
        assert scan.returncode == 0, scan.stderr
        assert f" {rule} " in scan.stderr
        # the rest of the table is still scanned and patched, and proven; the broken
        # sites are kept, with the finding as the reason
        assert patch.returncode == 0, patch.stderr
        report = json.loads(patch.stdout)
        assert out.exists() and report["verify"]["summary"]["fail"] == 0
        assert report["verify"]["summary"]["pass"] >= 10
        unsafe = [s for s in report["sites"] if (s["reason"] or "").startswith("unsafe")]
        assert any(rule in s["reason"] for s in unsafe) or rule in ("PV102", "PV103", "PV109")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bounded(name: str) -> None:
    data = (FOLDER / name).read_bytes()
    if compress.detect(data) is not None:  # a container found by scripts/fuzz
        outcome = fuzzing.bounded_container(data, compress.MAX_DECOMPRESSED)[0]
    else:
        outcome = fuzzing.bounded(data)[0]  # asserts the bounds itself
    if "error" in EXPECTED[name]:
        assert outcome != "ok"
    elif "finding" in EXPECTED[name]:
        assert outcome == "ok"


def _payload(path: Path) -> bytes:
    """A fixture's ELF bytes: a compressed one's payload when it decompresses."""
    data = path.read_bytes()
    try:
        return bytes(compress.unpack(data, str(path))[0])
    except InputError:
        return data


def test_call_inside_the_table_never_reaches_an_output(tmp_path: Path) -> None:
    """A call planted inside an executable .altinstructions (found by scripts/fuzz): the
    entry naming it is PV102, and the table's own bytes are the same in the output."""
    from pvpatch.elf.reader import ElfFile

    path = FOLDER / "found-2266a4e53070fdc7.elf"
    out = tmp_path / "out"
    proc = cli("patch", str(path), "-o", str(out), "--ops", OPS, "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert "PV102" in proc.stderr and "site at .altinstructions+0xa is inside" in proc.stderr
    table = ElfFile(path.read_bytes()).section(".altinstructions")
    patched = ElfFile(out.read_bytes()).section(".altinstructions")
    assert table is not None and table.is_exec and patched is not None
    assert out.read_bytes()[patched.offset + 0xA : patched.offset + 0x10] == \
        path.read_bytes()[table.offset + 0xA : table.offset + 0x10]
