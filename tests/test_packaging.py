"""pvpatch as users install it: an sdist and a wheel from `python -m build`, the wheel
installed (not editable) into a new virtualenv outside the repository, and the installed
command run on a fixture."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from paths import FIX, REPO

import pvpatch


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def test_wheel_and_sdist_carry_every_module_and_data_file(dist: Path) -> None:
    (wheel,) = dist.glob("pvpatch-*.whl")
    (sdist,) = dist.glob("pvpatch-*.tar.gz")
    assert wheel.name.startswith(f"pvpatch-{pvpatch.__version__}-")
    assert sdist.name == f"pvpatch-{pvpatch.__version__}.tar.gz"
    names = set(zipfile.ZipFile(wheel).namelist())
    package = REPO / "pvpatch"
    want = {str(p.relative_to(REPO)) for p in package.rglob("*")
            if p.is_file() and p.suffix in (".py", ".toml", ".typed")
            and "__pycache__" not in p.parts}
    assert want <= names, sorted(want - names)
    assert any(n.endswith("entry_points.txt") for n in names)


@pytest.mark.network
def test_installed_wheel_runs_outside_the_repository(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("pvpatch-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                           "--disable-pip-version-check", str(wheel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "work"  # no pvpatch/ here: the installed package is what runs
    work.mkdir()
    obj = work / "k.o"
    obj.write_bytes((FIX / "x86_64" / "kernel612.o").read_bytes())

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(venv / "bin" / "pvpatch"), *args], capture_output=True,
                              text=True, cwd=work, env={"PATH": "/usr/bin:/bin"})

    version = run("--version")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" in project["dynamic"]
    assert version.stdout.strip() == f"pvpatch {pvpatch.__version__}"
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import pvpatch.scan.ops as o; print(o._data_dir())"],
                           capture_output=True, text=True, cwd=work)
    assert str(venv) in where.stdout, where.stdout + where.stderr
    scan = run("scan", "--json", "--ops", "catalog:linux-6.12-x86_64", "k.o")
    assert scan.returncode == 0, scan.stderr
    assert len(json.loads(scan.stdout)["files"][0]["sites"]) == 21
    patched = run("patch", "k.o", "-o", "out.o", "--ops", "catalog:linux-6.12-x86_64")
    assert patched.returncode == 0, patched.stderr
    assert "17 inline" in patched.stdout and (work / "out.o").is_file()
    verify = run("verify", "k.o", "out.o", "--ops", "catalog:linux-6.12-x86_64")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _action() -> dict[str, object]:
    import yaml

    doc = yaml.safe_load((REPO / "action.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def _step(name: str) -> dict[str, object]:
    runs = _action()["runs"]
    assert isinstance(runs, dict)
    steps = runs["steps"]
    assert isinstance(steps, list)
    return next(s for s in steps if s.get("name") == name)


def test_action_is_a_well_formed_composite_action() -> None:
    doc = _action()
    runs = doc["runs"]
    assert isinstance(runs, dict) and runs["using"] == "composite"
    inputs = doc["inputs"]
    assert isinstance(inputs, dict) and inputs["paths"]["required"] is True
    for step in runs["steps"]:
        assert ("uses" in step) != ("run" in step), step
        if "run" in step:
            assert step["shell"] == "bash"
            # inputs reach scripts through env, never through ${{ }} inside the script
            assert "${{" not in step["run"]
    uses = [s["uses"] for s in runs["steps"] if "uses" in s]
    assert uses == ["actions/setup-python@v5", "github/codeql-action/upload-sarif@v3"]


def _run_step(name: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    step = _step(name)
    script = step["run"]
    assert isinstance(script, str)
    return subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, cwd=cwd,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", **env})


def test_action_check_step_runs_on_the_fixtures(tmp_path: Path) -> None:
    """The check step's own script, with the inputs set as the action sets them."""
    import jsonschema

    env = {"PVPATCH_PATHS": f"{FIX / 'x86_64' / 'kernel612.o'} {FIX / 'broken'}",
           "PVPATCH_ARGS": "--ops catalog:linux-6.12-x86_64", "PVPATCH_FAIL_ON": "error",
           "PVPATCH_SARIF": str(tmp_path / "out.sarif")}
    proc = _run_step("pvpatch check", env, tmp_path)
    assert proc.returncode == 1, proc.stderr  # fixtures/broken has errors
    log = json.loads((tmp_path / "out.sarif").read_text())
    schema = json.loads((FIX / "schemas" / "sarif-schema-2.1.0.json").read_text())
    jsonschema.validate(log, schema)
    rules = {r["ruleId"] for r in log["runs"][0]["results"]}
    assert {"PV110", "PV114"} <= rules
    env["PVPATCH_PATHS"] = str(FIX / "x86_64" / "kernel612.o")
    assert _run_step("pvpatch check", env, tmp_path).returncode == 0


@pytest.mark.network
def test_action_install_step_installs_the_checkout(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    proc = subprocess.run(["bash", "-e", "-c", str(_step("Install pvpatch")["run"])],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin",
                               "PVPATCH_SOURCE": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (venv / "bin" / "pvpatch").is_file()
