"""Compressed containers around ELF files: kernel modules shipped as `.ko.xz`, `.ko.zst`,
`.ko.gz` (scripts/Makefile.modinst).

A container is recognised by its magic bytes, never by the file's name.  Decompression
streams in bounded chunks and stops once the output passes a limit, so a decompression
bomb costs at most the limit (plus one chunk and the decoder's window), never what the
stream claims.  It also stops once the output runs TRAILER_MAX past the end of the ELF
file its headers describe, so the usual bomb (a small ELF file, then gigabytes of zeros)
costs megabytes.  Output is compressed the way kbuild compresses modules, deterministically.

The codecs (lzma, zlib, zstandard) are imported only when a container is met: a command
on plain files, or `pvpatch --help`, loads none of them.

One stream per file: data after the first xz stream, zstd frame or gzip member is refused
(xz's NUL stream padding excepted).  The kernel's own module decompressor
(kernel/module/decompress.c) reads only the first one while the command-line tools read
them all, so such a file is a different module to different loaders; pvpatch does not
pick one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from ..errors import InputError
from ..record import record

# The default ceiling on a decompressed input: far above any real module (the largest
# of Debian's 6.12 cloud kernel, xfs.ko, is 5.6 MB; its vmlinux 58 MB), far below what
# would swap.
MAX_DECOMPRESSED = 1 << 30

CHUNK = 1 << 20  # output per decoder call: the most a stream can overshoot the limit
INPUT_CHUNK = 1 << 20  # compressed bytes per decoder call

# A hostile xz header can claim a dictionary of up to 1.5 GiB, which liblzma would
# allocate: its memory limit follows the output limit, with room for the standard
# presets (xz -9 needs 65 MiB) when the output limit is set low.
_XZ_MIN_MEMLIMIT = 80 << 20

_ELF_MAGIC = b"\x7fELF"


class Source(Protocol):
    """What a decoder reads from: a file's bytes, or a read-only map of the file.  Only
    sliced, a piece at a time, so a map is never copied whole."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> bytes: ...


class StreamError(Exception):
    """A container's stream is broken; the message is one line, without the path."""


@record
class Container:
    """One compressed container format."""

    name: str  # "xz", "zstd", "gzip"
    magic: bytes  # the first bytes of every stream
    suffix: str  # what kbuild appends to a module's name
    # (source, output limit) -> the payload in chunks (xz, gzip: at most CHUNK bytes;
    # zstd: at most 16 MiB, see ZSTD_PIECE), or StreamError; the caller stops pulling once
    # the limit is passed.
    decoder: Callable[[Source, int], Iterator[bytes]]
    # a whole payload -> the container's bytes as kbuild writes them (deterministic)
    encoder: Callable[[bytes], bytes]


def _pieces(src: Source, start: int) -> Iterator[bytes]:
    """src[start:] in slices of INPUT_CHUNK."""
    for at in range(start, len(src), INPUT_CHUNK):
        yield src[at : at + INPUT_CHUNK]


def _refuse_rest(what: str, unit: str, magic: bytes, rest: bytes) -> StreamError:
    """The error for data after the first stream; `rest` is its start."""
    if rest.startswith(magic):
        return StreamError(f"more than one {what} {unit} (refused: the kernel would load "
                           "only the first, the command-line tools all of them)")
    return StreamError(f"data after the end of the {what} {unit}")


# -- xz (lzma, standard library) --------------------------------------------------------

_XZ_MAGIC = b"\xfd7zXZ\x00"


def _xz_decode(src: Source, limit: int) -> Iterator[bytes]:
    import lzma

    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ,
                                memlimit=max(_XZ_MIN_MEMLIMIT, limit + (1 << 20)))
    consumed = 0
    try:
        for piece in _pieces(src, 0):
            consumed += len(piece)
            yield dec.decompress(piece, CHUNK)
            # Output held in the decoder is drained before more input goes in.
            while not dec.eof and not dec.needs_input:
                yield dec.decompress(b"", CHUNK)
            if dec.eof:
                break
    except lzma.LZMAError as exc:
        if "memory" in str(exc).lower():
            raise StreamError("xz stream needs more memory than the limit allows "
                              "(its dictionary is too large)") from None
        raise StreamError(f"corrupt xz stream: {exc}") from None
    if not dec.eof:
        raise StreamError("truncated xz stream")
    tail = dec.unused_data
    if not tail and consumed == len(src):
        return
    # Stream padding (NUL bytes, a multiple of 4) may follow a stream; nothing else.
    padding = (len(tail) + len(src) - consumed) % 4 == 0 and not tail.strip(b"\0") and all(
        not p.strip(b"\0") for p in _pieces(src, consumed))
    if not padding:
        raise _refuse_rest("xz", "stream", _XZ_MAGIC,
                           (tail + src[consumed : consumed + 8]).lstrip(b"\0"))


