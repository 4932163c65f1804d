"""`pvpatch diff`: every fixture pvpatch patches diffs clean, each site's before and after
read as objdump reads the two files, anything changed outside a site flagged; the real
corpus; the three formats; the HTML page in a real browser (headless Chromium)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import corpus
import pytest
from clirun import pvpatch_cli as cli
from paths import FIX, REPO

import pvpatch
from pvpatch import api
from pvpatch.report.diff import DiffReport, FileDiff, SiteDiff, diff_files, diff_json, diff_text

OPS = {"x86_64": "catalog:linux-6.1-x86_64",
       "i386": f"catalog:{FIX / 'catalogs' / 'fixtures-i386.toml'}"}
CAT612 = {"x86_64": "catalog:linux-6.12-x86_64", "i386": "catalog:linux-6.12-i386"}
CAT68 = {a: f"catalog:{FIX / 'catalogs' / f'prog68-{a}.toml'}" for a in ("x86_64", "i386")}
SPEC = str(FIX / "specs" / "prog.toml")
RETHUNK = str(FIX / "specs" / "rethunk.toml")

# (arch, file, backend, ops, --drop-patched): every kind of patch pvpatch makes.
CASES = [
    ("x86_64", "kernel61.o", "native", OPS["x86_64"], False),
    ("x86_64", "kernel61.o", "native", OPS["x86_64"], True),
    ("i386", "kernel61.o", "native", OPS["i386"], False),
    ("i386", "kernel61.o", "native", OPS["i386"], True),
    ("x86_64", "kernel612.o", "native", CAT612["x86_64"], False),
    ("x86_64", "kernel612.o", "native", CAT612["x86_64"], True),
    ("i386", "kernel612.o", "native", CAT612["i386"], False),
    ("x86_64", "seed.o", "native", OPS["x86_64"], False),
    ("i386", "seed.o", "native", OPS["i386"], False),
    ("x86_64", "seed.o", "native", CAT68["x86_64"], True),
    ("x86_64", "prog.o", SPEC, "none", False),  # thunks, their symbols and relocations
    ("i386", "prog.o", SPEC, "none", True),
    *((a, n, SPEC, "none", False) for a in ("x86_64", "i386")
      for n in ("prog", "prog-pie", "libprog.so")),  # thunks in a new PT_LOAD
    *((a, n, "native", CAT68[a], False) for a in ("x86_64", "i386")
      for n in ("prog", "prog-pie", "libprog.so")),
    *((a, "prog68", SPEC, CAT68[a], False) for a in ("x86_64", "i386")),
    ("x86_64", "rethunk-sls.o", RETHUNK, OPS["x86_64"], False),  # .return_sites entries
    ("x86_64", "prog-rethunk", SPEC, "none", False),  # jmp to the return thunk, linked
]


def patch_fixture(tmp_path: Path, arch: str, name: str, backend: str, ops: str,
                  drop: bool) -> tuple[Path, pvpatch.Rewrite]:
    """The fixture as `pvpatch patch` writes it (the same library calls)."""
    src = FIX / arch / name
    rw = api.apply_plan(api.make_plan(api.load(src, ops=ops), backend, drop_patched=drop))
    out = tmp_path / f"{arch}-{name}.patched"
    api.write_output(rw, out)
    return out, rw


# -- objdump, the independent reading ----------------------------------------------------


@dataclass
class OdInsn:
    addr: int
    text: str  # mnemonic and operands, without objdump's `# ...` comment
    comment: str  # what follows `#`: `404138 <pv_ops+0xf8>`
    relocs: list[tuple[int, str, str]] = field(default_factory=list)  # (place, type, target)

    @property
    def mnemonic(self) -> str:
        return self.text.split()[0] if self.text else ""

    @property
    def operands(self) -> str:
        parts = self.text.split(None, 1)
        return parts[1] if len(parts) > 1 else ""


_OD_LINE = re.compile(r"^\s*([0-9a-f]+):\t([^\t]*)((?:\t[^\t]*)*)$")
_OD_RELOC = re.compile(r"([0-9a-f]+): (R_\w+)\t(\S*)")


def objdump(path: Path) -> dict[str, list[OdInsn]]:
    """`objdump -d -r -w`: each executable section's instructions with their relocations."""
    out = subprocess.run(["objdump", "-d", "-r", "-w", "--no-show-raw-insn", str(path)],
                         capture_output=True, text=True, check=True).stdout
    sections: dict[str, list[OdInsn]] = {}
    current: list[OdInsn] = []
    for line in out.splitlines():
        if line.startswith("Disassembly of section "):
            current = sections.setdefault(line.split()[-1].rstrip(":"), [])
            continue
        m = _OD_LINE.match(line)
        if m is None:
            continue
        text, _, comment = m[2].partition("#")
        insn = OdInsn(int(m[1], 16), " ".join(text.split()), comment.strip())
        insn.relocs = [(int(r[0], 16), r[1], r[2]) for r in _OD_RELOC.findall(m[3])]
        current.append(insn)
    return sections


