"""Exported kernel symbols of a linked kernel image, read from `__ksymtab{,_gpl}`.

Distribution images carry no `.symtab`, but every exported symbol's address is in
the export table.  `struct kernel_symbol` changed shape over the years: pointers
(value, name) before 4.19, then 32-bit offsets relative to each field (x86 selects
HAVE_ARCH_PREL32_RELOCATIONS on both architectures), plus a namespace field from
5.4.  The shape is the one whose every name lands in `__ksymtab_strings`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from .reader import ElfFile, Section

_TABLES = ("__ksymtab", "__ksymtab_gpl")


def exported_symbols(elf: ElfFile) -> dict[str, int]:
    """Exported name -> address, for a linked image; empty when it has no export table."""
    if elf.is_relocatable:
        return {}
    strings = elf.section("__ksymtab_strings")
    if strings is None:
        return {}
    out: dict[str, int] = {}
    for name in _TABLES:
        sec = elf.section(name)
        if sec is None or sec.size == 0:
            continue
        for sym, addr in _entries(elf, sec, strings):
            out[sym] = addr
    return out


def export_address(elf: ElfFile, name: str) -> int | None:
    """The address of one exported symbol, without decoding the whole export table: the
    name is found in `__ksymtab_strings` first, then the entry whose name field points at
    it (a vmlinux exports some ten thousand symbols; pvpatch needs one or two)."""
    if elf.is_relocatable:
        return None
    strings = elf.section("__ksymtab_strings")
    if strings is None:
        return None
    sdata = elf.section_data(strings)
    want = name.encode() + b"\0"
    targets = set()
    at = sdata.find(want)
    while at >= 0:
        if at == 0 or sdata[at - 1] == 0:
            targets.add(strings.addr + at)
        at = sdata.find(want, at + 1)
    if not targets:
        return None
    for table in _TABLES:
        sec = elf.section(table)
        if sec is None or sec.size == 0:
            continue
        found = _find_entry(elf, sec, strings, targets)
        if found is not None:
            return found
    return None


def _find_entry(elf: ElfFile, sec: Section, strings: Section, targets: set[int]) -> int | None:
    data = elf.section_data(sec)
    wrap = elf.arch.wrap
    for esize, prel in _shapes(elf.arch.ptr_size):
        count, rest = divmod(len(data), esize)
        if rest or not count:
            continue
        if prel:
            fmt = struct.Struct("<ii" + "x" * (esize - 8))
            for i, (value, name) in enumerate(fmt.iter_unpack(data)):
                base = sec.addr + i * esize
                if wrap(base + 4 + name) in targets:
                    return wrap(base + value)
        else:
            w = "Q" if elf.arch.ptr_size == 8 else "I"
            fmt = struct.Struct(f"<{w}{w}" + "x" * (esize - 2 * elf.arch.ptr_size))
            for value, name in fmt.iter_unpack(data):
                if name in targets:
                    return int(value)
    return None


def _shapes(ptr: int) -> tuple[tuple[int, bool], ...]:
    """(entry size, self-relative) candidates, most recent first."""
    return ((12, True), (8, True), (3 * ptr, False), (2 * ptr, False))


def _entries(elf: ElfFile, sec: Section, strings: Section) -> Iterator[tuple[str, int]]:
    data = elf.section_data(sec)
    word = elf.arch.word
    ptr = elf.arch.ptr_size

    def fields(i: int, esize: int, prel: bool) -> tuple[int, int]:
        at = i * esize
        if prel:
            value, name = struct.unpack_from("<ii", data, at)
            base = sec.addr + at
            return elf.arch.wrap(base + value), elf.arch.wrap(base + 4 + name)
        return int(word.unpack_from(data, at)[0]), int(word.unpack_from(data, at + ptr)[0])

    def in_strings(addr: int) -> bool:
        return strings.addr <= addr < strings.addr + strings.size

    for esize, prel in _shapes(ptr):
        count, rest = divmod(len(data), esize)
        if rest or not count:
            continue
        # Cheap test first (both ends), then every entry.
        if not (in_strings(fields(0, esize, prel)[1])
                and in_strings(fields(count - 1, esize, prel)[1])):
            continue
        rows = [fields(i, esize, prel) for i in range(count)]
        if not all(in_strings(n) for _v, n in rows):
            continue
        sdata = elf.section_data(strings)
        for value, name_addr in rows:
            at = name_addr - strings.addr
            end = sdata.find(b"\0", at)
            if end < 0:
                continue
            yield sdata[at:end].decode("utf-8", "replace"), value
        return
