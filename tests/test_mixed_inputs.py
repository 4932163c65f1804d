"""Trees as CI meets them: architectures mixed, options that fit only some files, and
the same findings whichever command walks the tree."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from clirun import pvpatch_cli
from paths import FIX, REPO, SARIF_SCHEMA

SCHEMA = SARIF_SCHEMA


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copy(FIX / "x86_64" / "kernel61.o", tree / "a64.o")
    shutil.copy(FIX / "i386" / "kernel61.o", tree / "b32.o")
    return tree


def test_check_keeps_the_other_files_results(mixed: Path, tmp_path: Path) -> None:
    """An x86-64 catalog over a tree with an i386 object: the x86-64 file is checked, the
    i386 one is that file's one-line error, and SARIF holds the results."""
    sarif = tmp_path / "out.sarif"
    proc = pvpatch_cli("check", "--json", "--ops", "catalog:linux-6.1-x86_64",
                       "--sarif", str(sarif), str(mixed))
    assert proc.returncode == 2
    doc = json.loads(proc.stdout)
    (record,) = doc["files"]
    assert record["path"].endswith("a64.o") and len(record["sites"]) == 21
    assert [e for e in doc["errors"] if "b32.o" in e and "4-byte pointers" in e]
    log = json.loads(sarif.read_text())
    jsonschema.validate(log, json.loads(SCHEMA.read_text()))
    results = log["runs"][0]["results"]
    assert results and all("a64.o" in r["locations"][0]["physicalLocation"]["artifactLocation"]
                           ["uri"] for r in results)
    notes = log["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert any("b32.o" in n["message"]["text"] for n in notes)


def test_scan_and_patch_keep_the_other_files_results(mixed: Path, tmp_path: Path) -> None:
    proc = pvpatch_cli("scan", "--json", "--ops", "catalog:linux-6.1-x86_64", str(mixed))
    assert proc.returncode == 2
    (record,) = json.loads(proc.stdout)["files"]
    assert record["path"].endswith("a64.o") and len(record["sites"]) == 21
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("pvpatch: error:")]
    assert len(errors) == 1 and "b32.o" in errors[0]
    out = tmp_path / "out"
    proc = pvpatch_cli("patch", "--ops", "catalog:linux-6.1-x86_64", str(mixed), "-o", str(out))
    assert proc.returncode == 2
    assert (out / "a64.o").is_file() and not (out / "b32.o").exists()


def test_a_spec_for_one_architecture_fails_only_the_others(mixed: Path) -> None:
    spec = mixed.parent / "x64.toml"
    spec.write_text('arch = "x86_64"\n[defaults]\naction = "keep"\nreason = "test"\n')
    proc = pvpatch_cli("check", "--json", "--backend", str(spec), str(mixed))
    assert proc.returncode == 2
    doc = json.loads(proc.stdout)
    assert [f["path"].endswith("a64.o") for f in doc["files"]] == [True]
    assert any("b32.o" in e and "the spec is for x86_64" in e for e in doc["errors"])


def test_tree_patch_counts_the_findings_check_reports(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("kernel61.o", "seed.o", "lying.o"):
        shutil.copy(FIX / "x86_64" / name, tree / name)
    ops = ["--ops", "catalog:linux-6.1-x86_64"]
    check = json.loads(pvpatch_cli("check", "--json", *ops, str(tree)).stdout)
    counted = sum(check["summary"]["findings"].values())
    proc = pvpatch_cli("patch", "--json", "--no-verify", *ops, str(tree), "-o",
                       str(tmp_path / "out"))
    assert json.loads(proc.stdout)["summary"]["findings"] == counted > 0


def test_help_lists_the_api() -> None:
    """help(pvpatch) shows the lazily loaded API with its docstrings, not only
    __getattr__; `pvpatch --help` still imports none of it."""
    code = ("import pydoc, pvpatch; t = pydoc.render_doc(pvpatch, renderer=pydoc.plaintext); "
            "print(all(n in t for n in ('make_plan(', 'apply_plan(', 'verify_rewrite(', "
            "'class ScanResult', 'Decide what every site becomes')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.stdout.strip() == "True", proc.stderr


def test_allow_skip_over_a_tree(tmp_path: Path) -> None:
    """A tail site sent to a jmp cannot be proven (control never comes back): over a tree the
    file is refused without --allow-skip and written with it."""
    from test_thunks import _TAIL_PROGRAM

    tree = tmp_path / "tree"
    tree.mkdir()
    (tmp_path / "tail.s").write_text(_TAIL_PROGRAM["x86_64"])
    subprocess.run(["as", "--64", "-o", str(tree / "tail.o"), str(tmp_path / "tail.s")],
                   check=True)
    spec = tmp_path / "spec.toml"
    spec.write_text('[ops."pv_cpu_ops.iret"]\naction = "jmp"\ntarget = "tail_ok"\n')
    args = ["patch", str(tree), "--backend", str(spec), "--ops", "catalog:linux-2.6.30-x86_64"]
    refused = pvpatch_cli(*args, "-o", str(tmp_path / "out1"))
    assert refused.returncode == 1 and not (tmp_path / "out1" / "tail.o").exists()
    allowed = pvpatch_cli(*args, "-o", str(tmp_path / "out2"), "--allow-skip")
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "out2" / "tail.o").is_file()
