"""Whole trees: walking, stable order over a process pool, patch DIR -o OUTDIR, progress."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from clirun import pvpatch_cli as run
from paths import FIX, REPO

from pvpatch.batch import InputFile, expand, run_ordered

OPS = "catalog:linux-6.1-x86_64"


def _slow_square(n: int) -> int:
    # Later items finish first, so completion order is the reverse of input order.
    time.sleep(0.002 * (40 - n))
    return n * n


def test_run_ordered_keeps_input_order() -> None:
    items = list(range(40))
    seen: list[int] = []
    out = list(run_ordered(_slow_square, items, jobs=4, on_done=lambda n, _: seen.append(n)))
    assert out == [n * n for n in items]
    assert sum(seen) == len(items)
    assert list(run_ordered(_slow_square, items[:2], jobs=4)) == [0, 1]  # in-process


def test_expand_walks_sorted_and_skips_links(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.o").write_bytes(b"\x7fELF")
    (tmp_path / "a.o").write_bytes(b"\x7fELF")
    (tmp_path / "link.o").symlink_to(tmp_path / "a.o")
    inputs = expand([str(tmp_path), str(tmp_path / "named.o")])
    assert [f.rel for f in inputs.files] == ["a.o", os.path.join("b", "z.o"), "named.o"]
    assert inputs.files[-1] == InputFile(str(tmp_path / "named.o"), walked=False,
                                         rel="named.o")
    assert inputs.tree and not inputs.problems


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    for sub, name in [("x86_64", "kernel61.o"), ("x86_64", "seed.o"), ("x86_64", "prog.o"),
                      ("x86_64", "plain.o"), ("x86_64", "notelf.txt"),
                      ("i386", "kernel61.o")]:
        (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(FIX / sub / name, root / sub / name)
    return root


def test_scan_tree_matches_file_by_file(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    proc = run("scan", "--json", "-j", "2", str(root))
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout)["files"]
    names = [os.path.relpath(f["path"], root) for f in files]
    assert names == ["i386/kernel61.o", "x86_64/kernel61.o", "x86_64/plain.o",
                     "x86_64/prog.o", "x86_64/seed.o"]
    one = json.loads(run("scan", "--json", str(root / "x86_64" / "seed.o")).stdout)["files"]
    assert files[-1] == one[0]
    assert proc.stderr.splitlines()[-1].startswith("pvpatch scan: 5 ELF files")
    assert "\r" not in proc.stderr  # no bar when not a terminal


def test_patch_tree_mirrors(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    out = tmp_path / "out"
    proc = run("patch", str(root), "-o", str(out), "--json", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["i386/kernel61.o", "x86_64/kernel61.o", "x86_64/plain.o",
                       "x86_64/prog.o", "x86_64/seed.o"]
    assert doc["summary"]["files"] == 5 and doc["summary"]["written"] == 5
    single = tmp_path / "single.o"
    assert run("patch", str(root / "x86_64" / "seed.o"), "-o", str(single),
               "--no-verify").returncode == 0
    assert (out / "x86_64" / "seed.o").read_bytes() == single.read_bytes()
    assert (out / "x86_64" / "plain.o").read_bytes() == (FIX / "x86_64" / "plain.o").read_bytes()
    # output inside the input is refused; so is the input itself without --in-place
    assert run("patch", str(root), "-o", str(root / "o")).returncode == 2
    proc = run("patch", str(root), "-o", str(root))
    assert proc.returncode == 2 and "--in-place" in proc.stderr


def test_patch_tree_verifies(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(FIX / "x86_64" / "kernel61.o", root / "k.o")
    shutil.copy(FIX / "x86_64" / "seed.o", root / "s.o")
    shutil.copy(FIX / "x86_64" / "legacy.o", root / "l.o")
    proc = run("patch", str(root), "-o", str(tmp_path / "out"), "--ops", OPS)
    assert proc.returncode == 0, proc.stderr
    assert "0 failed verification" in proc.stdout.splitlines()[-1]
    # One pipeline (pvpatch.patch_file) for a file alone and a file of a tree: the same
    # report, the same verify line, the same output bytes.
    single = tmp_path / "single.o"
    alone = run("patch", str(root / "k.o"), "-o", str(single), "--ops", OPS)
    assert alone.returncode == 0, alone.stderr
    body = alone.stdout.replace(str(root / "k.o"), "K").replace(str(single), "OUT")
    tree = proc.stdout.replace(str(root / "k.o"), "K").replace(str(tmp_path / "out" / "k.o"),
                                                               "OUT")
    assert "  verify: sites" in body and body in tree
    assert (tmp_path / "out" / "k.o").read_bytes() == single.read_bytes()


def _pty_run(args: list[str]) -> tuple[int, str]:
    """Run pvpatch with stderr (and stdout) on a pseudo-terminal; return all it wrote."""
    master, slave = pty.openpty()
    # A real terminal has a size; a fresh pseudo-terminal reports 0x0 until told.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "pvpatch", *args], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("command", ["check", "scan"])
def test_progress_bar_on_a_terminal_only(command: str, tmp_path: Path) -> None:
    root = _tree(tmp_path)
    status, text = _pty_run([command, "-j", "2", str(root)])
    assert status == 0, text
    assert f"{command}:" in text and "6/6" in text, text
    assert "file" in text
    proc = run(command, "-j", "2", str(root))
    assert "6/6" not in proc.stderr and "\r" not in proc.stderr
    # forced off on a terminal, forced on through a pipe
    status, text = _pty_run([command, "--no-progress", str(root)])
    assert "6/6" not in text
    proc = run(command, "--progress", "-j", "2", str(root))
    assert "6/6" in proc.stderr
