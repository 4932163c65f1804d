"""Symbol versions (CONFIG_MODVERSIONS) for symbols a rewrite adds to a module.

A module built with symbol versions lists, in `__versions`, a CRC for every
symbol it imports; the kernel refuses a module that imports a symbol without
one ("no symbol version for ...").  When a rewrite makes a module call a kernel
function it did not call before, the entry must be added, with the CRC the
target kernel exports: from a `Module.symvers` file, or from the export tables
of the kernel image itself.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..arch import Arch
from ..elf.reader import ElfFile, Section
from ..errors import InputError

if TYPE_CHECKING:
    from pathlib import Path

MODULE_NAME_LEN = 64  # struct modversion_info is MODULE_NAME_LEN bytes in all


def pack_entry(name: str, crc: int, arch: Arch) -> bytes:
    """One `struct modversion_info {unsigned long crc; char name[64 - sizeof(long)];}`."""
    raw = name.encode()
    room = MODULE_NAME_LEN - arch.ptr_size
    if len(raw) >= room:
        raise InputError(f"symbol name {name!r} is too long for __versions")
    return arch.word.pack(crc) + raw + bytes(room - len(raw))


def names_in(data: bytes, arch: Arch) -> set[str]:
    out = set()
    for i in range(0, len(data) - MODULE_NAME_LEN + 1, MODULE_NAME_LEN):
        name = data[i + arch.ptr_size : i + MODULE_NAME_LEN].split(b"\0")[0]
        out.add(name.decode("utf-8", "replace"))
    return out


def read_crcs(path: str | os.PathLike[str]) -> dict[str, int]:
    """CRCs from a `Module.symvers` file or from a kernel image (vmlinux)."""
    from pathlib import Path

    p = Path(path)
    try:
        with p.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(p)) from None
    if head == b"\x7fELF":
        return crcs_from_vmlinux(ElfFile.open(p))
    return crcs_from_symvers(p)


def crcs_from_symvers(path: Path) -> dict[str, int]:
    """`0xCRC<TAB>symbol<TAB>module<TAB>EXPORT_SYMBOL[<TAB>namespace]` per line."""
    out: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            out[parts[1]] = int(parts[0], 16)
        except (IndexError, ValueError):
            raise InputError(f"line {n} is not a Module.symvers line", str(path)) from None
    return out


def crcs_from_vmlinux(elf: ElfFile) -> dict[str, int]:
    """Exported symbol -> CRC from `__ksymtab{,_gpl}` and the parallel `__kcrctab{,_gpl}`.

    `struct kernel_symbol` changed shape over the years: pointers (value, name) before
    4.19, then 32-bit offsets relative to each field (x86 selects
    HAVE_ARCH_PREL32_RELOCATIONS on both architectures), and a namespace field from 5.4.
    The entry size is the table's size over the number of CRCs; where two shapes share
    a size (8 bytes on i386), the one whose first name lands in `__ksymtab_strings` is
    the table's.
    """
    out: dict[str, int] = {}
    ptr = elf.arch.ptr_size
    strings = elf.section("__ksymtab_strings")
    for tab, crctab in (("__ksymtab", "__kcrctab"), ("__ksymtab_gpl", "__kcrctab_gpl")):
        ks, kc = elf.section(tab), elf.section(crctab)
        if ks is None or kc is None:
            continue
        syms, crcs = elf.section_data(ks), elf.section_data(kc)
        count = len(crcs) // 4
        if not count:
            continue
        esize, rest = divmod(len(syms), count)

        def name_addr(i: int, prel: bool, esize: int = esize, ks_addr: int = ks.addr,
                      syms: bytes = syms) -> int:
            if prel:
                (rel,) = struct.unpack_from("<i", syms, i * esize + 4)
                return ks_addr + i * esize + 4 + int(rel)
            return int(elf.arch.word.unpack_from(syms, i * esize + ptr)[0])

        shapes = [prel for prel, sizes in ((True, (8, 12)), (False, (2 * ptr, 3 * ptr)))
                  if esize in sizes and not rest]
        fitting = [prel for prel in shapes if _names_string(elf, strings, name_addr(0, prel))]
        if not fitting:
            raise InputError(f"{tab} ({len(syms)} bytes, {count} CRCs in {crctab}) has no "
                             "struct kernel_symbol shape pvpatch knows", elf.path)
        prel = fitting[0]
        for i in range(count):
            at = elf.addr_to_offset(name_addr(i, prel))
            if at is None:
                continue
            end = elf.data.find(b"\0", at, at + 512)
            if end < 0:
                continue
            out[elf.data[at:end].decode("utf-8", "replace")] = struct.unpack_from(
                "<I", crcs, i * 4)[0]
    return out


def _names_string(elf: ElfFile, strings: Section | None, addr: int) -> bool:
    """`addr` is where export names live: `__ksymtab_strings`, else any loaded section."""
    if strings is not None:
        return strings.addr <= addr < strings.addr + strings.size
    return elf.addr_to_offset(addr) is not None


def versions_for(names: list[str], crcs: Mapping[str, int] | None, have: set[str],
                 arch: Arch, path: str) -> bytes:
    """Entries to append for `names` not yet in `__versions`; an unknown CRC is an error."""
    out = bytearray()
    for name in names:
        if name in have:
            continue
        if crcs is None or name not in crcs:
            raise InputError(
                f"the module has symbol versions (__versions) and now imports {name}: give "
                f"its CRC with --symvers (a Module.symvers file or the kernel's vmlinux)",
                path,
            )
        out += pack_entry(name, crcs[name], arch)
    return bytes(out)
