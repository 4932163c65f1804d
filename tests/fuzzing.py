"""Structure-aware mutation of ELF fixtures, shared by the fuzz tests and scripts/fuzz.

A mutation targets what a parser trusts: ELF and section header fields, the
paravirt table's bytes, relocation and symbol entries, and truncation at every
structure boundary.  Choices come from a `draw(lo, hi)` callable, so the same code
runs under hypothesis (which can shrink a failure) and under a plain random loop.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pvpatch
from pvpatch.elf import SHT_REL, SHT_RELA, SHT_SYMTAB, ElfFile

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "fixtures"
SEEDS = [
    FIX / "x86_64" / "kernel61.o",
    FIX / "x86_64" / "seed.o",
    FIX / "x86_64" / "legacy.o",
    FIX / "x86_64" / "prog.o",
    FIX / "x86_64" / "prog",
    FIX / "x86_64" / "prog-pie",
    FIX / "i386" / "kernel61.o",
    FIX / "i386" / "prog.o",
    FIX / "i386" / "prog-pie",
    FIX / "x86_64" / "kernel612.o",
    FIX / "x86_64" / "prog68",
    FIX / "i386" / "kernel612.o",
]
SPEC = FIX / "specs" / "prog.toml"

Draw = Callable[[int, int], int]


@dataclass(frozen=True)
class Field:
    offset: int
    size: int
    what: str


def fields_of(data: bytes) -> list[Field]:
    """Every header, table, relocation and symbol field of a (valid) seed file."""
    elf = ElfFile(data)
    cls = elf.cls
    wide = cls.bits == 64
    out: list[Field] = []
    # ELF header: e_type .. e_shstrndx
    ehdr = [(16, 2), (18, 2), (20, 4)] + (
        [(24, 8), (32, 8), (40, 8), (48, 4)] if wide else [(24, 4), (28, 4), (32, 4), (36, 4)])
    base = 52 if wide else 40
    ehdr += [(base + 2 * k, 2) for k in range(6)]
    out += [Field(o, s, "ehdr") for o, s in ehdr]
    shdr_fields = ([(0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (32, 8), (40, 4), (44, 4),
                    (48, 8), (56, 8)] if wide else [(4 * k, 4) for k in range(10)])
    for i in range(len(elf.sections)):
        at = elf.e_shoff + i * cls.shdr.size
        out += [Field(at + o, s, f"shdr[{i}]") for o, s in shdr_fields]
    for i in range(len(elf.segments)):
        at = elf.e_phoff + i * cls.phdr.size
        step = 8 if wide else 4
        out += [Field(at + o, step if o else 4, f"phdr[{i}]")
                for o in range(0, cls.phdr.size, step)]
    for name in (".parainstructions", ".altinstructions"):
        table = elf.section(name)
        if table is not None:
            out += [Field(table.offset + k, 1, "table") for k in range(table.size)]
    for sec in elf.sections:
        if sec.type in (SHT_REL, SHT_RELA):
            fmt = cls.rela if sec.type == SHT_RELA else cls.rel
            word = 8 if wide else 4
            for k in range(sec.size // fmt.size):
                at = sec.offset + k * fmt.size
                out += [Field(at + o, word, f"reloc {sec.name}")
                        for o in range(0, fmt.size, word)]
        if sec.type == SHT_SYMTAB:
            for k in range(sec.size // cls.sym.size):
                at = sec.offset + k * cls.sym.size
                layout = [(0, 4), (4, 1), (5, 1), (6, 2), (8, 8), (16, 8)] if wide else \
                    [(0, 4), (4, 4), (8, 4), (12, 1), (13, 1), (14, 2)]
                out += [Field(at + o, s, "symbol") for o, s in layout]
    return out


def boundaries_of(data: bytes) -> list[int]:
    elf = ElfFile(data)
    points = {elf.cls.ehdr.size, elf.e_shoff, len(data)}
    for sec in elf.sections:
        points |= {sec.offset, sec.offset + sec.file_size}
    for i in range(len(elf.sections)):
        points.add(elf.e_shoff + i * elf.cls.shdr.size)
    return sorted(p for p in points if 0 <= p <= len(data))


def interesting(size: int, file_size: int, draw: Draw) -> int:
    top = (1 << (8 * size)) - 1
    choices = [0, 1, 2, 3, 4, 7, 8, 16, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 40, (1 << 63) - 1, 1 << 63, top,
               file_size, file_size - 1, file_size + 1, file_size // 2]
    k = draw(0, len(choices))
    value = choices[k] if k < len(choices) else draw(0, min(top, (1 << 62)))
    return value & top


def mutate(data: bytes, draw: Draw, fields: list[Field], cuts: list[int]) -> bytes:
    """Apply one to three structure-aware mutations."""
    buf = bytearray(data)
    for _ in range(draw(1, 3)):
        kind = draw(0, 5)
        if kind <= 3 and fields:
            if kind == 3:  # prefer the table and relocations: where sites come from
                pool = [f for f in fields if f.what in ("table",) or f.what.startswith("reloc")]
                pool = pool or fields
            else:
                pool = fields
            f = pool[draw(0, len(pool) - 1)]
            if f.offset + f.size <= len(buf):
                value = interesting(f.size, len(data), draw)
                buf[f.offset : f.offset + f.size] = value.to_bytes(f.size, "little")
        elif kind == 4 and cuts:
            cut = cuts[draw(0, len(cuts) - 1)] + draw(0, 16) - 8
            del buf[max(cut, 0) :]
        else:
            if buf:
                pos = draw(0, len(buf) - 1)
                buf[pos] = draw(0, 255)
    return bytes(buf)


# -- entry lies: lengths, places and overlaps ------------------------------------------

# (table section, entry size, where `len` is, where the site pointer is or None when a
# relocation carries it, how wide that pointer is) per family and pointer size.
ENTRY_LAYOUTS = {
    (".parainstructions", 8): (16, 9, 0, 8),
    (".parainstructions", 4): (8, 5, 0, 4),
    (".altinstructions", 8): (14, 12, 0, 4),
    (".altinstructions", 4): (14, 12, 0, 4),
}


def mutate_entries(data: bytes, draw: Draw) -> bytes:
    """Make one to three table entries lie, the way a toolchain bug or a hostile file
    would: a length a little off or covering what follows, a site pointer moved into
    the middle of an instruction or onto a neighbour, one entry copied over another
    (duplicates, nested and overlapping sites).  In relocatable files the pointer is a
    relocation's addend, which moves instead."""
    elf = ElfFile(data)
    buf = bytearray(data)
    for name in (".parainstructions", ".altinstructions"):
        sec = elf.section(name)
        if sec is None or sec.size == 0:
            continue
        stride, len_at, ptr_at, width = ENTRY_LAYOUTS[(name, elf.arch.ptr_size)]
        count = sec.size // stride
        if count == 0:
            continue
        addends = _addend_fields(elf, sec, stride, ptr_at)
        for _ in range(draw(1, 3)):
            i = draw(0, count - 1)
            base = sec.offset + i * stride
            kind = draw(0, 3)
            if kind == 0:  # the length, near its value or anywhere
                old = buf[base + len_at]
                buf[base + len_at] = (old + draw(-8, 16)) & 0xFF if draw(0, 3) else draw(0, 255)
            elif kind in (1, 2):  # the site pointer, a few bytes either way
                at, size = addends.get(i, (base + ptr_at, width))
                value = int.from_bytes(buf[at : at + size], "little", signed=True)
                value += draw(-12, 12) or 1
                buf[at : at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            else:  # another entry's fields over this one's (duplicates, nesting)
                j = draw(0, count - 1)
                src = sec.offset + j * stride
                buf[base : base + stride] = buf[src : src + stride]
                if i in addends and j in addends:
                    (a, size), (b, _) = addends[i], addends[j]
                    buf[a : a + size] = buf[b : b + size]
    return bytes(buf)


def _addend_fields(elf: ElfFile, sec: object, stride: int, ptr_at: int
                   ) -> dict[int, tuple[int, int]]:
    """Entry index -> (file offset, size) of the addend that places its site (RELA files:
    the relocation's r_addend; REL files: the implicit addend in the entry itself)."""
    from pvpatch.elf import Section

    assert isinstance(sec, Section)
    out: dict[int, tuple[int, int]] = {}
    if not elf.is_relocatable:
        return out
    for relsec in elf.relocation_sections(sec):
        if relsec.type != SHT_RELA:
            continue
        fmt = elf.cls.rela
        for k in range(relsec.size // fmt.size):
            at = relsec.offset + k * fmt.size
            r_offset = int.from_bytes(elf.data[at : at + (fmt.size // 3)], "little")
            if r_offset % stride == ptr_at:
                out[r_offset // stride] = (at + 2 * (fmt.size // 3), fmt.size // 3)
    return out


def rewrites_only_honest_sites(data: bytes, spec: Path | None = None) -> str:
    """The oracle for lying entries: whatever the table says, every site a plan rewrites
    holds a paravirt call (or a form pvpatch writes) padded with NOPs, overlaps no other
    site, and the patch gives bytes.  Returns the outcome like `exercise`."""
    from pvpatch.integrity import site_form

    try:
        elf = ElfFile(data, "<fuzz>")
        res = pvpatch.scan_file(elf, ops="catalog:linux-6.1-x86_64" if elf.arch.ptr_size == 8
                                else f"catalog:{FIX / 'catalogs' / 'fixtures-i386.toml'}")
        backend = str(spec) if spec is not None else "native"
        plan = pvpatch.make_plan(res, backend)
        spans = sorted((d.site.section_index, d.site.offset, d.site.end) for d in plan.decisions)
        for d in plan.decisions:
            if not d.rewrites:
                continue
            s = d.site
            if site_form(elf.arch, s.code) is None and d.code != s.code:
                native = d.code if d.action == "inline" else None
                if native is None or not s.code.startswith(native[: len(native)]):
                    raise Unexpected(f"rewrote site {s.index} at {s.section}+{s.offset:#x} "
                                     f"whose bytes {s.code.hex()} are no call and NOPs")
            for sec_index, start, end in spans:
                if sec_index == s.section_index and start < s.end and s.offset < end \
                        and (start, end) != (s.offset, s.end):
                    raise Unexpected(f"rewrote site {s.index} at {s.section}+{s.offset:#x}, "
                                     f"which overlaps another site ({start:#x}..{end:#x})")
        _ = pvpatch.apply_plan(plan).data
        return "ok"
    except pvpatch.PvpatchError as exc:
        return type(exc).__name__
    except Unexpected:
        raise
    except Exception as exc:
        raise Unexpected(f"{type(exc).__name__}: {exc}") from exc


class Unexpected(AssertionError):
    """An exception that is not the package's own error type."""


def exercise(data: bytes, *, verify: bool = False, spec: Path | None = None) -> str:
    """Every library entry point on `data`: it must succeed or raise PvpatchError."""
    from pvpatch.check import CheckOptions, check_elf
    from pvpatch.sarif import ArtifactFindings, sarif_log

    try:
        elf = ElfFile(data, "<fuzz>")
        checked = check_elf(elf, CheckOptions())  # `pvpatch check`: findings, never a crash
        sarif_log([ArtifactFindings("fuzz.elf", tuple(checked.findings), len(data))],
                  exit_code=0, arguments=[])
        for ops in ("none", "auto"):
            res = pvpatch.scan_file(elf, ops=ops)
        res = pvpatch.scan_file(elf, ops="catalog:linux-6.1-x86_64" if elf.arch.ptr_size == 8
                                else f"catalog:{FIX / 'catalogs' / 'fixtures-i386.toml'}")
        plan = pvpatch.make_plan(res, "native", drop_patched=elf.is_relocatable)
        rw = pvpatch.apply_plan(plan)
        _ = rw.data
        if spec is not None:
            rw = pvpatch.apply_plan(pvpatch.make_plan(res, str(spec)))
            _ = rw.data
        if verify:
            pvpatch.verify_rewrite(rw, trials=1, workers=1)
        return "ok"
    except pvpatch.PvpatchError as exc:
        return type(exc).__name__
    except RecursionError as exc:
        raise Unexpected(f"RecursionError: {exc}") from exc
    except Exception as exc:
        raise Unexpected(f"{type(exc).__name__}: {exc}") from exc


def bounded(data: bytes, limit_factor: int = 40, slack: int = 16 << 20,
            seconds: float = 10.0) -> tuple[str, int, float]:
    """`exercise` under tracemalloc: (outcome, peak bytes, seconds), checked against bounds."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        outcome = exercise(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    took = time.perf_counter() - start
    assert peak <= limit_factor * len(data) + slack, f"peak {peak} for {len(data)} bytes"
    assert took <= seconds, f"took {took:.1f} s"
    return outcome, peak, took


def load_seeds(paths: list[Path] | None = None) -> list[tuple[Path, bytes, list[Field],
                                                            list[int]]]:
    out = []
    for path in paths or SEEDS:
        data = path.read_bytes()
        out.append((path, data, fields_of(data), boundaries_of(data)))
    return out


def u32(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", data, at)[0])
