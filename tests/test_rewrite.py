"""The rewrite engine, checked against GNU as, readelf, GNU ld and pyelftools."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import tempfile
import tomllib
from importlib import resources
from pathlib import Path

import corpus
import pytest
from elftools.elf.elffile import ELFFile
from gnu import check_links, gas, readelf_relocs
from paths import FIX, REPO

import pvpatch
from pvpatch.arch import ARCHES, I386, X86_64, Arch
from pvpatch.plan.backend import parse_spec_text
from pvpatch.rewrite.stage import Rewrite

CAT = {"x86_64": "catalog:linux-6.1-x86_64",
       "i386": f"catalog:{FIX / 'catalogs' / 'fixtures-i386.toml'}"}


def native_table(arch: Arch) -> dict[str, object]:
    text = resources.files("pvpatch").joinpath(
        "data", "backends", f"native-{arch.name}.toml").read_text()
    return tomllib.loads(text)


# -- the byte tables ---------------------------------------------------------------


@pytest.mark.parametrize("arch", [X86_64, I386], ids=lambda a: a.name)
def test_native_table_matches_gnu_as(arch: Arch) -> None:
    table = native_table(arch)
    ops = table["ops"]
    assert isinstance(ops, dict)
    checked = 0
    for name, body in ops.items():
        if body["action"] != "inline":
            continue
        assert gas(arch.name, body["asm"]) == bytes.fromhex(body["bytes"]), name
        checked += 1
    assert checked >= 13
    # The spec reader does the same check for user specs (asm vs bytes).
    text = resources.files("pvpatch").joinpath(
        "data", "backends", f"native-{arch.name}.toml").read_text()
    assert parse_spec_text(text, arch).rules


@pytest.mark.parametrize("arch", [X86_64, I386], ids=lambda a: a.name)
def test_nop_fill_matches_gnu_as(arch: Arch) -> None:
    for n in range(1, 20):
        want = b"".join(gas(arch.name, f".nops {min(8, n - k)}") for k in range(0, n, 8))
        assert arch.nop_fill(n) == want, n
        # and one instruction per 8 bytes: the fewest
        assert len(re.findall("nop|xchg", _objdump_insns(arch, arch.nop_fill(n)))) == (n + 7) // 8


def _objdump_insns(arch: Arch, code: bytes) -> str:
    machine = "i386:x86-64" if arch.name == "x86_64" else "i386"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "code.bin"
        raw.write_bytes(code)
        proc = subprocess.run(["objdump", "-D", "-b", "binary", "-m", machine, str(raw)],
                              capture_output=True, check=True, text=True)
    return proc.stdout.split("<.data>:", 1)[1]


# -- relocatable fixtures ----------------------------------------------------------


def patch(path: Path, backend: str = "native", ops: str = "auto",
          drop: bool = False) -> Rewrite:
    res = pvpatch.load(path, ops=ops)
    return pvpatch.apply_plan(pvpatch.make_plan(res, backend, drop_patched=drop))


def check_rewrite(src: Path, rw: Rewrite, out: Path, tmp: Path) -> None:
    """Every inline site as GNU as says, no relocation inside it, nothing else changed."""
    arch = rw.plan.arch
    out.write_bytes(rw.data)
    check_links(out, arch, tmp, src)
    before_rel, after_rel = readelf_relocs(src), readelf_relocs(out)
    with src.open("rb") as f1, out.open("rb") as f2:
        e1, e2 = ELFFile(f1), ELFFile(f2)
        spans: dict[str, list[tuple[int, int]]] = {}
        for p in rw.patches:
            d = p.decision
            if not d.rewrites:
                continue
            s = d.site
            spans.setdefault(s.section, []).append((s.offset, s.end))
            got = bytes(e2.get_section_by_name(s.section).data()[s.offset : s.end])
            assert got == p.after
            if d.action == "inline":
                assert d.rule is not None and d.rule.asm is not None
                pad = s.len - len(d.rule.code or b"")
                want = gas(arch.name, d.rule.asm + (f"; .nops {pad}" if pad else ""))
                assert got == want, (s.section, hex(s.offset), got.hex(), want.hex())
            assert not any(s.offset <= r[0] < s.end for r in after_rel.get(s.section, ())), \
                f"relocation left inside {s.section}+{s.offset:#x}"
        for sec in e1.iter_sections():
            name = sec.name
            other = e2.get_section_by_name(name)
            assert other is not None, name
            if name.startswith((".rela", ".rel")) or name in (".parainstructions",):
                continue
            a, b = bytes(sec.data()), bytes(other.data())
            for lo, hi in spans.get(name, []):
                a = a[:lo] + bytes(hi - lo) + a[hi:]
                b = b[:lo] + bytes(hi - lo) + b[hi:]
            assert a == b, f"section {name} changed outside the sites"
    # relocations: exactly those inside rewritten sites are gone (native: no calls added)
    for name, rels in before_rel.items():
        inside = {r for r in rels if any(lo <= r[0] < hi for lo, hi in spans.get(name, []))}
        if name == ".parainstructions":
            continue
        assert after_rel.get(name, set()) == rels - inside, name


@pytest.mark.parametrize("arch_name", ["x86_64", "i386"])
@pytest.mark.parametrize("name", ["kernel61.o", "seed.o"])
def test_native_patch_relocatable(arch_name: str, name: str, tmp_path: Path) -> None:
    src = FIX / arch_name / name
    rw = patch(src, ops=CAT[arch_name])
    counts = rw.plan.counts()
    assert counts.get("inline", 0) + counts.get("nop", 0) >= 5
    check_rewrite(src, rw, tmp_path / name, tmp_path)
    for p in rw.patches:
        d = p.decision
        if d.action == "keep":
            assert d.reason
    # the same plan again gives the same bytes; patching the output changes nothing
    assert patch(src, ops=CAT[arch_name]).data == rw.data
    again = patch(tmp_path / name, ops=CAT[arch_name])
    assert again.data == rw.data
    assert all(p.already for p in again.patches if p.decision.rewrites)


def test_legacy_table(tmp_path: Path) -> None:
    src = FIX / "x86_64" / "legacy.o"
    rw = patch(src, ops=CAT["x86_64"])
    assert rw.plan.counts()["inline"] >= 4
    check_rewrite(src, rw, tmp_path / "legacy.o", tmp_path)


@pytest.mark.parametrize("arch_name", ["x86_64", "i386"])
def test_drop_patched(arch_name: str, tmp_path: Path) -> None:
    src = FIX / arch_name / "kernel61.o"
    rw = patch(src, ops=CAT[arch_name], drop=True)
    out = tmp_path / "k.o"
    out.write_bytes(rw.data)
    check_links(out, ARCHES[arch_name], tmp_path)
    kept = [p.decision.site for p in rw.patches if not p.decision.rewrites]
    assert rw.dropped_entries == len(rw.patches) - len(kept) > 0
    res = pvpatch.load(out, ops=CAT[arch_name])
    assert [(s.section, s.offset, s.type) for s in res.sites] == [
        (s.section, s.offset, s.type) for s in kept]
    assert not res.findings


@pytest.mark.parametrize("arch_name", ["x86_64", "i386"])
def test_drop_patched_moves_labels_in_the_table(arch_name: str, tmp_path: Path) -> None:
    """Symbols inside the table follow the entries they name (readelf is the judge)."""
    bits = 64 if arch_name == "x86_64" else 32
    ptr = bits // 8
    word = ".quad" if bits == 64 else ".long"
    sites = []
    for t in (31, 99, 32):  # irq_disable (inlined), unknown (kept), irq_enable (inlined)
        call = f"call *pv_ops+{t * ptr}(%rip)" if bits == 64 else f"call *pv_ops+{t * ptr}"
        sites.append(f"771: {call}\n772:\n.pushsection .parainstructions,\"a\"\n"
                     f"{'mid:' if t == 99 else ''}\n{word} 771b\n.byte {t}\n"
                     f".byte 772b-771b\n.short {(1 << 9) - 1 if bits == 64 else 0xF}\n"
                     f".balign {ptr}\n.popsection")
    src = tmp_path / "t.s"
    src.write_text(
        '.pushsection .parainstructions,"a"\n.balign 8\n.globl tbl\n.type tbl,@object\n'
        "tbl:\nfirst:\n.popsection\n.text\n.globl f\nf:\n" + "\n".join(sites) +
        '\nret\n.pushsection .parainstructions,"a"\nend:\n.size tbl, .-tbl\n.popsection\n')
    obj = tmp_path / "t.o"
    subprocess.run(["as", f"--{bits}", "-o", str(obj), str(src)], check=True)
    rw = patch(obj, ops=CAT[arch_name], drop=True)
    assert rw.dropped_entries == 2
    out = tmp_path / "out.o"
    out.write_bytes(rw.data)

    def symbols(path: Path) -> dict[str, tuple[int, int]]:
        rows = [ln.split() for ln in readelf("-s", str(path)).splitlines()]
        return {r[7]: (int(r[1], 16), int(r[2])) for r in rows
                if len(r) == 8 and r[7] in ("tbl", "first", "mid", "end")}

    stride = 2 * ptr
    assert symbols(obj) == {"tbl": (0, 3 * stride), "first": (0, 0), "mid": (stride, 0),
                            "end": (3 * stride, 0)}
    assert symbols(out) == {"tbl": (0, stride), "first": (0, 0), "mid": (0, 0),
                            "end": (stride, 0)}
    check_links(out, ARCHES[arch_name], tmp_path)
    assert [s.type for s in pvpatch.load(out, ops=CAT[arch_name]).sites] == [99]


def test_drop_patched_keeps_a_short_last_entry_short(tmp_path: Path) -> None:
    """Before 6.1 no padding follows the last entry (a 16n-4 byte table): when that entry
    is kept it stays short, and an end label lands on the new end (readelf's values)."""
    obj = assemble(tmp_path, "short",
        ".text\n.globl f\nf:\n771: call *pv_ops+31*8(%rip)\n772:\n"
        "773: call *pv_ops+99*8(%rip)\n774:\nret\n"
        '.section .parainstructions,"a"\n.globl pv_all, pv_mid, pv_end\n.type pv_all,@object\n'
        "pv_all:\n.quad 771b\n.byte 31\n.byte 772b-771b\n.short 0x1ff\n.balign 8\n"
        "pv_mid:\n.quad 773b\n.byte 99\n.byte 774b-773b\n.short 0x1ff\n"
        "pv_end:\n.size pv_all, pv_end-pv_all\n")
    rw = patch(obj, ops=CAT["x86_64"], drop=True)
    assert rw.dropped_entries == 1
    out = tmp_path / "out.o"
    out.write_bytes(rw.data)
    rows = [ln.split() for ln in readelf("-s", str(out)).splitlines()]
    syms = {r[7]: (int(r[1], 16), int(r[2])) for r in rows if len(r) == 8 and
            r[7] in ("pv_all", "pv_mid", "pv_end")}
    assert syms == {"pv_all": (0, 12), "pv_mid": (0, 0), "pv_end": (12, 0)}
    table = pvpatch.open_elf(out).section(".parainstructions")
    assert table is not None and table.size == 12
    assert [s.type for s in pvpatch.load(out, ops=CAT["x86_64"]).sites] == [99]
    check_links(out, ARCHES["x86_64"], tmp_path)


def test_patch_cli_json(tmp_path: Path) -> None:
    out = tmp_path / "k.o"
    proc = subprocess.run(
        [sys.executable, "-m", "pvpatch", "patch", str(FIX / "x86_64" / "kernel61.o"), "-o",
         str(out), "--ops", CAT["x86_64"], "--json", "--no-verify"],
        capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {"input", "output", "arch", "sites", "thunks", "counts", "verify"} <= set(doc)
    site = doc["sites"][0]
    assert set(site) == {"index", "section", "offset", "address", "type", "op", "len",
                         "clobbers", "action", "reason", "before", "after", "runtime"}
    assert sum(doc["counts"].values()) == len(doc["sites"]) == 21
    by_op = {s["op"]: s for s in doc["sites"]}
    assert by_op["irq.save_fl"]["after"] == "9c580f1f4000"
    assert by_op["irq.irq_disable"]["after"] == "fa0f1f440000"
    assert by_op["cpu.io_delay"]["action"] == "keep"
    assert by_op["cpu.io_delay"]["reason"] == "no native form and no target"


def test_clobber_mask_refuses_inline(tmp_path: Path) -> None:
    """save_fl changes rax: refused where the site allows none."""
    src = FIX / "x86_64" / "kernel61.o"
    data = bytearray(src.read_bytes())
    res = pvpatch.load(src, ops=CAT["x86_64"])
    assert res.table is not None
    site = next(s for s in res.sites if s.op == "irq.save_fl")
    data[res.table.section.offset + site.index * 16 + 10] = 0  # clobbers = none
    path = tmp_path / "k.o"
    path.write_bytes(bytes(data))
    rw = patch(path, ops=CAT["x86_64"])
    d = next(p.decision for p in rw.patches if p.decision.site.index == site.index)
    assert d.action == "keep" and d.reason == "clobbers rax, site allows none"


# -- linked files -------------------------------------------------------------------


@pytest.mark.corpus
def test_vmlinux(tmp_path: Path) -> None:
    vmlinux = corpus.x86_64_vmlinux()
    assert vmlinux is not None
    rw = patch(vmlinux)
    counts = rw.plan.counts()
    assert counts["inline"] > 2000 and counts["keep"] > 1000
    orig = vmlinux.read_bytes()
    assert len(rw.data) == len(orig)
    spans = sorted((p.decision.site.file_offset, p.decision.site.len) for p in rw.patches
                   if p.decision.rewrites)
    masked_a, masked_b = bytearray(orig), bytearray(rw.data)
    for off, n in spans:
        masked_a[off : off + n] = masked_b[off : off + n] = bytes(n)
    assert masked_a == masked_b
    ops = {p.decision.site.op for p in rw.patches if p.decision.action == "inline"}
    assert {"irq.save_fl", "irq.irq_disable", "irq.irq_enable", "mmu.read_cr2",
            "mmu.pte_val"} <= ops
    out = tmp_path / "vmlinux"
    out.write_bytes(rw.data)
    proc = subprocess.run(["readelf", "-a", "-W", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stderr.strip()
    with pytest.raises(pvpatch.RewriteError, match="refused for linked files"):
        patch(vmlinux, drop=True)


# -- the real modules ---------------------------------------------------------------


@pytest.mark.corpus
def test_corpus_modules(tmp_path: Path) -> None:
    vmlinux = corpus.x86_64_vmlinux()
    assert vmlinux is not None
    modules = corpus.x86_64_pv_modules()
    assert len(modules) > 40
    inlined: set[str] = set()
    for ko in modules:
        rw = patch(ko, ops=f"btf:{vmlinux}")
        out = tmp_path / ko.name
        check_rewrite(ko, rw, out, tmp_path)
        for p in rw.patches:
            d = p.decision
            if d.action == "inline":
                inlined.add(d.site.op or "")
            else:
                assert d.action == "keep" and d.reason, (ko.name, d)
        # a signature would be stale on a changed module; an unchanged one keeps it
        changed = any(p.decision.rewrites for p in rw.patches)
        assert rw.signature_removed == changed
        assert rw.data.endswith(b"~Module signature appended~\n") != changed
    assert {"irq.save_fl", "irq.irq_disable", "irq.irq_enable", "mmu.pte_val"} <= inlined


# -- edge cases found in review ---------------------------------------------------------

C_SPEC = '[ops.31]\naction = "call"\ntarget = "xen_irq_disable"\nconvention = "c"\n'


def with_c_spec(path: Path) -> Rewrite:
    """`path` patched so that irq_disable calls a C function (through a thunk)."""
    res = pvpatch.load(path, ops="none")
    return pvpatch.apply_plan(pvpatch.make_plan(res, parse_spec_text(C_SPEC, res.arch)))


def c_spec_output(src: Path, tmp_path: Path) -> Path:
    """`src` patched with the C spec, written, and checked to link (x86-64)."""
    out = tmp_path / "out.o"
    out.write_bytes(with_c_spec(src).data)
    check_links(out, X86_64, tmp_path, src)
    return out


def readelf(*args: str) -> str:
    return subprocess.run(["readelf", "-W", *args], capture_output=True, text=True,
                          check=True).stdout


def assemble(folder: Path, name: str, text: str, bits: int = 64) -> Path:
    """`text` assembled by GNU as into folder/name.o."""
    src, obj = folder / f"{name}.s", folder / f"{name}.o"
    src.write_text(text)
    subprocess.run(["as", f"--{bits}", "-o", str(obj), str(src)], check=True)
    return obj


def test_llvm_shared_string_table(tmp_path: Path) -> None:
    """LLVM keeps section and symbol names in one .strtab: both kinds of new names land."""
    src = FIX / "x86_64" / "llvm-site.o"
    elf = pvpatch.open_elf(src)
    assert elf.symtab is not None and elf.shstrndx == elf.symtab.link
    out = c_spec_output(src, tmp_path)
    syms = readelf("-s", str(out))
    assert "__raw_callee_save_xen_irq_disable" in syms and " xen_irq_disable" in syms
    sections = readelf("-S", str(out))
    assert ".text.pvpatch" in sections and ".rela.text.pvpatch" in sections


def test_extended_section_numbering(tmp_path: Path) -> None:
    """Over 65280 sections: symbols resolve through .symtab_shndx (SHN_XINDEX)."""
    lines = [f".section .s{i},\"a\"\n.byte {i & 0xFF}" for i in range(65300)]
    site = (FIX / "src" / "llvm-site.s").read_text()
    lines.append(site.replace(".text", '.section .text.late,"ax"', 1))
    src = tmp_path / "many.s"
    src.write_text("\n".join(lines) + "\n")
    obj = tmp_path / "many.o"
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    res = pvpatch.load(obj, ops=CAT["x86_64"])
    assert not res.findings
    assert [(s.section, s.offset, s.op) for s in res.sites] == [
        (".text.late", 0, "irq.irq_disable")]
    rw = pvpatch.apply_plan(pvpatch.make_plan(res, "native"))
    out = tmp_path / "out.o"
    out.write_bytes(rw.data)
    assert pvpatch.load(out, ops=CAT["x86_64"]).sites[0].code == bytes.fromhex("fa0f1f440000")
    subprocess.run(["ld", "-r", "-o", str(tmp_path / "l.o"), str(out)], check=True)
    # Adding sections (thunks) keeps extended numbering right: the count in section 0,
    # the thunk symbol through SHN_XINDEX (tests/test_thunks.py links and runs such files).
    thunked = with_c_spec(obj)
    assert thunked.thunks
    out2 = tmp_path / "thunks.o"
    out2.write_bytes(thunked.data)
    text = readelf("-a", str(out2))
    assert "Warning" not in text and "Error" not in text
    again = pvpatch.open_elf(out2)
    sym = again.symbols_by_name[thunked.thunks[0].spec.symbol]
    assert sym.section_index >= 0xFF00 and again.sections[sym.section_index].name == \
        ".text.pvpatch"
    subprocess.run(["ld", "-r", "-o", str(tmp_path / "l2.o"), str(out2)], check=True)


def _kernel_like(tmp_path: Path, extra: str = "") -> Path:
    """A vmlinux-like layout: text at 0xffffffff81000000, per-CPU data linked at 0."""
    obj = tmp_path / "k.o"
    site = (FIX / "src" / "llvm-site.s").read_text() + \
        ".globl xen_irq_disable\n.type xen_irq_disable,@function\nxen_irq_disable: ret\n" \
        ".section .data..percpu,\"aw\"\n.quad 1\n" + extra + ".data\n.quad 2\n"
    (tmp_path / "k.s").write_text(site)
    subprocess.run(["as", "--64", "-o", str(obj), str(tmp_path / "k.s")], check=True)
    lds = tmp_path / "vm.lds"
    lds.write_text(
        "PHDRS { text PT_LOAD FLAGS(5); percpu PT_LOAD FLAGS(6); data PT_LOAD FLAGS(6); }\n"
        "SECTIONS {\n . = 0xffffffff81000000;\n"
        " .text : AT(0x1000000) { *(.text) } :text\n"
        " .parainstructions : AT(0x1000000 + ADDR(.parainstructions) - 0xffffffff81000000)"
        " { *(.parainstructions) } :text\n"
        " .data..percpu 0 : AT(0x1100000) { *(.data..percpu) } :percpu\n"
        " . = 0xffffffff81200000;\n .data : AT(0x1200000) { *(.data) } :data\n}\n")
    exe = tmp_path / "vm"
    subprocess.run(["ld", "-T", str(lds), "-o", str(exe), str(obj),
                    "--defsym=pv_ops=0xffffffff81200000"], check=True)
    return exe


def test_thunk_segment_follows_physical_layout(tmp_path: Path) -> None:
    """A vmlinux-like layout: the new segment's paddr follows the segment it comes after."""
    exe = _kernel_like(tmp_path)
    res = pvpatch.load(exe, ops="none")
    rw = with_c_spec(exe)
    out = pvpatch.elf.reader.ElfFile(rw.data)
    loads = [s for s in out.segments if s.type == 1]
    new = loads[-1]
    assert new.flags == 5 and new.vaddr > 0xFFFFFFFF81200000
    data_seg = max(loads[:-1], key=lambda s: s.vaddr + s.memsz)
    assert new.vaddr - new.paddr == data_seg.vaddr - data_seg.paddr == 0xFFFFFFFF80000000
    assert out.e_phoff == new.offset and len(out.segments) == len(res.elf.segments) + 1


def test_no_branch_wraps_through_the_top_of_the_address_space(tmp_path: Path) -> None:
    """From kernel text a per-CPU symbol (linked at 8) is 2**64 - 2 GiB away, though the
    distance modulo 2**64 fits a rel32: the call is refused, never wrapped."""
    exe = _kernel_like(tmp_path, ".globl pcpu_var\npcpu_var: .quad 0\n")
    assert pvpatch.open_elf(exe).symbols_by_name["pcpu_var"].value == 8
    res = pvpatch.load(exe, ops=CAT["x86_64"])
    spec = parse_spec_text('[ops."irq.irq_disable"]\naction = "call"\ntarget = "pcpu_var"\n',
                           res.arch)
    with pytest.raises(pvpatch.RewriteError, match="does not fit in 32 bits"):
        pvpatch.apply_plan(pvpatch.make_plan(res, spec))


def test_new_relocation_section_joins_comdat_group(tmp_path: Path) -> None:
    """A site in a COMDAT group section with no relocations yet: the new .rela section
    carries SHF_GROUP and is listed in the group (readelf -g)."""
    obj = assemble(tmp_path, "grp",
        '.section .text.foo,"axG",@progbits,foo,comdat\n.globl foo\n.type foo,@function\n'
        "foo:\n771: .byte 0xff, 0x15, 0, 0, 0, 0\n772:\n"
        '.pushsection .parainstructions,"a"\n.balign 8\n.quad 771b\n.byte 31\n'
        ".byte 772b-771b\n.short 0x1\n.balign 8\n.popsection\nret\n.size foo,.-foo\n")
    out = c_spec_output(obj, tmp_path)
    groups = readelf("-g", str(out))
    assert "contains 2 sections" in groups and ".rela.text.foo" in groups
    flags = readelf("-S", str(out))
    line = next(ln for ln in flags.splitlines() if " .rela.text.foo " in ln)
    assert "G" in line.split()[-4]  # the Flg column


# -- symbol CRCs from a kernel image (--symvers vmlinux) ------------------------------

# struct kernel_symbol over the years, as GNU as lays it out: (arch, entry directives).
# On i386 the 4.19 offsets and the older pointers are both 8 bytes.
_PREL12 = ".long {v} - .\n.long {n} - .\n.long 0\n"
_PREL8 = ".long {v} - .\n.long {n} - .\n"
_KSYMTAB_SHAPES = {
    "x86_64 5.4+ (offsets, namespace)": ("x86_64", _PREL12),
    "x86_64 4.19 (offsets)": ("x86_64", _PREL8),
    "x86_64 before 4.19 (pointers)": ("x86_64", ".quad {v}\n.quad {n}\n"),
    "i386 5.4+ (offsets, namespace)": ("i386", _PREL12),
    "i386 4.19 (offsets)": ("i386", _PREL8),
    "i386 before 4.19 (pointers)": ("i386", ".long {v}\n.long {n}\n"),
}


@pytest.mark.parametrize("shape", sorted(_KSYMTAB_SHAPES))
def test_crcs_from_every_ksymtab_shape(shape: str, tmp_path: Path) -> None:
    from pvpatch.rewrite import modversions
    arch, entry = _KSYMTAB_SHAPES[shape]
    names = {"alpha": 0x11111111, "native_save_fl": 0x9D70541A, "omega": 0xFFFFFFFE}
    src = [".text"] + [f"v_{n}: ret" for n in names] + ['.section __ksymtab_strings,"a"']
    src += [f'n_{n}: .asciz "{n}"' for n in names]
    src += ['.section __ksymtab,"a"'] + [entry.format(v=f"v_{n}", n=f"n_{n}") for n in names]
    src += ['.section __kcrctab,"a"'] + [f".long {crc:#x}" for crc in names.values()]
    (tmp_path / "k.s").write_text("\n".join(src) + "\n")
    obj, image = tmp_path / "k.o", tmp_path / "vmlinux"
    bits = ["--64"] if arch == "x86_64" else ["--32"]
    subprocess.run(["as", *bits, "-o", str(obj), str(tmp_path / "k.s")], check=True)
    emulation = [] if arch == "x86_64" else ["-m", "elf_i386"]
    subprocess.run(["ld", *emulation, "-e", "0", "-o", str(image), str(obj)], check=True)
    assert modversions.read_crcs(image) == names


@pytest.mark.corpus
def test_crcs_from_vmlinux_match_the_modules(arch: str) -> None:
    """Debian's kernel against its own modules: every symbol a module imports has, in its
    __versions, the CRC pvpatch reads from the vmlinux's export tables."""
    from pvpatch.rewrite import modversions
    vmlinux = corpus.x86_64_vmlinux() if arch == "x86_64" else corpus.i386_vmlinux()
    assert vmlinux is not None
    crcs = modversions.read_crcs(vmlinux)
    assert len(crcs) > 9000
    compared = 0
    for ko in corpus.x86_64_modules() if arch == "x86_64" else corpus.i386_modules():
        elf = pvpatch.open_elf(ko)
        sec = elf.section("__versions")
        if sec is None:
            continue
        data = elf.section_data(sec)
        word = elf.arch.ptr_size
        for at in range(0, len(data) - 63, 64):
            name = data[at + word : at + 64].split(b"\0")[0].decode()
            if name in crcs:
                assert crcs[name] == int.from_bytes(data[at : at + 4], "little"), (ko, name)
                compared += 1
    assert compared > 10000


@pytest.mark.corpus
def test_i386_modules_call_native_io_delay(tmp_path: Path) -> None:
    """Every i386 6.1 module site is cpu.io_delay (no native inline form). A spec sends it
    to the exported native_io_delay: each site gets what GNU as writes for the call, the
    module stays linkable, and __versions gains the CRC the kernel's export table holds."""
    from pvpatch.rewrite import modversions
    vmlinux = corpus.i386_vmlinux()
    assert vmlinux is not None
    modules = corpus.i386_pv_modules()
    assert len(modules) > 80
    arch = ARCHES["i386"]
    spec = parse_spec_text(
        '[ops."cpu.io_delay"]\naction = "call"\ntarget = "native_io_delay"\n', arch)
    ref = assemble(tmp_path, "ref", "call native_io_delay\n", bits=32)
    ref_elf = pvpatch.open_elf(ref)
    want_bytes = ref_elf.section_data(ref_elf.section(".text"))  # type: ignore[arg-type]
    ((_off, want_type, _sym),) = readelf_relocs(ref)[".text"]
    crc = modversions.read_crcs(vmlinux)["native_io_delay"]
    calls = 0
    for n, ko in enumerate(modules):
        res = pvpatch.load(ko, ops="catalog:linux-6.1-i386")
        rw = pvpatch.apply_plan(pvpatch.make_plan(res, spec), symvers=vmlinux)
        out = tmp_path / ko.name
        out.write_bytes(rw.data)
        check_links(out, arch, tmp_path, ko)
        relocs = readelf_relocs(out)
        for p in rw.patches:
            site = p.decision.site
            assert p.decision.action == "call", (ko.name, p.decision.reason)
            assert p.after == want_bytes + arch.nop_fill(site.len - len(want_bytes))
            inside = {r for r in relocs[site.section]
                      if site.offset <= r[0] < site.end}
            assert inside == {(site.offset + 1, want_type, "native_io_delay")}
            calls += 1
        versions = pvpatch.open_elf(out).section("__versions")
        if versions is not None:
            data = pvpatch.open_elf(out).section_data(versions)
            entries = {data[at + 4 : at + 64].split(b"\0")[0]: data[at : at + 4]
                       for at in range(0, len(data) - 63, 64)}
            assert entries[b"native_io_delay"] == crc.to_bytes(4, "little")
        if n % 10 == 0:  # the emulator agrees: the calls keep every site's contract
            assert pvpatch.verify_rewrite(rw, trials=4, seed=0, workers=1).ok
    assert calls > 2000


# -- which symbol a spec target binds (an `ld -r` output may define a name twice) -------

TWIN_SPEC = '[ops.31]\naction = "call"\ntarget = "native_thing"\n'


def _symtab_rows(path: Path, name: str) -> list[tuple[int, int, str]]:
    """(index, value, binding) of every symbol called `name` (readelf -s)."""
    rows = []
    for line in readelf("-s", str(path)).splitlines():
        f = line.split()
        if len(f) == 8 and f[7] == name:
            rows.append((int(f[0].rstrip(":")), int(f[1], 16), f[4]))
    return rows


def test_target_binds_the_global_of_an_ld_r_output(tmp_path: Path) -> None:
    """twins-global.o joins a static native_thing and a global one: the call's relocation
    names the global (its symbol index, as readelf shows), and the linked program runs
    into it ("ok"); the static would print "local a" and exit 1."""
    src = FIX / "x86_64" / "twins-global.o"
    rows = _symtab_rows(src, "native_thing")
    assert sorted(r[2] for r in rows) == ["GLOBAL", "LOCAL"]
    want = next(r[0] for r in rows if r[2] == "GLOBAL")
    res = pvpatch.load(src, ops=CAT["x86_64"])
    rw = pvpatch.apply_plan(pvpatch.make_plan(res, parse_spec_text(TWIN_SPEC, res.arch)))
    assert [p.decision.action for p in rw.patches] == ["call"]
    out = tmp_path / "t.o"
    out.write_bytes(rw.data)
    info = next(ln.split() for ln in readelf("-r", str(out)).splitlines()
                if ln.startswith("0000000000000001 "))
    assert info[2] == "R_X86_64_PLT32" and int(info[1], 16) >> 32 == want
    exe = tmp_path / "t"
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-o", str(exe), str(out)],
                   check=True)
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=20)
    assert (ran.returncode, ran.stdout) == (0, "ok\n")


def test_target_binds_the_global_of_a_linked_file(tmp_path: Path) -> None:
    """The same in the linked program: the call goes to the global's address."""
    src = FIX / "x86_64" / "twins-global"
    (glob,) = [r for r in _symtab_rows(src, "native_thing") if r[2] == "GLOBAL"]
    res = pvpatch.load(src, ops=CAT["x86_64"])
    rw = pvpatch.apply_plan(pvpatch.make_plan(res, parse_spec_text(TWIN_SPEC, res.arch)))
    out = tmp_path / "t"
    out.write_bytes(rw.data)
    out.chmod(0o755)
    dis = subprocess.run(["objdump", "-d", "--start-address", hex(res.sites[0].address or 0),
                          "--stop-address", hex((res.sites[0].address or 0) + 5), str(out)],
                         capture_output=True, text=True, check=True).stdout
    assert re.search(rf"\bcall\s+{glob[1]:x} <native_thing>", dis), dis
    ran = subprocess.run([str(out)], capture_output=True, text=True, timeout=20)
    assert (ran.returncode, ran.stdout) == (0, "ok\n")


@pytest.mark.parametrize("name", ["twins.o", "twins"])
def test_ambiguous_target_is_refused(name: str, tmp_path: Path) -> None:
    """Two static native_thing and no global (relocatable and linked): refused in one line
    naming both candidates where readelf says they are; nothing written."""
    src = FIX / "x86_64" / name
    rows = _symtab_rows(src, "native_thing")
    assert [r[2] for r in rows] == ["LOCAL", "LOCAL"]
    spec = tmp_path / "twin.toml"
    spec.write_text(TWIN_SPEC)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pvpatch", "patch", str(src), "-o", str(out),
                           "--backend", str(spec), "--ops", CAT["x86_64"]],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and not out.exists()
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "target native_thing is ambiguous: 2 local definitions" in proc.stderr
    for _index, value, _bind in rows:
        assert f"{value:#x}" in proc.stderr, proc.stderr
    res = pvpatch.load(src, ops=CAT["x86_64"])
    with pytest.raises(pvpatch.SpecError, match="ambiguous"):
        pvpatch.make_plan(res, parse_spec_text(TWIN_SPEC, res.arch))


def test_resolve_target_rules(tmp_path: Path) -> None:
    """The rule itself: one global wins over locals, several globals (possible in a
    hand-made object) are refused, an undefined name is the reference, an unknown None."""
    from pvpatch.plan.targets import resolve_target

    obj = assemble(tmp_path, "g",
        ".text\n.globl a\n.type a,@function\na: ret\n.weak b\n.type b,@function\nb: ret\n"
        "call undefined_one\n")
    elf = pvpatch.open_elf(obj)
    sym = resolve_target(elf, "a")
    assert sym is not None and sym.bind == 1 and sym.defined
    undefined = resolve_target(elf, "undefined_one")
    assert undefined is not None and not undefined.defined
    assert resolve_target(elf, "nothing") is None
    # two globals of one name: ld -r never writes that, a hand-edited symtab may
    data = bytearray(obj.read_bytes())
    symtab = elf.symtab
    assert symtab is not None
    b = elf.symbols_by_name["b"]
    at = symtab.offset + b.index * 24
    a_name = elf.symbols_by_name["a"].name_offset
    data[at : at + 4] = a_name.to_bytes(4, "little")  # b's entry now named a (weak)
    twice = tmp_path / "twice.o"
    twice.write_bytes(bytes(data))
    with pytest.raises(pvpatch.SpecError, match=r"2 global definitions \(\.text\+0x0, "
                                                r"\.text\+0x1\)"):
        resolve_target(pvpatch.open_elf(twice), "a")


# -- --drop-patched: references into the table through its section symbol --------------

# tableref.S: name -> (offset in the table before, after) for the entry size S and pointer
# size P of each architecture; see the source for what each points at.
def _tableref_moves(s: int, p: int) -> dict[str, tuple[int, int]]:
    return {"ref_e0": (0, 0), "ref_e1": (s, 0), "ref_e1_2": (s + 2, 2),
            "ref_e2": (2 * s, s), "ref_e3_t": (3 * s + p, s + p), "ref_end": (4 * s, 2 * s),
            "ref_label": (3 * s, s)}


@pytest.mark.parametrize("arch_name", ["x86_64", "i386"])
def test_drop_patched_moves_section_symbol_references(arch_name: str, tmp_path: Path) -> None:
    """References into .parainstructions from .data and from code (section symbol plus an
    addend, or a label plus one) follow what they point at, as labels do: readelf shows the
    new addends (RELA) or bytes (REL), and once linked each word holds the address of the
    entry it meant (its type byte says which) or the table's new end."""
    arch = ARCHES[arch_name]
    p = arch.ptr_size
    s = 2 * p
    src = FIX / arch_name / "tableref.o"
    rw = patch(src, ops=CAT[arch_name], drop=True)
    assert rw.dropped_entries == 2
    out = tmp_path / "t.o"
    out.write_bytes(rw.data)
    check_links(out, arch, tmp_path, src)
    moves = _tableref_moves(s, p)
    syms = {r[7]: int(r[1], 16) for r in (ln.split() for ln in readelf("-s", str(src))
                                          .splitlines()) if len(r) == 8 and r[6].isdigit()}
    word = "<Q" if p == 8 else "<I"

    def data_words(path: Path) -> dict[str, int]:
        """.data as readelf -x prints it (REL: the implicit addends)."""
        raw = b""
        for ln in readelf("-x", ".data", str(path)).splitlines():
            if m := re.match(r"\s+0x[0-9a-f]+ ((?:[0-9a-f]{8} ?){1,4})", ln):
                raw += bytes.fromhex(m[1].replace(" ", ""))
        return {n: struct.unpack_from(word, raw, syms[n])[0] for n in moves}

    if arch.uses_rela:
        def addends(path: Path) -> dict[int, tuple[str, int]]:
            rows = {}
            for ln in readelf("-r", str(path)).split("'.rela.data'", 1)[1] \
                    .split("\n\n", 1)[0].splitlines()[2:]:
                f = ln.split()
                rows[int(f[0], 16)] = (f[4], int(f[6], 16))
            return rows

        before, after = addends(src), addends(out)
        for n, (old, new) in moves.items():
            sym = "tbl_first" if n == "ref_label" else ".parainstructions"
            assert before[syms[n]] == (sym, old) and after[syms[n]] == (sym, new), n
        assert before[syms["ref_end_pc"]][1] == 4 * s and after[syms["ref_end_pc"]][1] == 2 * s
        text = [ln for ln in readelf("-r", str(out)).splitlines() if ".parainstructions" in ln
                and "R_X86_64_PC32" in ln]
        assert [int(ln.split()[-1], 16) for ln in text[:1]] == [s - 4]  # lea entry 2 -> 3
    else:
        for n, (old, new) in moves.items():
            if n != "ref_label":
                assert data_words(src)[n] == old and data_words(out)[n] == new, n
        assert data_words(src)["ref_label"] == 3 * s and data_words(out)["ref_label"] == s
    # linked: every word points where it meant to, in the shrunk table
    emul = ["-m", "elf_i386"] if arch_name == "i386" else []
    exe = tmp_path / "t"
    subprocess.run(["ld", *emul, "-static", "-e", "_start", "--no-warn-rwx-segments", "-o",
                    str(exe), str(out)], check=True)
    linked = pvpatch.open_elf(exe)
    table = linked.section(".parainstructions")
    assert table is not None and table.size == 2 * s
    entry_types = [linked.section_data(table)[k * s + p] for k in range(2)]
    assert entry_types == [99, 98]  # the kept entries, in order
    lsyms = linked.symbols_by_name
    for n, (_old, new) in moves.items():
        at = linked.addr_to_offset(lsyms[n].value)
        assert at is not None
        assert struct.unpack_from(word, linked.data, at)[0] == table.addr + new, n
    pc = lsyms["ref_end_pc"].value
    at = linked.addr_to_offset(pc)
    assert at is not None
    assert pc + struct.unpack_from("<i", linked.data, at)[0] == table.addr + 2 * s
    # the code's reference: `lea`/`mov` of entry 2, dropped, now entry 3's new place
    dis = subprocess.run(["objdump", "-d", str(exe)], capture_output=True, text=True,
                         check=True).stdout
    target = table.addr + s
    assert re.search(rf"(lea\s+0x[0-9a-f]+\(%rip\),%rax\s+# {target:x}|mov\s+\${target:#x},%eax)",
                     dis), dis
    # and the table still reads as the kept sites
    assert [x.type for x in pvpatch.load(out, ops=CAT[arch_name]).sites] == [99, 98]
