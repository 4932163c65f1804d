"""`pvpatch check`: planted defects, exit codes, JSON, and the real module tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import corpus
import pytest
from clirun import pvpatch_cli as run
from paths import FIX, REPO

import pvpatch
from pvpatch.batch import check_path
from pvpatch.check import CheckOptions
from pvpatch.elf.reader import elf_kind

BROKEN = FIX / "broken"
OPS = "catalog:linux-6.1-x86_64"


# file -> (rule, section, section offset) of the planted defect (fixtures/broken/README.md)
PLANTED: dict[str, tuple[str, str | None, int | None]] = {
    "bad-elf.o": ("PV100", None, None),
    "table-size.o": ("PV101", ".parainstructions", 0x0),
    "entry-target": ("PV102", ".parainstructions", 0x0),
    "site-overrun.o": ("PV103", ".init.text", 0xC),
    "site-overlap.o": ("PV104", ".text", 0x9),
    "insn-start.o": ("PV105", ".text", 0x7D),
    "insn-end.o": ("PV105", ".text", 0xC0),
    "slot-mismatch.o": ("PV106", ".text", 0x9),
    "reloc-crossing.o": ("PV107", ".text", 0x85),
    "entry-unrelocated.o": ("PV108", ".parainstructions", 0x20),
    "site-length.o": ("PV109", ".text", 0xA3),
    "short-site.o": ("PV201", ".text", 0x54),
    "op-unknown.o": ("PV203", ".text", 0xC6),
    "duplicate-entry.o": ("PV204", ".text", 0x9),
    "alt-call-form.o": ("PV110", ".altinstructions", 20 * 14),
    "alt-slot.o": ("PV111", ".text", 0x110),
    "alt-entries-disagree.o": ("PV112", ".text", 0x6),
    "alt-replacement.o": ("PV113", ".text", 0x20),
}


def test_broken_fixtures_are_current() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build-broken-fixtures"),
                           "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in BROKEN.iterdir() if elf_kind(p.read_bytes()) != "not-elf"} \
        == set(PLANTED)


@pytest.fixture(scope="module")
def tree_doc() -> dict[str, Any]:
    proc = run("check", "--json", "--ops", OPS, str(BROKEN))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == ""
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_each_planted_defect_is_reported(tree_doc: dict[str, Any], name: str) -> None:
    rule, section, offset = PLANTED[name]
    record = next(f for f in tree_doc["files"] if f["path"] == str(BROKEN / name))
    hits = [f for f in record["findings"] if f["rule"] == rule]
    assert hits, record["findings"]
    assert any(f["section"] == section and f["offset"] == offset for f in hits), hits
    assert hits[0]["severity"] == pvpatch.RULES[rule].severity


def test_error_rules_only_where_planted(tree_doc: dict[str, Any]) -> None:
    # A lying entry usually lies about the site's bytes too: those are not a call and NOPs
    # (PV114).  The two warning fixtures plant fake sites (a `ret`, an `or; not`).
    allowed = {"reloc-crossing.o": {"PV105", "PV107", "PV114"},
               "insn-start.o": {"PV105", "PV114"}, "insn-end.o": {"PV105", "PV114"},
               "site-overlap.o": {"PV104", "PV114"}, "short-site.o": {"PV114"},
               "op-unknown.o": {"PV114"}}
    for record in tree_doc["files"]:
        name = Path(record["path"]).name
        errors = {f["rule"] for f in record["findings"] if f["severity"] == "error"}
        planted = PLANTED[name][0]
        expect = allowed.get(name, {planted} if pvpatch.RULES[planted].severity == "error"
                             else set())
        assert errors == expect, (name, record["findings"])


def test_summary_and_shape(tree_doc: dict[str, Any]) -> None:
    summary = tree_doc["summary"]
    assert summary["files"] == len(PLANTED) == len(tree_doc["files"])
    assert summary["skipped"] == 2  # README.md and c-call.toml
    errors = sum(1 for r in tree_doc["files"] for f in r["findings"]
                 if f["severity"] == "error")
    assert summary["findings"]["error"] == errors
    assert summary["sites"] == sum(len(r["sites"]) for r in tree_doc["files"])
    assert tree_doc["errors"] == []
    # the same site fields as `scan --json`
    scan = json.loads(run("scan", "--json", "--ops", OPS,
                          str(BROKEN / "slot-mismatch.o")).stdout)["files"][0]
    record = next(f for f in tree_doc["files"] if f["path"].endswith("slot-mismatch.o"))
    assert {k: v for k, v in record.items() if k != "findings"} == scan
    assert [f["path"] for f in tree_doc["files"]] == sorted(f["path"] for f in tree_doc["files"])


def test_no_thunk_warning_with_c_convention_spec() -> None:
    spec = str(BROKEN / "c-call.toml")
    proc = run("check", "--backend", spec, "--json", str(FIX / "x86_64" / "prog"))
    assert proc.returncode == 0, proc.stderr  # warnings do not fail by default
    (prog,) = json.loads(proc.stdout)["files"]
    # short-site.o's fake 4-byte site is an error (PV114) as well as too short for a thunk
    proc = run("check", "--backend", spec, "--json", str(BROKEN / "short-site.o"))
    assert proc.returncode == 1, proc.stderr
    (short,) = json.loads(proc.stdout)["files"]
    no_thunk = [f for f in prog["findings"] if f["rule"] == "PV202"]
    save_fl = [s for s in prog["sites"] if s["type"] == 30]
    assert [(f["section"], f["offset"]) for f in no_thunk] == \
        [(s["section"], s["offset"]) for s in save_fl]
    assert "not defined in this linked file" in no_thunk[0]["message"]
    assert any(f["rule"] == "PV202" and "too short" in f["message"]
               for f in short["findings"])
    proc = run("check", "--backend", spec, "--fail-on", "warning", str(FIX / "x86_64" / "prog"))
    assert proc.returncode == 1


def test_exit_codes_and_text() -> None:
    good = str(FIX / "x86_64" / "kernel61.o")
    proc = run("check", "--ops", OPS, good)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("pvpatch check: 1 ELF files")
    assert "0 errors" in proc.stdout
    proc = run("check", "--ops", OPS, "--fail-on", "warning", good)
    assert proc.returncode == 1  # kernel61.o has ops the native backend lacks (PV203)
    proc = run("check", "--ops", OPS, str(BROKEN / "slot-mismatch.o"))
    assert proc.returncode == 1
    assert "slot-mismatch.o: error: PV106 slot-mismatch: .text+0x9:" in proc.stdout
    assert run("check", "--fail-on", "nope", good).returncode == 2
    assert run("check", "--layout", "nosuch", good).returncode == 2
    proc = run("check", str(FIX / "x86_64" / "notelf.txt"))  # named, not ELF: bad input
    assert proc.returncode == 2 and "not an ELF file" in proc.stderr
    proc = run("check", str(FIX / "x86_64" / "missing.o"), good)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_empty_directory_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here\n")
    proc = run("check", str(tmp_path))
    assert proc.returncode == 2
    assert "is a directory without ELF files" in proc.stderr


def test_foreign_elf_is_skipped_in_a_tree(tmp_path: Path) -> None:
    data = bytearray((FIX / "x86_64" / "plain.o").read_bytes())
    data[18:20] = (40).to_bytes(2, "little")  # EM_ARM: not ours to judge
    (tmp_path / "arm.o").write_bytes(bytes(data))
    (tmp_path / "k.o").write_bytes((FIX / "x86_64" / "kernel61.o").read_bytes())
    proc = run("check", "--json", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [Path(f["path"]).name for f in doc["files"]] == ["k.o"]
    assert doc["summary"]["skipped"] == 1


def test_library_call() -> None:
    fc = check_path(str(BROKEN / "insn-start.o"), CheckOptions(ops=OPS))
    assert fc.status == "checked"
    (hit,) = [f for f in fc.findings if f.rule == "PV105"]
    assert "decoded from kf_cr_juggle" in hit.message
    assert hit.file_offset is not None and hit.length == 5


@pytest.mark.corpus
def test_real_modules_have_no_errors(tmp_path: Path) -> None:
    root = corpus.x86_64_modules()[0].parents[0]
    while root.parent.name != "modules":
        root = root.parent
    sarif = tmp_path / "modules.sarif"
    proc = run("check", "--json", "--sarif", str(sarif), str(root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    summary = doc["summary"]
    assert summary["files"] == len(corpus.x86_64_modules())
    assert summary["findings"]["error"] == 0
    sites = sum(len(pvpatch.load(p).sites) for p in corpus.x86_64_pv_modules())
    assert summary["sites"] == sites
    assert sum(summary["actions"].values()) == sites
    from test_sarif import validate

    validate(json.loads(sarif.read_text()))
