"""Kernels as distributions ship them: no BTF, no DWARF, no .symtab.  The ops are named
from the image's own release string, checked against what the sites say."""

from __future__ import annotations

import subprocess
from pathlib import Path

import corpus
import pytest

import pvpatch
from pvpatch.elf.reader import ElfFile
from pvpatch.scan.ops import builtin_catalog
from pvpatch.scan.opsource import catalog_fits, kernel_release
from pvpatch.scan.stage import scan_elf

pytestmark = pytest.mark.corpus


def _without_btf(src: Path, tmp: Path) -> Path:
    out = tmp / f"{src.parent.name}-nobtf"
    subprocess.run(["objcopy", "--remove-section", ".BTF", str(src), str(out)], check=True)
    return out


def _banner(path: Path) -> str:
    """The release from `strings`, an independent reader of the banner."""
    out = subprocess.run(["strings", "-n", "16", str(path)], capture_output=True, text=True,
                         check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("Linux version ") and " (" in ln)
    return line.split()[2]


@pytest.mark.parametrize("kind", ["i386", "x86_64", "x86_64-6.12"])
def test_release_names_every_site(kind: str, tmp_path: Path) -> None:
    vmlinux = (corpus.i386_vmlinux() if kind == "i386" else corpus.x86_64_vmlinux()
               if kind == "x86_64" else corpus.x86_64_612_vmlinux())
    assert vmlinux is not None
    path = vmlinux if kind == "i386" else _without_btf(vmlinux, tmp_path)
    elf = ElfFile.open(path)
    assert elf.section(".BTF") is None and elf.symtab is None
    assert kernel_release(elf) == _banner(path) == corpus.release(kind)
    result = pvpatch.load(path)
    assert result.ops is not None and f"(release {corpus.release(kind)})" in result.ops.name
    assert result.sites and all(s.op is not None for s in result.sites)
    if kind == "i386":
        want = corpus.expected("i386", "VMLINUX_SITES")
        assert want is None or len(result.sites) == want
    # the names agree with the image's own BTF where it has one
    if kind != "i386":
        btf = pvpatch.load(vmlinux).ops
        assert btf is not None and btf.same_layout(builtin_catalog(
            result.ops.name.split(" ")[0].removeprefix("catalog:")))


def test_a_wrong_release_guess_is_dropped(tmp_path: Path) -> None:
    """A 6.12 image whose banner claims 6.1: the 6.1 catalog contradicts the native forms
    the table carries (slots from 47 on moved), so nothing is named rather than misnamed."""
    src = _without_btf(corpus.x86_64_612_vmlinux(), tmp_path)
    data = bytearray(src.read_bytes())
    release = corpus.release("x86_64-6.12").encode()
    fake = b"6.1.0-99-cloud-amd64"
    fake += b"+" * (len(release) - len(fake))  # same length: nothing else moves
    at = data.find(b"Linux version " + release)
    assert at > 0
    data[at + 14 : at + 14 + len(release)] = fake
    path = tmp_path / "liar"
    path.write_bytes(bytes(data))
    elf = ElfFile.open(path)
    assert kernel_release(elf) == fake.decode()
    assert not catalog_fits(scan_elf(elf, ops=builtin_catalog("linux-6.1-x86_64")))
    result = pvpatch.load(path)
    assert result.ops is None and result.sites  # the sites are still found, unnamed


IO_DELAY = '[ops."cpu.io_delay"]\naction = "call"\ntarget = "native_io_delay"\n'


def _exported(path: Path, name: str) -> int:
    """`name`'s address from the export table, read here with readelf's section list and
    12-byte self-relative entries (x86 since 5.4): independent of pvpatch.elf.ksymtab."""
    import struct

    import independent

    secs = {s.name: s for s in independent.sections(path)}
    ks, strings = secs["__ksymtab"], secs["__ksymtab_strings"]
    raw = path.read_bytes()
    table = raw[ks.offset : ks.offset + ks.size]
    names = raw[strings.offset : strings.offset + strings.size]
    mask = (1 << (64 if ks.addr > 0xFFFFFFFF else 32)) - 1
    for at in range(0, len(table), 12):
        value, name_rel = struct.unpack_from("<ii", table, at)
        off = ks.addr + at + 4 + name_rel - strings.addr
        if names[off : names.index(b"\0", off)] == name.encode():
            return (ks.addr + at + value) & mask
    raise AssertionError(f"{name} is not exported")


@pytest.mark.parametrize("kind", ["i386", "x86_64"])
def test_spec_targets_come_from_the_export_table(kind: str, tmp_path: Path) -> None:
    """No .symtab and no symbol file: native_io_delay's address is the image's own export,
    every io_delay site becomes a direct call to it, and verify proves each."""
    from pvpatch.plan.backend import parse_spec_text

    vmlinux = corpus.i386_vmlinux() if kind == "i386" else corpus.x86_64_vmlinux()
    assert vmlinux is not None
    path = vmlinux if kind == "i386" else _without_btf(vmlinux, tmp_path)
    result = pvpatch.load(path)
    spec = parse_spec_text(IO_DELAY, result.arch, "<io_delay>")
    plan = pvpatch.make_plan(result, spec)
    want = _exported(path, "native_io_delay")
    target = plan.targets["native_io_delay"]
    assert (target.address, target.source) == (want, "export table")
    io = [d for d in plan.decisions if d.site.op == "cpu.io_delay"]
    assert io and all(d.action == "call" for d in io)
    if kind == "i386":
        assert len(io) == 153
    rw = pvpatch.apply_plan(plan)
    for p in rw.patches:
        if p.decision.action != "call":
            continue
        s = p.decision.site
        assert s.address is not None
        disp = int.from_bytes(p.after[1:5], "little", signed=True)
        assert p.after[0] == 0xE8 and (s.address + 5 + disp) % (1 << 64) == want % (1 << 64)
    report = pvpatch.verify_rewrite(rw)
    assert report.ok and report.summary["pass"] == len(io), report.failures[:3]


def test_a_symbol_file_supplies_what_the_image_does_not(tmp_path: Path) -> None:
    path = _without_btf(corpus.x86_64_vmlinux(), tmp_path)
    from pvpatch.plan.backend import parse_spec_text

    result = pvpatch.load(path)
    spec = parse_spec_text(IO_DELAY.replace("native_io_delay", "not_exported_fn"),
                           result.arch, "<spec>")
    kept = pvpatch.make_plan(result, spec)
    reasons = {d.reason for d in kept.decisions if d.site.op == "cpu.io_delay"}
    assert reasons == {"target not_exported_fn is not defined in this linked file (not in "
                       ".symtab, the export table)"}
    address = _exported(path, "native_io_delay")
    sysmap = tmp_path / "System.map"
    sysmap.write_text(f"{address:016x} T not_exported_fn\n{address:016x} t other [mod]\n")
    plan = pvpatch.make_plan(result, spec, symbols=sysmap)
    assert plan.targets["not_exported_fn"].source == str(sysmap)
    assert {d.action for d in plan.decisions if d.site.op == "cpu.io_delay"} == {"call"}
