"""A minimal, bounds-checked reader for BTF (kernel Documentation/bpf/btf.rst).

Only what the op catalog needs, read lazily: records are variable-length, so
where type id N starts is learnt by walking the records before it, and the walk
goes only as far as the ids asked for.  A struct is found by name without a
walk over everything: its name's string offset is searched for in the type
section, and each hit is confirmed by walking up to it.  In a 6.1 vmlinux the
paravirt structs are near id 3,500 of 95,000, so the catalog reads 4% of the
records, and `find_struct` stops at the first record that matches.  The blob may be
a window of a mapped file (`start`, `size`): a vmlinux's `.BTF` is 5 MB, of which a
catalog reads a few pages.  Split BTF (a module's `.BTF` on top of vmlinux's) is
supported by passing the base: type ids and string offsets then continue after the base.
"""

from __future__ import annotations

import bisect
import mmap
import struct
import sys
from collections.abc import Iterator
from typing import NoReturn

from pvpatch.errors import OpsError

from ..record import record

BTF_MAGIC = 0xEB9F
HEADER_MIN_LEN = 24

KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

KIND_NAMES: dict[int, str] = {
    KIND_INT: "INT",
    KIND_PTR: "PTR",
    KIND_ARRAY: "ARRAY",
    KIND_STRUCT: "STRUCT",
    KIND_UNION: "UNION",
    KIND_ENUM: "ENUM",
    KIND_FWD: "FWD",
    KIND_TYPEDEF: "TYPEDEF",
    KIND_VOLATILE: "VOLATILE",
    KIND_CONST: "CONST",
    KIND_RESTRICT: "RESTRICT",
    KIND_FUNC: "FUNC",
    KIND_FUNC_PROTO: "FUNC_PROTO",
    KIND_VAR: "VAR",
    KIND_DATASEC: "DATASEC",
    KIND_FLOAT: "FLOAT",
    KIND_DECL_TAG: "DECL_TAG",
    KIND_TYPE_TAG: "TYPE_TAG",
    KIND_ENUM64: "ENUM64",
}

# Bytes that follow the 12-byte btf_type record: (fixed part, per vlen item).
_EXTRA: dict[int, tuple[int, int]] = {
    KIND_INT: (4, 0),
    KIND_PTR: (0, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FWD: (0, 0),
    KIND_TYPEDEF: (0, 0),
    KIND_VOLATILE: (0, 0),
    KIND_CONST: (0, 0),
    KIND_RESTRICT: (0, 0),
    KIND_FUNC: (0, 0),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_FLOAT: (0, 0),
    KIND_DECL_TAG: (4, 0),
    KIND_TYPE_TAG: (0, 0),
    KIND_ENUM64: (0, 12),
}

# Kinds whose third word is a size rather than a type id.
_SIZED_KINDS = frozenset(
    {KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_DATASEC, KIND_FLOAT, KIND_ENUM64}
)
# Kinds that only qualify or rename another type.
MODIFIER_KINDS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})
_MAX_RESOLVE_DEPTH = 64


