"""Locate (and fetch on demand) the real Debian kernel corpus used by the corpus tests.

The corpus lives outside the repository, in ``$PVPATCH_CORPUS`` or
``~/.cache/pvpatch-corpus``; ``scripts/fetch-corpus`` fills it. Tests call :func:`ensure`
instead of skipping, so a missing corpus is fetched rather than silently ignored.
"""

from __future__ import annotations

import functools
import os
import struct
import subprocess
from pathlib import Path
from typing import Literal

Kind = Literal["x86_64", "i386"]

REPO = Path(__file__).resolve().parent.parent
FETCH_SCRIPT = REPO / "scripts" / "fetch-corpus"
PV_SECTION = b".parainstructions"


def corpus_root() -> Path:
    env = os.environ.get("PVPATCH_CORPUS")
    return Path(env) if env else Path.home() / ".cache" / "pvpatch-corpus"


def _ready(kind: Kind) -> bool:
    root = corpus_root() / kind
    if not (root / "lib" / "modules").is_dir():
        return False
    return (root / "vmlinux").is_file()


def ensure(kind: Kind) -> Path:
    """Return ``corpus_root()/kind``, running scripts/fetch-corpus first if it is missing."""
    if not _ready(kind):
        args = [str(FETCH_SCRIPT)] + (["--i386"] if kind == "i386" else [])
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        _modules.cache_clear()
        _pv_modules.cache_clear()
        if not _ready(kind):
            raise RuntimeError(f"{FETCH_SCRIPT} ran but {corpus_root() / kind} is incomplete")
    return corpus_root() / kind


def has_section(path: Path, name: bytes = PV_SECTION) -> bool:
    """True if the ELF file has a section called ``name`` (reads only the section headers)."""
    with path.open("rb") as f:
        ident = f.read(64)
        if len(ident) < 52 or ident[:4] != b"\x7fELF":
            return False
        is64 = ident[4] == 2
        end = "<" if ident[5] == 1 else ">"
        if is64:
            (shoff,) = struct.unpack_from(end + "Q", ident, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", ident, 0x3A)
        else:
            (shoff,) = struct.unpack_from(end + "I", ident, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", ident, 0x2E)
        if shoff == 0 or shnum == 0 or shstrndx >= shnum:
            return False
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        # sh_name is the first word; sh_offset/sh_size sit at 0x18/0x20 (64) or 0x10/0x14 (32).
        fmt, at = (end + "QQ", 0x18) if is64 else (end + "II", 0x10)
        str_off, str_size = struct.unpack_from(fmt, table, shstrndx * shentsize + at)
        f.seek(str_off)
        strtab = f.read(str_size)
    want = name + b"\0"
    for i in range(shnum):
        (name_off,) = struct.unpack_from(end + "I", table, i * shentsize)
        if strtab.startswith(want, name_off):
            return True
    return False


def release(kind: Kind) -> str:
    """Kernel release of the unpacked package, e.g. ``6.1.0-56-cloud-amd64``."""
    ensure(kind)
    dirs = sorted((corpus_root() / kind / "lib" / "modules").iterdir())
    return dirs[-1].name


@functools.cache
def _modules(kind: Kind) -> tuple[Path, ...]:
    return tuple(sorted((corpus_root() / kind / "lib" / "modules").rglob("*.ko")))


@functools.cache
def _pv_modules(kind: Kind) -> tuple[Path, ...]:
    return tuple(p for p in _modules(kind) if has_section(p))


def x86_64_modules() -> list[Path]:
    ensure("x86_64")
    return list(_modules("x86_64"))


def x86_64_pv_modules() -> list[Path]:
    ensure("x86_64")
    return list(_pv_modules("x86_64"))


def x86_64_vmlinux() -> Path | None:
    ensure("x86_64")
    path = corpus_root() / "x86_64" / "vmlinux"
    return path if path.is_file() else None


def i386_vmlinux() -> Path | None:
    ensure("i386")
    path = corpus_root() / "i386" / "vmlinux"
    return path if path.is_file() else None


def i386_modules() -> list[Path]:
    ensure("i386")
    return list(_modules("i386"))


def i386_pv_modules() -> list[Path]:
    ensure("i386")
    return list(_pv_modules("i386"))
