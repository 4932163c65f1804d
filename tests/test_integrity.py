"""A table entry is input, not truth: lying entries are errors and are never rewritten.

fixtures/src/lying.S is a runnable program (and object) with two honest sites and a
dozen lying entries; each lie is found by `check` at its site and left alone by `patch`,
and the patched program (and the patched object, linked) exits as the original does.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import independent
import pytest
from clirun import pvpatch_cli
from gnu import check_links
from paths import FIX

import pvpatch

OPS = "catalog:linux-6.1-x86_64"
SPEC = FIX / "specs" / "lying.toml"

# label (+ offset) -> the error rules its entry must draw, in the object and in the program.
# PV107/PV115 need the object's relocations; in the program PV115's NOP has bytes (PV114).
LIES: dict[tuple[str, int], tuple[set[str], set[str]]] = {
    ("len_short", 0): ({"PV105", "PV107", "PV114"}, {"PV105", "PV114"}),
    ("swallow_mov", 0): ({"PV114"}, {"PV114"}),
    ("swallow_push", 0): ({"PV114"}, {"PV114"}),
    ("swallow_load", 0): ({"PV114"}, {"PV114"}),
    ("branch_in", 0): ({"PV116"}, {"PV116"}),
    ("inside_imm", 2): ({"PV105"}, {"PV105"}),
    ("nested", 0): ({"PV104", "PV114"}, {"PV104", "PV114"}),
    ("nested_inner", 0): ({"PV104"}, {"PV104"}),
    ("disagree", 0): ({"PV106", "PV112"}, {"PV106", "PV112"}),
    ("nobits_site", 0): ({"PV102"}, {"PV102"}),
    ("reloc_in_pad", 0): ({"PV115"}, {"PV114"}),
}
HONEST = ("good1", "good2")


def labels(path: Path) -> dict[str, tuple[str, int]]:
    """Label -> (section, offset), from readelf's symbol table and section headers."""
    secs = {x.index: x for x in independent.sections(path)}
    out = {}
    for sym in independent.symbols(path):
        if sym.type == "NOTYPE" and sym.ndx.isdigit() and sym.name:
            sec = secs[int(sym.ndx)]
            out[sym.name] = (sec.name, sym.value - sec.addr)
    return out


def run_exit(path: Path) -> int:
    return subprocess.run([str(path)], capture_output=True).returncode


@pytest.mark.parametrize("name", ["lying.o", "lying"])
def test_check_names_every_lie(name: str) -> None:
    path = FIX / "x86_64" / name
    proc = pvpatch_cli("check", "--json", "--ops", OPS, str(path))
    assert proc.returncode == 1, proc.stderr
    (record,) = json.loads(proc.stdout)["files"]
    errors: dict[tuple[str, int], set[str]] = {}
    for f in record["findings"]:
        if f["severity"] == "error":
            errors.setdefault((f["section"], f["offset"]), set()).add(f["rule"])
    where = labels(path)
    expected = {}
    for (label, plus), (in_object, in_program) in LIES.items():
        section, offset = where[label]
        expected[(section, offset + plus)] = in_object if name.endswith(".o") else in_program
    # the one entry the disagreeing pair shares, and nothing at the honest sites
    assert errors == expected
    assert not any(where[h] in errors for h in HONEST)


@pytest.mark.parametrize("name", ["lying.o", "lying"])
def test_patch_rewrites_only_the_honest_sites(name: str) -> None:
    path = FIX / "x86_64" / name
    result = pvpatch.load(path, ops=OPS)
    plan = pvpatch.make_plan(result, pvpatch.load_backend(str(SPEC), result.elf))
    where = labels(path)
    honest = {where[h] for h in HONEST}
    rewritten = {(d.site.section, d.site.offset) for d in plan.decisions if d.rewrites}
    assert rewritten == honest
    for d in plan.decisions:
        if (d.site.section, d.site.offset) not in honest:
            assert d.action == "keep" and d.reason is not None
    lied = [d for d in plan.decisions if d.reason and d.reason.startswith("unsafe to rewrite")]
    assert len(lied) >= 10
    # the library reports what check reports
    assert {f.rule for f in plan.findings if f.severity == "error"} >= {
        "PV105", "PV114", "PV116"}


def test_patched_program_runs_like_the_original(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "lying"
    out = tmp_path / "lying"
    proc = pvpatch_cli("patch", str(src), "-o", str(out), "--ops", OPS, "--backend", str(SPEC))
    assert proc.returncode == 0, proc.stderr
    assert "2 call" in proc.stdout
    # patch reports the lies it refused, as check does
    assert "PV114 site-shape" in proc.stderr and "PV116 branch-into-site" in proc.stderr
    assert out.read_bytes() != src.read_bytes()
    assert run_exit(out) == run_exit(src)


def test_patched_object_links_and_runs_like_the_original(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "lying.o"
    out = tmp_path / "lying.o"
    proc = pvpatch_cli("patch", str(src), "-o", str(out), "--ops", OPS, "--backend", str(SPEC))
    assert proc.returncode == 0, proc.stderr
    check_links(out, pvpatch.arch.X86_64, tmp_path, src)
    progs = []
    for obj in (src, out):
        exe = tmp_path / f"{obj.parent.name}-{obj.name}.exe"
        subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,--no-warn-rwx-segments",
                        str(obj), "-o", str(exe)], check=True)
        progs.append(run_exit(exe))
    assert progs[0] == progs[1]


def test_a_site_nested_in_a_long_one_overlaps_it_past_a_neighbour() -> None:
    """nested_inner does not overlap its neighbour (the short entry for the first call),
    only the long entry two places before it."""
    result = pvpatch.load(FIX / "x86_64" / "lying", ops=OPS)
    where = labels(FIX / "x86_64" / "lying")
    inner = next(s for s in result.sites if (s.section, s.offset) == where["nested_inner"])
    long_ = next(s for s in result.sites if (s.section, s.offset) == where["nested"]
                 and s.len == 15)
    hits = [f for f in result.findings if f.rule == "PV104" and f.site_index == inner.index]
    assert hits and f"site {long_.index} " in hits[0].message
    assert {inner.index, long_.index} <= result.unsafe


def test_honest_real_kernels_have_no_integrity_errors() -> None:
    """The fixtures built like kernels draw no integrity error (the corpus tests check the
    real Debian modules)."""
    for arch in ("x86_64", "i386"):
        for name in ("kernel61.o", "seed.o", "kernel612.o", "prog", "prog68"):
            res = pvpatch.load(FIX / arch / name, ops="none")
            plan = pvpatch.make_plan(res)
            bad = [f for f in plan.findings if f.severity == "error"]
            assert not bad, (arch, name, bad)


def test_undefined_clobber_bits_are_a_warning(tmp_path: Path) -> None:
    """0xfe01: rax plus seven bits no x86-64 CLBR register stands for."""
    src = FIX / "x86_64" / "kernel61.o"
    table = next(s for s in independent.sections(src) if s.name == ".parainstructions")
    data = bytearray(src.read_bytes())
    data[table.offset + 10 : table.offset + 12] = (0xFE01).to_bytes(2, "little")
    path = tmp_path / "bits.o"
    path.write_bytes(bytes(data))
    result = pvpatch.load(path, ops=OPS)
    (hit,) = [f for f in result.findings if f.rule == "PV205"]
    assert hit.severity == "warning" and hit.site_index == 0 and "0xfe00" in hit.message
    assert result.sites[0].clobber_regs == ("rax",)
