"""Running the pvpatch command line from tests: this interpreter, the repository as cwd."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pvpatch_cli(*args: str, cwd: Path = REPO,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pvpatch", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)