def _xz_encode(data: bytes) -> bytes:
    import lzma

    # scripts/Makefile.modinst: `xz --check=crc32 --lzma2=dict=1MiB`.  The in-kernel XZ
    # decoder knows no CRC64 (xz's default check); preset 6 is xz's default level.
    # liblzma single-threaded: the bytes are the xz tool's.
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                         filters=[{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20}])


# -- zstd (the zstandard package) -------------------------------------------------------

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_content_size(src: Source) -> int | None:
    """The content size the frame header at the start of `src` declares (RFC 8878 3.1.1.1),
    None when it declares none."""
    head = src[:18]
    if len(head) < 6 or head[:4] != _ZSTD_MAGIC:
        raise StreamError("truncated zstd stream")
    fhd = head[4]
    if fhd & 0x08:
        raise StreamError("corrupt zstd stream: reserved bit set in the frame header")
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]  # window byte, dictionary id
    fcs_size = (single, 2, 4, 8)[fcs_flag]
    if at + fcs_size > len(head):
        raise StreamError("truncated zstd stream")
    if not fcs_size:
        return None
    content = int.from_bytes(head[at : at + fcs_size], "little")
    return content + (256 if fcs_size == 2 else 0)  # RFC 8878 3.1.1.1.4


# Compressed bytes per zstd decoder call.  zstandard's decompressobj returns everything a
# call's input decodes to, and a 4-byte RLE block is 128 KiB of output: small pieces keep
# one call's output (and the overshoot past the limit) to ZSTD_PIECE * 32768 = 16 MiB.
ZSTD_PIECE = 512


def _zstd_decode(src: Source, limit: int) -> Iterator[bytes]:
    import zstandard

    content = _zstd_content_size(src)
    # One frame (read_across_frames=False): `eof` says where it ended, `unused_data` what
    # followed, so the frame is never walked block by block in Python.  The decoder
    # refuses windows over zstd's default ceiling (128 MiB, as the zstd tool without
    # --long): its memory is bounded whatever a header claims.
    dec = zstandard.ZstdDecompressor().decompressobj(read_across_frames=False)
    consumed = total = 0
    try:
        for at in range(0, len(src), ZSTD_PIECE):
            piece = src[at : at + ZSTD_PIECE]
            consumed += len(piece)
            out = dec.decompress(piece)
            total += len(out)
            yield out
            if dec.eof:
                break
    except zstandard.ZstdError as exc:
        message = re.sub(r"^zstd decompress(or)? error: ", "", str(exc))
        if content is not None and message.startswith("Destination buffer is too small"):
            message = f"more data than the {content} bytes its header says"  # libzstd's words
        raise StreamError(f"corrupt zstd stream: {message}") from None
    if not dec.eof:
        raise StreamError("truncated zstd stream")
    if content is not None and total != content:
        raise StreamError(f"corrupt zstd stream: {total} bytes decoded, "
                          f"its header says {content}")
    rest = dec.unused_data
    if rest or consumed < len(src):
        rest = (rest + src[consumed : consumed + 4])[:4]
        if len(rest) == 4 and rest[1:] == b"\x2a\x4d\x18" and rest[0] & 0xF0 == 0x50:
            raise StreamError("a skippable frame after the zstd frame (refused: "
                              "the kernel would not read it)")
        raise _refuse_rest("zstd", "frame", _ZSTD_MAGIC, rest)


def _zstd_encode(data: bytes) -> bytes:
    import zstandard

    # `zstd -q` (Makefile.modinst): level 3 with the content size and a checksum in the
    # frame, the zstd tool's defaults; single-threaded, so deterministic.  The bytes may
    # differ from the tool's where its libzstd is another version.
    return zstandard.ZstdCompressor(level=3, write_checksum=True,
                                    write_content_size=True).compress(data)


