"""SARIF output of check, patch and verify, validated against the official schema."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
from clirun import pvpatch_cli
from paths import FIX, REPO, SARIF_SCHEMA

BROKEN = FIX / "broken"
# The official OASIS schema, carried by the repository (fixtures/schemas/README.md).
SCHEMA = SARIF_SCHEMA
OPS = "catalog:linux-6.1-x86_64"


def validate(doc: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    # The schema names its own draft (draft-04): validate with exactly that one.
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    errors = sorted(cls(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_schema_is_the_official_copy() -> None:
    # The hash noted beside the copy: a changed byte would make every validation suspect.
    schema = json.loads(SCHEMA.read_text())
    assert schema["id"].startswith("https://docs.oasis-open.org/sarif/sarif/v2.1.0/")
    noted = (SCHEMA.parent / "README.md").read_text()
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() in noted


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    # From another folder the package is found through PYTHONPATH.
    return pvpatch_cli(*args, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_check_sarif_validates_and_locates(tmp_path: Path) -> None:
    out = tmp_path / "check.sarif"
    proc = run("check", "--ops", OPS, "--sarif", str(out), "fixtures/broken")
    assert proc.returncode == 1
    doc = json.loads(out.read_text())
    validate(doc)
    (the_run,) = doc["runs"]
    driver = the_run["tool"]["driver"]
    assert driver["name"] == "pvpatch" and driver["version"]
    ids = [r["id"] for r in driver["rules"]]
    assert {"PV100", "PV105", "PV202", "PV301"} <= set(ids)
    levels = {r["id"]: r["defaultConfiguration"]["level"] for r in driver["rules"]}
    assert levels["PV106"] == "error" and levels["PV204"] == "warning"
    results = the_run["results"]
    (mismatch,) = [r for r in results if r["ruleId"] == "PV106"]
    assert mismatch["level"] == "error"
    assert ids[mismatch["ruleIndex"]] == "PV106"
    loc = mismatch["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == "fixtures/broken/slot-mismatch.o"
    # .text is at file offset 0x40 in kernel61.o; the site is .text+0x9, 6 bytes
    assert loc["region"] == {"byteOffset": 0x49, "byteLength": 6}
    assert loc["address"]["relativeAddress"] == 9 and loc["address"]["name"] == ".text"
    assert "absoluteAddress" not in loc["address"]  # relocatable file: no address
    art = the_run["artifacts"][loc["artifactLocation"]["index"]]
    assert art["location"]["uri"] == "fixtures/broken/slot-mismatch.o"
    assert art["length"] == (BROKEN / "slot-mismatch.o").stat().st_size
    (target,) = [r for r in results if r["ruleId"] == "PV102"]
    assert target["locations"][0]["physicalLocation"]["region"]["byteLength"] == 16
    (bad,) = [r for r in results if r["ruleId"] == "PV100"]
    assert "region" not in bad["locations"][0]["physicalLocation"]
    inv = the_run["invocations"][0]
    assert inv == {**inv, "executionSuccessful": True, "exitCode": 1}
    # fingerprints are stable from run to run
    again = tmp_path / "again.sarif"
    run("check", "--ops", OPS, "--sarif", str(again), "fixtures/broken")
    assert [r["partialFingerprints"] for r in json.loads(again.read_text())["runs"][0]
            ["results"]] == [r["partialFingerprints"] for r in results]
    assert len({json.dumps(r["partialFingerprints"]) for r in results}) == len(results)


def test_linked_file_carries_absolute_address(tmp_path: Path) -> None:
    out = tmp_path / "prog.sarif"
    proc = run("check", "--backend", str(BROKEN / "c-call.toml"), "--sarif", str(out),
               str(FIX / "x86_64" / "prog"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    validate(doc)
    (hit,) = [r for r in doc["runs"][0]["results"] if r["ruleId"] == "PV202"]
    loc = hit["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == (FIX / "x86_64" / "prog").as_uri()  # not under cwd
    assert loc["address"]["absoluteAddress"] == 0x401A7D
    assert loc["region"]["byteOffset"] == 0x1A7D


def test_bad_input_still_writes_sarif(tmp_path: Path) -> None:
    out = tmp_path / "bad.sarif"
    proc = run("check", "--sarif", str(out), str(tmp_path / "missing.o"))
    assert proc.returncode == 2
    doc = json.loads(out.read_text())
    validate(doc)
    inv = doc["runs"][0]["invocations"][0]
    assert inv["executionSuccessful"] is False and inv["exitCode"] == 2
    assert "no such file" in inv["toolExecutionNotifications"][0]["message"]["text"]
    proc = run("patch", str(tmp_path / "missing.o"), "-o", str(tmp_path / "x.o"),
               "--sarif", str(out))
    assert proc.returncode == 2
    validate(json.loads(out.read_text()))


def test_patch_and_verify_sarif(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "kernel61.o"
    out, sarif = tmp_path / "k.o", tmp_path / "patch.sarif"
    proc = run("patch", str(src), "-o", str(out), "--ops", OPS, "--sarif", str(sarif))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(sarif.read_text())
    validate(doc)
    # patch reports what check reports for the file: here only warnings (kept sites)
    check = json.loads(run("check", "--json", "--ops", OPS, str(src)).stdout)
    want = sorted((f["rule"], f["message"]) for f in check["files"][0]["findings"])
    results = doc["runs"][0]["results"]
    assert want and all(r["level"] == "warning" for r in results)
    assert sorted((r["ruleId"], r["message"]["text"].split(": ", 1)[1]) for r in results) \
        == want
    assert doc["runs"][0]["invocations"][0]["exitCode"] == 0
    # A patched file whose rewritten site was corrupted fails verification: PV301 there.
    data = bytearray(out.read_bytes())
    data[0x40] = 0xFB  # .text+0x0 (irq.save_fl, inlined as pushf; pop %rax) -> sti
    bad = tmp_path / "bad.o"
    bad.write_bytes(bytes(data))
    proc = run("verify", str(src), str(bad), "--ops", OPS, "--sarif", str(sarif))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(sarif.read_text())
    validate(doc)
    results = doc["runs"][0]["results"]
    assert results and all(r["ruleId"] == "PV301" and r["level"] == "error" for r in results)
    loc = results[0]["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == bad.as_uri()
    assert loc["region"]["byteOffset"] == 0x40
