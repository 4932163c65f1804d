"""The `.altinstructions` family (Linux 6.8+ DIRECT_CALL sites), checked against an
independent readelf-based decoder, GNU as, GNU ld and runs of patched programs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import independent_alt as ialt
import pytest
from clirun import pvpatch_cli
from gnu import check_links, gas, readelf_relocs
from paths import FIX

import pvpatch
from pvpatch.arch import ARCHES
from pvpatch.rewrite.stage import Rewrite

CAT612 = {"x86_64": "catalog:linux-6.12-x86_64", "i386": "catalog:linux-6.12-i386"}
NEUTRAL = (117, 1)  # NOT(X86_FEATURE_ALWAYS): an entry the kernel always skips


def prog_catalog(arch: str) -> str:
    return f"catalog:{FIX / 'catalogs' / f'prog68-{arch}.toml'}"


def site_rows(result: pvpatch.ScanResult) -> list[tuple[object, ...]]:
    return [(s.index, s.section, s.offset, s.address, s.len, s.type, s.code.hex(),
             s.native.hex() if s.native is not None else None, s.entry_indices)
            for s in result.sites]


def independent_rows(path: Path) -> list[tuple[object, ...]]:
    return [(s.index, s.section, s.offset, s.address, s.len, s.slot, s.bytes, s.native,
             s.entries) for s in ialt.decode(path).sites]


@pytest.mark.parametrize("name", ["kernel612.o", "prog68"])
def test_scan_matches_independent_decoder(arch: str, name: str) -> None:
    path = FIX / arch / name
    result = pvpatch.load(path, ops="none")
    assert result.table is not None
    assert (result.table.section.name, result.table.family, result.table.layout.name) == \
        (".altinstructions", "altinstructions", "linux-alt-6.3")
    want = independent_rows(path)
    assert len(want) >= 5
    assert site_rows(result) == want
    assert not [f for f in result.findings if f.severity == "error"], result.findings


def test_fixture_has_every_native_form() -> None:
    """kernel612.o carries the kernel's native replacements, as GNU as encodes them."""
    result = pvpatch.load(FIX / "x86_64" / "kernel612.o", ops=CAT612["x86_64"])
    natives = {s.op: s.native for s in result.sites if s.native is not None}
    asm = {"irq.save_fl": "pushfq; popq %rax", "irq.irq_disable": "cli",
           "irq.irq_enable": "sti", "mmu.read_cr2": "mov %cr2, %rax",
           "mmu.read_cr3": "mov %cr3, %rax", "mmu.write_cr3": "mov %rdi, %cr3",
           "cpu.wbinvd": "wbinvd", "mmu.pte_val": "mov %rdi, %rax",
           "mmu.make_pte": "mov %rdi, %rax", "lock.queued_spin_unlock": "movb $0, (%rdi)",
           "lock.vcpu_is_preempted": "xor %rax, %rax"}
    assert natives == {op: gas("x86_64", text) for op, text in asm.items()}
    # ops without an ALTERNATIVE_2 have a single DIRECT_CALL entry
    plain = {s.op for s in result.sites if s.native is None}
    assert plain == {"cpu.io_delay", "mmu.flush_tlb_user", "irq.safe_halt"}


def test_contract_comes_from_the_op_type(arch: str) -> None:
    """No mask in the table: callee-save ops allow only the return register(s)."""
    result = pvpatch.load(FIX / arch / "kernel612.o", ops=CAT612[arch])
    regs = {s.op: s.clobber_regs for s in result.sites}
    a = ARCHES[arch]
    c_convention = {*a.return_regs, *a.caller_saved}
    if arch == "x86_64":
        assert regs["irq.save_fl"] == ("rax",)
        assert regs["mmu.pte_val"] == ("rax",)
        assert set(regs["mmu.write_cr3"]) == c_convention
    else:
        assert regs["lock.queued_spin_unlock"] == ("eax", "edx")
    assert set(regs["cpu.io_delay"]) == c_convention
    # without op names every site is held to the strictest contract
    bare = pvpatch.load(FIX / arch / "kernel612.o", ops="none")
    assert {s.clobber_regs for s in bare.sites} == {regs["lock.queued_spin_unlock"]}


def table_entries(path: Path) -> list[ialt.Entry]:
    return ialt.decode(path).entries


