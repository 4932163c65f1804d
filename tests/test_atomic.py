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
from paths import REPO

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
    # Late ones too: a signal after the output is in place must not end in a traceback.
    for frac in (0.5, 0.8, 0.9, 0.97, 1.0, 1.03, 1.06):
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
            # One line of error at most, besides the warning summary a finished run prints
            # (a signal may land after it, when the output is already in place).
            errors = [line for line in err.splitlines() if "warning(s) about" not in line]
            assert "Traceback" not in err and len(errors) <= 1, err
            assert proc.returncode in (130, -sig), (proc.returncode, err)
        # a caught signal removes the temporary file
        assert not list(tmp_path.glob("*.pvpatch-tmp")), os.listdir(tmp_path)


# -- prepared outputs: the input copied ahead, on another thread ----------------------

FIXTURES = REPO / "fixtures" / "x86_64"
SPEC = REPO / "fixtures" / "specs" / "prog.toml"


def _rewrite(src: Path, backend: str = "native"):  # type: ignore[no-untyped-def]
    import pvpatch

    return pvpatch.apply_plan(pvpatch.make_plan(
        pvpatch.load(src, ops="catalog:linux-6.1-x86_64"), backend))


def _with_edits(data: bytes, edits: tuple[tuple[int, bytes], ...]) -> bytes:
    """The expected output, computed here rather than by pvpatch's writer."""
    out = bytearray(data)
    for offset, new in edits:
        out[offset : offset + len(new)] = new
    return bytes(out)


@pytest.mark.parametrize(("name", "backend"), [
    ("prog", "native"),  # linked, edits in place
    ("prog-pie", "native"),
    ("prog", str(SPEC)),  # linked, thunks in a new segment: a new image
    ("kernel61.o", "native"),  # relocatable: a new image, no copy ahead
])
def test_prepared_output_equals_plain_write(tmp_path: Path, name: str, backend: str) -> None:
    import pvpatch

    src = FIXTURES / name
    plain, prepared = tmp_path / "plain", tmp_path / "prepared"
    pvpatch.write_output(_rewrite(src, backend), plain)
    with pvpatch.prepare_output(src, prepared) as out:
        rw = _rewrite(src, backend)
        if backend != "native":
            assert rw.image is not None  # thunks: a new segment, so a new image
        pvpatch.write_output(rw, out)
    assert prepared.read_bytes() == plain.read_bytes() != src.read_bytes()
    assert os.stat(prepared).st_mode == os.stat(src).st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "prepared"]


def test_prepared_output_when_the_input_changed_meanwhile(tmp_path: Path) -> None:
    """The copy taken ahead is from the old file: the output must be made from the file
    the plan was made from, not from the bytes copied ahead."""
    import pvpatch

    src = tmp_path / "prog"
    src.write_bytes((FIXTURES / "prog").read_bytes())
    out_path = tmp_path / "out"
    with pvpatch.prepare_output(src, out_path) as out:
        out.wait()  # the old file is copied
        changed = bytearray(src.read_bytes())
        changed[-1] ^= 0xFF  # the section header string table's last byte: still valid
        (tmp_path / "new").write_bytes(changed)
        os.replace(tmp_path / "new", src)  # a new file under the same name
        pvpatch.write_output(_rewrite(src), out)
    assert out_path.read_bytes() == _with_edits(bytes(changed), _rewrite(src).edits)


def test_prepared_output_left_uncommitted_leaves_nothing(tmp_path: Path) -> None:
    import pvpatch

    dst = tmp_path / "out"
    with pytest.raises(RuntimeError), pvpatch.prepare_output(FIXTURES / "prog", dst):
        raise RuntimeError("the plan failed")
    assert list(tmp_path.iterdir()) == []
    dst.write_bytes(b"previous")
    with pvpatch.prepare_output(FIXTURES / "prog", dst):
        pass
    assert dst.read_bytes() == b"previous" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("broken", [(), ("copy_file_range",), ("copy_file_range", "sendfile")])
def test_copy_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         broken: tuple[str, ...]) -> None:
    """Where the kernel cannot copy between the files, the next way is taken, down to
    writing the loaded bytes; the output is the same every time."""
    import pvpatch

    def refuse(*_args: object) -> int:
        raise OSError(18, "Invalid cross-device link")

    for name in broken:
        monkeypatch.setattr(os, name, refuse)
    src = FIXTURES / "prog-pie"
    rw = _rewrite(src)
    with pvpatch.prepare_output(src, tmp_path / "ahead") as out:
        pvpatch.write_output(rw, out)
    pvpatch.write_output(rw, tmp_path / "plain")
    expected = _with_edits(src.read_bytes(), rw.edits)
    assert (tmp_path / "ahead").read_bytes() == (tmp_path / "plain").read_bytes() == expected


