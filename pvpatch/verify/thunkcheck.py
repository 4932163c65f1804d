"""The thunk check: each thunk run alone against a hostile callee, and its unwind data
(DWARF CFI or the kernel's ORC, pvpatch/rewrite/unwind.py) checked against a traced run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .compare import CALLEE_SAVED, MAX_DETAIL, disasm_text, hex_word
from .engine import FilePair
from .jobs import ThunkJob
from .records import Status, ThunkVerdict
from .runtime import entry_sp, exit_jump

if TYPE_CHECKING:
    from ..rewrite.unwind import CfaRow, OrcEntry


EH_FRAME = ".eh_frame"
PT_GNU_EH_FRAME = 0x6474E550
ORC_UNWIND, ORC_UNWIND_IP, ORC_HEADER = ".orc_unwind", ".orc_unwind_ip", ".orc_header"
MAX_SHOWN = 256  # bytes of a thunk disassembled in a report


def _thunk_address(ctx: FilePair, tj: ThunkJob) -> int | None:
    img = ctx.img_p
    if tj.address is not None:
        return img.emu_addr(tj.address)
    if img.elf.is_relocatable:
        sym = img.elf.symbols_by_name.get(tj.symbol)
        if sym is not None and sym.defined and sym.section_index in img.section_addr:
            return img.section_addr[sym.section_index] + sym.value
    sec = img.section_address(tj.section)
    return sec + tj.offset if sec is not None else None


def check_thunk(ctx: FilePair, tj: ThunkJob) -> ThunkVerdict:
    def verdict(status: Status, reason: str | None, trials: int = 0, seed: int | None = None,
                detail: Sequence[str] = ()) -> ThunkVerdict:
        shown = None if addr is None or ctx.img_p.elf.is_relocatable \
            else ctx.img_p.link_addr(addr)
        return ThunkVerdict(tj.symbol, tj.target, shown, status, reason, trials, seed,
                            tuple(detail))

    addr = _thunk_address(ctx, tj)
    if addr is None:
        return verdict("fail", f"thunk {tj.symbol} not found in the patched file")
    rt, m = ctx.rt, ctx.m_p
    img = ctx.img_p
    hostile = ctx.runtime.hostile["c"]
    target = img.symbols.get(tj.target, img.externals.get(tj.target))
    if target is None:
        return verdict("skip", f"target {tj.target} is not in the patched file")
    pokes: list[tuple[int, bytes]] = []
    if target != hostile:
        # Whatever the target is, the thunk alone meets the hostile callee.
        jump = exit_jump(rt, target, hostile)
        pokes.append((target, m.poke(target, jump)))
    try:
        keep = [rt.index(r) for r in (*tj.saves, *CALLEE_SAVED[ctx.arch.name])]
        ret = rt.index(ctx.arch.return_regs[0])
        code = m.read(addr, min(tj.size, MAX_SHOWN))  # for the report only
        for batch in ctx.batches():
            # As if called from a site: the caller stub calls the thunk.
            runs = m.run_trials(len(batch.seeds), ctx.runtime.caller, addr)
            for k, tseed in enumerate(batch.seeds):
                init = batch.inits[k]
                res = runs[k]
                problems: list[str] = []
                sp0 = entry_sp(k)
                if not res.done:
                    problems.append(f"the thunk did not return: {res.error}")
                else:
                    out = res.out
                    host_ret = ctx.host_word(batch, k, ret)
                    callee_sp = out[rt.out_callee_sp]
                    if out[ctx.sp] != sp0:
                        problems.append(f"{rt.regs[ctx.sp]}: expected {hex_word(sp0)} "
                                        f"got {hex_word(out[ctx.sp])}")
                    for i in keep:
                        if out[i] != init[i]:
                            problems.append(f"{rt.regs[i]}: expected {hex_word(init[i])} "
                                            f"got {hex_word(out[i])} (saved by the thunk)")
                    if callee_sp == 0:
                        problems.append(f"the thunk never called {tj.target}")
                    else:
                        if out[ret] != host_ret:
                            problems.append(f"{rt.regs[ret]}: expected {hex_word(host_ret)} got "
                                            f"{hex_word(out[ret])} (the callee's return value)")
                        if rt.word == 8 and (callee_sp + 8) % 16:
                            problems.append(f"the callee is entered with rsp={hex_word(callee_sp)},"
                                            " not ≡ 8 (mod 16)")
                if problems:
                    return verdict("fail", problems[0], batch.first + k + 1, tseed,
                                   [*problems[:MAX_DETAIL],
                                    f"thunk: {disasm_text(ctx.arch, code, addr)}"])
        problems = _check_unwind(ctx, tj, addr)
        if problems:
            return verdict("fail", problems[0], 1, ctx.first_seed(),
                           [*problems[:MAX_DETAIL], f"thunk: {disasm_text(ctx.arch, code, addr)}"])
        return verdict("pass", None, ctx.job.trials)
    finally:
        for at, old in reversed(pokes):
            m.poke(at, old)


# Bytes of stack read at each traced instruction: the deepest thunk frame and then some.
TRACE_WINDOW = 512


def _thunk_cfi(ctx: FilePair, addr: int) -> list[CfaRow] | str | None:
    """The CFA rules the patched file gives the thunk at emulator address `addr`, read
    as an unwinder does (a linked file: PT_GNU_EH_FRAME's binary-search table, then the
    FDE it names; an object: its relocated `.eh_frame`); a reason when they cannot be
    read; None when there are none for it (nothing to check: the rewriter says why in
    `Rewrite.unwind`, and accounting that the tables are the ones it writes)."""
    from ..rewrite.unwind import UnwindError, cfa_rows, find_fde, hdr_lookup, parse_eh_frame
    from ..rewrite.unwind import fde_at as fde_at_offset

    img = ctx.img_p
    elf = img.elf
    word = ctx.arch.ptr_size
    try:
        if elf.is_relocatable:
            index = img.section_index(EH_FRAME)
            if index is None or index not in img.section_addr:
                return None
            at = img.section_addr[index]
            eh = parse_eh_frame(img.read(at, elf.sections[index].size), at, word)
            fde = find_fde(eh, addr)
        else:
            seg = next((g for g in elf.segments if g.type == PT_GNU_EH_FRAME), None)
            if seg is None:
                return None
            hdr_at = img.emu_addr(seg.vaddr)
            fde_at = hdr_lookup(img.read(hdr_at, seg.memsz), hdr_at, addr)
            sec = elf.section_for_addr(img.link_addr(fde_at)) if fde_at is not None else None
            if sec is None:
                return None
            at = img.emu_addr(sec.addr)
            assert fde_at is not None
            found = fde_at_offset(img.read(at, sec.size), at, word, fde_at - at)
            fde = found if found.pc_begin <= addr < found.pc_begin + found.pc_range else None
    except UnwindError:
        return None  # none that an unwinder reads either: nothing to check
    try:
        return cfa_rows(fde) if fde is not None else None
    except UnwindError as exc:
        return f"its call-frame information cannot be read: {exc.message}"


def _thunk_orc(ctx: FilePair, tj: ThunkJob) -> list[tuple[int, OrcEntry]] | str | None:
    """A kernel object's ORC entries for the thunk: (offset into the thunk, entry), read
    through `.orc_unwind_ip`'s relocations against the thunk's symbol; None when there
    are none."""
    from ..rewrite.unwind import ORC_ENTRY, ORC_IP_SIZE, decode_orc, orc_layout

    elf = ctx.img_p.elf
    orc, ip = elf.section(ORC_UNWIND), elf.section(ORC_UNWIND_IP)
    if not elf.is_relocatable or orc is None or ip is None:
        return None
    sym = elf.symbols_by_name.get(tj.symbol)
    data = elf.section_data(orc)
    raw = []
    for relsec in elf.relocation_sections(ip):
        for r in elf.relocations(relsec):
            if sym is not None and r.sym == sym.index and 0 <= r.addend <= tj.size:
                at = r.offset // ORC_IP_SIZE * ORC_ENTRY.size
                raw.append((r.addend, data[at : at + ORC_ENTRY.size]))
    if not raw:
        return None
    header = elf.section(ORC_HEADER)
    layout = orc_layout(elf.section_data(header) if header is not None else None)
    if layout is None:
        return "its module's .orc_header names an ORC format pvpatch does not know"
    if any(len(e) != ORC_ENTRY.size for _a, e in raw):
        return "an .orc_unwind_ip slot past the end of .orc_unwind"
    return sorted(((a, decode_orc(layout, e)) for a, e in raw), key=lambda e: e[0])


def _check_unwind(ctx: FilePair, tj: ThunkJob, addr: int) -> list[str]:
    """Run the thunk once more, stopping at each of its instructions: the CFA its CFI row
    states (stack pointer + offset) must be the real one (the stack pointer at entry plus
    the return address), and every slot the row names must hold the return address or
    the saved register's value at entry."""
    from ..disasm import disassemble
    from ..rewrite.unwind import DWARF_REGS, ORC_REG_SP, RETURN_COLUMN, row_for

    rows = _thunk_cfi(ctx, addr)
    orc = _thunk_orc(ctx, tj)
    if rows is None and orc is None:
        return []
    for found in (rows, orc):
        if isinstance(found, str):
            return [found]
    rt, m = ctx.rt, ctx.m_p
    arch = ctx.arch
    sp_name = arch.stack_pointer
    texts = {addr + i.offset: i.text for i in disassemble(arch, m.read(addr, tj.size), addr)}
    columns = {v: k for k, v in DWARF_REGS[arch.name].items()}
    for _batch in ctx.batches():
        with m.trace(addr, addr + tj.size, TRACE_WINDOW) as steps:
            runs = m.run_trials(1, ctx.runtime.caller, addr)
        break
    else:
        return []
    entry = steps[0] if steps and steps[0].pc == addr else None
    if entry is None or not runs or not runs[0].done:
        return ["the traced run did not go through the thunk"]
    word = rt.word
    sp0 = entry.regs[ctx.sp]
    cfa_real = sp0 + word  # above the return address the call pushed
    ret_addr = int.from_bytes(entry.stack[:word], "little")
    for step in steps:
        where = f"at {tj.symbol}+{step.pc - addr:#x} ({texts.get(step.pc, '?')})"
        sp = step.regs[ctx.sp]
        if isinstance(orc, list):
            entry_at = [e for off, e in orc if off <= step.pc - addr]
            orc_e = entry_at[-1] if entry_at else None
            if orc_e is None or orc_e.sp_reg != ORC_REG_SP or \
                    orc_e.sp_offset != cfa_real - sp:
                said = "none" if orc_e is None else \
                    f"sp_reg {orc_e.sp_reg}, sp_offset {orc_e.sp_offset:+d}"
                return [f"{where}: its ORC entry says {said}, the stack pointer there makes "
                        f"the previous frame {sp_name}{cfa_real - sp:+d}"]
        if not isinstance(rows, list):
            continue
        row = row_for(rows, step.pc)
        if row is None or row.reg != DWARF_REGS[arch.name][sp_name]:
            return [f"{where}: the CFI gives no {sp_name}-based CFA"]
        if sp + row.offset != cfa_real:
            return [f"{where}: the CFI says CFA = {sp_name}{row.offset:+d}, the stack "
                    f"pointer there makes it {sp_name}{cfa_real - sp:+d}"]
        for column, slot in row.saved:
            name = columns.get(column, f"r{column}")
            at = cfa_real + slot - sp
            got = int.from_bytes(step.stack[at : at + word], "little") \
                if 0 <= at <= len(step.stack) - word else None
            want = ret_addr if name == RETURN_COLUMN[arch.name] else \
                entry.regs[rt.index(name)] if name in rt.regs else None
            if got is None or got != want:
                shown = "?" if got is None else hex_word(got)
                wanted = hex_word(want) if want is not None else "?"
                return [f"{where}: the CFI says {name} is saved at CFA{slot:+d}, which "
                        f"holds {shown}, not {name}'s {wanted}"]
    return []
