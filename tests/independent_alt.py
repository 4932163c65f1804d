"""An independent `.altinstructions` decoder (Linux 6.3+ entries) for cross-checking pvpatch.

It shares no code with pvpatch: sections, relocations and symbols come from the text output of
binutils' ``readelf`` (through tests/independent.py's parsers, which share none either), and
the only bytes read directly are the table, the replacements and the sites.

Entry (6.3+, 14 bytes, packed): ``s32 instr_offset, s32 repl_offset, u16 cpuid, u16 flags,
u8 instrlen, u8 replacementlen``.  A paravirt site is an entry with flags bit 1
(ALT_FLAG_DIRECT_CALL); its pv_ops slot is what the site's ``ff 15`` call reads: in ET_REL
files from the relocation against ``pv_ops`` at the call's operand, in linked files from the
operand itself and the address of ``pv_ops`` (read here from the export table
``__ksymtab``, 12-byte self-relative entries on x86-64 since 5.4, when there is no
``.symtab``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import independent as ind

TABLE = ".altinstructions"
REPL = ".altinstr_replacement"
STRIDE = 14
DIRECT_CALL = 2
NOT = 1
PV_FEATURES = {272, 276, 277}  # XENPV, PVUNLOCK, VCPUPREEMPT


@dataclass(frozen=True)
class Entry:
    index: int
    section: str | None  # where instr points (None: not resolved)
    offset: int
    repl_section: str | None
    repl_offset: int
    cpuid: int
    flags: int
    instrlen: int
    repllen: int


@dataclass(frozen=True)
class AltSite:
    index: int  # the DIRECT_CALL entry
    section: str
    offset: int
    address: int | None
    len: int
    slot: int
    bytes: str
    native: str | None  # hex of the NOT(pv feature) partner's replacement
    entries: tuple[int, ...]


@dataclass(frozen=True)
class AltDecoded:
    path: Path
    arch: str
    table: ind.Section | None
    entries: list[Entry]
    sites: list[AltSite]


def _i32(raw: bytes, at: int) -> int:
    return int(struct.unpack_from("<i", raw, at)[0])


def _pv_ops_linked(path: Path, secs: list[ind.Section]) -> int:
    """pv_ops' address in a linked image: .symtab if any, else the export table."""
    for sym in ind.symbols(path):
        if sym.name == "pv_ops" and sym.ndx != "UND":
            return sym.value
    by_name = {s.name: s for s in secs}
    ks, strings = by_name["__ksymtab"], by_name["__ksymtab_strings"]
    raw = ind._read(path, ks.offset, ks.size)
    sraw = ind._read(path, strings.offset, strings.size)
    for at in range(0, ks.size - 11, 12):
        value = ks.addr + at + _i32(raw, at)
        name_at = ks.addr + at + 4 + _i32(raw, at + 4) - strings.addr
        if sraw[name_at : sraw.index(b"\0", name_at)] == b"pv_ops":
            return value & 0xFFFFFFFFFFFFFFFF
    raise AssertionError(f"{path}: pv_ops is neither in .symtab nor exported")


def decode(path: Path) -> AltDecoded:
    arch, elf_type = ind._header(path)
    is64 = arch == "x86_64"
    secs = ind.sections(path)
    by_name = {s.name: s for s in secs}
    by_index = {s.index: s for s in secs}
    table = by_name.get(TABLE)
    if table is None:
        return AltDecoded(path, arch, None, [], [])
    raw = ind._read(path, table.offset, table.size)
    assert table.size % STRIDE == 0
    entries: list[Entry] = []
    if elf_type == "REL":
        syms = ind.symbols(path)
        rels = ind.relocations(path, is64)
        relname = (".rela" if is64 else ".rel") + TABLE
        fields = {r.offset: r for r in rels.get(relname, [])}

        def where(at: int) -> tuple[str | None, int]:
            r = fields.get(at)
            if r is None or r.type not in ("R_X86_64_PC32", "R_386_PC32"):
                return None, 0
            sym = syms[r.sym]
            if not sym.ndx.isdigit():
                return None, 0
            addend = r.addend if r.addend is not None else _i32(raw, at)
            return by_index[int(sym.ndx)].name, sym.value + addend
    else:

        def where(at: int) -> tuple[str | None, int]:
            addr = (table.addr + at + _i32(raw, at)) & (2**64 - 1 if is64 else 2**32 - 1)
            for s in secs:
                if "X" in s.flags and s.addr <= addr < s.addr + s.size:
                    return s.name, addr - s.addr
            return None, 0

    for i in range(table.size // STRIDE):
        at = i * STRIDE
        cpuid, flags, ilen, rlen = struct.unpack_from("<HHBB", raw, at + 8)
        sec, off = where(at)
        rsec, roff = where(at + 4)
        entries.append(Entry(i, sec, off, rsec, roff, cpuid, flags, ilen, rlen))

    def read_at(name: str, off: int, size: int) -> bytes:
        s = by_name[name]
        return ind._read(path, s.offset + off, size)

    pv_ops = None if elf_type == "REL" else _pv_ops_linked(path, secs)
    call_relocs: dict[tuple[str, int], ind.Reloc] = {}
    syms_rel = ind.symbols(path) if elf_type == "REL" else []
    if elf_type == "REL":
        for relsec, rows in ind.relocations(path, is64).items():
            target = relsec.removeprefix(".rela" if is64 else ".rel")
            for r in rows:
                call_relocs[(target, r.offset)] = r
    sites: list[AltSite] = []
    seen: set[tuple[str, int]] = set()
    for e in entries:
        if not e.flags & DIRECT_CALL or e.section is None or (e.section, e.offset) in seen:
            continue
        seen.add((e.section, e.offset))
        code = read_at(e.section, e.offset, e.instrlen)
        assert code[:2] == b"\xff\x15", (path, e)
        if elf_type == "REL":
            r = call_relocs[(e.section, e.offset + 2)]
            assert syms_rel[r.sym].name == "pv_ops", (path, e, r)
            addend = r.addend if r.addend is not None else _i32(code, 2)
            slot = (addend + 4) // 8 if is64 else addend // 4
            address = None
        else:
            assert pv_ops is not None
            address = by_name[e.section].addr + e.offset
            disp = _i32(code, 2)
            target = (address + 6 + disp) if is64 else disp & 0xFFFFFFFF
            slot = (target - pv_ops) // (8 if is64 else 4)
        group = [x for x in entries if (x.section, x.offset) == (e.section, e.offset)]
        natives = [x for x in group if x.flags & NOT and x.cpuid in PV_FEATURES]
        native = None
        if len(natives) == 1 and natives[0].repl_section == REPL:
            n = natives[0]
            native = read_at(REPL, n.repl_offset, n.repllen).hex()
        sites.append(AltSite(e.index, e.section, e.offset, address, e.instrlen, slot, code.hex(),
                             native, tuple(x.index for x in group)))
    return AltDecoded(path, arch, table, entries, sites)
