"""Tests for pvpatch.elf.btf and pvpatch.scan.ops.

Real-kernel checks (marked ``corpus``) use the x86_64 corpus (Debian's 6.1 cloud kernel
pinned in scripts/corpus-pins, see tests/corpus.py) and cross-check against bpftool, an
independent BTF parser.
DWARF checks compare against offsetof() printed by a program gcc compiles here.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import corpus
import pytest
from elftools.elf.elffile import ELFFile
from paths import REPO

from pvpatch.elf.btf import KIND_NAMES, KIND_STRUCT, KIND_UNION, Btf
from pvpatch.elf.reader import ElfFile
from pvpatch.errors import OpsError
from pvpatch.scan.ops import (
    OpCatalog,
    builtin_catalog,
    builtin_catalog_names,
    catalog_for_vermagic,
    catalog_from_btf,
    catalog_from_dwarf,
)

# Where the corpus keeps it (the fixture below fetches it when missing).
VMLINUX = corpus.corpus_root() / "x86_64" / "vmlinux"
FIXTURE_SRC = REPO / "fixtures" / "src" / "ops_dwarf.c"
FIXTURE_OBJ = REPO / "fixtures" / "x86_64" / "ops_dwarf.o"

# kernel-paravirt-facts.md §6: the 6.1 ops whose member type is struct paravirt_callee_save.
CALLEE_SAVE_61 = {
    "irq.save_fl", "irq.irq_disable", "irq.irq_enable", "mmu.read_cr2",
    "mmu.pte_val", "mmu.make_pte", "mmu.pgd_val", "mmu.make_pgd", "mmu.pmd_val",
    "mmu.make_pmd", "mmu.pud_val", "mmu.make_pud", "mmu.p4d_val", "mmu.make_p4d",
    "lock.queued_spin_unlock", "lock.vcpu_is_preempted",
}  # fmt: skip


def _module() -> Path:
    """vsock.ko of the unpacked x86_64 corpus: its release is read, never named here."""
    root = corpus.ensure("x86_64") / "lib" / "modules" / corpus.release("x86_64")
    path = root / "kernel" / "net" / "vmw_vsock" / "vsock.ko"
    if not path.is_file():
        pytest.fail(f"the corpus has no {path}")
    return path


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is required by this test but not installed")
    return found


def _elf_btf(path: Path) -> bytes | None:
    """The raw `.BTF` section of an ELF file as pyelftools reads it, or None."""
    with open(path, "rb") as fh:
        sec = ELFFile(fh).get_section_by_name(".BTF")
        return bytes(sec.data()) if sec is not None else None


@pytest.fixture(scope="module")
def vmlinux_btf() -> bytes:
    vmlinux = corpus.x86_64_vmlinux()
    assert vmlinux == VMLINUX
    data = _elf_btf(vmlinux)
    assert data is not None
    return data


@pytest.fixture(scope="module")
def btf_catalog(vmlinux_btf: bytes) -> OpCatalog:
    return catalog_from_btf(vmlinux_btf, 8, origin=str(VMLINUX))


# -- the real vmlinux ----------------------------------------------------------------


@pytest.mark.corpus
def test_btf_catalog_key_slots(btf_catalog: OpCatalog) -> None:
    c = btf_catalog
    assert c.name == f"btf:{VMLINUX}"
    assert (c.name_of(30), c.name_of(31), c.name_of(32)) == (
        "irq.save_fl",
        "irq.irq_disable",
        "irq.irq_enable",
    )
    assert c.name_of(42) == "mmu.read_cr2"
    assert c.type_of("mmu.lazy_mode.flush") == 77
    assert c.type_of("irq.save_fl.func") is None
    assert c.name_of(84) is None
    assert sorted(c.slots) == list(range(84))
    assert c.template_size == 84 * 8 and c.complete
    assert {c.slots[i] for i in c.callee_save} == CALLEE_SAVE_61
    assert c.is_callee_save(30) and not c.is_callee_save(44)


@pytest.mark.corpus
def test_btf_catalog_is_fast(vmlinux_btf: bytes) -> None:
    start = time.perf_counter()
    catalog_from_btf(vmlinux_btf, 8)
    assert time.perf_counter() - start < 0.5


def _bpftool_structs(c_dump: str) -> dict[str, list[str]]:
    bodies = re.findall(r"^struct (\w+) \{\n(.*?)^\}[^\n]*;$", c_dump, re.M | re.S)
    return {name: [ln.strip() for ln in body.splitlines() if ln.strip()] for name, body in bodies}


def _bpftool_slots(structs: dict[str, list[str]], name: str, prefix: str) -> Iterator[str]:
    """Member paths in declaration order, one per pointer slot (independent of pvpatch)."""
    for line in structs[name]:
        path = f"{prefix}{{}}"
        if m := re.fullmatch(r"struct (\w+) (\w+);", line):
            inner = structs[m[1]]
            if len(inner) == 1 and "*" in inner[0]:  # paravirt_callee_save { void *func; }
                yield path.format(m[2])
            else:
                yield from _bpftool_slots(structs, m[1], f"{prefix}{m[2]}.")
        elif m := (
            re.search(r"\(\*(\w+)\)\(.*\);$", line)  # function pointer
            or re.fullmatch(r".*\*\s*(\w+);", line)  # data pointer
        ):
            yield path.format(m[1])
        else:
            pytest.fail(f"unexpected member line in struct {name}: {line!r}")


OUTER = (
    ("cpu", "pv_cpu_ops"),
    ("irq", "pv_irq_ops"),
    ("mmu", "pv_mmu_ops"),
    ("lock", "pv_lock_ops"),
)


@pytest.mark.corpus
def test_btf_catalog_matches_bpftool_c_dump(btf_catalog: OpCatalog) -> None:
    out = subprocess.run(
        [_tool("bpftool"), "btf", "dump", "file", str(VMLINUX), "format", "c"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    structs = _bpftool_structs(out)
    expected = list(_bpftool_slots(structs, "paravirt_patch_template", ""))
    assert len(expected) == 84
    assert [btf_catalog.slots[i] for i in range(84)] == expected
    callee = {
        f"{outer}.{m[1]}"
        for outer, sname in OUTER
        for line in structs[sname]
        if (m := re.fullmatch(r"struct paravirt_callee_save (\w+);", line))
    }
    assert {btf_catalog.slots[i] for i in btf_catalog.callee_save} == callee == CALLEE_SAVE_61


def _bpftool_raw(args: list[str]) -> dict[int, tuple[str, str, str, list[str]]]:
    out = subprocess.run(
        [_tool("bpftool"), *args], check=True, capture_output=True, text=True
    ).stdout
    types: dict[int, tuple[str, str, str, list[str]]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if m := re.match(r"\[(\d+)\] (\w+) '([^']*)'(.*)", line):
            current = []
            types[int(m[1])] = (m[2], m[3], m[4], current)
        elif line.startswith("\t"):
            current.append(line.strip())
    return types


def _check_against_bpftool(btf: Btf, raw: dict[int, tuple[str, str, str, list[str]]]) -> None:
    for type_id, (kind, name, rest, lines) in raw.items():
        t = btf.type(type_id)
        assert (t.kind_name, t.name or "(anon)") == (kind, name), type_id
        if t.kind in (KIND_STRUCT, KIND_UNION):
            assert f" size={t.size} vlen={t.vlen}" == rest, type_id
            got = [
                f"'{m.name or '(anon)'}' type_id={m.type_id} bits_offset={m.bit_offset}"
                + (f" bitfield_size={m.bitfield_size}" if m.bitfield_size else "")
                for m in t.members
            ]
            assert got == lines, type_id


@pytest.mark.corpus
def test_btf_reader_matches_bpftool_raw_dump(vmlinux_btf: bytes) -> None:
    btf = Btf(vmlinux_btf)
    raw = _bpftool_raw(["btf", "dump", "file", str(VMLINUX)])
    assert btf.type_count == max(raw) + 1
    assert {t for t in raw.values() if t[0] not in KIND_NAMES.values()} == set()
    _check_against_bpftool(btf, raw)


@pytest.mark.corpus
def test_btf_struct_lookup_is_lazy_and_matches_bpftool(vmlinux_btf: bytes) -> None:
    """Finding a struct by name walks only the records before it, and finds exactly
    the ids bpftool lists under that name."""
    raw = _bpftool_raw(["btf", "dump", "file", str(VMLINUX)])
    by_name: dict[str, list[int]] = {}
    for type_id, (kind, name, _rest, _lines) in raw.items():
        if kind == "STRUCT" and name != "(anon)":
            by_name.setdefault(name, []).append(type_id)
    btf = Btf(vmlinux_btf)
    template = btf.find_struct("paravirt_patch_template")
    assert template is not None and template.type_id == by_name["paravirt_patch_template"][0]
    assert len(btf._offsets) < max(raw) // 4  # only a prefix was walked
    names = sorted(by_name)
    for name in [*names[:: max(1, len(names) // 300)], "pv_cpu_ops", "pv_mmu_ops", "page"]:
        assert btf.find_aggregates(name) == by_name[name], name
    assert btf.find_aggregates("no_such_struct_anywhere") == []
    # find_struct stops at the first record of each name's offsets: the lowest id, even
    # where the image defines the name several times.
    several = [name for name, ids in by_name.items() if len(ids) > 1]
    assert several
    for name in [*several[:50], *names[:: max(1, len(names) // 100)]]:
        found = Btf(vmlinux_btf).find_struct(name)
        assert found is not None and found.type_id == by_name[name][0], name
    assert Btf(vmlinux_btf).find_struct("no_such_struct_anywhere") is None


@pytest.mark.corpus
def test_btf_read_in_place_from_the_mapped_file(vmlinux_btf: bytes) -> None:
    """`--ops auto` reads a vmlinux's `.BTF` where it lies in the mapped file: the same
    blob as the section's bytes pyelftools copies out, type for type."""
    elf = ElfFile.open(str(VMLINUX))
    sec = elf.section(".BTF")
    assert sec is not None
    in_place, copied = Btf(elf.data, start=sec.offset, size=sec.size), Btf(vmlinux_btf)
    assert in_place.type_count == copied.type_count
    for type_id in range(0, copied.type_count, 499):
        assert in_place.type(type_id) == copied.type(type_id)
    template = in_place.find_struct("paravirt_patch_template")
    assert template == copied.find_struct("paravirt_patch_template") is not None
    assert catalog_from_btf(elf.data, 8, start=sec.offset, size=sec.size) == \
        catalog_from_btf(vmlinux_btf, 8)


