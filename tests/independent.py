"""An independent `.parainstructions` decoder for cross-checking pvpatch.

It deliberately shares no code with pvpatch: section and relocation data come from the text
output of binutils' ``readelf`` (``-h``, ``-S``, ``-r``, ``-s``, all with ``-W``), and the only
bytes read directly are the table and the sites, at the file offsets ``readelf -S`` reports.

Entry layout (6.1): ``{pointer, u8 type, u8 len, u16 clobbers}`` with a stride of 16 bytes on
x86-64 and 8 on i386. In ET_REL files the pointer comes from the table's relocation; in ET_EXEC
and ET_DYN files it is the site's address.
"""

from __future__ import annotations

import re
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE = ".parainstructions"

_SECTION_RE = re.compile(
    r"^\s*\[\s*(?P<idx>\d+)\]\s+(?P<name>.*?)\s+(?P<type>\S+)\s+(?P<addr>[0-9a-f]{8,16})"
    r"\s+(?P<off>[0-9a-f]+)\s+(?P<size>[0-9a-f]+)\s+(?P<es>[0-9a-f]{2})\s+(?P<flags>[A-Za-z]*)"
    r"\s+(?P<link>\d+)\s+(?P<info>\d+)\s+(?P<align>\d+)\s*$"
)
_RELSEC_RE = re.compile(r"^Relocation section '(?P<name>[^']+)' at offset")
_RELOC_RE = re.compile(r"^(?P<off>[0-9a-f]+)\s+(?P<info>[0-9a-f]+)\s+(?P<type>R_\S+)(?P<rest>.*)$")
_ADDEND_RE = re.compile(r"\s(?P<sign>[+-])\s(?P<val>[0-9a-f]+)\s*$")
_SYMTAB_RE = re.compile(r"^Symbol table '(?P<name>[^']+)' contains")
_SYM_RE = re.compile(
    r"^\s*(?P<num>\d+):\s+(?P<value>[0-9a-f]+)\s+(?P<size>\S+)\s+(?P<type>\S+)\s+(?P<bind>\S+)"
    r"\s+(?P<vis>\S+)\s+(?P<ndx>\S+)\s?(?P<name>.*)$"
)


@dataclass(frozen=True)
class Section:
    index: int
    name: str
    type: str
    addr: int
    offset: int
    size: int
    flags: str
    link: int
    info: int


@dataclass(frozen=True)
class Symbol:
    value: int
    type: str
    ndx: str  # section index as text, or UND / ABS / COM
    name: str


@dataclass(frozen=True)
class Reloc:
    offset: int
    type: str
    sym: int
    addend: int | None  # None for REL (implicit addend, stored in the bytes)


@dataclass(frozen=True)
class Site:
    index: int  # position in the table
    section: str  # section holding the site
    offset: int  # offset of the site inside that section
    address: int | None  # run-time address (ET_EXEC / ET_DYN only)
    type: int
    len: int
    clobbers: int
    bytes: str  # hex of the site's `len` bytes
    slot: int | None  # pv_ops slot from the call's relocation (ET_REL, `ff 15` sites)
    target: int | None  # ET_EXEC/DYN `ff 15` sites: address of the pv_ops slot called through
    raw_pointer: int  # pointer field as stored (RELA: 0; REL: implicit addend; EXEC: address)


@dataclass(frozen=True)
class Decoded:
    path: Path
    arch: str  # "x86_64" | "i386"
    elf_type: str  # "REL" | "EXEC" | "DYN"
    table: Section | None
    entry_size: int
    sites: list[Site]


def _readelf(path: Path, *opts: str) -> list[str]:
    out = subprocess.run(
        ["readelf", "-W", *opts, str(path)], check=True, capture_output=True, text=True
    ).stdout
    return out.splitlines()


def _header(path: Path) -> tuple[str, str]:
    fields: dict[str, str] = {}
    for line in _readelf(path, "-h"):
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    machine = fields["Machine"]
    if "X86-64" in machine:
        arch = "x86_64"
    elif "80386" in machine:
        arch = "i386"
    else:
        raise ValueError(f"{path}: unsupported machine {machine!r}")
    elf_type = fields["Type"].split()[0]  # "REL (Relocatable file)" -> "REL"
    return arch, elf_type


