"""Running the pvpatch command line from tests: this interpreter, the repository as cwd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from paths import REPO

BATCH = 64  # files per `pvpatch scan` run


def pvpatch_cli(*args: str, cwd: Path = REPO,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pvpatch", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)


def scan_records(paths: list[Path]) -> dict[Path, dict[str, Any]]:
    """Run ``pvpatch scan --json`` in batches; map each resolved path to its file record."""
    result: dict[Path, dict[str, Any]] = {}
    for start in range(0, len(paths), BATCH):
        batch = [str(p) for p in paths[start : start + BATCH]]
        proc = subprocess.run(
            [sys.executable, "-m", "pvpatch", "scan", "--json", *batch],
            capture_output=True,
            text=True,
            cwd=REPO,  # so the checkout's pvpatch is found even when not installed
        )
        assert proc.returncode == 0, proc.stderr
        for record in json.loads(proc.stdout)["files"]:
            result[Path(record["path"]).resolve()] = record
    assert set(result) == {p.resolve() for p in paths}
    return result
