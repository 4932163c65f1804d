"""GNU binutils as the independent side of the tests: `as` encodes, `readelf` decodes,
`ld` links and eu-elflint judges what pvpatch writes."""

from __future__ import annotations

import re
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from elftools.elf.elffile import ELFFile

from pvpatch.arch import Arch


@cache
def gas(arch_name: str, text: str) -> bytes:
    """Assemble with GNU as and return .text: the independent encoder."""
    flags = ["--64"] if arch_name == "x86_64" else ["--32", "-march=i686+nop"]
    with_src = ".text\n" + text.replace(";", "\n") + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "a.o"
        proc = subprocess.run(["as", *flags, "-o", str(obj), "-"], input=with_src.encode(),
                              capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        with obj.open("rb") as fh:
            sec = ELFFile(fh).get_section_by_name(".text")
            assert sec is not None
            return bytes(sec.data())


def readelf_relocs(path: Path) -> dict[str, set[tuple[int, str, str]]]:
    out: dict[str, set[tuple[int, str, str]]] = {}
    current = None
    for line in subprocess.run(["readelf", "-r", "-W", str(path)], capture_output=True,
                               text=True, check=True).stdout.splitlines():
        m = re.match(r"Relocation section '\.rela?(\S+)'", line)
        if m:
            current = out.setdefault(m.group(1), set())
            continue
        parts = line.split()
        if current is not None and len(parts) >= 3 and re.fullmatch(r"[0-9a-f]+", parts[0]):
            sym = " ".join(parts[4:]) if len(parts) > 4 else ""
            current.add((int(parts[0], 16), parts[2], sym))
    return out


def elflint(path: Path) -> set[str]:
    proc = subprocess.run(["eu-elflint", "--gnu-ld", "-q", str(path)], capture_output=True,
                          text=True)
    # relocation numbers shift when relocations are removed before them
    return {re.sub(r"relocation \d+", "relocation N", ln)
            for ln in (proc.stdout + proc.stderr).splitlines()}


def check_links(path: Path, arch: Arch, tmp: Path, original: Path | None = None) -> None:
    emul = ["-m", "elf_i386"] if arch.name == "i386" else []
    proc = subprocess.run(["ld", *emul, "-r", "-o", str(tmp / "linked.o"), str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    proc = subprocess.run(["readelf", "-a", "-W", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    # eu-elflint may dislike the input already (Linux notes in modules): the output must
    # not add complaints.
    baseline = elflint(original) if original is not None else set()
    assert elflint(path) <= baseline
