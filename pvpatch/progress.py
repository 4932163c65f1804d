"""A progress bar for whole-tree runs: file counts and the current file, on stderr.

Shown only when asked or when the stream is a terminal, so CI logs stay clean;
tqdm is imported only when a bar is actually shown.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    def advance(self, n: int, current: str) -> None: ...

    def write(self, line: str, stream: TextIO) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    """No bar: lines go straight to their stream."""

    def advance(self, n: int, current: str) -> None:
        pass

    def write(self, line: str, stream: TextIO) -> None:
        stream.write(line + "\n")

    def close(self) -> None:
        pass


class BarProgress:
    def __init__(self, total: int, desc: str, stream: TextIO) -> None:
        from tqdm import tqdm

        self._tqdm: Any = tqdm
        # No monitor thread: a thread alive while worker processes fork is asking for trouble.
        tqdm.monitor_interval = 0
        # A terminal that reports no size (a fresh pseudo-terminal) would get a
        # zero-width bar: assume 80 columns there.
        sized = _columns(stream) > 0
        self._bar: Any = tqdm(total=total, desc=desc, unit="file", file=stream,
                              dynamic_ncols=sized, ncols=None if sized else 80,
                              mininterval=0.1, leave=True)

    def advance(self, n: int, current: str) -> None:
        self._bar.set_postfix_str(os.path.basename(current), refresh=False)
        self._bar.update(n)

    def write(self, line: str, stream: TextIO) -> None:
        # Clears the bar, writes the line(s), redraws the bar below them.
        self._tqdm.write(line, file=stream)

    def close(self) -> None:
        self._bar.set_postfix_str("", refresh=False)
        self._bar.close()


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def want_bar(flag: bool | None, stream: TextIO) -> bool:
    """`--progress` / `--no-progress`, or by default: is `stream` a terminal?"""
    if flag is not None:
        return flag
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def open_progress(flag: bool | None, total: int, desc: str, stream: TextIO) -> Progress:
    if want_bar(flag, stream):
        return BarProgress(total, desc, stream)
    return NoProgress()
