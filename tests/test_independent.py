"""Self-checks of the independent decoder (tests/independent.py) on the real corpus.

These pin down what the corpus looks like, so that tests/test_corpus_scan.py compares pvpatch
against a decoder that is known to read the data right.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import corpus
import independent

# Exact totals for the packages seen so far; other releases only get the floors below.
KNOWN_TOTALS: dict[str, tuple[int, int]] = {
    "6.1.0-56-cloud-amd64": (54, 486),
    "6.1.0-50-686-pae": (94, 2588),
}
KNOWN_VMLINUX_SITES = {"6.1.0-56-cloud-amd64": 3679}
X86_64_SECTIONS = {".text", ".init.text", ".noinstr.text", ".text.unlikely"}


@functools.cache
def _decoded(kind: corpus.Kind) -> tuple[independent.Decoded, ...]:
    mods = corpus.x86_64_pv_modules() if kind == "x86_64" else corpus.i386_pv_modules()
    return tuple(independent.decode(p) for p in mods)


def _sites(kind: corpus.Kind) -> list[independent.Site]:
    return [s for d in _decoded(kind) for s in d.sites]


def test_x86_64_totals() -> None:
    decoded = _decoded("x86_64")
    sites = _sites("x86_64")
    assert len(decoded) > 40
    assert len(sites) > 400
    known = KNOWN_TOTALS.get(corpus.release("x86_64"))
    if known:
        assert (len(decoded), len(sites)) == known
    assert {s.section for s in sites} <= X86_64_SECTIONS


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


def test_x86_64_module_files_are_signed() -> None:
    # Debian signs every module; the signature trails the ELF data (a patcher must cope).
    for path in corpus.x86_64_pv_modules():
        assert path.read_bytes().endswith(b"~Module signature appended~\n"), path


def test_vmlinux() -> None:
    vmlinux = corpus.x86_64_vmlinux()
    assert vmlinux is not None
    d = independent.decode(vmlinux)
    assert (d.arch, d.elf_type, d.entry_size) == ("x86_64", "EXEC", 16)
    assert d.table is not None and d.table.size == 16 * len(d.sites)
    assert len(d.sites) > 3000
    known = KNOWN_VMLINUX_SITES.get(corpus.release("x86_64"))
    if known:
        assert len(d.sites) == known
    assert {s.section for s in d.sites} <= {".text", ".init.text"}
    assert all(s.len == 6 and s.bytes.startswith("ff15") for s in d.sites)
    assert {s.clobbers for s in d.sites} == {0x1, 0x1FF}
    # The image is stripped, but every call must go through one pv_ops base: slot * 8 away.
    bases = Counter(s.target - 8 * s.type for s in d.sites if s.target is not None)
    assert len(bases) == 1 and sum(bases.values()) == len(d.sites), bases


def test_i386_totals_and_shape() -> None:
    decoded = _decoded("i386")
    sites = _sites("i386")
    assert len(decoded) > 40
    assert len(sites) > 400
    known = KNOWN_TOTALS.get(corpus.release("i386"))
    if known:
        assert (len(decoded), len(sites)) == known
    for d in decoded:
        assert (d.arch, d.elf_type, d.entry_size) == ("i386", "REL", 8)
        assert d.table is not None and d.table.size == 8 * len(d.sites)
        for s in d.sites:
            where = f"{d.path.name}[{s.index}]"
            assert s.bytes.startswith("ff15") and s.len == 6, where
            assert s.clobbers == 0xF, where  # CLBR_ANY on i386
            assert s.slot == s.type, where


def test_has_section_agrees_with_readelf() -> None:
    # The fast struct-based filter in corpus.py must match readelf on a sample.
    mods = corpus.x86_64_modules()
    for path in mods[:: max(1, len(mods) // 60)] + corpus.x86_64_pv_modules()[:5]:
        names = {s.name for s in independent.sections(Path(path))}
        assert corpus.has_section(path) == (independent.TABLE in names), path
