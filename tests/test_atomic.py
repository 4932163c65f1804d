"""Output files appear whole or not at all, whatever happens to pvpatch while it writes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SITES = 5_000
DATA_MB = 120  # a large output, so that kills land while it is written


def make_big_object(path: Path) -> None:
    lines = [".text", ".globl f", "f:"]
    for i in range(SITES):
        t = (30, 31, 32, 0)[i % 4]
        lines.append(f"771: call *pv_ops+{t * 8}(%rip)\n772:\n"
                     ' .pushsection .parainstructions,"a"\n'
                     f" .balign 8\n .quad 771b\n .byte {t}\n .byte 772b-771b\n"
                     f" .short {0x1 if t else 0x1ff}\n .balign 8\n .popsection\n nop")
    lines += ["ret", ".data", f".fill {DATA_MB * 1024 * 1024 // 8}, 8, 0x1122334455667788"]
    src = path.with_suffix(".s")
    src.write_text("\n".join(lines) + "\n")
    subprocess.run(["as", "--64", "-o", str(path), str(src)], check=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def patch_cmd(src: Path, dst: Path) -> list[str]:
    return [sys.executable, "-m", "pvpatch", "patch", str(src), "-o", str(dst), "--no-verify",
            "--ops", "catalog:linux-6.1-x86_64"]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    folder = tmp_path_factory.mktemp("big")
    src = folder / "big.o"
    make_big_object(src)
    ref = folder / "reference.o"
    start = time.perf_counter()
    subprocess.run(patch_cmd(src, ref), check=True, cwd=REPO, capture_output=True)
    return src, digest(ref), time.perf_counter() - start


def test_sigkill_leaves_old_or_complete_file(big: tuple[Path, str, float],
                                             tmp_path: Path) -> None:
    src, new_digest, duration = big
    dst = tmp_path / "out.o"
    old = b"the previous output\n"
    outcomes = []
    # Kill times spread over the run, most of them late, where the output is written.
    fractions = [0.3, 0.5, 0.65, 0.75, 0.8, 0.85, 0.9, 0.93, 0.96, 0.99, 1.02, 1.1]
    for frac in fractions:
        dst.write_bytes(old)
        proc = subprocess.Popen(patch_cmd(src, dst), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(duration * frac)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        content = dst.read_bytes()
        if content == old:
            outcomes.append("old")
        else:
            assert hashlib.sha256(content).hexdigest() == new_digest, \
                f"partial output after a kill at {frac:.2f} of the run"
            outcomes.append("new")
        for leftover in tmp_path.glob(".out.o.*.pvpatch-tmp"):
            leftover.unlink()  # SIGKILL leaves no chance to clean up; never the destination
    assert set(outcomes) <= {"old", "new"}
    assert "old" in outcomes  # the early kills found the previous file intact


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_cleans_up(big: tuple[Path, str, float], tmp_path: Path, sig: int) -> None:
    src, new_digest, duration = big
    dst = tmp_path / "out.o"
    for frac in (0.5, 0.8, 0.9, 0.97):
        dst.write_bytes(b"previous")
        proc = subprocess.Popen(patch_cmd(src, dst), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(duration * frac)
        proc.send_signal(sig)
        _, err = proc.communicate()
        content = dst.read_bytes()
        # The signal may land after the rename (then the new file is complete) or
        # before it (then the previous file is untouched): never anything else.
        assert content == b"previous" or hashlib.sha256(content).hexdigest() == new_digest
        if proc.returncode != 0:
            assert "Traceback" not in err and err.count("\n") <= 1, err
        # a caught signal removes the temporary file
        assert not list(tmp_path.glob("*.pvpatch-tmp")), os.listdir(tmp_path)
