"""Register-saving thunks and spec files: patched programs run natively and stay clean."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from clirun import pvpatch_cli
from paths import FIX

import pvpatch
from pvpatch.elf.reader import ElfFile
from pvpatch.plan.backend import parse_spec_text

# prog.c's own pv_ops functions: plain C that clobbers every caller-saved register.
SPEC_FILE = FIX / "specs" / "prog.toml"
SPEC = SPEC_FILE.read_text()


@pytest.fixture
def spec() -> Path:
    return SPEC_FILE


def run_prog(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path)], capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize("name", ["prog", "prog-pie"])
def test_linked_program_runs_clean(arch: str, name: str, spec: Path, tmp_path: Path) -> None:
    src = FIX / arch / name
    unpatched = run_prog(src)
    assert unpatched.returncode == 1 and "corrupted" in unpatched.stdout
    out = tmp_path / name
    proc = pvpatch_cli("patch", str(src), "-o", str(out), "--backend", str(spec), "--ops",
                       "none", "--json", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    actions = {s["type"]: s["action"] for s in report["sites"]}
    # callee-save sites go through thunks, CLBR_ANY sites call the C function directly
    assert actions == {29: "thunk", 30: "thunk", 31: "thunk", 32: "thunk", 44: "call",
                       45: "call"}
    saves = {t["target"]: t["saves"] for t in report["thunks"]}
    want = ["rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"] if arch == "x86_64" \
        else ["ecx", "edx"]  # the seed's i386 thunk for an eax-only site
    assert saves == {t: want for t in ("prog_restore_fl", "prog_save_fl", "prog_irq_disable",
                                       "prog_irq_enable")}
    for t in report["thunks"]:
        assert t["address"] is not None and t["section"] == ".text.pvpatch"
    ran = run_prog(out)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout + ran.stderr
    # the new segment is read+execute, not writable, and past the others
    ph = subprocess.run(["readelf", "-l", "-W", str(out)], capture_output=True, text=True,
                        check=True).stdout
    loads = [ln.split() for ln in ph.splitlines() if ln.strip().startswith("LOAD")]
    last = loads[-1]
    assert last[-3:-1] == ["R", "E"], last
    assert int(last[2], 16) == max(int(x[2], 16) for x in loads)


def test_relocatable_then_linked(arch: str, spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "prog.o"
    proc = pvpatch_cli("patch", str(FIX / arch / "prog.o"), "-o", str(out), "--backend",
                       str(spec), "--ops", "none", "--json", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {t["symbol"] for t in report["thunks"]} == {
        "__raw_callee_save_prog_restore_fl", "__raw_callee_save_prog_save_fl",
        "__raw_callee_save_prog_irq_disable", "__raw_callee_save_prog_irq_enable"}
    # the thunks are local FUNC symbols with sizes, before the globals
    syms = subprocess.run(["readelf", "-s", "-W", str(out)], capture_output=True, text=True,
                          check=True).stdout
    for t in report["thunks"]:
        line = next(ln for ln in syms.splitlines() if ln.endswith(" " + t["symbol"]))
        fields = line.split()
        assert fields[3] == "FUNC" and fields[4] == "LOCAL" and int(fields[2]) > 0
    assert subprocess.run(["eu-elflint", "--gnu-ld", "-q", str(out)]).returncode == 0
    m32 = ["-m32"] if arch == "i386" else []
    exe = tmp_path / "prog"
    subprocess.run(["gcc", *m32, "-no-pie", "-o", str(exe), str(out)], check=True)
    ran = run_prog(exe)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout + ran.stderr
    # thunk bytes, disassembled by objdump: pushes, call, pops in reverse, ret
    dis = subprocess.run(["objdump", "-d", "-j", ".text.pvpatch", str(out)],
                         capture_output=True, text=True, check=True).stdout
    body = dis.split("<__raw_callee_save_prog_irq_disable>:", 1)[1].split("\n\n", 1)[0]
    mnem = [re.split(r"\s+", ln.split("\t")[2].strip())[0] for ln in body.splitlines()
            if ln.count("\t") >= 2]
    pushes = mnem.count("push")
    assert pushes == (8 if arch == "x86_64" else 2)
    assert mnem.count("pop") == pushes and mnem[-1] == "ret" and "call" in mnem


def test_sse_callee_keeps_stack_aligned(spec: Path, tmp_path: Path) -> None:
    src = FIX / "x86_64" / "prog-sse"
    out = tmp_path / "prog-sse"
    proc = pvpatch_cli("patch", str(src), "-o", str(out), "--backend", str(spec), "--ops",
                       "none", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    ran = run_prog(out)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout + ran.stderr


def test_endbr_when_asked(tmp_path: Path) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC + "\n[thunks]\nendbr = true\n")
    res = pvpatch.load(FIX / "x86_64" / "prog.o", ops="none")
    rw = pvpatch.apply_plan(pvpatch.make_plan(res, str(spec)))
    out = ElfFile(rw.data)
    sec = out.section(".text.pvpatch")
    assert sec is not None
    code = out.section_data(sec)
    for t in rw.thunks:
        assert code[t.offset : t.offset + 4] == bytes.fromhex("f30f1efa")


def test_endbr_when_the_input_asks_for_ibt(arch: str, spec: Path, tmp_path: Path) -> None:
    """Built with -fcf-protection=full, the object's GNU property note asks for IBT."""
    obj = tmp_path / "prog-ibt.o"
    m32 = ["-m32"] if arch == "i386" else []
    subprocess.run(["gcc", *m32, "-O2", "-fno-pie", "-fcf-protection=full", "-I",
                    str(FIX / "src"), "-c", str(FIX / "src" / "prog.c"), "-o", str(obj)],
                   check=True)
    assert ElfFile.open(obj).has_ibt_property()
    assert not ElfFile.open(FIX / arch / "prog.o").has_ibt_property()
    out = tmp_path / "patched.o"
    proc = pvpatch_cli("patch", str(obj), "-o", str(out), "--backend", str(spec), "--ops",
                       "none", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    elf = ElfFile.open(out)
    sec = elf.section(".text.pvpatch")
    assert sec is not None
    code = elf.section_data(sec)
    endbr = bytes.fromhex("f30f1efa" if arch == "x86_64" else "f30f1efb")
    assert report["thunks"] and all(code[t["offset"] : t["offset"] + 4] == endbr
                                    for t in report["thunks"])
    exe = tmp_path / "prog"
    subprocess.run(["gcc", *m32, "-no-pie", "-o", str(exe), str(out)], check=True)
    ran = run_prog(exe)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout + ran.stderr


def test_one_thunk_per_target_and_saved_set() -> None:
    res = pvpatch.load(FIX / "x86_64" / "kernel61.o", ops="catalog:linux-6.1-x86_64")
    text = """
    [ops."irq.irq_disable"]
    action = "call"
    target = "xen_irq_disable"
    [ops."irq.irq_enable"]
    action = "call"
    target = "xen_irq_disable"
    """
    plan = pvpatch.make_plan(res, parse_spec_text(text, res.arch))
    assert len(plan.thunks) == 1
    assert sum(d.action == "thunk" for d in plan.decisions) == 5
    rw = pvpatch.apply_plan(plan)
    elf = ElfFile(rw.data)
    undefined = [s for s in elf.symbols if s.name == "xen_irq_disable"]
    assert len(undefined) == 1 and undefined[0].shndx == 0 and undefined[0].bind == 1


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[ops."irq.save_fl"]\naction = "inline"\nasm = "pushfq; popq %rax"\n', "clobbers"),
        ('[ops."irq.save_fl"]\naction = "inline"\nasm = "frobnicate %rax"\nclobbers = []\n',
         "does not assemble"),
        ('[ops."irq.save_fl"]\naction = "call"\n', "needs a target"),
        ('[ops."irq.save_fl"]\naction = "call"\ntarget = "f"\nconvention = "pascal"\n',
         "convention"),
        ('[ops."irq.save_fl"]\naction = "inline"\nbytes = "9c58"\nclobbers = ["rzz"]\n',
         "unknown x86_64 register 'rzz'"),
        ('[ops."irq.save_fl"]\naction = "inline"\nbytes = "9c58"\nclobbers = []\ncolour = 1\n',
         "unknown key 'colour'"),
        ('arch = "i386"\n', "the spec is for i386"),
        ('[ops."irq.save_fl"]\naction = "inline"\nasm = "pushfq; popq %rax"\nbytes = "9c59"\n'
         'clobbers = ["rax"]\n', "asm assembles to 9c58, bytes say 9c59"),
    ],
)
def test_bad_spec_refused_with_line(text: str, words: str, tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text("# a spec\n" + text)
    out = tmp_path / "o.o"
    proc = pvpatch_cli("patch", str(FIX / "x86_64" / "kernel61.o"), "-o", str(out),
                       "--backend", str(spec))
    assert proc.returncode == 2
    assert words in proc.stderr, proc.stderr
    assert re.search(rf"{re.escape(str(spec))}:\d+: ", proc.stderr), proc.stderr  # file:line
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_shared_object_runs_clean(arch: str, spec: Path, tmp_path: Path) -> None:
    """A shared library patched on its own; the unpatched launcher loads it."""
    launcher = tmp_path / "prog-so"
    launcher.write_bytes((FIX / arch / "prog-so").read_bytes())
    launcher.chmod(0o755)
    (tmp_path / "libprog.so").write_bytes((FIX / arch / "libprog.so").read_bytes())
    assert run_prog(launcher).returncode == 1  # unpatched: the promise is broken
    proc = pvpatch_cli("patch", str(FIX / arch / "libprog.so"), "-o",
                       str(tmp_path / "libprog.so"), "--backend", str(spec), "--ops", "none",
                       "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert sorted(s["action"] for s in report["sites"]) == ["call", "call", "thunk", "thunk",
                                                            "thunk", "thunk"]
    assert report["verify"]["summary"]["fail"] == 0
    assert "PV106" not in proc.stderr  # i386: slots read through load-time relocations
    ran = run_prog(launcher)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout + ran.stderr


@pytest.mark.parametrize("name", ["x86_64/prog.o", "x86_64/prog", "i386/prog-pie",
                                  "x86_64/libprog.so", "x86_64/prog-rethunk.o",
                                  "x86_64/prog-rethunk"])
def test_repatching_with_thunks_changes_nothing(name: str, spec: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "1", tmp_path / "2"
    for src, dst in ((FIX / name, first), (first, second)):
        proc = pvpatch_cli("patch", str(src), "-o", str(dst), "--backend", str(spec), "--ops",
                           "none", "--no-verify")
        assert proc.returncode == 0, proc.stderr
    assert first.read_bytes() == second.read_bytes()


def test_i386_callee_save_target_may_change_edx(tmp_path: Path) -> None:
    """A callee-save function may change eax and edx on i386 (the kernel's thunk saves only
    ecx): at an eax-only site it is called through a thunk saving edx."""
    text = '[ops.31]\naction = "call"\ntarget = "cs_irq_disable"\nconvention = "callee-save"\n'
    res = pvpatch.load(FIX / "i386" / "seed.o",
                       ops=f"catalog:{FIX / 'catalogs' / 'fixtures-i386.toml'}")
    plan = pvpatch.make_plan(res, parse_spec_text(text, res.arch))
    decisions = [d for d in plan.decisions if d.site.type == 31]
    assert decisions and all(d.site.clobbers == 0x1 for d in decisions)
    assert {d.action for d in decisions} == {"thunk"}
    assert plan.thunks[0].saves == ("edx",)
    x64 = pvpatch.load(FIX / "x86_64" / "seed.o", ops="catalog:linux-6.1-x86_64")
    plan64 = pvpatch.make_plan(x64, parse_spec_text(text, x64.arch))
    assert {d.action for d in plan64.decisions if d.site.type == 31} == {"call"}


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("[ops.30]\naction = \"call\"\ntarget = \"f\"\n[defaults]\ntarget = \"g\"\n", 5,
         "unknown key 'target' in [defaults]"),
        ("[ops.'irq.save_fl']\naction = \"fly\"\n", 1, "action must be one of"),
        ("[ops.30]\naction = \"keep\"\n[thunks]\nendbr = \"yes\"\n", 4, "endbr must be true"),
        ("[ops.30]\naction = \"nop\"\ntail = \"false\"\n", 1, "tail must be true or false"),
    ],
)
def test_spec_error_lines(text: str, line: int, words: str, tmp_path: Path) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    with pytest.raises(pvpatch.SpecError) as err:
        pvpatch.load_backend(str(spec), pvpatch.open_elf(FIX / "x86_64" / "prog.o"))
    assert f"{spec}:{line}: " in str(err.value) and words in str(err.value)


