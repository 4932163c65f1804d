"""Self-checks of the independent decoder (tests/independent.py) on the real corpus.

These pin down what the corpus looks like, so that tests/test_corpus_scan.py compares pvpatch
against a decoder that is known to read the data right.
"""

from __future__ import annotations

import functools
import subprocess
from collections import Counter
from pathlib import Path

import corpus
import independent
import pytest

X86_64_SECTIONS = {".text", ".init.text", ".noinstr.text", ".text.unlikely"}


@functools.cache
def _decoded(kind: corpus.Kind) -> tuple[independent.Decoded, ...]:
    mods = corpus.x86_64_pv_modules() if kind == "x86_64" else corpus.i386_pv_modules()
    return tuple(independent.decode(p) for p in mods)


def _sites(kind: corpus.Kind) -> list[independent.Site]:
    return [s for d in _decoded(kind) for s in d.sites]


def _expected(kind: corpus.Kind, what: str) -> int:
    """The figure scripts/corpus-pins records for the pinned package; skips (this exact count
    only) when fetch-corpus fell back to another package."""
    value = corpus.expected(kind, what)
    if value is None:
        pytest.skip(
            f"{kind}: the unpacked {corpus.unpacked(kind)} is not the pinned"
            f" {corpus.pin(kind).deb} (fetch-corpus fell back): no exact {what} figure for it"
        )
    return value


@pytest.mark.corpus
def test_x86_64_totals() -> None:
    decoded = _decoded("x86_64")
    sites = _sites("x86_64")
    assert len(decoded) > 40
    assert len(sites) > 400
    assert {s.section for s in sites} <= X86_64_SECTIONS


@pytest.mark.corpus
def test_x86_64_exact_totals() -> None:
    want = (_expected("x86_64", "MODULES"), _expected("x86_64", "SITES"))
    assert (len(_decoded("x86_64")), len(_sites("x86_64"))) == want, corpus.release("x86_64")


@pytest.mark.corpus
def test_x86_64_site_shape() -> None:
    for d in _decoded("x86_64"):
        assert (d.arch, d.elf_type, d.entry_size) == ("x86_64", "REL", 16)
        assert d.table is not None and d.table.size == 16 * len(d.sites)
        for s in d.sites:
            where = f"{d.path.name}[{s.index}]"
            assert s.bytes.startswith("ff15"), where
            assert s.len == 6, where
            assert s.clobbers in {0x1, 0x1FF}, where
            assert s.raw_pointer == 0, where  # RELA: the address is all in the relocation
            assert s.address is None, where
            assert s.slot == s.type, where


@pytest.mark.corpus
def test_x86_64_module_files_are_signed() -> None:
    # Debian signs every module; the signature trails the ELF data (a patcher must cope).
    for path in corpus.x86_64_pv_modules():
        assert path.read_bytes().endswith(b"~Module signature appended~\n"), path


@pytest.mark.corpus
def test_vmlinux() -> None:
    vmlinux = corpus.x86_64_vmlinux()
    assert vmlinux is not None
    d = independent.decode(vmlinux)
    assert (d.arch, d.elf_type, d.entry_size) == ("x86_64", "EXEC", 16)
    assert d.table is not None and d.table.size == 16 * len(d.sites)
    assert len(d.sites) > 3000
    assert {s.section for s in d.sites} <= {".text", ".init.text"}
    assert all(s.len == 6 and s.bytes.startswith("ff15") for s in d.sites)
    assert {s.clobbers for s in d.sites} == {0x1, 0x1FF}
    # The image is stripped, but every call must go through one pv_ops base: slot * 8 away.
    bases = Counter(s.target - 8 * s.type for s in d.sites if s.target is not None)
    assert len(bases) == 1 and sum(bases.values()) == len(d.sites), bases


@pytest.mark.corpus
def test_vmlinux_exact_sites() -> None:
    vmlinux = corpus.x86_64_vmlinux()
    assert vmlinux is not None
    want = _expected("x86_64", "VMLINUX_SITES")
    assert len(independent.decode(vmlinux).sites) == want, corpus.release("x86_64")


@pytest.mark.corpus
def test_i386_totals_and_shape() -> None:
    decoded = _decoded("i386")
    sites = _sites("i386")
    assert len(decoded) > 40
    assert len(sites) > 400
    for d in decoded:
        assert (d.arch, d.elf_type, d.entry_size) == ("i386", "REL", 8)
        assert d.table is not None and d.table.size == 8 * len(d.sites)
        for s in d.sites:
            where = f"{d.path.name}[{s.index}]"
            assert s.bytes.startswith("ff15") and s.len == 6, where
            assert s.clobbers == 0xF, where  # CLBR_ANY on i386
            assert s.slot == s.type, where


@pytest.mark.corpus
def test_i386_exact_totals() -> None:
    want = (_expected("i386", "MODULES"), _expected("i386", "SITES"))
    assert (len(_decoded("i386")), len(_sites("i386"))) == want, corpus.release("i386")


@pytest.mark.corpus
def test_i386_vmlinux_exact_sites() -> None:
    vmlinux = corpus.i386_vmlinux()
    assert vmlinux is not None
    want = _expected("i386", "VMLINUX_SITES")
    d = independent.decode(vmlinux)
    assert (d.arch, d.elf_type, d.entry_size) == ("i386", "EXEC", 8)
    assert len(d.sites) == want, corpus.release("i386")


@pytest.mark.corpus
def test_has_section_agrees_with_readelf() -> None:
    # The fast struct-based filter in corpus.py must match readelf on a sample.
    mods = corpus.x86_64_modules()
    for path in mods[:: max(1, len(mods) // 60)] + corpus.x86_64_pv_modules()[:5]:
        names = {s.name for s in independent.sections(Path(path))}
        assert corpus.has_section(path) == (independent.TABLE in names), path


def test_pins_read_alike_by_bash_and_python() -> None:
    # fetch-corpus sources scripts/corpus-pins, tests/corpus.py parses it: same values.
    script = f"set -a; source {corpus.PINS_FILE}; env -0"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    from_bash = dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)
    from_python = corpus.parse_pins(corpus.PINS_FILE.read_text())
    assert {k: from_bash.get(k) for k in from_python} == from_python
    for kind in ("x86_64", "i386", "x86_64-6.12"):
        pin = corpus.pin(kind)
        assert pin.deb.startswith(f"{pin.package}_{pin.version}_"), pin
    assert set(corpus.pin("x86_64").expect) == {"MODULES", "SITES", "VMLINUX_SITES"}
