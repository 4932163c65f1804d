"""Compressed containers around ELF files: kernel modules shipped as `.ko.xz`, `.ko.zst`,
`.ko.gz` (scripts/Makefile.modinst).

A container is recognised by its magic bytes, never by the file's name.  Decompression
streams in bounded chunks and stops once the output passes a limit, so a decompression
bomb costs at most the limit (plus one chunk and the decoder's window), never what the
stream claims.  Output is compressed the way kbuild compresses modules, deterministically.

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
from dataclasses import dataclass
from typing import IO, Protocol, TypeVar, cast

from .errors import InputError

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


@dataclass(frozen=True)
class Container:
    """One compressed container format."""

    name: str  # "xz", "zstd", "gzip"
    magic: bytes  # the first bytes of every stream
    suffix: str  # what kbuild appends to a module's name
    # (source, output limit) -> the payload in chunks of at most CHUNK bytes, or
    # StreamError; the caller stops pulling once the limit is passed.
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


def zstd_frame_end(src: Source) -> tuple[int, int | None]:
    """Where the first zstd frame in `src` ends, and the content size its header declares.

    Walked over the frame and block headers (RFC 8878) without decoding: zstandard's
    reader says neither where a frame ended nor that one was cut short.
    """
    head = src[:18]
    if len(head) < 6 or head[:4] != _ZSTD_MAGIC:
        raise StreamError("truncated zstd stream")
    fhd = head[4]
    if fhd & 0x08:
        raise StreamError("corrupt zstd stream: reserved bit set in the frame header")
    fcs_flag, single, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]  # window byte, dictionary id
    fcs_size = (single, 2, 4, 8)[fcs_flag]
    if at + fcs_size > len(head):
        raise StreamError("truncated zstd stream")
    content: int | None = None
    if fcs_size:
        content = int.from_bytes(head[at : at + fcs_size], "little")
        content += 256 if fcs_size == 2 else 0  # RFC 8878 3.1.1.1.4
    at += fcs_size
    while True:
        block = src[at : at + 3]
        if len(block) < 3:
            raise StreamError("truncated zstd stream")
        header = int.from_bytes(block, "little")
        last, kind, length = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise StreamError("corrupt zstd stream: reserved block type")
        at += 3 + (1 if kind == 1 else length)  # an RLE block stores its byte once
        if last:
            break
    at += 4 if checksum else 0
    if at > len(src):
        raise StreamError("truncated zstd stream")
    return at, content


class _Reader:
    """src[:end] as the file object zstandard's stream reader pulls from."""

    def __init__(self, src: Source, end: int) -> None:
        self._src, self._end, self._at = src, end, 0

    def read(self, n: int = -1) -> bytes:
        stop = self._end if n < 0 else min(self._end, self._at + n)
        data = self._src[self._at : stop]
        self._at = max(self._at, stop)
        return data


def _zstd_decode(src: Source, limit: int) -> Iterator[bytes]:
    import zstandard

    end, content = zstd_frame_end(src)
    # The decoder refuses windows over zstd's default ceiling (128 MiB, as the zstd tool
    # without --long): its memory is bounded whatever a header claims.
    reader = zstandard.ZstdDecompressor().stream_reader(
        cast("IO[bytes]", _Reader(src, end)),  # it calls read() only
        read_size=INPUT_CHUNK, read_across_frames=False)
    total = 0
    try:
        while chunk := reader.read(CHUNK):
            total += len(chunk)
            yield chunk
    except zstandard.ZstdError as exc:
        message = str(exc).removeprefix("zstd decompress error: ")
        raise StreamError(f"corrupt zstd stream: {message}") from None
    if content is not None and total != content:
        raise StreamError(f"corrupt zstd stream: {total} bytes decoded, "
                          f"its header says {content}")
    if end < len(src):
        rest = src[end : end + 4]
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


def decompress(src: Source, container: Container, *, path: str,
               limit: int = MAX_DECOMPRESSED) -> bytes:
    """The ELF file inside the `container` stream `src` (bytes, or a map of the file).

    Raises `InputError` naming `path`, one line, when the stream is broken, when the
    payload passes `limit` bytes (decoding stops there), or when it is not ELF (seen in
    the first chunk, so a large stream of something else is not decoded whole).
    """
    import io

    out = io.BytesIO()  # getvalue() hands its buffer over: no second copy of the payload
    total = 0
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