def sections(path: Path) -> list[Section]:
    result = []
    for line in _readelf(path, "-S"):
        m = _SECTION_RE.match(line)
        if m:
            result.append(
                Section(
                    index=int(m["idx"]),
                    name=m["name"],
                    type=m["type"],
                    addr=int(m["addr"], 16),
                    offset=int(m["off"], 16),
                    size=int(m["size"], 16),
                    flags=m["flags"],
                    link=int(m["link"]),
                    info=int(m["info"]),
                )
            )
    return result


def relocations(path: Path, is64: bool) -> dict[str, list[Reloc]]:
    """Relocations keyed by the name of the relocation section (e.g. ``.rela.text``)."""
    result: dict[str, list[Reloc]] = {}
    current: list[Reloc] | None = None
    for line in _readelf(path, "-r"):
        if m := _RELSEC_RE.match(line):
            current = result.setdefault(m["name"], [])
            continue
        m = _RELOC_RE.match(line)
        if m is None or current is None:
            continue
        info = int(m["info"], 16)
        sym = info >> 32 if is64 else info >> 8
        addend: int | None = None
        if a := _ADDEND_RE.search(m["rest"]):
            addend = int(a["val"], 16) * (-1 if a["sign"] == "-" else 1)
        elif sym == 0 and m["rest"].strip():
            addend = int(m["rest"].split()[-1], 16)  # RELA without a symbol: bare addend
        current.append(Reloc(int(m["off"], 16), m["type"], sym, addend))
    return result


def symbols(path: Path) -> list[Symbol]:
    """Entries of ``.symtab``, indexed by symbol number."""
    result: list[Symbol] = []
    in_symtab = False
    for line in _readelf(path, "-s"):
        if m := _SYMTAB_RE.match(line):
            in_symtab = m["name"] == ".symtab"
            continue
        if in_symtab and (m := _SYM_RE.match(line)):
            assert int(m["num"]) == len(result), line
            result.append(Symbol(int(m["value"], 16), m["type"], m["ndx"], m["name"].strip()))
    return result