@pytest.mark.corpus
def test_split_btf_module(vmlinux_btf: bytes) -> None:
    module = _module()
    mod = _elf_btf(module)
    assert mod is not None
    base = Btf(vmlinux_btf)
    split = Btf(mod, base=base, path=str(module))
    assert split.start_id == base.type_count
    raw = _bpftool_raw(["-B", str(VMLINUX), "btf", "dump", "file", str(module)])
    assert min(raw) == split.start_id and max(raw) + 1 == split.type_count
    _check_against_bpftool(split, raw)
    svm = split.find_struct("sockaddr_vm")
    assert svm is not None and svm.type_id >= split.start_id
    # A member of a module struct whose type lives in the base.
    assert split.resolve(svm.members[1].type_id).name == "short unsigned int"
    # The template is in the base; a split BTF finds it there.
    from_module = catalog_from_btf(mod, 8, base=vmlinux_btf, origin=str(module))
    assert from_module.slots == catalog_from_btf(vmlinux_btf, 8).slots
    # Without its base the module's string offsets point nowhere.
    with pytest.raises(OpsError):
        Btf(mod).find_struct("sockaddr_vm")


# -- built-in catalogs ---------------------------------------------------------------


@pytest.mark.corpus
def test_builtin_61_equals_btf(btf_catalog: OpCatalog) -> None:
    builtin = builtin_catalog("linux-6.1-x86_64")
    assert builtin.name == "catalog:linux-6.1-x86_64"
    assert builtin.same_layout(btf_catalog)
    assert builtin.template_size == btf_catalog.template_size == 672


