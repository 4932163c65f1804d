"""Compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`): read and written transparently.

Inputs are made with the real tools, the way kbuild makes them (scripts/Makefile.modinst),
from committed fixtures and from Debian's 6.12 modules; outputs are checked with the same
tools (`xz -t`, `xz --robot -lvv`, `gzip -t`, `zstd -t`) and against patching the plain file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import corpus
import pytest
from clirun import pvpatch_cli as run
from paths import REPO

import pvpatch
from pvpatch.elf import compress
from pvpatch.elf.reader import MODULE_SIG_MAGIC, ElfFile
from pvpatch.errors import InputError, OutputError

FIX = REPO / "fixtures" / "x86_64"
OPS = ["--ops", "catalog:linux-6.1-x86_64"]
MODULE = FIX / "kernel61.o"


# -- making compressed files with the real tools ----------------------------------------

def _tool(*argv: str) -> Callable[[bytes], bytes]:
    def pack(data: bytes) -> bytes:
        return subprocess.run(argv, input=data, capture_output=True, check=True).stdout
    return pack


# name -> (file suffix, compress as kbuild does, the tool that tests (-t) and decompresses (-dc))
TOOLS = {
    "xz": (".xz", _tool("xz", "--check=crc32", "--lzma2=dict=1MiB", "-c"), "xz"),
    "gzip": (".gz", _tool("gzip", "-n", "-c"), "gzip"),
    "zstd": (".zst", _tool("zstd", "-q", "-c"), "zstd"),
}
FORMATS = list(TOOLS)


@pytest.fixture(scope="module", autouse=True)
def _tools_present() -> None:
    missing = [t for t in ("xz", "gzip", "zstd") if shutil.which(t) is None]
    if missing:  # scripts/setup --test installs them (xz-utils, gzip, zstd)
        pytest.fail(f"missing tools {missing}: run scripts/setup --test")


def packed(tmp: Path, src: Path, fmt: str, name: str | None = None) -> Path:
    suffix, pack, _ = TOOLS[fmt]
    out = tmp / (name or src.name.replace(".o", ".ko") + suffix)
    out.write_bytes(pack(src.read_bytes()))
    return out


def unpacked(path: Path, fmt: str) -> bytes:
    return subprocess.run([TOOLS[fmt][2], "-dc", str(path)], capture_output=True,
                          check=True).stdout


def tool_test(path: Path, fmt: str) -> None:
    proc = subprocess.run([TOOLS[fmt][2], "-t", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def container_of(data: bytes) -> str | None:
    found = compress.detect(data)
    return None if found is None else found.name


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(proc: subprocess.CompletedProcess[str], path: Path, text: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and text in lines[0], lines[0]


def scan_json(path: Path, ops: list[str] = OPS) -> Any:
    """`scan --json` of one file, its path left out."""
    proc = run("scan", str(path), "--json", *ops)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    for f in doc["files"]:
        del f["path"]
    return doc


def patch_plain(tmp: Path, src: Path, *extra: str) -> bytes:
    out = tmp / ("plain-" + src.name + ".out")
    proc = run("patch", str(src), "-o", str(out), *OPS, *extra)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


# -- the library -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_by_magic_not_name(tmp_path: Path, fmt: str) -> None:
    data = packed(tmp_path, MODULE, fmt).read_bytes()
    assert container_of(data) == fmt
    assert compress.detect(MODULE.read_bytes()) is None
    # Named .ko.gz, holding xz: read as what it is.
    odd = tmp_path / "odd.ko.gz"
    odd.write_bytes(TOOLS["xz"][1](MODULE.read_bytes()))
    assert ElfFile.open(odd).compression == "xz"
    # Named .ko.xz, holding a plain ELF file: plain.
    plain = tmp_path / "plain.ko.xz"
    plain.write_bytes(MODULE.read_bytes())
    assert ElfFile.open(plain).compression is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_decompress_equals_the_tool(tmp_path: Path, fmt: str) -> None:
    """A payload over several blocks of every kind (compressed, raw and run-length) and
    over several decoder chunks, against the tool's own -dc."""
    payload = MODULE.read_bytes() + bytes(3 << 20) + os.urandom(1 << 20) + b"end"
    src = tmp_path / "big.o"
    src.write_bytes(payload)
    path = packed(tmp_path, src, fmt)
    elf = ElfFile.open(path)
    assert elf.compression == fmt and elf.data == payload == unpacked(path, fmt)
    # The stream's end is found exactly: one byte more is data after it.
    longer = tmp_path / ("longer" + TOOLS[fmt][0])
    longer.write_bytes(path.read_bytes() + b"!")
    with pytest.raises(InputError, match=f"data after the end of the {fmt} "):
        ElfFile.open(longer)