def _read(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{path}: short read at {offset:#x}")
    return data


def decode(path: Path) -> Decoded:
    """Decode every `.parainstructions` entry of an ELF file."""
    arch, elf_type = _header(path)
    is64 = arch == "x86_64"
    ptr_size, stride = (8, 16) if is64 else (4, 8)
    secs = sections(path)
    table = next((s for s in secs if s.name == TABLE), None)
    if table is None:
        return Decoded(path, arch, elf_type, None, stride, [])

    raw = _read(path, table.offset, table.size)
    # 6.1 pads every entry to the stride; older kernels leave the last one short (>= 12 / 8).
    count = table.size // stride + (1 if table.size % stride >= ptr_size + 4 else 0)
    entries = []
    for i in range(count):
        fmt = "<QBBH" if is64 else "<IBBH"
        entries.append(struct.unpack_from(fmt, raw, i * stride))

    if elf_type == "REL":
        sites = list(_rel_sites(path, is64, secs, table, entries))
    else:
        sites = list(_exec_sites(path, is64, secs, entries))
    return Decoded(path, arch, elf_type, table, stride, sites)


def _rel_sites(
    path: Path,
    is64: bool,
    secs: list[Section],
    table: Section,
    entries: list[tuple[int, int, int, int]],
) -> Iterator[Site]:
    relocs = relocations(path, is64)
    syms = symbols(path)
    by_index = {s.index: s for s in secs}
    # Relocation sections by the index of the section they apply to (sh_info).
    rel_for: dict[int, dict[int, Reloc]] = {
        s.info: {r.offset: r for r in relocs.get(s.name, [])}
        for s in secs
        if s.type in ("RELA", "REL")
    }
    table_rel = rel_for.get(table.index, {})
    stride = 16 if is64 else 8
    for i, (ptr, typ, length, clobbers) in enumerate(entries):
        r = table_rel.get(i * stride)
        if r is None:
            raise ValueError(f"{path}: entry {i} has no relocation")
        want = "R_X86_64_64" if is64 else "R_386_32"
        if r.type != want:
            raise ValueError(f"{path}: entry {i}: relocation {r.type}, expected {want}")
        sym = syms[r.sym]
        # RELA: the addend is explicit (the bytes hold 0); REL: the bytes are the addend.
        addend = r.addend if r.addend is not None else ptr
        if not sym.ndx.isdigit():
            raise ValueError(f"{path}: entry {i}: symbol {sym.name!r} is {sym.ndx}")
        sec = by_index[int(sym.ndx)]
        off = sym.value + addend
        data = _read(path, sec.offset + off, length)
        slot = _call_slot(rel_for.get(sec.index, {}), syms, off, data, is64)
        yield Site(i, sec.name, off, None, typ, length, clobbers, data.hex(), slot, None, ptr)


def _call_slot(
    relocs: dict[int, Reloc], syms: list[Symbol], off: int, data: bytes, is64: bool
) -> int | None:
    """pv_ops slot of a 6.1 ``ff 15`` call, from its displacement's relocation."""
    r = relocs.get(off + 2)
    if data[:2] != b"\xff\x15" or r is None or syms[r.sym].name != "pv_ops":
        return None
    if is64 and r.type == "R_X86_64_PC32" and r.addend is not None:
        slot, rem = divmod(r.addend + 4, 8)  # rel32 is relative to the next insn (+4)
    elif not is64 and r.type == "R_386_32":
        slot, rem = divmod(struct.unpack_from("<I", data, 2)[0], 4)  # implicit addend
    else:
        return None
    return slot if rem == 0 else None


def _exec_sites(
    path: Path, is64: bool, secs: list[Section], entries: list[tuple[int, int, int, int]]
) -> Iterator[Site]:
    # Only loaded sections with file contents; .data..percpu has address 0 and is skipped.
    loaded = [s for s in secs if "A" in s.flags and s.type != "NOBITS" and s.addr and s.size]
    for i, (ptr, typ, length, clobbers) in enumerate(entries):
        hits = [s for s in loaded if s.addr <= ptr < s.addr + s.size]
        if len(hits) != 1:
            raise ValueError(f"{path}: entry {i}: address {ptr:#x} is in {len(hits)} sections")
        sec = hits[0]
        off = ptr - sec.addr
        data = _read(path, sec.offset + off, length)
        target = None
        if data[:2] == b"\xff\x15" and length >= 6:
            disp = struct.unpack_from("<i" if is64 else "<I", data, 2)[0]
            # x86-64: RIP-relative to the end of the 6-byte insn; i386: absolute address.
            target = (ptr + 6 + disp) & (2**64 - 1) if is64 else disp
        yield Site(i, sec.name, off, ptr, typ, length, clobbers, data.hex(), None, target, ptr)


def decode_many(paths: list[Path]) -> dict[Path, Decoded]:
    return {p: decode(p) for p in paths}


def compare_record(path: Path, record: dict[str, Any], ref: Decoded) -> list[str]:
    """Differences between pvpatch's record and the reference decoding (empty when equal)."""
    errors: list[str] = []

    def check(what: str, got: object, want: object) -> None:
        if got != want:
            errors.append(f"{path.name}: {what}: pvpatch {got!r}, expected {want!r}")

    check("arch", record["arch"], ref.arch)
    check("elf_type", record["elf_type"], ref.elf_type)
    table = record["table"]
    if table is None:
        return [*errors, f"{path.name}: table is null"]
    check("table.section", table["section"], TABLE)
    check("table.entry_size", table["entry_size"], ref.entry_size)
    check("table.count", table["count"], len(ref.sites))
    if not isinstance(table["layout"], str):
        errors.append(f"{path.name}: table.layout is not a str: {table['layout']!r}")
    sites = record["sites"]
    check("site count", len(sites), len(ref.sites))
    for got, want in zip(sites, ref.sites, strict=False):
        tag = f"site {want.index}"
        check(f"{tag} index", got["index"], want.index)
        check(f"{tag} section", got["section"], want.section)
        check(f"{tag} offset", got["offset"], want.offset)
        check(f"{tag} type", got["type"], want.type)
        check(f"{tag} len", got["len"], want.len)
        check(f"{tag} clobbers", got["clobbers"], want.clobbers)
        check(f"{tag} bytes", str(got["bytes"]).replace(" ", "").lower(), want.bytes)
        if ref.elf_type == "REL":
            check(f"{tag} address", got["address"], None)
        else:
            check(f"{tag} address", got["address"], want.address)
        regs = got["clobber_regs"]
        if not (isinstance(regs, list) and all(isinstance(r, str) for r in regs)):
            errors.append(f"{path.name}: {tag} clobber_regs is not a list of str: {regs!r}")
        elif len(regs) != want.clobbers.bit_count():
            errors.append(f"{path.name}: {tag} clobber_regs {regs} vs mask {want.clobbers:#x}")
        if not (got["op"] is None or isinstance(got["op"], str)):
            errors.append(f"{path.name}: {tag} op is not str|null: {got['op']!r}")
        if not isinstance(got["insns"], list):
            errors.append(f"{path.name}: {tag} insns is not a list: {got['insns']!r}")
    return errors
