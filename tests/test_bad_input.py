"""Bad input: one clear line on stderr naming the file, exit status 2, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from clirun import pvpatch_cli as run
from paths import FIX

GOOD = FIX / "x86_64" / "kernel61.o"


def assert_one_line_error(proc: subprocess.CompletedProcess[str], path: str, words: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert path in lines[0], lines[0]
    assert words in lines[0], lines[0]


def mutated(tmp_path: Path, name: str, edit: object, src: Path = GOOD) -> Path:
    data = bytearray(src.read_bytes())
    edit(data)  # type: ignore[operator]
    out = tmp_path / name
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("command", [["scan"], ["patch", "-o", "/tmp/pvpatch-never"]])
def test_missing_file(command: list[str], tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.o")
    if command[0] == "patch":
        proc = run("patch", missing, "-o", str(tmp_path / "out.o"))
    else:
        proc = run("scan", missing)
    assert_one_line_error(proc, missing, "no such file")


def test_not_elf() -> None:
    path = str(FIX / "x86_64" / "notelf.txt")
    assert_one_line_error(run("scan", path), path, "not an ELF file")


def test_directory(tmp_path: Path) -> None:
    assert_one_line_error(run("scan", str(tmp_path)), str(tmp_path), "is a directory")


def test_other_machine(tmp_path: Path) -> None:
    path = mutated(tmp_path, "arm.o", lambda d: struct.pack_into("<H", d, 18, 40))  # EM_ARM
    assert_one_line_error(run("scan", str(path)), str(path), "unsupported machine 40")


def test_big_endian(tmp_path: Path) -> None:
    path = mutated(tmp_path, "be.o", lambda d: d.__setitem__(5, 2))
    assert_one_line_error(run("scan", str(path)), str(path), "big-endian")


@pytest.mark.parametrize("cut", [3, 20, 63, 200, 1000, -1])
def test_truncated(cut: int, tmp_path: Path) -> None:
    data = GOOD.read_bytes()
    keep = data[:cut] if cut >= 0 else data[: len(data) - 100]
    path = tmp_path / "cut.o"
    path.write_bytes(keep)
    proc = run("scan", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(path) in proc.stderr


def test_section_header_claims_huge_size(tmp_path: Path) -> None:
    def edit(d: bytearray) -> None:
        shoff = struct.unpack_from("<Q", d, 0x28)[0]
        struct.pack_into("<Q", d, shoff + 64 + 32, 1 << 40)  # section 1 sh_size: 1 TiB

    path = mutated(tmp_path, "huge.o", edit)
    assert_one_line_error(run("scan", str(path)), str(path), "past the end of the file")


def test_several_files_one_bad(tmp_path: Path) -> None:
    bad = str(FIX / "x86_64" / "notelf.txt")
    proc = run("scan", "--json", str(GOOD), bad, str(FIX / "i386" / "kernel61.o"))
    assert proc.returncode == 2
    assert "notelf.txt: not an ELF file" in proc.stderr
    files = json.loads(proc.stdout)["files"]
    assert [Path(f["path"]).name for f in files] == ["kernel61.o", "kernel61.o"]


def test_debug_shows_traceback_only_when_asked(tmp_path: Path) -> None:
    bad_spec = tmp_path / "spec.toml"
    bad_spec.write_text("[ops.\"irq.save_fl\"]\naction = \"fly\"\n")
    proc = run("patch", str(GOOD), "-o", str(tmp_path / "o.o"), "--backend", str(bad_spec))
    assert_one_line_error(proc, str(bad_spec), "action must be one of")
    assert f"{bad_spec}:1" in proc.stderr
    assert not (tmp_path / "o.o").exists()


def test_unknown_layout_and_ops_source() -> None:
    proc = run("scan", "--layout", "nosuch", str(GOOD))
    assert proc.returncode == 2 and "unknown layout" in proc.stderr
    proc = run("scan", "--ops", "bogus", str(GOOD))
    assert proc.returncode == 2 and "bad --ops" in proc.stderr
    proc = run("scan", "--ops", "btf:" + str(GOOD), str(GOOD))
    assert proc.returncode == 2 and "no .BTF section" in proc.stderr


def test_usage_error_exit_2() -> None:
    proc = run("patch", str(GOOD))  # no -o
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_output_equal_to_input_refused(tmp_path: Path) -> None:
    copy = tmp_path / "k.o"
    shutil.copy(GOOD, copy)
    before = copy.read_bytes()
    proc = run("patch", str(copy), "-o", str(copy))
    assert proc.returncode == 2 and "--in-place" in proc.stderr
    assert copy.read_bytes() == before
    proc = run("patch", str(copy), "-o", str(copy), "--in-place", "--ops",
               "catalog:linux-6.1-x86_64")
    assert proc.returncode == 0, proc.stderr
    assert copy.read_bytes() != before


def test_input_never_modified_and_no_temp_left(tmp_path: Path) -> None:
    src = tmp_path / "in.o"
    shutil.copy(GOOD, src)
    os.chmod(src, 0o444)
    before = src.read_bytes()
    out = tmp_path / "out" / "o.o"
    out.parent.mkdir()
    proc = run("patch", str(src), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert src.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.o"]


def test_failed_patch_leaves_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "o.o"
    out.write_bytes(b"old contents")
    bad_spec = tmp_path / "spec.toml"
    bad_spec.write_text("arch = \"i386\"\n")
    proc = run("patch", str(GOOD), "-o", str(out), "--backend", str(bad_spec))
    assert proc.returncode == 2 and "i386" in proc.stderr
    assert out.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.o", "spec.toml"]
