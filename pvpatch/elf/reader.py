"""The load stage: a small, bounds-checked, lazily parsed ELF model.

Only what pvpatch needs: headers, sections, segments, symbols, relocations
(REL and RELA, with implicit addends read from the bytes) and dynamic RELATIVE
relocations.  Every size, offset and count read from the file is checked
against the file before it is used, so a hostile file gives `ElfFormatError`,
never an IndexError or an allocation the size of a forged header field.
"""

from __future__ import annotations

import itertools
import mmap
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from operator import itemgetter
from typing import Any, Literal, NamedTuple

from ..arch import BY_MACHINE, Arch
from ..errors import ElfFormatError, InputError
from ..record import record
from .compress import MAX_DECOMPRESSED, unpack

# What `ElfFile.data` holds: the bytes given, or a read-only map of the opened file.
# Both slice to `bytes`; only the operations the two share are used on it.
Buffer = bytes | mmap.mmap

ELF_MAGIC = b"\x7fELF"
MODULE_SIG_MAGIC = b"~Module signature appended~\n"
MODULE_SIG_INFO_SIZE = 12  # struct module_signature

ET_REL, ET_EXEC, ET_DYN = 1, 2, 3
ELF_TYPE_NAMES = {ET_REL: "REL", ET_EXEC: "EXEC", ET_DYN: "DYN"}

SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA = 0, 1, 2, 3, 4
SHT_NOBITS, SHT_REL, SHT_DYNSYM, SHT_GROUP, SHT_SYMTAB_SHNDX, SHT_RELR = 8, 9, 11, 17, 18, 19
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR, SHF_INFO_LINK, SHF_GROUP = 0x1, 0x2, 0x4, 0x40, 0x200
SHN_UNDEF, SHN_LORESERVE, SHN_ABS, SHN_COMMON, SHN_XINDEX = 0, 0xFF00, 0xFFF1, 0xFFF2, 0xFFFF
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE = 0, 1, 2, 3, 4
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
PT_LOAD, PT_DYNAMIC, PT_NOTE, PT_PHDR, PT_GNU_PROPERTY = 1, 2, 4, 6, 0x6474E553
PF_X, PF_W, PF_R = 1, 2, 4


@record
class ElfClass:
    """Record formats of one ELF class (32 or 64 bit), little-endian.

    The classes order some records' fields differently; `*_fields` reorder a raw
    record into one canonical order and `*_raw` back, so callers never test the class.
    """

    bits: int
    ehdr: struct.Struct
    shdr: struct.Struct
    phdr: struct.Struct
    sym: struct.Struct
    rel: struct.Struct
    rela: struct.Struct
    addr: struct.Struct
    info_shift: int  # r_info = sym << shift | type
    # raw Elf_Sym -> (name, info, other, shndx, value, size), and back
    sym_fields: itemgetter[Any]
    sym_raw: itemgetter[Any]
    # raw Elf_Phdr -> (type, flags, offset, vaddr, paddr, filesz, memsz, align), and back
    phdr_fields: itemgetter[Any]
    phdr_raw: itemgetter[Any]
    note_align: int  # GNU property notes pad to the word size

    def r_info(self, sym: int, rtype: int) -> int:
        return (sym << self.info_shift) | rtype

    def split_info(self, info: int) -> tuple[int, int]:
        return info >> self.info_shift, info & ((1 << self.info_shift) - 1)

    def unpack_sym(self, data: Buffer | bytearray,
                   offset: int) -> tuple[int, int, int, int, int, int]:
        """(name, info, other, shndx, value, size) of the symbol record at `offset`."""
        return self.sym_fields(self.sym.unpack_from(data, offset))  # type: ignore[no-any-return]

    def pack_sym(self, name: int, info: int, other: int, shndx: int, value: int,
                 size: int) -> bytes:
        return self.sym.pack(*self.sym_raw((name, info, other, shndx, value, size)))

    def pack_phdr(self, ptype: int, flags: int, offset: int, vaddr: int, paddr: int,
                  filesz: int, memsz: int, align: int) -> bytes:
        return self.phdr.pack(*self.phdr_raw(
            (ptype, flags, offset, vaddr, paddr, filesz, memsz, align)))