@pytest.mark.corpus
def test_builtin_61_i386_is_the_non_xxl_subsequence(btf_catalog: OpCatalog) -> None:
    c = builtin_catalog("linux-6.1-i386")
    assert (c.ptr_size, c.template_size, c.complete) == (4, 52, True)
    assert sorted(c.slots) == list(range(13))
    assert c.name_of(0) == "cpu.io_delay" and c.name_of(1) == "mmu.flush_tlb_user"
    assert c.name_of(12) == "lock.vcpu_is_preempted"
    # Non-XXL keeps io_delay, the first 7 mmu ops and the lock ops, in the same order.
    xxl = [btf_catalog.slots[i] for i in range(84)]
    mmu = [op for op in xxl if op.startswith("mmu.")][:7]
    kept = ["cpu.io_delay", *mmu, *(op for op in xxl if op.startswith("lock."))]
    assert [c.slots[i] for i in range(13)] == kept
    assert {c.slots[i] for i in c.callee_save} == CALLEE_SAVE_61 & set(kept)


def test_builtin_2630_catalogs() -> None:
    x64 = builtin_catalog("linux-2.6.30-x86_64")
    assert (x64.ptr_size, x64.complete, x64.template_size) == (8, False, 111 * 8)
    assert x64.name_of(55) == "pv_irq_ops.irq_disable"
    assert x64.type_of("pv_mmu_ops.make_pte") == 93  # pte_flags (2.6.29 slot 93) is gone
    assert x64.type_of("pv_cpu_ops.swapgs") == 49
    assert {x64.slots[i] for i in x64.callee_save} == {
        f"pv_irq_ops.{op}" for op in ("save_fl", "restore_fl", "irq_disable", "irq_enable")
    }
    i386 = builtin_catalog("linux-2.6.30-i386")
    assert (i386.ptr_size, i386.complete) == (4, False)
    assert i386.name_of(45) == "pv_cpu_ops.iret" and i386.name_of(64) == "pv_mmu_ops.write_cr3"


