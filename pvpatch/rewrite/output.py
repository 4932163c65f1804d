"""Writing output files: whole or not at all.

The bytes go to a temporary file in the destination's folder and are renamed
over the destination only when complete; on any error or signal the temporary
file is removed and an existing destination is left as it was.  The input is
never opened for writing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..elf.reader import Buffer, FileIdentity, path_text
from ..errors import OutputError, UsageError

if TYPE_CHECKING:
    from pathlib import Path

# SIGTERM raises KeyboardInterrupt while any output is open, so cleanup runs.  Counted,
# not nested: outputs may close in any order, and the last one restores the handler.
_raising = 0
_saved_handler: Any = None


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM into an exception while writing, so cleanup runs."""
    global _raising, _saved_handler
    if threading.current_thread() is not threading.main_thread():
        yield  # signals belong to the main thread: leave them alone
        return
    if _raising == 0:
        _saved_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    _raising += 1
    try:
        yield
    finally:
        _raising -= 1
        if _raising == 0:
            signal.signal(signal.SIGTERM, _saved_handler)


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output_path(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                      in_place: bool = False) -> None:
    if same_file(src, dst) and not in_place:
        raise UsageError(f"output {dst} is the input; give --in-place to replace it")


def _create_temporary(folder: str, prefix: str, suffix: str) -> tuple[int, str]:
    """tempfile.mkstemp(suffix, prefix, folder): a new file only this process can have made
    (O_EXCL, mode 0600, symlinks not followed), without importing tempfile (and through it
    shutil, bz2, lzma and random) on every run."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) \
        | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(10_000):  # tempfile.TMP_MAX
        path = os.path.abspath(os.path.join(folder, f"{prefix}{os.urandom(6).hex()}{suffix}"))
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue  # a name taken by chance: draw another, as mkstemp does
    raise FileExistsError(errno.EEXIST, "no unused temporary name")


def write_atomic(dst: str | os.PathLike[str], data: bytes, mode_from: str | None = None) -> None:
    """Write `data` to `dst` atomically, copying permission bits from `mode_from`."""
    with OutputFile(dst) as out:
        out.commit_image(data, mode_from)


class OutputFile:
    """A temporary file beside `dst` that becomes `dst` on a commit, or nothing at all.

    With `prefetch=SRC` it is opened before the output's bytes are known and a
    second thread starts copying SRC into it.  The copy runs in the kernel
    (copy_file_range, else sendfile) and releases the GIL, so it overlaps the
    scan and plan; an output that keeps the input's layout (a linked file patched
    in place) then costs only its edits at commit.  `commit_edits` checks that the
    copy was taken from the very file the plan was made from, and copies again
    (or writes the loaded bytes) when it was not.

    Leaving the `with` block without a commit removes the temporary file; inside
    the block SIGTERM is raised as KeyboardInterrupt, so that cleanup runs.
    Failures to write are `OutputError`s.
    """

    def __init__(self, dst: str | os.PathLike[str], *, prefetch: str | None = None) -> None:
        self.path = path_text(dst)  # as str(pathlib.Path(dst)) says it
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(_signals_raise())
        folder, name = os.path.split(self.path)
        try:
            fd, self.tmp = _create_temporary(folder or ".", f".{'' if name == '.' else name}.",
                                             ".pvpatch-tmp")
        except OSError as exc:
            self._signals.close()
            raise OutputError(f"cannot write here: {exc.strerror or exc}", str(dst)) from None
        except BaseException:
            self._signals.close()
            raise
        self._fh = os.fdopen(fd, "wb")
        self._open = True
        self._copied: FileIdentity | None = None  # what the prefetch copied, once it has
        self._thread: threading.Thread | None = None
        if prefetch is not None:
            # The thread writes through its own descriptor: if this object is discarded
            # while it still runs (a second signal), it only writes into the removed file.
            self._thread = threading.Thread(target=self._prefetch,
                                            args=(prefetch, os.dup(fd)),
                                            name="pvpatch-prefetch", daemon=True)
            self._thread.start()

    @property
    def dst(self) -> Path:
        """The destination, as a `pathlib.Path` (`path` is its text)."""
        from pathlib import Path

        return Path(self.path)

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def _prefetch(self, src: str, fd: int) -> None:
        try:
            self._copied = _copy_in_kernel(src, None, fd)
        except Exception:  # never a traceback from the thread: commit copies again
            self._copied = None
        finally:
            os.close(fd)

    def wait(self) -> None:
        """Let a running prefetch finish (before forking, or before writing)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _restart(self) -> None:
        self._fh.seek(0)
        os.ftruncate(self._fh.fileno(), 0)

    def commit_edits(self, src: str, base: Buffer, edits: Iterable[tuple[int, bytes]],
                     identity: FileIdentity | None) -> None:
        """`base` (loaded from `src`, which `identity` names) with `edits` applied."""
        self.wait()
        try:
            if identity is None or self._copied != identity or identity.size != len(base):
                self._restart()
                if identity is None or _copy_in_kernel(src, identity, self._fh.fileno()) is None:
                    _check_unchanged(src, identity)
                    self._restart()
                    self._fh.write(base)
                    self._fh.flush()
            fd = self._fh.fileno()
            for offset, data in _coalesced(base, edits):
                os.pwrite(fd, data, offset)
            self._finish(src)
        except OSError as exc:
            raise OutputError(f"cannot write: {exc.strerror or exc}", self.path) from None

    def commit_image(self, data: bytes, mode_from: str | None = None) -> None:
        """A whole new image."""
        self.wait()
        try:
            self._restart()
            self._fh.write(data)
            self._finish(mode_from)
        except OSError as exc:
            raise OutputError(f"cannot write: {exc.strerror or exc}", self.path) from None

    def commit_compressed(self, src: str, data: bytes, compression: str,
                          identity: FileIdentity | None) -> None:
        """`data`, the output of an input decompressed from `src` (which `identity`
        names), compressed the way the input was ("xz", "zstd", "gzip").  Never a copy
        of `src`: its bytes are the container's, not the ELF file's."""
        from ..elf.compress import compress

        packed = compress(data, compression)
        # The payload was read into memory whole, so it cannot have changed under the
        # plan; the file can have, and is not overwritten then (with --in-place).
        _check_unchanged(src, identity)
        self.commit_image(packed, mode_from=src)

    def _finish(self, mode_from: str | None) -> None:
        mode = 0o644
        if mode_from is not None:
            with contextlib.suppress(OSError):
                mode = os.stat(mode_from).st_mode & 0o7777
        self._fh.close()
        os.chmod(self.tmp, mode)
        # The rename is atomic: readers see the old file or the whole new one.
        os.replace(self.tmp, self.path)
        self._open = False
        self._signals.close()

    def discard(self) -> None:
        """Remove the temporary file unless it was committed (idempotent)."""
        if not self._open:
            return
        try:
            self.wait()
        finally:
            self._open = False
            with contextlib.suppress(OSError):
                self._fh.close()
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self._signals.close()


