"""Writing ELF files: the writer beside the bounds-checked reader (`pvpatch.elf`)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .elf import SHN_LORESERVE, ElfFile, Section
from .errors import RewriteError

MAX_SECTION_ALIGN = 1 << 16  # most a moved section may be aligned to (padding is zeros)


def _align(value: int, align: int) -> int:
    return value if align <= 1 else (value + align - 1) // align * align


# -- section header bookkeeping -------------------------------------------


@dataclass
class _Shdr:
    """A mutable section header while the output is assembled."""

    name: int
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int
    data: bytes | None = None  # new contents; None = unchanged
    name_str: str = ""

    @classmethod
    def of(cls, s: Section) -> _Shdr:
        return cls(s.name_offset, s.type, s.flags, s.addr, s.offset, s.size, s.link, s.info,
                   s.addralign, s.entsize, None, s.name)

    def fields(self) -> tuple[int, ...]:
        return (self.name, self.type, self.flags, self.addr, self.offset, self.size, self.link,
                self.info, self.addralign, self.entsize)


class _Output:
    """Assembles the output file: original bytes, changed and new sections, headers."""

    def __init__(self, elf: ElfFile) -> None:
        self.elf = elf
        # The output starts as the input (less any signature).  Changes that keep
        # the layout are recorded as edits; the whole image is built only when
        # something must be appended or moved, which for a large linked file is
        # the exception.
        self._buf: bytearray | None = None
        self.edits: list[tuple[int, bytes]] = []
        self.shdrs = [_Shdr.of(s) for s in elf.sections]
        self.new_names: list[tuple[_Shdr, str]] = []
        self.phdr_change: tuple[int, int, list[bytes]] | None = None

    @property
    def out(self) -> bytearray:
        if self._buf is None:
            self._buf = bytearray(self.elf.data[: self.elf.content_end])
            for offset, data in self.edits:
                self._buf[offset : offset + len(data)] = data
            self.edits = []
        return self._buf

    def poke(self, offset: int, data: bytes) -> None:
        if self._buf is None:
            self.edits.append((offset, data))
        else:
            self._buf[offset : offset + len(data)] = data

    def set_data(self, index: int, data: bytes) -> None:
        self.shdrs[index].data = data

    def add_section(self, name: str, **fields: int) -> int:
        sh = _Shdr(0, fields["type"], fields.get("flags", 0), fields.get("addr", 0), 0, 0,
                   fields.get("link", 0), fields.get("info", 0), fields.get("addralign", 1),
                   fields.get("entsize", 0), b"", name)
        self.shdrs.append(sh)
        self.new_names.append((sh, name))
        return len(self.shdrs) - 1

    def _append(self, data: bytes, align: int) -> int:
        if align > MAX_SECTION_ALIGN:
            raise RewriteError(f"a section to move asks for {align}-byte alignment, more than "
                               f"{MAX_SECTION_ALIGN}", self.elf.path)
        buf = self.out
        pos = _align(len(buf), max(align, 1))
        buf.extend(bytes(pos - len(buf)))
        buf.extend(data)
        return pos

    def build(self) -> bytes | None:
        """The output image, or None when `edits` applied to the input make it."""
        elf = self.elf
        if self.new_names:
            shstr = self.shdrs[elf.shstrndx]
            # Start from the table as this rewrite left it: LLVM objects keep symbol
            # names in the same section, which may have grown already.
            table = bytearray(shstr.data if shstr.data is not None
                              else elf.section_data(elf.sections[elf.shstrndx]))
            for sh, name in self.new_names:
                sh.name = len(table)
                table += name.encode() + b"\0"
            shstr.data = bytes(table)
        for i, sh in enumerate(self.shdrs):
            if sh.data is None:
                continue
            old = elf.sections[i] if i < len(elf.sections) else None
            room = old.file_size if old is not None else 0
            if old is not None and len(sh.data) <= room:
                # Fits where it was: write in place, clear what it no longer uses.
                self.poke(old.offset, sh.data + bytes(room - len(sh.data)))
            else:
                if old is not None and room:
                    self.out[old.offset : old.offset + room] = bytes(room)
                sh.offset = self._append(sh.data, sh.addralign)
            sh.size = len(sh.data)
        if self.phdr_change is not None:
            self._write_phdrs()
        self._write_shdrs()
        if self._buf is None and self.elf.content_end == len(self.elf.data):
            return None
        return bytes(self.out)

    def _write_phdrs(self) -> None:
        assert self.phdr_change is not None
        phoff, phnum, rows = self.phdr_change
        blob = b"".join(rows)
        self.out[phoff : phoff + len(blob)] = blob
        self._patch_ehdr(e_phoff=phoff, e_phnum=phnum)

    def _write_shdrs(self) -> None:
        elf = self.elf
        fmt = elf.cls.shdr
        blob = b"".join(fmt.pack(*sh.fields()) for sh in self.shdrs)
        if len(self.shdrs) == len(elf.sections):
            if blob != elf.data[elf.e_shoff : elf.e_shoff + len(blob)]:
                self.poke(elf.e_shoff, blob)
            return
        old_len = len(elf.sections) * fmt.size
        self.out[elf.e_shoff : elf.e_shoff + old_len] = bytes(old_len)
        count = len(self.shdrs)
        if count >= SHN_LORESERVE:
            # Extended numbering (gABI): e_shnum is 0 and section 0's sh_size holds the
            # count; an e_shstrndx of SHN_XINDEX already points at its sh_link.
            self.shdrs[0].size = count
            blob = b"".join(fmt.pack(*sh.fields()) for sh in self.shdrs)
        shoff = self._append(blob, 8)
        self._patch_ehdr(e_shoff=shoff, e_shnum=count if count < SHN_LORESERVE else 0)

    def _patch_ehdr(self, **values: int) -> None:
        elf = self.elf
        names = ("ident", "e_type", "e_machine", "e_version", "e_entry", "e_phoff", "e_shoff",
                 "e_flags", "e_ehsize", "e_phentsize", "e_phnum", "e_shentsize", "e_shnum",
                 "e_shstrndx")
        rec = list(elf.cls.ehdr.unpack_from(self.out, 0))
        for k, v in values.items():
            rec[names.index(k)] = v
        elf.cls.ehdr.pack_into(self.out, 0, *rec)



def _encode_relr(addrs: list[int], word: int) -> bytes:
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
