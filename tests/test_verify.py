"""The emulation verifier: correct rewrites pass, and each kind of corruption fails,
naming the site (it is not a rubber stamp)."""

from __future__ import annotations

import dataclasses
import struct
import subprocess
import sys
from pathlib import Path

import corpus
import pytest
from paths import FIX, REPO

from pvpatch import api
from pvpatch.elf.reader import SHT_REL, SHT_RELA, ElfFile
from pvpatch.errors import VerifyError
from pvpatch.rewrite.stage import Rewrite
from pvpatch.verify import (
    VerifyReport,
    reference_models,
    report_failures,
    verify_files,
    verify_findings,
    verify_json,
    verify_rewrite,
    verify_text,
)

OPS = {"x86_64": "catalog:linux-6.1-x86_64",
       "i386": f"catalog:{FIX / 'catalogs' / 'fixtures-i386.toml'}"}

# prog.c's own pv_ops functions (fixtures/src/prog.c): plain C that clobbers every
# caller-saved register, so callee-save sites need thunks.
PROG_SPEC = """
[ops.29]
action = "call"
target = "prog_restore_fl"
[ops.30]
action = "call"
target = "prog_save_fl"
[ops.31]
action = "call"
target = "prog_irq_disable"
[ops.32]
action = "call"
target = "prog_irq_enable"
[ops.44]
action = "call"
target = "prog_read_cr3"
[ops.45]
action = "call"
target = "prog_write_cr3"
"""


@pytest.fixture
def prog_spec(tmp_path: Path) -> str:
    path = tmp_path / "prog-spec.toml"
    path.write_text(PROG_SPEC)
    return str(path)


def rewrite(arch: str, name: str, backend: str = "native", ops: str | None = None,
            drop_patched: bool = False) -> Rewrite:
    res = api.load(FIX / arch / name, ops=ops or OPS[arch])
    return api.apply_plan(api.make_plan(res, backend, drop_patched=drop_patched))


def failing(report: VerifyReport) -> tuple[set[int], set[str]]:
    return ({v.index for v in report.sites if v.status == "fail"},
            {t.symbol for t in report.thunks if t.status == "fail"})


def with_bytes(rw: Rewrite, section: str, offset: int, new: bytes,
               expect: bytes | None = None) -> Rewrite:
    """`rw` with `new` written at section+offset of the patched file."""
    elf = ElfFile(rw.data)
    sec = elf.section(section)
    assert sec is not None
    data = bytearray(rw.data)
    at = sec.offset + offset
    if expect is not None:
        assert data[at : at + len(expect)] == expect
    data[at : at + len(new)] = new
    return replaced(rw, bytes(data))


def replaced(rw: Rewrite, data: bytes) -> Rewrite:
    """`rw` with other output bytes."""
    if any(f.name == "image" for f in dataclasses.fields(rw)):
        return dataclasses.replace(rw, image=data, edits=())
    return dataclasses.replace(rw, data=data)  # type: ignore[call-arg,unused-ignore]


def site_after(rw: Rewrite, index: int) -> tuple[str, int, bytes]:
    for p in rw.patches:
        if p.decision.site.index == index:
            return p.decision.site.section, p.decision.site.offset, p.after
    raise AssertionError(f"no site {index}")


def thunk_where(rw: Rewrite, target: str) -> tuple[int, bytes]:
    """File offset and bytes of the thunk that calls `target` (relocatable output)."""
    t = next(t for t in rw.thunks if t.spec.target == target)
    sec = ElfFile(rw.data).section(t.section)
    assert sec is not None
    at = sec.offset + t.offset
    return at, rw.data[at : at + t.size]


# -- uncorrupted files pass ------------------------------------------------------------


@pytest.mark.parametrize("arch,name", [
    ("x86_64", "kernel61.o"), ("x86_64", "seed.o"), ("x86_64", "legacy.o"),
    ("x86_64", "prog.o"), ("x86_64", "prog"), ("x86_64", "prog-pie"), ("x86_64", "prog-sse"),
    ("i386", "kernel61.o"), ("i386", "seed.o"), ("i386", "prog.o"), ("i386", "prog"),
    ("i386", "prog-pie"),
])
def test_native_fixtures_pass(arch: str, name: str) -> None:
    rw = rewrite(arch, name)
    report = verify_rewrite(rw)
    assert report.ok, report
    verified = [p for p in rw.patches if p.decision.rewrites]
    assert len(report.sites) == len(verified) > 0
    # Every native inline op of the fixtures has a reference model: real equivalence.
    assert all(v.status == "pass" and v.reason is None for v in report.sites), report
    assert all(v.trials == 16 for v in report.sites)


@pytest.mark.parametrize("name", ["prog.o", "prog", "prog-pie"])
def test_spec_with_thunks_passes(arch: str, name: str, prog_spec: str) -> None:
    rw = rewrite(arch, name, prog_spec, ops="none")
    actions = sorted(p.decision.action for p in rw.patches)
    assert actions == ["call", "call", "thunk", "thunk", "thunk", "thunk"]
    report = verify_rewrite(rw)
    assert report.ok, report
    assert report.summary == {"pass": 6, "fail": 0, "skip": 0}
    assert report.thunk_summary == {"pass": 4, "fail": 0, "skip": 0}
    # The targets are in the file: results are compared, not only the contract.
    assert all(v.reason is None for v in report.sites)


def test_prog_sse_thunks_align_the_stack(prog_spec: str) -> None:
    report = verify_rewrite(rewrite("x86_64", "prog-sse", prog_spec, ops="none"))
    assert report.ok and len(report.thunks) == 4


def test_target_not_in_file_is_contract_only(tmp_path: Path) -> None:
    spec = tmp_path / "xen.toml"
    spec.write_text('[ops."irq.irq_disable"]\naction = "call"\ntarget = "xen_irq_disable"\n'
                    '[ops."irq.irq_enable"]\naction = "call"\ntarget = "xen_irq_enable"\n'
                    'convention = "callee-save"\n')
    rw = rewrite("x86_64", "kernel61.o", str(spec))
    report = verify_rewrite(rw)
    assert report.ok
    assert {v.reason for v in report.sites} == {"contract only: target not in file"}
    assert {v.action for v in report.sites} == {"thunk", "call"}
    assert [t.status for t in report.thunks] == ["pass"]