# -- gzip (zlib, standard library) ------------------------------------------------------


def _gzip_decode(src: Source, limit: int) -> Iterator[bytes]:
    import zlib

    dec = zlib.decompressobj(wbits=31)  # the gzip wrapper; zlib checks CRC32 and ISIZE
    consumed = 0
    try:
        for piece in _pieces(src, 0):
            consumed += len(piece)
            pending = piece
            while True:
                out = dec.decompress(pending, CHUNK)
                yield out
                pending = dec.unconsumed_tail
                # A full chunk can leave output inside zlib with no input left.
                if dec.eof or (not pending and len(out) < CHUNK):
                    break
            if dec.eof:
                break
    except zlib.error as exc:
        message = str(exc).removeprefix("Error -3 while decompressing data: ")
        raise StreamError(f"corrupt gzip stream: {message}") from None
    if not dec.eof:
        raise StreamError("truncated gzip stream")
    if dec.unused_data or consumed < len(src):
        raise _refuse_rest("gzip", "member", b"\x1f\x8b",
                           dec.unused_data + src[consumed : consumed + 2])


def _gzip_encode(data: bytes) -> bytes:
    import zlib

    # `gzip -n` (Makefile.modinst): no name, mtime 0, level 6, OS 3 (Unix): the header
    # zlib's gzip wrapper writes.  The deflate data can differ from GNU gzip's own
    # implementation on larger files; zlib's is deterministic.
    enc = zlib.compressobj(6, zlib.DEFLATED, 31)
    return enc.compress(data) + enc.flush()


CONTAINERS: tuple[Container, ...] = (
    Container("xz", _XZ_MAGIC, ".xz", _xz_decode, _xz_encode),
    Container("zstd", _ZSTD_MAGIC, ".zst", _zstd_decode, _zstd_encode),
    Container("gzip", b"\x1f\x8b\x08", ".gz", _gzip_decode, _gzip_encode),
)
BY_NAME = {c.name: c for c in CONTAINERS}
MAGIC_MAX = max(len(c.magic) for c in CONTAINERS)  # the bytes `detect` looks at


def detect(head: bytes) -> Container | None:
    """The container whose magic `head` (a file's first MAGIC_MAX bytes, or more) starts
    with; None for anything else, a plain ELF file among them."""
    for c in CONTAINERS:
        if head.startswith(c.magic):
            return c
    return None


def named_like(path: str) -> Container | None:
    """The container a module's name claims (`foo.ko.xz`): for messages only."""
    for c in CONTAINERS:
        if path.endswith(".ko" + c.suffix):
            return c
    return None


def _misnamed(path: str, head: bytes) -> InputError | None:
    """The error for a file named like a compressed module that is neither compressed
    nor ELF (a plain ELF file under a compressed name is read as what it is)."""
    claimed = named_like(path)
    if claimed is None or head.startswith(_ELF_MAGIC):
        return None
    return InputError(f"has a {claimed.suffix} name but holds neither {claimed.name} data "
                      "nor an ELF file", path)


S = TypeVar("S", bound=Source)


def unpack(src: S, path: str, limit: int = MAX_DECOMPRESSED) -> tuple[S | bytes, str | None]:
    """A file's contents ready to parse, and the name of the container they came out of:
    `src` itself and None when it is not compressed, else the decompressed payload (see
    `decompress`)."""
    head = src[:MAGIC_MAX]
    container = detect(head)
    if container is None:
        problem = _misnamed(path, head)
        if problem is not None:
            raise problem
        return src, None
    return decompress(src, container, path=path, limit=limit), container.name


# How far a payload may go on past the end of the ELF file its headers describe: a module
# signature (a few KB) lives there, nothing else real.  Decoding stops once a payload
# passes it, so a module followed by gigabytes of padding costs milliseconds, not the
# whole limit.
TRAILER_MAX = 16 << 20

_EHDR_MAX = 64  # an ELF64 header; an ELF32 one is 52 bytes


