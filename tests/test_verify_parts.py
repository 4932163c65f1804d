"""The verify stage's parts on their own: the ELF-to-emulator loader, the Unicorn
machine, the harness runtime, and the relocation recipes they share with arch.

The independent sides: pyelftools reads the relocations and symbols (not pvpatch's
reader), GNU as encodes the harness's jumps, and the expected register values are
worked out here by hand.
"""

from __future__ import annotations

import struct

from elftools.elf.descriptions import describe_reloc_type
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from gnu import gas
from paths import FIX

from pvpatch.arch import ARCHES
from pvpatch.elf.reader import ElfFile
from pvpatch.scan.sites import is_ops_table
from pvpatch.verify.loader import OPS_TABLE_SIZE, STUB_SIZE, load_image
from pvpatch.verify.machine import Machine
from pvpatch.verify.runtime import (
    BLOCK_LEN,
    C_EXIT,
    HLT,
    STATE_OFF,
    arch_runtime,
    build_runtime,
    entry_sp,
    jump_through,
)

# name -> (bytes patched, pc-relative): what the psABIs say, written here again on purpose.
PSABI = {"R_X86_64_64": (8, False), "R_X86_64_PC32": (4, True), "R_X86_64_PLT32": (4, True),
         "R_X86_64_32": (4, False), "R_X86_64_32S": (4, False),
         "R_386_32": (4, False), "R_386_PC32": (4, True), "R_386_PLT32": (4, True)}


def test_loader_applies_text_relocations_as_the_psabi_computes_them(arch: str) -> None:
    path = FIX / arch / "prog.o"
    runtime = build_runtime(arch_runtime(ARCHES[arch]), {})
    img = load_image(ElfFile.open(path), runtime)
    checked = 0
    with path.open("rb") as fh:
        ef = ELFFile(fh)
        symtab = ef.get_section_by_name(".symtab")
        text_index = ef.get_section_index(".text")
        text = ef.get_section(text_index).data()
        p0 = img.section_addr[text_index]
        for sec in ef.iter_sections():
            if not isinstance(sec, RelocationSection) or sec["sh_info"] != text_index:
                continue
            for r in sec.iter_relocations():
                name = describe_reloc_type(r["r_info_type"], ef)
                width, pc = PSABI[name]
                sym = symtab.get_symbol(r["r_info_sym"])
                shndx = sym["st_shndx"]
                s = (img.externals[sym.name] if shndx == "SHN_UNDEF"
                     else img.section_addr[shndx] + sym["st_value"])
                off = r["r_offset"]
                a = r["r_addend"] if r.is_RELA() else int.from_bytes(
                    text[off : off + width], "little", signed=True)
                want = (s + a - (p0 + off if pc else 0)) & ((1 << (8 * width)) - 1)
                assert img.read(p0 + off, width) == want.to_bytes(width, "little"), (name, off)
                checked += 1
    assert checked >= 20
    assert not img.unsupported


def test_loader_binds_the_ops_table_and_stubs_undefined_functions(arch: str) -> None:
    runtime = build_runtime(arch_runtime(ARCHES[arch]), {})
    img = load_image(ElfFile.open(FIX / arch / "kernel612.o"), runtime)
    assert img.ext_kind == {"pv_ops": "table", "BUG_func": "stub"}
    assert img.read(img.externals["pv_ops"], OPS_TABLE_SIZE) == bytes(OPS_TABLE_SIZE)
    # A call to an undefined function stops the run: nothing but hlt.
    assert img.read(img.externals["BUG_func"], STUB_SIZE) == bytes([HLT]) * STUB_SIZE


def test_the_loader_reads_the_symbols_it_needs_as_the_whole_table_has_them(arch: str) -> None:
    # The loader reads only the symbols a site's relocations name (ElfFile.symbols_at):
    # each one as the reader's whole-table reading has it, indices past the end skipped.
    elf = ElfFile.open(FIX / arch / "kernel612.o")
    whole = ElfFile.open(FIX / arch / "kernel612.o").symbols
    wanted = [0, len(whole) - 1, *range(1, len(whole), 3), len(whole), len(whole) + 7]
    assert list(elf.symbols_at(wanted)) == [(i, whole[i]) for i in wanted if i < len(whole)]
    assert "symbols" not in elf.__dict__  # the whole table was never read


def test_one_ops_table_predicate() -> None:
    assert is_ops_table("pv_ops") and is_ops_table("pv_irq_ops")
    assert not is_ops_table("pv_info") and not is_ops_table("xen_ops")


