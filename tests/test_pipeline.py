"""`pvpatch.patch_file`: the one per-file pipeline under `pvpatch patch` (a file alone and
each file of a tree)."""

from __future__ import annotations

from pathlib import Path

from clirun import pvpatch_cli as cli
from paths import FIX

import pvpatch

KERNEL61 = FIX / "x86_64" / "kernel61.o"
OPS = "catalog:linux-6.1-x86_64"


def test_patch_file_writes_what_the_cli_writes(tmp_path: Path) -> None:
    out = tmp_path / "lib.o"
    res = pvpatch.patch_file(KERNEL61, out, pvpatch.PatchOptions(ops=OPS, trials=4))
    assert res.ok and res.output == str(out)
    assert res.verify is not None
    rewritten = sum(1 for d in res.plan.decisions if d.rewrites)
    assert res.verify.summary["pass"] == rewritten > 0
    assert out.read_bytes() == res.rewrite.data
    by_cli = tmp_path / "cli.o"
    assert cli("patch", str(KERNEL61), "-o", str(by_cli), "--ops", OPS).returncode == 0
    assert by_cli.read_bytes() == out.read_bytes()


def test_patch_file_without_output_writes_nothing(tmp_path: Path) -> None:
    res = pvpatch.patch_file(KERNEL61, None, pvpatch.PatchOptions(ops=OPS, verify=False))
    assert res.output is None and res.verify is None and res.ok
    assert res.rewrite.data != KERNEL61.read_bytes()  # planned and applied in memory
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_writes_nothing_and_says_why(tmp_path: Path) -> None:
    spec = tmp_path / "wrong.toml"
    spec.write_text('[ops."irq.irq_disable"]\naction = "inline"\nbytes = "fb"\nclobbers = []\n')
    out = tmp_path / "k.o"
    backend = pvpatch.load_backend(str(spec), pvpatch.open_elf(KERNEL61))
    res = pvpatch.patch_file(KERNEL61, out, pvpatch.PatchOptions(backend=backend, ops=OPS))
    assert not res.ok and res.output is None and not out.exists()
    failed = [f for f in res.findings if f.rule == "PV301"]
    assert failed and {f.op for f in failed} == {"irq.irq_disable"}


def test_on_plan_sees_the_plan_before_anything_is_rewritten() -> None:
    seen: list[int] = []

    def on_plan(result: pvpatch.ScanResult, plan: pvpatch.Plan) -> None:
        seen.append(len(plan.decisions))
        raise pvpatch.UsageError("stop here")

    try:
        pvpatch.patch_file(KERNEL61, None, pvpatch.PatchOptions(ops=OPS), on_plan=on_plan)
    except pvpatch.UsageError as exc:
        assert "stop here" in str(exc)
    else:
        raise AssertionError("on_plan's error did not propagate")
    assert seen == [21]
