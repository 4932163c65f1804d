"""Decompression bombs under an address-space limit.

`scan`, `check` and `patch` on a 4 GiB zstd bomb (a small ELF file followed by 4 GiB of
zeros: 130 KB), on a real module followed by 3 GiB of padding (xz, as kbuild writes it),
and on a bomb whose ELF headers claim to reach past the limit (so only the 1 GiB limit stops
it), each in a process limited to 2 GiB of address space: exit 2 and one line naming the
file, in seconds, never a MemoryError or a killed process.

The bombs are made cheaply: zstd at level 1 over zero chunks (1.5 s for 4 GiB), and xz and
the far-reaching zstd frame written block by block (one compressed group of zeros, or one
run-length block, repeated), so the file costs a few seconds, not the minutes compressing
gigabytes would.
"""

from __future__ import annotations

import functools
import io
import lzma
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import corpus
import pytest
from paths import REPO

from pvpatch.elf import compress
from pvpatch.elf.reader import ElfFile

FIX = REPO / "fixtures" / "x86_64"
AS_LIMIT = 2 << 30
GIB = 1 << 30
ZEROS = bytes(16 << 20)


# -- running pvpatch with 2 GiB of address space --------------------------------------


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak: int  # the process's peak resident memory, bytes


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_limited(*args: str, timeout: float = 60.0) -> Run:
    """The command line in a child limited to AS_LIMIT of address space; its own peak
    memory from wait4 (RUSAGE_CHILDREN would mix it with earlier children)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "pvpatch", *args], cwd=REPO,
                                stdout=out, stderr=err, preexec_fn=_limit_address_space)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                pytest.fail(f"pvpatch {' '.join(args)} ran over {timeout} s")
            time.sleep(0.01)
        took = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Run(proc.returncode, out.read().decode(), err.read().decode(), took,
                   usage.ru_maxrss * 1024)


# -- making bombs -------------------------------------------------------------------------


def zstd_bomb(head: bytes, zeros: int) -> bytes:
    """`head` and `zeros` zero bytes, compressed by zstd (level 1, with a checksum) the way
    a stream is: 16 MiB at a time, nothing ever held whole."""
    import zstandard

    sink = io.BytesIO()
    with zstandard.ZstdCompressor(level=1, write_checksum=True).stream_writer(
            sink, closefd=False) as writer:
        writer.write(head)
        for _ in range(zeros // len(ZEROS)):
            writer.write(ZEROS)
        writer.write(bytes(zeros % len(ZEROS)))
    return sink.getvalue()


def zstd_rle_frame(head: bytes, zeros: int) -> bytes:
    """One zstd frame written by hand (RFC 8878): `head` in raw blocks, then `zeros` zero
    bytes in 128 KiB run-length blocks of 4 bytes each; no content size, no checksum."""
    block = 128 << 10
    frame = bytearray(b"\x28\xb5\x2f\xfd\x00" + bytes([(20 - 10) << 3]))  # 1 MiB window
    pieces = [(0, head[at : at + block]) for at in range(0, len(head), block)]
    pieces += [(1, b"\0")] * (zeros // block)
    for n, (kind, data) in enumerate(pieces):
        size = block if kind == 1 else len(data)
        last = n == len(pieces) - 1
        frame += (int(last) | kind << 1 | size << 3).to_bytes(3, "little") + data
    return bytes(frame)


_LZMA2 = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20}]
_GROUP = 4 << 20  # zeros compressed once and repeated


def _lzma2_chunks(raw: bytes) -> list[bytes]:
    """The chunks of a raw LZMA2 stream, without its end marker."""
    at, out = 0, []
    while raw[at]:
        ctrl = raw[at]
        if ctrl in (1, 2):  # uncompressed
            size = 3 + int.from_bytes(raw[at + 1 : at + 3], "big") + 1
        else:
            size = 6 + (ctrl >= 0xC0) + int.from_bytes(raw[at + 3 : at + 5], "big")
        out.append(raw[at : at + size])
        at += size
    assert at == len(raw) - 1
    return out


@functools.cache
def _zero_group() -> bytes:
    """_GROUP zero bytes as LZMA2 chunks that decode the same after any data ending in a
    zero byte at a multiple of 16: the first chunk resets the state but keeps the
    dictionary and the properties (control 0xA0 instead of 0xE0, no properties byte)."""
    chunks = _lzma2_chunks(lzma.compress(bytes(_GROUP), format=lzma.FORMAT_RAW,
                                         filters=_LZMA2))
    first = chunks[0]
    assert first[0] >= 0xE0
    chunks[0] = bytes([0xA0 | first[0] & 0x1F]) + first[1:5] + first[6:]
    return b"".join(chunks)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _crc(data: bytes) -> bytes:
    return struct.pack("<I", zlib.crc32(data))


def padded_xz(module: bytes, padding: int) -> bytes:
    """`module` followed by at least `padding` zero bytes, as one xz stream with the CRC32
    check and a 1 MiB dictionary (kbuild's), written by hand (the .xz file format 1.2.1):
    the module compressed by liblzma, then one compressed group of zeros repeated."""
    head = module + bytes(16 - len(module) % 16)  # ends in a zero, at a multiple of 16
    groups = -(-(padding - (len(head) - len(module))) // _GROUP)
    lzma2 = b"".join(_lzma2_chunks(lzma.compress(head, format=lzma.FORMAT_RAW,
                                                 filters=_LZMA2)))
    lzma2 += _zero_group() * groups + b"\0"
    check = zlib.crc32(head)
    left = groups * _GROUP
    while left:
        check = zlib.crc32(ZEROS[: min(left, len(ZEROS))], check)
        left -= min(left, len(ZEROS))
    # Block header: size, no optional sizes, one filter: LZMA2 (0x21), dictionary 1 MiB.
    block_header = bytes([2, 0, 0x21, 1, 16, 0, 0, 0])
    block_header += _crc(block_header)
    block = block_header + lzma2 + bytes(-len(lzma2) % 4) + struct.pack("<I", check)
    index = b"\0" + _varint(1) + _varint(len(block_header) + len(lzma2) + 4) + \
        _varint(len(head) + groups * _GROUP)
    index += bytes(-len(index) % 4)
    index += _crc(index)
    flags = b"\0\1"  # CRC32
    footer = struct.pack("<I", len(index) // 4 - 1) + flags
    return b"\xfd7zXZ\0" + flags + _crc(flags) + block + index + _crc(footer) + footer + b"YZ"


def reaching_far(module: bytes) -> bytes:
    """`module` with its first section claiming 3 GiB: its headers say the file goes on
    past the 1 GiB limit, so only the limit stops decoding."""
    elf = ElfFile(module)
    at = elf.e_shoff + elf.cls.shdr.size + 32  # section 1's sh_size (ELF64)
    return module[:at] + struct.pack("<Q", 3 * GIB) + module[at + 8 :]


@pytest.fixture(scope="session")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> a bomb file, made once per session."""
    folder = tmp_path_factory.mktemp("bombs")
    small = (FIX / "kernel61.o").read_bytes()
    made = {
        "zstd-4gib.ko.zst": zstd_bomb(small, 4 * GIB),
        "padded-3gib.ko.xz": padded_xz((FIX / "kernel612.o").read_bytes(), 3 * GIB),
        "far-4gib.ko.zst": zstd_rle_frame(reaching_far(small), 4 * GIB),
    }
    out = {}
    for name, data in made.items():
        out[name] = folder / name
        out[name].write_bytes(data)
    return out


# -- the bombs are what they claim ----------------------------------------------------------


def test_bombs_are_small_and_well_formed(bombs: dict[str, Path]) -> None:
    sizes = {name: path.stat().st_size for name, path in bombs.items()}
    assert sizes["zstd-4gib.ko.zst"] < 200_000 and sizes["far-4gib.ko.zst"] < 200_000
    assert sizes["padded-3gib.ko.xz"] < 1_000_000
    # xz reads the sizes from the index without decoding: the module and 3 GiB.
    listing = subprocess.run(["xz", "--robot", "-l", str(bombs["padded-3gib.ko.xz"])],
                             capture_output=True, text=True, check=True).stdout
    fields = next(line.split("\t") for line in listing.splitlines()
                  if line.startswith("file"))
    module = (FIX / "kernel612.o").stat().st_size
    assert 3 * GIB + module <= int(fields[4]) < 3 * GIB + module + _GROUP
    assert fields[6] == "CRC32"


def test_handmade_streams_are_what_the_tools_decode(tmp_path: Path) -> None:
    """The same constructions, small enough to decode whole: the real xz and zstd give the
    module and the zeros back, and so does pvpatch (under its limits)."""
    module = (FIX / "kernel612.o").read_bytes()
    xz = tmp_path / "padded.ko.xz"
    xz.write_bytes(padded_xz(module, 2 * _GROUP))
    plain = subprocess.run(["xz", "-dc", str(xz)], capture_output=True, check=True).stdout
    assert plain.startswith(module) and len(plain) >= len(module) + 2 * _GROUP
    assert not plain[len(module) :].strip(b"\0")
    zst = tmp_path / "rle.ko.zst"
    zst.write_bytes(zstd_rle_frame(module, 8 << 20))
    plain = subprocess.run(["zstd", "-dc", str(zst)], capture_output=True, check=True).stdout
    assert plain == module + bytes(8 << 20)
    assert ElfFile.open(zst).data == plain
    assert ElfFile.open(xz).data == subprocess.run(
        ["xz", "-dc", str(xz)], capture_output=True, check=True).stdout


# -- scan, check, patch ----------------------------------------------------------------------

# bomb -> what its one line says, and the most memory it may take
EXPECT = {
    "zstd-4gib.ko.zst": ("goes on more than 16 MiB past the end of the ELF file", 256 << 20),
    "padded-3gib.ko.xz": ("goes on more than 16 MiB past the end of the ELF file", 256 << 20),
    # Decoded up to the limit: memory proportional to it, still under the 2 GiB.
    "far-4gib.ko.zst": ("decompresses to more than 1 GiB (the limit", AS_LIMIT),
}


@pytest.mark.parametrize("command", ["scan", "check", "patch"])
@pytest.mark.parametrize("name", sorted(EXPECT))
def test_bomb_is_one_line_in_seconds(bombs: dict[str, Path], tmp_path: Path, name: str,
                                     command: str) -> None:
    path = bombs[name]
    text, memory = EXPECT[name]
    out = tmp_path / "out" / name
    out.parent.mkdir()
    argv = [command, str(path), "--ops", "catalog:linux-6.1-x86_64"]
    if command == "patch":
        argv += ["-o", str(out)]
    run = run_limited(*argv)
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"pvpatch: error: {path}: ") and text in lines[0], lines[0]
    assert run.seconds < 15, run.seconds
    assert run.peak < memory, run.peak
    assert list(out.parent.iterdir()) == []  # nothing written, not even a temporary file