def test_tail_and_trap_sites_are_skipped_and_fail_unless_allowed(tmp_path: Path) -> None:
    spec = tmp_path / "tail.toml"
    spec.write_text('arch = "x86_64"\n[ops."irq.irq_disable"]\naction = "inline"\n'
                    'bytes = "48cf"\nclobbers = []\ntail = true\n'
                    '[ops."irq.irq_enable"]\naction = "ud2"\n')
    rw = rewrite("x86_64", "kernel61.o", str(spec))
    report = verify_rewrite(rw)
    assert report.sites and all(v.status == "skip" for v in report.sites)
    assert {v.reason for v in report.sites} == {"tail: control does not return to the site",
                                                 "ud2: the site traps by design"}
    # A skip proves nothing: it fails verification ...
    assert not report.ok and report.failures == report.sites == report.unproven
    doc = verify_json(report)
    assert doc["ok"] is False and doc["allow_skip"] is False
    assert [u["site"] for u in doc["unproven"]] == [v.index for v in report.sites]
    assert all(u["status"] == "skip" and u["reason"] and not u["allowed"]
               for u in doc["unproven"])
    assert "a failure without --allow-skip" in "\n".join(verify_text(report))
    # ... unless the caller allows it; the sites are still listed as not proven.
    allowed = verify_rewrite(rw, allow_skip=True)
    assert allowed.ok and not allowed.failures and allowed.unproven == allowed.sites
    assert all(u["allowed"] for u in verify_json(allowed)["unproven"])
    assert report_failures(allowed) is None and report_failures(report) is not None


def test_reproducible_and_json() -> None:
    rw = with_bytes(rewrite("x86_64", "kernel61.o"), ".text", 0x9, b"\xfb", b"\xfa")
    a, b = verify_rewrite(rw, seed=7), verify_rewrite(rw, seed=7)
    assert a == b
    doc = verify_json(a)
    assert doc["summary"] == a.summary and doc["ok"] is False
    bad = [s for s in doc["sites"] if s["status"] == "fail"]
    assert [s["index"] for s in bad] == [1] and bad[0]["seed"] is not None
    assert set(doc["sites"][0]) >= {"index", "section", "offset", "address", "op", "action",
                                    "status", "reason", "trials"}


def test_verify_files_with_dropped_entries(tmp_path: Path) -> None:
    rw = rewrite("x86_64", "kernel61.o", drop_patched=True)
    assert rw.dropped_entries
    original = api.load(FIX / "x86_64" / "kernel61.o", ops=OPS["x86_64"])
    plan = api.make_plan(original, "native")
    report = verify_files(original, ElfFile(rw.data, "patched.o"), plan)
    assert report.ok and len(report.sites) == rw.dropped_entries


def test_verify_files_linked_thunks(prog_spec: str) -> None:
    rw = rewrite("x86_64", "prog", prog_spec, ops="none")
    original = api.load(FIX / "x86_64" / "prog", ops="none")
    report = verify_files(original, ElfFile(rw.data), api.make_plan(original, prog_spec))
    assert report.ok and len(report.thunks) == 4
    assert {t.address for t in rw.thunks} == {t.address for t in report.thunks}


def test_verify_files_refuses_another_arch() -> None:
    original = api.load(FIX / "x86_64" / "kernel61.o", ops=OPS["x86_64"])
    other = ElfFile.open(FIX / "i386" / "kernel61.o")
    with pytest.raises(VerifyError):
        verify_files(original, other, api.make_plan(original, "native"))