def check_alt_rewrite(src: Path, rw: Rewrite, out: Path, tmp: Path) -> None:
    """Each rewritten site holds the file's native bytes then GNU as's NOPs, no relocation is
    left inside it, every entry at it is one the kernel skips, and nothing else changed."""
    arch = rw.plan.arch
    out.write_bytes(rw.data)
    check_links(out, arch, tmp, src)
    before, after = table_entries(src), table_entries(out)
    assert len(before) == len(after)
    rewritten = {d.site.index: d for d in rw.plan.decisions if d.rewrites}
    silenced = {j for d in rewritten.values() for j in d.site.entry_indices}
    for e0, e1 in zip(before, after, strict=True):
        if e0.index in silenced:
            assert (e1.cpuid, e1.flags) == NEUTRAL, e1
            assert (e1.section, e1.offset, e1.instrlen, e1.repllen) == \
                (e0.section, e0.offset, e0.instrlen, e0.repllen)
        else:
            assert e1 == e0
    orig = {s.index: s for s in ialt.decode(src).sites}
    rel_after = readelf_relocs(out)
    spans: dict[str, list[tuple[int, int]]] = {}
    for index, d in rewritten.items():
        s = d.site
        spans.setdefault(s.section, []).append((s.offset, s.end))
        want_native = orig[index].native
        if d.action == "inline" and want_native is not None:
            native = bytes.fromhex(want_native)
            pad = s.len - len(native)
            want = native + (gas(arch.name, f".nops {pad}") if pad else b"")
            got = next(p.after for p in rw.patches if p.decision.site.index == index)
            assert got == want, (s.section, hex(s.offset), got.hex(), want.hex())
        assert not any(s.offset <= r[0] < s.end for r in rel_after.get(s.section, ())), \
            f"relocation left inside {s.section}+{s.offset:#x}"
    # every other byte of every section is as it was (the table checked above)
    from elftools.elf.elffile import ELFFile

    with src.open("rb") as f1, out.open("rb") as f2:
        e1, e2 = ELFFile(f1), ELFFile(f2)
        for sec in e1.iter_sections():
            if sec.name.startswith((".rel", ".altinstructions")) or sec.header.sh_type == \
                    "SHT_NOBITS":
                continue
            a = bytes(sec.data())
            other = e2.get_section_by_name(sec.name)
            assert other is not None
            b = bytes(other.data())
            for lo, hi in spans.get(sec.name, []):
                a, b = a[:lo] + bytes(hi - lo) + a[hi:], b[:lo] + bytes(hi - lo) + b[hi:]
            assert a == b, f"section {sec.name} changed outside the sites"


def test_native_patch(arch: str, tmp_path: Path) -> None:
    src = FIX / arch / "kernel612.o"
    result = pvpatch.load(src, ops=CAT612[arch])
    rw = pvpatch.apply_plan(pvpatch.make_plan(result))
    counts = rw.plan.counts()
    with_native = sum(1 for s in result.sites if s.native is not None)
    assert counts["inline"] == with_native >= 2
    assert rw.neutralised_entries == 2 * with_native
    out = tmp_path / "k.o"
    check_alt_rewrite(src, rw, out, tmp_path)
    report = pvpatch.verify_rewrite(rw)
    assert report.ok and report.summary["pass"] == with_native, report.failures
    # the same run again gives the same bytes; the output has nothing left to do
    assert pvpatch.apply_plan(pvpatch.make_plan(pvpatch.load(src, ops=CAT612[arch]))).data \
        == rw.data
    again = pvpatch.load(out, ops=CAT612[arch])
    assert again.table is not None and again.table.family == "altinstructions"
    assert {s.index for s in again.sites} == {s.index for s in result.sites
                                             if s.native is None}
    assert not pvpatch.apply_plan(pvpatch.make_plan(again)).changed


def test_drop_patched_removes_entries_and_their_relocations(arch: str, tmp_path: Path) -> None:
    src = FIX / arch / "kernel612.o"
    plan = pvpatch.make_plan(pvpatch.load(src, ops=CAT612[arch]), drop_patched=True)
    rw = pvpatch.apply_plan(plan)
    silenced = {j for d in plan.decisions if d.rewrites for j in d.site.entry_indices}
    assert rw.dropped_entries == len(silenced) > 0 and rw.neutralised_entries == 0
    out = tmp_path / "k.o"
    out.write_bytes(rw.data)
    check_links(out, plan.arch, tmp_path, src)
    before, after = ialt.decode(src), ialt.decode(out)
    kept = [e for e in before.entries if e.index not in silenced]
    assert [(e.section, e.offset, e.cpuid, e.flags, e.instrlen, e.repllen)
            for e in after.entries] == \
        [(e.section, e.offset, e.cpuid, e.flags, e.instrlen, e.repllen) for e in kept]
    rels = readelf_relocs(out)[".altinstructions"]  # keyed by the name after ".rel[a]"
    assert len(rels) == 2 * len(kept)
    assert [s.offset for s in after.sites] == [s.offset for s in before.sites
                                               if s.index not in silenced]


