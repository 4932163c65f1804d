"""Writing ELF files: the writer beside the bounds-checked reader (`pvpatch.elf.reader`).

One model, as objtool's `elf.c` has: an `ElfWriter` starts as the input file, and
sections are changed, grown or added, program headers replaced, symbols inserted
(locals before `sh_info`, every index that names a later symbol renumbered),
relocation sections emitted and `.dynamic` entries set; `build` lays the result out.
Sections that still fit are written in place, grown and new ones are appended, so
everything not edited stays byte-identical.  RELR (packed relative relocations) is
encoded and decoded here, both directions in one place.

What to write is the caller's business (`pvpatch.rewrite.stage`): this module knows the
format, not paravirt.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import RewriteError
from ..record import record
from .reader import (
    SHF_GROUP,
    SHF_INFO_LINK,
    SHN_LORESERVE,
    SHN_XINDEX,
    SHT_GROUP,
    SHT_REL,
    SHT_RELA,
    SHT_SYMTAB_SHNDX,
    ElfClass,
    ElfFile,
    Relocation,
    Section,
)

MAX_SECTION_ALIGN = 1 << 16  # most a moved section may be aligned to (padding is zeros)
DT_RELA, DT_REL, DT_RELACOUNT, DT_RELCOUNT, DT_RELRSZ = 7, 17, 0x6FFFFFF9, 0x6FFFFFFA, 35
EHDR_FIELDS = ("e_ident", "e_type", "e_machine", "e_version", "e_entry", "e_phoff", "e_shoff",
               "e_flags", "e_ehsize", "e_phentsize", "e_phnum", "e_shentsize", "e_shnum",
               "e_shstrndx")


def align_up(value: int, align: int) -> int:
    return value if align <= 1 else (value + align - 1) // align * align


# -- section headers and the output file ---------------------------------------


@dataclass
class SectionHeader:
    """A section header while the output is assembled (mutable: `build` lays it out)."""

    sh_name: int
    sh_type: int
    sh_flags: int
    sh_addr: int
    sh_offset: int
    sh_size: int
    sh_link: int
    sh_info: int
    sh_addralign: int
    sh_entsize: int
    data: bytes | None = None  # new contents; None = unchanged
    name: str = ""

    @classmethod
    def of(cls, s: Section) -> SectionHeader:
        return cls(s.name_offset, s.type, s.flags, s.addr, s.offset, s.size, s.link, s.info,
                   s.addralign, s.entsize, None, s.name)

    def fields(self) -> tuple[int, ...]:
        return (self.sh_name, self.sh_type, self.sh_flags, self.sh_addr, self.sh_offset,
                self.sh_size, self.sh_link, self.sh_info, self.sh_addralign, self.sh_entsize)


@record
class ProgramHeaders:
    """A new program header table: where it goes in the file and its packed rows."""

    offset: int
    rows: tuple[bytes, ...]


class ElfWriter:
    """Assembles the output file: original bytes, changed and new sections, headers."""

    def __init__(self, elf: ElfFile) -> None:
        self.elf = elf
        # The output starts as the input (less any signature).  Changes that keep
        # the layout are recorded as edits; the whole image is built only when
        # something must be appended or moved, which for a large linked file is
        # the exception.
        self._buf: bytearray | None = None
        self.edits: list[tuple[int, bytes]] = []
        self.headers = [SectionHeader.of(s) for s in elf.sections]
        self.new_sections: list[SectionHeader] = []
        self.program_headers: ProgramHeaders | None = None

    @property
    def image(self) -> bytearray:
        """The whole output image so far (made from the input and the edits on first use)."""
        if self._buf is None:
            self._buf = bytearray(self.elf.data[: self.elf.content_end])
            for offset, data in self.edits:
                self._buf[offset : offset + len(data)] = data
            self.edits = []
        return self._buf

    def poke(self, offset: int, data: bytes) -> None:
        """Overwrite bytes at a file offset."""
        if self._buf is None:
            self.edits.append((offset, data))
        else:
            self._buf[offset : offset + len(data)] = data

    def set_data(self, index: int, data: bytes) -> None:
        self.headers[index].data = data

    def section_data(self, index: int) -> bytes:
        """A section's contents as this output has them (changed, or the input's)."""
        current = self.headers[index].data
        return current if current is not None else self.elf.section_data(self.elf.sections[index])

    def add_section(self, name: str, *, sh_type: int, sh_flags: int = 0, sh_addr: int = 0,
                    sh_link: int = 0, sh_info: int = 0, sh_addralign: int = 1,
                    sh_entsize: int = 0) -> int:
        """A new, empty section (appended to the header table); returns its index."""
        sh = SectionHeader(0, sh_type, sh_flags, sh_addr, 0, 0, sh_link, sh_info, sh_addralign,
                           sh_entsize, b"", name)
        self.headers.append(sh)
        self.new_sections.append(sh)
        return len(self.headers) - 1

    def add_relocation_section(self, target: int, symtab: int, rela: bool) -> int:
        """A new `.rela<name>` / `.rel<name>` section for section `target` (in its COMDAT
        group, if it is in one: gABI); returns its index, contents to be set."""
        elf = self.elf
        name = (".rela" if rela else ".rel") + (
            self.headers[target].name or elf.sections[target].name)
        in_group = target < len(elf.sections) and bool(elf.sections[target].flags & SHF_GROUP)
        cls = elf.cls
        index = self.add_section(
            name, sh_type=SHT_RELA if rela else SHT_REL,
            sh_flags=SHF_INFO_LINK | (SHF_GROUP if in_group else 0),
            sh_link=symtab, sh_info=target, sh_addralign=cls.addr.size,
            sh_entsize=(cls.rela if rela else cls.rel).size,
        )
        if in_group:
            self._join_group(target, index)
        return index

    def _join_group(self, member: int, new: int) -> None:
        """Add section `new` to the group that lists `member`."""
        for sec in self.elf.sections:
            if sec.type != SHT_GROUP:
                continue
            data = self.section_data(sec.index)
            members = [v for (v,) in struct.iter_unpack("<I", data[4 : len(data) // 4 * 4])]
            if member in members:
                self.set_data(sec.index, data + struct.pack("<I", new))
                return

    def set_program_headers(self, offset: int, rows: Iterable[bytes]) -> None:
        """Replace the program header table by `rows`, written at file offset `offset`."""
        self.program_headers = ProgramHeaders(offset, tuple(rows))

    def set_dynamic(self, index: int, value: int) -> None:
        """Set the d_val (d_ptr) of `.dynamic` entry `index`."""
        sec = self.elf.section(".dynamic")
        assert sec is not None
        word = self.elf.cls.addr.size
        data = bytearray(self.section_data(sec.index))
        at = index * 2 * word + word
        data[at : at + word] = value.to_bytes(word, "little")
        self.set_data(sec.index, bytes(data))

    def _append(self, data: bytes, align: int) -> int:
        if align > MAX_SECTION_ALIGN:
            raise RewriteError(f"a section to move asks for {align}-byte alignment, more than "
                               f"{MAX_SECTION_ALIGN}", self.elf.path)
        buf = self.image
        pos = align_up(len(buf), max(align, 1))
        buf.extend(bytes(pos - len(buf)))
        buf.extend(data)
        return pos

    def build(self) -> bytes | None:
        """The output image, or None when `edits` applied to the input make it."""
        elf = self.elf
        if self.new_sections:
            shstr = self.headers[elf.shstrndx]
            # Start from the table as this rewrite left it: LLVM objects keep symbol
            # names in the same section, which may have grown already.
            table = bytearray(self.section_data(elf.shstrndx))
            for sh in self.new_sections:
                sh.sh_name = len(table)
                table += sh.name.encode() + b"\0"
            shstr.data = bytes(table)
        for i, sh in enumerate(self.headers):
            if sh.data is None:
                continue
            old = elf.sections[i] if i < len(elf.sections) else None
            room = old.file_size if old is not None else 0
            if old is not None and len(sh.data) <= room:
                # Fits where it was: write in place, clear what it no longer uses.
                self.poke(old.offset, sh.data + bytes(room - len(sh.data)))
            else:
                if old is not None and room:
                    self.image[old.offset : old.offset + room] = bytes(room)
                sh.sh_offset = self._append(sh.data, sh.sh_addralign)
            sh.sh_size = len(sh.data)
        if self.program_headers is not None:
            self._write_phdrs(self.program_headers)
        self._write_shdrs()
        if self._buf is None and self.elf.content_end == len(self.elf.data):
            return None
        return bytes(self.image)

    def _write_phdrs(self, table: ProgramHeaders) -> None:
        blob = b"".join(table.rows)
        self.image[table.offset : table.offset + len(blob)] = blob
        self._patch_ehdr(e_phoff=table.offset, e_phnum=len(table.rows))

    def _write_shdrs(self) -> None:
        elf = self.elf
        fmt = elf.cls.shdr
        blob = b"".join(fmt.pack(*sh.fields()) for sh in self.headers)
        if len(self.headers) == len(elf.sections):
            if blob != elf.data[elf.e_shoff : elf.e_shoff + len(blob)]:
                self.poke(elf.e_shoff, blob)
            return
        old_len = len(elf.sections) * fmt.size
        self.image[elf.e_shoff : elf.e_shoff + old_len] = bytes(old_len)
        count = len(self.headers)
        if count >= SHN_LORESERVE:
            # Extended numbering (gABI): e_shnum is 0 and section 0's sh_size holds the
            # count; an e_shstrndx of SHN_XINDEX already points at its sh_link.
            self.headers[0].sh_size = count
            blob = b"".join(fmt.pack(*sh.fields()) for sh in self.headers)
        shoff = self._append(blob, 8)
        self._patch_ehdr(e_shoff=shoff, e_shnum=count if count < SHN_LORESERVE else 0)

    def _patch_ehdr(self, **values: int) -> None:
        cls = self.elf.cls
        rec = list(cls.ehdr.unpack_from(self.image, 0))
        for k, v in values.items():
            rec[EHDR_FIELDS.index(k)] = v
        cls.ehdr.pack_into(self.image, 0, *rec)


def pack_program_header(cls: ElfClass, p_type: int, p_flags: int, p_offset: int, p_vaddr: int,
                        p_paddr: int, p_filesz: int, p_memsz: int, p_align: int) -> bytes:
    # Physical addresses are derived by subtraction: wrap them as the field does.
    p_paddr &= (1 << cls.bits) - 1
    return cls.pack_phdr(p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz,
                         p_align)


# -- relocations ---------------------------------------------------------------------


def pack_relocations(cls: ElfClass, rela: bool, relocs: Iterable[Relocation]) -> bytes:
    """Elf_Rela (or Elf_Rel: the addend stays in the place) records."""
    if rela:
        return b"".join(cls.rela.pack(r.offset, cls.r_info(r.sym, r.type), r.addend)
                        for r in relocs)
    return b"".join(cls.rel.pack(r.offset, cls.r_info(r.sym, r.type)) for r in relocs)


# -- symbols ---------------------------------------------------------------------------


class NewSymbol(NamedTuple):
    """An Elf_Sym to add, its name as a string (`SymbolTable` puts it in the string table)."""

    name: str
    st_info: int
    st_other: int
    st_shndx: int  # SHN_UNDEF or a real section number, past 0xfeff too
    st_value: int
    st_size: int


class SymbolEntry(NamedTuple):
    """An input Elf_Sym's fields as stored (`st_name` an offset in the string table,
    `st_shndx` SHN_XINDEX when the real number is in `.symtab_shndx`)."""

    st_name: int
    st_info: int
    st_other: int
    st_shndx: int
    st_value: int
    st_size: int


class SymbolTable:
    """A `.symtab` being edited: records updated in place, new local symbols inserted
    before the first global (gABI: locals first, `sh_info` is one past the last local),
    new globals appended; `write` emits it with its string table, `.symtab_shndx`, and
    the groups whose signature symbol moved."""

    def __init__(self, elf: ElfFile, symtab: Section) -> None:
        self.elf = elf
        self.section = symtab
        self.first_global = symtab.info
        self.raw = elf.section_data(symtab)
        self.locals: list[NewSymbol] = []
        self.globals: list[NewSymbol] = []
        self._edited: bytearray | None = None

    @staticmethod
    def extendable(elf: ElfFile, symtab: Section) -> bool:
        """Whether symbols can be inserted consistently (a string table, whole records,
        `sh_info` inside the table)."""
        size = elf.cls.sym.size
        raw_len = symtab.size
        return 0 < symtab.link < len(elf.sections) and symtab.info * size <= raw_len and \
            raw_len % size == 0

    @property
    def count(self) -> int:
        return len(self.raw) // self.elf.cls.sym.size

    def entry(self, index: int) -> SymbolEntry:
        """The fields of input symbol `index`."""
        return SymbolEntry._make(self.elf.cls.unpack_sym(self.raw, index * self.elf.cls.sym.size))

    def update(self, index: int, st_value: int, st_size: int) -> None:
        """Give input symbol `index` a new value and size."""
        cls = self.elf.cls
        if self._edited is None:
            self._edited = bytearray(self.raw)
        name, info, other, shndx, _value, _size = cls.unpack_sym(self._edited,
                                                                 index * cls.sym.size)
        self._edited[index * cls.sym.size : (index + 1) * cls.sym.size] = cls.pack_sym(
            name, info, other, shndx, st_value, st_size)

    def write(self, out: ElfWriter) -> None:
        elf, symtab = self.elf, self.section
        raw = bytes(self._edited) if self._edited is not None else self.raw
        if not self.locals and not self.globals:
            if self._edited is not None:
                out.set_data(symtab.index, raw)
            return
        cls = elf.cls
        size = cls.sym.size
        strsec = elf.sections[symtab.link]
        strtab = bytearray(elf.section_data(strsec))

        def pack(sym: NewSymbol) -> bytes:
            name_off = len(strtab)
            strtab.extend(sym.name.encode() + b"\0")
            # One past 0xfeff is written as SHN_XINDEX, the number going to .symtab_shndx.
            shndx = SHN_XINDEX if sym.st_shndx >= SHN_LORESERVE else sym.st_shndx
            return cls.pack_sym(name_off, sym.st_info, sym.st_other, shndx, sym.st_value,
                                sym.st_size)

        def xindex(syms: list[NewSymbol]) -> bytes:
            return b"".join(struct.pack("<I", s.st_shndx if s.st_shndx >= SHN_LORESERVE else 0)
                            for s in syms)

        fg = self.first_global
        locals_blob = b"".join(pack(s) for s in self.locals)
        globals_blob = b"".join(pack(s) for s in self.globals)
        out.set_data(symtab.index, raw[: fg * size] + locals_blob + raw[fg * size :] +
                     globals_blob)
        out.headers[symtab.index].sh_info = fg + len(self.locals)
        out.set_data(strsec.index, bytes(strtab))
        shndx_sec = elf.symtab_shndx(symtab)
        new_x = xindex(self.locals), xindex(self.globals)
        if shndx_sec is not None:
            data = elf.section_data(shndx_sec)
            out.set_data(shndx_sec.index, data[: fg * 4] + new_x[0] + data[fg * 4 :] + new_x[1])
        elif any(new_x[0]) or any(new_x[1]):
            # The first symbol in a section numbered past 0xfeff: the file gains the
            # table (every earlier symbol's index fits its own field, so theirs are 0).
            idx = out.add_section(".symtab_shndx", sh_type=SHT_SYMTAB_SHNDX,
                                  sh_link=symtab.index, sh_addralign=4, sh_entsize=4)
            out.set_data(idx, bytes(4 * fg) + new_x[0] + bytes(4 * (self.count - fg)) +
                         new_x[1])
        for sec in elf.sections:
            if sec.type == SHT_GROUP and sec.link == symtab.index and sec.info >= fg:
                out.headers[sec.index].sh_info = sec.info + len(self.locals)

    def renumber_relocations(self, out: ElfWriter) -> None:
        """Rewrite every relocation section that names this table's symbols to the new
        numbering (records kept as they are otherwise; a partial last one too)."""
        elf, cls = self.elf, self.elf.cls
        shift, fg = len(self.locals), self.first_global
        for relsec in elf.sections:
            if relsec.type not in (SHT_REL, SHT_RELA) or relsec.link != self.section.index:
                continue
            fmt = cls.rela if relsec.type == SHT_RELA else cls.rel
            rows = []
            data = elf.section_data(relsec)
            whole = len(data) - len(data) % fmt.size
            for rec in fmt.iter_unpack(data[:whole]):
                sym, rtype = cls.split_info(rec[1])
                rows.append(fmt.pack(rec[0], cls.r_info(sym + shift if sym >= fg else sym,
                                                        rtype), *rec[2:]))
            out.set_data(relsec.index, b"".join(rows) + data[whole:])


# -- .dynamic --------------------------------------------------------------------------


class DynamicEntry(NamedTuple):
    d_tag: int
    d_val: int


def dynamic_entries(elf: ElfFile, sec: Section | None = None) -> list[DynamicEntry]:
    """The entries of a dynamic section (default: the file's `.dynamic`; none without one)."""
    if sec is None:
        sec = elf.section(".dynamic")
    if sec is None:
        return []
    word = elf.cls.addr.size
    data = elf.section_data(sec)
    fmt = "<qQ" if word == 8 else "<iI"
    return [DynamicEntry(t, v) for t, v in
            struct.iter_unpack(fmt, data[: len(data) // (2 * word) * 2 * word])]


# -- RELR ------------------------------------------------------------------------------


def decode_relr(data: bytes, word: int) -> Iterator[int]:
    """The addresses a RELR table relocates: an even entry is an address, an odd one a
    bitmap of the (word * 8 - 1) words that follow the last address or bitmap."""
    bits = word * 8 - 1
    fmt = "<Q" if word == 8 else "<I"
    base = 0
    for (entry,) in struct.iter_unpack(fmt, data[: len(data) // word * word]):
        if entry & 1 == 0:
            yield entry
            base = entry + word
        else:
            bitmap, i = entry >> 1, 0
            while bitmap:
                if bitmap & 1:
                    yield base + i * word
                bitmap >>= 1
                i += 1
            base += bits * word


def encode_relr(addrs: Sequence[int], word: int) -> bytes:
    """Encode sorted, word-aligned addresses as RELR: an address, then bitmaps of the
    following words (bit 0 set marks a bitmap)."""
    bits = word * 8 - 1
    fmt = "<Q" if word == 8 else "<I"
    out = bytearray()
    i = 0
    addrs = sorted(addrs)
    while i < len(addrs):
        base = addrs[i]
        out += struct.pack(fmt, base)
        i += 1
        base += word
        while True:
            bitmap = 0
            while i < len(addrs) and addrs[i] - base < bits * word and \
                    (addrs[i] - base) % word == 0:
                bitmap |= 1 << ((addrs[i] - base) // word)
                i += 1
            if not bitmap:
                break
            out += struct.pack(fmt, (bitmap << 1) | 1)
            base += bits * word
    return bytes(out)
