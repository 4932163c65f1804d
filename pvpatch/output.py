"""Writing output files: whole or not at all.

The bytes go to a temporary file in the destination's folder, are flushed to
disk, and are renamed over the destination only when complete; on any error
or signal the temporary file is removed and an existing destination is left
as it was.  The input is never opened for writing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import BinaryIO

from .errors import UsageError


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM into an exception while writing, so cleanup runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output_path(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                      in_place: bool = False) -> None:
    if same_file(src, dst) and not in_place:
        raise UsageError(f"output {dst} is the input; give --in-place to replace it")


def write_atomic(dst: str | os.PathLike[str], data: bytes, mode_from: str | None = None) -> None:
    """Write `data` to `dst` atomically, copying permission bits from `mode_from`."""

    def fill(fh: BinaryIO) -> None:
        fh.write(data)

    _replace_with(dst, fill, mode_from)


def write_edited(dst: str | os.PathLike[str], src: str, base: bytes,
                 edits: Iterable[tuple[int, bytes]]) -> None:
    """Write `base` (the input as read) with `edits` (offset, bytes) applied, atomically.

    The edits are written over the copy in the file rather than into a second
    in-memory image: a large linked file with a few changed sites costs one write.
    """
    edits = list(edits)

    def fill(fh: BinaryIO) -> None:
        fh.write(base)
        fh.flush()
        for offset, data in edits:
            os.pwrite(fh.fileno(), data, offset)

    _replace_with(dst, fill, src)


def _replace_with(dst: str | os.PathLike[str], fill: Callable[[BinaryIO], None],
                  mode_from: str | None) -> None:
    dst_path = Path(dst)
    folder = dst_path.parent if str(dst_path.parent) else Path(".")
    mode = 0o644
    if mode_from is not None:
        with contextlib.suppress(OSError):
            mode = os.stat(mode_from).st_mode & 0o7777
    with _signals_raise():
        fd, tmp = tempfile.mkstemp(prefix=f".{dst_path.name}.", suffix=".pvpatch-tmp",
                                   dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fill(fh)
                fh.flush()
            os.chmod(tmp, mode)
            # The rename is atomic: readers see the old file or the whole new one.
            os.replace(tmp, dst_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