def _elf_end(head: memoryview) -> tuple[int | None, int | None]:
    """Where the ELF file starting `head` ends, from its headers: the furthest byte its
    section and program headers (and the sections and segments they describe) reach.

    Returns (end, None) once `head` holds every header; (None, n) when it needs n bytes
    first; (None, None) when the headers are not plausible, or use extended numbering
    (ElfFile judges those; only the limit applies to such a file).
    """
    import struct

    if len(head) < _EHDR_MAX:
        return None, _EHDR_MAX
    if head[:4] != _ELF_MAGIC or head[5] != 1 or head[4] not in (1, 2):
        return None, None
    wide = head[4] == 2
    if wide:
        ehsize, shdr, phdr = 64, (64, "<4xI16xQQ24x"), (56, "<8xQ16xQ16x")
        phoff, shoff = struct.unpack_from("<QQ", head, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 54)
    else:
        ehsize, shdr, phdr = 52, (40, "<4xI8xII16x"), (32, "<4xI8xI12x")
        phoff, shoff = struct.unpack_from("<II", head, 28)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 42)
    if (shnum and shentsize != shdr[0]) or (phnum and phentsize != phdr[0]) \
            or (shoff and not shnum) or phnum == 0xFFFF:
        return None, None
    shend = shoff + shnum * shentsize if shnum else 0
    phend = phoff + phnum * phentsize if phnum else 0
    end = max(ehsize, shend, phend)
    if end > len(head):
        return None, end
    for kind, offset, size in struct.iter_unpack(shdr[1], head[shoff:shend]):
        if kind not in (0, 8):  # SHT_NULL, SHT_NOBITS: no bytes in the file
            end = max(end, offset + size)
    for offset, size in struct.iter_unpack(phdr[1], head[phoff:phend]):
        end = max(end, offset + size)
    return end, None


def decompress(src: Source, container: Container, *, path: str,
               limit: int = MAX_DECOMPRESSED) -> bytes:
    """The ELF file inside the `container` stream `src` (bytes, or a map of the file).

    Raises `InputError` naming `path`, one line, when the stream is broken, when the
    payload passes `limit` bytes (decoding stops there), when it is not ELF (seen in the
    first chunk, so a large stream of something else is not decoded whole), or when it
    goes on more than TRAILER_MAX bytes past the end of the ELF file its headers describe
    (seen as soon as it does).
    """
    import io

    out = io.BytesIO()  # getvalue() hands its buffer over: no second copy of the payload
    total = 0
    end: int | None = None  # where the ELF file ends, once its headers are in
    need: int | None = _EHDR_MAX  # the bytes needed before asking again; None: never
    try:
        for chunk in container.decoder(src, limit):
            total += len(chunk)
            if total > limit:
                raise InputError(f"{container.name}-compressed data decompresses to more "
                                 f"than {format_size(limit)} (the limit, "
                                 "--max-decompressed)", path)
            if total - len(chunk) < len(_ELF_MAGIC):  # the payload's first bytes
                head = (out.getvalue() + chunk)[: len(_ELF_MAGIC)]
                if not _ELF_MAGIC.startswith(head):
                    break
            out.write(chunk)
            if need is not None and total >= need:
                with out.getbuffer() as view:  # released before the next write
                    end, need = _elf_end(view)
            if end is not None and total > end + TRAILER_MAX:
                raise InputError(f"{container.name}-compressed data goes on more than "
                                 f"{format_size(TRAILER_MAX)} past the end of the ELF file "
                                 f"it holds (its headers end it at byte {end})", path)
    except StreamError as exc:
        raise InputError(str(exc), path) from None
    except MemoryError:
        raise InputError(f"out of memory decompressing {container.name} data "
                         "(try a lower --max-decompressed)", path) from None
    data = out.getvalue()
    if not data.startswith(_ELF_MAGIC):
        raise InputError(f"{container.name}-compressed, but what it holds is not an ELF file",
                         path)
    return data


def compress(data: bytes, name: str) -> bytes:
    """`data` in the container called `name` ("xz", "zstd", "gzip"), as kbuild writes it."""
    return BY_NAME[name].encoder(data)


_SIZE = re.compile(r"(\d+)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_SHIFT = {None: 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str) -> int:
    """`1048576`, `512K`, `64MiB`, `1G`, `2GB` (binary multiples) -> bytes; else ValueError."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a size: {text!r} (bytes, or a number with K, M, G or T)")
    value = int(m.group(1)) << _SHIFT[m.group(2) and m.group(2).lower()]
    if value < 1:
        raise ValueError(f"must be at least 1 byte, not {text!r}")
    return value


def format_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"