def test_prog68_runs_patched(arch: str, tmp_path: Path) -> None:
    """A 6.8+-style program: callee-save sites reach C functions only through thunks."""
    src = FIX / arch / "prog68"
    assert subprocess.run([str(src)], capture_output=True).returncode == 1
    out = tmp_path / "prog68"
    proc = pvpatch_cli("patch", str(src), "-o", str(out), "--ops", prog_catalog(arch),
                       "--backend", str(FIX / "specs" / "prog.toml"), "--json")
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(out)], capture_output=True, text=True)
    assert (run.returncode, run.stdout.strip()) == (0, "ok"), run.stdout + run.stderr
    entries = table_entries(out)
    assert entries and all((e.cpuid, e.flags) == NEUTRAL for e in entries)


def test_keep_everything_changes_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "keep.toml"
    spec.write_text('[defaults]\naction = "keep"\nreason = "test"\n')
    src = FIX / "x86_64" / "kernel612.o"
    backend = pvpatch.load_backend(str(spec), pvpatch.open_elf(src))
    rw = pvpatch.apply_plan(pvpatch.make_plan(pvpatch.load(src, ops="none"), backend))
    assert not rw.changed and rw.data == src.read_bytes()


def test_scan_cli_json_names_the_family() -> None:
    import json

    proc = pvpatch_cli("scan", "--json", "--ops", CAT612["x86_64"],
                       str(FIX / "x86_64" / "kernel612.o"))
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)["files"][0]
    assert rec["table"] == {"section": ".altinstructions", "family": "altinstructions",
                           "layout": "linux-alt-6.3", "entry_size": 14,
                           "count": len(table_entries(FIX / "x86_64" / "kernel612.o"))}
    save_fl = next(s for s in rec["sites"] if s["op"] == "irq.save_fl")
    assert save_fl["native"] == "9c58" and save_fl["type"] == 30 and save_fl["len"] == 6
    assert save_fl["clobbers"] == 1 and save_fl["clobber_regs"] == ["rax"]
    assert len(save_fl["entries"]) == 2


# -- the real 6.12 corpus ------------------------------------------------------------


def _differences(a: bytes, b: bytes) -> list[int]:
    """File offsets where `a` and `b` differ (same length)."""
    assert len(a) == len(b)
    out: list[int] = []
    block = 1 << 16
    for base in range(0, len(a), block):
        x, y = a[base : base + block], b[base : base + block]
        if x != y:
            out += [base + i for i in range(len(x)) if x[i] != y[i]]
    return out


@pytest.mark.corpus
def test_612_vmlinux_scan_matches_independent_decoder() -> None:
    import corpus

    path = corpus.x86_64_612_vmlinux()
    result = pvpatch.load(path)  # auto: the image's own BTF names the ops
    assert result.ops is not None and result.ops.name == f"btf:{path}"
    assert result.table is not None and result.table.family == "altinstructions"
    assert site_rows(result) == independent_rows(path)
    assert all(s.op is not None for s in result.sites)
    assert not result.findings
    want = corpus.expected("x86_64-6.12", "VMLINUX_SITES")
    native = corpus.expected("x86_64-6.12", "VMLINUX_NATIVE_SITES")
    if want is not None:
        assert len(result.sites) == want
        assert sum(1 for s in result.sites if s.native is not None) == native


