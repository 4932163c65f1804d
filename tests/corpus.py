"""Locate (and fetch on demand) the real Debian kernel corpus used by the corpus tests.

The corpus lives outside the repository, in ``$PVPATCH_CORPUS`` or
``~/.cache/pvpatch-corpus``, one folder per kind; ``scripts/fetch-corpus`` fills it with the
exact packages pinned in ``scripts/corpus-pins``. Tests call :func:`ensure` instead of
skipping, so a missing corpus is fetched rather than silently ignored. No test names a kernel
version: :func:`release` reads it from what is unpacked, :func:`expected` gives the figures
measured on the pinned package (``None`` when fetch-corpus had to fall back to another one).
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from paths import REPO

Kind = Literal["x86_64", "i386", "x86_64-6.12"]

FETCH_SCRIPT = REPO / "scripts" / "fetch-corpus"
PINS_FILE = REPO / "scripts" / "corpus-pins"
PV_SECTION = b".parainstructions"

# Kind -> the prefix of its keys in scripts/corpus-pins, and the fetch-corpus option for it.
_PREFIX: dict[str, str] = {"x86_64": "X86_64", "i386": "I386", "x86_64-6.12": "X86_64_612"}
_OPTION: dict[str, list[str]] = {"x86_64": [], "i386": ["--i386"], "x86_64-6.12": ["--612"]}


@dataclass(frozen=True)
class Pin:
    """One kind's pinned Debian package and the figures measured on it."""

    package: str
    version: str
    arch: str
    expect: dict[str, int]

    @property
    def deb(self) -> str:
        """The .deb file name apt-get download gives it (as fetch-corpus records it)."""
        return f"{self.package}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def parse_pins(text: str) -> dict[str, str]:
    """KEY=VALUE lines as bash reads them here: bare or single-quoted values, ``#`` comments."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{PINS_FILE}:{number}: not a KEY=VALUE line: {raw!r}")
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif any(c in value for c in " \t'\"$`\\;#"):
            raise ValueError(f"{PINS_FILE}:{number}: quote the value in single quotes: {raw!r}")
        values[key] = value
    return values


@functools.cache
def _pins() -> dict[str, str]:
    return parse_pins(PINS_FILE.read_text())


def pin(kind: Kind) -> Pin:
    """The package scripts/corpus-pins pins for ``kind``."""
    prefix = _PREFIX[kind] + "_"
    values = _pins()
    expect = {
        key.removeprefix(prefix + "EXPECT_"): int(value)
        for key, value in values.items()
        if key.startswith(prefix + "EXPECT_")
    }
    return Pin(
        values[prefix + "PACKAGE"], values[prefix + "VERSION"], values[prefix + "ARCH"], expect
    )


def corpus_root() -> Path:
    env = os.environ.get("PVPATCH_CORPUS")
    return Path(env) if env else Path.home() / ".cache" / "pvpatch-corpus"


def unpacked(kind: Kind) -> str | None:
    """The .deb file name fetch-corpus unpacked for ``kind`` (None when nothing is)."""
    marker = corpus_root() / kind / ".complete"
    return marker.read_text().strip() if marker.is_file() else None


def is_pinned(kind: Kind) -> bool:
    """True when the unpacked package is exactly the pinned one (no fallback happened)."""
    return unpacked(kind) == pin(kind).deb


def _ready(kind: Kind) -> bool:
    root = corpus_root() / kind
    if unpacked(kind) is None or not (root / "lib" / "modules").is_dir():
        return False
    return (root / "vmlinux").is_file()


# Kinds checked in this process: a fallback corpus asks fetch-corpus once, not per test.
_ensured: set[str] = set()


def ensure(kind: Kind) -> Path:
    """Return ``corpus_root()/kind``, running scripts/fetch-corpus first unless the pinned
    package is there (it replaces another version, or keeps a fallback with a warning)."""
    if kind not in _ensured:
        if not (_ready(kind) and is_pinned(kind)):
            subprocess.run(
                [str(FETCH_SCRIPT), *_OPTION[kind]], check=True, stdout=subprocess.DEVNULL
            )
            _modules.cache_clear()
            _pv_modules.cache_clear()
            if not _ready(kind):
                raise RuntimeError(f"{FETCH_SCRIPT} ran but {corpus_root() / kind} is incomplete")
        _ensured.add(kind)
    return corpus_root() / kind


def expected(kind: Kind, what: str) -> int | None:
    """A figure measured on the pinned package (``EXPECT_<what>`` in scripts/corpus-pins),
    or None when the unpacked package is another one (after a fallback)."""
    ensure(kind)
    return pin(kind).expect[what] if is_pinned(kind) else None


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
    """Kernel release of the unpacked package, e.g. ``6.1.0-57-cloud-amd64``."""
    ensure(kind)
    dirs = sorted((corpus_root() / kind / "lib" / "modules").iterdir())
    return dirs[-1].name


@functools.cache
def _modules(kind: Kind, suffix: str = ".ko") -> tuple[Path, ...]:
    return tuple(sorted((corpus_root() / kind / "lib" / "modules").rglob("*" + suffix)))


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


def x86_64_612_vmlinux() -> Path:
    """The 6.12 vmlinux (extracted from the zstd bzImage)."""
    return ensure("x86_64-6.12") / "vmlinux"


def x86_64_612_modules() -> list[Path]:
    """Every 6.12 module, as shipped: ``*.ko.xz``, sorted."""
    ensure("x86_64-6.12")
    return list(_modules("x86_64-6.12", ".ko.xz"))


def x86_64_headers() -> Path:
    """Debian's kernel headers for the x86_64 kind's kernel, as `make -C` takes them (the
    packages pinned in X86_64_HEADERS_PACKAGES, unpacked by ``fetch-corpus --headers``,
    which also installs make, gcc-12 and linux-kbuild-6.1 when missing)."""
    ensure("x86_64")
    pins = _pins()
    stamp = f"{pins['X86_64_HEADERS_PACKAGES']}={pins['X86_64_VERSION']}"
    root = corpus_root() / "x86_64-headers"
    marker = root / ".complete"
    name = pins["X86_64_HEADERS_PACKAGES"].split()[0].partition(":")[0]
    path = root / "usr" / "src" / name
    # The headers' scripts/ reach the installed linux-kbuild: a machine without it (or
    # without make or gcc-12) asks fetch-corpus again, which installs them.
    tools = all(shutil.which(c) for c in ("make", "gcc-12")) and (path / "scripts").is_dir()
    if not (marker.is_file() and marker.read_text().strip() == stamp and tools):
        subprocess.run([str(FETCH_SCRIPT), "--headers"], check=True, stdout=subprocess.DEVNULL)
    if not (path / "Makefile").is_file():
        raise RuntimeError(f"{FETCH_SCRIPT} --headers ran but {path} has no Makefile")
    return path
