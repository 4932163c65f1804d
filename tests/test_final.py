"""`--final`: every table entry the kernel would apply at a rewritten site is dropped or
made one it skips, and the report says per site what the kernel will do there.

Each edit is checked against an independent reading of the tables (struct and pyelftools
here, readelf for relocations), on Debian's 6.1 kernel (`.parainstructions` plus 12-byte
`.altinstructions`, 5.13-6.2 layout) and 6.12 (14-byte DIRECT_CALL entries), and on a
linked fixture.  tests/test_qemu.py reads the running kernel's text back to prove it.
"""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import corpus
import pytest
from clirun import pvpatch_cli
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from paths import FIX
from qemu import harness

import pvpatch
from pvpatch.plan.backend import parse_spec_text

FIX64 = FIX / "x86_64"
OPS61 = "catalog:linux-6.1-x86_64"
X86_FEATURE_ALWAYS, XENPV, NOT_5_13 = 117, 272, 1 << 15  # cpufeatures.h; ALTINSTR_FLAG_INV


def _elf(data: bytes) -> Any:
    return ELFFile(io.BytesIO(data))


def _section(data: bytes, name: str) -> bytes:
    sec = _elf(data).get_section_by_name(name)
    return b"" if sec is None else bytes(sec.data())


def _relocs(data: bytes, target: str) -> list[tuple[int, int, str, int]]:
    """(offset, type, symbol name or its section's name, addend) of `target`'s relocations."""
    ef = _elf(data)
    out = []
    symtab = ef.get_section_by_name(".symtab")
    for rs in ef.iter_sections():
        if isinstance(rs, RelocationSection) and ef.get_section(rs["sh_info"]).name == target:
            for r in rs.iter_relocations():
                sym = symtab.get_symbol(r["r_info_sym"])
                name = sym.name or ef.get_section(sym["st_shndx"]).name
                out.append((r["r_offset"], r["r_info_type"], name, r["r_addend"]))
    return sorted(out)


def _spec_file(tmp_path: Path) -> Path:
    spec = tmp_path / "thunk.toml"
    spec.write_text(harness.THUNK_SPEC)
    return spec


# -- a module of Debian's 6.1: one irq.save_fl site, sent to a thunk ----------------------