def test_packed_relative_relocations(arch: str, spec: Path, tmp_path: Path) -> None:
    """A PIE linked with -z pack-relative-relocs (RELR): the table is decoded through RELR,
    and on i386 the RELR entries inside rewritten sites are dropped (re-encoded)."""
    from pvpatch.elf.writer import encode_relr

    m32 = ["-m32"] if arch == "i386" else []
    obj, exe = tmp_path / "p.o", tmp_path / "p"
    subprocess.run(["gcc", *m32, "-O2", "-fPIE", "-fno-stack-protector", "-fcf-protection=none",
                    "-I", str(FIX / "src"), "-c", str(FIX / "src" / "prog.c"), "-o", str(obj)],
                   check=True)
    subprocess.run(["gcc", *m32, "-pie", "-Wl,-z,notext", "-Wl,-z,pack-relative-relocs",
                    str(obj), "-o", str(exe)], check=True)
    elf = ElfFile.open(exe)
    relr = elf.section(".relr.dyn")
    assert relr is not None
    # the encoder reproduces the linker's encoding of the same addresses
    assert encode_relr(list(elf.relr_addresses(relr)), elf.cls.addr.size) == \
        elf.section_data(relr)
    res = pvpatch.load(exe, ops="none")
    assert len(res.sites) == 6 and not res.findings
    out = tmp_path / "patched"
    proc = pvpatch_cli("patch", str(exe), "-o", str(out), "--backend", str(spec), "--ops", "none")
    assert proc.returncode == 0, proc.stderr
    ran = run_prog(out)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout + ran.stderr