def test_sigterm_while_prepared_removes_the_file(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    code = ("import os, signal, time, pvpatch\n"
            f"with pvpatch.prepare_output({str(FIXTURES / 'prog')!r}, {str(dst)!r}):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_input_rewritten_in_place_is_refused(tmp_path: Path) -> None:
    """A mapped input changed in place after it was loaded no longer holds what the plan
    was made from: nothing is written, in one clear error."""
    import pvpatch

    src = tmp_path / "prog"
    src.write_bytes((FIXTURES / "prog").read_bytes())
    rw = _rewrite(src)
    with open(src, "r+b") as fh:  # same inode, new contents (as `cp other prog` would)
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse clocks
    with pytest.raises(pvpatch.OutputError, match="changed while pvpatch was running"):
        pvpatch.write_output(rw, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prog"]


def test_failed_sendfile_leaves_no_hole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel copy that fails half-way is started over from offset 0 by the next way."""
    import pvpatch

    real_sendfile = os.sendfile

    def refuse(*_args: object) -> int:
        raise OSError(18, "Invalid cross-device link")

    def half_then_fail(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        if offset == 0:
            return real_sendfile(out_fd, in_fd, 0, min(count, 4096))
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(os, "sendfile", half_then_fail)
    src = FIXTURES / "prog-pie"
    rw = _rewrite(src)
    pvpatch.write_output(rw, tmp_path / "out")
    monkeypatch.delattr(os, "copy_file_range")  # not every system has it
    pvpatch.write_output(rw, tmp_path / "out2")
    expected = _with_edits(src.read_bytes(), rw.edits)
    assert (tmp_path / "out").read_bytes() == (tmp_path / "out2").read_bytes() == expected


def test_pipe_input_is_patched(tmp_path: Path) -> None:
    """A FIFO (or `<(...)`) is read once, by the load: nothing peeks at it first."""
    import threading

    fifo = tmp_path / "in"
    os.mkfifo(fifo)
    data = (FIXTURES / "prog").read_bytes()
    writer = threading.Thread(target=lambda: fifo.write_bytes(data), daemon=True)
    writer.start()
    out = tmp_path / "out"
    proc = subprocess.run(patch_cmd(fifo, out), cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    writer.join(5)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == _rewrite(FIXTURES / "prog").data


def test_output_folder_missing_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(patch_cmd(FIXTURES / "prog", tmp_path / "no" / "such" / "out"),
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cannot write here" in proc.stderr, proc.stderr


def test_outputs_closed_out_of_order_restore_sigterm(tmp_path: Path) -> None:
    import pvpatch

    before = signal.getsignal(signal.SIGTERM)
    a = pvpatch.prepare_output(FIXTURES / "prog", tmp_path / "a")
    b = pvpatch.prepare_output(FIXTURES / "prog", tmp_path / "b")
    assert signal.getsignal(signal.SIGTERM) is not before
    a.discard()
    assert signal.getsignal(signal.SIGTERM) is not before  # b is still open
    b.discard()
    assert signal.getsignal(signal.SIGTERM) is before
    assert list(tmp_path.iterdir()) == []


def test_temporary_output_file_is_private_and_new(tmp_path: Path) -> None:
    # As tempfile.mkstemp makes it: beside the destination, mode 0600 while it is written,
    # a fresh name each time, gone when left without a commit.
    from pvpatch.rewrite.output import OutputFile

    dst = tmp_path / "out.o"
    with OutputFile(dst) as one, OutputFile(dst) as two:
        for out in (one, two):
            tmp = Path(out.tmp)
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.o.")
            assert tmp.name.endswith(".pvpatch-tmp")
            assert os.stat(tmp).st_mode & 0o777 == 0o600
        assert one.tmp != two.tmp
    assert list(tmp_path.iterdir()) == []
    # A committed output gets the usual mode, not the temporary file's.
    with OutputFile(dst) as out:
        out.commit_image(b"data")
    assert dst.read_bytes() == b"data" and os.stat(dst).st_mode & 0o777 == 0o644


def test_path_text_is_what_pathlib_says() -> None:
    # Paths are written as str(pathlib.Path(p)) says them, without importing pathlib: every
    # string of up to seven characters from "/", "." and "a", and a few longer ones.
    import itertools
    from pathlib import PurePosixPath

    from pvpatch.elf.reader import path_text

    texts = ["", "a/../b", "./a//b/./", "//a//", "///a", "/..", "a/.b/c.", " /a", "a b/"]
    for n in range(8):
        texts += ["".join(p) for p in itertools.product("/.a", repeat=n)]
    for text in texts:
        assert path_text(text) == str(PurePosixPath(text)), text
    assert path_text(PurePosixPath("x//y/")) == "x/y"
    with pytest.raises(TypeError):
        PurePosixPath(b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not 'bytes'"):
        path_text(b"x")  # type: ignore[arg-type]


def test_output_and_input_names_as_pathlib_says_them(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from pvpatch.elf.reader import ElfFile
    from pvpatch.rewrite.output import OutputFile

    src = REPO / "fixtures" / "x86_64" / "prog.o"
    odd = f"{src.parent}//./{src.name}"
    assert ElfFile.open(odd).path == str(Path(odd)) == str(src)
    monkeypatch.chdir(tmp_path)
    for dst in ("out.o", f"{tmp_path}//sub/../out.o", "./out.o"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with OutputFile(dst) as out:
            assert out.path == str(Path(dst)) and out.dst == Path(dst)
            assert Path(out.tmp).parent == Path(dst).parent.resolve()
            out.commit_image(b"x")
        assert Path(dst).read_bytes() == b"x"