@pytest.mark.corpus
def test_final_module_drops_the_paravirt_entry_and_neutralises_the_alternative(
        tmp_path: Path) -> None:
    team = harness.module_paths()["team"]
    vml = harness.vmlinux()
    out = tmp_path / "team.ko"
    proc = pvpatch_cli("patch", str(team), "-o", str(out), "--backend",
                       str(_spec_file(tmp_path)), "--ops", f"btf:{vml}", "--symvers", str(vml),
                       "--final", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    orig, new = team.read_bytes(), out.read_bytes()
    # The original: one .parainstructions entry (16 bytes) and one 12-byte alternative,
    # NOT XENPV, both at the site (pyelftools reads the relocations).
    assert len(_section(orig, ".parainstructions")) == 16
    old_alt = _section(orig, ".altinstructions")
    assert len(old_alt) == 12
    (cpuid,) = struct.unpack_from("<H", old_alt, 8)
    assert cpuid == XENPV | NOT_5_13
    (site,) = [s for s in report["sites"] if s["action"] != "keep"]
    alt_relocs = _relocs(orig, ".altinstructions")
    assert alt_relocs[0][2:] == (".text", site["offset"])  # instr_offset -> the site
    # --final: the paravirt entry is gone with its relocation...
    assert _section(new, ".parainstructions") == b""
    assert _relocs(new, ".parainstructions") == []
    # ...and the alternative now tests NOT X86_FEATURE_ALWAYS; nothing else changed in it.
    new_alt = _section(new, ".altinstructions")
    assert new_alt == old_alt[:8] + struct.pack("<H", X86_FEATURE_ALWAYS | NOT_5_13) + \
        old_alt[10:]
    assert _relocs(new, ".altinstructions") == alt_relocs
    assert (report["final"], report["dropped_entries"], report["neutralised_entries"]) == \
        (True, 1, 1)
    runtime = site["runtime"]
    assert runtime["outcome"] == "pvpatch"
    assert [(t["section"], t["kind"], t["edit"]) for t in runtime["tables"]] == [
        (".parainstructions", "paravirt", "drop"),
        (".altinstructions", "alternative", "neutralise")]


@pytest.mark.corpus
def test_without_final_the_report_predicts_the_native_overwrite(tmp_path: Path) -> None:
    """The prediction is the alternative's replacement (read from .altinstr_replacement
    through the entry's relocation) padded with the kernel's NOP; check warns (PV206)."""
    team = harness.module_paths()["team"]
    vml = harness.vmlinux()
    spec = _spec_file(tmp_path)
    proc = pvpatch_cli("patch", str(team), "-o", str(tmp_path / "t.ko"), "--backend",
                       str(spec), "--ops", f"btf:{vml}", "--symvers", str(vml), "--json")
    assert proc.returncode == 0, proc.stderr
    (site,) = [s for s in json.loads(proc.stdout)["sites"] if s["action"] != "keep"]
    orig = team.read_bytes()
    alt = _section(orig, ".altinstructions")
    repllen = alt[11]
    (_off, _type, name, addend) = _relocs(orig, ".altinstructions")[1]  # repl_offset
    assert name == ".altinstr_replacement"
    repl = _section(orig, ".altinstr_replacement")[addend : addend + repllen]
    nop4 = bytes.fromhex("0f1f4000")  # x86_nops[4], asm/nops.h
    assert site["runtime"]["outcome"] == "native"
    assert site["runtime"]["predicted"] == (repl + nop4).hex() == "9c580f1f4000"
    assert site["after"] != site["runtime"]["predicted"]
    # check: a warning (exit 0), an error only with --fail-on warning; SARIF carries it.
    sarif = tmp_path / "c.sarif"
    check = pvpatch_cli("check", str(team), "--backend", str(spec), "--ops", f"btf:{vml}",
                        "--sarif", str(sarif))
    assert check.returncode == 0, check.stderr
    assert "PV206 runtime-overwrite" in check.stdout + check.stderr
    results = json.loads(sarif.read_text())["runs"][0]["results"]
    assert [r["ruleId"] for r in results] == ["PV206"]
    assert pvpatch_cli("check", str(team), "--backend", str(spec), "--ops", f"btf:{vml}",
                       "--fail-on", "warning").returncode == 1
    # The native backend writes what the kernel writes there: no warning.
    native = pvpatch_cli("check", str(team), "--ops", f"btf:{vml}")
    assert "PV206" not in native.stdout + native.stderr


# -- Debian's 6.1 image -------------------------------------------------------------------


def _para_entries(data: bytes) -> list[bytes]:
    raw = _section(data, ".parainstructions")
    return [raw[i : i + 16] for i in range(0, len(raw), 16)]


@pytest.mark.corpus
def test_final_image_replaces_entries_by_copies_of_a_kept_entry() -> None:
    """Each rewritten site's 16-byte entry {u64 instr; u8 type; u8 len; ...} becomes a
    copy of an entry whose site pvpatch kept; each 12-byte alternative whose instr_offset
    (self-relative) leads to a rewritten site tests NOT ALWAYS; nothing else changes."""
    rw = harness.vmlinux_rewrite(final=True)
    orig = harness.vmlinux().read_bytes()
    new = rw.data
    rewritten = {p.decision.site.address for p in rw.patches if p.decision.rewrites}
    old_e, new_e = _para_entries(orig), _para_entries(new)
    assert len(old_e) == len(new_e)
    kept_addrs = {struct.unpack_from("<Q", e)[0] for e in old_e} - rewritten
    copied = 0
    for a, b in zip(old_e, new_e, strict=True):
        addr = struct.unpack_from("<Q", a)[0]
        if addr in rewritten:
            assert b in old_e and struct.unpack_from("<Q", b)[0] in kept_addrs
            copied += 1
        else:
            assert a == b
    assert copied == len(rewritten) == rw.copied_entries >= 2000
    # The alternatives, decoded here with their own self-relative arithmetic.
    ef = _elf(orig)
    sec = ef.get_section_by_name(".altinstructions")
    old_alt, new_alt = _section(orig, ".altinstructions"), _section(new, ".altinstructions")
    changed = 0
    for i in range(0, len(old_alt), 12):
        instr_rel, _repl, cpuid, _len, _rl = struct.unpack_from("<iiHBB", old_alt, i)
        addr = (sec["sh_addr"] + i + instr_rel) & (1 << 64) - 1
        if addr in rewritten and cpuid & ~NOT_5_13 != X86_FEATURE_ALWAYS:
            assert new_alt[i : i + 12] == old_alt[i : i + 8] + \
                struct.pack("<H", X86_FEATURE_ALWAYS | NOT_5_13) + old_alt[i + 10 : i + 12]
            changed += 1
        else:
            assert new_alt[i : i + 12] == old_alt[i : i + 12]
    assert changed == rw.neutralised_entries == len(rewritten)


@pytest.mark.corpus
def test_image_without_final_is_covered_and_says_so() -> None:
    rw = harness.vmlinux_rewrite()
    cov = rw.plan.coverage
    outcomes = {cov.sites[p.decision.site.index].outcome for p in rw.patches
                if p.decision.rewrites}
    assert outcomes == {"native"}  # NOT XENPV alternatives overwrite every inline site
    assert rw.copied_entries == rw.neutralised_entries == 0
    assert _para_entries(rw.data) == _para_entries(harness.vmlinux().read_bytes())


@pytest.mark.corpus
def test_thunks_in_a_kernel_image_are_refused(tmp_path: Path) -> None:
    vml = harness.vmlinux()
    out = tmp_path / "vmlinux"
    proc = pvpatch_cli("patch", str(vml), "-o", str(out), "--backend",
                       str(_spec_file(tmp_path)), "--ops", f"btf:{vml}")
    assert proc.returncode == 2
    assert "thunks are refused in a kernel image" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


# -- 6.12: the DIRECT_CALL entries (neutralised by default, --final changes nothing) --------


@pytest.mark.corpus
def test_612_module_final_equals_default() -> None:
    path = next(p for p in corpus.x86_64_612_modules() if p.name == "kvm.ko.xz")
    scan = pvpatch.load(path, ops=harness.ops_source("6.12"))
    default = pvpatch.apply_plan(pvpatch.make_plan(scan, "native"))
    final = pvpatch.apply_plan(pvpatch.make_plan(scan, "native", final=True))
    assert default.data == final.data
    assert default.neutralised_entries >= 10
    cov = final.plan.coverage
    assert all(cov.sites[p.decision.site.index].outcome == "pvpatch"
               for p in final.patches if p.decision.rewrites)


# -- a linked fixture: no kept entry to copy --------------------------------------------


def test_final_refused_when_no_entry_is_kept(tmp_path: Path) -> None:
    spec = tmp_path / "nop.toml"
    spec.write_text('arch = "x86_64"\n\n[defaults]\naction = "nop"\n')
    out = tmp_path / "prog"
    proc = pvpatch_cli("patch", str(FIX64 / "prog"), "-o", str(out), "--backend", str(spec),
                       "--ops", OPS61, "--final", "--no-verify")
    assert proc.returncode == 2
    assert "none is left to copy" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_final_linked_fixture_copies_the_kept_entry(tmp_path: Path) -> None:
    """prog: five sites rewritten, one kept; readelf's hex dump of the output's table
    shows five copies of the kept entry."""
    out = tmp_path / "prog"
    proc = pvpatch_cli("patch", str(FIX64 / "prog"), "-o", str(out), "--ops", OPS61, "--final",
                       "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    kept = [s for s in report["sites"] if s["action"] == "keep"]
    assert len(kept) == 1 and report["copied_entries"] == 5
    dump = subprocess.run(["readelf", "-x", ".parainstructions", str(out)],
                          capture_output=True, text=True, check=True).stdout
    words = [w for line in dump.splitlines() if line.strip().startswith("0x")
             for w in line.split()[1:5]]
    raw = bytes.fromhex("".join(words))
    entries = [raw[i : i + 16] for i in range(0, len(raw), 16)]
    kept_entry = _para_entries((FIX64 / "prog").read_bytes())[kept[0]["index"]]
    assert entries.count(kept_entry) == 6
    assert all(s["runtime"]["outcome"] == "pvpatch" for s in report["sites"]
               if s["action"] != "keep")


def test_library_final_flag_flows_to_the_plan() -> None:
    """A relocatable file: --final drops each rewritten site's entry (as --drop-patched
    does), and readelf sees one relocation fewer per dropped entry."""
    scan = pvpatch.load(FIX64 / "kernel61.o", ops=OPS61)
    be = parse_spec_text('arch = "x86_64"\n\n[defaults]\naction = "nop"\n', scan.arch,
                         "<spec>")
    plan = pvpatch.make_plan(scan, be, final=True)
    rewritten = [d.site.index for d in plan.decisions if d.rewrites]
    assert plan.final and len(rewritten) >= 5
    assert [(e.kind, e.index) for e in plan.coverage.edits] == [("drop", i) for i in rewritten]
    rw = pvpatch.apply_plan(plan)
    assert rw.dropped_entries == len(rewritten)
    orig = (FIX64 / "kernel61.o").read_bytes()
    assert len(_relocs(rw.data, ".parainstructions")) == \
        len(_relocs(orig, ".parainstructions")) - len(rewritten)


@pytest.mark.corpus
def test_final_drop_patched_removes_alternatives_with_their_relocations(
        tmp_path: Path) -> None:
    """kvm.ko, native, --final --drop-patched: every 12-byte alternative whose instr
    relocation (pyelftools) names a rewritten site is gone with both its relocations; the
    others stay, in order, with theirs (offsets shifted by the entries removed)."""
    kvm = harness.module_paths()["kvm"]
    vml = harness.vmlinux()
    out = tmp_path / "kvm.ko"
    proc = pvpatch_cli("patch", str(kvm), "-o", str(out), "--ops", f"btf:{vml}", "--final",
                       "--drop-patched", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rewritten = {(s["section"], s["offset"]) for s in report["sites"] if s["action"] != "keep"}
    orig = kvm.read_bytes()
    old_alt, new_alt = _section(orig, ".altinstructions"), _section(out.read_bytes(),
                                                                     ".altinstructions")
    old_rel = _relocs(orig, ".altinstructions")
    per_entry: dict[int, list[tuple[int, int, str, int]]] = {}
    for r in old_rel:
        per_entry.setdefault(r[0] // 12, []).append(r)
    gone = {i for i, rows in per_entry.items()
            if (rows[0][2], rows[0][3]) in rewritten and rows[0][0] % 12 == 0}
    assert len(gone) == len(rewritten) >= 40
    kept = [i for i in range(len(old_alt) // 12) if i not in gone]
    assert new_alt == b"".join(old_alt[i * 12 : i * 12 + 12] for i in kept)
    want = [(k * 12 + off % 12, t, name, addend) for k, i in enumerate(kept)
            for off, t, name, addend in per_entry.get(i, [])]
    assert _relocs(out.read_bytes(), ".altinstructions") == sorted(want)
    assert report["dropped_entries"] == 2 * len(rewritten)


@pytest.mark.corpus
def test_scan_json_says_what_the_kernel_does_at_each_site() -> None:
    """An unpatched 6.1 module: its save_fl site is covered by its .parainstructions entry
    and by the NOT XENPV alternative, applied in that order; the kernel leaves the native
    replacement there."""
    team = harness.module_paths()["team"]
    proc = pvpatch_cli("scan", "--json", "--ops", f"btf:{harness.vmlinux()}", str(team))
    assert proc.returncode == 0, proc.stderr
    (site,) = json.loads(proc.stdout)["files"][0]["sites"]
    rt = site["runtime"]
    assert [(t["section"], t["kind"], t["feature"], t["not"], t["applies"])
            for t in rt["tables"]] == [(".parainstructions", "paravirt", None, False, True),
                                       (".altinstructions", "alternative", XENPV, True, True)]
    assert (rt["outcome"], rt["predicted"]) == ("native", "9c580f1f4000")


# -- GNU as objects: alternatives and site lists the kernel would apply inside a site ------

SITE = (".text\n.globl f\nf:\n771: call *pv_ops+30*8(%rip)\n772:\nret\n"
        '.section .parainstructions,"a"\n.quad 771b\n.byte 30\n.byte 772b-771b\n'
        ".short 0x1\n.balign 8\n")


def _as(tmp_path: Path, name: str, text: str) -> Path:
    src, obj = tmp_path / f"{name}.s", tmp_path / f"{name}.o"
    src.write_text(text)
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    return obj


def _patch(obj: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return pvpatch_cli("patch", str(obj), "-o", str(out), "--ops", OPS61, "--no-verify",
                       "--json", *extra)


def test_final_refuses_a_site_list_entry_inside_a_site(tmp_path: Path) -> None:
    """A .return_sites entry (the kernel's apply_returns patches the place) pointing into a
    rewritten site: --final refuses, naming it; without --final the report lists it."""
    obj = _as(tmp_path, "ret", SITE + '.section .return_sites,"a"\n.long 771b+2-.\n')
    out = tmp_path / "out.o"
    proc = _patch(obj, out, "--final")
    assert proc.returncode == 2 and not out.exists()
    assert ".return_sites entry 0 names .text+0x2, inside a rewritten site" in proc.stderr
    plan = pvpatch.make_plan(pvpatch.load(obj, ops=OPS61), "native", final=True)
    (sc,) = plan.coverage.sites.values()
    assert [(c.section, c.kind, c.start) for c in sc.covers][-1] == \
        (".return_sites", "site-list", 2)
    assert sc.outcome == "depends"


def test_final_refuses_an_alternative_wider_than_the_site(tmp_path: Path) -> None:
    """A 12-byte alternative (5.13-6.2 layout) covering the `nop` before the site and the
    site: disabling it would change code pvpatch did not rewrite."""
    text = SITE + ('.section .altinstructions,"a"\n.long 771b-.\n.long 991f-.\n'
                   ".word 0x8110\n.byte 7\n.byte 1\n"
                   '.section .altinstr_replacement,"ax"\n991: cli\n')
    obj = _as(tmp_path, "wide", text.replace("f:\n771:", "f:\nnop\n771:").replace(
        ".long 771b-.", ".long 771b-1-."))
    proc = _patch(obj, tmp_path / "out.o", "--final")
    assert proc.returncode == 2
    assert "beyond the site" in proc.stderr
    ok = _patch(obj, tmp_path / "out2.o")
    assert ok.returncode == 0, ok.stderr
    (site,) = json.loads(ok.stdout)["sites"]
    assert [(t["section"], t["feature"], t["not"]) for t in site["runtime"]["tables"]] == [
        (".parainstructions", None, False), (".altinstructions", XENPV, True)]


def test_final_neutralises_a_gnu_as_alternative_in_place(tmp_path: Path) -> None:
    """The alternative as GNU as emits it (`.word 0x8110`: NOT XENPV): --final writes
    0x8075 at entry offset 8, readelf's hex dump shows it."""
    text = SITE + ('.section .altinstructions,"a"\n.long 771b-.\n.long 991f-.\n'
                   ".word 0x8110\n.byte 6\n.byte 2\n"
                   '.section .altinstr_replacement,"ax"\n991: pushf\npop %rax\n')
    obj = _as(tmp_path, "alt", text)
    out = tmp_path / "out.o"
    proc = _patch(obj, out, "--final")
    assert proc.returncode == 0, proc.stderr
    dump = subprocess.run(["readelf", "-x", ".altinstructions", str(out)],
                          capture_output=True, text=True, check=True).stdout
    raw = bytes.fromhex("".join(w for ln in dump.splitlines() if ln.strip().startswith("0x")
                                for w in ln.split()[1:4]))
    assert raw[8:12] == bytes.fromhex("75800602")
    (site,) = json.loads(proc.stdout)["sites"]
    assert site["runtime"]["outcome"] == "pvpatch"
    before = _patch(obj, tmp_path / "nofinal.o")
    (site,) = json.loads(before.stdout)["sites"]
    assert site["runtime"]["predicted"] == "9c580f1f4000"  # GNU as's pushf; pop + nop4


def test_final_over_a_tree(tmp_path: Path) -> None:
    """`patch DIR -o OUT --final`: each file of the tree is patched as alone with --final."""
    tree = tmp_path / "in"
    tree.mkdir()
    for name in ("prog", "kernel61.o"):
        (tree / name).write_bytes((FIX64 / name).read_bytes())
    out = tmp_path / "out"
    proc = pvpatch_cli("patch", str(tree), "-o", str(out), "--ops", OPS61, "--final",
                       "--no-verify")
    assert proc.returncode == 0, proc.stderr
    alone = tmp_path / "prog.alone"
    assert pvpatch_cli("patch", str(FIX64 / "prog"), "-o", str(alone), "--ops", OPS61,
                       "--final", "--no-verify").returncode == 0
    assert (out / "prog").read_bytes() == alone.read_bytes()
    assert _para_entries((out / "prog").read_bytes()) != _para_entries((FIX64 / "prog")
                                                                        .read_bytes())
    assert _section((out / "kernel61.o").read_bytes(), ".parainstructions") != \
        _section((FIX64 / "kernel61.o").read_bytes(), ".parainstructions")


def test_kernel_nop_tables_decode_as_one_instruction_each(arch: str, tmp_path: Path) -> None:
    """The kernel's x86_nops[] (the padding the prediction uses) as objdump reads them:
    entry n is a single n-byte instruction; x86-64's are pvpatch's own NOPs."""
    from pvpatch.arch import X86_64
    from pvpatch.plan.coverage import KERNEL_NOPS, kernel_nops

    table = KERNEL_NOPS[arch]
    for n in range(1, len(table)):
        blob = tmp_path / f"nop{n}"
        blob.write_bytes(table[n])
        dump = subprocess.run(["objdump", "-D", "--insn-width=16", "-b", "binary", "-m",
                               "i386:x86-64" if arch == "x86_64" else "i386", str(blob)],
                              capture_output=True, text=True, check=True).stdout
        insns = [ln for ln in dump.splitlines() if re.match(r"\s+[0-9a-f]+:\t", ln)]
        assert len(table[n]) == n and len(insns) == 1, (n, insns)
        assert re.search(r"\t(nop|xchg|lea|mov|ds lea)", insns[0]), insns[0]
    if arch == "x86_64":
        assert table == X86_64.nops
    assert kernel_nops(arch, 11) == table[8] + table[3]


@pytest.mark.corpus
def test_i386_image_prediction_pads_with_the_kernels_nops() -> None:
    """Debian's i386 6.1 image: an inline site the NOT XENPV alternative overwrites is
    predicted as the replacement plus the i386 table's NOPs, which differ from pvpatch's;
    check does not warn about a difference in padding alone."""
    from pvpatch.plan.coverage import KERNEL_NOPS

    image = corpus.i386_vmlinux()
    assert image is not None
    plan = pvpatch.make_plan(pvpatch.load(image), "native")
    cov = plan.coverage
    checked = 0
    for d in plan.decisions:
        sc = cov.sites[d.site.index]
        if not d.rewrites or sc.outcome != "native" or sc.predicted is None:
            continue
        (repl,) = [c.replacement for c in sc.covers if c.replacement is not None]
        assert repl is not None
        tail = sc.predicted[len(repl):]
        assert sc.predicted.startswith(repl) and tail in KERNEL_NOPS["i386"]
        assert d.code is not None and d.code.startswith(repl)
        checked += 1
    assert checked >= 40
    assert not [f for f in plan.findings if f.rule == "PV206"]


@pytest.mark.corpus
def test_calls_outside_the_kernels_text_are_refused(tmp_path: Path) -> None:
    """A spec target a symbol file places past the image's sections (where only a pvpatch
    segment could be): refused, one line, nothing written."""
    vml = harness.vmlinux()
    end = max(s["sh_addr"] + s["sh_size"] for s in _elf(vml.read_bytes()).iter_sections()
              if s["sh_flags"] & 0x4)  # SHF_EXECINSTR
    smap = tmp_path / "System.map"
    smap.write_text(f"{end + 0x100000:016x} T fake_target\n")
    spec = tmp_path / "fake.toml"
    spec.write_text('[ops."cpu.io_delay"]\naction = "call"\ntarget = "fake_target"\n')
    out = tmp_path / "vmlinux"
    proc = pvpatch_cli("patch", str(vml), "-o", str(out), "--backend", str(spec),
                       "--symbols", str(smap), "--ops", f"btf:{vml}", "--no-verify")
    assert proc.returncode == 2
    assert "is in none of the kernel image's executable sections" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
