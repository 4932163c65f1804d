"""cli.main collects young objects less often while a command runs, and puts the
process's garbage-collector thresholds back however the command ends; cli.run, the
program, keeps them raised to its exit and leaves without the interpreter's teardown,
yet loses no output.  A file's data holds no reference cycle."""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from paths import FIX, REPO

from pvpatch import cli


def test_threshold_raised_during_a_command_and_restored(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    seen: list[tuple[int, int, int]] = []
    real = cli.build_parser

    def spy(command: str | None = None) -> object:
        seen.append(gc.get_threshold())
        return real(command)

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


def _program(*args: str, **kw: Any) -> subprocess.Popen[bytes]:
    """The `pvpatch` program itself (cli.run, as the console script runs it), its stdout
    block-buffered as it is for a user (not PYTHONUNBUFFERED)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.Popen([sys.executable, "-c", "from pvpatch.cli import run; run()", *args],
                            cwd=REPO, env=env, **kw)


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


def test_program_with_stdout_closed() -> None:
    """Started with descriptor 1 closed (`pvpatch catalogs >&-`), Python has no sys.stdout:
    print() writes nothing and the program still exits 0, silently."""
    proc = _program("catalogs", stdout=None, stdin=subprocess.DEVNULL,
                    preexec_fn=lambda: os.close(1))
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert err == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_program_stdout_full_is_one_line_and_exit_2() -> None:
    """A report that cannot be written (ENOSPC) is an error of one line, exit 2."""
    # A short report fails in run()'s last flush, a long one while it is written.
    for args in (["catalogs"], ["scan", "--json", str(FIX / "x86_64" / "kernel612.o")]):
        with open("/dev/full", "wb") as full:
            proc = _program(*args, stdout=full)
            _, err = proc.communicate()
        assert proc.returncode == 2, args
        assert err.decode().splitlines() == [
            "pvpatch: error: cannot write standard output: No space left on device"], args


def test_program_under_a_profiler_exits_normally() -> None:
    """Profiled (cProfile writes its file at exit), run() leaves through sys.exit."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "prof.out"
        proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m",
                               "pvpatch", "catalogs"], capture_output=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_size > 0


def test_program_exit_ends_workers_a_pool_left_behind() -> None:
    """A second Ctrl-C can cut a process pool's shutdown short, so main() returns with its
    workers alive; run() leaves by os._exit, which would orphan them: they are ended."""
    ctx = multiprocessing.get_context("fork")
    worker = ctx.Process(target=time.sleep, args=(60,))
    worker.start()
    try:
        assert cli._flush_outputs(130) == 130
        worker.join(10)
        assert not worker.is_alive()
        assert worker.exitcode == -signal.SIGTERM
    finally:
        if worker.is_alive():
            worker.kill()


def test_a_run_adds_only_its_commands_arguments() -> None:
    # Every command is listed either way; only the one run gets its arguments (argparse
    # makes a help formatter per argument added: most of building the whole parser).
    def arguments(parser: argparse.ArgumentParser) -> dict[str, int]:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {name: len(p._actions) for name, p in sub.choices.items()}

    whole = arguments(cli.build_parser())
    only = arguments(cli.build_parser("patch"))
    assert whole.keys() == only.keys() and only["patch"] == whole["patch"] > 20
    assert all(n == 1 for name, n in only.items() if name != "patch")  # -h alone
    assert cli._command_of(["patch", "x", "-o", "y"]) == "patch"
    assert cli._command_of(["--version"]) is None
    assert cli._command_of(["--", "scan", "x"]) == "scan"


def test_help_width_as_shutil_finds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    for columns in ("", "57", "0", "junk", "300"):
        if columns:
            monkeypatch.setenv("COLUMNS", columns)
        else:
            monkeypatch.delenv("COLUMNS", raising=False)
        assert cli._columns() == shutil.get_terminal_size().columns


@pytest.mark.parametrize("name, ops", [
    ("kernel61.o", "catalog:linux-6.1-x86_64"),  # .parainstructions
    ("kernel612.o", "catalog:linux-6.12-x86_64"),  # .altinstructions (6.8+)
    ("prog", "none"),  # a linked executable
])
def test_a_file_is_freed_by_reference_counting(name: str, ops: str, tmp_path: Path) -> None:
    """A file's scan, plan, coverage, rewrite and reports hold no reference cycle: once
    they go, reference counting frees them and the cyclic collector finds nothing (it
    only traverses them while they live).  A tree of modules is patched one file after
    another in one process; a cycle per file kept each until a collection, which then
    had to find and free it (11 ms for a vmlinux's plan).  (Verification is left out:
    Unicorn's ctypes buffers make array types, which are cycles of ctypes' own, left to
    the collector the CLI keeps running.)"""
    import pvpatch
    from pvpatch.report.stage import patch_json, patch_text, scan_json

    src = FIX / "x86_64" / name
    options = pvpatch.PatchOptions(ops=ops, final=name != "prog", verify=False)

    def once(report: bool) -> None:
        res = pvpatch.patch_file(src, tmp_path / "out", options)
        assert res.ok and res.plan.decisions
        # As `patch` prints it (a kept site's coverage never made), then every site's.
        patch_text(res.rewrite, "out")
        if report:
            patch_json(res.rewrite, "out")
            scan_json(res.scan)

    once(True)  # caches and lazy imports fill once per process
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for report in (False, True):
            once(report)
        assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()


def test_program_ends_without_a_young_collection(tmp_path: Path) -> None:
    """Between main()'s return and the process's exit, the program starts no garbage
    collection (one would traverse every object the command made, for nothing), and it
    still holds the file's result then (os._exit ends it without freeing it)."""
    probe = r"""
import gc, os, sys
import pvpatch.cli as cli
seen = []
gc.callbacks.append(lambda phase, info: phase == "start" and seen.append(info["generation"]))
real_main, real_exit = cli.main, os._exit
def main(*args):
    code = real_main(*args)
    seen.append("returned")
    return code
def exit_(code):
    after = seen[seen.index("returned") + 1:]
    held = [type(r).__name__ for r in cli._held or ()]
    sys.stderr.write(f"\nheld: {held}\nafter main: {after}\n")
    sys.stderr.flush()
    real_exit(code)
cli.main, os._exit = main, exit_
cli.run()
"""
    proc = subprocess.run([sys.executable, "-c", probe, "patch", str(FIX / "x86_64" / "prog"),
                           "-o", str(tmp_path / "out"), "--no-verify"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.rstrip().endswith("held: ['PatchResult']\nafter main: []"), \
        proc.stderr[-500:]


def test_main_holds_nothing(tmp_path: Path) -> None:
    """main() called as a library (not the program) keeps no result after it returns."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["patch", str(FIX / "x86_64" / "prog"), "-o",
                         str(tmp_path / "out"), "--no-verify"]) == 0
    assert cli._held is None
