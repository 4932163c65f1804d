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

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "fixtures"
SPEC = FIX / "specs" / "prog.toml"
ARCHES = ("x86_64", "i386")
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


@pytest.mark.parametrize("arch", ARCHES)
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


@pytest.mark.parametrize("arch", ARCHES)
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


@pytest.mark.parametrize("arch", ARCHES)
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


@pytest.mark.parametrize("arch", ARCHES)
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


@pytest.mark.parametrize("arch", ARCHES)
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