@pytest.mark.corpus
def test_612_vmlinux_native_patch_changes_only_sites_and_entries(tmp_path: Path) -> None:
    """Every site with a native form holds exactly the kernel's bytes then NOPs, every entry
    at it tests NOT(X86_FEATURE_ALWAYS), and no other byte of the image changed."""
    import corpus

    path = corpus.x86_64_612_vmlinux()
    rw = pvpatch.apply_plan(pvpatch.make_plan(pvpatch.load(path)))
    out = tmp_path / "vmlinux"
    pvpatch.write_output(rw, out)
    original, patched = path.read_bytes(), out.read_bytes()
    decoded = ialt.decode(path)
    table = decoded.table
    assert table is not None
    offsets = {x.name: x.offset for x in ialt.ind.sections(path)}
    allowed: set[int] = set()
    rewritten = 0
    for s in decoded.sites:
        at = offsets[s.section] + s.offset
        got = patched[at : at + s.len]
        if s.native is None:
            assert got == original[at : at + s.len]  # no native form: the call stays
            continue
        native = bytes.fromhex(s.native)
        pad = s.len - len(native)
        assert got == native + (gas("x86_64", f".nops {pad}") if pad else b""), hex(at)
        allowed.update(range(at, at + s.len))
        for j in s.entries:
            ft = table.offset + j * ialt.STRIDE + 8
            assert patched[ft : ft + 4] == (117 | 1 << 16).to_bytes(4, "little")
            allowed.update(range(ft, ft + 4))
        rewritten += 1
    assert rewritten == rw.plan.counts()["inline"] >= 2500
    stray = [hex(o) for o in _differences(original, patched) if o not in allowed]
    assert not stray, stray[:20]


def _ko_xz_rows(path: Path, scratch: Path) -> tuple[Path, list[tuple[object, ...]],
                                                    list[tuple[object, ...]], list[str]]:
    """One module: the independent decoder's rows on the payload Python's lzma gives, and
    pvpatch's rows and errors read straight from the .ko.xz."""
    import lzma

    payload = lzma.decompress(path.read_bytes())
    want: list[tuple[object, ...]] = []
    if b".altinstructions" in payload:
        plain = scratch / path.name.removesuffix(".xz")
        plain.write_bytes(payload)
        want = independent_rows(plain)
        plain.unlink()
    result = pvpatch.load(path, ops="none")
    errors = [f.message for f in result.findings if f.severity == "error"]
    return path, want, site_rows(result), errors


@pytest.mark.corpus
def test_612_modules_read_from_ko_xz_match_independent_decoder(tmp_path: Path) -> None:
    """Every 6.12 module, read straight from its .ko.xz, against the independent decoder
    run on the payload that Python's lzma (not pvpatch) gives (1,138 modules: on every
    core)."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    import corpus

    modules = sites = natives = 0
    paths = list(corpus.x86_64_612_modules())
    with ProcessPoolExecutor() as pool:
        done = list(pool.map(partial(_ko_xz_rows, scratch=tmp_path), paths, chunksize=16))
    assert len(done) == len(paths)
    for path, want, got, errors in done:
        assert got == want, path
        assert not errors, (path, errors)
        if want:
            modules += 1
            sites += len(want)
            natives += sum(1 for row in want if row[7] is not None)
    expect = [corpus.expected("x86_64-6.12", k) for k in ("MODULES", "SITES", "NATIVE_SITES")]
    if None not in expect:
        assert [modules, sites, natives] == expect
    assert modules >= 50 and sites >= 500


@pytest.mark.corpus
def test_612_modules_are_named_by_their_vermagic() -> None:
    import corpus

    kvm = next(p for p in corpus.x86_64_612_modules() if p.name == "kvm.ko.xz")
    result = pvpatch.load(kvm)  # auto: vermagic 6.12.x -> the shipped linux-6.12 catalog
    assert result.ops is not None and result.ops.name == "catalog:linux-6.12-x86_64"
    assert all(s.op is not None for s in result.sites)
    # the shipped catalog is the vmlinux's own BTF, slot for slot
    btf = pvpatch.load(corpus.x86_64_612_vmlinux()).ops
    assert btf is not None and btf.same_layout(result.ops)


@pytest.mark.corpus
def test_612_check_over_the_compressed_tree() -> None:
    """`check` walks Debian's 6.12 module tree as shipped (.ko.xz), exits 0 and counts every
    DIRECT_CALL site."""
    import json

    import corpus

    kind = "x86_64-6.12"
    tree = corpus.ensure(kind) / "lib" / "modules" / corpus.release(kind)
    proc = pvpatch_cli("check", "--json", str(tree))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)["summary"]
    assert summary["findings"]["error"] == 0
    assert summary["files"] == len(corpus.x86_64_612_modules())
    want = corpus.expected(kind, "SITES")
    assert summary["sites"] == (want if want is not None else summary["sites"]) >= 500
    native = corpus.expected(kind, "NATIVE_SITES")
    if native is not None:
        assert summary["actions"]["inline"] == native