# -- files with 65,280 sections or more (gABI extended section numbering) ----------------

SHN_LORESERVE = 0xFF00


def _pad_object(path: Path, count: int, head: str = "", bits: int = 64) -> None:
    """An object assembled by GNU as: `head`, then `count` one-byte code sections."""
    src = path.with_suffix(".s")
    src.write_text(head + "".join(f'.section .text.pvpad{i},"ax",@progbits\nret\n'
                                  for i in range(count)))
    subprocess.run(["as", f"--{bits}", "-o", str(path), str(src)], check=True)


def _readelf(*args: str) -> str:
    return subprocess.run(["readelf", "-W", *args], capture_output=True, text=True,
                          check=True).stdout


def _section_index(path: Path, name: str) -> int:
    for line in _readelf("-S", str(path)).splitlines():
        if (m := re.match(r"\s*\[\s*(\d+)\]\s+(\S+)", line)) and m[2] == name:
            return int(m[1])
    raise AssertionError(f"no section {name} in {path}")


def _symbol_ndx(path: Path, name: str) -> int:
    line = next(ln for ln in _readelf("-s", str(path)).splitlines() if ln.endswith(" " + name))
    return int(line.split()[6])


def _header_counts(path: Path) -> str:
    return next(ln for ln in _readelf("-h", str(path)).splitlines()
                if "Number of section headers" in ln).split(":", 1)[1].strip()


