"""The README's examples run, and say what they print."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

from paths import REPO

README = (REPO / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_readme_opens_with_two_commands() -> None:
    head = README.split("---", 1)[0]
    cmds = re.findall(r"```sh\n(.*?)```", head, re.S)
    assert len(cmds) == 2
    assert cmds[1].strip() == "scripts/test"
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith("exec scripts/test")


def test_python_examples(monkeypatch: object) -> None:
    code = blocks("python")
    assert code
    for block in code:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, "README.md", "exec"), {})
        printed = out.getvalue().splitlines()
        expected = [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$",
                                                            block, re.M)]
        for want in expected:
            assert any(line.strip() == want for line in printed), (want, printed)


def test_console_examples(tmp_path: Path) -> None:
    lines = [ln[2:] for b in blocks("console") for ln in b.splitlines() if ln.startswith("$ ")]
    assert lines
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "pvpatch"
        proc = subprocess.run([sys.executable, "-m", "pvpatch", *argv[1:]], cwd=REPO,
                              capture_output=True, text=True)
        assert proc.returncode == 0, (line, proc.stderr)


def test_every_command_is_documented() -> None:
    from pvpatch.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        assert f"pvpatch {name}" in README, name
