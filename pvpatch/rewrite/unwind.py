"""Unwind data for injected thunks: one description of a thunk's stack, two encoders.

The thunk generator (pvpatch/rewrite/thunk.py) knows every push, `lea` stack adjustment and
pop it writes; it records the stack state after each as a `FrameRow` (the canonical
frame address CFA = stack pointer + `cfa`, and where each saved register sits,
relative to the CFA).  From those rows:

- `eh_frame_entries` writes DWARF call-frame information (a CIE and an FDE per
  thunk, `.eh_frame` format, pc_begin encoded pc-relative sdata4 as gcc does);
- `orc_entries` writes the kernel's ORC entries (sp_offset = the CFA offset).

For linked files the old `.eh_frame` is copied next to the new entries, its
pc-relative pointers rebased (`rebase_eh_frame`), and a new `.eh_frame_hdr`
binary-search table written over all FDEs (`eh_frame_hdr`).  `parse_eh_frame` and
`cfa_rows` read CFI back (verify runs them on the patched file and compares the
CFA they describe with the stack pointer the emulated thunk really has).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence
from types import MappingProxyType

from ..arch import Arch
from ..errors import RewriteError
from ..record import record

# DWARF register numbers (System V psABIs: x86-64 Figure 3.36, i386 Table 2.14) and
# the return-address column each CIE names.
DWARF_REGS = MappingProxyType({
    "x86_64": MappingProxyType({
        r: i for i, r in enumerate(("rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp",
                                    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                                    "rip"))}),
    "i386": MappingProxyType({
        r: i for i, r in enumerate(("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi",
                                    "eip"))}),
})
RETURN_COLUMN = MappingProxyType({"x86_64": "rip", "i386": "eip"})

# Pointer encodings (LSB "DWARF Extensions": DW_EH_PE_*).
PE_OMIT = 0xFF
PE_ABSPTR, PE_ULEB, PE_UDATA2, PE_UDATA4, PE_UDATA8 = 0x00, 0x01, 0x02, 0x03, 0x04
PE_SLEB, PE_SDATA2, PE_SDATA4, PE_SDATA8 = 0x09, 0x0A, 0x0B, 0x0C
PE_PCREL, PE_DATAREL, PE_INDIRECT = 0x10, 0x30, 0x80
# Fixed-size formats: (width, signed); 0 = absptr, the address size.
_FIXED = MappingProxyType({PE_ABSPTR: (0, False), PE_UDATA2: (2, False), PE_UDATA4: (4, False),
                           PE_UDATA8: (8, False), PE_SDATA2: (2, True), PE_SDATA4: (4, True),
                           PE_SDATA8: (8, True)})
FDE_ENCODING = PE_PCREL | PE_SDATA4  # what gcc and ld write on x86
HDR_VERSION = 1
HDR_TABLE = PE_DATAREL | PE_SDATA4

# Call-frame instructions (DWARF 5, 6.4.2), those written and those read back.
CFA_ADVANCE_LOC, CFA_OFFSET, CFA_RESTORE = 0x40, 0x80, 0xC0
CFA_NOP, CFA_SET_LOC, CFA_ADVANCE_LOC1, CFA_ADVANCE_LOC2, CFA_ADVANCE_LOC4 = 0, 1, 2, 3, 4
CFA_OFFSET_EXTENDED, CFA_RESTORE_EXTENDED, CFA_UNDEFINED, CFA_SAME_VALUE = 5, 6, 7, 8
CFA_REGISTER, CFA_REMEMBER_STATE, CFA_RESTORE_STATE = 9, 0xA, 0xB
CFA_DEF_CFA, CFA_DEF_CFA_REGISTER, CFA_DEF_CFA_OFFSET, CFA_DEF_CFA_EXPRESSION = \
    0xC, 0xD, 0xE, 0xF
CFA_EXPRESSION, CFA_OFFSET_EXTENDED_SF, CFA_DEF_CFA_SF, CFA_DEF_CFA_OFFSET_SF = \
    0x10, 0x11, 0x12, 0x13
CFA_VAL_OFFSET, CFA_VAL_OFFSET_SF, CFA_VAL_EXPRESSION = 0x14, 0x15, 0x16
CFA_GNU_ARGS_SIZE, CFA_GNU_NEGATIVE_OFFSET_EXTENDED = 0x2E, 0x2F


class UnwindError(RewriteError):
    """Call-frame information that cannot be read or rebased."""


# -- the description ---------------------------------------------------------------------


@record
class FrameRow:
    """The stack from `offset` (into the thunk) on: CFA = sp + `cfa`; each saved
    register's slot at CFA + its offset (the return address's included)."""

    offset: int
    cfa: int
    saved: tuple[tuple[str, int], ...]


@record
class ThunkFrame:
    """The stack through a thunk of `size` bytes: a `FrameRow` from each offset where it
    changes (the first at 0)."""

    size: int
    rows: tuple[FrameRow, ...]

    def row_at(self, offset: int) -> FrameRow:
        k = bisect.bisect_right([r.offset for r in self.rows], offset) - 1
        return self.rows[max(k, 0)]


class FrameBuilder:
    """Follows the stack while a thunk's bytes are written: a row per change."""

    def __init__(self, arch: Arch) -> None:
        self.arch = arch
        self.cfa = arch.ptr_size  # the call that entered pushed the return address
        self.saved: dict[str, int] = {RETURN_COLUMN[arch.name]: -arch.ptr_size}
        self.rows = [FrameRow(0, self.cfa, tuple(self.saved.items()))]

    def _row(self, at: int) -> None:
        row = FrameRow(at, self.cfa, tuple(self.saved.items()))
        if self.rows[-1].offset == at:
            self.rows[-1] = row
        else:
            self.rows.append(row)

    def push(self, at: int, reg: str) -> None:
        """`at`: the offset after the push."""
        self.cfa += self.arch.ptr_size
        self.saved[reg] = -self.cfa
        self._row(at)

    def pop(self, at: int, reg: str) -> None:
        self.cfa -= self.arch.ptr_size
        self.saved.pop(reg, None)
        self._row(at)

    def adjust(self, at: int, delta: int) -> None:
        """The stack pointer moved by `delta` (negative: the stack grew)."""
        self.cfa -= delta
        self._row(at)

    def frame(self, size: int) -> ThunkFrame:
        return ThunkFrame(size, tuple(self.rows))


