"""Injected thunks are first-class code: named in linked files, described by DWARF CFI
in objects and linked files, and unwound through by gdb and glibc's backtrace().

Every expectation comes from a tool other than pvpatch: nm, readelf, objdump (the
thunk's own instructions give the stack offsets the CFI must state), gdb, a real link
with gcc and a run of the program."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from clirun import pvpatch_cli
from paths import FIX

SPEC = FIX / "specs" / "prog.toml"
WORD = {"x86_64": 8, "i386": 4}
THUNKS = ("__raw_callee_save_prog_irq_disable", "__raw_callee_save_prog_irq_enable",
          "__raw_callee_save_prog_save_fl", "__raw_callee_save_prog_restore_fl")


def run(*args: str, **kw: object) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True,
                          timeout=120, **kw).stdout  # type: ignore[call-overload, no-any-return]


def patch(src: Path, out: Path, *extra: str) -> dict[str, object]:
    proc = pvpatch_cli("patch", str(src), "-o", str(out), "--backend", str(SPEC), "--ops",
                       "none", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    report: dict[str, object] = json.loads(proc.stdout)
    return report


def nm_symbols(path: Path) -> dict[str, tuple[int, str]]:
    """name -> (value, type letter), from nm."""
    out = {}
    for line in run("nm", str(path)).splitlines():
        parts = line.split()
        if len(parts) == 3:
            out[parts[2]] = (int(parts[0], 16), parts[1])
    return out


def objdump_cfa(path: Path, symbol: str, word: int) -> dict[int, int]:
    """Address of each instruction of `symbol` -> CFA offset from the stack pointer at it,
    worked out from objdump's disassembly: the call that entered pushed one word, each
    push/pop moves it by a word, `lea N(%rsp),%rsp` by N."""
    dis = run("objdump", "-d", "--no-show-raw-insn", "-M", "suffix", str(path))
    body = dis.split(f"<{symbol}>:\n", 1)[1].split("\n\n", 1)[0]
    cfa = word
    out = {}
    for line in body.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(\S+)\s*(.*)", line)
        if not m:
            continue
        addr, mnem, ops = int(m.group(1), 16), m.group(2), m.group(3)
        out[addr] = cfa
        if mnem.startswith("ret"):
            break  # what follows is padding
        if mnem.startswith("push"):
            cfa += word
        elif mnem.startswith("pop"):
            cfa -= word
        elif mnem.startswith("lea") and re.fullmatch(r"(-?0x[0-9a-f]+)\(%[er]sp\),%[er]sp",
                                                      ops.split("#")[0].strip()):
            cfa -= int(ops.split("(")[0], 16)
    return out


def readelf_cfa(path: Path, start: int, end: int, word: int) -> dict[int, str]:
    """readelf -wF's interpreted table for the FDE covering [start, end): LOC -> CFA."""
    table = run("readelf", "-wF", str(path))
    width = 16 if word == 8 else 8
    for block in table.split("\n\n"):
        if re.search(rf"FDE cie=\S+ pc=0*{start:x}\.\.0*{end:x}\b", block):
            rows = {}
            for line in block.split("LOC", 1)[1].splitlines():
                m = re.match(rf"([0-9a-f]{{{width}}}) (\S+)", line)
                if m:
                    rows[int(m.group(1), 16)] = m.group(2)
            return rows
    raise AssertionError(f"no FDE for {start:#x} in readelf -wF")


def check_cfi(path: Path, thunk: str, addr: int, word: int) -> int:
    """The CFI readelf decodes for the thunk at `addr` states, at every instruction, the
    CFA its pushes, lea and pops give (objdump); returns the rows checked."""
    want = objdump_cfa(path, thunk, word)
    rows = readelf_cfa(path, addr, max(want) + 1, word)  # the thunk ends in a ret
    sp = "rsp" if word == 8 else "esp"
    assert min(rows) == addr == min(want)
    locs = sorted(rows)
    for insn, cfa in want.items():
        row = max(k for k in locs if k <= insn)
        assert rows[row] == f"{sp}+{cfa}", (thunk, hex(insn), rows[row], cfa)
    return len(want)


# -- 1. symbols in linked files ------------------------------------------------------------