COALESCE_GAP = 512  # edits closer than this are written as one run (base bytes between)


def _coalesced(base: Buffer, edits: Iterable[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """`edits` as fewer, larger writes with the same result: edits less than COALESCE_GAP
    bytes apart join one run, filled between them from `base` (what the output already
    holds there), each applied in its original order (a later edit over an earlier one
    wins, as when written one by one).  A vmlinux has thousands of 4-byte edits a few
    bytes apart in one table: one write each would cost a system call each."""
    # (offset, original position, data): sorted by offset, ties in their original order.
    rows = sorted([(offset, k, data) for k, (offset, data) in enumerate(edits)])
    # (end, rows, whether two of them overlap: only then does their order matter)
    runs: list[tuple[int, list[tuple[int, int, bytes]], bool]] = []
    items: list[tuple[int, int, bytes]] = []
    end, overlap = -1, False
    for row in rows:
        stop = row[0] + len(row[2])
        if items and row[0] <= end + COALESCE_GAP:
            items.append(row)
            overlap = overlap or row[0] < end
            if stop > end:
                end = stop
        else:
            if items:
                runs.append((end, items, overlap))
            items, end, overlap = [row], stop, False
    if items:
        runs.append((end, items, overlap))
    out: list[tuple[int, bytes]] = []
    for stop, run, overlapping in runs:
        if overlapping:
            run.sort(key=lambda row: row[1])  # as written: a later edit over an earlier one
        if len(run) == 1 or stop > len(base):  # past the loaded bytes: one by one
            out.extend((offset, data) for offset, _k, data in run)
            continue
        start = min(run)[0]
        buf = bytearray(base[start:stop])
        for offset, _k, data in run:
            buf[offset - start : offset - start + len(data)] = data
        out.append((start, bytes(buf)))
    return out


def _check_unchanged(src: str, identity: FileIdentity | None) -> None:
    """A mapped input rewritten in place since it was loaded no longer holds what the plan
    was made from: refuse rather than write it.  (One replaced by rename, as linkers and
    build tools do, leaves the mapped file intact.)"""
    if identity is None:
        return
    try:
        now = FileIdentity.of(os.stat(src))
    except OSError:
        return  # removed: the mapped file itself is intact
    if (now.device, now.inode) == (identity.device, identity.inode) and now != identity:
        raise OutputError("the input changed while pvpatch was running; nothing written", src)


def _copy_in_kernel(src: str, identity: FileIdentity | None, out_fd: int) -> FileIdentity | None:
    """Copy the whole of `src` to `out_fd` from offset 0; the identity of what was copied,
    or None (nothing left written) when `src` is not the file `identity` names, changed
    while it was copied, or the kernel cannot copy between these files."""
    try:
        in_fd = os.open(src, os.O_RDONLY)
    except OSError:
        return None
    try:
        st = os.fstat(in_fd)
        found = FileIdentity.of(st)
        if not stat.S_ISREG(st.st_mode) or (identity is not None and found != identity):
            return None
        for copy in (_copy_file_range, _sendfile):
            try:
                copy(in_fd, out_fd, found.size)
            except OSError:
                # Not supported here (old kernel, other filesystems, seccomp): start over.
                os.ftruncate(out_fd, 0)
                os.lseek(out_fd, 0, os.SEEK_SET)
                continue
            if FileIdentity.of(os.fstat(in_fd)) != found:  # written to while copied
                os.ftruncate(out_fd, 0)
                return None
            return found
        return None
    finally:
        os.close(in_fd)


def _copy_file_range(in_fd: int, out_fd: int, size: int) -> None:
    copy_file_range = getattr(os, "copy_file_range", None)  # Linux only
    if copy_file_range is None:
        raise OSError("copy_file_range is not available")
    done = 0
    while done < size:
        n = copy_file_range(in_fd, out_fd, size - done, done, done)
        if n <= 0:
            raise OSError("copy_file_range made no progress")
        done += n


def _sendfile(in_fd: int, out_fd: int, size: int) -> None:
    done = 0
    while done < size:
        # sendfile writes at the output's file position: give it an explicit one.
        os.lseek(out_fd, done, os.SEEK_SET)
        n = os.sendfile(out_fd, in_fd, done, size - done)
        if n <= 0:
            raise OSError("sendfile made no progress")
        done += n