_IDENTITY6 = itemgetter(0, 1, 2, 3, 4, 5)
_IDENTITY8 = itemgetter(0, 1, 2, 3, 4, 5, 6, 7)
ELF64 = ElfClass(
    64,
    ehdr=struct.Struct("<16sHHIQQQIHHHHHH"),
    shdr=struct.Struct("<IIQQQQIIQQ"),
    phdr=struct.Struct("<IIQQQQQQ"),
    sym=struct.Struct("<IBBHQQ"),  # name info other shndx value size
    rel=struct.Struct("<QQ"),
    rela=struct.Struct("<QQq"),
    addr=struct.Struct("<Q"),
    info_shift=32,
    sym_fields=_IDENTITY6,
    sym_raw=_IDENTITY6,
    phdr_fields=_IDENTITY8,  # type flags offset vaddr paddr filesz memsz align
    phdr_raw=_IDENTITY8,
    note_align=8,
)
ELF32 = ElfClass(
    32,
    ehdr=struct.Struct("<16sHHIIIIIHHHHHH"),
    shdr=struct.Struct("<IIIIIIIIII"),
    phdr=struct.Struct("<IIIIIIII"),
    sym=struct.Struct("<IIIBBH"),  # name value size info other shndx
    rel=struct.Struct("<II"),
    rela=struct.Struct("<IIi"),
    addr=struct.Struct("<I"),
    info_shift=8,
    sym_fields=itemgetter(0, 3, 4, 5, 1, 2),
    sym_raw=itemgetter(0, 4, 5, 1, 2, 3),
    # raw Elf32_Phdr order: type offset vaddr paddr filesz memsz flags align
    phdr_fields=itemgetter(0, 6, 1, 2, 3, 4, 5, 7),
    phdr_raw=itemgetter(0, 2, 3, 4, 5, 6, 1, 7),
    note_align=4,
)


@record
class Section:
    """One section header, as the file has it."""

    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int
    name_offset: int

    @property
    def is_alloc(self) -> bool:
        return bool(self.flags & SHF_ALLOC)

    @property
    def is_exec(self) -> bool:
        return bool(self.flags & SHF_EXECINSTR)

    @property
    def file_size(self) -> int:
        """Bytes the section occupies in the file (NOBITS occupies none)."""
        return 0 if self.type in (SHT_NOBITS, SHT_NULL) else self.size

    def contains_addr(self, addr: int) -> bool:
        return self.addr <= addr < self.addr + self.size


@record
class Segment:
    """One program header, as the file has it."""

    index: int
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True, slots=True)
class Symbol:
    """One symbol table entry, its name resolved."""

    index: int
    name: str
    value: int
    size: int
    type: int
    bind: int
    other: int
    shndx: int  # as stored: SHN_XINDEX means "see section_index"
    name_offset: int
    section_index: int  # the real section index (from .symtab_shndx under SHN_XINDEX)

    @property
    def defined(self) -> bool:
        """Defined in a section of this file (not undefined, absolute or common)."""
        return self.shndx != SHN_UNDEF and (self.shndx < SHN_LORESERVE
                                            or self.shndx == SHN_XINDEX)


class Relocation(NamedTuple):
    """One relocation; for REL sections `addend` is the implicit one read from the bytes."""

    offset: int
    type: int
    sym: int
    addend: int