def test_unicorn_is_imported_lazily() -> None:
    code = ("import sys, pvpatch.verify, pvpatch.verify.machine, pvpatch.cli; "
            "sys.exit('unicorn' in sys.modules or 'capstone' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_reference_models_assemble() -> None:
    from pvpatch.arch import ARCHES
    from pvpatch.plan.backend import assemble

    for arch in ("x86_64", "i386"):
        text = (REPO / "pvpatch" / "data" / "reference" / f"{arch}.toml").read_text()
        import tomllib

        for name, body in tomllib.loads(text)["ops"].items():
            if "asm" in body:
                assert assemble(body["asm"], ARCHES[arch]) == bytes.fromhex(body["bytes"]), name
        assert reference_models(arch)["irq.irq_disable"].code == b"\xfa\xc3"


# -- corruptions: each fails, and names the right site ---------------------------------


def test_sti_instead_of_cli(arch: str) -> None:
    rw = rewrite(arch, "kernel61.o")
    section, offset, after = site_after(rw, 1)
    assert after[0] == 0xFA
    report = verify_rewrite(with_bytes(rw, section, offset, b"\xfb", b"\xfa"))
    assert failing(report) == ({1}, set())
    bad = report.sites[[v.index for v in report.sites].index(1)]
    assert bad.reason is not None and bad.reason.startswith("IF:")
    assert any("sti" in d for d in bad.detail) and any("call" in d for d in bad.detail)


def test_save_fl_into_rcx() -> None:
    rw = rewrite("x86_64", "kernel61.o")
    section, offset, after = site_after(rw, 0)
    assert after[:2] == b"\x9c\x58"
    report = verify_rewrite(with_bytes(rw, section, offset, b"\x9c\x59"))
    assert failing(report) == ({0}, set())
    bad = report.sites[0]
    assert bad.reason is not None and bad.reason.startswith("rcx:")
    assert any(d.startswith("rax:") and "(result)" in d for d in bad.detail)


def test_thunk_missing_a_push(prog_spec: str) -> None:
    rw = rewrite("x86_64", "prog.o", prog_spec, ops="none")
    at, code = thunk_where(rw, "prog_irq_disable")
    assert code[0] == 0x51  # push %rcx
    data = bytearray(rw.data)
    data[at] = 0x90
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert failing(report) == ({0}, {"__raw_callee_save_prog_irq_disable"})


def test_thunk_restores_two_registers_swapped(arch: str, prog_spec: str) -> None:
    rw = rewrite(arch, "prog.o", prog_spec, ops="none")
    at, code = thunk_where(rw, "prog_save_fl")
    pops = code.rindex(b"\x5a\x59")  # pop %rdx; pop %rcx
    data = bytearray(rw.data)
    data[at + pops : at + pops + 2] = b"\x59\x5a"
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert failing(report) == ({2}, {"__raw_callee_save_prog_save_fl"})  # site 2: save_fl
    thunk = next(t for t in report.thunks if t.status == "fail")
    assert thunk.reason is not None and "saved by the thunk" in thunk.reason


def _rela_records(elf: ElfFile, target: str) -> tuple[int, list[list[int]]]:
    sec = next(s for s in elf.sections
               if s.type in (SHT_RELA, SHT_REL) and elf.sections[s.info].name == target)
    fmt = elf.cls.rela if sec.type == SHT_RELA else elf.cls.rel
    rows = [list(r) for r in fmt.iter_unpack(elf.section_data(sec))]
    return sec.offset, rows


def test_stale_relocation_inside_a_rewritten_site() -> None:
    rw = rewrite("x86_64", "kernel61.o")
    elf = ElfFile(rw.data)
    at, rows = _rela_records(elf, ".text")
    fmt = elf.cls.rela
    assert not any(0x9 <= r[0] < 0xF for r in rows)  # the rewriter removed site 1's
    # Re-add it, in place of the relocation of a kept site (10, cpu.io_delay at 0x110):
    # R_X86_64_PC32 pv_ops + 31*8 - 4 at site 1 + 2.
    k = next(i for i, r in enumerate(rows) if r[0] == 0x112)
    sym, _type = elf.cls.split_info(rows[k][1])
    data = bytearray(rw.data)
    fmt.pack_into(data, at + k * fmt.size, 0xB, elf.cls.r_info(sym, 2), 31 * 8 - 4)
    report = verify_rewrite(replaced(rw, bytes(data)))
    # Site 1 runs its stale relocation; kept site 10 lost the relocation of its call,
    # which nothing in the plan explains.
    assert failing(report) == ({1, 10}, set())
    kept = next(v for v in report.sites if v.index == 10)
    assert kept.reason is not None and "the plan keeps it" in kept.reason


def test_stale_dynamic_relocation_in_a_pie() -> None:
    # i386 PIE sites carry R_386_RELATIVE at site+2; the rewriter turns them into NONE.
    rw = rewrite("i386", "prog-pie")
    elf = ElfFile(rw.data)
    sec = elf.section(".rel.dyn")
    assert sec is not None
    site0 = next(p.decision.site for p in rw.patches if p.decision.site.index == 0)
    assert site0.address is not None
    data = bytearray(rw.data)
    for k, (off, info) in enumerate(elf.cls.rel.iter_unpack(elf.section_data(sec))):
        if off == site0.address + 2:
            assert info == 0
            elf.cls.rel.pack_into(data, sec.offset + k * elf.cls.rel.size, off, 8)
            break
    else:
        raise AssertionError("no neutralised relocation at site 0")
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert failing(report) == ({0}, set())


def test_nop_padding_one_byte_short() -> None:
    rw = rewrite("x86_64", "kernel61.o")
    section, offset, after = site_after(rw, 1)
    assert after == bytes.fromhex("fa0f1f440000")
    # cli; nop; then a 5-byte nop that starts one byte late and straddles the end
    report = verify_rewrite(with_bytes(rw, section, offset, bytes.fromhex("fa900f1f4400")))
    assert failing(report) == ({1}, set())
    assert report.sites[1].reason == "an instruction straddles the site end"


def test_call_displacement_off_by_one_linked(prog_spec: str) -> None:
    rw = rewrite("x86_64", "prog", prog_spec, ops="none")
    section, offset, after = site_after(rw, 3)  # restore_fl, through its thunk
    assert after[0] == 0xE8
    disp = struct.unpack_from("<i", after, 1)[0] + 1
    bad = after[:1] + struct.pack("<i", disp) + after[5:]
    report = verify_rewrite(with_bytes(rw, section, offset, bad, after))
    assert failing(report) == ({3}, set())


def test_call_displacement_off_by_one_relocatable(prog_spec: str) -> None:
    rw = rewrite("x86_64", "prog.o", prog_spec, ops="none")
    site = next(p.decision.site for p in rw.patches if p.decision.site.index == 4)
    elf = ElfFile(rw.data)
    at, rows = _rela_records(elf, ".text")
    k = next(i for i, r in enumerate(rows) if r[0] == site.offset + 1)
    assert rows[k][2] == -4
    data = bytearray(rw.data)
    elf.cls.rela.pack_into(data, at + k * elf.cls.rela.size, rows[k][0], rows[k][1], -3)
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert failing(report) == ({4}, set())


def test_inline_changes_a_register_outside_the_mask() -> None:
    rw = rewrite("x86_64", "kernel61.o")
    section, offset, after = site_after(rw, 6)  # mmu.pte_val, clobbers rax only
    assert after == bytes.fromhex("4889f80f1f00")
    report = verify_rewrite(with_bytes(rw, section, offset, bytes.fromhex("4889f84889c1")))
    assert failing(report) == ({6}, set())
    bad = next(v for v in report.sites if v.index == 6)
    assert bad.reason is not None and bad.reason.startswith("rcx:")


def test_wrong_backend_entry_does_not_agree_with_itself(tmp_path: Path) -> None:
    # A spec that inlines read_cr3 for read_cr2: the reference model disagrees.
    spec = tmp_path / "wrong.toml"
    spec.write_text('arch = "x86_64"\n[ops."mmu.read_cr2"]\naction = "inline"\n'
                    'bytes = "0f20d8"\nclobbers = ["rax"]\n')
    report = verify_rewrite(rewrite("x86_64", "kernel61.o", str(spec)))
    assert failing(report) == ({3, 19}, set())


# -- every difference is accounted for ---------------------------------------------------

CAT68 = {a: f"catalog:{FIX / 'catalogs' / f'prog68-{a}.toml'}" for a in ("x86_64", "i386")}
CAT612 = {"x86_64": "catalog:linux-6.12-x86_64", "i386": "catalog:linux-6.12-i386"}
SPEC = str(FIX / "specs" / "prog.toml")


def as_cli(arch: str, name: str, data: bytes, backend: str = "native", ops: str | None = None,
           **kw: bool) -> VerifyReport:
    """What `pvpatch verify ORIGINAL PATCHED` does: the plan re-made from the original."""
    original = api.load(FIX / arch / name, ops=ops or OPS[arch])
    return verify_files(original, ElfFile(data, "patched"), api.make_plan(original, backend),
                        **kw)


def outside_sites(rw: Rewrite, section: str) -> int:
    """An offset of `section` no site covers, holding a non-zero byte."""
    sites = [p.decision.site for p in rw.patches if p.decision.site.section == section]
    sec = ElfFile(rw.data).section(section)
    assert sec is not None
    data = rw.data[sec.offset : sec.offset + sec.size]
    return next(o for o in range(sec.size)
                if data[o] and not any(s.offset <= o < s.end for s in sites))


def unaccounted(report: VerifyReport) -> list[tuple[str | None, int | None, str]]:
    return [(d.section, d.offset, d.what) for d in report.unaccounted]


# Every fixture as `patch` writes it: the sites proven, every other byte accounted for.
CORRECT = [
    ("x86_64", "kernel61.o", "native", None, False),
    ("x86_64", "kernel61.o", "native", None, True),
    ("i386", "kernel61.o", "native", None, False),
    ("i386", "kernel61.o", "native", None, True),
    ("x86_64", "kernel612.o", "native", CAT612["x86_64"], False),
    ("x86_64", "kernel612.o", "native", CAT612["x86_64"], True),
    ("i386", "kernel612.o", "native", CAT612["i386"], False),
    ("i386", "kernel612.o", "native", CAT612["i386"], True),
    ("x86_64", "seed.o", "native", None, False),
    ("i386", "seed.o", "native", None, False),
    ("x86_64", "seed.o", "native", CAT68["x86_64"], True),  # restore_fl too
    ("i386", "seed.o", "native", CAT68["i386"], True),
    ("x86_64", "legacy.o", "native", None, False),
    ("x86_64", "prog.o", SPEC, "none", False),  # thunks, their relocations and symbols
    ("i386", "prog.o", SPEC, "none", True),
    *((a, n, SPEC, "none", False) for a in ("x86_64", "i386")
      for n in ("prog", "prog-pie", "libprog.so", "prog68")),  # thunks in a new PT_LOAD
    *((a, n, "native", CAT68[a], False) for a in ("x86_64", "i386")
      for n in ("prog", "prog-pie", "libprog.so", "prog68")),  # restore_fl inline
    ("x86_64", "prog-sse", SPEC, "none", False),
    # linked, return thunks: each thunk ends in jmp __x86_return_thunk (measured so)
    ("x86_64", "prog-rethunk", SPEC, "none", False),
]


@pytest.mark.parametrize("arch,name,backend,ops,drop", CORRECT)
def test_correct_patch_of_every_fixture_passes(arch: str, name: str, backend: str,
                                               ops: str | None, drop: bool) -> None:
    rw = rewrite(arch, name, backend, ops=ops, drop_patched=drop)
    rewritten = sorted(p.decision.site.index for p in rw.patches if p.decision.rewrites)
    assert rewritten and rw.changed
    report = as_cli(arch, name, rw.data, backend, ops)
    assert report.ok, (unaccounted(report), report.failures)
    # The sites checked are the ones that differ: every rewritten one, proven.
    assert [v.index for v in report.sites] == rewritten
    assert report.summary == {"pass": len(rewritten), "fail": 0, "skip": 0}
    assert not report.unproven and not report.unaccounted
    assert report.thunk_summary["pass"] == len(rw.thunks)
    kinds = {n.kind for n in report.sections}
    assert "code" in kinds
    if rw.thunks:
        assert "thunks" in kinds
    if drop or rw.neutralised_entries:
        assert "site table" in kinds
    # verify_rewrite (patch's own step) agrees
    assert verify_rewrite(rw).ok


def test_identical_file_has_nothing_to_prove(arch: str) -> None:
    data = (FIX / arch / "kernel61.o").read_bytes()
    report = as_cli(arch, "kernel61.o", data)
    assert report.ok and report.sites == () and report.sections == ()


def test_kept_site_overwritten_with_ud2_fails(arch: str) -> None:
    rw = rewrite(arch, "kernel61.o")
    kept = next(p.decision.site for p in rw.patches if not p.decision.rewrites)
    bad = with_bytes(rw, kept.section, kept.offset, b"\x0f\x0b", kept.code[:2])
    for report in (verify_rewrite(bad), as_cli(arch, "kernel61.o", bad.data)):
        assert not report.ok
        assert failing(report) == ({kept.index}, set())
        v = next(v for v in report.sites if v.index == kept.index)
        assert v.action == "keep" and v.reason is not None and "the plan keeps it" in v.reason
        text = "\n".join(verify_text(report))
        assert f"site {kept.index} {kept.section}+{kept.offset:#x}" in text


@pytest.mark.parametrize("arch,name", [("x86_64", "kernel61.o"), ("i386", "kernel61.o"),
                                       ("x86_64", "prog-pie"), ("i386", "prog")])
def test_byte_changed_outside_every_site_fails(arch: str, name: str) -> None:
    rw = rewrite(arch, name, SPEC if "prog" in name else "native",
                 ops="none" if "prog" in name else None)
    off = outside_sites(rw, ".text")
    sec = ElfFile(rw.data).section(".text")
    assert sec is not None
    bad = with_bytes(rw, ".text", off, bytes([rw.data[sec.offset + off] ^ 0xFF]))
    report = verify_rewrite(bad)
    assert not report.ok and report.summary["fail"] == 0  # every site still passes
    [diff] = report.unaccounted
    assert (diff.section, diff.offset, diff.file_offset, diff.length) == \
        (".text", off, sec.offset + off, 1)
    assert "outside every site" in diff.what
    assert f".text+{off:#x}, file offset {sec.offset + off:#x}" in "\n".join(verify_text(report))
    [finding] = verify_findings(report)
    assert (finding.rule, finding.section, finding.offset, finding.file_offset) == \
        ("PV301", ".text", off, sec.offset + off)


@pytest.mark.parametrize("arch,name,section", [("x86_64", "kernel61.o", ".strtab"),
                                               ("i386", "prog", ".rodata"),
                                               ("i386", "prog", ".comment")])
def test_byte_changed_in_another_section_fails(arch: str, name: str, section: str) -> None:
    rw = rewrite(arch, name, SPEC if "prog" in name else "native",
                 ops="none" if "prog" in name else None)
    bad = with_bytes(rw, section, 1, b"\xee")
    report = as_cli(arch, name, bad.data, SPEC if "prog" in name else "native",
                    "none" if "prog" in name else None)
    assert not report.ok
    assert [(d.section, d.offset) for d in report.unaccounted] == [(section, 1)]


def test_relocation_changed_outside_every_site_fails() -> None:
    rw = rewrite("x86_64", "kernel61.o")
    elf = ElfFile(rw.data)
    at, rows = _rela_records(elf, ".text")
    sites = [p.decision.site for p in rw.patches if p.decision.site.section == ".text"]
    k = next(i for i, r in enumerate(rows) if not any(s.offset <= r[0] < s.end for s in sites))
    data = bytearray(rw.data)
    elf.cls.rela.pack_into(data, at + k * elf.cls.rela.size, rows[k][0], rows[k][1],
                           rows[k][2] + 8)
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert not report.ok and report.summary["fail"] == 0
    whats = [d.what for d in report.unaccounted if d.section == ".text"]
    assert len(whats) == 2 and all(f".text+{rows[k][0]:#x}" in w for w in whats)
    assert {w.split()[1] for w in whats} == {"removed", "added"}


def test_symbol_changed_fails() -> None:
    rw = rewrite("x86_64", "kernel61.o")
    elf = ElfFile(rw.data)
    sym = next(s for s in elf.symbols if s.type == 2 and s.name)  # a function
    assert elf.symtab is not None
    at = elf.symtab.offset + sym.index * elf.cls.sym.size
    data = bytearray(rw.data)
    name, info, other, shndx, value, size = elf.cls.unpack_sym(data, at)
    data[at : at + elf.cls.sym.size] = elf.cls.pack_sym(name, info, other, shndx, value + 1,
                                                        size)
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert not report.ok
    assert any(d.section == ".symtab" and sym.name in d.what for d in report.unaccounted)


def test_elf_header_and_program_headers_are_checked() -> None:
    rw = rewrite("x86_64", "prog", SPEC, ops="none")
    elf = ElfFile(rw.data)
    data = bytearray(rw.data)
    data[24] ^= 0x10  # e_entry
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert [d.what for d in report.unaccounted] == ["ELF header: e_entry changed"]
    data = bytearray(rw.data)
    first = elf.e_phoff + elf.e_phentsize  # the second program header: its flags
    data[first + 4] ^= 0x2  # PF_W
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert [d.what for d in report.unaccounted] == ["program header 1 changed"]


@pytest.mark.parametrize("section,field,delta", [(".symtab", 7, 1), (".text", 2, 1 << 31)])
def test_section_header_changed_fails(section: str, field: int, delta: int) -> None:
    """sh_info of an unchanged .symtab (its first global), sh_flags of .text: header
    fields pvpatch never changes there."""
    rw = rewrite("x86_64", "kernel61.o")
    elf = ElfFile(rw.data)
    sec = elf.section(section)
    assert sec is not None
    at = elf.e_shoff + sec.index * elf.e_shentsize
    fmt = elf.cls.shdr
    row = list(fmt.unpack_from(rw.data, at))
    row[field] += delta
    data = bytearray(rw.data)
    fmt.pack_into(data, at, *row)
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert not report.ok
    name = {7: "sh_info", 2: "sh_flags"}[field]
    assert [(d.section, d.what.split(":")[1].split()[0]) for d in report.unaccounted] == \
        [(section, name)]


def test_byte_in_a_vacated_place_fails() -> None:
    """--drop-patched shrinks the table in place: its old tail is zeros, and a byte set far
    into it (past the first runs of differences) is still found."""
    rw = rewrite("i386", "kernel61.o", drop_patched=True)
    before = rw.plan.scan.elf.section(".parainstructions")
    after = ElfFile(rw.data).section(".parainstructions")
    assert before is not None and after is not None and after.size < before.size
    at = before.offset + before.size - 3
    data = bytearray(rw.data)
    assert data[at] == 0
    data[at] = 0x55
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert [(d.file_offset, d.length) for d in report.unaccounted] == [(at, 1)]
    assert "outside every section" in report.unaccounted[0].what


def test_table_relocation_changed_while_the_table_is_not_fails() -> None:
    rw = rewrite("x86_64", "kernel61.o")  # .parainstructions kept as it is
    elf = ElfFile(rw.data)
    at, rows = _rela_records(elf, ".parainstructions")
    data = bytearray(rw.data)
    elf.cls.rela.pack_into(data, at, rows[0][0], rows[0][1], rows[0][2] + 1)
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert not report.ok
    assert [(d.section, d.what) for d in report.unaccounted] == \
        [(".parainstructions", "entry 0: its relocations changed")]


def test_thunk_symbol_past_its_section_fails_without_crashing() -> None:
    rw = rewrite("x86_64", "prog.o", SPEC, ops="none")
    elf = ElfFile(rw.data)
    sym = next(s for s in elf.symbols if s.name.startswith("__raw_callee_save_"))
    assert elf.symtab is not None
    at = elf.symtab.offset + sym.index * elf.cls.sym.size
    data = bytearray(rw.data)
    name, info, other, shndx, value, _size = elf.cls.unpack_sym(data, at)
    data[at : at + elf.cls.sym.size] = elf.cls.pack_sym(name, info, other, shndx, value,
                                                        1 << 40)
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert not report.ok
    assert any(d.section == ".symtab" and sym.name in d.what for d in report.unaccounted)


def test_new_headers_are_the_ones_pvpatch_writes() -> None:
    rw = rewrite("x86_64", "prog", SPEC, ops="none")
    elf = ElfFile(rw.data)
    new = elf.segments[-1]
    data = bytearray(rw.data)
    # the new PT_LOAD's p_align
    at = elf.e_phoff + new.index * elf.e_phentsize + 48
    data[at : at + 8] = (8).to_bytes(8, "little")
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert not report.ok and report.unaccounted[0].what == (
        "program headers added beyond one R+X PT_LOAD holding the program header table and "
        "the thunks")
    # SHF_EXCLUDE on the thunk section: a linker would drop it
    sec = elf.section(".text.pvpatch")
    assert sec is not None
    data = bytearray(rw.data)
    at = elf.e_shoff + sec.index * elf.e_shentsize + 8
    data[at : at + 8] = (sec.flags | 0x80000000).to_bytes(8, "little")
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert [d.section for d in report.unaccounted] == [".text.pvpatch"]
    assert "a header pvpatch does not write" in report.unaccounted[0].what


@pytest.mark.parametrize("name", ["rethunk.o", "rethunk-sls.o", "prog-rethunk.o"])
def test_thunk_returns_listed_in_return_sites(name: str) -> None:
    """CONFIG_RETHUNK objects: each thunk returns through __x86_return_thunk (a plain ret
    in the emulator) and its return is appended to .return_sites; each appended entry must
    list a proven thunk's return, and nothing else."""
    spec, ops = str(FIX / "specs" / "rethunk.toml"), "catalog:linux-6.1-x86_64"
    rw = rewrite("x86_64", name, spec, ops=ops)
    assert rw.thunks
    report = as_cli("x86_64", name, rw.data, spec, ops)
    assert report.ok, (report.unproven, report.unaccounted)
    assert report.thunk_summary == {"pass": len(rw.thunks), "fail": 0, "skip": 0}
    assert ("site list", ".return_sites") in {(n.kind, n.section) for n in report.sections}
    # point the first appended entry one byte before the thunk's return (rethunk.o has
    # no .return_sites: pvpatch makes it, as objtool would)
    before = rw.plan.scan.elf.section(".return_sites")
    first = before.size if before is not None else 0
    sec = ElfFile(rw.data).section(".return_sites")
    assert sec is not None and sec.size > first
    elf = ElfFile(rw.data)
    at, rows = _rela_records(elf, ".return_sites")
    k = next(i for i, r in enumerate(rows) if r[0] == first)
    data = bytearray(rw.data)
    elf.cls.rela.pack_into(data, at + k * elf.cls.rela.size, rows[k][0], rows[k][1],
                           rows[k][2] - 1)
    bad = verify_rewrite(replaced(rw, bytes(data)))
    assert not bad.ok
    assert {(d.section, d.offset) for d in bad.unaccounted} == {(".return_sites", first)}


def test_references_into_a_shrunk_table_are_accounted_for(arch: str) -> None:
    """tableref.o points into .parainstructions from .data and code (RELA addends on
    x86-64, the relocated bytes on i386): dropping entries moves what they point at, and
    verify checks each moved where it must; one moved elsewhere fails."""
    ops = OPS[arch]
    rw = rewrite(arch, "tableref.o", ops=ops, drop_patched=True)
    assert rw.dropped_entries == 2
    report = as_cli(arch, "tableref.o", rw.data, ops=ops)
    assert report.ok, report.unaccounted
    elf = ElfFile(rw.data)
    data = bytearray(rw.data)
    if elf.arch.uses_rela:
        at, rows = _rela_records(elf, ".data")
        table_sym = {s.index for s in elf.symbols if s.type == 3 and s.section_index ==
                     next(x.index for x in elf.sections if x.name == ".parainstructions")}
        k = next(i for i, r in enumerate(rows) if elf.cls.split_info(r[1])[0] in table_sym)
        elf.cls.rela.pack_into(data, at + k * elf.cls.rela.size, rows[k][0], rows[k][1],
                               rows[k][2] + 1)
        where = rows[k][0]
    else:
        # the first word of .data that the rewrite changed (an implicit addend)
        sec = elf.section(".data")
        old = rw.plan.scan.elf.section(".data")
        assert sec is not None and old is not None
        now, was = rw.data[sec.offset : sec.offset + sec.size], \
            rw.plan.scan.elf.section_data(old)
        where = next(i for i in range(sec.size) if now[i] != was[i])
        data[sec.offset + where] ^= 0x40
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert not report.ok
    assert any(d.section == ".data" and d.offset is not None and
               d.offset <= where < d.offset + max(d.length, 1) for d in report.unaccounted), \
        report.unaccounted


def test_relocation_walk_agrees_with_a_full_comparison() -> None:
    """Sorted relocation sections are diffed by walking them (equal stretches skipped):
    the rows it finds are the ones a row-by-row comparison finds; unsorted ones are left
    to that comparison."""
    import random

    from pvpatch.verify.accounting import _differences, _walk

    rng = random.Random(11)
    row = struct.Struct("<QQq")
    for _ in range(500):
        a = sorted(((rng.randrange(300), rng.randrange(1, 5), rng.randrange(-4, 4))
                    for _ in range(rng.randrange(60))), key=lambda r: r[0])
        b = sorted([r for r in a if rng.random() > 0.2] +
                   [(rng.randrange(300), 4, -4) for _ in range(rng.randrange(4))],
                   key=lambda r: r[0])
        walked = _walk(b"".join(row.pack(*r) for r in a), b"".join(row.pack(*r) for r in b),
                       row.size, 8)
        assert walked is not None
        gone, new = _differences(a, b)
        assert {row.unpack(r) for r in walked[0]} == set(gone)
        assert {row.unpack(r) for r in walked[1]} == set(new)
    unsorted = row.pack(8, 1, 0) + row.pack(4, 1, 0)
    assert _walk(unsorted, unsorted, row.size, 8) is None


def test_thunk_section_padding_is_checked() -> None:
    rw = rewrite("x86_64", "prog.o", SPEC, ops="none")
    t = max(rw.thunks, key=lambda t: t.offset)
    sec = ElfFile(rw.data).section(t.section)
    assert sec is not None and t.offset > 0
    # the byte before the last thunk is alignment padding
    bad = with_bytes(rw, t.section, t.offset - 1, b"\xcc", b"\x00")
    report = verify_rewrite(bad)
    assert [(d.section, d.offset) for d in report.unaccounted] == [(t.section, t.offset - 1)]
    assert "outside every thunk" in report.unaccounted[0].what


def test_load_time_relocation_neutralised_outside_every_site_fails() -> None:
    rw = rewrite("i386", "prog-pie")
    elf = ElfFile(rw.data)
    sec = elf.section(".rel.dyn")
    assert sec is not None
    sites = [p.decision.site for p in rw.patches]
    rows = list(elf.cls.rel.iter_unpack(elf.section_data(sec)))
    k = next(i for i, (off, info) in enumerate(rows)
             if info and not any(s.address is not None and s.address <= off < s.address + s.len
                                 for s in sites))
    data = bytearray(rw.data)
    elf.cls.rel.pack_into(data, sec.offset + k * elf.cls.rel.size, rows[k][0], 0)
    report = verify_rewrite(replaced(rw, bytes(data)))
    assert not report.ok
    assert any(d.section == ".rel.dyn" and f"{rows[k][0]:#x}" in d.what
               for d in report.unaccounted)


def test_sti_for_cli_without_op_names_fails(arch: str) -> None:
    """Without op names nothing says what a site should do: a changed site is unproven."""
    rw = rewrite(arch, "kernel61.o")
    section, offset, _after = site_after(rw, 1)
    bad = with_bytes(rw, section, offset, b"\xfb", b"\xfa")
    report = as_cli(arch, "kernel61.o", bad.data, ops="none")
    assert not report.ok and report.summary["pass"] == 0
    bad_site = next(v for v in report.sites if v.index == 1)
    assert bad_site.status == "fail" and "op unknown" in (bad_site.reason or "")
    assert {v.index for v in report.sites} == {p.decision.site.index for p in rw.patches
                                               if p.decision.rewrites}


def test_restore_fl_is_proven(arch: str) -> None:
    """irq.restore_fl pops a flags image: its trials get one popf can load (TF clear), and
    every flag it leaves is compared."""
    for name in ("prog68", "prog", "seed.o"):
        rw = rewrite(arch, name, ops=CAT68[arch])
        [site] = [p.decision.site for p in rw.patches if p.decision.site.op == "irq.restore_fl"]
        report = verify_rewrite(rw)
        v = next(v for v in report.sites if v.index == site.index)
        assert (v.status, v.reason, v.trials) == ("pass", None, 16), (name, v)
        assert report.ok and report.summary["skip"] == 0, name


@pytest.mark.parametrize("bad,why", [
    ("{push}{push}9d", "sp: expected"),  # one push too many
    ("9d", "did not end"),  # pops the caller's frame (and traps on its TF)
    ("{push}9d9c", "sp: expected"),  # pushes the flags back
    ("{push}58", "F: expected"),  # never loads the flags (IF, CF, ZF...)
])
def test_restore_fl_that_breaks_the_stack_or_the_flags_fails(arch: str, bad: str,
                                                             why: str) -> None:
    rw = rewrite(arch, "prog68", ops=CAT68[arch])
    [site] = [p.decision.site for p in rw.patches if p.decision.site.op == "irq.restore_fl"]
    code = bytes.fromhex(bad.format(push="57" if arch == "x86_64" else "50"))
    code += b"\x90" * (site.len - len(code))
    report = verify_rewrite(with_bytes(rw, site.section, site.offset, code))
    assert failing(report) == ({site.index}, set())
    v = next(v for v in report.sites if v.index == site.index)
    assert v.reason is not None and any(why in d for d in (v.reason, *v.detail)), v.detail


def test_a_trapping_site_does_not_poison_the_next() -> None:
    """A run that stops on a trap (popf of a random frame sets TF) leaves nothing behind:
    the sites verified after it still pass."""
    rw = rewrite("x86_64", "kernel61.o")
    section, offset, _after = site_after(rw, 0)
    report = verify_rewrite(with_bytes(rw, section, offset, bytes.fromhex("9d9090909090")),
                            workers=1)
    assert failing(report) == ({0}, set())
    assert report.summary == {"pass": 16, "fail": 1, "skip": 0}


def test_libprog_is_proven(arch: str) -> None:
    """A shared object whose calls reach pv_ops through load-time relocations against it
    (i386): the loader applies them, so the reference runs (every site used to skip)."""
    for backend, ops in ((SPEC, "none"), ("native", CAT68[arch])):
        rw = rewrite(arch, "libprog.so", backend, ops=ops)
        report = verify_rewrite(rw)
        assert report.summary == {"pass": 6, "fail": 0, "skip": 0}, verify_text(report)
        assert report.ok and not report.unproven


def test_neutralised_alt_entries(arch: str) -> None:
    rw = rewrite(arch, "kernel612.o", ops=CAT612[arch])
    table = rw.plan.scan.table
    assert table is not None
    stride = table.entry_size
    done = next(d.site for d in rw.plan.decisions if d.rewrites)
    kept = next(d.site for d in rw.plan.decisions if not d.rewrites)
    feature = (117 | 1 << 16).to_bytes(4, "little")  # NOT(X86_FEATURE_ALWAYS)
    # at a rewritten site: accounted for
    report = verify_rewrite(rw)
    assert report.ok and any(n.section == ".altinstructions" and n.kind == "site table"
                             for n in report.sections)
    for j in done.entry_indices:
        at = ElfFile(rw.data).section(".altinstructions")
        assert at is not None
        assert rw.data[at.offset + j * stride + 8 : at.offset + j * stride + 12] == feature
    # at a kept site: not
    j = kept.entry_indices[0]
    bad = verify_rewrite(with_bytes(rw, ".altinstructions", j * stride + 8, feature))
    assert not bad.ok and bad.summary["fail"] == 0
    [diff] = bad.unaccounted
    assert (diff.section, diff.offset) == (".altinstructions", j * stride + 8)
    assert f"entry {j} neutralised" in diff.what and f"site {kept.index}" in diff.what
    # a rewritten site whose entry is left for the kernel to apply: not either
    original = rw.plan.scan.elf.section_data(table.section)
    j = done.entry_indices[0]
    left = with_bytes(rw, ".altinstructions", j * stride + 8,
                      original[j * stride + 8 : j * stride + 12])
    report = verify_rewrite(left)
    assert not report.ok
    assert any(f"entry {j} at changed site {done.index}" in d.what
               for d in report.unaccounted)


def test_dropped_entries_are_accounted_for(arch: str, tmp_path: Path) -> None:
    rw = rewrite(arch, "kernel61.o", drop_patched=True)
    report = as_cli(arch, "kernel61.o", rw.data)
    assert report.ok and rw.dropped_entries == len(report.sites)
    # the same output verified against a plan that keeps a rewritten op: its sites (and
    # so their dropped entries) are unproven
    spec = tmp_path / "keep-irq.toml"
    kept = {p.decision.site.index for p in rw.patches
            if p.decision.site.op == "irq.irq_disable"}
    spec.write_text(f'arch = "{arch}"\n[ops."irq.irq_disable"]\naction = "keep"\n'
                    '[ops."irq.irq_enable"]\naction = "inline"\nbytes = "fb"\n'
                    'clobbers = []\n')
    report = as_cli(arch, "kernel61.o", rw.data, str(spec))
    assert not report.ok and kept
    assert {v.index for v in report.sites if v.status == "fail"} >= kept


def test_module_signature_removed_is_accounted_for(tmp_path: Path) -> None:
    from pvpatch.elf.reader import MODULE_SIG_MAGIC

    signature = bytes(range(32))
    info = bytes(8) + len(signature).to_bytes(4, "big")
    signed = (FIX / "x86_64" / "kernel61.o").read_bytes() + signature + info + MODULE_SIG_MAGIC
    path = tmp_path / "signed.ko"
    path.write_bytes(signed)
    original = api.load(path, ops=OPS["x86_64"])
    rw = api.apply_plan(api.make_plan(original, "native"))
    assert rw.signature_removed
    report = verify_files(original, ElfFile(rw.data), api.make_plan(original, "native"))
    assert report.ok
    assert ("(module signature)", "signature") in {(n.section, n.kind) for n in report.sections}


def test_accounting_json_shape() -> None:
    rw = rewrite("x86_64", "kernel61.o")
    off = outside_sites(rw, ".text")
    report = verify_rewrite(with_bytes(rw, ".text", off, b"\xf4"))
    doc = verify_json(report)
    assert set(doc) == {"sites", "thunks", "summary", "thunk_summary", "allow_skip",
                        "unproven", "accounting", "ok"}
    assert set(doc["accounting"]) == {"sections", "unaccounted", "omitted"}
    [diff] = doc["accounting"]["unaccounted"]
    assert set(diff) == {"section", "offset", "file_offset", "length", "what"}
    assert diff["section"] == ".text" and diff["offset"] == off and doc["ok"] is False
    row = next(r for r in doc["accounting"]["sections"] if r["section"] == ".text")
    assert row["kind"] == "code" and row["rule"]
    err = report_failures(report)
    assert err is not None and f".text+{off:#x}" in str(err)


# -- engines reused across files, sites spread over processes --------------------------


def test_engines_reused_across_files_give_the_same_verdicts(prog_spec: str) -> None:
    """Each process keeps one engine pair per architecture: a file verified after
    others (of both architectures, relocatable and linked, passing and failing)
    gets the report it gets first in a fresh process."""
    code = ("import sys; sys.path[:0] = ['tests']; import test_verify as t; "
            "from pvpatch.verify import verify_rewrite, verify_json; import json; "
            "rw = t.with_bytes(t.rewrite('x86_64', 'kernel61.o'), '.text', 0x9, b'\\xfb', "
            "b'\\xfa'); print(json.dumps(verify_json(verify_rewrite(rw, workers=1))))")
    fresh = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout
    for arch, name, spec, ops in [("i386", "prog.o", prog_spec, "none"),
                                  ("x86_64", "prog", prog_spec, "none"),
                                  ("x86_64", "prog-pie", "native", None),
                                  ("x86_64", "seed.o", "native", None)]:
        assert verify_rewrite(rewrite(arch, name, spec, ops=ops), workers=1).ok
    rw = with_bytes(rewrite("x86_64", "kernel61.o"), ".text", 0x9, b"\xfb", b"\xfa")
    import json

    assert json.dumps(verify_json(verify_rewrite(rw, workers=1))) + "\n" == fresh


def test_a_run_that_overwrites_the_runtime_does_not_outlive_its_file() -> None:
    from pvpatch.verify import engine as V
    from pvpatch.verify.runtime import RUNTIME

    rw = rewrite("x86_64", "kernel61.o")
    assert verify_rewrite(rw, workers=1).ok
    # Vandalise the idle engines' harness and reference models, as a hostile
    # site could: the next file gets them back intact.
    for machines in V._IDLE.values():
        for m in machines:
            m.uc.mem_write(RUNTIME, b"\xf4" * 0x8000)
    V.REF_RUNS.clear()
    assert verify_rewrite(rw, workers=1).ok


def test_a_write_to_unmapped_memory_is_a_failure_not_a_crash() -> None:
    rw = rewrite("x86_64", "kernel61.o")
    section, offset, after = site_after(rw, 6)  # mmu.pte_val: 6 bytes, clobbers rax
    assert len(after) == 6
    # mov %rax, (%rbx): a random address, unmapped; the write hook (which covers
    # every address an image may take) sees it, then the run faults.
    report = verify_rewrite(with_bytes(rw, section, offset, bytes.fromhex("488903909090")))
    assert failing(report) == ({6}, set())
    bad = next(v for v in report.sites if v.index == 6)
    assert bad.reason is not None and "UNMAPPED" in bad.reason, bad.reason


@pytest.mark.parametrize("arch,name", [("x86_64", "kernel61.o"), ("i386", "prog-pie")])
def test_sites_spread_over_processes_give_the_same_report(arch: str, name: str) -> None:
    rw = rewrite(arch, name)
    broken = with_bytes(rw, *site_after(rw, 1)[:2], b"\xfb") if arch == "x86_64" else rw
    one = verify_rewrite(broken, workers=1, trials=40)
    assert verify_rewrite(broken, workers=3, trials=40) == one
    assert one.ok == (arch != "x86_64")


# -- the real corpus ------------------------------------------------------------------


@pytest.mark.corpus
def test_corpus_modules_pass() -> None:
    vmlinux = corpus.x86_64_vmlinux()
    assert vmlinux is not None
    total = 0
    for ko in corpus.x86_64_pv_modules():
        rw = api.apply_plan(api.make_plan(api.load(ko, ops=f"btf:{vmlinux}"), "native"))
        report = verify_rewrite(rw, workers=1)
        assert report.ok, (ko, report.unproven, report.unaccounted)
        assert report.summary["skip"] == 0 and not report.unproven, ko
        # what changed: sites and the relocations inside them (and the signature on the
        # old bytes, removed), nothing else
        assert {n.kind for n in report.sections} <= {"code", "relocations", "signature"}, ko
        total += len(report.sites)
    assert total > 0


@pytest.mark.corpus
def test_corpus_vmlinux_passes() -> None:
    """A real kernel: segments at 0xffffffff81000000 (which Unicorn cannot map as
    they are), sites calling pv_ops slots in .data with no pv_ops symbol."""
    import time

    vmlinux = corpus.x86_64_vmlinux()
    assert vmlinux is not None
    rw = api.apply_plan(api.make_plan(api.load(vmlinux), "native"))
    t = time.perf_counter()
    report = verify_rewrite(rw, workers=1)
    rate = len(report.sites) / (time.perf_counter() - t)
    assert len(report.sites) > 2000
    assert report.summary["fail"] == 0, [v for v in report.sites if v.status == "fail"][:3]
    families = ("irq.", "mmu.read_cr", "mmu.write_cr", "mmu.p", "mmu.make_", "lock.")
    checked = [v for v in report.sites if (v.op or "").startswith(families)]
    assert len(checked) > 2000
    assert all(v.status == "pass" and v.reason is None for v in checked), \
        [v for v in checked if v.status != "pass" or v.reason][:3]
    assert report.summary["skip"] == 0
    # Every byte that differs is in a proven site (the table is kept as it is).
    assert report.ok and {(n.section, n.kind) for n in report.sections} <= \
        {(".text", "code"), (".init.text", "code"), (".noinstr.text", "code")}
    # On a loaded shared machine too: well over a hundred sites a second (byte
    # accounting of the whole image included).
    assert rate > 100, f"{rate:.0f} sites/s"

    # ... and it is a real check there too: cli turned into sti fails that site only.
    patch = next(p for p in rw.patches if p.decision.site.op == "irq.irq_disable"
                 and p.decision.action == "inline")
    site = patch.decision.site
    assert site.file_offset is not None and patch.after[0] == 0xFA
    data = bytearray(rw.data)
    data[site.file_offset] = 0xFB
    bad = verify_rewrite(replaced(rw, bytes(data)), workers=1)
    assert failing(bad) == ({site.index}, set())


@pytest.mark.corpus
def test_corpus_612_vmlinux_passes() -> None:
    """Debian's 6.12 image: every native-patched site proven, every entry at it
    neutralised and accounted for; an entry neutralised elsewhere, or one left active at a
    rewritten site, fails naming it."""
    rw = api.apply_plan(api.make_plan(api.load(corpus.x86_64_612_vmlinux()), "native"))
    report = verify_rewrite(rw, workers=1)
    assert report.ok, (report.unproven[:3], report.unaccounted[:3])
    assert len(report.sites) >= 2500 and report.summary["skip"] == 0
    assert {n.kind for n in report.sections} == {"code", "site table"}
    table = rw.plan.scan.table
    assert table is not None and table.family == "altinstructions"
    at_sites = {j for s in rw.plan.scan.sites for j in s.entry_indices}
    stray = next(j for j in range(table.count) if j not in at_sites)
    feature = (117 | 1 << 16).to_bytes(4, "little")
    bad = verify_rewrite(with_bytes(rw, ".altinstructions", stray * table.entry_size + 8,
                                    feature), workers=1)
    assert not bad.ok and bad.summary["fail"] == 0
    assert [(d.section, d.offset) for d in bad.unaccounted] == \
        [(".altinstructions", stray * table.entry_size + 8)]
    assert "describes no paravirt site" in bad.unaccounted[0].what
    done = next(p.decision.site for p in rw.patches if p.decision.rewrites)
    j = done.entry_indices[0]
    original = rw.plan.scan.elf.section_data(table.section)
    left = with_bytes(rw, ".altinstructions", j * table.entry_size + 8,
                      original[j * table.entry_size + 8 : j * table.entry_size + 12])
    bad = verify_rewrite(left, workers=1)
    assert not bad.ok and [d.offset for d in bad.unaccounted] == [j * table.entry_size]


@pytest.mark.corpus
def test_corpus_612_modules_pass() -> None:
    """Every 6.12 module with DIRECT_CALL sites, read from its .ko.xz and native-patched:
    every rewritten site proven, every difference accounted for."""
    modules = sites = 0
    for ko in corpus.x86_64_612_modules():
        res = api.load(ko)
        if not res.sites:
            continue
        rw = api.apply_plan(api.make_plan(res, "native"))
        report = verify_rewrite(rw, workers=1)
        assert report.ok, (ko, report.unproven, report.unaccounted)
        assert not report.unproven and {n.kind for n in report.sections} <= \
            {"code", "relocations", "site table", "signature"}, ko
        modules += 1
        sites += len(report.sites)
    assert modules >= 60 and sites >= 400
