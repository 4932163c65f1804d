"""cli.main collects young objects less often while a command runs, and puts the
process's garbage-collector thresholds back however the command ends; cli.run, the
program, leaves without the interpreter's teardown yet loses no output."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import subprocess
import sys

import pytest
from paths import FIX, REPO

from pvpatch import cli


def test_threshold_raised_during_a_command_and_restored(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    seen: list[tuple[int, int, int]] = []
    real = cli.build_parser

    def spy() -> object:
        seen.append(gc.get_threshold())
        return real()

    monkeypatch.setattr(cli, "build_parser", spy)
    before = gc.get_threshold()
    gc.set_threshold(700, 9, 8)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["layouts"]) == 0
        assert gc.get_threshold() == (700, 9, 8)
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
            cli.main(["--version"])  # argparse exits from inside the command
        assert gc.get_threshold() == (700, 9, 8)
    finally:
        gc.set_threshold(*before)
    assert seen == [(cli.YOUNG_GC_THRESHOLD, 9, 8)] * 2


def _program(*args: str) -> subprocess.Popen[bytes]:
    """The `pvpatch` program itself (cli.run, as the console script runs it)."""
    return subprocess.Popen([sys.executable, "-c", "from pvpatch.cli import run; run()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)


def test_program_exit_skips_teardown_but_loses_no_output() -> None:
    """run() leaves by os._exit: stdout (a pipe, block-buffered) is still flushed whole."""
    proc = _program("scan", "--json", str(FIX / "x86_64" / "kernel612.o"))
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["files"][0]["sites"], "no sites in the fixture"


def test_program_reader_gone_is_not_an_error() -> None:
    """The reader closed the pipe before the report reached it (`| head`): exit 0, silent.
    A short report is still in stdout's buffer when main() returns, so the write fails in
    run()'s own flush (where the interpreter's teardown used to print "Exception ignored
    ... BrokenPipeError" and exit 120)."""
    proc = _program("layouts")
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 0
    assert err == b""