@record
class FileIdentity:
    """Which file on disk, and which version of it: a copy is taken from the path only
    while these still match."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@record
class ModuleSignature:
    """An appended kernel module signature: the trailer starts at `offset`."""

    offset: int  # first byte of the signature blob: the ELF content ends here
    sig_len: int


ElfKind = Literal["x86", "foreign", "not-elf"]
_X86_MACHINES = frozenset(machine for machine, _bits in BY_MACHINE)


def path_text(path: str | os.PathLike[str]) -> str:
    """`str(pathlib.Path(path))`, without importing pathlib on every run (it brings in
    urllib and ipaddress): repeated and trailing slashes and `.` parts dropped, `..`
    kept, and a leading `//` kept, as POSIX allows.  Names in messages and reports are
    written this way."""
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"a path must be a str or an os.PathLike of str, not "
                        f"{type(text).__name__!r}")
    root = ""
    if text.startswith("/"):
        root = "//" if text.startswith("//") and not text.startswith("///") else "/"
    parts = [part for part in text.split("/") if part and part != "."]
    return root + "/".join(parts) if root or parts else "."


def elf_kind(data: bytes) -> ElfKind:
    """Sort a file before parsing: ELF for another machine is not ours to judge (firmware
    and host tools share build trees with modules), but an x86 file that fails to parse,
    or one too broken to say its machine, is a finding."""
    if data[:4] != ELF_MAGIC:
        return "not-elf"
    if len(data) >= 20 and data[4] in (1, 2) and data[5] in (1, 2):
        machine = int.from_bytes(data[18:20], "little" if data[5] == 1 else "big")
        if data[5] == 2 or machine not in _X86_MACHINES:
            return "foreign"
    return "x86"


def linked_elf(path: str) -> bool:
    """A quick look at a file's header: is it an ELF executable or shared object?
    (False for anything else, unreadable files included.)"""
    try:
        # Only a regular file: reading a pipe's first bytes would take them from the load.
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            head = fh.read(18)
    except OSError:
        return False
    return (len(head) == 18 and head[:4] == ELF_MAGIC and head[5] == 1
            and int.from_bytes(head[16:18], "little") in (ET_EXEC, ET_DYN))


class ElfFile:
    """A read-only view of one ELF file.  Parsing beyond the headers is lazy."""

    e_type: int
    e_machine: int
    e_entry: int
    e_phoff: int
    e_shoff: int
    e_flags: int
    e_phentsize: int
    e_phnum: int
    e_shentsize: int
    e_shnum: int
    e_shstrndx: int

    def __init__(self, data: Buffer, path: str = "<memory>",
                 identity: FileIdentity | None = None, *,
                 compression: str | None = None) -> None:
        self.path = path
        self.data: Buffer = data
        # Which file, and which version of it, `data` was loaded from (None: given in
        # memory).  Uncompressed, `data` maps that file, so a writer may copy it in the
        # kernel; compressed, it may only check that the file did not change.
        self.identity = identity
        # The container `data` was decompressed from ("xz", "zstd", "gzip"; see
        # compress.py), None for a plain file: the output is written in the same one.
        self.compression = compression
        self._parse_header()
        self.sections: tuple[Section, ...] = self._parse_sections()
        self.segments: tuple[Segment, ...] = self._parse_segments()
        self._by_name = {s.name: s for s in reversed(self.sections)}
        self._relocs: dict[int, tuple[Relocation, ...]] = {}

    # -- construction ----------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *,
             max_decompressed: int = MAX_DECOMPRESSED) -> ElfFile:
        """Open a file read-only.  A regular file is mapped rather than read: a
        53 MB vmlinux costs nothing up front, and only the pages pvpatch reads
        are touched.  A compressed file (`.ko.xz`, `.ko.zst`, `.ko.gz`, known by its
        magic) is decompressed into memory, refused past `max_decompressed` bytes or
        16 MiB past the end of the ELF file its headers describe (compress.TRAILER_MAX)."""
        p = path_text(path)
        try:
            with open(p, "rb") as fh:  # read-only: the input is never opened for writing
                st = os.fstat(fh.fileno())
                if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                    try:
                        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                    except (OSError, ValueError):
                        pass  # a filesystem that cannot map files: read it instead
                    else:
                        return cls._from_map(mapped, fh.fileno(), p, FileIdentity.of(st),
                                             max_decompressed)
                data = fh.read()
        except FileNotFoundError:
            raise InputError("no such file", p) from None
        except IsADirectoryError:
            raise InputError("is a directory", p) from None
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", p) from None
        payload, compression = unpack(data, p, max_decompressed)
        return cls(payload, p, compression=compression)

    @classmethod
    def _from_map(cls, data: mmap.mmap, fd: int, path: str, identity: FileIdentity,
                  max_decompressed: int) -> ElfFile:
        """`open` of a mapped file."""
        try:
            payload, compression = unpack(data, path, max_decompressed)
        except BaseException:
            data.close()
            raise
        if compression is None:
            return cls(data, path, identity)
        data.close()  # the payload is a copy in memory
        # Rewritten in place while it was read, the stream may mix two versions (one
        # replaced by rename is still the file opened, and intact).
        if FileIdentity.of(os.fstat(fd)) != identity:
            raise InputError("changed while it was being read", path)
        return cls(payload, path, identity, compression=compression)

    def _fail(self, message: str) -> ElfFormatError:
        return ElfFormatError(message, self.path)

    def _parse_header(self) -> None:
        d = self.data
        if len(d) < 16 or d[:4] != ELF_MAGIC:
            raise InputError("not an ELF file", self.path)
        ei_class, ei_data = d[4], d[5]
        if ei_class not in (1, 2):
            raise self._fail(f"bad ELF class {ei_class}")
        if ei_data != 1:
            raise InputError("big-endian ELF is not supported (x86 is little-endian)", self.path)
        self.cls: ElfClass = ELF64 if ei_class == 2 else ELF32
        if len(d) < self.cls.ehdr.size:
            raise self._fail("truncated ELF header")
        (
            _ident,
            self.e_type,
            self.e_machine,
            _version,
            self.e_entry,
            self.e_phoff,
            self.e_shoff,
            self.e_flags,
            _ehsize,
            self.e_phentsize,
            self.e_phnum,
            self.e_shentsize,
            self.e_shnum,
            self.e_shstrndx,
        ) = self.cls.ehdr.unpack_from(d, 0)
        arch = BY_MACHINE.get((self.e_machine, self.cls.bits))
        if arch is None:
            raise InputError(
                f"unsupported machine {self.e_machine} in an ELF{self.cls.bits} file "
                "(pvpatch handles x86-64 and i386)",
                self.path,
            )
        self.arch: Arch = arch
        if self.e_type not in ELF_TYPE_NAMES:
            raise InputError(f"unsupported ELF type {self.e_type}", self.path)

    def _table_bounds(self, what: str, offset: int, count: int, entsize: int, want: int) -> None:
        if count == 0:
            return
        if entsize != want:
            raise self._fail(f"{what} entry size is {entsize}, expected {want}")
        if offset + count * entsize > len(self.data):
            raise self._fail(f"{what} table runs past the end of the file")

    def _parse_sections(self) -> tuple[Section, ...]:
        d, shdr = self.data, self.cls.shdr
        if self.e_shoff == 0:
            if self.e_shnum:
                raise self._fail("section count without a section header table")
            return ()
        if self.e_shoff + shdr.size > len(d):
            raise self._fail("section header table runs past the end of the file")
        count = self.e_shnum
        shstrndx = self.e_shstrndx
        if count == 0 or shstrndx == SHN_XINDEX:
            # Extended numbering: the real values live in section 0.
            first = shdr.unpack_from(d, self.e_shoff)
            if count == 0:
                count = first[5]
            if shstrndx == SHN_XINDEX:
                shstrndx = first[6]
        if count > len(d) // shdr.size:
            raise self._fail(f"section count {count} cannot fit in the file")
        self._table_bounds("section header", self.e_shoff, count, self.e_shentsize, shdr.size)
        raw = [shdr.unpack_from(d, self.e_shoff + i * shdr.size) for i in range(count)]
        for i, r in enumerate(raw):
            stype, offset, size, align = r[1], r[4], r[5], r[8]
            if stype not in (SHT_NOBITS, SHT_NULL) and offset + size > len(d):
                raise self._fail(f"section {i} data runs past the end of the file")
            if align & (align - 1):
                raise self._fail(f"section {i} alignment {align} is not a power of two")
        if not 0 <= shstrndx < count:
            raise self._fail(f"section name table index {shstrndx} out of range")
        self.shstrndx = shstrndx  # resolved through section 0 under extended numbering
        self._check_overlaps(raw)
        strtab = raw[shstrndx]
        if strtab[1] != SHT_STRTAB:
            raise self._fail("section name table is not a string table")
        names = d[strtab[4] : strtab[4] + strtab[5]]
        out = []
        for i, r in enumerate(raw):
            name = self._cstring(names, r[0], "section name") if i else ""
            out.append(Section(i, name, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[0]))
        return tuple(out)

    def _check_overlaps(self, raw: list[tuple[int, ...]]) -> None:
        """Sections must not share file bytes: a rewrite of one would change the other."""
        spans = sorted(
            (r[4], r[4] + r[5], i) for i, r in enumerate(raw)
            if r[1] not in (SHT_NOBITS, SHT_NULL) and r[5]
        )
        for (_s1, e1, i1), (s2, _e2, i2) in itertools.pairwise(spans):
            if s2 < e1:
                raise self._fail(f"sections {i1} and {i2} overlap in the file")
        count = len(raw)
        for i, r in enumerate(raw):
            stype, flags, link, info = r[1], r[2], r[6], r[7]
            if stype in (SHT_REL, SHT_RELA) and not flags & SHF_ALLOC:
                if info == i:
                    raise self._fail(f"relocation section {i} applies to itself")
                if not 0 <= info < count:
                    raise self._fail(f"relocation section {i} applies to section {info}, "
                                     f"out of range")
            if stype in (SHT_SYMTAB, SHT_DYNSYM) and info > r[5] // self.cls.sym.size:
                raise self._fail(f"symbol table {i} says its globals start at {info}, past "
                                 f"its {r[5] // self.cls.sym.size} symbols")
            if stype in (SHT_SYMTAB, SHT_REL, SHT_RELA, SHT_DYNSYM, SHT_SYMTAB_SHNDX,
                         SHT_GROUP):
                if link == i:
                    raise self._fail(f"section {i} links to itself")
                if not 0 <= link < count:
                    raise self._fail(f"section {i} links to section {link}, out of range")

    def _parse_segments(self) -> tuple[Segment, ...]:
        if self.e_phoff == 0 or self.e_phnum == 0:
            return ()
        ph = self.cls.phdr
        self._table_bounds("program header", self.e_phoff, self.e_phnum, self.e_phentsize, ph.size)
        out = []
        for i in range(self.e_phnum):
            ptype, flags, offset, vaddr, paddr, filesz, memsz, align = self.cls.phdr_fields(
                ph.unpack_from(self.data, self.e_phoff + i * ph.size))
            if ptype == PT_LOAD and (offset + filesz > len(self.data) or filesz > memsz):
                raise self._fail(f"loadable segment {i} runs past the end of the file")
            out.append(Segment(i, ptype, flags, offset, vaddr, paddr, filesz, memsz, align))
        return tuple(out)

    def _cstring(self, table: bytes, offset: int, what: str) -> str:
        if offset >= len(table) and offset:
            raise self._fail(f"{what} offset {offset} outside its string table")
        end = table.find(b"\0", offset)
        if end < 0:
            raise self._fail(f"{what} at {offset} has no terminating NUL")
        return table[offset:end].decode("utf-8", "replace")

    # -- basic queries -----------------------------------------------------

    @property
    def elf_type(self) -> str:
        return ELF_TYPE_NAMES[self.e_type]

    @property
    def is_relocatable(self) -> bool:
        return self.e_type == ET_REL

    def section(self, name: str) -> Section | None:
        return self._by_name.get(name)

    def section_at(self, index: int) -> Section:
        if not 0 <= index < len(self.sections):
            raise self._fail(f"section index {index} out of range")
        return self.sections[index]

    def section_data(self, sec: Section) -> bytes:
        if sec.type in (SHT_NOBITS, SHT_NULL):
            return b""
        return self.data[sec.offset : sec.offset + sec.size]

    def section_for_addr(self, addr: int, *, exec_only: bool = False) -> Section | None:
        """The allocated section whose address range holds `addr` (executables)."""
        for sec in self._alloc_sections:
            if sec.contains_addr(addr) and (sec.is_exec or not exec_only):
                return sec
        return None

    @cached_property
    def _alloc_sections(self) -> tuple[Section, ...]:
        return tuple(s for s in self.sections if s.is_alloc and s.size and s.type != SHT_NULL)

    def read_word(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.data):
            raise self._fail(f"read of {size} bytes at file offset {offset:#x} is out of bounds")
        return int.from_bytes(self.data[offset : offset + size], "little")

    def addr_to_offset(self, addr: int) -> int | None:
        sec = self.section_for_addr(addr)
        if sec is None or sec.type == SHT_NOBITS:
            return None
        return sec.offset + (addr - sec.addr)

    # -- symbols -----------------------------------------------------------

    @cached_property
    def symtab(self) -> Section | None:
        for sec in self.sections:
            if sec.type == SHT_SYMTAB:
                return sec
        return None

    @cached_property
    def symbols(self) -> tuple[Symbol, ...]:
        """The static symbol table (`.symtab`), or () when stripped."""
        sec = self.symtab
        return self._read_symbols(sec) if sec is not None else ()

    def _read_symbols(self, sec: Section) -> tuple[Symbol, ...]:
        fmt = self.cls.sym
        if sec.entsize != fmt.size or sec.size % fmt.size:
            raise self._fail(f"symbol table {sec.name!r} has a bad entry size")
        strsec = self.section_at(sec.link)
        if strsec.type != SHT_STRTAB:
            raise self._fail(f"symbol table {sec.name!r} links to a non-string section")
        strings = self.section_data(strsec)
        out = []
        data = self.data[sec.offset : sec.offset + sec.size]
        xindex = self._xindex_table(sec)
        fields = self.cls.sym_fields
        for i, rec in enumerate(fmt.iter_unpack(data)):
            name_off, info, other, shndx, value, size = fields(rec)
            name = self._cstring(strings, name_off, "symbol name") if name_off else ""
            real = shndx
            if shndx == SHN_XINDEX:
                if xindex is None or i * 4 + 4 > len(xindex):
                    raise self._fail(f"symbol {i} needs .symtab_shndx, which is missing or short")
                real = int.from_bytes(xindex[i * 4 : i * 4 + 4], "little")
            out.append(Symbol(i, name, value, size, info & 0xF, info >> 4, other, shndx,
                              name_off, real))
        return tuple(out)

    def symtab_shndx(self, symtab: Section) -> Section | None:
        """The SHT_SYMTAB_SHNDX section paired with `symtab` (files with > 0xff00 sections)."""
        for sec in self.sections:
            if sec.type == SHT_SYMTAB_SHNDX and sec.link == symtab.index:
                return sec
        return None

    def _xindex_table(self, symtab: Section) -> bytes | None:
        sec = self.symtab_shndx(symtab)
        return self.section_data(sec) if sec is not None else None

    def symbol(self, index: int) -> Symbol:
        syms = self.symbols
        if not 0 <= index < len(syms):
            raise self._fail(f"symbol index {index} out of range")
        return syms[index]

    def symbols_at(self, indices: Sequence[int]) -> Iterator[tuple[int, Symbol]]:
        """(index, symbol) for each of `indices` that `.symtab` has, read without the whole
        table (a module's few relocations name a few of its symbols); an entry only the
        whole table's reading can judge (a bad name, SHN_XINDEX) comes from `symbols`."""
        sec = self.symtab
        if sec is None or not indices:
            return
        fmt = self.cls.sym
        strsec = self.sections[sec.link] if sec.link < len(self.sections) else None
        if sec.entsize != fmt.size or sec.size % fmt.size or strsec is None \
                or strsec.type != SHT_STRTAB:
            keep = set(indices)
            yield from ((i, s) for i, s in enumerate(self.symbols) if i in keep)  # or its error
            return
        data = self.section_data(sec)
        strings = self.section_data(strsec)
        count = len(data) // fmt.size
        for i in indices:
            if i >= count:
                continue
            name_off, info, other, shndx, value, size = self.cls.unpack_sym(data, i * fmt.size)
            name = ""
            if name_off:
                stop = strings.find(b"\0", name_off)
                if name_off >= len(strings) or stop < 0:
                    yield i, self.symbols[i]  # the whole table's reading says what is wrong
                    continue
                name = strings[name_off:stop].decode("utf-8", "replace")
            if shndx == SHN_XINDEX:  # the real index is in .symtab_shndx
                yield i, self.symbols[i]
                continue
            yield i, Symbol(i, name, value, size, info & 0xF, info >> 4, other, shndx, name_off,
                            shndx)

    @cached_property
    def symbols_by_name(self) -> dict[str, Symbol]:
        out: dict[str, Symbol] = {}
        for s in self.symbols:
            # Prefer a definition over an undefined reference of the same name.
            if s.name and s.type != STT_FILE and (
                s.name not in out or out[s.name].shndx == SHN_UNDEF
            ):
                out[s.name] = s
        return out

    # -- relocations --------------------------------------------------------

    def relocation_sections(self, target: Section) -> list[Section]:
        """REL/RELA sections that apply to `target` (sh_info), in a relocatable file."""
        return [
            s
            for s in self.sections
            if s.type in (SHT_REL, SHT_RELA) and s.info == target.index and not s.is_alloc
        ]

    def relocations(self, relsec: Section) -> tuple[Relocation, ...]:
        """Decoded entries of one REL/RELA section; REL addends come from the target bytes."""
        cached = self._relocs.get(relsec.index)
        if cached is not None:
            return cached
        rela = relsec.type == SHT_RELA
        fmt = self.cls.rela if rela else self.cls.rel
        if relsec.entsize != fmt.size or relsec.size % fmt.size:
            raise self._fail(f"relocation section {relsec.name!r} has a bad entry size")
        data = self.data[relsec.offset : relsec.offset + relsec.size]
        shift = self.cls.info_shift
        tmask = (1 << shift) - 1
        nsyms = self._symbol_count(relsec)
        out: list[Relocation]
        # tuple.__new__ skips the NamedTuple's Python-level __new__: files have 100,000s.
        new, rel = tuple.__new__, Relocation
        if rela:
            out = [new(rel, (o, i & tmask, i >> shift, a)) for o, i, a in fmt.iter_unpack(data)]
        else:
            target = self.section_at(relsec.info) if relsec.info else None
            out = []
            for o, i in fmt.iter_unpack(data):
                rtype = i & tmask
                addend = self._implicit_addend(target, o, rtype)
                out.append(new(rel, (o, rtype, i >> shift, addend)))
        for r in out:
            if r.sym >= nsyms:
                raise self._fail(
                    f"relocation in {relsec.name!r} at {r.offset:#x} names symbol {r.sym}, "
                    f"but the symbol table has {nsyms}"
                )
        result = tuple(out)
        self._relocs[relsec.index] = result
        return result

    def _symbol_count(self, relsec: Section) -> int:
        if relsec.link == 0:
            return 1  # dynamic relocations of a file without symbols: only index 0 is valid
        symsec = self.section_at(relsec.link)
        if symsec.type not in (SHT_SYMTAB, SHT_DYNSYM):
            raise self._fail(f"relocation section {relsec.name!r} links to a non-symbol section")
        return symsec.size // self.cls.sym.size

    def _implicit_addend(self, target: Section | None, offset: int, rtype: int) -> int:
        width = self.arch.reloc(rtype).width
        if width == 0 or target is None:
            return 0
        if target.type == SHT_NOBITS or offset + width > target.size:
            raise self._fail(
                f"relocation at {offset:#x} runs past the end of section {target.name!r}"
            )
        raw = self.read_word(target.offset + offset, width)
        sign = 1 << (width * 8 - 1)
        return (raw ^ sign) - sign

    def relocations_for(self, target: Section) -> Iterator[Relocation]:
        for relsec in self.relocation_sections(target):
            yield from self.relocations(relsec)

    @cached_property
    def symbolic_dynamic_relocations(self) -> dict[int, tuple[int, str, int]]:
        """address -> (type, symbol name, addend) of load-time relocations naming a symbol.

        REL-style addends are read from the word at the address.
        """
        out: dict[int, tuple[int, str, int]] = {}
        for sec in self.sections:
            if not sec.is_alloc or sec.type not in (SHT_REL, SHT_RELA) or not sec.link:
                continue
            symsec = self.section_at(sec.link)
            if symsec.type not in (SHT_SYMTAB, SHT_DYNSYM):
                continue
            syms = self.dynamic_symbols(symsec)
            rela = sec.type == SHT_RELA
            fmt = self.cls.rela if rela else self.cls.rel
            if sec.size % fmt.size:
                raise self._fail(f"dynamic relocation section {sec.name!r} has a bad entry size")
            for rec in fmt.iter_unpack(self.section_data(sec)):
                sym, rtype = self.cls.split_info(rec[1])
                if sym == 0 or rtype == self.arch.r_relative:
                    continue
                if sym >= len(syms):
                    raise self._fail(f"dynamic relocation at {rec[0]:#x} names symbol {sym}, "
                                     f"but {symsec.name} has {len(syms)}")
                width = self.arch.reloc(rtype).width
                addend = rec[2] if rela else (
                    self._word_at_addr_sized(rec[0], width) if width else 0)
                out[rec[0]] = (rtype, syms[sym].name, addend)
        return out

    def dynamic_symbols(self, sec: Section) -> tuple[Symbol, ...]:
        """The entries of `sec` (a `.dynsym`, or any symbol table), read once."""
        cache = self.__dict__.setdefault("_dynsym_cache", {})
        if sec.index not in cache:
            cache[sec.index] = self._read_symbols(sec)
        result: tuple[Symbol, ...] = cache[sec.index]
        return result

    def _word_at_addr_sized(self, addr: int, width: int) -> int:
        off = self.addr_to_offset(addr)
        if off is None:
            raise self._fail(f"relocation at {addr:#x} is outside every section")
        raw = self.read_word(off, width)
        sign = 1 << (width * 8 - 1)
        return (raw ^ sign) - sign

    @cached_property
    def relative_relocations(self) -> dict[int, int]:
        """address -> value for every dynamic RELATIVE relocation (ET_DYN and friends).

        REL-style entries take their addend from the word already at the address.
        """
        out: dict[int, int] = {}
        rel_type = self.arch.r_relative
        for sec in self.sections:
            if not sec.is_alloc or sec.type not in (SHT_REL, SHT_RELA, SHT_RELR):
                continue
            if sec.type == SHT_RELR:
                for addr in self.relr_addresses(sec):
                    out[addr] = self._word_at_addr(addr)
                continue
            rela = sec.type == SHT_RELA
            fmt = self.cls.rela if rela else self.cls.rel
            if sec.entsize not in (0, fmt.size) or sec.size % fmt.size:
                raise self._fail(f"dynamic relocation section {sec.name!r} has a bad entry size")
            for rec in fmt.iter_unpack(self.section_data(sec)):
                _sym, rtype = self.cls.split_info(rec[1])
                if rtype != rel_type:
                    continue
                out[rec[0]] = rec[2] if rela else self._word_at_addr(rec[0])
        return out

    def _word_at_addr(self, addr: int) -> int:
        off = self.addr_to_offset(addr)
        if off is None:
            raise self._fail(f"relocation at {addr:#x} is outside every section")
        return self.read_word(off, self.cls.addr.size)

    def relr_addresses(self, sec: Section) -> Iterator[int]:
        """The addresses a RELR section relocates (decoded by `pvpatch.elf.writer`, beside
        its encoder)."""
        from .writer import decode_relr  # the writer imports this module

        word = self.cls.addr.size
        if sec.size % word:
            raise self._fail(f"RELR section {sec.name!r} is not a whole number of words")
        return decode_relr(self.section_data(sec), word)

    # -- extras -----------------------------------------------------------

    @cached_property
    def module_signature(self) -> ModuleSignature | None:
        """An appended module signature (`~Module signature appended~`), if any."""
        d = self.data
        if d[-len(MODULE_SIG_MAGIC) :] != MODULE_SIG_MAGIC:
            return None
        info_at = len(d) - len(MODULE_SIG_MAGIC) - MODULE_SIG_INFO_SIZE
        if info_at < 0:
            raise self._fail("module signature trailer is truncated")
        sig_len = int.from_bytes(d[info_at + 8 : info_at + 12], "big")
        start = info_at - sig_len
        if start < self.cls.ehdr.size:
            raise self._fail("module signature length runs before the ELF content")
        return ModuleSignature(start, sig_len)

    @cached_property
    def content_end(self) -> int:
        """Where the ELF content ends: the file size, less an appended signature."""
        sig = self.module_signature
        return sig.offset if sig is not None else len(self.data)

    def modinfo(self) -> dict[str, str]:
        """`.modinfo` key=value strings of a kernel module (first value per key)."""
        sec = self.section(".modinfo")
        if sec is None:
            return {}
        out: dict[str, str] = {}
        for item in self.section_data(sec).split(b"\0"):
            key, sep, value = item.partition(b"=")
            if sep and key.decode("ascii", "replace") not in out:
                out[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
        return out

    def has_ibt_property(self) -> bool:
        """The GNU property note asks for indirect-branch tracking (IBT)."""
        sec = self.section(".note.gnu.property")
        if sec is None:
            return False
        data = self.section_data(sec)
        align = self.cls.note_align
        pos = 0
        while pos + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name_end = pos + 12 + namesz
            desc = pos + 12 + (namesz + 3) // 4 * 4
            end = desc + (descsz + align - 1) // align * align
            if end > len(data) or name_end > len(data):
                return False
            if ntype == 5 and data[pos + 12 : name_end].rstrip(b"\0") == b"GNU":
                p = desc
                while p + 8 <= desc + descsz:
                    ptype, psz = struct.unpack_from("<II", data, p)
                    if ptype == 0xC0000002 and psz >= 4:  # GNU_PROPERTY_X86_FEATURE_1_AND
                        return bool(struct.unpack_from("<I", data, p + 8)[0] & 1)
                    p += 8 + (psz + align - 1) // align * align
            pos = end
        return False