@record
class BtfMember:
    """One STRUCT/UNION member; `bit_offset` is from the start of the aggregate."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 unless the member is a bitfield


@record
class BtfType:
    """One decoded type record. `size` is set for sized kinds, `ref` for the others."""

    type_id: int
    kind: int
    name: str
    vlen: int
    kind_flag: bool
    size: int
    ref: int
    members: tuple[BtfMember, ...] = ()

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, f"KIND{self.kind}")


class Btf:
    """One BTF blob, optionally split on top of `base`.

    Type ids valid here run from 0 (void) to `type_count - 1`; ids below
    `start_id` belong to the base.
    """

    def __init__(self, data: bytes | bytearray | memoryview | mmap.mmap, *,
                 base: Btf | None = None, path: str | None = None, start: int = 0,
                 size: int | None = None) -> None:
        """The blob is `data[start:start + size]` (all of `data` by default); bytes and
        maps are read in place, other buffers copied."""
        self.path = path
        self.base = base
        self._bytes = data if isinstance(data, bytes | mmap.mmap) else bytes(data)
        if not 0 <= start <= len(self._bytes):
            raise OpsError(f"BTF start {start:#x} outside the buffer "
                           f"({len(self._bytes):#x} bytes)", path)
        if size is not None and size < 0:
            raise OpsError(f"BTF size {size} is negative", path)
        self._lo = start
        # Every position below is absolute in `_bytes`; messages give it from `_lo`.
        self._size = len(self._bytes) - start if size is None else \
            min(size, len(self._bytes) - start)
        self._endian = self._parse_endian()
        hdr = self._unpack("HBBIIIII", 0, "header")
        _magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = hdr
        if version != 1:
            self._fail(f"unsupported BTF version {version}")
        if hdr_len < HEADER_MIN_LEN or hdr_len > self._size:
            self._fail(f"bad BTF header length {hdr_len}")
        self._type_start = self._section(hdr_len, type_off, type_len, "type")
        self._type_end = self._type_start + type_len
        self._str_start = self._section(hdr_len, str_off, str_len, "string")
        self._str_len = str_len
        if base is None and (str_len == 0 or self._bytes[self._str_start] != 0):
            # As libbpf: only a split BTF's strings may start with a name.
            self._fail("BTF string section does not start with an empty string"
                       " (a split BTF read without its base?)")
        if base is not None and base._endian != self._endian:
            self._fail("split BTF and its base differ in byte order")
        self._str_base = base.strings_len if base is not None else 0
        self.start_id = base.type_count if base is not None else 1
        self._record = struct.Struct(self._endian + "III")
        self._word = struct.Struct(self._endian + "I")
        self._offsets: list[int] = []  # where each record walked so far starts
        self._walked = self._type_start  # where the next record to walk starts

    # -- layout -----------------------------------------------------------

    @property
    def type_count(self) -> int:
        """One past the highest valid type id (base types and void included).

        Counting needs every record walked (and so checked)."""
        self._walk()
        return self.start_id + len(self._offsets)

    @property
    def strings_len(self) -> int:
        """Combined string-section length that a split BTF on top of this one continues."""
        return self._str_base + self._str_len

    def _fail(self, message: str) -> NoReturn:
        raise OpsError(message, self.path)

    def _parse_endian(self) -> str:
        if self._size < HEADER_MIN_LEN:
            raise OpsError(f"BTF too short ({self._size} bytes)", self.path)
        magic = self._bytes[self._lo : self._lo + 2]
        # The magic is written in the file's byte order: which way it reads says that order.
        for order in ("<", ">"):
            if int.from_bytes(magic, "little" if order == "<" else "big") == BTF_MAGIC:
                return order
        raise OpsError(f"bad BTF magic {magic[0]:02x}{magic[1]:02x} (want {BTF_MAGIC:x})",
                       self.path)

    def _unpack(self, fmt: str, offset: int, what: str) -> tuple[int, ...]:
        size = struct.calcsize(self._endian + fmt)
        if offset < 0 or offset + size > self._size:
            raise OpsError(f"BTF {what} at {offset:#x} runs past the end", self.path)
        return struct.unpack_from(self._endian + fmt, self._bytes, self._lo + offset)

    def _section(self, hdr_len: int, off: int, length: int, what: str) -> int:
        start = hdr_len + off
        if start + length > self._size:
            self._fail(
                f"BTF {what} section ({off:#x}+{length:#x} after header) runs past the end"
                f" ({self._size:#x} bytes)"
            )
        return self._lo + start

    def _walk(self, upto_id: int = sys.maxsize, upto_pos: int = sys.maxsize) -> None:
        """Learn record starts until type id `upto_id` or byte `upto_pos` is reached
        (or the section ends).  A precompiled struct keeps the loop tight."""
        data = self._bytes
        unpack = self._record.unpack_from
        extra = _EXTRA
        offsets = self._offsets
        pos, end = self._walked, self._type_end
        type_id = self.start_id + len(offsets)
        stop = min(end, upto_pos)
        try:
            while pos < stop and type_id <= upto_id:
                if pos + 12 > end:
                    self._fail(f"truncated BTF type record at {pos - self._lo:#x}")
                _name_off, info, _ = unpack(data, pos)
                kind = (info >> 24) & 0x1F
                sizes = extra.get(kind)
                if sizes is None:
                    self._fail(f"unknown BTF kind {kind} for type id {type_id}")
                size = 12 + sizes[0] + sizes[1] * (info & 0xFFFF)
                if pos + size > end:
                    self._fail(
                        f"BTF type id {type_id} ({KIND_NAMES[kind]}, vlen {info & 0xFFFF})"
                        " runs past the type section"
                    )
                offsets.append(pos)
                pos += size
                type_id += 1
        finally:
            self._walked = pos

    def _id_at(self, pos: int) -> int | None:
        """The type id of the record starting at byte `pos`, or None if no record does."""
        self._walk(upto_pos=pos + 1)
        i = bisect.bisect_left(self._offsets, pos)
        if i < len(self._offsets) and self._offsets[i] == pos:
            return self.start_id + i
        return None

    # -- strings ----------------------------------------------------------

    def string(self, offset: int) -> str:
        """The NUL-terminated string at `offset` in the (combined) string section."""
        if offset < self._str_base:
            assert self.base is not None  # _str_base is 0 without a base
            return self.base.string(offset)
        rel = offset - self._str_base
        if rel >= self._str_len:
            self._fail(f"BTF string offset {offset:#x} beyond the string section")
        start = self._str_start + rel
        stop = self._bytes.find(b"\0", start, self._str_start + self._str_len)
        if stop < 0:
            self._fail(f"BTF string at {offset:#x} is not NUL-terminated")
        try:
            return self._bytes[start:stop].decode("utf-8")
        except UnicodeDecodeError:
            self._fail(f"BTF string at {offset:#x} is not UTF-8")

    # -- types ------------------------------------------------------------

    def type(self, type_id: int) -> BtfType:
        """Decode one type; id 0 is void (kind 0)."""
        if type_id == 0:
            return BtfType(0, 0, "void", 0, False, 0, 0)
        if type_id < self.start_id:
            assert self.base is not None  # start_id is 1 without a base
            return self.base.type(type_id)
        index = type_id - self.start_id
        if index >= len(self._offsets):
            self._walk(upto_id=type_id)
        if index >= len(self._offsets):
            self._fail(f"BTF type id {type_id} out of range (have {self.type_count})")
        pos = self._offsets[index]
        name_off, info, size_or_type = self._record.unpack_from(self._bytes, pos)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        kind_flag = bool(info >> 31)
        name = self.string(name_off)
        members: tuple[BtfMember, ...] = ()
        if kind in (KIND_STRUCT, KIND_UNION):
            members = self._members(pos + 12, vlen, kind_flag)
        sized = kind in _SIZED_KINDS
        return BtfType(
            type_id,
            kind,
            name,
            vlen,
            kind_flag,
            size_or_type if sized else 0,
            0 if sized else size_or_type,
            members,
        )

    def _members(self, pos: int, vlen: int, kind_flag: bool) -> tuple[BtfMember, ...]:
        out = []
        unpack = self._record.unpack_from
        for i in range(vlen):
            name_off, type_id, offset = unpack(self._bytes, pos + 12 * i)
            if kind_flag:
                # kind_flag: bitfield size in the top 8 bits, bit offset below.
                bits, bit_off = offset >> 24, offset & 0xFFFFFF
            else:
                bits, bit_off = 0, offset
            out.append(BtfMember(self.string(name_off), type_id, bit_off, bits))
        return tuple(out)

    def resolve(self, type_id: int) -> BtfType:
        """Follow typedef/const/volatile/restrict/type_tag to the underlying type."""
        for _ in range(_MAX_RESOLVE_DEPTH):
            t = self.type(type_id)
            if t.kind not in MODIFIER_KINDS:
                return t
            type_id = t.ref
        self._fail(f"BTF type id {type_id}: modifier chain too long (cycle?)")

    def find_aggregates(self, name: str, kind: int = KIND_STRUCT) -> list[int]:
        """Ids of STRUCTs (or UNIONs) called `name`, own types first, then the base's."""
        found = sorted(i for off in self._string_offsets(name) for i in self._named(off, kind))
        if self.base is not None:
            found += self.base.find_aggregates(name, kind)
        return found

    def _named(self, name_off: int, kind: int) -> Iterator[int]:
        """Ids of this blob's own records of `kind` whose name is at `name_off`, in order."""
        needle = self._word.pack(name_off)
        at = self._bytes.find(needle, self._type_start, self._type_end)
        while at >= 0:
            # A hit is a record only if it is word-aligned, has the kind wanted, and
            # the walk from the start of the section lands on it.
            if (at - self._type_start) % 4 == 0 and at + 12 <= self._type_end:
                (info,) = self._word.unpack_from(self._bytes, at + 4)
                if (info >> 24) & 0x1F == kind:
                    type_id = self._id_at(at)
                    if type_id is not None:
                        yield type_id
            at = self._bytes.find(needle, at + 1, self._type_end)

    def _string_offsets(self, name: str) -> list[int]:
        """Every offset (in the combined string section) holding exactly `name`."""
        out = self.base._string_offsets(name) if self.base is not None else []
        if not name:
            return out
        # Every place `name` NUL appears is an offset naming it: a record may point into
        # the tail of a longer string ("ops" inside "pv_cpu_ops"), which the kernel accepts.
        needle = name.encode("utf-8") + b"\0"
        data, lo, hi = self._bytes, self._str_start, self._str_start + self._str_len
        at = data.find(needle, lo, hi)
        while at >= 0:
            out.append(at - lo + self._str_base)
            at = data.find(needle, at + 1, hi)
        return out

    def find_struct(self, name: str) -> BtfType | None:
        """The complete STRUCT called `name` (the first one, if several), or None.

        Each name offset's search stops at its first record: the section is 3 MB in a
        vmlinux and the paravirt structs lie near its start.  Records past that are not
        read, so a corrupt one there goes unseen (as does one past the ids a catalog
        needs)."""
        firsts = [next(self._named(off, KIND_STRUCT), None) for off in self._string_offsets(name)]
        own = [i for i in firsts if i is not None]
        if own:
            return self.type(min(own))
        return self.base.find_struct(name) if self.base is not None else None