@pytest.mark.parametrize("fmt", FORMATS)
def test_limit_is_exact(tmp_path: Path, fmt: str) -> None:
    path = packed(tmp_path, MODULE, fmt)
    size = MODULE.stat().st_size
    assert len(ElfFile.open(path, max_decompressed=size).data) == size
    with pytest.raises(InputError, match=f"{fmt}-compressed data decompresses to more than "
                                         f"{size - 1} bytes"):
        ElfFile.open(path, max_decompressed=size - 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_compress_is_deterministic(tmp_path: Path, fmt: str) -> None:
    data = MODULE.read_bytes()
    ours = compress.compress(data, fmt)
    assert ours == compress.compress(data, fmt)
    path = tmp_path / ("x" + TOOLS[fmt][0])
    path.write_bytes(ours)
    tool_test(path, fmt)
    assert unpacked(path, fmt) == data


def test_xz_is_the_xz_tools_bytes() -> None:
    """liblzma is the xz tool's library: with kbuild's options the bytes are the tool's
    (gzip and zstd outputs may differ from their tools', whose code is their own)."""
    data = MODULE.read_bytes() + bytes(1 << 20) + FIX.joinpath("prog").read_bytes()
    assert compress.compress(data, "xz") == TOOLS["xz"][1](data)


def test_size_option_values() -> None:
    assert compress.parse_size("1048576") == 1 << 20
    assert compress.parse_size("512K") == 512 << 10
    assert compress.parse_size("64MiB") == 64 << 20
    assert compress.parse_size("1g") == compress.MAX_DECOMPRESSED
    for bad in ("", "0", "1.5G", "12 parsecs", "-1"):
        with pytest.raises(ValueError):
            compress.parse_size(bad)


# -- scan, check, patch, verify through the command line --------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_scan_and_check_read_through(tmp_path: Path, fmt: str) -> None:
    plain = tmp_path / "kernel61.ko"
    shutil.copyfile(MODULE, plain)
    path = packed(tmp_path, MODULE, fmt)
    got = scan_json(path)
    assert got == scan_json(plain) and got["files"][0]["sites"]
    for cmd in ("scan", "check"):  # the text forms, too (less the summary's timing)
        a, b = run(cmd, str(plain), *OPS), run(cmd, str(path), *OPS)
        assert a.returncode == b.returncode
        assert _text(a, plain) == _text(b, path) and str(path) in b.stdout + b.stderr
    # The library entry point, too.
    assert [s.offset for s in pvpatch.load(path, ops=OPS[1]).sites] == \
        [s.offset for s in pvpatch.load(plain, ops=OPS[1]).sites]


def _text(proc: subprocess.CompletedProcess[str], path: Path) -> list[str]:
    lines = (proc.stdout + proc.stderr).replace(str(path), "FILE").splitlines()
    return [line for line in lines if not line.startswith("pvpatch check:")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_patch_writes_the_same_container(tmp_path: Path, fmt: str) -> None:
    path = packed(tmp_path, MODULE, fmt)
    before = digest(path)
    out = tmp_path / ("out.ko" + TOOLS[fmt][0])
    proc = run("patch", str(path), "-o", str(out), *OPS)
    assert proc.returncode == 0, proc.stderr
    assert digest(path) == before  # the input is never modified
    assert container_of(out.read_bytes()) == fmt
    tool_test(out, fmt)
    assert unpacked(out, fmt) == patch_plain(tmp_path, MODULE)
    # Deterministic: a second run gives the same bytes.
    again = tmp_path / ("again.ko" + TOOLS[fmt][0])
    assert run("patch", str(path), "-o", str(again), *OPS).returncode == 0
    assert again.read_bytes() == out.read_bytes()
    # Verify reads both compressed.
    proc = run("verify", str(path), str(out), *OPS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_xz_output_is_what_the_kernel_decoder_takes(tmp_path: Path) -> None:
    """CRC32 check (XZ Embedded has no CRC64) and a 1 MiB dictionary, even when the input
    was made with xz's defaults (CRC64, 8 MiB)."""
    path = tmp_path / "default.ko.xz"
    path.write_bytes(_tool("xz", "-c")(MODULE.read_bytes()))
    out = tmp_path / "out.ko.xz"
    assert run("patch", str(path), "-o", str(out), *OPS).returncode == 0
    listing = subprocess.run(["xz", "--robot", "-lvv", str(out)], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    stream = next(line.split("\t") for line in listing if line.startswith("stream"))
    block = next(line.split("\t") for line in listing if line.startswith("block"))
    assert stream[8] == "CRC32" and block[9] == "CRC32"
    assert block[-1] == "--lzma2=dict=1MiB"
    tool_test(out, "xz")


def test_gzip_output_header_is_gzip_n(tmp_path: Path) -> None:
    path = packed(tmp_path, MODULE, "gzip")
    out = tmp_path / "out.ko.gz"
    assert run("patch", str(path), "-o", str(out), *OPS).returncode == 0
    head = out.read_bytes()[:10]
    # magic, deflate, no flags (no name), mtime 0, Unix
    assert head == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"


def test_zstd_output_has_checksum_and_size(tmp_path: Path) -> None:
    """What `zstd -q` writes by default: the content size and an XXH64 checksum."""
    path = packed(tmp_path, MODULE, "zstd")
    out = tmp_path / "out.ko.zst"
    assert run("patch", str(path), "-o", str(out), *OPS).returncode == 0
    info = subprocess.run(["zstd", "-lv", str(out)], capture_output=True, text=True,
                          check=True).stdout
    size = len(unpacked(out, "zstd"))
    assert "Check: XXH64" in info and f"({size} B)" in info.split("Decompressed Size:")[1]
    tool_test(out, "zstd")


def test_linked_compressed_file(tmp_path: Path) -> None:
    """A linked file is patched with edits over the input's bytes; compressed, those bytes
    are the payload's, and the early copy (`prepare_output`) must not copy the container."""
    prog = FIX / "prog"
    path = packed(tmp_path, prog, "xz", "prog.xz")
    proc = run("patch", str(path), "-o", str(tmp_path / "out.xz"), *OPS)
    assert proc.returncode == 0, proc.stderr
    want = patch_plain(tmp_path, prog)
    assert unpacked(tmp_path / "out.xz", "xz") == want
    # The library, through the early-copy path.
    with pvpatch.prepare_output(path, tmp_path / "api.xz") as out:
        rw = pvpatch.apply_plan(pvpatch.make_plan(pvpatch.load(path, ops=OPS[1])))
        assert rw.image is None and rw.edits  # the edits path
        pvpatch.write_output(rw, out)
    assert unpacked(tmp_path / "api.xz", "xz") == want


def test_in_place(tmp_path: Path) -> None:
    path = packed(tmp_path, MODULE, "xz")
    assert run("patch", str(path), "-o", str(path), "--in-place", *OPS).returncode == 0
    assert unpacked(path, "xz") == patch_plain(tmp_path, MODULE)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, "plain-kernel61.o.out"])


def test_signature_is_inside_the_payload(tmp_path: Path) -> None:
    """Signing a compressed module signs the decompressed .ko, then compresses it."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=pvpatch test",
                    "-days", "2"], check=True, capture_output=True)
    sign = ["--sign-key", str(key), "--sign-cert", str(cert)]
    path = packed(tmp_path, MODULE, "zstd")
    out = tmp_path / "signed.ko.zst"
    proc = run("patch", str(path), "-o", str(out), *OPS, *sign)
    assert proc.returncode == 0, proc.stderr
    payload = unpacked(out, "zstd")
    assert payload.endswith(MODULE_SIG_MAGIC)
    assert payload == patch_plain(tmp_path, MODULE, *sign)  # RSA PKCS#1 v1.5: deterministic


def test_input_rewritten_in_place_is_refused(tmp_path: Path) -> None:
    """As for a plain input: the file changed in place after it was read is not
    overwritten by an output made from its old contents."""
    path = packed(tmp_path, MODULE, "xz")
    rw = pvpatch.apply_plan(pvpatch.make_plan(pvpatch.load(path, ops=OPS[1])))
    with open(path, "r+b") as fh:  # same inode, other contents
        fh.write(b"\xfd7zXZ\x00 rewritten")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(OutputError, match="changed while pvpatch was running"):
        pvpatch.write_output(rw, path, in_place=True)
    assert path.read_bytes().startswith(b"\xfd7zXZ\x00 rewritten")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# -- broken inputs: exit 2, one line ------------------------------------------------------


def broken_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a broken compressed module, what its error says)"""
    good = TOOLS["xz"][1](MODULE.read_bytes())
    cases: dict[str, tuple[bytes, str]] = {
        "truncated": (good[:-9], "truncated xz stream"),
        # The last byte of the block's CRC32 (before the index and the stream footer).
        "badcrc": (_flip(good, len(good) - 13), "corrupt xz stream"),
        "notelf": (TOOLS["xz"][1](b"just some text\n" * 100), "not an ELF file"),
        "twostreams": (good + good, "more than one xz stream"),
        "garbage": (good + b"garbage!", "data after the end of the xz stream"),
        "misnamed": (b"not compressed at all\n", "has a .xz name but holds neither xz data"),
    }
    out = {name: (tmp / f"{name}.ko.xz", text) for name, (_, text) in cases.items()}
    for name, (data, _) in cases.items():
        out[name][0].write_bytes(data)
    # A small zstd bomb: a module followed by 64 MiB of zeros, against a 1 MiB limit.
    bomb = tmp / "bomb.ko.zst"
    bomb.write_bytes(TOOLS["zstd"][1](MODULE.read_bytes() + bytes(64 << 20)))
    assert bomb.stat().st_size < 64 << 10
    out["bomb"] = (bomb, "decompresses to more than 1 MiB")
    return out


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


LIMIT = ["--max-decompressed", "1M"]


@pytest.mark.parametrize("name", ["truncated", "badcrc", "notelf", "twostreams", "garbage",
                                  "misnamed", "bomb"])
def test_broken_input_is_one_line(tmp_path: Path, name: str) -> None:
    path, text = broken_inputs(tmp_path)[name]
    before = digest(path)
    out = tmp_path / "out" / path.name
    out.parent.mkdir()
    for argv in (["scan", str(path)], ["check", str(path)],
                 ["patch", str(path), "-o", str(out)], ["verify", str(path), str(path)]):
        proc = run(*argv, *OPS, *LIMIT)
        one_error_line(proc, path, text)
    assert list(out.parent.iterdir()) == []  # nothing written, not even a temporary file
    assert digest(path) == before


def _open(data: bytes, fmt: str, limit: int = compress.MAX_DECOMPRESSED) -> bytes:
    """What pvpatch decompresses `data` to (an InputError when it refuses it)."""
    container = compress.BY_NAME[fmt]
    return compress.decompress(data, container, path="x.ko" + container.suffix, limit=limit)


UNIT = {"xz": "stream", "zstd": "frame", "gzip": "member"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_cut_is_truncated(fmt: str) -> None:
    """The tool's stream cut after any byte past its magic, a block boundary or not."""
    good = TOOLS[fmt][1](MODULE.read_bytes())
    assert _open(good, fmt) == MODULE.read_bytes()
    for cut in range(len(compress.BY_NAME[fmt].magic), len(good)):
        with pytest.raises(InputError, match=f"truncated {fmt} stream"):
            _open(good[:cut], fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_flipped_byte_is_refused_or_harmless(fmt: str) -> None:
    """One byte changed anywhere in the stream is a one-line error, or gives the very same
    payload (gzip's unchecked header fields, unused bits of a bitstream): never another
    payload, since every format here checks what it decodes."""
    plain = MODULE.read_bytes()
    good = TOOLS[fmt][1](plain)
    harmless = []
    for at in range(len(good)):
        for mask in (0x01, 0x80):
            bad = good[:at] + bytes([good[at] ^ mask]) + good[at + 1 :]
            try:
                got = _open(bad, fmt)
            except InputError as exc:
                assert "\n" not in str(exc) and str(exc).startswith("x.ko")
                continue
            assert got == plain, (at, mask)
            harmless.append(at)
    # xz checks every byte of its stream; gzip and zstd at least their checks (CRC32 and
    # ISIZE, XXH64): unused bits of their headers and bitstreams may change freely.
    checked = {"xz": 0, "gzip": len(good) - 8, "zstd": len(good) - 4}[fmt]
    assert not [at for at in harmless if at >= checked], harmless


@pytest.mark.parametrize("fmt", FORMATS)
def test_data_after_the_stream(fmt: str) -> None:
    good = TOOLS[fmt][1](MODULE.read_bytes())
    with pytest.raises(InputError, match=f"more than one {fmt} {UNIT[fmt]} .refused"):
        _open(good + good, fmt)
    with pytest.raises(InputError, match=f"data after the end of the {fmt} {UNIT[fmt]}"):
        _open(good + b"garbage!", fmt)
    if fmt == "zstd":  # a skippable frame: magic 0x184D2A5?, its length, its bytes
        skippable = bytes.fromhex("502a4d18") + (4).to_bytes(4, "little") + b"skip"
        with pytest.raises(InputError, match="a skippable frame after the zstd frame"):
            _open(good + skippable, fmt)
    if fmt == "xz":  # stream padding: NUL bytes in fours, and only those
        assert _open(good + bytes(8), fmt) == MODULE.read_bytes()
        with pytest.raises(InputError, match="data after the end of the xz stream"):
            _open(good + bytes(3), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_data_past_the_elf_file_stops_decoding(fmt: str) -> None:
    """Up to 16 MiB may follow the ELF file its headers describe (a signature is a few
    KB); one byte more is refused as soon as it is decoded, whatever the limit."""
    plain = MODULE.read_bytes()
    pack = TOOLS[fmt][1]
    assert _open(pack(plain + bytes(compress.TRAILER_MAX)), fmt)[: len(plain)] == plain
    with pytest.raises(InputError, match="goes on more than 16 MiB past the end of the ELF "
                                         f"file it holds .its headers end it at byte "
                                         f"{len(plain)}"):
        _open(pack(plain + bytes(compress.TRAILER_MAX + 1)), fmt)


def test_zstd_content_size_that_lies() -> None:
    """The frame header's content size, one less and one more than the frame holds."""
    plain = MODULE.read_bytes()
    good = compress.compress(plain, "zstd")  # a single-segment frame: the size in 2 bytes
    assert good[4] & 0xE0 == 0x60 and int.from_bytes(good[5:7], "little") + 256 == len(plain)
    for delta, text in ((-1, f"more data than the {len(plain) - 1} bytes its header says"),
                        (1, "corrupt zstd stream")):
        size = (len(plain) - 256 + delta).to_bytes(2, "little")
        with pytest.raises(InputError, match=text):
            _open(good[:5] + size + good[7:], "zstd")


def test_many_empty_zstd_blocks_cost_little() -> None:
    """30 MB of empty raw blocks (3 bytes each) in one frame: decoded in C, never walked
    block by block in Python (which took 5 s for this file)."""
    def block(data: bytes, last: int = 0) -> bytes:
        return (last | len(data) << 3).to_bytes(3, "little") + data

    plain = MODULE.read_bytes()
    frame = b"\x28\xb5\x2f\xfd\x00\x50" + block(plain) + block(b"") * 10_000_000 + \
        block(b"", 1)
    start = time.perf_counter()
    assert _open(frame, "zstd") == plain
    assert time.perf_counter() - start < 2.5


def test_where_the_elf_file_ends() -> None:
    """ELF32 too; headers that cannot be judged (here a wrong section header size) leave
    only the limit, and headers that claim more than there is hold decoding to it."""
    pack = TOOLS["zstd"][1]
    i386 = (FIX.parent / "i386" / "kernel61.o").read_bytes()
    with pytest.raises(InputError, match=f"its headers end it at byte {len(i386)}"):
        _open(pack(i386 + bytes(17 << 20)), "zstd")
    odd = bytearray(MODULE.read_bytes())
    odd[58] = 40  # e_shentsize of ELF64: 64
    assert len(_open(pack(bytes(odd) + bytes(20 << 20)), "zstd")) == len(odd) + (20 << 20)
    far = ElfFile(MODULE.read_bytes())
    at = far.e_shoff + far.cls.shdr.size + 32  # section 1's sh_size
    claims = bytearray(far.data)
    claims[at : at + 8] = (3 << 30).to_bytes(8, "little")
    with pytest.raises(InputError, match="decompresses to more than 32 MiB"):
        _open(pack(bytes(claims) + bytes(40 << 20)), "zstd", limit=32 << 20)


def test_tree_of_compressed_modules(tmp_path: Path) -> None:
    """A tree of compressed modules is walked like one of .ko files: every good file is
    scanned, checked and patched into the mirrored tree under its own name and in its
    own container, and each broken one is one line."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    good = {
        "a.ko.xz": packed(tree, MODULE, "xz", "a.ko.xz"),
        "sub/b.ko.gz": packed(tree / "sub", MODULE, "gzip", "b.ko.gz"),
        "sub/c.ko.zst": packed(tree / "sub", MODULE, "zstd", "c.ko.zst"),
        "sub/seed.ko.xz": packed(tree / "sub", FIX / "seed.o", "xz", "seed.ko.xz"),
    }
    bad = broken_inputs(tree / "sub")
    shutil.copyfile(FIX / "notelf.txt", tree / "README")  # walked, not ELF: skipped
    digests = {p: digest(p) for p in tree.rglob("*") if p.is_file()}

    # Only compressed modules: still a tree of ELF files.
    only = tmp_path / "only"
    only.mkdir()
    shutil.copyfile(good["a.ko.xz"], only / "a.ko.xz")
    proc = run("check", str(only), *OPS)
    assert proc.returncode == 0 and "1 ELF files" in proc.stdout, proc.stdout + proc.stderr

    for cmd in ("scan", "check"):
        proc = run(cmd, str(tree), *OPS, *LIMIT, "--jobs", "2")
        assert proc.returncode == 2
        errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
        assert len(errors) == len(bad), proc.stderr
        for path, text in bad.values():
            assert sum(str(path) in e and text in e for e in errors) == 1, (path, errors)
    proc = run("scan", str(tree), "--json", *OPS, *LIMIT)
    files = {os.path.relpath(f["path"], tree): f for f in json.loads(proc.stdout)["files"]}
    assert sorted(files) == sorted(good)
    assert all(len(f["sites"]) in (21, 9) for f in files.values())

    out = tmp_path / "out"
    proc = run("patch", str(tree), "-o", str(out), *OPS, *LIMIT, "--jobs", "2")
    assert proc.returncode == 2, proc.stderr
    assert "4 ELF files, 4 written" in proc.stdout, proc.stdout
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(good)
    for rel, src in good.items():
        fmt = container_of(src.read_bytes())
        assert fmt is not None and container_of((out / rel).read_bytes()) == fmt
        tool_test(out / rel, fmt)
        plain = FIX / ("seed.o" if "seed" in rel else "kernel61.o")
        assert unpacked(out / rel, fmt) == patch_plain(tmp_path, plain)
    assert {p: digest(p) for p in digests} == digests  # no input touched


# -- imports -------------------------------------------------------------------------------


def _modules_after(code: str) -> list[str]:
    code = ("import sys\n" + code +
            "\nprint([m for m in ('lzma', 'zlib', 'zstandard') if m in sys.modules], "
            "file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO)
    return list(json.loads(proc.stderr.strip().splitlines()[-1].replace("'", '"')))


def test_codecs_are_imported_only_when_needed() -> None:
    """zstandard never before a zstd file is met.  (lzma and zlib come with any argparse
    parser that has subcommands: argparse imports shutil, which imports them.)"""
    assert "zstandard" not in _modules_after(
        "from pvpatch.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert "zstandard" not in _modules_after(
        f"from pvpatch.cli import main\nmain(['scan', {str(MODULE)!r}, '--ops', 'none'])")
    # The library loads a plain file with no codec at all.
    assert _modules_after(f"import pvpatch\npvpatch.load({str(MODULE)!r}, ops='none')") == []


# -- Debian's 6.12 modules, as shipped ----------------------------------------------------


def debian_612() -> list[Path]:
    """Two or three of Debian's 6.12 modules: kvm (a hundred sites) and two small ones."""
    by_name = {p.name: p for p in corpus.x86_64_612_modules()}
    picked = [by_name[n] for n in ("kvm.ko.xz", "vsock_loopback.ko.xz", "vsock_diag.ko.xz")
              if n in by_name]
    assert len(picked) >= 2, "the 6.12 corpus lacks the modules this test uses"
    return picked


@pytest.mark.corpus
def test_debian_612_modules(tmp_path: Path) -> None:
    for shipped in debian_612():
        src = tmp_path / shipped.name  # a copy: nothing may touch the corpus
        shutil.copyfile(shipped, src)
        payload = unpacked(src, "xz")
        # Our xz is kbuild's: re-compressing the payload gives Debian's very file back.
        assert compress.compress(payload, "xz") == src.read_bytes()
        plain = tmp_path / shipped.name.removesuffix(".xz")
        plain.write_bytes(payload)
        assert ElfFile.open(src).data == payload
        assert scan_json(src, []) == scan_json(plain, [])
        out, ref = tmp_path / ("out-" + shipped.name), tmp_path / "out-plain.ko"
        a = run("patch", str(src), "-o", str(out), "--no-verify")
        b = run("patch", str(plain), "-o", str(ref), "--no-verify")
        assert a.returncode == b.returncode == 0, a.stderr + b.stderr
        assert a.stdout.replace(str(src), "IN").replace(str(out), "OUT") == \
            b.stdout.replace(str(plain), "IN").replace(str(ref), "OUT")
        tool_test(out, "xz")
        assert unpacked(out, "xz") == ref.read_bytes()
        assert digest(src) == digest(shipped)


def test_check_reports_a_broken_compressed_module_like_a_plain_one(tmp_path: Path) -> None:
    """A .ko.xz whose ELF payload is cut short is a PV100 finding, as the plain file is."""
    cut = tmp_path / "cut.ko"
    cut.write_bytes((FIX / "kernel61.o").read_bytes()[:0x200])
    packed_cut = packed(tmp_path, cut, "xz", "cut.ko.xz")
    docs = []
    for path in (cut, packed_cut):
        proc = run("check", "--json", str(path))
        assert proc.returncode == 1, proc.stderr
        (record,) = json.loads(proc.stdout)["files"]
        docs.append([(f["rule"], f["message"]) for f in record["findings"]])
    assert docs[0] == docs[1] and docs[0][0][0] == "PV100"
