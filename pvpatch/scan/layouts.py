"""Table layouts of `.parainstructions`, as data.

A layout says how one entry is laid out (stride, alignment, each field's offset
and size) and how its `clobbers` bits map to registers.  The numbering of the
CLBR bits changed with the register-saving thunk series (2.6.30), so it belongs
to the layout, not to the architecture.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from functools import cached_property
from types import MappingProxyType

from ..arch import ARCHES
from ..record import record


@record
class Field:
    """Where one field lies inside a table entry."""

    offset: int
    size: int


@record
class TableLayout:
    """One era of `struct paravirt_patch_site`: its fields, stride and CLBR bits, as data."""

    name: str
    arch: str
    stride: int  # every entry starts aligned to this
    instr: Field  # pointer to the site
    type: Field
    len: Field
    clobbers: Field
    clobber_bits: tuple[str, ...]  # bit i of `clobbers` -> register name
    ret_mask: int  # CLBR_RET_REG: a mask within it marks a callee-save site
    any_mask: int  # CLBR_ANY
    description: str

    @property
    def entry_bytes(self) -> int:
        """Bytes an entry must hold: the last one may lack trailing padding."""
        return max(f.offset + f.size for f in (self.instr, self.type, self.len, self.clobbers))

    @cached_property
    def _entry_struct(self) -> tuple[struct.Struct, tuple[int, int, int]]:
        """A whole-stride struct yielding the type, len and clobbers fields, and their order."""
        fields = sorted((("type", self.type), ("len", self.len), ("clobbers", self.clobbers)),
                        key=lambda nf: nf[1].offset)
        fmt, pos = "<", 0
        for _name, f in fields:
            fmt += "x" * (f.offset - pos) + {1: "B", 2: "H", 4: "I"}[f.size]
            pos = f.offset + f.size
        fmt += "x" * (self.stride - pos)
        names = [n for n, _f in fields]
        return struct.Struct(fmt), (names.index("type"), names.index("len"),
                                    names.index("clobbers"))

    def entries(self, data: bytes) -> list[tuple[int, int, int]]:
        """(type, len, clobbers) of each entry; `data` is padded to whole strides."""
        st, (t, n, c) = self._entry_struct
        if (t, n, c) == (0, 1, 2):
            return list(st.iter_unpack(data))
        return [(v[t], v[n], v[c]) for v in st.iter_unpack(data)]

    @cached_property
    def _instr_struct(self) -> struct.Struct:
        f = self.instr
        return struct.Struct(f"<{'x' * f.offset}{'I' if f.size == 4 else 'Q'}"
                             f"{'x' * (self.stride - f.offset - f.size)}")

    def pointers(self, data: bytes) -> list[int]:
        """The `instr` field of each entry; `data` is padded to whole strides."""
        return [v for (v,) in self._instr_struct.iter_unpack(data)]

    def regs(self, mask: int) -> tuple[str, ...]:
        return tuple(r for bit, r in enumerate(self.clobber_bits) if mask >> bit & 1)

    def is_callee_save(self, mask: int) -> bool:
        return mask & ~self.ret_mask == 0

    def count_for(self, size: int) -> int | None:
        """Entries in a table of `size` bytes, or None if it is not a whole number.

        Before 6.1 no alignment follows the last entry, so the table may end
        short of a whole stride as long as the last entry holds every field.
        """
        whole, rest = divmod(size, self.stride)
        if rest == 0:
            return whole
        if rest >= self.entry_bytes:
            return whole + 1
        return None


_X64_BITS = ("rax", "rcx", "rdx", "rdi", "rsi", "r8", "r9", "r10", "r11")
_X64_BITS_2629 = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")


def _layout(
    name: str, arch: str, bits: tuple[str, ...], ret: int, description: str
) -> TableLayout:
    ptr = ARCHES[arch].ptr_size
    return TableLayout(
        name=name,
        arch=arch,
        stride=2 * ptr,
        instr=Field(0, ptr),
        type=Field(ptr, 1),
        len=Field(ptr + 1, 1),
        clobbers=Field(ptr + 2, 2),
        clobber_bits=bits,
        ret_mask=ret,
        any_mask=(1 << len(bits)) - 1,
        description=description,
    )


LAYOUTS: Mapping[str, TableLayout] = MappingProxyType(
    {
        lay.name: lay
        for lay in (
            _layout(
                "linux-x86_64",
                "x86_64",
                _X64_BITS,
                0x1,
                "Linux 2.6.30 to 6.7 x86-64: {u64 instr; u8 type; u8 len; u16 clobbers}, "
                "16-byte stride; CLBR rax rcx rdx rdi rsi r8-r11",
            ),
            _layout(
                "linux-i386",
                "i386",
                ("eax", "ecx", "edx", "edi"),
                0x5,  # eax|edx in later kernels; the seed's eax-only mask is inside it
                "Linux 2.6.30 to 6.7 i386: {u32 instr; u8 type; u8 len; u16 clobbers}, "
                "8-byte stride; CLBR eax ecx edx edi",
            ),
            _layout(
                "linux-2.6.29-x86_64",
                "x86_64",
                _X64_BITS_2629,
                0x1,
                "Linux before 2.6.30 x86-64: as linux-x86_64 but rsi is bit 3 and rdi bit 4",
            ),
            _layout(
                "linux-2.6.29-i386",
                "i386",
                ("eax", "ecx", "edx"),
                0x1,
                "Linux before 2.6.30 i386: no edi bit, CLBR_ANY = 0x7",
            ),
        )
    }
)

# `--layout auto` tries these, per architecture, in order.
AUTO_LAYOUTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"x86_64": ("linux-x86_64",), "i386": ("linux-i386",)}
)
