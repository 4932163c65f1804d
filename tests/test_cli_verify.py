"""`pvpatch verify` and the verification step of `pvpatch patch`, through the CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from clirun import pvpatch_cli as cli
from paths import FIX, REPO

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


# -- verify proves instead of assuming --------------------------------------------------

TAIL_SPEC = ('arch = "x86_64"\n[ops."irq.irq_disable"]\naction = "inline"\nbytes = "48cf"\n'
             'clobbers = []\ntail = true\n[ops."irq.irq_enable"]\naction = "ud2"\n')
CAT68 = {a: f"catalog:{FIX / 'catalogs' / f'prog68-{a}.toml'}" for a in ("x86_64", "i386")}


def _section_offset(path: Path, name: str) -> int:
    from pvpatch.elf.reader import ElfFile

    sec = ElfFile(path.read_bytes()).section(name)
    assert sec is not None
    return sec.offset


def _patched(tmp_path: Path, src: Path, *args: str) -> Path:
    out = tmp_path / ("patched-" + src.name)
    proc = cli("patch", str(src), "-o", str(out), "--no-verify", *args)
    assert proc.returncode == 0, proc.stderr
    return out


def test_a_skip_fails_unless_allowed(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "kernel61.o"
    spec = tmp_path / "tail.toml"
    spec.write_text(TAIL_SPEC)
    out = _patched(tmp_path, src, "--ops", OPS, "--backend", str(spec))
    args = ("verify", str(src), str(out), "--ops", OPS, "--backend", str(spec))
    proc = cli(*args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "skip site 1 .text+0x9 irq.irq_disable (inline): tail" in proc.stdout
    assert "a failure without --allow-skip" in proc.stdout
    proc = cli(*args, "--allow-skip", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["allow_skip"] is True and doc["summary"]["skip"] > 0
    assert {u["status"] for u in doc["unproven"]} == {"skip"}
    assert all(u["allowed"] and u["reason"] and u["site"] is not None for u in doc["unproven"])
    assert len(doc["unproven"]) == doc["summary"]["skip"]


def test_patch_refuses_a_skip_unless_allowed(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "kernel61.o"
    spec = tmp_path / "tail.toml"
    spec.write_text(TAIL_SPEC)
    out = tmp_path / "k.o"
    proc = cli("patch", str(src), "-o", str(out), "--ops", OPS, "--backend", str(spec))
    assert proc.returncode == 1 and not out.exists()
    assert "nothing written" in proc.stderr and "(skipped)" in proc.stderr
    proc = cli("patch", str(src), "-o", str(out), "--ops", OPS, "--backend", str(spec),
               "--allow-skip", "--json")
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    verify = json.loads(proc.stdout)["verify"]
    assert verify["ok"] and verify["allow_skip"] and verify["unproven"]
    # over a tree the flag is carried to every file (tests/test_mixed_inputs.py)


def test_sti_for_cli_without_op_names_fails(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "kernel61.o"
    out = _patched(tmp_path, src, "--ops", OPS)
    data = bytearray(out.read_bytes())
    at = _section_offset(out, ".text") + 0x9  # site 1, irq.irq_disable
    assert data[at] == 0xFA
    data[at] = 0xFB
    bad = tmp_path / "bad.o"
    bad.write_bytes(bytes(data))
    proc = cli("verify", str(src), str(bad), "--ops", "none")
    assert proc.returncode == 1, proc.stdout
    assert "fail site 1 .text+0x9 ? (keep)" in proc.stdout and "op unknown" in proc.stdout


def test_byte_outside_every_site_fails_naming_where(tmp_path: Path) -> None:
    src = FIX / "i386" / "prog"
    out = _patched(tmp_path, src, "--ops", "none", "--backend", str(FIX / "specs" / "prog.toml"))
    text = _section_offset(out, ".text")
    data = bytearray(out.read_bytes())
    data[text + 1] ^= 0x55  # inside _start: no site there
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    args = ("verify", str(src), str(bad), "--ops", "none", "--backend",
            str(FIX / "specs" / "prog.toml"))
    proc = cli(*args)
    assert proc.returncode == 1
    assert f"diff .text+0x1, file offset {text + 1:#x}: changed outside every site" in proc.stdout
    sarif = tmp_path / "v.sarif"
    proc = cli(*args, "--json", "--sarif", str(sarif))
    assert proc.returncode == 1
    [diff] = json.loads(proc.stdout)["accounting"]["unaccounted"]
    assert (diff["section"], diff["offset"], diff["file_offset"], diff["length"]) == \
        (".text", 1, text + 1, 1)
    [result] = json.loads(sarif.read_text())["runs"][0]["results"]
    assert result["ruleId"] == "PV301"
    assert result["locations"][0]["physicalLocation"]["region"]["byteOffset"] == text + 1


def test_restore_fl_is_proven_through_the_cli(tmp_path: Path) -> None:
    for arch in ("x86_64", "i386"):
        src = FIX / arch / "prog68"
        out = _patched(tmp_path, src, "--ops", CAT68[arch])
        proc = cli("verify", str(src), str(out), "--ops", CAT68[arch], "--json")
        assert proc.returncode == 0, proc.stdout
        doc = json.loads(proc.stdout)
        [site] = [s for s in doc["sites"] if s["op"] == "irq.restore_fl"]
        assert (site["status"], site["reason"], site["trials"]) == ("pass", None, 16)
        # push; push; popf (and NOPs): the stack is off by one word
        data = bytearray(out.read_bytes())
        at = _section_offset(out, site["section"]) + site["offset"]
        push = data[at]
        data[at : at + 6] = bytes([push, push, 0x9D]) + b"\x90" * 3
        bad = tmp_path / f"bad-{arch}"
        bad.write_bytes(bytes(data))
        proc = cli("verify", str(src), str(bad), "--ops", CAT68[arch])
        assert proc.returncode == 1
        assert f"fail site {site['index']}" in proc.stdout and "sp: expected" in proc.stdout


def test_shared_library_sites_all_proven(tmp_path: Path) -> None:
    """i386 libprog.so reaches pv_ops through load-time relocations: every site used to be
    skipped, and the file passed."""
    src = FIX / "i386" / "libprog.so"
    proc = cli("patch", str(src), "-o", str(tmp_path / "lib.so"), "--ops", "none",
               "--backend", str(FIX / "specs" / "prog.toml"), "--json")
    assert proc.returncode == 0, proc.stderr
    verify = json.loads(proc.stdout)["verify"]
    assert verify["summary"] == {"pass": 6, "fail": 0, "skip": 0} and not verify["unproven"]
    assert verify["thunk_summary"]["pass"] == 4


def test_bad_patched_file_is_one_line(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "kernel61.o"
    short = tmp_path / "short.o"
    short.write_bytes(src.read_bytes()[:200])
    proc = cli("verify", str(src), str(short), "--ops", OPS)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "short.o" in proc.stderr


def test_verify_runs_under_a_two_gib_address_space_limit(tmp_path: Path) -> None:
    # Unicorn reserves a 1 GiB translation buffer per engine unless told
    # otherwise; two engines (a thunk pool) would not fit under 2 GiB.
    import resource
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    out = tmp_path / "prog"
    proc = subprocess.run(
        [sys.executable, "-m", "pvpatch", "patch", str(FIX / "x86_64" / "prog"),
         "-o", str(out), "--backend", str(FIX / "specs" / "prog.toml"), "-j", "2", "--json"],
        capture_output=True, text=True, cwd=REPO, preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)["verify"]["summary"]
    assert summary["fail"] == 0 and summary["pass"] > 0
    assert json.loads(proc.stdout)["verify"]["thunks"]