def test_tree_with_bombs(bombs: dict[str, Path], tmp_path: Path) -> None:
    """In a tree, each bomb is its own line and the good module is still patched, with
    two workers sharing the 2 GiB (verification is left out: the emulator reserves a
    translation buffer larger than this limit leaves)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("zstd-4gib.ko.zst", "padded-3gib.ko.xz"):
        shutil.copyfile(bombs[name], tree / name)
    good = tree / "good.ko.xz"
    good.write_bytes(compress.compress((FIX / "kernel61.o").read_bytes(), "xz"))
    out = tmp_path / "out"
    run = run_limited("patch", str(tree), "-o", str(out), "--ops",
                      "catalog:linux-6.1-x86_64", "--no-verify", "--jobs", "2")
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert sorted(errors) == sorted(
        f"pvpatch: error: {tree / name}: {compress.BY_NAME[kind].name}-compressed data "
        "goes on more than 16 MiB past the end of the ELF file it holds (its headers end "
        f"it at byte {end})"
        for name, kind, end in (("zstd-4gib.ko.zst", "zstd", _elf_size("kernel61.o")),
                                ("padded-3gib.ko.xz", "xz", _elf_size("kernel612.o")))), \
        run.stderr
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["good.ko.xz"]
    assert run.seconds < 15 and run.peak < 512 << 20, (run.seconds, run.peak)


def _elf_size(name: str) -> int:
    return (FIX / name).stat().st_size


@pytest.mark.corpus
def test_debian_module_padded_with_3gib(tmp_path: Path) -> None:
    """A shipped 6.12 module followed by 3 GiB of padding, in kbuild's xz."""
    by_name = {p.name: p for p in corpus.x86_64_612_modules()}
    shipped = by_name["vsock_diag.ko.xz"]
    payload = ElfFile.open(shipped).data
    path = tmp_path / "vsock_diag.ko.xz"
    path.write_bytes(padded_xz(bytes(payload), 3 * GIB))
    for command in ("scan", "check"):
        run = run_limited(command, str(path))
        assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr
        assert "goes on more than 16 MiB past the end" in run.stderr
        assert run.seconds < 15 and run.peak < 256 << 20, (run.seconds, run.peak)