def test_builtin_names_and_vermagic() -> None:
    names = builtin_catalog_names()
    assert {"linux-6.1-x86_64", "linux-6.1-i386", "linux-2.6.30-x86_64"} <= set(names)
    assert {"linux-2.6.30-i386"} <= set(names)
    for name in names:
        assert builtin_catalog(name).name == f"catalog:{name}"
    got = catalog_for_vermagic("6.1.0-56-cloud-amd64 SMP mod_unload modversions ", "x86_64")
    assert got is not None and got.name == "catalog:linux-6.1-x86_64"
    got = catalog_for_vermagic("6.1.0-1-686-pae SMP", "i386")
    assert got is not None and got.name == "catalog:linux-6.1-i386"
    got = catalog_for_vermagic("2.6.30-2-686 SMP mod_unload", "i686")
    assert got is not None and got.name == "catalog:linux-2.6.30-i386"
    got = catalog_for_vermagic("2.6.30.4 SMP", "x86_64")
    assert got is not None and got.name == "catalog:linux-2.6.30-x86_64"
    assert catalog_for_vermagic("5.10.0-9-amd64 SMP", "x86_64") is None
    assert catalog_for_vermagic("2.6.29 SMP", "x86_64") is None
    assert catalog_for_vermagic("6.10.0 SMP", "x86_64") is None
    assert catalog_for_vermagic("6.1.0", "arm64") is None
    assert catalog_for_vermagic("garbage", "x86_64") is None
    with pytest.raises(OpsError):
        builtin_catalog("linux-9.9-x86_64")


def test_catalog_model_rejects_nonsense() -> None:
    with pytest.raises(OpsError):
        OpCatalog("x", 6, {0: "a"})
    with pytest.raises(OpsError):
        OpCatalog("x", 8, {0: "a", 1: "a"})
    with pytest.raises(OpsError):
        OpCatalog("x", 8, {0: "a"}, frozenset({1}))
    c = OpCatalog("x", 8, {1: "b", 0: "a"}, frozenset({1}))
    assert list(c.slots) == [0, 1] and c.type_of("b") == 1
    assert hash(c) == hash(OpCatalog("x", 8, {0: "a", 1: "b"}, frozenset({1})))


# -- DWARF ---------------------------------------------------------------------------

# The fixture's ops, in declaration order; the offsets come from gcc below.
FIXTURE_OPS = [
    "cpu.io_delay", "cpu.read_cr0", "cpu.write_cr0", "cpu.wbinvd",
    "irq.save_fl", "irq.irq_disable", "irq.irq_enable", "irq.safe_halt", "irq.halt",
    "mmu.flush_tlb_user", "mmu.flush_tlb_kernel", "mmu.read_cr2", "mmu.read_cr3",
    "mmu.write_cr3", "mmu.pte_val", "mmu.lazy_mode.enter", "mmu.lazy_mode.leave",
    "mmu.lazy_mode.flush", "mmu.set_fixmap", "lock.queued_spin_lock_slowpath",
    "lock.queued_spin_unlock", "lock.kick", "lock.vcpu_is_preempted",
]  # fmt: skip
FIXTURE_CALLEE = {
    "irq.save_fl", "irq.irq_disable", "irq.irq_enable", "mmu.read_cr2", "mmu.pte_val",
    "lock.queued_spin_unlock", "lock.vcpu_is_preempted",
}  # fmt: skip


