"""`pvpatch verify` and the verification step of `pvpatch patch`, through the CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from clirun import pvpatch_cli as cli

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "fixtures"
OPS = "catalog:linux-6.1-x86_64"


def test_patch_verifies_by_default(tmp_path: Path) -> None:
    out = tmp_path / "k.o"
    proc = cli("patch", str(FIX / "x86_64" / "kernel61.o"), "-o", str(out), "--ops", OPS,
               "--json", "--trials", "8", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    rewritten = sum(1 for s in doc["sites"] if s["action"] != "keep")
    assert doc["verify"]["summary"]["pass"] + doc["verify"]["summary"]["skip"] == rewritten
    assert doc["verify"]["summary"]["fail"] == 0
    assert all(s["trials"] == 8 for s in doc["verify"]["sites"] if s["status"] == "pass")


def test_wrong_inline_is_refused_and_nothing_written(tmp_path: Path) -> None:
    spec = tmp_path / "wrong.toml"
    spec.write_text('[ops."irq.irq_disable"]\naction = "inline"\nbytes = "fb"\nclobbers = []\n')
    out = tmp_path / "k.o"
    proc = cli("patch", str(FIX / "x86_64" / "kernel61.o"), "-o", str(out), "--ops", OPS,
               "--backend", str(spec))
    assert proc.returncode == 1, proc.stderr
    assert "nothing written" in proc.stderr and "irq.irq_disable" in proc.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong.toml"]


def test_verify_command(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "kernel61.o"
    good = tmp_path / "good.o"
    assert cli("patch", str(src), "-o", str(good), "--ops", OPS, "--no-verify").returncode == 0
    proc = cli("verify", str(src), str(good), "--ops", OPS, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["summary"]["fail"] == 0 and doc["summary"]["pass"] >= 15
    site = doc["sites"][0]
    assert {"index", "section", "offset", "address", "op", "action", "status", "reason",
            "trials"} <= set(site)
    # sti where cli belongs: the site is named, with its seed
    bad = tmp_path / "bad.o"
    data = bytearray(good.read_bytes())
    text_off = int(subprocess.run(["readelf", "-S", "-W", str(good)], capture_output=True,
                                  text=True, check=True).stdout.split("] .text ")[1].split()[2],
                   16)
    index = next(s for s in doc["sites"] if s["op"] == "irq.irq_disable"
                 and s["section"] == ".text")
    assert data[text_off + index["offset"]] == 0xFA
    data[text_off + index["offset"]] = 0xFB
    bad.write_bytes(bytes(data))
    proc = cli("verify", str(src), str(bad), "--ops", OPS)
    assert proc.returncode == 1
    assert f".text+{index['offset']:#x}" in proc.stdout and "irq.irq_disable" in proc.stdout
    assert "seed" in proc.stdout
    proc = cli("verify", str(src), str(FIX / "x86_64" / "notelf.txt"))
    assert proc.returncode == 2 and "not an ELF file" in proc.stderr
