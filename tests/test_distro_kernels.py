"""Kernels as distributions ship them: no BTF, no DWARF, no .symtab.  The ops are named
from the image's own release string, checked against what the sites say."""

from __future__ import annotations

import subprocess
from pathlib import Path

import corpus
import pytest

import pvpatch
from pvpatch.elf import ElfFile
from pvpatch.ops import builtin_catalog
from pvpatch.opsource import catalog_fits, kernel_release
from pvpatch.scan import scan_elf

pytestmark = pytest.mark.corpus


def _without_btf(src: Path, tmp: Path) -> Path:
    out = tmp / f"{src.parent.name}-nobtf"
    subprocess.run(["objcopy", "--remove-section", ".BTF", str(src), str(out)], check=True)
    return out


def _banner(path: Path) -> str:
    """The release from `strings`, an independent reader of the banner."""
    out = subprocess.run(["strings", "-n", "16", str(path)], capture_output=True, text=True,
                         check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("Linux version ") and " (" in ln)
    return line.split()[2]


@pytest.mark.parametrize("kind", ["i386", "x86_64", "x86_64-6.12"])
def test_release_names_every_site(kind: str, tmp_path: Path) -> None:
    vmlinux = (corpus.i386_vmlinux() if kind == "i386" else corpus.x86_64_vmlinux()
               if kind == "x86_64" else corpus.x86_64_612_vmlinux())
    assert vmlinux is not None
    path = vmlinux if kind == "i386" else _without_btf(vmlinux, tmp_path)
    elf = ElfFile.open(path)
    assert elf.section(".BTF") is None and elf.symtab is None
    assert kernel_release(elf) == _banner(path) == corpus.release(kind)
    result = pvpatch.load(path)
    assert result.ops is not None and f"(release {corpus.release(kind)})" in result.ops.name
    assert result.sites and all(s.op is not None for s in result.sites)
    if kind == "i386":
        want = corpus.expected("i386", "VMLINUX_SITES")
        assert want is None or len(result.sites) == want
    # the names agree with the image's own BTF where it has one
    if kind != "i386":
        btf = pvpatch.load(vmlinux).ops
        assert btf is not None and btf.same_layout(builtin_catalog(
            result.ops.name.split(" ")[0].removeprefix("catalog:")))


def test_a_wrong_release_guess_is_dropped(tmp_path: Path) -> None:
    """A 6.12 image whose banner claims 6.1: the 6.1 catalog contradicts the native forms
    the table carries (slots from 47 on moved), so nothing is named rather than misnamed."""
    src = _without_btf(corpus.x86_64_612_vmlinux(), tmp_path)
    data = bytearray(src.read_bytes())
    release = corpus.release("x86_64-6.12").encode()
    fake = b"6.1.0-99-cloud-amd64"
    fake += b"+" * (len(release) - len(fake))  # same length: nothing else moves
    at = data.find(b"Linux version " + release)
    assert at > 0
    data[at + 14 : at + 14 + len(release)] = fake
    path = tmp_path / "liar"
    path.write_bytes(bytes(data))
    elf = ElfFile.open(path)
    assert kernel_release(elf) == fake.decode()
    assert not catalog_fits(scan_elf(elf, ops=builtin_catalog("linux-6.1-x86_64")))
    result = pvpatch.load(path)
    assert result.ops is None and result.sites  # the sites are still found, unnamed