def nm(path: Path) -> dict[str, int]:
    out = subprocess.run(["nm", "--defined-only", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return {p[2]: int(p[0], 16) for p in (ln.split() for ln in out.splitlines()) if len(p) == 3}


def dynamic_relocs(path: Path) -> dict[int, tuple[str, str]]:
    """`objdump -R`: address -> (type, symbol) of load-time relocations."""
    proc = subprocess.run(["objdump", "-R", str(path)], capture_output=True, text=True)
    out: dict[int, tuple[str, str]] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith("R_") and re.fullmatch("[0-9a-f]+", parts[0]):
            out[int(parts[0], 16)] = (parts[1], parts[2].split("@")[0] if len(parts) > 2 else "")
    return out


_BASES = {"call", "jmp", "ret", "push", "pop", "pushf", "popf", "mov", "lea", "add", "sub",
          "xor", "and", "or", "cmp", "test"}


def canon(mnemonic: str, operands: str) -> str:
    """Mnemonics as both tools may spell them: NOP forms are all `nop`, size suffixes go."""
    if mnemonic.startswith("nop") or mnemonic in ("data16", "cs") or (
            mnemonic == "xchg" and operands.replace(" ", "") == "%ax,%ax"):
        return "nop"
    if mnemonic[-1:] in ("b", "w", "l", "q") and mnemonic[:-1] in _BASES:
        return mnemonic[:-1]
    return mnemonic


_NAME = re.compile(r"(?<![%\w.$])([A-Za-z_.][\w.$@]*)(?:([+-])0x([0-9a-f]+))?")


def names(text: str) -> list[tuple[str, int]]:
    """Symbol names (with offsets) in one of our instruction texts' operands."""
    operands = text.split(None, 1)[1] if " " in text else ""
    operands = operands.split("  #")[0]
    out = []
    for m in _NAME.finditer(operands):
        off = int(m[3], 16) if m[3] else 0
        out.append((m[1], -off if m[2] == "-" else off))
    return out


def _split(target: str) -> tuple[str, int]:
    m = re.fullmatch(r"(.*?)(?:([+-])0x([0-9a-f]+))?", target)
    assert m is not None
    off = int(m[3], 16) if m[3] else 0
    return m[1], -off if m[2] == "-" else off


def _number(operands: str) -> int:
    m = re.search(r"\*?(?:%\w+:)?(-?0x[0-9a-f]+)", operands)
    return int(m[1], 16) if m else 0


@dataclass
class Reading:
    """What objdump, nm and objdump -R say about one file."""

    path: Path
    insns: dict[str, list[OdInsn]]
    symbols: dict[str, int]
    dynamic: dict[int, tuple[str, str]]
    relocatable: bool

    @classmethod
    def of(cls, path: Path, relocatable: bool) -> Reading:
        return cls(path, objdump(path), nm(path), dynamic_relocs(path), relocatable)

    def between(self, section: str, start: int, end: int) -> list[OdInsn]:
        return [i for i in self.insns.get(section, []) if start <= i.addr < end]


def check_against_objdump(ours: list[str], reading: Reading, section: str, start: int,
                          length: int, thunks: dict[str, int], where: str) -> None:
    """Our instructions for `length` bytes at `start` (section offset, or address in a linked
    file) are objdump's: the same count, mnemonics, and every name we give an operand is
    the one objdump's relocation, its `<sym+off>` or the symbol table says."""
    od = reading.between(section, start, start + length)
    assert len(od) == len(ours), (where, ours, [i.text for i in od])
    ends = [i.addr for i in od[1:]] + [start + length]
    for text, insn, end in zip(ours, od, ends, strict=True):
        mine = text.split()[0]
        assert canon(mine, text) == canon(insn.mnemonic, insn.operands), (where, text, insn)
        for name, off in names(text):
            why = (where, text, insn.text, insn.comment, insn.relocs)
            if reading.relocatable:
                assert insn.relocs, why
                place, rtype, target = insn.relocs[0]
                sym, addend = _split(target)
                assert sym == name, why
                if rtype in ("R_X86_64_PC32", "R_X86_64_PLT32"):
                    assert off == addend + (end - place), why  # S + A + (end - P)
                elif rtype in ("R_386_PC32", "R_386_PLT32"):
                    assert off == 0, why  # a call to the symbol: -4 in the bytes
                elif rtype == "R_386_32":
                    assert off == _number(insn.operands), why  # REL: the addend is in the bytes
                else:
                    assert off == addend, why
            elif name in thunks:
                # objdump has no symbol for a thunk placed in a linked file: its address.
                assert int(insn.operands.split()[0], 16) == thunks[name] + off, why
            elif "<" in insn.comment or "<" in insn.operands:
                said = re.search(r"<([^>]*)>", insn.comment or insn.operands)
                assert said is not None and said[1] == (name if not off else
                                                        f"{name}{off:+#x}".replace("+-", "-")), why
            else:
                dyn = [v for a, v in reading.dynamic.items() if insn.addr <= a < end
                       and not v[0].endswith("RELATIVE")]
                if dyn:  # filled at load time: S + A, A in the bytes
                    assert dyn[0][1] == name and off == _number(insn.operands), why
                else:  # an absolute operand: the symbol table's address
                    assert reading.symbols[name] + off == _number(insn.operands), why


def _texts(insns: Any) -> list[str]:
    return [i.text for i in insns]


# -- every fixture ----------------------------------------------------------------------


@pytest.mark.parametrize("arch,name,backend,ops,drop", CASES)
def test_every_fixture_diffs_clean_and_reads_as_objdump(tmp_path: Path, arch: str,
                                                        name: str, backend: str, ops: str,
                                                        drop: bool) -> None:
    src = FIX / arch / name
    out, rw = patch_fixture(tmp_path, arch, name, backend, ops, drop)
    report = diff_files(src, out, backend=backend, ops=ops)
    f = report.files[0]
    text = "\n".join(diff_text(report))
    assert report.ok and f.ok and not f.flagged, text
    # The sites listed are the sites the patch rewrote, as the patch made them.
    rewritten = [p for p in rw.patches if p.decision.rewrites and not p.already]
    assert [s.index for s in f.sites] == [p.decision.site.index for p in rewritten], text
    for s, p in zip(f.sites, rewritten, strict=True):
        assert (s.before, s.after, s.planned) == (p.before, p.after, p.decision.action)
        assert s.action == p.decision.action or (p.decision.action, s.action) == (
            "inline", "nop"), s
    assert [t.symbol for t in f.thunks] == [t.spec.symbol for t in rw.thunks]
    assert len(f.table_edits) == rw.dropped_entries + rw.neutralised_entries
    assert {e.edit for e in f.table_edits} <= {"dropped" if drop else "neutralised"}
    relocatable = rw.plan.scan.elf.is_relocatable
    before, after = Reading.of(src, relocatable), Reading.of(out, relocatable)
    thunks = {t.symbol: t.address for t in f.thunks if t.address is not None}
    for s in f.sites:
        start = s.offset if relocatable else s.address
        assert start is not None
        check_against_objdump(_texts(s.before_insns), before, s.section, start, s.len, {},
                              f"{name} site {s.index} before")
        check_against_objdump(_texts(s.after_insns), after, s.section, start, s.len, thunks,
                              f"{name} site {s.index} after")
    for t in f.thunks:
        start = t.offset if relocatable else t.address
        assert start is not None and t.flags == ()
        check_against_objdump(_texts(t.insns), after, t.section, start, t.size, thunks,
                              f"{name} thunk {t.symbol}")
    # What the patch added: the thunk section, its symbols (relocatable) or its segment.
    if rw.thunks:
        assert [s.name for s in f.sections_added][:1] == [rw.thunks[0].section]
        if relocatable:
            assert {s.name for s in f.symbols_added} >= {t.spec.symbol for t in rw.thunks}
            assert any(r.how == "added" and r.section == rw.thunks[0].section
                       for r in f.relocations)
        else:
            assert [(g.type, g.flags) for g in f.segments_added] == [("LOAD", "RE")]


def test_cli_exit_status_formats_and_json_shape(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "kernel612.o"
    out, rw = patch_fixture(tmp_path, "x86_64", "kernel612.o", "native", CAT612["x86_64"],
                            False)
    page = tmp_path / "k.html"
    proc = cli("diff", str(src), str(out), "--ops", CAT612["x86_64"], "--json", "--html",
               str(page))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"original", "patched", "tree", "files", "unpaired", "errors",
                        "summary"}
    (f,) = doc["files"]
    assert {"original", "patched", "path", "arch", "elf_type", "table", "ops", "backend",
            "sites", "thunks", "table_edits", "sections_added", "sections_changed",
            "symbols_added", "symbols_removed", "relocations", "segments_added", "signature",
            "flagged", "omitted", "counts", "verified", "total_sites", "ok"} == set(f)
    site = f["sites"][0]
    assert {"index", "section", "offset", "address", "file_offset", "op", "type", "len",
            "entries", "action", "target", "plan", "before", "after", "before_insns",
            "after_insns", "relocations_before", "relocations_after", "verdict",
            "flags"} == set(site)
    assert site["before_insns"][0].startswith("call *pv_ops+0x")  # symbolised
    assert site["relocations_before"][0].startswith("+0x2 R_X86_64_PC32 pv_ops+0x")
    # 6.12's table: every entry at a rewritten site neutralised to NOT(ALWAYS)
    assert len(f["table_edits"]) == rw.neutralised_entries > 0
    assert {e["now"] for e in f["table_edits"]} == {"NOT(ALWAYS)"}
    assert {e["was"] for e in f["table_edits"]} >= {"DIRECT_CALL", "NOT(XENPV)"}
    assert doc["summary"]["ok"] is True and doc["summary"]["flagged"] == 0
    assert doc["summary"]["actions"]["inline"] == len(f["sites"])
    # The text report says the same, and the page was written.
    proc = cli("diff", str(src), str(out), "--ops", CAT612["x86_64"])
    assert proc.returncode == 0 and "every difference accounted for" in proc.stdout
    assert "call *pv_ops+0xf0(%rip)" in proc.stdout and "NOT(ALWAYS)" in proc.stdout
    html = page.read_text()
    assert "<script" not in html and "http" not in html.split("</head>")[1]
    assert all(s["section"] + f"+{s['offset']:#x}" in html for s in f["sites"])


# -- what is flagged ----------------------------------------------------------------------


def _section_range(path: Path, section: str) -> tuple[int, int]:
    """The file offset and size of `section`, read with readelf (not with pvpatch)."""
    out = subprocess.run(["readelf", "-S", "-W", str(path)], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)",
                     line)
        if m and m[1] == section:
            return int(m[2], 16), int(m[3], 16)
    raise AssertionError(f"no {section} in {path}")


def _section_offset(path: Path, section: str) -> int:
    return _section_range(path, section)[0]


@pytest.mark.parametrize("arch,name,section,ops", [
    ("x86_64", "kernel61.o", ".text", OPS["x86_64"]),
    ("i386", "prog", ".rodata", OPS["i386"]),
    ("x86_64", "kernel612.o", ".text", CAT612["x86_64"]),
])
def test_a_byte_changed_outside_every_site_is_flagged(tmp_path: Path, arch: str, name: str,
                                                      section: str, ops: str) -> None:
    src = FIX / arch / name
    out, rw = patch_fixture(tmp_path, arch, name, "native", ops, False)
    sites = [(p.decision.site.offset, p.decision.site.end) for p in rw.patches
             if p.decision.site.section == section]
    base = _section_offset(out, section)
    data = bytearray(out.read_bytes())
    off = next(o for o in range(0x10, 0x400) if data[base + o]
               and not any(lo <= o < hi for lo, hi in sites))
    data[base + off] ^= 0x40
    out.write_bytes(bytes(data))
    proc = cli("diff", str(src), str(out), "--ops", ops)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FLAGGED {section}+{off:#x}, file offset {base + off:#x}" in proc.stdout
    doc = json.loads(cli("diff", str(src), str(out), "--ops", ops, "--json").stdout)
    flagged = doc["files"][0]["flagged"]
    assert [(d["section"], d["offset"], d["file_offset"]) for d in flagged] == \
        [(section, off, base + off)]
    assert doc["summary"]["ok"] is False
    # The sites are still all shown, and none of them is blamed.
    assert all(not s["flags"] for s in doc["files"][0]["sites"])


def test_a_site_not_as_the_plan_writes_it_is_flagged(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "kernel61.o"
    out, rw = patch_fixture(tmp_path, "x86_64", "kernel61.o", "native", OPS["x86_64"], False)
    cli_site = next(p.decision.site for p in rw.patches
                    if p.decision.site.op == "irq.irq_disable")
    base = _section_offset(out, cli_site.section)
    data = bytearray(out.read_bytes())
    assert data[base + cli_site.offset] == 0xFA
    data[base + cli_site.offset] = 0xFB  # sti where cli belongs
    out.write_bytes(bytes(data))
    doc = json.loads(cli("diff", str(src), str(out), "--ops", OPS["x86_64"], "--json").stdout)
    bad = [s for s in doc["files"][0]["sites"] if s["flags"]]
    assert [s["index"] for s in bad] == [cli_site.index]
    assert bad[0]["after_insns"][0] == "sti" and "fa0f1f440000" in bad[0]["flags"][0]
    # The patched file is right, but the plan re-made with other options keeps the
    # sites: nothing explains their change.
    (tmp_path / "good").mkdir()
    good, _ = patch_fixture(tmp_path / "good", "x86_64", "kernel61.o", "native",
                            OPS["x86_64"], False)
    proc = cli("diff", str(src), str(good), "--ops", "none")
    assert proc.returncode == 1
    assert "the plan keeps this site" in proc.stdout


def test_verify_report_verdicts(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "prog.o"
    out = tmp_path / "prog.o"
    proc = cli("patch", str(src), "-o", str(out), "--backend", SPEC, "--ops", "none",
               "--json")
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "patch.json").write_text(proc.stdout)
    proc = cli("verify", str(src), str(out), "--backend", SPEC, "--ops", "none", "--json")
    (tmp_path / "verify.json").write_text(proc.stdout)
    for report in ("patch.json", "verify.json"):
        proc = cli("diff", str(src), str(out), "--backend", SPEC, "--ops", "none", "--json",
                   "--verify-json", str(tmp_path / report))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        f = json.loads(proc.stdout)["files"][0]
        assert f["verified"] and len(f["sites"]) == 6 and len(f["thunks"]) == 4
        assert {s["verdict"]["status"] for s in [*f["sites"], *f["thunks"]]} == {"pass"}
    # A report that says a site failed: that site is flagged.
    doc = json.loads((tmp_path / "verify.json").read_text())
    doc["sites"][2]["status"], doc["sites"][2]["reason"] = "fail", "rax differs"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    proc = cli("diff", str(src), str(out), "--backend", SPEC, "--ops", "none",
               "--verify-json", str(tmp_path / "bad.json"))
    assert proc.returncode == 1 and "verify: fail: rax differs" in proc.stdout
    (tmp_path / "junk.json").write_text("{not json")
    proc = cli("diff", str(src), str(out), "--verify-json", str(tmp_path / "junk.json"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "junk.json" in proc.stderr


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "kernel61.o"
    for args in ([str(src), str(tmp_path / "missing.o")],
                 [str(src), str(FIX / "x86_64")],
                 [str(src), str(FIX / "x86_64" / "notelf.txt")],
                 [str(src), str(FIX / "i386" / "kernel61.o")]):
        proc = cli("diff", *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(
            "pvpatch: error: "), proc.stderr


def _tree(tmp_path: Path, names: list[str]) -> Path:
    root = tmp_path / "orig"
    for n in names:
        dst = root / "sub" / n if n.startswith("prog") else root / n
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIX / "x86_64" / n, dst)
    (root / "README").write_text("not ELF")
    return root


def test_trees_pair_files_by_relative_path(tmp_path: Path) -> None:
    root = _tree(tmp_path, ["kernel61.o", "seed.o", "prog", "prog-pie", "plain.o"])
    out = tmp_path / "out"
    proc = cli("patch", str(root), "-o", str(out), "--ops", OPS["x86_64"], "--no-verify")
    assert proc.returncode == 0, proc.stderr
    proc = cli("diff", str(root), str(out), "--ops", OPS["x86_64"], "--json", "-j", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    paths = [f["path"] for f in doc["files"]]
    assert paths == sorted(paths) and set(paths) == {
        "kernel61.o", "seed.o", "plain.o", os.path.join("sub", "prog"),
        os.path.join("sub", "prog-pie")}
    plain = next(f for f in doc["files"] if f["path"] == "plain.o")
    assert plain["sites"] == [] and plain["ok"]
    assert doc["summary"]["skipped"] == 1 and doc["summary"]["changed_files"] == 4
    # A file missing from PATCHEDDIR is flagged; a broken one is an error (exit 2).
    (out / "seed.o").unlink()
    proc = cli("diff", str(root), str(out), "--ops", OPS["x86_64"])
    assert proc.returncode == 1 and "no counterpart in PATCHED" in proc.stdout
    (out / "seed.o").write_bytes(b"\x7fELF" + bytes(10))
    proc = cli("diff", str(root), str(out), "--ops", OPS["x86_64"])
    assert proc.returncode == 2 and "seed.o" in proc.stderr
    assert "pvpatch diff: 4 ELF file pairs" in proc.stdout  # the others still compared


# -- scan and patch reports symbolise the same way -----------------------------------------


@pytest.mark.parametrize("arch,name", [("x86_64", "kernel61.o"), ("i386", "kernel61.o"),
                                       ("x86_64", "seed.o"), ("x86_64", "prog"),
                                       ("i386", "prog"), ("i386", "libprog.so")])
def test_scan_insns_are_symbolised_as_objdump_reads_them(arch: str, name: str) -> None:
    path = FIX / arch / name
    proc = cli("scan", str(path), "--ops", OPS[arch], "--json")
    assert proc.returncode == 0, proc.stderr
    sites = json.loads(proc.stdout)["files"][0]["sites"]
    relocatable = name.endswith(".o")
    reading = Reading.of(path, relocatable)
    for s in sites:
        assert "pv_ops" in s["insns"][0], s
        start = s["offset"] if relocatable else s["address"]
        check_against_objdump(s["insns"], reading, s["section"], start, s["len"], {},
                              f"{name} site {s['index']}")
    text = cli("scan", str(path), "--ops", OPS[arch]).stdout
    assert all(s["insns"][0] in text for s in sites)


def test_patch_reports_name_what_sites_become(tmp_path: Path) -> None:
    proc = cli("patch", str(FIX / "x86_64" / "prog"), "-o", str(tmp_path / "p"), "--backend",
               SPEC, "--ops", "none", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    # Each (action, op) row says what its sites become, the call's target named.
    assert re.search(r"^  call +1 +type 44 -> call prog_read_cr3$", proc.stdout, re.M), \
        proc.stdout
    assert re.search(r"^  thunk +1 +type 30 -> call __raw_callee_save_prog_save_fl$",
                     proc.stdout, re.M), proc.stdout
    text = cli("patch", str(FIX / "x86_64" / "kernel61.o"), "-o", str(tmp_path / "k"),
               "--ops", OPS["x86_64"], "--dry-run").stdout
    assert re.search(r"inline +3 +irq.irq_disable -> cli$", text, re.M), text
    assert re.search(r"inline +2 +irq.save_fl -> pushf; pop %rax$", text, re.M), text
    # Kept sites show the call they keep, named from its relocation (objdump: pv_ops-0x4),
    # one line per (op, reason, call) with where they are.
    assert "  kept       2  cpu.io_delay: no native form and no target " \
        "[call *pv_ops(%rip)] at .text+0x110, .init.text+0xc\n" in text, text
    assert not (tmp_path / "p").exists() and not (tmp_path / "k").exists()


# -- the corpus -------------------------------------------------------------------------


def _patch_json(args: list[str]) -> dict[str, Any]:
    proc = cli("patch", *args, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


@pytest.mark.corpus
@pytest.mark.parametrize("kind", ["x86_64", "x86_64-6.12"])
def test_corpus_vmlinux_native(tmp_path: Path, kind: str) -> None:
    vmlinux = corpus.x86_64_vmlinux() if kind == "x86_64" else corpus.x86_64_612_vmlinux()
    assert vmlinux is not None
    out = tmp_path / "vmlinux"
    patched = _patch_json([str(vmlinux), "-o", str(out), "--no-verify"])
    page = tmp_path / "vmlinux.html"
    proc = cli("diff", str(vmlinux), str(out), "--json", "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    f = json.loads(proc.stdout)["files"][0]
    inline = patched["counts"]["inline"]
    assert f["ok"] and not f["flagged"] and len(f["sites"]) == inline > 1000
    assert f["counts"]["inline"] == inline
    if kind == "x86_64-6.12":
        want = corpus.expected("x86_64-6.12", "VMLINUX_NATIVE_SITES")
        if want is not None:
            assert inline == want
        assert len(f["table_edits"]) == patched["neutralised_entries"] > 0
    # Independently: the sites listed are exactly those whose bytes differ (cmp), and a
    # few read as objdump reads them at their addresses.
    differing = subprocess.run(["cmp", "-l", str(vmlinux), str(out)], capture_output=True,
                               text=True).stdout.split("\n")
    offsets = {int(line.split()[0]) - 1 for line in differing if line.strip()}
    spans = [(s["file_offset"], s["file_offset"] + s["len"]) for s in f["sites"]]
    outside = {o for o in offsets if not any(lo <= o < hi for lo, hi in spans)}
    if kind == "x86_64-6.12":  # and the feature words of the neutralised entries
        start, size = _section_range(vmlinux, ".altinstructions")
        assert outside and all(start <= o < start + size for o in outside)
    else:
        assert not outside
    assert all(any(lo <= o < hi for o in offsets) for lo, hi in spans)
    for s in f["sites"][:: max(1, len(f["sites"]) // 5)]:
        for path, insns in ((vmlinux, s["before_insns"]), (out, s["after_insns"])):
            od = subprocess.run(
                ["objdump", "-d", "-w", "--no-show-raw-insn",
                 f"--start-address={s['address']:#x}",
                 f"--stop-address={s['address'] + s['len']:#x}", str(path)],
                capture_output=True, text=True, check=True).stdout
            lines = [m for m in (_OD_LINE.match(ln) for ln in od.splitlines()) if m]
            assert [canon(*(" ".join(m[2].split("#")[0].split()) + " ").split(" ", 1))
                    for m in lines] == [canon(*(t + " ").split(" ", 1)) for t in insns], (
                s, od)
    assert "pv_ops+0x" in f["sites"][0]["before_insns"][0]  # named from the export table
    assert page.stat().st_size > 100_000
    text = cli("diff", str(vmlinux), str(out)).stdout
    assert text.rstrip().endswith("every difference accounted for")


def _module_tree(tmp_path: Path, modules: list[Path], root: Path) -> Path:
    tree = tmp_path / "orig"
    for m in modules:
        dst = tree / m.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(m, dst)
    return tree


@pytest.mark.corpus
def test_corpus_612_modules_compressed(tmp_path: Path) -> None:
    mods = [m for m in corpus.x86_64_612_modules()
            if any(s.native for s in api.load(m).sites)][:3]
    assert len(mods) == 3
    tree = _module_tree(tmp_path, mods, corpus.corpus_root() / "x86_64-6.12")
    out = tmp_path / "out"
    patched = _patch_json([str(tree), "-o", str(out), "--no-verify"])
    assert all(p.name.endswith(".ko.xz") for p in out.rglob("*.ko*"))
    proc = cli("diff", str(tree), str(out), "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    doc = json.loads(proc.stdout)
    by_file = {f["original"]: f for f in doc["files"]}
    for rec in patched["files"]:
        f = by_file[rec["input"]]
        rewritten = [s["index"] for s in rec["sites"] if s["action"] != "keep"]
        assert [s["index"] for s in f["sites"]] == rewritten
        assert len(f["table_edits"]) == rec["neutralised_entries"]
        assert f["signature"] is not None  # Debian's modules are signed: now they are not
    assert doc["summary"]["sites"] > 0


@pytest.mark.corpus
def test_corpus_61_modules_with_verdicts(tmp_path: Path) -> None:
    mods = corpus.x86_64_pv_modules()[:3]
    tree = _module_tree(tmp_path, mods, corpus.corpus_root() / "x86_64")
    out = tmp_path / "out"
    patched = _patch_json([str(tree), "-o", str(out)])
    (tmp_path / "patch.json").write_text(json.dumps(patched))
    page = tmp_path / "mods.html"
    proc = cli("diff", str(tree), str(out), "--json", "--verify-json",
               str(tmp_path / "patch.json"), "--html", str(page))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    doc = json.loads(proc.stdout)
    assert all(f["verified"] for f in doc["files"])
    statuses = {s["verdict"]["status"] for f in doc["files"] for s in f["sites"]}
    assert statuses == {"pass"}
    assert doc["summary"]["sites"] == sum(
        1 for r in patched["files"] for s in r["sites"] if s["action"] != "keep")
    text = cli("diff", str(tree), str(out)).stdout
    assert "every difference accounted for" in text.splitlines()[-1]
    assert all(m.name in page.read_text() for m in mods)


# -- the page in a browser --------------------------------------------------------------


class _WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: text frames, masked out."""

    def __init__(self, url: str) -> None:
        m = re.fullmatch(r"ws://([^:/]+):(\d+)(/.*)", url)
        assert m is not None, url
        self.sock = socket.create_connection((m[1], int(m[2])), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {m[3]} HTTP/1.1\r\nHost: {m[1]}:{m[2]}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "DevTools closed the connection during the handshake"
            head += chunk
        assert head.split(b"\r\n")[0].split()[1] == b"101", head
        self.buf = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            assert chunk, "DevTools closed the connection"
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        mask = os.urandom(4)
        n = len(data)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else
                                bytes([0x80 | 126]) + struct.pack(">H", n) if n < 1 << 16
                                else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[k % 4] for k, b in enumerate(data)))

    def recv(self) -> dict[str, Any]:
        payload = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", self._read(8))
            mask = self._read(4) if b1 & 0x80 else b""
            data = self._read(n)
            if mask:
                data = bytes(b ^ mask[k % 4] for k, b in enumerate(data))
            if b0 & 0x0F == 0x8:
                raise AssertionError("DevTools closed the connection")
            if b0 & 0x0F in (0x1, 0x0):
                payload += data
                if b0 & 0x80:
                    obj: dict[str, Any] = json.loads(payload)
                    return obj


class _Browser:
    """Headless Chromium driven over the DevTools protocol: one page, its console."""

    def __init__(self, profile: Path) -> None:
        args = ["chromium", "--headless", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--no-default-browser-check",
                f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to sandbox as root
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        url = None
        deadline = time.monotonic() + 60
        self.log: list[str] = []
        while url is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            url = m[1] if m else None
        assert url is not None, "chromium did not start:\n" + "".join(self.log[-20:])
        self.ws = _WebSocket(url)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(msg)
        while True:
            reply = self.ws.recv()
            if reply.get("id") == self.next_id:
                assert "error" not in reply, (method, reply)
                result: dict[str, Any] = reply["result"]
                return result
            self.events.append(reply)

    def load(self, url: str) -> list[str]:
        """Navigate and wait for the load event; the console errors the page caused."""
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + 30
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            assert time.monotonic() < deadline, "the page never finished loading"
            self.events.append(self.ws.recv())
        self.call("Runtime.evaluate", session=True, expression="1")  # flush late messages
        errors = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                errors.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in (
                    "error", "assert", "warning"):
                errors.append(f"console.{p['type']}: {p.get('args')}")
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] in (
                    "error", "warning"):
                errors.append(f"{p['entry']['source']}: {p['entry']['text']}")
        return errors

    def text(self) -> str:
        result = self.call("Runtime.evaluate", session=True,
                           expression="document.body.innerText", returnByValue=True)
        return str(result["result"]["value"])

    def screenshot(self, path: Path, width: int = 1400, max_height: int = 5000) -> None:
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width,
                  height=900, deviceScaleFactor=1, mobile=False)
        size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": width, "height": min(size["height"], max_height),
                "scale": 1}
        shot = self.call("Page.captureScreenshot", session=True, format="png", clip=clip,
                         captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            self.ws.send({"id": 0, "method": "Browser.close"})
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[_Browser]:
    b = _Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def test_html_page_renders_in_chromium(tmp_path: Path, browser: _Browser) -> None:
    root = _tree(tmp_path, ["kernel61.o", "seed.o", "prog", "libprog.so"])
    out = tmp_path / "out"
    proc = cli("patch", str(root), "-o", str(out), "--ops", OPS["x86_64"], "--json")
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "patch.json").write_text(proc.stdout)
    # One byte planted outside every site: the page must say so first, in red.
    rodata = _section_offset(out / "sub" / "prog", ".rodata")
    data = bytearray((out / "sub" / "prog").read_bytes())
    data[rodata + 4] ^= 0x01
    (out / "sub" / "prog").write_bytes(bytes(data))
    page = tmp_path / "diff.html"
    proc = cli("diff", str(root), str(out), "--ops", OPS["x86_64"], "--html", str(page),
               "--verify-json", str(tmp_path / "patch.json"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = diff_files(root, out, ops=OPS["x86_64"], verify=json.loads(
        (tmp_path / "patch.json").read_text()))
    html = page.read_text()
    assert "<script" not in html and "src=" not in html and "url(" not in html

    # The detector is not blind: a page with a script error and a missing image trips it.
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><p>control</p><img src="missing.png">'
                       "<script>no_such_function()</script>")
    assert len(browser.load(control.as_uri())) >= 2

    errors = browser.load(page.as_uri())
    shot = tmp_path / "diff.png"
    browser.screenshot(shot)
    where = f"(page {page}, screenshot {shot})"
    assert not errors, f"console errors {where}: {errors}"
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", where
    text = browser.text()
    assert "Flagged" in text and ".rodata+0x4" in text, where
    assert "Summary" in text and "By op" in text and "Files" in text, where
    for f in report.files:
        assert (f.rel or f.original) in text, (f.rel, where)
        for s in f.sites:
            assert s.where in text, (s.where, where)
            assert s.before_insns[0].text in text and s.after_insns[0].text in text, (s, where)
            assert s.verdict is not None and s.verdict.status == "pass"
    assert text.count("pass") >= sum(len(f.sites) for f in report.files), where


def test_help_stays_light_and_diff_never_emulates() -> None:
    """`pvpatch --help` and `pvpatch diff --help` load no disassembler or emulator; a diff
    disassembles but runs nothing (proof is verify's job)."""
    import sys

    probe = ("import sys, contextlib, io\nfrom pvpatch.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    try:\n        main(sys.argv[1:])\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('capstone', 'unicorn') if m in sys.modules))")
    for args, want in ((["--help"], "[]"), (["diff", "--help"], "[]"),
                       (["diff", str(FIX / "x86_64" / "seed.o"), str(FIX / "x86_64" / "seed.o"),
                         "--ops", OPS["x86_64"]], "['capstone']")):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                              text=True, cwd=REPO)
        assert proc.stdout.strip().splitlines()[-1] == want, (args, proc.stdout, proc.stderr)


def test_library_api_is_exported() -> None:
    assert pvpatch.diff_files is diff_files and pvpatch.diff_json is diff_json
    assert pvpatch.DiffReport is DiffReport and pvpatch.FileDiff is FileDiff
    assert pvpatch.SiteDiff is SiteDiff
    assert "diff_files" in dir(pvpatch) and callable(pvpatch.diff_html)
    with pytest.raises(pvpatch.InputError):
        diff_files(FIX / "x86_64" / "kernel61.o", FIX / "x86_64" / "nothing-here.o")
