"""pvpatch.elf.writer on its own: what it writes is what binutils reads back."""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

import pytest
from gnu import check_links, readelf_relocs
from paths import FIX

from pvpatch.elf.reader import (
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHN_UNDEF,
    SHT_PROGBITS,
    SHT_REL,
    SHT_RELA,
    STB_GLOBAL,
    STB_LOCAL,
    STT_FUNC,
    STT_NOTYPE,
    ElfFile,
)
from pvpatch.elf.writer import ElfWriter, NewSymbol, SymbolTable, decode_relr, encode_relr


def _readelf(*args: str) -> str:
    proc = subprocess.run(["readelf", *args], capture_output=True, text=True, check=True)
    assert not proc.stderr.strip(), proc.stderr
    return proc.stdout


def test_an_added_section_is_what_readelf_shows(arch: str, tmp_path: Path) -> None:
    src = FIX / arch / "prog.o"
    elf = ElfFile.open(src)
    out = ElfWriter(elf)
    index = out.add_section(".pvpatch.test", sh_type=SHT_PROGBITS,
                            sh_flags=SHF_ALLOC | SHF_EXECINSTR, sh_addralign=16)
    body = bytes(range(37))
    out.set_data(index, body)
    image = out.build()
    assert image is not None
    path = tmp_path / "added.o"
    path.write_bytes(image)
    table = _readelf("-S", "-W", str(path))
    m = re.search(r"\[\s*(\d+)\] \.pvpatch\.test\s+PROGBITS\s+0+ ([0-9a-f]+) ([0-9a-f]+) 00\s+"
                  r"AX\s+0\s+0\s+16\n", table)
    assert m, table
    assert int(m.group(1)) == index == len(elf.sections)
    offset, size = int(m.group(2), 16), int(m.group(3), 16)
    assert size == len(body) and offset % 16 == 0
    assert image[offset : offset + size] == body
    # every section the input had keeps its bytes (the name table only gains the new name)
    again = ElfFile(image, str(path))
    for sec in elf.sections:
        new = again.section_data(again.sections[sec.index])
        if sec.index == elf.shstrndx:
            assert new == elf.section_data(sec) + b".pvpatch.test\0"
        else:
            assert new == elf.section_data(sec), sec.name
    check_links(path, elf.arch, tmp_path, src)


def _symbols(path: Path) -> list[tuple[str, str, str, str]]:
    """(type, bind, ndx, name) of each .symtab entry, in index order, as readelf shows them."""
    rows = []
    for line in _readelf("-s", "-W", str(path)).split("Symbol table '.symtab'")[1].splitlines():
        f = line.split()
        if len(f) >= 7 and f[0].endswith(":") and f[0][:-1].isdigit():
            rows.append((f[3], f[4], f[6], f[7] if len(f) > 7 else ""))
    return rows


def test_locals_go_before_the_globals_and_relocations_follow(arch: str, tmp_path: Path) -> None:
    src = FIX / arch / "prog.o"
    elf = ElfFile.open(src)
    symtab, text = elf.symtab, elf.section(".text")
    assert symtab is not None and text is not None
    first_global = symtab.info
    before = ElfFile.open(src)
    relsecs = [s for s in elf.sections if s.type in (SHT_REL, SHT_RELA) and
               s.link == symtab.index]
    names_global = [r for s in relsecs for r in elf.relocations(s) if r.sym >= first_global]
    assert names_global, "prog.o names no global in a relocation: the test proves nothing"
    out = ElfWriter(elf)
    table = SymbolTable(elf, symtab)
    table.locals += [NewSymbol("pv_new_a", STB_LOCAL << 4 | STT_FUNC, 0, text.index, 0, 1),
                     NewSymbol("pv_new_b", STB_LOCAL << 4 | STT_FUNC, 0, text.index, 4, 2)]
    table.globals.append(NewSymbol("pv_new_undef", STB_GLOBAL << 4 | STT_NOTYPE, 0, SHN_UNDEF,
                                   0, 0))
    table.write(out)
    table.renumber_relocations(out)
    image = out.build()
    assert image is not None
    path = tmp_path / "symbols.o"
    path.write_bytes(image)
    # readelf names the same symbol at every place as in the input: the indices followed
    assert readelf_relocs(path) == readelf_relocs(src)
    old, new = _symbols(src), _symbols(path)
    assert new[:first_global] == old[:first_global]
    assert new[first_global : first_global + 2] == [
        ("FUNC", "LOCAL", str(text.index), "pv_new_a"),
        ("FUNC", "LOCAL", str(text.index), "pv_new_b")]
    assert new[first_global + 2 : -1] == old[first_global:]
    assert new[-1] == ("NOTYPE", "GLOBAL", "UND", "pv_new_undef")
    after = ElfFile(image, str(path))
    assert after.symtab is not None and after.symtab.info == first_global + 2
    for sec in before.sections:
        if sec.type in (SHT_REL, SHT_RELA) and sec.link == symtab.index:
            assert [r.sym for r in after.relocations(after.sections[sec.index])] == \
                [r.sym + 2 if r.sym >= first_global else r.sym for r in before.relocations(sec)]
    check_links(path, elf.arch, tmp_path, src)


@pytest.mark.parametrize("word", [4, 8])
def test_relr_encode_then_decode_gives_the_addresses_back(word: int) -> None:
    rng = random.Random(word)
    for _ in range(300):
        count = rng.randrange(0, 200)
        addrs = sorted({0x1000 + rng.randrange(0, 3000) * word for _ in range(count)})
        assert list(decode_relr(encode_relr(addrs, word), word)) == addrs
    # A run of consecutive words: one address, then bitmaps of word * 8 - 1 words each.
    bits = word * 8 - 1
    run = [0x2000 + k * word for k in range(1 + 2 * bits + 2)]
    packed = encode_relr(run, word)
    assert len(packed) == 4 * word
    assert list(decode_relr(packed, word)) == run
    # Words that are not word-aligned to the last base cannot share a bitmap.
    odd = [0x1000, 0x1000 + word + 2]
    assert list(decode_relr(encode_relr(odd, word), word)) == odd


POINTERS_C = "int a = 1, b = 2; int *p[] = {&a, &b, &a, 0, &b, &a};\n" \
    "int main(void) { return *p[0] - 1; }\n"


def test_relr_decoding_agrees_with_readelf(arch: str, tmp_path: Path) -> None:
    """A -z pack-relative-relocs link: the addresses decoded are readelf's, and encoding them
    again gives the linker's bytes."""
    m32 = ["-m32"] if arch == "i386" else []
    (tmp_path / "p.c").write_text(POINTERS_C)
    exe = tmp_path / "p"
    proc = subprocess.run(["gcc", *m32, "-O2", "-fPIE", "-pie", "-Wl,-z,pack-relative-relocs",
                           str(tmp_path / "p.c"), "-o", str(exe)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"the toolchain cannot link with -z pack-relative-relocs: {proc.stderr}")
    elf = ElfFile.open(exe)
    relr = elf.section(".relr.dyn")
    if relr is None:
        pytest.skip("the linker made no .relr.dyn")
    listed = _readelf("-r", "-W", str(exe)).split("Relocation section '.relr.dyn'")[1]
    want = [int(ln, 16) for ln in (x.strip() for x in listed.splitlines()[2:])
            if re.fullmatch(r"[0-9a-f]+", ln)]
    got = list(elf.relr_addresses(relr))
    assert got == want and len(got) >= 6
    assert encode_relr(got, elf.cls.addr.size) == elf.section_data(relr)
