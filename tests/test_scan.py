"""`pvpatch scan` on the committed fixtures, checked against the readelf-based decoder,
and the scanner's findings on deliberately broken tables."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import independent
import pytest
from clirun import pvpatch_cli as run
from clirun import scan_records
from independent import compare_record
from paths import FIX, REPO

import pvpatch
from pvpatch.elf.reader import ElfFile

WITH_TABLE = [
    FIX / "x86_64" / n for n in ("kernel61.o", "seed.o", "legacy.o", "prog.o", "prog", "prog-pie",
                                 "prog-sse", "libprog.so")
] + [FIX / "i386" / n for n in ("kernel61.o", "seed.o", "prog.o", "prog", "prog-pie",
                                "libprog.so")]


def test_fixtures_match_independent_decoding() -> None:
    records = scan_records(WITH_TABLE)
    errors: list[str] = []
    total = 0
    for path in WITH_TABLE:
        ref = independent.decode(path)
        assert ref.sites, path
        total += len(ref.sites)
        errors += compare_record(path, records[path.resolve()], ref)
    assert not errors, "\n".join(errors[:20])
    assert total >= 80


def test_elf_types_and_addresses() -> None:
    records = scan_records(WITH_TABLE)
    kinds = {p.name + "/" + p.parent.name: records[p.resolve()]["elf_type"] for p in WITH_TABLE}
    assert kinds["prog/x86_64"] == "EXEC"
    assert kinds["prog-pie/x86_64"] == "DYN"
    assert kinds["prog-pie/i386"] == "DYN"
    assert kinds["kernel61.o/i386"] == "REL"
    for p in WITH_TABLE:
        rec = records[p.resolve()]
        for s in rec["sites"]:
            assert (s["address"] is None) == (rec["elf_type"] == "REL")


def test_legacy_short_last_entry() -> None:
    """Before 6.1 the last entry has no trailing padding: 16*n - 4 bytes."""
    elf = ElfFile.open(FIX / "x86_64" / "legacy.o")
    sec = elf.section(".parainstructions")
    assert sec is not None and sec.size % 16 == 12
    res = pvpatch.load(FIX / "x86_64" / "legacy.o")
    assert res.table is not None and res.table.count == (sec.size + 4) // 16
    assert len(res.sites) == res.table.count


def test_plain_object_has_no_table() -> None:
    proc = run("scan", "--json", str(FIX / "x86_64" / "plain.o"))
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)["files"][0]
    assert rec["table"] is None and rec["sites"] == []


def test_json_shape_exact() -> None:
    proc = run("scan", "--json", "--ops", "catalog:linux-6.1-x86_64",
               str(FIX / "x86_64" / "kernel61.o"))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"files"}
    rec = doc["files"][0]
    assert set(rec) == {"path", "arch", "elf_type", "table", "sites"}
    assert set(rec["table"]) == {"section", "family", "layout", "entry_size", "count"}
    assert rec["table"]["family"] == "paravirt"
    site = rec["sites"][0]
    assert set(site) == {"index", "section", "offset", "address", "type", "op", "len",
                         "clobbers", "clobber_regs", "bytes", "insns", "native", "entries",
                         "runtime"}
    # .parainstructions carries no native bytes: one entry per site
    assert site["native"] is None and site["entries"] == [site["index"]]
    ops = {s["type"]: s["op"] for s in rec["sites"]}
    assert ops[30] == "irq.save_fl" and ops[31] == "irq.irq_disable"
    assert ops[32] == "irq.irq_enable"
    by_type = {s["type"]: s for s in rec["sites"]}
    assert by_type[30]["clobber_regs"] == ["rax"]
    assert by_type[0]["clobber_regs"] == ["rax", "rcx", "rdx", "rdi", "rsi", "r8", "r9",
                                          "r10", "r11"]
    # objdump agrees on the instruction at the site
    assert by_type[30]["insns"][0].startswith("call")


def test_i386_clobber_regs() -> None:
    res = pvpatch.load(FIX / "i386" / "kernel61.o")
    masks = {s.clobbers: s.clobber_regs for s in res.sites}
    assert masks[0x5] == ("eax", "edx")
    assert masks[0xF] == ("eax", "ecx", "edx", "edi")


def test_text_output_lists_every_site() -> None:
    proc = run("scan", str(FIX / "x86_64" / "kernel61.o"))
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert "21 sites" in lines[0]
    assert sum(1 for ln in lines if ".text+0x" in ln or "text+0x" in ln) == 21


def test_scan_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys, pvpatch.cli as c\n"
        "c.main(['scan', '--json', 'fixtures/x86_64/kernel61.o'])\n"
        "print([m for m in ('unicorn', 'lief', 'keystone') if m in sys.modules], file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stderr.strip().splitlines()[-1] == "[]"
    proc = subprocess.run([sys.executable, "-c",
                           "import sys, pvpatch.cli\n"
                           "try:\n pvpatch.cli.main(['--help'])\nexcept SystemExit: pass\n"
                           "print(sorted(m for m in ('unicorn','capstone','elftools','lief') "
                           "if m in sys.modules), file=sys.stderr)"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.stderr.strip().splitlines()[-1] == "[]"


# -- findings on broken tables ------------------------------------------------


def _table_entry(data: bytearray, elf: ElfFile, index: int) -> int:
    sec = elf.section(".parainstructions")
    assert sec is not None
    return sec.offset + index * 16


def _copy_with(tmp_path: Path, src: Path, edit: object) -> Path:
    data = bytearray(src.read_bytes())
    elf = ElfFile(bytes(data), str(src))
    edit(data, elf)  # type: ignore[operator]
    out = tmp_path / src.name
    out.write_bytes(data)
    return out


def test_slot_mismatch_is_reported(tmp_path: Path) -> None:
    def edit(data: bytearray, elf: ElfFile) -> None:
        at = _table_entry(data, elf, 0)
        data[at + 8] = 99  # type byte no longer matches pv_ops+OFF of the call

    path = _copy_with(tmp_path, FIX / "x86_64" / "kernel61.o", edit)
    res = pvpatch.load(path)
    rules = [(f.rule, f.site_index) for f in res.findings]
    assert ("PV106", 0) in rules
    proc = run("scan", str(path))
    assert proc.returncode == 0
    assert "PV106" in proc.stderr and "slot-mismatch" in proc.stderr


def test_overlap_and_overrun_and_zero_length(tmp_path: Path) -> None:
    def edit(data: bytearray, elf: ElfFile) -> None:
        data[_table_entry(data, elf, 1) + 9] = 200  # site 1 runs far past its neighbour
        data[_table_entry(data, elf, 2) + 9] = 0  # zero-length site

    res = pvpatch.load(_copy_with(tmp_path, FIX / "x86_64" / "kernel61.o", edit))
    rules = {f.rule for f in res.findings}
    assert {"PV104", "PV109"} <= rules
    assert 2 not in {s.index for s in res.sites}
    assert res.table is not None
    # every other entry of the table is still decoded
    assert sorted(s.index for s in res.sites) == [i for i in range(res.table.count) if i != 2]


def test_site_past_section_end(tmp_path: Path) -> None:
    def edit(data: bytearray, elf: ElfFile) -> None:
        data[_table_entry(data, elf, 20) + 9] = 250

    res = pvpatch.load(_copy_with(tmp_path, FIX / "x86_64" / "kernel61.o", edit))
    assert any(f.rule == "PV103" and f.site_index == 20 for f in res.findings)


def test_entry_outside_exec_section(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "prog"

    def edit(data: bytearray, elf: ElfFile) -> None:
        sec = elf.section(".parainstructions")
        rodata = elf.section(".rodata")
        assert sec is not None and rodata is not None
        struct.pack_into("<Q", data, sec.offset, rodata.addr)

    res = pvpatch.load(_copy_with(tmp_path, src, edit))
    assert any(f.rule == "PV102" and f.site_index == 0 for f in res.findings)


def test_entries_into_a_section_no_segment_loads(tmp_path: Path) -> None:
    """A linked file whose text PT_LOAD was moved: .text is in no segment (readelf's
    section-to-segment map agrees), so every entry is PV102 and nothing is rewritten."""
    src = FIX / "x86_64" / "prog"

    def edit(data: bytearray, elf: ElfFile) -> None:
        text = elf.section(".text")
        assert text is not None
        seg = next(g for g in elf.segments if g.type == 1 and
                   g.vaddr <= text.addr < g.vaddr + g.memsz)
        at = elf.e_phoff + seg.index * elf.e_phentsize + 16  # Elf64_Phdr.p_vaddr
        struct.pack_into("<Q", data, at, seg.vaddr + 0x100000)

    path = _copy_with(tmp_path, src, edit)
    mapping = subprocess.run(["readelf", "-l", "-W", str(path)], capture_output=True,
                             text=True).stdout.split("Section to Segment mapping:", 1)[1]
    assert " .text " not in mapping + " "
    res = pvpatch.load(path, ops="catalog:linux-6.1-x86_64")
    assert res.table is not None and not res.sites
    bad = [f for f in res.findings if f.rule == "PV102"]
    assert len(bad) == res.table.count and "no PT_LOAD segment loads" in bad[0].message
    # the untouched program: every entry is in a loaded section
    assert not pvpatch.load(src, ops="catalog:linux-6.1-x86_64").findings


def test_duplicate_entries_warn(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "prog"

    def edit(data: bytearray, elf: ElfFile) -> None:
        at = _table_entry(data, elf, 0)
        data[at + 16 : at + 32] = data[at : at + 16]

    res = pvpatch.load(_copy_with(tmp_path, src, edit))
    dup = [f for f in res.findings if f.rule == "PV204"]
    assert dup and dup[0].severity == "warning"


def test_table_size_not_whole(tmp_path: Path) -> None:
    def edit(data: bytearray, elf: ElfFile) -> None:
        sec = elf.section(".parainstructions")
        assert sec is not None
        shdr = elf.e_shoff + sec.index * 64
        struct.pack_into("<Q", data, shdr + 32, sec.size - 8)  # sh_size: 16n - 8

    path = _copy_with(tmp_path, FIX / "x86_64" / "kernel61.o", edit)
    proc = run("scan", str(path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not a whole number" in proc.stderr


@pytest.mark.parametrize("layout", ["linux-2.6.29-x86_64"])
def test_layout_override_renames_bits(layout: str) -> None:
    res = pvpatch.load(FIX / "x86_64" / "kernel61.o", layout=layout)
    assert res.layout is not None and res.layout.name == layout
    regs = {s.clobbers: s.clobber_regs for s in res.sites}
    assert regs[0x1FF][3:5] == ("rsi", "rdi")  # 2.6.29 numbers rsi bit 3, rdi bit 4


def _sites_of(elf: ElfFile) -> list[tuple[object, ...]]:
    res = pvpatch.scan_file(elf, ops="catalog:linux-6.1-x86_64")
    return [(s.section, s.offset, s.type, s.len, s.clobbers, s.op, s.code) for s in res.sites]


def test_inputs_are_mapped_else_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A regular file is mapped; a pipe, or a filesystem that cannot map, is read; the
    scan is the same either way."""
    import mmap
    import os
    import threading

    src = FIX / "x86_64" / "kernel61.o"
    mapped = ElfFile.open(src)
    assert isinstance(mapped.data, mmap.mmap) and mapped.identity is not None
    expected = _sites_of(mapped)
    assert expected and _sites_of(ElfFile(src.read_bytes(), str(src))) == expected

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(src.read_bytes()))
    writer.start()
    piped = ElfFile.open(fifo)
    writer.join()
    assert isinstance(piped.data, bytes) and piped.identity is None
    assert _sites_of(piped) == expected

    def cannot_map(*_args: object, **_kwargs: object) -> mmap.mmap:
        raise OSError(19, "No such device")

    monkeypatch.setattr(mmap, "mmap", cannot_map)
    read = ElfFile.open(src)
    assert isinstance(read.data, bytes) and _sites_of(read) == expected