def test_the_relocation_recipes_agree_with_their_pc_relative_flag() -> None:
    for a in ARCHES.values():
        recipes = {n: r for n, r in a.reloc_types.items() if r.formula}
        assert {r.formula for r in recipes.values()} <= {"S+A", "S+A-P", "S"}
        for r in recipes.values():
            assert r.pc_relative == r.formula.endswith("-P"), r.name
        # The pointer-sized absolute type is computed, statically and at load time.
        ptr = a.reloc(a.r_abs_ptr)
        assert ptr.formula == "S+A" and ptr.at_load and ptr.width == a.ptr_size


def test_the_field_relocations_the_scanner_reads_a_slot_through() -> None:
    # A pv_ops slot is named by the relocation filling the call's 32-bit operand field:
    # pc-relative for `call *pv_ops+off(%rip)`, absolute for `call *pv_ops+off`.
    # Named as pyelftools names the numbers (the psABI's table).
    def names(arch: str, pc: bool) -> set[str]:
        with (FIX / arch / "kernel61.o").open("rb") as fh:
            elf = ELFFile(fh)
            return {describe_reloc_type(n, elf) for n in ARCHES[arch].field32_relocs[pc]}

    assert names("x86_64", True) == {"R_X86_64_PC32", "R_X86_64_PLT32"}
    assert names("x86_64", False) == {"R_X86_64_32", "R_X86_64_32S"}
    assert names("i386", False) == {"R_386_32"}


def test_the_harness_jump_is_what_gas_encodes(arch: str) -> None:
    rt = arch_runtime(ARCHES[arch])
    assert jump_through(rt, C_EXIT) == gas(arch, f"jmp *{C_EXIT:#x}")


def _machine_with_code(arch: str, code: bytes) -> tuple[Machine, int, list[int]]:
    """A machine with kernel61.o attached, `code` then the site-end jump at the start
    of .text, and trial slot 0 loaded with a known register file."""
    rt = arch_runtime(ARCHES[arch])
    runtime = build_runtime(rt, {})
    img = load_image(ElfFile.open(FIX / arch / "kernel61.o"), runtime)
    m = Machine(runtime)
    m.attach(img)
    site = img.section_address(".text")
    assert site is not None
    m.poke(site, code + runtime.site_end)
    sp = rt.index(rt.arch.stack_pointer)
    regs = [0x1111 * (i + 1) for i in range(rt.nregs)]
    regs[sp] = entry_sp(0)
    block = bytearray(BLOCK_LEN)
    struct.pack_into("<" + rt.fmt * (rt.nregs + 5), block, STATE_OFF, *regs, 2, 0, m.cr0, 0, 0)
    m.load_bank("test", [bytes(block)])
    return m, site, regs


def test_machine_runs_code_and_reports_the_registers(arch: str) -> None:
    code = gas(arch, "mov $0x1234, %eax; add $1, %eax; xchg %ecx, %edx")
    m, site, regs = _machine_with_code(arch, code)
    rt = m.rt
    (run,) = m.run_trials(1, site)
    assert run.done and run.error is None
    want = list(regs)
    ax, cx, dx = (rt.index(r) for r in (("rax", "rcx", "rdx") if arch == "x86_64"
                                         else ("eax", "ecx", "edx")))
    want[ax] = 0x1235  # a 32-bit move zero-extends on x86-64
    want[cx], want[dx] = regs[dx], regs[cx]
    assert list(run.out[: rt.nregs]) == want
    assert run.out[rt.out_flags] & 0x40 == 0  # ZF: 0x1235 is not zero


def test_machine_reports_a_run_that_does_not_reach_the_site_end(arch: str) -> None:
    m, site, _regs = _machine_with_code(arch, b"\x0f\x0b")  # ud2
    (run,) = m.run_trials(1, site)
    assert not run.done and run.error


def test_machine_traces_each_instruction(arch: str) -> None:
    code = gas(arch, "nop; mov $7, %eax; nop")
    m, site, _regs = _machine_with_code(arch, code)
    with m.trace(site, site + len(code), 16) as steps:
        (run,) = m.run_trials(1, site)
    assert run.done
    assert [s.pc for s in steps] == [site, site + 1, site + 6]
    ax = m.rt.index("rax" if arch == "x86_64" else "eax")
    assert steps[2].regs[ax] == 7  # the state before the last nop: after the mov