@pytest.mark.parametrize("name", ["prog", "prog-pie", "libprog.so"])
def test_linked_thunks_have_symbols(arch: str, name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    report = patch(FIX / arch / name, out, "--no-verify")
    thunks = {t["symbol"]: t for t in report["thunks"]}  # type: ignore[attr-defined]
    assert set(thunks) == set(THUNKS)
    syms = nm_symbols(out)
    sections = run("readelf", "-S", "-W", str(out))
    index = int(re.search(r"\[\s*(\d+)\] \.text\.pvpatch ", sections).group(1))  # type: ignore[union-attr]
    table = run("readelf", "-s", "-W", str(out))
    dis = run("objdump", "-d", "-j", ".text.pvpatch", str(out))
    for sym, t in thunks.items():
        assert syms[sym] == (t["address"], "t")  # a local text symbol where it was placed
        line = next(ln for ln in table.splitlines() if ln.endswith(" " + sym))
        f = line.split()
        size = max(objdump_cfa(out, sym, WORD[arch])) + 1 - t["address"]  # to its ret
        assert (f[3], f[4], int(f[2]), int(f[6])) == ("FUNC", "LOCAL", size, index)
        assert f"{t['address']:0{WORD[arch] * 2}x} <{sym}>:" in dis
    # readelf -s lists the locals first: .symtab's sh_info is still the first global
    rows = [ln.split() for ln in table.split("Symbol table '.symtab'")[1].splitlines()
            if re.match(r"\s*\d+:", ln)]
    binds = [r[4] for r in rows]
    first_global = next(k for k, b in enumerate(binds) if b != "LOCAL")
    assert "LOCAL" not in binds[first_global:]
    symtab = next(ln for ln in sections.splitlines() if " .symtab " in ln).split()
    assert int(symtab[-2]) == first_global  # sh_info
    # gdb names an address inside a thunk
    some = thunks[THUNKS[0]]
    said = run("gdb", "-batch", "-nx", "-ex", f"info symbol {some['address'] + 1:#x}", str(out))
    assert f"{THUNKS[0]} + 1 in section .text.pvpatch" in said


# -- 2. DWARF CFI --------------------------------------------------------------------------


def test_object_gets_fdes_the_linker_keeps(arch: str, tmp_path: Path) -> None:
    out = tmp_path / "prog-bt.o"
    report = patch(FIX / arch / "prog-bt.o", out, "--no-verify")
    word = WORD[arch]
    syms = {s.split()[-1]: s.split() for s in run("readelf", "-s", "-W", str(out)).splitlines()
            if s.strip().endswith(THUNKS)}
    # one PC32 relocation per thunk in .eh_frame's relocation section, against the thunk
    rel = run("readelf", "-r", "-W", str(out))
    part = rel.split(".eh_frame' at offset")[1].split("\n\n")[0]
    pc32 = "R_X86_64_PC32" if arch == "x86_64" else "R_386_PC32"
    named = [ln.split()[4] for ln in part.splitlines() if pc32 in ln and
             ln.split()[4].startswith("__raw_callee_save")]
    assert sorted(named) == sorted(THUNKS)
    # readelf applies those relocations: each FDE covers its thunk, rules as objdump says
    for t in report["thunks"]:  # type: ignore[attr-defined]
        assert int(syms[t["symbol"]][1], 16) == t["offset"]
        assert check_cfi(out, t["symbol"], t["offset"], word) > 4
    # linked by gcc/ld: ld merges the FDEs into the program's .eh_frame (and its header)
    exe = tmp_path / "prog-bt"
    m32 = ["-m32"] if arch == "i386" else []
    linked = subprocess.run(["gcc", *m32, "-no-pie", "-o", str(exe), str(out)],
                            capture_output=True, text=True)
    assert linked.returncode == 0 and not linked.stderr, linked.stderr
    addrs = nm_symbols(exe)
    for sym in THUNKS:
        check_cfi(exe, sym, addrs[sym][0], word)
    hdr = run("readelf", "--debug-dump=frames", str(exe))
    assert hdr.count("FDE") >= 4 + run("readelf", "--debug-dump=frames",
                                       str(FIX / arch / "prog-bt")).count("FDE")


def test_kernel_object_gets_no_eh_frame(tmp_path: Path) -> None:
    """Kernel objects carry no .eh_frame (ORC describes their frames): none is added."""
    out = tmp_path / "k.o"
    spec = tmp_path / "s.toml"
    spec.write_text('[ops."irq.irq_disable"]\naction = "call"\ntarget = "xen_irq_disable"\n')
    proc = pvpatch_cli("patch", str(FIX / "x86_64" / "kernel61.o"), "-o", str(out),
                       "--backend", str(spec), "--ops", "catalog:linux-6.1-x86_64",
                       "--no-verify", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["thunks"]
    assert ".eh_frame" not in run("readelf", "-S", "-W", str(out))


@pytest.mark.parametrize("name", ["prog-bt", "prog-bt-pie", "libprog-bt.so"])
def test_linked_file_gets_new_eh_frame_and_header(arch: str, name: str,
                                                  tmp_path: Path) -> None:
    src = FIX / arch / name
    out = tmp_path / name
    report = patch(src, out, "--no-verify")
    word = WORD[arch]
    for t in report["thunks"]:  # type: ignore[attr-defined]
        check_cfi(out, t["symbol"], t["address"], word)
    # every FDE of the original is still there, each covering the same code
    def fdes(path: Path) -> list[str]:
        return re.findall(r"FDE cie=\S+ (pc=\S+)", run("readelf", "--debug-dump=frames",
                                                       str(path)))
    old, new = fdes(src), fdes(out)
    assert new[: len(old)] == old and len(new) == len(old) + 4
    # PT_GNU_EH_FRAME names the new .eh_frame_hdr, inside the new R+X segment
    ph = run("readelf", "-l", "-W", str(out))
    eh = next(ln.split() for ln in ph.splitlines() if ln.strip().startswith("GNU_EH_FRAME"))
    load = [ln.split() for ln in ph.splitlines() if ln.strip().startswith("LOAD")][-1]
    secs = run("readelf", "-S", "-W", str(out))
    hdr = re.search(r"\.eh_frame_hdr\s+PROGBITS\s+([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+)", secs)
    assert hdr is not None
    assert (int(eh[2], 16), int(eh[1], 16), int(eh[4], 16)) == \
        (int(hdr.group(1), 16), int(hdr.group(2), 16), int(hdr.group(3), 16))
    lo, size = int(load[2], 16), int(load[5], 16)
    assert lo <= int(eh[2], 16) < lo + size and load[-3:-1] == ["R", "E"]
    # the header's table: readelf -x shows fde_count = every FDE
    raw = run("readelf", "-x", ".eh_frame_hdr", str(out))
    first = next(ln for ln in raw.splitlines() if ln.strip().startswith("0x"))
    data = bytes.fromhex("".join(first.split()[1:4]))  # the first 12 bytes
    assert data[:4] == bytes([1, 0x1B, 0x03, 0x3B])
    assert int.from_bytes(data[8:12], "little") == len(new)
    # the labels in the tables (__GNU_EH_FRAME_HDR, __FRAME_END__) moved with them: elflint
    # finds nothing wrong with the symbols or the tables
    lint = subprocess.run(["eu-elflint", "--gnu-ld", str(out)], capture_output=True,
                          text=True).stdout
    assert not [ln for ln in lint.splitlines() if "symtab" in ln or "eh_frame" in ln], lint
    syms = nm_symbols(out)
    assert syms["__GNU_EH_FRAME_HDR"][0] == int(hdr.group(1), 16)


# -- 3. gdb and glibc's backtrace() walk through the thunk ---------------------------------


def _program(arch: str, kind: str, tmp_path: Path, patched: bool) -> Path:
    """A runnable program of `kind`, patched or not, in its own folder."""
    where = tmp_path / ("patched" if patched else "orig")
    where.mkdir(exist_ok=True)
    src = FIX / arch
    m32 = ["-m32"] if arch == "i386" else []
    if kind == "so":
        shutil.copy(src / "prog-bt-so", where / "prog-bt-so")
        lib = where / "libprog-bt.so"
        if patched:
            patch(src / "libprog-bt.so", lib, "--no-verify")
        else:
            shutil.copy(src / "libprog-bt.so", lib)
        return where / "prog-bt-so"
    if kind == "object":
        obj = where / "prog-bt.o"
        if patched:
            patch(src / "prog-bt.o", obj, "--no-verify")
        else:
            shutil.copy(src / "prog-bt.o", obj)
        exe = where / "prog-bt"
        run("gcc", *m32, "-no-pie", "-o", str(exe), str(obj))
        return exe
    name = {"exec": "prog-bt", "pie": "prog-bt-pie"}[kind]
    exe = where / name
    if patched:
        patch(src / name, exe, "--no-verify")
    else:
        shutil.copy(src / name, exe)
    return exe


def gdb_frames(exe: Path) -> list[str]:
    out = run("gdb", "-batch", "-nx", "-ex", "set breakpoint pending on", "-ex",
              "break prog_irq_disable", "-ex", "run", "-ex", "bt", str(exe), cwd=exe.parent)
    return re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\S+) \(", out, re.M)


KINDS = ("exec", "pie", "so", "object")


@pytest.mark.parametrize("kind", KINDS)
def test_gdb_backtrace_goes_through_the_thunk(arch: str, kind: str, tmp_path: Path) -> None:
    before = gdb_frames(_program(arch, kind, tmp_path, False))
    after = gdb_frames(_program(arch, kind, tmp_path, True))
    top = "prog_main" if kind == "so" else "main"
    assert before[:2] == ["prog_irq_disable", "site_irq_disable"] and top in before
    # exactly one frame more, named after the thunk, and the same frames up to main
    assert after == [before[0], "__raw_callee_save_prog_irq_disable", *before[1:]], after


def backtrace_frames(exe: Path, patched: bool) -> list[tuple[str, str | None, int]]:
    """(object, name, address) of each frame glibc's backtrace() printed: the name when
    glibc found one (an exported function), else the address to look up, as a link-time
    address (`(+off)` of a PIE or shared object, else absolute)."""
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=20,
                          env={**os.environ, "PVPATCH_BACKTRACE": "1"}, cwd=exe.parent)
    # unpatched, the targets break the register promise: the program says so and exits 1
    assert (proc.returncode, proc.stdout.strip() == "ok") == ((0, True) if patched
                                                            else (1, False)), proc.stdout
    out: list[tuple[str, str | None, int]] = []
    for line in proc.stderr.splitlines():
        if "register(s) changed" in line or " returned " in line:
            continue
        m = re.fullmatch(r"([^(\[]+)(?:\(([^)+]*)\+(0x[0-9a-f]+)\))?\s*\[(0x[0-9a-f]+)\]", line)
        assert m, line
        path, name, off, addr = m.groups()
        if name:
            out.append((path, name, 0))
        else:
            out.append((path, None, int(off or addr, 16)))
    return out


def _name(path: str, name: str | None, addr: int,
          cache: dict[str, list[tuple[int, int, str]]]) -> str:
    if name is not None:
        return name
    if Path(path).name.startswith("libc."):  # not ours: not looked up
        return "?"
    if path not in cache:
        rows = []
        for line in run("nm", "-S", "--defined-only", path).splitlines():
            p = line.split()
            if len(p) == 4 and p[2].lower() == "t":
                rows.append((int(p[0], 16), int(p[1], 16), p[3]))
        cache[path] = rows
    # a return address is just past its call: the caller holds addr - 1
    return next((n for v, s, n in cache[path] if v <= addr - 1 < v + s), "?")


@pytest.mark.parametrize("kind", KINDS)
def test_glibc_backtrace_goes_through_the_thunk(arch: str, kind: str, tmp_path: Path) -> None:
    names = {}
    for patched in (False, True):
        exe = _program(arch, kind, tmp_path, patched)
        cache: dict[str, list[tuple[int, int, str]]] = {}
        names[patched] = [_name(p, n, a, cache) for p, n, a in backtrace_frames(exe, patched)]
    before, after = names[False], names[True]
    top = "prog_main" if kind == "so" else "main"
    assert before[:2] == ["prog_irq_disable", "site_irq_disable"] and top in before, before
    # one frame more, in the thunk; then the same frames, main among them
    assert after == [before[0], "__raw_callee_save_prog_irq_disable", *before[1:]], after


# -- 4. verify proves the unwind data -------------------------------------------------------


def _fde_at(path: Path, start: int, end: int) -> tuple[int, int]:
    """(file offset, length) of the FDE readelf shows for [start, end)."""
    frames = run("readelf", "--debug-dump=frames", str(path))
    m = re.search(rf"^([0-9a-f]+) ([0-9a-f]+) [0-9a-f]+ FDE cie=\S+ pc=0*{start:x}\.\.0*{end:x}\b",
                  frames, re.M)
    assert m, frames[-2000:]
    secs = run("readelf", "-S", "-W", str(path))
    sec = re.search(r"\.eh_frame\s+\S+\s+[0-9a-f]+ ([0-9a-f]+) ", secs)
    assert sec
    return int(sec.group(1), 16) + int(m.group(1), 16), int(m.group(2), 16) + 4


@pytest.mark.parametrize("name", ["prog.o", "prog-pie"])
@pytest.mark.parametrize("fault", ["cfa", "slot"])
def test_verify_fails_a_thunk_whose_cfi_is_off_by_one_push(arch: str, name: str, fault: str,
                                                           tmp_path: Path) -> None:
    import pvpatch
    from pvpatch.verify import verify_rewrite

    plan = pvpatch.make_plan(pvpatch.load(FIX / arch / name, ops="none"), str(SPEC))
    rw = pvpatch.apply_plan(plan)
    good = verify_rewrite(rw, trials=2, workers=1)
    assert [t.status for t in good.thunks] == ["pass"] * 4 and not good.unaccounted
    out = tmp_path / name
    out.write_bytes(rw.data)
    word = WORD[arch]
    thunk = next(t for t in rw.thunks if t.spec.symbol == THUNKS[0])
    start = thunk.address if thunk.address is not None else thunk.offset
    at, size = _fde_at(out, start, start + thunk.size)
    data = bytearray(rw.data)
    fde = bytes(data[at : at + size])
    if fault == "cfa":  # after the second push the CFA is 3 words up: say 4
        old, new = bytes([0x0E, 3 * word]), bytes([0x0E, 4 * word])
    else:  # the first register pushed (rcx / ecx) is 2 words below the CFA: say 3
        col = 2 if arch == "x86_64" else 1
        old, new = bytes([0x80 | col, 2]), bytes([0x80 | col, 3])
    k = fde.index(old, 16)
    data[at + k : at + k + 2] = new
    bad = verify_rewrite(rw.with_image(bytes(data)), trials=2, workers=1)
    verdicts = {t.symbol: t for t in bad.thunks}
    failed = verdicts[THUNKS[0]]
    assert failed.status == "fail", failed
    assert failed.reason is not None and f"at {THUNKS[0]}+0x" in failed.reason
    sp = "rsp" if arch == "x86_64" else "esp"
    if fault == "cfa":
        assert f"CFA = {sp}+{4 * word}" in failed.reason and f"{sp}+{3 * word}" in failed.reason
    else:
        reg = "rcx" if arch == "x86_64" else "ecx"
        assert f"{reg} is saved at CFA-{3 * word}" in failed.reason, failed.reason
    assert all(verdicts[t].status == "pass" for t in THUNKS[1:])


# -- 5. kernel ORC ------------------------------------------------------------------------

OBJTOOL = Path("/usr/lib/linux-kbuild-6.1/tools/objtool/objtool")
# The 6.1 build's objtool actions (CONFIG_RETPOLINE, RETHUNK, SLS, uaccess validation) on a
# finished module; --orc is left out: objtool skips a file that has ORC already.
KERNEL_FLAGS = ("--sls", "--rethunk", "--retpoline", "--uaccess", "--module", "--link",
                "--dry-run")
THUNK_SPEC = """arch = "x86_64"
[ops."irq.save_fl"]
action = "call"
target = "native_save_fl"
convention = "c"
[defaults]
action = "keep"
reason = "only irq.save_fl goes to a thunk"
"""
# struct orc_entry's u16 after the two s16 offsets (arch/x86/include/asm/orc_types.h):
# sp_reg:4 bp_reg:4 then type:2 end:1 (6.1) or type:3 signal:1 (6.4+, so 6.12); CALL is
# type 0 in 6.1 and 2 in 6.12; ORC_REG_SP 5, ORC_REG_UNDEFINED 0.
ORC_CALL_TYPE = {"6.1": (2, 0), "6.12": (3, 2)}


def _module(kernel: str, name: str, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(original .ko, patched .ko, vmlinux) for a corpus module sent through a thunk."""
    import corpus

    if kernel == "6.1":
        vmlinux = corpus.x86_64_vmlinux()
        assert vmlinux is not None
        src = next(p for p in corpus.x86_64_modules() if p.name == f"{name}.ko")
        orig = tmp_path / f"{name}.ko"
        shutil.copy(src, orig)
    else:
        vmlinux = corpus.x86_64_612_vmlinux()
        src = next(p for p in corpus.x86_64_612_modules() if p.name == f"{name}.ko.xz")
        orig = tmp_path / f"{name}.ko"
        orig.write_bytes(subprocess.run(["xz", "-dc", str(src)], capture_output=True,
                                        check=True).stdout)
    spec = tmp_path / "thunk.toml"
    spec.write_text(THUNK_SPEC)
    out = tmp_path / f"{name}-patched.ko"
    proc = pvpatch_cli("patch", str(orig), "-o", str(out), "--backend", str(spec), "--ops",
                       f"btf:{vmlinux}", "--symvers", str(vmlinux))
    assert proc.returncode == 0, proc.stderr  # verify (ORC included) ran and passed
    return orig, out, vmlinux


def _section_bytes(path: Path, name: str) -> bytes:
    secs = run("readelf", "-S", "-W", str(path))
    m = re.search(rf"\] {re.escape(name)}\s+\S+\s+[0-9a-f]+ ([0-9a-f]+) ([0-9a-f]+)", secs)
    assert m, name
    off, size = int(m.group(1), 16), int(m.group(2), 16)
    return path.read_bytes()[off : off + size]


def _orc_of(path: Path, symbol: str, kernel: str) -> dict[int, tuple[int, int, int, int]]:
    """Independent decoder: offset in `symbol` -> (sp_offset, sp_reg, bp_reg, type) of every
    entry whose .orc_unwind_ip relocation (readelf -r) names the symbol."""
    import struct

    bits, _call = ORC_CALL_TYPE[kernel]
    table = _section_bytes(path, ".orc_unwind")
    rel = run("readelf", "-r", "-W", str(path)).split(".rela.orc_unwind_ip' at offset")[1]
    rel = rel.split("\n\n")[0]
    out = {}
    for line in rel.splitlines():
        f = line.split()
        if len(f) >= 7 and f[4] == symbol:
            index = int(f[0], 16) // 4
            sp, _bp, word = struct.unpack_from("<hhH", table, 6 * index)
            out[int(f[6], 16) if f[5] == "+" else -int(f[6], 16)] = \
                (sp, word & 0xF, word >> 4 & 0xF, word >> 8 & ((1 << bits) - 1))
    return out


@pytest.mark.corpus
@pytest.mark.parametrize(("kernel", "name"), [("6.1", "8021q"), ("6.1", "team"),
                                              ("6.12", "8021q")])
def test_module_thunk_has_orc_entries(kernel: str, name: str, tmp_path: Path) -> None:
    orig, out, _vmlinux = _module(kernel, name, tmp_path)
    thunk = "__raw_callee_save_native_save_fl"
    want = objdump_cfa(out, thunk, 8)  # per instruction, from its pushes/lea/pops
    end = max(want) + 5  # the thunk returns with jmp __x86_return_thunk (e9 rel32)
    got = _orc_of(out, thunk, kernel)
    _bits, call = ORC_CALL_TYPE[kernel]
    assert got, "no ORC entry names the thunk"
    # an entry at the start and after every change; each states sp + the CFA offset
    offs = sorted(got)
    for insn, cfa in want.items():
        at = max(o for o in offs if o <= insn - min(want))
        assert got[at] == (cfa, 5, 0, call), (hex(insn), got[at], cfa)
    changes = [a - min(want) for a in want if a == min(want) or
               want[a] != want[max(b for b in want if b < a)]]
    assert [o for o in offs if o < end - min(want)] == changes
    # and a terminator (all zero) right after it
    assert got[end - min(want)] == (0, 0, 0, 0)
    # the original module's own entries are all still there
    assert _section_bytes(out, ".orc_unwind").startswith(_section_bytes(orig, ".orc_unwind"))
    if kernel != "6.1":
        return
    # objtool's own dump of the 6.1 format agrees
    dump = run(str(OBJTOOL), "--dump=orc", str(out))
    mine = [ln for ln in dump.splitlines() if ln.startswith(thunk + "+")]
    assert len(mine) == len(got)
    for ln in mine:
        m = re.match(rf"{thunk}\+([0-9a-f]+): sp:(\S+) bp:\(und\) type:call end:0", ln)
        assert m, ln
        off = int(m.group(1), 16)
        assert m.group(2) == (f"sp+{got[off][0]}" if got[off][1] == 5 else "(und)")
    before = run(str(OBJTOOL), "--dump=orc", str(orig)).count("\n")
    assert dump.count("\n") == before + len(got)


def _objtool(flags: tuple[str, ...], path: Path) -> set[str]:
    proc = subprocess.run([str(OBJTOOL), *flags, str(path)], capture_output=True, text=True,
                          timeout=120)
    return {ln.split(": ", 1)[1] for ln in (proc.stdout + proc.stderr).splitlines() if ": " in ln}


@pytest.mark.corpus
@pytest.mark.parametrize("name", ["8021q", "team"])
def test_objtool_reports_nothing_about_the_thunk(name: str, tmp_path: Path) -> None:
    orig, out, _vmlinux = _module("6.1", name, tmp_path)
    after = _objtool(KERNEL_FLAGS, out)
    assert not [w for w in after if "raw_callee_save" in w or "pvpatch" in w], after
    # What it does say, it said of the original too (with these actions, or, once the
    # site's indirect call is gone, the reachability check objtool then gets to run).
    before = _objtool(KERNEL_FLAGS, orig) | _objtool(
        ("--sls", "--uaccess", "--module", "--link", "--dry-run"), orig)
    assert after <= before, after - before


@pytest.mark.corpus
def test_verify_fails_a_thunk_whose_orc_entry_is_off_by_one_push(tmp_path: Path) -> None:
    import struct

    import corpus

    import pvpatch
    from pvpatch.plan.backend import parse_spec_text
    from pvpatch.verify import verify_rewrite

    vmlinux = corpus.x86_64_vmlinux()
    assert vmlinux is not None
    src = next(p for p in corpus.x86_64_modules() if p.name == "8021q.ko")
    scan = pvpatch.load(src, ops=f"btf:{vmlinux}")
    plan = pvpatch.make_plan(scan, parse_spec_text(THUNK_SPEC, scan.arch, "<spec>"))
    rw = pvpatch.apply_plan(plan, symvers=vmlinux)
    assert rw.unwind.startswith("orc")
    good = verify_rewrite(rw, trials=2, workers=1)
    assert [t.status for t in good.thunks] == ["pass"]
    out = tmp_path / "p.ko"
    out.write_bytes(rw.data)
    got = _orc_of(out, "__raw_callee_save_native_save_fl", "6.1")
    secs = run("readelf", "-S", "-W", str(out))
    m = re.search(r"\] \.orc_unwind\s+\S+\s+[0-9a-f]+ ([0-9a-f]+) ([0-9a-f]+)", secs)
    assert m
    table_at, size = int(m.group(1), 16), int(m.group(2), 16)
    # the entry after the third push (sp+32): one push too many (sp+40)
    data = bytearray(rw.data)
    table = bytes(data[table_at : table_at + size])
    k = next(i for i in range(len(table) // 6 - len(got), len(table) // 6)
             if struct.unpack_from("<h", table, 6 * i)[0] == 32)
    struct.pack_into("<h", data, table_at + 6 * k, 40)
    bad = verify_rewrite(rw.with_image(bytes(data)), trials=2, workers=1)
    (verdict,) = bad.thunks
    assert verdict.status == "fail" and verdict.reason is not None
    assert "ORC entry says sp_reg 5, sp_offset +40" in verdict.reason
    assert "rsp+32" in verdict.reason and "__raw_callee_save_native_save_fl+0x" in verdict.reason


@pytest.mark.corpus
def test_qemu_thunk_scenario_modules_carry_orc_for_their_thunks() -> None:
    """The modules the QEMU harness's `thunk` scenario loads (tests/test_qemu.py) are the
    ones with ORC entries for their thunks: that boot is the proof they still load."""
    from qemu import harness

    with_thunks = [rw for _n, _p, _d, rw in harness.variant("thunk")
                   if rw is not None and rw.changed and rw.thunks]
    assert len(with_thunks) >= 12
    assert {rw.unwind for rw in with_thunks} == {"orc: v2 (Linux 5.x-6.3)"}


# -- hostile call-frame information --------------------------------------------------------


def test_mutated_eh_frame_gives_unwind_error_only() -> None:
    """Whatever an input's .eh_frame holds, reading, rebasing and indexing it raises the
    package's own error or works (it decides between new tables and none)."""
    import random

    from pvpatch.elf.reader import ElfFile
    from pvpatch.rewrite.unwind import (
        UnwindError,
        cfa_rows,
        eh_frame_hdr,
        parse_eh_frame,
        rebase_eh_frame,
    )

    elf = ElfFile.open(FIX / "x86_64" / "prog-bt")
    sec = elf.section(".eh_frame")
    assert sec is not None
    data = elf.section_data(sec)
    rnd = random.Random(16)
    errors = 0
    for _ in range(400):
        d = bytearray(data)
        for _k in range(rnd.randint(1, 6)):
            d[rnd.randrange(len(d))] = rnd.randrange(256)
        if rnd.random() < 0.3:
            d = d[: rnd.randrange(len(d))]
        try:
            for f in parse_eh_frame(bytes(d), sec.addr, 8).fdes:
                cfa_rows(f)
            moved = rebase_eh_frame(bytes(d), sec.addr, sec.addr + 0x3000, 8)
            eh_frame_hdr(moved, sec.addr + 0x3000, sec.addr + 0x5000, 8)
        except UnwindError:
            errors += 1
    assert errors > 0


def test_linked_file_with_unreadable_eh_frame_still_patches(tmp_path: Path) -> None:
    """An .eh_frame pvpatch cannot read (a CIE of an augmentation it does not know) gets no
    new tables: the thunks are still named, the program still runs, verify still passes."""
    src = FIX / "x86_64" / "prog"
    data = bytearray(src.read_bytes())
    secs = run("readelf", "-S", "-W", str(src))
    m = re.search(r"\] \.eh_frame\s+\S+\s+[0-9a-f]+ ([0-9a-f]+) ", secs)
    assert m
    at = int(m.group(1), 16)
    assert data[at + 9 : at + 12] == b"zR\0"  # the first CIE's augmentation
    data[at + 9 : at + 11] = b"eh"  # the pre-gcc-3 form, which pvpatch does not read
    bad = tmp_path / "prog"
    bad.write_bytes(bytes(data))
    bad.chmod(0o755)
    out = tmp_path / "patched"
    patch(bad, out)
    assert run("readelf", "-l", "-W", str(out)).count("GNU_EH_FRAME") == 1
    # PT_GNU_EH_FRAME still names the original table: no new one was written
    assert run("readelf", "-S", "-W", str(out)).count(".eh_frame_hdr") == 1
    eh_old = re.search(r"\] \.eh_frame_hdr\s+\S+\s+([0-9a-f]+) ", secs)
    eh_new = re.search(r"\] \.eh_frame_hdr\s+\S+\s+([0-9a-f]+) ",
                       run("readelf", "-S", "-W", str(out)))
    assert eh_old and eh_new and eh_old.group(1) == eh_new.group(1)
    assert "__raw_callee_save_prog_irq_disable" in nm_symbols(out)
    ran = subprocess.run([str(out)], capture_output=True, text=True, timeout=20)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok"


def test_linked_file_with_static_relocations_keeps_their_symbols(tmp_path: Path) -> None:
    """Linked with --emit-relocs, a program keeps relocation sections that name .symtab's
    symbols by index: the thunk symbols inserted before the globals renumber them, and
    every relocation still names the same symbol (readelf -r, before and after)."""
    exe = tmp_path / "prog"
    run("gcc", "-O2", "-fno-pie", "-no-pie", "-Wl,--emit-relocs", "-fno-stack-protector",
        "-fcf-protection=none", "-I", str(FIX / "src"), str(FIX / "src" / "prog.c"), "-o",
        str(exe))

    def rows(path: Path) -> list[tuple[str, ...]]:
        out = []
        for line in run("readelf", "-r", "-W", str(path)).splitlines():
            f = line.split()
            if len(f) >= 5 and re.fullmatch(r"[0-9a-f]{16}", f[0]):
                out.append((f[0], f[2], f[4]))
        return out

    before = rows(exe)
    assert sum(1 for r in before if r[2].startswith("prog_")) > 0
    out = tmp_path / "patched"
    patch(exe, out)  # verified: every difference accounted for
    assert rows(out) == before
    assert THUNKS[0] in nm_symbols(out)
    ran = subprocess.run([str(out)], capture_output=True, text=True, timeout=20)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok"