def test_thunks_in_a_file_already_past_0xff00_sections(spec: Path, tmp_path: Path) -> None:
    """prog.o with 65,300 more sections (linked by ld -r, which writes .symtab_shndx): the
    thunk section's symbols go through SHN_XINDEX, the program still links and runs."""
    pad = tmp_path / "pad.o"
    _pad_object(pad, 65_300)
    big = tmp_path / "big.o"
    subprocess.run(["ld", "-r", "--no-warn-execstack", str(FIX / "x86_64" / "prog.o"), str(pad),
                    "-o", str(big)], check=True)
    assert _header_counts(big).startswith("0 (")  # the input uses extended numbering
    out = tmp_path / "out.o"
    proc = pvpatch_cli("patch", str(big), "-o", str(out), "--backend", str(spec), "--ops",
                       "none", "--json", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    thunk_sec = _section_index(out, ".text.pvpatch")
    assert thunk_sec >= SHN_LORESERVE
    total = int(_header_counts(big).split("(")[1].rstrip(")")) + 2  # + .text.pvpatch + .rela
    assert _header_counts(out) == f"0 ({total})"
    for t in json.loads(proc.stdout)["thunks"]:
        assert _symbol_ndx(out, t["symbol"]) == thunk_sec  # readelf resolves SHN_XINDEX
    text = _readelf("-a", str(out))
    assert "Warning" not in text and "Error" not in text
    assert subprocess.run(["eu-elflint", "--gnu-ld", "-q", str(out)]).returncode == 0
    subprocess.run(["ld", "-r", str(out), "-o", str(tmp_path / "again.o")], check=True)
    exe = tmp_path / "prog"
    subprocess.run(["gcc", "-no-pie", "-Wl,--no-warn-execstack", "-o", str(exe), str(out)],
                   check=True)
    ran = run_prog(exe)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout + ran.stderr


def test_the_first_symbol_past_0xff00_brings_symtab_shndx(arch: str, tmp_path: Path) -> None:
    """GNU as numbers its sections past 0xff00 but writes no .symtab_shndx when no symbol
    needs one; a thunk's symbol does, so the output gains the table."""
    bits, ptr = (64, 8) if arch == "x86_64" else (32, 4)
    call = "call *pv_ops+8*30(%rip)" if bits == 64 else "call *pv_ops+4*30"
    site = (f".text\n.globl f\nf:\n771: {call}\n772:\n"
            f'.pushsection .parainstructions,"a"\n.balign {ptr}\n'
            f"{'.quad' if bits == 64 else '.long'} 771b\n.byte 30\n"
            f".byte 772b-771b\n.short 1\n.balign {ptr}\n.popsection\nret\n")
    obj = tmp_path / "near.o"
    _pad_object(obj, 0, site, bits)
    # Exactly 0xff00 sections: numbered up to 0xfeff (as writes no .symtab_shndx), but
    # counted with extended numbering; the next section, the thunks', is 0xff00.
    _pad_object(obj, SHN_LORESERVE - len(ElfFile.open(obj).sections), site, bits)
    before = ElfFile.open(obj)
    assert len(before.sections) == SHN_LORESERVE and _header_counts(obj).startswith("0 (")
    assert not any(s.name == ".symtab_shndx" for s in before.sections)
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text('[ops.30]\naction = "call"\ntarget = "c_save_fl"\n')
    out = tmp_path / "out.o"
    proc = pvpatch_cli("patch", str(obj), "-o", str(out), "--backend", str(spec_file),
                       "--ops", f"catalog:linux-6.1-{arch}", "--json", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert [d["action"] for d in json.loads(proc.stdout)["sites"]] == ["thunk"]
    thunk_sec = _section_index(out, ".text.pvpatch")
    assert thunk_sec >= SHN_LORESERVE and _section_index(out, ".symtab_shndx") > thunk_sec
    assert _symbol_ndx(out, "__raw_callee_save_c_save_fl") == thunk_sec
    assert _header_counts(out) == f"0 ({len(before.sections) + 3})"
    text = _readelf("-a", str(out))
    assert "Warning" not in text and "Error" not in text
    assert subprocess.run(["eu-elflint", "--gnu-ld", "-q", str(out)]).returncode == 0
    emulation = ["-m", "elf_i386"] if bits == 32 else []
    subprocess.run(["ld", *emulation, "-r", str(out), "-o", str(tmp_path / "again.o")],
                   check=True)
    # pvpatch reads its own output back: the thunk symbol is where readelf says
    again = ElfFile.open(out)
    sym = again.symbols_by_name["__raw_callee_save_c_save_fl"]
    assert sym.section_index == thunk_sec and again.sections[thunk_sec].name == ".text.pvpatch"


# -- jmp: tail ops -------------------------------------------------------------------

_TAIL_PROGRAM = {
    # A 2.6.30 iret site (template slot 48 / 45) calling through a zeroed pv_ops: unpatched
    # it calls address 0; patched to `jmp tail_ok` it prints "ok" and exits 0.
    "x86_64": (
        ".globl _start\n.text\n_start:\n771: call *pv_ops+48*8(%rip)\n772:\n"
        '.pushsection .parainstructions,"a"\n.balign 8\n.quad 771b\n.byte 48\n'
        ".byte 772b-771b\n.short 0x1ff\n.balign 8\n.popsection\nud2\n"
        ".globl tail_ok\ntail_ok:\nmov $1, %eax\nmov $1, %edi\nlea msg(%rip), %rsi\n"
        "mov $3, %edx\nsyscall\nmov $60, %eax\nxor %edi, %edi\nsyscall\n"
        '.data\nmsg: .ascii "ok\\n"\n.globl pv_ops\n.balign 8\npv_ops: .zero 8*120\n'
    ),
    "i386": (
        ".globl _start\n.text\n_start:\n771: call *pv_ops+45*4\n772:\n"
        '.pushsection .parainstructions,"a"\n.balign 4\n.long 771b\n.byte 45\n'
        ".byte 772b-771b\n.short 0xf\n.balign 4\n.popsection\nud2\n"
        ".globl tail_ok\ntail_ok:\nmov $4, %eax\nmov $1, %ebx\nmov $msg, %ecx\nmov $3, %edx\n"
        "int $0x80\nmov $1, %eax\nxor %ebx, %ebx\nint $0x80\n"
        '.data\nmsg: .ascii "ok\\n"\n.globl pv_ops\n.balign 4\npv_ops: .zero 4*120\n'
    ),
}


def test_jmp_at_a_tail_site(arch: str, tmp_path: Path) -> None:
    """`action = "jmp"` writes what GNU as writes for `jmp target` (bytes and relocation),
    and the linked program runs on into the target instead of calling through pv_ops."""
    bits = 64 if arch == "x86_64" else 32
    obj = tmp_path / "tail.o"
    (tmp_path / "tail.s").write_text(_TAIL_PROGRAM[arch])
    subprocess.run(["as", f"--{bits}", "-o", str(obj), str(tmp_path / "tail.s")], check=True)
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text('[ops."pv_cpu_ops.iret"]\naction = "jmp"\ntarget = "tail_ok"\n')
    out = tmp_path / "out.o"
    # control does not come back: nothing for verify to prove, so the skip is allowed
    proc = pvpatch_cli("patch", str(obj), "-o", str(out), "--backend", str(spec_file),
                       "--ops", f"catalog:linux-2.6.30-{arch}", "--json", "--allow-skip")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    [site] = doc["sites"]
    assert (site["op"], site["action"]) == ("pv_cpu_ops.iret", "jmp")
    assert doc["verify"]["sites"][0]["status"] == "skip"  # control does not come back
    # GNU as on `jmp tail_ok` (tail_ok undefined): the bytes and relocation to expect
    (tmp_path / "ref.s").write_text("jmp tail_ok\n")
    ref = tmp_path / "ref.o"
    subprocess.run(["as", f"--{bits}", "-o", str(ref), str(tmp_path / "ref.s")], check=True)
    want = pvpatch.open_elf(ref)
    want_text = want.section_data(want.section(".text"))  # type: ignore[arg-type]
    assert bytes.fromhex(site["after"])[:5] == want_text
    assert bytes.fromhex(site["after"])[5:] == ElfFile.open(out).arch.nop_fill(site["len"] - 5)

    def relocs(path: Path, sec: str) -> list[tuple[str, str]]:
        rows = _readelf("-r", str(path)).split(f"'{sec}'", 1)[1].split("\n\n", 1)[0]
        return [(r.split()[2], r.split()[4]) for r in rows.splitlines()
                if re.match(r"^[0-9a-f]{8,16} ", r)]

    rel = ".rela.text" if bits == 64 else ".rel.text"
    assert (relocs(ref, rel)[0][0], "tail_ok") in relocs(out, rel)
    m32 = ["-m32"] if bits == 32 else []
    for path, want_ok in ((obj, False), (out, True)):
        exe = tmp_path / f"{path.stem}.exe"
        subprocess.run(["gcc", *m32, "-nostdlib", "-static", "-Wl,--no-warn-execstack", "-o",
                        str(exe), str(path)], check=True)
        ran = run_prog(exe)
        assert (ran.returncode == 0 and ran.stdout == "ok\n") == want_ok, (path, ran)


@pytest.mark.parametrize(("body", "words"), [
    ('[ops."pv_cpu_ops.iret"]\naction = "jmp"\ntarget = "t"\ntail = false\n',
     "only for tail ops"),
    ('[ops."irq.save_fl"]\naction = "jmp"\ntarget = "t"\n', "returns to its site"),
    ('[ops."mine"]\naction = "jmp"\ntarget = "t"\naliases = ["irq.save_fl"]\n',
     "'irq.save_fl' returns to its site"),
])
def test_jmp_refused_where_control_must_come_back(body: str, words: str) -> None:
    with pytest.raises(pvpatch.SpecError, match=words) as err:
        parse_spec_text(body, ElfFile.open(FIX / "x86_64" / "prog.o").arch, "spec.toml")
    assert "spec.toml:1:" in str(err.value)


def test_jmp_by_type_number_is_kept_at_a_returning_op() -> None:
    """A spec naming the op by number (slot 30, irq.save_fl in 6.1) is resolved by the
    catalog at plan time: those sites are kept, with the reason."""
    res = pvpatch.load(FIX / "x86_64" / "kernel61.o", ops="catalog:linux-6.1-x86_64")
    plan = pvpatch.make_plan(res, parse_spec_text('[ops.30]\naction = "jmp"\ntarget = "t"\n',
                                                  res.arch))
    save_fl = [d for d in plan.decisions if d.site.op == "irq.save_fl"]
    assert save_fl and all(d.action == "keep" and "returns to its site" in (d.reason or "")
                           for d in save_fl)


# -- conventions of the object the thunks go into (return thunks, .return_sites, SLS) ----

RETHUNK_SPEC = FIX / "specs" / "rethunk.toml"
CAT64 = "catalog:linux-6.1-x86_64"
OBJTOOL = next(iter(sorted(Path("/usr/lib").glob("linux-kbuild-*/tools/objtool/objtool"))), None)

# fixture -> (return thunk used, int3 padding): what gcc was told (scripts/build-fixtures)
RETURN_CONVENTIONS = {
    "rethunk-sls.o": (True, True),
    "rethunk.o": (True, False),
    "sls.o": (False, True),
    "rethunk-plain.o": (False, False),
}


def _rela(path: Path, section: str) -> list[tuple[int, str, str, int]]:
    """(offset, type, symbol, addend) of `.rela<section>`, as readelf prints them."""
    text = _readelf("-r", str(path))
    head = f"Relocation section '.rela{section}'"
    if head not in text:
        return []
    rows = text.split(head, 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    out = []
    for row in rows:
        m = re.match(r"([0-9a-f]+)\s+[0-9a-f]+\s+(\S+)\s+[0-9a-f]+\s+(.+?)\s+([+-])\s+([0-9a-f]+)$",
                     row.strip())
        assert m, row
        addend = int(m[5], 16) * (-1 if m[4] == "-" else 1)
        out.append((int(m[1], 16), m[2], m[3], addend))
    return out


def _symbols(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (value, section index, size) of the defined symbols (readelf -s)."""
    out = {}
    for line in _readelf("-s", str(path)).splitlines():
        f = line.split()
        if len(f) == 8 and f[6].isdigit():
            out[f[7]] = (int(f[1], 16), int(f[6]), int(f[2]))
    return out


def _sections(path: Path) -> dict[str, list[str]]:
    """name -> readelf -S columns after the name (type, addr, off, size, es, flags...), in
    section-index order (index 0 is the null section, named "NULL" here)."""
    out = {}
    for line in _readelf("-S", str(path)).splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+(.*)$", line)
        if m:
            out[m[1]] = m[2].split()
    return out


def _objdump(path: Path, section: str) -> list[tuple[int, str, str]]:
    """(offset, mnemonic, the rest) of every instruction objdump -dr finds in `section`,
    with relocations folded into the instruction they patch."""
    text = subprocess.run(["objdump", "-dr", "-j", section, str(path)], capture_output=True,
                          text=True, check=True).stdout
    out: list[tuple[int, str, str]] = []
    for line in text.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\t(?:[0-9a-f]{2} )+\s*\t(\S+)\s*(.*)$", line)
        if m:
            out.append((int(m[1], 16), m[2], m[3]))
        elif (r := re.match(r"\s*[0-9a-f]+: (R_\S+)\s+(\S+)", line)) and out:
            off, mnem, rest = out[-1]
            out[-1] = (off, mnem, f"{rest} <{r[1]} {r[2]}>")
    return out


def _patch_lib(src: Path, spec: Path | str, ops: str = CAT64) -> bytes:
    res = pvpatch.load(src, ops=ops)
    text = spec.read_text() if isinstance(spec, Path) else spec
    return pvpatch.apply_plan(pvpatch.make_plan(res, parse_spec_text(text, res.arch))).data


@pytest.mark.parametrize("name", sorted(RETURN_CONVENTIONS))
def test_conventions_are_read_from_the_code(name: str) -> None:
    """What pvpatch reads from each fixture is what gcc was told, as objdump shows it:
    return jmps relocated against __x86_return_thunk, int3 after indirect jmps/rets."""
    from pvpatch.rewrite.thunk import file_conventions

    rethunk, sls = RETURN_CONVENTIONS[name]
    path = FIX / "x86_64" / name
    insns = _objdump(path, ".text")
    returns = [i for i in insns if "__x86_return_thunk" in i[2]]
    assert bool(returns) == rethunk and all(i[1] == "jmp" for i in returns)
    ends = [k for k, i in enumerate(insns) if i[1] == "ret" or
            (i[1] == "jmp" and i[2].startswith("*"))]
    assert ends and all((insns[k + 1][1] == "int3") == sls for k in ends if k + 1 < len(insns))
    conv = file_conventions(pvpatch.open_elf(path))
    assert (conv.returns.symbol == "__x86_return_thunk") == rethunk
    assert conv.listed == rethunk  # relocatable: listed, in a table made if need be
    assert conv.padding == (b"\xcc" if sls else b"")


@pytest.mark.parametrize("name", sorted(RETURN_CONVENTIONS))
def test_thunks_follow_the_object(name: str, tmp_path: Path) -> None:
    """The thunks' return is the object's: `jmp __x86_return_thunk` (PLT32, addend -4) listed
    in .return_sites (appended to the table, or the table made as objtool makes it), or a
    bare ret; an int3 after it in SLS builds.  ld -r and eu-elflint accept the output."""
    rethunk, sls = RETURN_CONVENTIONS[name]
    src = FIX / "x86_64" / name
    out = tmp_path / name
    out.write_bytes(_patch_lib(src, RETHUNK_SPEC))
    syms = _symbols(out)
    thunks = {n: v for n, v in syms.items() if n.startswith("__raw_callee_save_")}
    assert set(thunks) == {"__raw_callee_save_c_save_fl", "__raw_callee_save_c_irq_disable"}
    insns = _objdump(out, ".text.pvpatch")
    returns: list[int] = []
    for start, _ndx, size in thunks.values():
        body = [i for i in insns if start <= i[0] < start + size]
        mnems = [i[1] for i in body]
        # pushes, lea, call, lea, pops, then the return (and int3), nothing after
        last = len(mnems) - (2 if sls else 1)
        end = body[last]
        if rethunk:
            assert end[1] == "jmp" and "<R_X86_64_PLT32 __x86_return_thunk-0x4>" in end[2]
        else:
            assert end[1] == "ret"
        assert mnems[last + 1 :] == (["int3"] if sls else [])
        assert "ret" not in mnems[:last] and mnems.count("call") == 1
        returns.append(end[0])
    sections = _sections(out)
    listed = _rela(out, ".return_sites")
    before = _rela(src, ".return_sites")
    if not rethunk:
        assert ".return_sites" not in sections and not listed
    else:
        # the compiler's returns stay listed, each thunk's jmp is added after them
        assert listed[: len(before)] == before
        new = listed[len(before) :]
        assert [(o, t) for o, t, _s, _a in new] == [(len(before) * 4 + 4 * k, "R_X86_64_PC32")
                                                   for k in range(len(thunks))]
        assert sorted(thunks[s][0] + a for _o, _t, s, a in new) == sorted(returns)
        table = sections[".return_sites"]
        assert table[0] == "PROGBITS" and table[5] == "A" and table[-1] == "1"  # flags, align
        if not before:  # made here: as objtool makes it, entsize 4, no group
            assert table[4] == "04"
        rela = sections[".rela.return_sites"]
        assert rela[5] == "I" and "G" not in rela[5]
        names = list(sections)
        assert int(rela[-2]) == names.index(".return_sites")  # sh_info
        assert int(rela[-3]) == names.index(".symtab")  # sh_link
    subprocess.run(["ld", "-r", "-o", str(tmp_path / "again.o"), str(out)], check=True)
    assert subprocess.run(["eu-elflint", "--gnu-ld", "-q", str(out)]).returncode == 0


@pytest.mark.skipif(OBJTOOL is None, reason="objtool (linux-kbuild-6.1) is not installed")
@pytest.mark.parametrize("follow", [True, False], ids=["conventions", "bare-ret-control"])
def test_objtool_agrees(follow: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's own tool as the judge: objtool --rethunk --sls finds nothing to say about
    the thunk, and rebuilding .return_sites from scratch lists exactly what pvpatch listed.
    A thunk made with a bare ret (the control) gets objtool's SLS warning and is not
    listed: the check can fail."""
    import pvpatch.rewrite.stage
    from pvpatch.rewrite.thunk import PLAIN

    assert OBJTOOL is not None
    if not follow:
        monkeypatch.setattr(pvpatch.rewrite.stage, "file_conventions", lambda _elf, _sec: PLAIN)
    out = tmp_path / "out.o"
    out.write_bytes(_patch_lib(FIX / "x86_64" / "rethunk-sls.o",
                               '[ops."irq.save_fl"]\naction = "call"\ntarget = "c_save_fl"\n'))
    check = tmp_path / "check.o"
    check.write_bytes(out.read_bytes())
    said = subprocess.run([str(OBJTOOL), "--rethunk", "--sls", "--module", "--dry-run",
                           str(check)], capture_output=True, text=True).stderr
    assert ("__raw_callee_save_c_save_fl" in said) != follow, said
    rebuilt = tmp_path / "rebuilt.o"
    subprocess.run(["objcopy", "--remove-section=.return_sites",
                    "--remove-section=.rela.return_sites", str(out), str(rebuilt)], check=True)
    subprocess.run([str(OBJTOOL), "--rethunk", "--sls", "--module", str(rebuilt)],
                   capture_output=True, check=True)

    def places(path: Path) -> set[tuple[str, int]]:
        """(section, offset) of every instruction the table lists."""
        syms = _symbols(path)
        sections = list(_sections(path))
        rows = set()
        for _o, _t, sym, addend in _rela(path, ".return_sites"):
            if sym in sections:  # objtool: the section symbol plus the offset
                rows.add((sym, addend))
            else:
                value, ndx, _size = syms[sym]
                rows.add((sections[ndx], value + addend))
        return rows

    ours, objtool = places(out), places(rebuilt)
    assert any(sec == ".text.pvpatch" for sec, _off in objtool) == follow
    if follow:
        assert ours == objtool


def _return_sites_resolve(exe: Path) -> int:
    """Every .return_sites entry of a linked file, read as the kernel's apply_returns reads
    it (s32 relative to itself), lands on `jmp __x86_return_thunk`; returns the count."""
    elf = ElfFile.open(exe)
    table = elf.section(".return_sites")
    thunk = elf.symbols_by_name["__x86_return_thunk"].value
    assert table is not None
    data = elf.section_data(table)
    for k in range(0, len(data), 4):
        at = table.addr + k + int.from_bytes(data[k : k + 4], "little", signed=True)
        off = elf.addr_to_offset(at)
        assert off is not None
        insn = elf.data[off : off + 5]
        assert insn[0] == 0xE9, (hex(at), insn.hex())
        assert at + 5 + int.from_bytes(insn[1:], "little", signed=True) == thunk
    return len(data) // 4


def test_rethunk_program_object_links_and_runs(spec: Path, tmp_path: Path) -> None:
    """prog-rethunk.o (every return `jmp __x86_return_thunk`, listed) patched with thunks,
    then linked with its own `__x86_return_thunk: ret; int3`: it runs, and in the linked
    program every .return_sites entry, the thunks' included, is a jmp to the return thunk."""
    src = FIX / "x86_64" / "prog-rethunk.o"
    out = tmp_path / "p.o"
    proc = pvpatch_cli("patch", str(src), "-o", str(out), "--backend", str(spec), "--ops",
                       "none", "--json")
    assert proc.returncode == 0, proc.stderr
    thunks = json.loads(proc.stdout)["thunks"]
    assert len(thunks) == 4
    assert len(_rela(out, ".return_sites")) == len(_rela(src, ".return_sites")) + 4
    thunk_obj = tmp_path / "rt.o"
    subprocess.run(["gcc", "-c", str(FIX / "src" / "return_thunk.S"), "-o", str(thunk_obj)],
                   check=True)
    exe = tmp_path / "prog"
    subprocess.run(["gcc", "-no-pie", "-o", str(exe), str(out), str(thunk_obj)], check=True)
    ran = run_prog(exe)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout + ran.stderr
    # the thunks' entries resolve too: 4 more than the unpatched object linked alike
    plain = tmp_path / "plain"
    subprocess.run(["gcc", "-no-pie", "-o", str(plain), str(src), str(thunk_obj)], check=True)
    assert _return_sites_resolve(exe) == _return_sites_resolve(plain) + 4


def test_rethunk_program_linked(spec: Path, tmp_path: Path) -> None:
    """A linked program with .return_sites: the thunks jmp to the address of its
    __x86_return_thunk and the table (bounds fixed at link time) is left as it was."""
    src = FIX / "x86_64" / "prog-rethunk"
    out = tmp_path / "prog"
    out.write_bytes(_patch_lib(src, spec, "none"))
    out.chmod(0o755)
    ran = run_prog(out)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout + ran.stderr
    want = _symbols(src)["__x86_return_thunk"][0]
    insns = _objdump(out, ".text.pvpatch")
    jumps = [i for i in insns if i[1] == "jmp"]
    assert len(jumps) == 4 and not any(i[1] == "ret" for i in insns)
    assert all(int(j[2].split()[0], 16) == want for j in jumps), jumps
    table = ElfFile.open(src).section(".return_sites")
    after = ElfFile.open(out).section(".return_sites")
    assert table is not None and after is not None
    assert ElfFile.open(out).section_data(after) == ElfFile.open(src).section_data(table)
    assert _return_sites_resolve(out) == _return_sites_resolve(src)


def test_linked_file_without_its_return_thunk_is_refused(spec: Path, tmp_path: Path) -> None:
    """.return_sites but no __x86_return_thunk in .symtab or an export table: nowhere to
    return through, so nothing is written (one line, exit 2)."""
    stripped = tmp_path / "prog"
    subprocess.run(["objcopy", "--strip-symbol=__x86_return_thunk",
                    str(FIX / "x86_64" / "prog-rethunk"), str(stripped)], check=True)
    out = tmp_path / "out"
    proc = pvpatch_cli("patch", str(stripped), "-o", str(out), "--backend", str(spec),
                       "--ops", "none")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert ".return_sites" in proc.stderr and "__x86_return_thunk" in proc.stderr
    assert not out.exists()


def test_i386_return_thunks(spec: Path, tmp_path: Path) -> None:
    """The same conventions on i386 (REL: the addends are in the bytes): prog.c built with
    -m32 -mfunction-return=thunk-extern and no table; the thunks' returns get one, the
    program links with its return thunk and runs."""
    obj, out = tmp_path / "p.o", tmp_path / "out.o"
    subprocess.run(["gcc", "-m32", "-O2", "-fno-pie", "-fno-stack-protector",
                    "-fcf-protection=none", "-mfunction-return=thunk-extern", "-I",
                    str(FIX / "src"), "-c", str(FIX / "src" / "prog.c"), "-o", str(obj)],
                   check=True)
    out.write_bytes(_patch_lib(obj, spec, "none"))
    text = _readelf("-r", str(out))
    rel = text.split("Relocation section '.rel.return_sites'", 1)[1].split("\n\n", 1)[0]
    rows = [r.split() for r in rel.splitlines()[2:]]
    assert len(rows) == 4 and {r[2] for r in rows} == {"R_386_PC32"}
    assert {r[4] for r in rows} <= set(_symbols(out))  # against the thunks' symbols
    insns = _objdump(out, ".text.pvpatch")
    jumps = [i for i in insns if i[1] == "jmp"]
    assert len(jumps) == 4 and all("<R_386_PC32 __x86_return_thunk>" in j[2] for j in jumps)
    rt = tmp_path / "rt.o"
    subprocess.run(["gcc", "-m32", "-c", str(FIX / "src" / "return_thunk.S"), "-o", str(rt)],
                   check=True)
    exe = tmp_path / "prog"
    subprocess.run(["gcc", "-m32", "-no-pie", "-o", str(exe), str(out), str(rt)], check=True)
    ran = run_prog(exe)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout + ran.stderr
    assert _return_sites_resolve(exe) == 4


@pytest.mark.corpus
def test_debian_modules_thunks_return_through_the_return_thunk(tmp_path: Path) -> None:
    """Debian 6.1's modules (CONFIG_RETHUNK, no bare ret) patched with the QEMU harness's
    thunk spec: every thunk ends in `jmp __x86_return_thunk` (PLT32, -4, as readelf shows)
    and is listed in .return_sites; every module is still accepted by ld -r."""
    import corpus
    from qemu.harness import THUNK_SPEC

    vmlinux = corpus.x86_64_vmlinux()
    assert vmlinux is not None
    checked = 0
    for ko in corpus.x86_64_pv_modules():
        res = pvpatch.load(ko, ops=f"btf:{vmlinux}")
        plan = pvpatch.make_plan(res, parse_spec_text(THUNK_SPEC, res.arch))
        if not plan.thunks:
            continue
        rw = pvpatch.apply_plan(plan, symvers=vmlinux)
        out = tmp_path / ko.name
        out.write_bytes(rw.data)
        syms = _symbols(out)
        jumps = {(r[0], r[3]) for r in _rela(out, ".text.pvpatch")
                 if r[2] == "__x86_return_thunk" and r[1] == "R_X86_64_PLT32"}
        listed = {syms[s][0] + a for _o, _t, s, a in _rela(out, ".return_sites")
                  if s.startswith("__raw_callee_save_")}
        for t in rw.thunks:
            # its last instruction (Debian's modules have no SLS evidence: no int3 after)
            jmp_at = t.offset + t.size - 5
            assert (jmp_at + 1, -4) in jumps, (ko.name, t.spec.symbol)
            assert jmp_at in listed, (ko.name, t.spec.symbol)
            assert t.conventions.padding == b""
        assert len(_rela(out, ".return_sites")) == len(_rela(ko, ".return_sites")) + \
            len(rw.thunks)
        subprocess.run(["ld", "-r", "-o", str(tmp_path / "again.o"), str(out)], check=True)
        checked += 1
    assert checked > 20