def _gcc_offsets(tmp_path: Path) -> tuple[dict[str, int], int]:
    prints = "".join(
        f'\tprintf("%s %zu\\n", "{op}", offsetof(struct paravirt_patch_template, {op}));\n'
        for op in FIXTURE_OPS
    )
    prog = tmp_path / "offsets.c"
    prog.write_text(
        f'#include <stddef.h>\n#include <stdio.h>\n#include "{FIXTURE_SRC}"\n'
        f"int main(void)\n{{\n{prints}"
        '\tprintf("sizeof %zu\\n", sizeof(struct paravirt_patch_template));\n\treturn 0;\n}\n'
    )
    exe = tmp_path / "offsets"
    subprocess.run([_tool("gcc"), "-O0", "-o", str(exe), str(prog)], check=True)
    pairs = [ln.split() for ln in subprocess.run(
        [str(exe)], check=True, capture_output=True, text=True
    ).stdout.splitlines()]  # fmt: skip
    table = {name: int(value) for name, value in pairs}
    return {op: table[op] for op in FIXTURE_OPS}, table["sizeof"]


def test_dwarf_fixture_matches_offsetof(tmp_path: Path) -> None:
    offsets, size = _gcc_offsets(tmp_path)
    c = catalog_from_dwarf(FIXTURE_OBJ, 8)
    assert c.name == "dwarf:ops_dwarf.o"
    assert dict(c.slots) == {off // 8: op for op, off in offsets.items()}
    assert {c.slots[i] for i in c.callee_save} == FIXTURE_CALLEE
    assert c.template_size == size
    # The non-pointer lock.nr_spins leaves a hole rather than shifting later slots.
    assert c.name_of(c.type_of("lock.kick") - 1) is None  # type: ignore[operator]


@pytest.mark.parametrize(
    ("flags", "ptr_size"), [(["-gdwarf-2"], 8), (["-gdwarf-5"], 8), (["-m32", "-g"], 4)]
)
def test_dwarf_variants(tmp_path: Path, flags: list[str], ptr_size: int) -> None:
    # Same source, other DWARF versions / i386: the same op indices.
    obj = tmp_path / "v.o"
    subprocess.run(
        [_tool("gcc"), *flags, "-O0", "-c", str(FIXTURE_SRC), "-o", str(obj)], check=True
    )
    c = catalog_from_dwarf(obj, ptr_size)
    ref = catalog_from_dwarf(FIXTURE_OBJ, 8)
    assert dict(c.slots) == dict(ref.slots) and c.callee_save == ref.callee_save
    assert c.template_size == len(FIXTURE_OPS) * ptr_size + ptr_size  # + lock.nr_spins


def test_dwarf_errors(tmp_path: Path) -> None:
    with pytest.raises(OpsError, match="8-byte pointer"):
        catalog_from_dwarf(FIXTURE_OBJ, 4)
    with pytest.raises(OpsError):
        catalog_from_dwarf(tmp_path / "missing.o", 8)
    junk = tmp_path / "junk.o"
    junk.write_bytes(b"\x7fELF" + b"\xff" * 60)
    with pytest.raises(OpsError):
        catalog_from_dwarf(junk, 8)
    src = tmp_path / "plain.c"
    src.write_text("struct other { void *p; } x;\n")
    for flags, what in ((["-g0"], "no DWARF"), (["-g"], "no struct")):
        obj = tmp_path / "plain.o"
        subprocess.run([_tool("gcc"), *flags, "-c", str(src), "-o", str(obj)], check=True)
        with pytest.raises(OpsError, match=what):
            catalog_from_dwarf(obj, 8)


# -- synthetic and malformed BTF ---------------------------------------------------


class _BtfBuilder:
    """Writes small BTF blobs by hand, so the tests do not trust the reader."""

    def __init__(self, endian: str = "<") -> None:
        self.e = endian
        self.strings = b"\0"
        self.types = b""

    def s(self, text: str) -> int:
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def t(
        self, name: str, kind: int, vlen: int, third: int, extra: bytes = b"", kf: int = 0
    ) -> None:
        info = (kf << 31) | (kind << 24) | vlen
        self.types += struct.pack(self.e + "III", self.s(name) if name else 0, info, third) + extra

    def member(self, name: str, type_id: int, offset: int) -> bytes:
        return struct.pack(self.e + "III", self.s(name), type_id, offset)

    def blob(self, *, type_off: int = 0, str_off: int | None = None, magic: int = 0xEB9F) -> bytes:
        so = len(self.types) if str_off is None else str_off
        hdr = struct.pack(
            self.e + "HBBIIIII", magic, 1, 0, 24, type_off, len(self.types), so, len(self.strings)
        )
        return hdr + self.types + self.strings


def _template_btf(endian: str = "<") -> _BtfBuilder:
    b = _BtfBuilder(endian)
    b.t("long unsigned int", 1, 0, 8, struct.pack(endian + "I", 64))  # 1
    b.t("", 2, 0, 0)  # 2: void *
    b.t("fn_t", 8, 0, 2)  # 3: typedef void *fn_t
    b.t("", 10, 0, 3)  # 4: const fn_t
    b.t("paravirt_callee_save", 4, 1, 8, b.member("func", 2, 0))  # 5
    lazy = b.member("enter", 2, 0) + b.member("leave", 4, 64)
    b.t("pv_lazy_ops", 4, 2, 16, lazy)  # 6
    ops = (
        b.member("save_fl", 5, 0)
        + b.member("flags", 1, (3 << 24) | 64)  # kind_flag bitfield: skipped
        + b.member("halt", 3, 128)
        + b.member("lazy_mode", 6, 192)
        + b.member("count", 1, 320)  # scalar: skipped
    )
    b.t("pv_irq_ops", 4, 5, 48, ops, kf=1)  # 7
    b.t("paravirt_patch_template", 4, 2, 56, b.member("cpu", 2, 0) + b.member("irq", 7, 64))
    return b


@pytest.mark.parametrize("endian", ["<", ">"])
def test_synthetic_btf(endian: str) -> None:
    c = catalog_from_btf(_template_btf(endian).blob(), 8, origin="synthetic")
    assert c.name == "btf:synthetic"
    assert dict(c.slots) == {
        0: "cpu",
        1: "irq.save_fl",
        3: "irq.halt",
        4: "irq.lazy_mode.enter",
        5: "irq.lazy_mode.leave",
    }
    assert c.callee_save == frozenset({1})
    assert c.template_size == 56
    with pytest.raises(OpsError, match="ptr_size"):
        catalog_from_btf(_template_btf(endian).blob(), 4)


@pytest.mark.parametrize("endian", ["<", ">"])
def test_btf_window_of_a_larger_buffer(endian: str) -> None:
    """A blob read inside a larger buffer reads as the blob alone, and its errors give
    positions inside the blob, not the buffer."""
    blob = _template_btf(endian).blob()
    padded = b"\xff" * 5 + blob + b"\xee" * 7
    assert catalog_from_btf(padded, 8, origin="w", start=5, size=len(blob)) == \
        catalog_from_btf(blob, 8, origin="w")
    # A type section said to end 8 bytes into its last record (36 bytes: the template
    # with two members): the error names where that record starts inside the blob.
    order = "little" if endian == "<" else "big"
    type_len = int.from_bytes(blob[12:16], order)
    cut = blob[:12] + (type_len - 28).to_bytes(4, order) + blob[16:]
    last = 24 + type_len - 36
    for btf in (Btf(cut), Btf(b"\xff" * 5 + cut + b"\xee" * 7, start=5, size=len(cut))):
        with pytest.raises(OpsError, match=f"truncated BTF type record at {last:#x}$"):
            assert btf.type_count
    assert len(blob) == len(cut)
    with pytest.raises(OpsError, match="too short"):
        Btf(padded, start=len(padded) - 10)


def test_btf_name_hits_that_are_not_records() -> None:
    """Bytes that look like a struct record named X but sit inside another record, or
    a union named X, are not returned as the struct X."""
    b = _template_btf()
    name_off = b.strings.index(b"\0paravirt_patch_template\0") + 1
    # An ARRAY whose element type word equals the name's offset and whose index-type
    # word reads as a STRUCT info word: a false hit, word-aligned, inside a record.
    b.t("", 3, 0, 0, struct.pack("<III", name_off, 4 << 24 | 2, 1))  # 9
    b.t("paravirt_patch_template", 5, 0, 8)  # 10: a UNION of that name
    btf = Btf(b.blob())
    assert btf.find_aggregates("paravirt_patch_template") == [8]
    assert btf.find_aggregates("paravirt_patch_template", KIND_UNION) == [10]
    c = catalog_from_btf(b.blob(), 8, origin="decoys")
    assert c.slots == catalog_from_btf(_template_btf().blob(), 8, origin="plain").slots


def test_btf_name_in_the_tail_of_another_string() -> None:
    """A record may name itself by pointing into the tail of a longer string ("bar" in
    "foo_bar"), which the kernel's BTF checker accepts."""
    b = _BtfBuilder()
    b.t("int", 1, 0, 4, struct.pack("<I", 32))  # 1
    b.s("foo_bar")
    bar = b.strings.index(b"bar\0")
    b.types += struct.pack("<III", bar, 4 << 24 | 1, 4) + b.member("x", 1, 0)  # 2: struct
    btf = Btf(b.blob())
    assert btf.string(bar) == "bar"
    assert btf.find_aggregates("bar") == [2] and btf.find_aggregates("foo_bar") == []


def test_btf_find_struct_is_the_lowest_id_of_any_name_offset() -> None:
    """find_struct stops at each name offset's first record and takes the lowest id over
    the offsets: here the standalone "bar" comes first in the string section, but the
    struct named through the tail of "foo_bar" has the lower id."""
    b = _BtfBuilder()
    b.t("int", 1, 0, 4, struct.pack("<I", 32))  # 1
    b.s("bar")
    b.s("foo_bar")
    alone, tail = b.strings.index(b"\0bar\0") + 1, b.strings.index(b"_bar\0") + 1
    assert alone < tail
    for name_off in (tail, alone, tail):  # 2 (through the tail), 3, 4
        b.types += struct.pack("<III", name_off, 4 << 24 | 1, 4) + b.member("x", 1, 0)
    btf = Btf(b.blob())
    assert btf.find_aggregates("bar") == [2, 3, 4]
    found = btf.find_struct("bar")
    assert found is not None and found.type_id == 2


def test_btf_find_struct_in_a_split_prefers_its_own_types() -> None:
    """A name the split BTF defines and its base defines too is the split's own struct,
    as find_aggregates lists it first; a name only the base defines is the base's."""
    base = _BtfBuilder()
    base.t("int", 1, 0, 4, struct.pack("<I", 32))  # 1
    base.t("both", 4, 1, 4, base.member("x", 1, 0))  # 2
    base.t("only_base", 4, 1, 4, base.member("y", 1, 0))  # 3
    base_btf = Btf(base.blob())
    split = _BtfBuilder()
    split.strings = b""  # a split's strings continue the base's: no leading empty string
    name = len(base.strings) + split.s("both")
    split.types += struct.pack("<III", name, 4 << 24 | 1, 4) + struct.pack(
        "<III", len(base.strings) + split.s("z"), 1, 0)  # 4: struct both {int z;}
    btf = Btf(split.blob(), base=base_btf)
    assert btf.find_aggregates("both") == [4, 2]
    own = btf.find_struct("both")
    assert own is not None and own.type_id == 4
    theirs = btf.find_struct("only_base")
    assert theirs is not None and theirs.type_id == 3


def test_btf_window_bounds_are_the_window() -> None:
    """A header that says its string section (the last one) runs 4 bytes past the blob is
    refused in a window of a larger buffer too, though those bytes exist there; the same
    bytes read to the buffer's end are accepted.  A window holding only the header has no
    room for the types, and one shorter than the header's length is refused."""
    blob = _template_btf().blob()
    longer = bytearray(blob)
    struct.pack_into("<I", longer, 20, struct.unpack_from("<I", blob, 20)[0] + 4)
    padded = b"\x11" * 3 + bytes(longer) + b"\0" * 4
    for btf in (lambda: Btf(padded, start=3, size=len(blob)), lambda: Btf(bytes(longer))):
        with pytest.raises(OpsError, match=r"BTF string section .* runs past the end"):
            btf()
    assert Btf(padded, start=3).type_count == Btf(blob).type_count
    with pytest.raises(OpsError, match=r"BTF type section .* runs past the end"):
        Btf(padded, start=3, size=24)  # the header alone
    long_header = bytearray(padded)
    struct.pack_into("<I", long_header, 3 + 4, 28)  # hdr_len 28, in a 26-byte window
    with pytest.raises(OpsError, match="bad BTF header length 28"):
        Btf(bytes(long_header), start=3, size=26)
    with pytest.raises(OpsError, match="outside"):
        Btf(padded, start=len(padded) + 1)
    with pytest.raises(OpsError, match="negative"):
        Btf(padded, start=3, size=-1)


def test_malformed_btf() -> None:
    good = _template_btf().blob()
    cases = {
        "empty": b"",
        "truncated header": good[:20],
        "truncated types": good[:40],
        "bad magic": b"\x9f\xea" + good[2:],
        "version 2": good[:2] + b"\x02" + good[3:],
        "type_off beyond end": _template_btf().blob(type_off=1 << 20),
        "str_off beyond end": _template_btf().blob(str_off=1 << 20),
    }
    for what, blob in cases.items():
        with pytest.raises(OpsError):
            catalog_from_btf(blob, 8, origin=what)

    b = _template_btf()
    b.t("paravirt_patch_template", 4, 1, 8, b.member("x", 2, 0))
    b.types = b.types[:-12] + struct.pack("<III", 1 << 20, 2, 0)  # member name past strings
    with pytest.raises(OpsError, match="string offset"):
        Btf(b.blob()).type(9)

    b = _BtfBuilder()
    b.t("paravirt_patch_template", 4, 0xFFFF, 8, b.member("x", 2, 0))  # absurd vlen
    with pytest.raises(OpsError, match="runs past"):
        _ = Btf(b.blob()).type_count  # records are walked (and checked) when counted

    b = _BtfBuilder()
    b.t("weird", 31, 0, 0)
    with pytest.raises(OpsError, match="unknown BTF kind"):
        _ = Btf(b.blob()).type_count
    with pytest.raises(OpsError, match="unknown BTF kind"):
        Btf(b.blob()).type(1)

    b = _BtfBuilder()
    b.t("loop", 8, 0, 2)  # 1: typedef -> 2
    b.t("pool", 8, 0, 1)  # 2: typedef -> 1
    b.t("paravirt_patch_template", 4, 1, 8, b.member("x", 1, 0))
    with pytest.raises(OpsError, match="cycle"):
        catalog_from_btf(b.blob(), 8)

    b = _BtfBuilder()
    b.t("paravirt_patch_template", 4, 1, 8, b.member("x", 99, 0))  # dangling type id
    with pytest.raises(OpsError, match="out of range"):
        catalog_from_btf(b.blob(), 8)

    b = _BtfBuilder()
    b.t("", 2, 0, 0)
    b.t("paravirt_patch_templat", 4, 1, 8, b.member("x", 1, 0))
    with pytest.raises(OpsError, match="no struct"):
        catalog_from_btf(b.blob(), 8)

    b = _BtfBuilder()
    b.t("t", 4, 1, 8, b.member("self", 1, 0))  # 1: a struct containing itself
    b.t("paravirt_patch_template", 4, 1, 8, b.member("x", 1, 0))
    with pytest.raises(OpsError, match="nests too deeply"):
        catalog_from_btf(b.blob(), 8)


def test_corrupted_btf_only_raises_opserror() -> None:
    good = _template_btf().blob()
    blobs = [good[:n] for n in range(len(good))]
    blobs += [good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1 :] for i in range(len(good))]
    for blob in blobs:
        with contextlib.suppress(OpsError):
            catalog_from_btf(blob, 8)


@pytest.mark.corpus
def test_truncated_vmlinux_btf(vmlinux_btf: bytes) -> None:
    for cut in (23, 24, 1000, len(vmlinux_btf) // 2, len(vmlinux_btf) - 1):
        with pytest.raises(OpsError):
            catalog_from_btf(vmlinux_btf[:cut], 8)