# -- LEB128 and encoded pointers ---------------------------------------------------------


def uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def sleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        done = (value == 0 and not byte & 0x40) or (value == -1 and byte & 0x40)
        out.append(byte | (0 if done else 0x80))
        if done:
            return bytes(out)


def read_uleb(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise UnwindError("a LEB128 number runs past its entry")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def read_sleb(data: bytes, pos: int) -> tuple[int, int]:
    start = pos
    value, pos = read_uleb(data, pos)
    bits = 7 * (pos - start)
    if value >> (bits - 1) & 1:
        value -= 1 << bits
    return value, pos


def _fixed(enc: int, ptr_size: int) -> tuple[int, bool] | None:
    found = _FIXED.get(enc & 0x0F)
    if found is None:
        return None
    width, signed = found
    return (width or ptr_size), signed


def read_pointer(data: bytes, pos: int, enc: int, field_addr: int, ptr_size: int,
                 ) -> tuple[int, int]:
    """(value, next position) of a pointer encoded `enc` at `pos`; pc-relative ones are
    resolved with `field_addr`, the address of the field."""
    low = enc & 0x0F
    if low == PE_ULEB:
        value, end = read_uleb(data, pos)
    elif low == PE_SLEB:
        value, end = read_sleb(data, pos)
    else:
        shape = _fixed(enc, ptr_size)
        if shape is None:
            raise UnwindError(f"pointer encoding {enc:#x} is not one pvpatch reads")
        width, signed = shape
        end = pos + width
        if end > len(data):
            raise UnwindError("an encoded pointer runs past its entry")
        value = int.from_bytes(data[pos:end], "little", signed=signed)
    if enc & 0x70 == PE_PCREL:
        value = (value + field_addr) & ((1 << (8 * ptr_size)) - 1)
    elif enc & 0x70 not in (0, PE_PCREL):
        raise UnwindError(f"pointer encoding {enc:#x} is not one pvpatch reads")
    return value, end


# -- parsing .eh_frame -------------------------------------------------------------------


@record
class Cie:
    """A CIE read from `.eh_frame`: the pointer encodings of its FDEs and LSDAs (its
    augmentation's "R" and "L": absptr and omit without them) and its initial instructions."""

    offset: int  # of its length field, in the section
    size: int  # the whole entry, length field included
    augmentation: str
    code_align: int
    data_align: int
    ra_column: int
    fde_encoding: int
    lsda_encoding: int
    personality: tuple[int, int] | None  # (field offset, encoding)
    instructions: bytes


@record
class Fde:
    """An FDE read from `.eh_frame`: the code [pc_begin, pc_begin + pc_range) it describes and
    its call-frame instructions; `offset`, `size` as a `Cie`'s; `lsda_field`: where its LSDA
    pointer is in the section (None: it has none)."""

    offset: int
    size: int
    cie: Cie
    pc_begin_field: int  # offset in the section
    pc_begin: int  # resolved (pc-relative pointers against the section's address)
    pc_range: int
    lsda_field: int | None
    instructions: bytes


@record
class EhFrame:
    """The CIEs and FDEs of an `.eh_frame` section, in section order."""

    cies: tuple[Cie, ...]
    fdes: tuple[Fde, ...]
    end: int  # where the entries end: a zero terminator or the section's end


def parse_eh_frame(data: bytes, addr: int, ptr_size: int) -> EhFrame:
    """Every CIE and FDE of an `.eh_frame` at `addr`, up to a zero terminator (UnwindError
    when it is malformed: it comes from the input file)."""
    try:
        return _parse_eh_frame(data, addr, ptr_size)
    except (IndexError, struct.error) as exc:
        raise UnwindError(f".eh_frame is truncated or malformed ({exc})") from None


def fde_at(data: bytes, addr: int, ptr_size: int, offset: int) -> Fde:
    """The FDE at `offset` of an `.eh_frame` at `addr` (and its CIE), read alone: what an
    unwinder that found it through `.eh_frame_hdr` reads."""
    try:
        length, cie_ptr = struct.unpack_from("<II", data, offset)
        body = offset + 4
        if cie_ptr == 0 or length in (0, 0xFFFFFFFF) or body + length > len(data):
            raise UnwindError(f"no FDE at .eh_frame+{offset:#x}")
        start = body - cie_ptr
        cie_len, cie_id = struct.unpack_from("<II", data, start)
        if cie_id != 0 or start + 4 + cie_len > len(data):
            raise UnwindError(f"the FDE at .eh_frame+{offset:#x} names no CIE")
        cie = _parse_cie(data, start, start + 8, start + 4 + cie_len, addr, ptr_size)
        return _parse_fde(data, offset, body + 4, body + length, cie, addr, ptr_size)
    except (IndexError, struct.error) as exc:
        raise UnwindError(f".eh_frame is truncated or malformed ({exc})") from None


def _parse_eh_frame(data: bytes, addr: int, ptr_size: int) -> EhFrame:
    cies: dict[int, Cie] = {}
    fdes: list[Fde] = []
    pos = 0
    while pos + 4 <= len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        if length == 0:
            break
        if length == 0xFFFFFFFF:
            raise UnwindError("a 64-bit DWARF .eh_frame entry is not one pvpatch reads")
        body = pos + 4
        end = body + length
        if end > len(data) or length < 4:
            raise UnwindError(f".eh_frame entry at {pos:#x} runs past the section")
        (cie_ptr,) = struct.unpack_from("<I", data, body)
        if cie_ptr == 0:
            cies[pos] = _parse_cie(data, pos, body + 4, end, addr, ptr_size)
        else:
            cie = cies.get(body - cie_ptr)
            if cie is None:
                raise UnwindError(f".eh_frame FDE at {pos:#x} names no CIE before it")
            fdes.append(_parse_fde(data, pos, body + 4, end, cie, addr, ptr_size))
        pos = end
    return EhFrame(tuple(cies.values()), tuple(fdes), pos)


def _parse_cie(data: bytes, start: int, pos: int, end: int, addr: int,
               ptr_size: int) -> Cie:
    version = data[pos]
    pos += 1
    nul = data.find(b"\0", pos, end)
    if nul < 0:
        raise UnwindError(f".eh_frame CIE at {start:#x}: no augmentation string")
    aug = data[pos:nul].decode("latin-1")
    pos = nul + 1
    if "eh" in aug:
        raise UnwindError(f".eh_frame CIE at {start:#x}: augmentation {aug!r}")
    code_align, pos = read_uleb(data, pos)
    data_align, pos = read_sleb(data, pos)
    if version == 1:
        ra, pos = data[pos], pos + 1
    else:
        ra, pos = read_uleb(data, pos)
    fde_enc, lsda_enc, personality = PE_ABSPTR, PE_OMIT, None
    if aug.startswith("z"):
        aug_len, pos = read_uleb(data, pos)
        after = pos + aug_len
        for ch in aug[1:]:
            if ch == "R":
                fde_enc, pos = data[pos], pos + 1
            elif ch == "L":
                lsda_enc, pos = data[pos], pos + 1
            elif ch == "P":
                enc = data[pos]
                personality = (pos + 1, enc)
                _value, pos = read_pointer(data, pos + 1, enc, addr + pos + 1, ptr_size)
            elif ch in "SB":
                continue
            else:
                break  # unknown: the augmentation length says where the data ends
        pos = after
    return Cie(start, end - start, aug, code_align, data_align, ra, fde_enc, lsda_enc,
               personality, bytes(data[pos:end]))


def _parse_fde(data: bytes, start: int, pos: int, end: int, cie: Cie, addr: int,
               ptr_size: int) -> Fde:
    field = pos
    pc_begin, pos = read_pointer(data, pos, cie.fde_encoding, addr + pos, ptr_size)
    pc_range, pos = read_pointer(data, pos, cie.fde_encoding & 0x0F, 0, ptr_size)
    lsda_field = None
    if cie.augmentation.startswith("z"):
        aug_len, pos = read_uleb(data, pos)
        if cie.lsda_encoding != PE_OMIT and aug_len:
            lsda_field = pos
        pos += aug_len
    return Fde(start, end - start, cie, field, pc_begin, pc_range, lsda_field,
               bytes(data[pos:end]))


# -- reading CFA rules back ---------------------------------------------------------------


@record
class CfaRow:
    """From `loc` on: CFA = register `reg` + `offset` (reg None: an expression, not
    checked); `saved`: DWARF column -> slot offset from the CFA."""

    loc: int
    reg: int | None
    offset: int
    saved: tuple[tuple[int, int], ...]


def cfa_rows(fde: Fde) -> list[CfaRow]:
    """Run the CIE's initial instructions and the FDE's: the table readelf -wF shows."""
    try:
        return _cfa_rows(fde)
    except (IndexError, struct.error) as exc:
        raise UnwindError(f"call-frame instructions run past their entry ({exc})") from None


def _cfa_rows(fde: Fde) -> list[CfaRow]:
    cie = fde.cie
    loc = fde.pc_begin
    reg: int | None = None
    offset = 0
    saved: dict[int, int] = {}
    initial: dict[int, int] = {}
    stack: list[tuple[int | None, int, dict[int, int]]] = []
    rows: list[CfaRow] = []

    def emit() -> None:
        row = CfaRow(loc, reg, offset, tuple(sorted(saved.items())))
        if rows and rows[-1].loc == loc:
            rows[-1] = row
        else:
            rows.append(row)

    for phase, prog in (("cie", cie.instructions), ("fde", fde.instructions)):
        pos = 0
        while pos < len(prog):
            op = prog[pos]
            pos += 1
            high, low = op & 0xC0, op & 0x3F
            if high == CFA_ADVANCE_LOC:
                emit()
                loc += low * cie.code_align
                continue
            if high == CFA_OFFSET:
                n, pos = read_uleb(prog, pos)
                saved[low] = n * cie.data_align
                continue
            if high == CFA_RESTORE:
                if low in initial:
                    saved[low] = initial[low]
                else:
                    saved.pop(low, None)
                continue
            if op == CFA_NOP:
                continue
            if op in (CFA_ADVANCE_LOC1, CFA_ADVANCE_LOC2, CFA_ADVANCE_LOC4):
                width = {CFA_ADVANCE_LOC1: 1, CFA_ADVANCE_LOC2: 2, CFA_ADVANCE_LOC4: 4}[op]
                emit()
                loc += int.from_bytes(prog[pos : pos + width], "little") * cie.code_align
                pos += width
            elif op == CFA_DEF_CFA:
                reg, pos = read_uleb(prog, pos)
                offset, pos = read_uleb(prog, pos)
            elif op == CFA_DEF_CFA_SF:
                reg, pos = read_uleb(prog, pos)
                offset, pos = read_sleb(prog, pos)
                offset *= cie.data_align
            elif op == CFA_DEF_CFA_REGISTER:
                reg, pos = read_uleb(prog, pos)
            elif op == CFA_DEF_CFA_OFFSET:
                offset, pos = read_uleb(prog, pos)
            elif op == CFA_DEF_CFA_OFFSET_SF:
                offset, pos = read_sleb(prog, pos)
                offset *= cie.data_align
            elif op in (CFA_OFFSET_EXTENDED, CFA_OFFSET_EXTENDED_SF,
                        CFA_GNU_NEGATIVE_OFFSET_EXTENDED):
                r, pos = read_uleb(prog, pos)
                if op == CFA_OFFSET_EXTENDED_SF:
                    n, pos = read_sleb(prog, pos)
                else:
                    n, pos = read_uleb(prog, pos)
                saved[r] = n * cie.data_align * (-1 if op == CFA_GNU_NEGATIVE_OFFSET_EXTENDED
                                                 else 1)
            elif op in (CFA_RESTORE_EXTENDED, CFA_UNDEFINED, CFA_SAME_VALUE):
                r, pos = read_uleb(prog, pos)
                if op == CFA_RESTORE_EXTENDED and r in initial:
                    saved[r] = initial[r]
                else:
                    saved.pop(r, None)
            elif op == CFA_REGISTER:
                r, pos = read_uleb(prog, pos)
                _r2, pos = read_uleb(prog, pos)
                saved.pop(r, None)
            elif op == CFA_REMEMBER_STATE:
                stack.append((reg, offset, dict(saved)))
            elif op == CFA_RESTORE_STATE:
                if not stack:
                    raise UnwindError("DW_CFA_restore_state with nothing remembered")
                reg, offset, saved = stack.pop()
            elif op == CFA_DEF_CFA_EXPRESSION:
                n, pos = read_uleb(prog, pos)
                pos += n
                reg = None
            elif op in (CFA_EXPRESSION, CFA_VAL_EXPRESSION):
                r, pos = read_uleb(prog, pos)
                n, pos = read_uleb(prog, pos)
                pos += n
                saved.pop(r, None)
            elif op in (CFA_VAL_OFFSET, CFA_VAL_OFFSET_SF):
                r, pos = read_uleb(prog, pos)
                pos = (read_uleb if op == CFA_VAL_OFFSET else read_sleb)(prog, pos)[1]
                saved.pop(r, None)
            elif op == CFA_GNU_ARGS_SIZE:
                pos = read_uleb(prog, pos)[1]
            elif op == CFA_SET_LOC:
                raise UnwindError("DW_CFA_set_loc is not read")
            else:
                raise UnwindError(f"call-frame instruction {op:#x} is not one pvpatch reads")
        if phase == "cie":
            initial = dict(saved)
    emit()
    return rows


def row_for(rows: Sequence[CfaRow], pc: int) -> CfaRow | None:
    k = bisect.bisect_right([r.loc for r in rows], pc) - 1
    return rows[k] if k >= 0 else None


def find_fde(eh: EhFrame, pc: int) -> Fde | None:
    for fde in eh.fdes:
        if fde.pc_begin <= pc < fde.pc_begin + fde.pc_range:
            return fde
    return None


# -- writing DWARF CFI ---------------------------------------------------------------------


def _pad(entry: bytearray, align: int) -> bytes:
    """Length field first, padded with DW_CFA_nop to a multiple of `align` bytes."""
    entry += bytes(-(len(entry) + 4) % align)
    return struct.pack("<I", len(entry)) + bytes(entry)


def cie(arch: Arch) -> bytes:
    """The CIE every thunk FDE names: "zR", pc-relative sdata4 addresses, the CFA at
    sp + one word and the return address just below it (as on entry to a function)."""
    regs = DWARF_REGS[arch.name]
    w = arch.ptr_size
    body = bytearray(struct.pack("<I", 0))
    body += bytes([1]) + b"zR\0" + uleb(1) + sleb(-w) + bytes([regs[RETURN_COLUMN[arch.name]]])
    body += uleb(1) + bytes([FDE_ENCODING])
    body += bytes([CFA_DEF_CFA]) + uleb(regs[arch.stack_pointer]) + uleb(w)
    body += bytes([CFA_OFFSET | regs[RETURN_COLUMN[arch.name]]]) + uleb(1)
    return _pad(body, w)


def _advance(delta: int) -> bytes:
    if delta < 0x40:
        return bytes([CFA_ADVANCE_LOC | delta])
    if delta < 0x100:
        return bytes([CFA_ADVANCE_LOC1, delta])
    return bytes([CFA_ADVANCE_LOC2]) + struct.pack("<H", delta)


def fde_instructions(arch: Arch, frame: ThunkFrame) -> bytes:
    regs = DWARF_REGS[arch.name]
    w = arch.ptr_size
    out = bytearray()
    prev = frame.rows[0]
    for row in frame.rows[1:]:
        out += _advance(row.offset - prev.offset)
        if row.cfa != prev.cfa:
            out += bytes([CFA_DEF_CFA_OFFSET]) + uleb(row.cfa)
        before, after = dict(prev.saved), dict(row.saved)
        for reg, slot in after.items():
            if before.get(reg) != slot:
                out += bytes([CFA_OFFSET | regs[reg]]) + uleb(-slot // w)
        for reg in before:
            if reg not in after:
                out += bytes([CFA_RESTORE | regs[reg]])
        prev = row
    return bytes(out)


def fde(arch: Arch, frame: ThunkFrame, cie_distance: int, pc_begin: int) -> bytes:
    """An FDE for `frame`: `cie_distance` from its CIE-pointer field back to the CIE,
    `pc_begin` the already pc-relative value of its address field (0 when a relocation
    fills it)."""
    body = bytearray(struct.pack("<I", cie_distance))
    body += struct.pack("<iI", pc_begin, frame.size) + uleb(0)
    body += fde_instructions(arch, frame)
    return _pad(body, arch.ptr_size)


@record
class EhEntries:
    """New `.eh_frame` entries for thunks: one CIE, then one FDE per thunk frame, in order."""

    data: bytes
    pc_fields: tuple[int, ...]  # offset (in `data`) of each FDE's pc_begin field


def eh_frame_entries(arch: Arch, frames: Sequence[ThunkFrame], at: int = 0,
                     targets: Sequence[int] | None = None) -> EhEntries:
    """A CIE then one FDE per frame, to sit at address `at` (linked files: each FDE's
    address resolved against `targets`, the thunks' addresses) or to be relocated
    (relocatable files: `targets` None, every pc_begin 0)."""
    out = bytearray(cie(arch))
    fields = []
    for k, frame in enumerate(frames):
        start = len(out)
        field = start + 8
        pc = 0
        if targets is not None:
            pc = targets[k] - (at + field)
            if not -(1 << 31) <= pc < 1 << 31:
                raise UnwindError("a thunk is more than 2 GiB from its unwind entry")
        out += fde(arch, frame, start + 4, pc)
        fields.append(field)
    return EhEntries(bytes(out), tuple(fields))


def rebase_eh_frame(data: bytes, old_addr: int, new_addr: int, ptr_size: int) -> bytes:
    """`.eh_frame` entries copied from `old_addr` to `new_addr`: every pc-relative
    pointer (CIE personality, FDE pc_begin and LSDA) rewritten to point where it did."""
    eh = parse_eh_frame(data, old_addr, ptr_size)
    out = bytearray(data[: eh.end])
    delta = new_addr - old_addr

    def move(pos: int, enc: int) -> None:
        if enc == PE_OMIT or enc & 0x70 != PE_PCREL:
            return  # absolute: the same wherever the field is
        shape = _fixed(enc, ptr_size)
        if shape is None:
            raise UnwindError(f"a pc-relative LEB128 pointer (encoding {enc:#x}) cannot be "
                              "moved in place")
        width, signed = shape
        value = int.from_bytes(out[pos : pos + width], "little", signed=signed) - delta
        lo, hi = (-(1 << (8 * width - 1)), 1 << (8 * width - 1)) if signed \
            else (0, 1 << (8 * width))
        if not lo <= value < hi:
            raise UnwindError("the copied .eh_frame is too far from the code it describes")
        out[pos : pos + width] = value.to_bytes(width, "little", signed=signed)

    for c in eh.cies:
        if c.personality is not None:
            move(*c.personality)
    for f in eh.fdes:
        move(f.pc_begin_field, f.cie.fde_encoding)
        if f.lsda_field is not None:
            move(f.lsda_field, f.cie.lsda_encoding)
    return bytes(out)


def eh_frame_hdr(eh_data: bytes, eh_addr: int, hdr_addr: int, ptr_size: int) -> bytes:
    """`.eh_frame_hdr` (LSB): version, encodings, a pointer to `.eh_frame`, and every
    FDE's (initial location, address) sorted, both relative to the header."""
    eh = parse_eh_frame(eh_data, eh_addr, ptr_size)
    rows = sorted((f.pc_begin, eh_addr + f.offset) for f in eh.fdes)
    out = bytearray([HDR_VERSION, PE_PCREL | PE_SDATA4, PE_UDATA4, HDR_TABLE])
    rel = eh_addr - (hdr_addr + 4)
    out += struct.pack("<iI", rel, len(rows))
    for pc, where in rows:
        a, b = pc - hdr_addr, where - hdr_addr
        if not (-(1 << 31) <= a < 1 << 31 and -(1 << 31) <= b < 1 << 31):
            raise UnwindError(".eh_frame_hdr: a location more than 2 GiB from the table")
        out += struct.pack("<ii", a, b)
    return bytes(out)


def hdr_lookup(hdr: bytes, hdr_addr: int, pc: int) -> int | None:
    """The FDE address the header's binary-search table gives for `pc` (what libgcc's
    unwinder does), or None."""
    if len(hdr) < 12 or hdr[0] != HDR_VERSION or hdr[2] != PE_UDATA4 or hdr[3] != HDR_TABLE:
        return None
    (count,) = struct.unpack_from("<I", hdr, 8)
    table = [struct.unpack_from("<ii", hdr, 12 + 8 * k) for k in range(count)
             if 12 + 8 * k + 8 <= len(hdr)]
    locs = [hdr_addr + a for a, _b in table]
    k = bisect.bisect_right(locs, pc) - 1
    return hdr_addr + table[k][1] if k >= 0 else None


# -- writing ORC ---------------------------------------------------------------------------

ORC_REG_UNDEFINED, ORC_REG_SP = 0, 5  # arch/x86/include/asm/orc_types.h (every version)
ORC_ENTRY = struct.Struct("<hhH")  # sp_offset, bp_offset, then the register/type bits
ORC_IP_SIZE = 4  # .orc_unwind_ip: s32 relative to itself, one PC32 relocation each


@record
class OrcLayout:
    """One version of objtool's `struct orc_entry`: after the two s16 offsets a u16 holding
    sp_reg:4, bp_reg:4, then type (`type_bits` wide) and one flag bit (`end` before 6.4,
    `signal` since)."""

    name: str
    type_bits: int
    call: int  # ORC_TYPE_CALL
    header: bytes | None  # the module's .orc_header (6.4+: a hash of the format), or none


ORC_LAYOUTS: tuple[OrcLayout, ...] = (
    # 6.1: type:2 (CALL 0, REGS 1, REGS_PARTIAL 2), end:1; no .orc_header.
    OrcLayout("v2 (Linux 5.x-6.3)", 2, 0, None),
    # 6.4+ (fb799447ae29): type:3 (UNDEFINED 0, END_OF_STACK 1, CALL 2, ...), signal:1; the
    # .orc_header hash as Debian's 6.12 modules carry it.
    OrcLayout("v3 (Linux 6.4+)", 3, 2,
              bytes.fromhex("fe5d32bf581bd63b2ca9a5c65ba5a625eab3fe24")),
)
# What objtool writes after the last instruction of a section (and the unwinder reads as
# "no frame information here"): an all-zero entry in both layouts.
ORC_TERMINATOR = bytes(ORC_ENTRY.size)


def orc_layout(header: bytes | None) -> OrcLayout | None:
    """The layout a module's `.orc_header` (None: it has none) says its entries use."""
    return next((lay for lay in ORC_LAYOUTS if lay.header == header), None)


def orc_entry(layout: OrcLayout, sp_offset: int, bp_offset: int = 0, sp_reg: int = ORC_REG_SP,
              bp_reg: int = ORC_REG_UNDEFINED, kind: int | None = None, flag: int = 0) -> bytes:
    kind = layout.call if kind is None else kind
    bits = sp_reg | bp_reg << 4 | kind << 8 | flag << (8 + layout.type_bits)
    return ORC_ENTRY.pack(sp_offset, bp_offset, bits)


@record
class OrcEntry:
    """An ORC entry decoded by its layout (`decode_orc`, as verify reads it back): `kind` is the
    type field, `flag` the bit after it (`end` before 6.4, `signal` since)."""

    sp_offset: int
    bp_offset: int
    sp_reg: int
    bp_reg: int
    kind: int
    flag: int


def decode_orc(layout: OrcLayout, raw: bytes) -> OrcEntry:
    sp, bp, bits = ORC_ENTRY.unpack(raw)
    tb = layout.type_bits
    return OrcEntry(sp, bp, bits & 0xF, bits >> 4 & 0xF, bits >> 8 & ((1 << tb) - 1),
                    bits >> (8 + tb) & 1)


def orc_entries(layout: OrcLayout, thunks: Sequence[tuple[int, ThunkFrame]],
                ) -> list[tuple[int, bytes]]:
    """(offset in the thunk section, entry) for every point where a thunk's stack changes,
    and a terminator after each thunk that the next one does not start right at."""
    out: list[tuple[int, bytes]] = []
    starts = {at for at, _f in thunks}
    for at, frame in thunks:
        for row in frame.rows:
            out.append((at + row.offset, orc_entry(layout, row.cfa)))
        if at + frame.size not in starts:
            out.append((at + frame.size, ORC_TERMINATOR))
    return out
