"""The site check: a rewritten site run against its reference, trial by trial."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from ..arch import Arch
from ..elf.reader import SHT_NOBITS
from ..errors import PvpatchError, VerifyError
from ..scan.sites import call_forms
from .compare import KEPT_FLAGS, MAX_DETAIL, RESULT_REGS, SYSTEM_FLAGS, compare_runs, disasm_text
from .engine import MAX_REF_RUNS, REF_RUNS, FilePair
from .jobs import SiteJob
from .loader import Image
from .machine import Machine, RunResult
from .models import RefModel
from .records import SiteVerdict, Status
from .runtime import ARITH_FLAGS

if TYPE_CHECKING:
    pass


@cache
def _capstone(arch_name: str) -> Any:
    import capstone

    from ..disasm import capstone_mode

    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone_mode(arch_name))
    cs.detail = True
    return cs


def _call_slot(arch: Arch, code: bytes, addr: int) -> int | None:
    """The memory slot of the first `call *mem` (absolute or rip-relative) in `code`."""
    from capstone import x86 as cx

    mask = (1 << (8 * arch.ptr_size)) - 1
    # The forms the kernel emits, at the start of the site, without a disassembler.
    for opcode, rip in call_forms(arch.name):
        if code.startswith(opcode) and len(code) >= len(opcode) + 4:
            disp = int.from_bytes(code[len(opcode) : len(opcode) + 4], "little", signed=True)
            return (addr + len(opcode) + 4 + disp if rip else disp) & mask
    for insn in _capstone(arch.name).disasm(code, addr):
        if insn.id != cx.X86_INS_CALL or len(insn.operands) != 1:
            continue
        op = insn.operands[0]
        if op.type != cx.X86_OP_MEM or op.mem.index != 0:
            continue
        if op.mem.base == cx.X86_REG_RIP:
            return int(insn.address + insn.size + op.mem.disp) & mask
        if op.mem.base == 0:
            return int(op.mem.disp) & mask
    return None


def _plain_call(arch: Arch, code: bytes) -> bool:
    """`code` is one indirect call of a form `_call_slot` reads without a disassembler."""
    return any(code.startswith(opcode) and len(code) == len(opcode) + 4
               for opcode, _rip in call_forms(arch.name))


def _boundaries(arch: Arch, code: bytes) -> list[int]:
    """Every instruction boundary decoding `code` from its start, including the end."""
    from ..disasm import insn_starts

    starts, stop = insn_starts(arch, code)
    return [*starts, stop]


class SiteCheck:
    def __init__(self, ctx: FilePair, sj: SiteJob) -> None:
        self.ctx = ctx
        self.sj = sj
        self.pokes: list[tuple[Machine, int, bytes, bool]] = []
        self.versions: Callable[[], tuple[str, ...]] = tuple

    def verdict(self, status: Status, reason: str | None, trials: int = 0,
                seed: int | None = None, detail: Sequence[str] = ()) -> SiteVerdict:
        sj = self.sj
        return SiteVerdict(sj.index, sj.section, sj.offset, sj.address, sj.op, sj.action,
                           status, reason, trials, seed, tuple(detail))

    def poke(self, m: Machine, addr: int, data: bytes, code: bool = True) -> None:
        self.pokes.append((m, addr, m.poke(addr, data, code), code))

    def run(self) -> SiteVerdict:
        try:
            return self._run()
        finally:
            for m, addr, old, code in reversed(self.pokes):
                m.poke(addr, old, code)

    def _run(self) -> SiteVerdict:
        ctx, sj = self.ctx, self.sj
        if sj.action == "jmp" or sj.tail:
            return self.verdict("skip", "tail: control does not return to the site")
        if sj.action == "ud2":
            return self.verdict("skip", "ud2: the site traps by design")
        contract: str | None = None
        ref_addr: int | None = None
        model: RefModel | None = None
        with_cr = False
        # What the op's argument is does not depend on how the site is rewritten.
        op_model = ctx.models.get(sj.op) if sj.op is not None else None
        flags_arg = op_model is not None and op_model.flags_arg
        if sj.action in ("inline", "nop"):
            model = ctx.models.get(sj.op) if sj.op is not None else None
            if model is not None and model.skip is not None:
                return self.verdict("skip", model.skip)
            if model is None:
                contract = f"contract only: no reference model for {sj.op or 'an unnamed op'}"
            else:
                ref_addr = ctx.runtime.models[model.op]
                with_cr = model.cr
        else:
            assert sj.target is not None
            ref_addr = _target_in(ctx.img_o, sj.target, sj.target_addr)
            if ref_addr is None:
                contract = "contract only: target not in file"
        o_sec = ctx.img_o.section_address(sj.section, sj.nth)
        p_sec = ctx.img_p.section_address(sj.section, sj.nth)
        if o_sec is None:
            return self.verdict("skip", f"section {sj.section} is not loaded")
        if p_sec is None:
            return self.verdict("fail", f"section {sj.section} is missing from the patched file")
        o_addr, p_addr = o_sec + sj.offset, p_sec + sj.offset
        n = sj.length
        arch = ctx.arch
        orig_code = ctx.m_o.read(o_addr, n)
        pat_code = ctx.m_p.read(p_addr, n)
        self.versions = lambda: (f"original: {disasm_text(arch, orig_code, o_addr)}",
                                 f"patched:  {disasm_text(arch, pat_code, p_addr)}")
        unsupported = ctx.unsupported_in(p_addr, n)
        if unsupported:
            return self.verdict("fail", "relocation inside the site: " + ", ".join(unsupported),
                                detail=self.versions())
        # A load-time relocation may change only a call's displacement; inline
        # code must run as written (a stale relocation can leave a harmless-looking
        # NOP for one load address and not for another).
        p_index = ctx.img_p.section_index(sj.section, sj.nth)
        if p_index is not None:
            sec = ctx.img_p.elf.sections[p_index]
            raw = b""
            if sec.type != SHT_NOBITS and sj.offset + n <= sec.size:
                at = sec.offset + sj.offset
                raw = ctx.img_p.elf.data[at : at + n]
            if len(raw) == n:
                moved = [k for k in range(n) if raw[k] != pat_code[k]
                         and not (sj.action in ("call", "thunk") and 1 <= k < 5)]
                if moved:
                    return self.verdict(
                        "fail", f"a relocation changes byte {moved[0]} of the rewritten site",
                        detail=(f"as written: {disasm_text(arch, raw, p_addr)}", *self.versions()))
        site_end = ctx.runtime.site_end
        self.poke(ctx.m_p, p_addr + n, site_end)
        # Static half of "ends exactly at the site's end": no instruction straddles it.
        if n not in _boundaries(arch, ctx.m_p.read(p_addr, n + 16)):
            return self.verdict("fail", "an instruction straddles the site end",
                                detail=self.versions())
        ref_site = o_addr
        ref_key: tuple[object, ...] | None = None
        if contract is None:
            assert ref_addr is not None
            slot = _call_slot(arch, orig_code, o_addr)
            if slot is not None and ctx.img_o.region_of(slot) is not None:
                if model is not None and _plain_call(arch, orig_code):
                    # Nothing but the call: every such site runs the same code
                    # (the model, from the same states), so its runs are shared.
                    ref_key = (orig_code[: n - 4], ref_addr, with_cr)
                # The slot the site's call reads points at the reference.
                if not ctx.all_shared(ref_key, flags_arg):
                    word_mask = (1 << (8 * ctx.rt.word)) - 1  # a hostile value wraps
                    self.poke(ctx.m_o, slot, (ref_addr & word_mask).to_bytes(ctx.rt.word,
                                                                           "little"),
                              code=not ctx.in_data(slot))
            else:
                ref_site = ctx.runtime.caller  # not an indirect call: call the reference
                if model is not None:
                    ref_key = ("caller", ref_addr, with_cr)
            if not ctx.all_shared(ref_key, flags_arg):
                self.poke(ctx.m_o, o_addr + n, site_end)
        # The flags compared with the reference: the system flags, and all of them when
        # the reference is a model of an op that sets every flag (restore_fl).
        flag_mask = SYSTEM_FLAGS | (ARITH_FLAGS if model is not None and model.flags_result
                                    else 0)
        return self._trials(ref_site, p_addr, ref_addr or 0, with_cr, contract, ref_key,
                            flags_arg, flag_mask)

    def _trials(self, ref_site: int, p_addr: int, ref_fn: int, with_cr: bool,
                contract: str | None, ref_key: tuple[object, ...] | None, flags_arg: bool,
                flag_mask: int) -> SiteVerdict:
        ctx, sj = self.ctx, self.sj
        rt = ctx.rt
        allowed = set(sj.clobbers)
        preserved = [i for i, r in enumerate(rt.regs) if i != ctx.sp and r not in allowed]
        results = [rt.index(r) for r in RESULT_REGS[ctx.arch.name] if r in allowed]
        # The usual outcome, checked at C speed; anything else is looked at closely.
        keep = itemgetter(*preserved, ctx.sp)  # = the initial values (sp: the entry sp)
        compared = [*results, *(range(rt.out_cr, rt.out_cr + 3) if with_cr else ())]
        same = itemgetter(*compared, rt.out_done)  # = the reference's
        fl = rt.out_flags
        for batch in ctx.batches(flags_arg):
            count = len(batch.seeds)
            refs: list[RunResult] = []
            if contract is None:
                cached = REF_RUNS.get((batch.key, ref_key)) if ref_key is not None else None
                if cached is not None:
                    refs = cached
                else:
                    refs = ctx.m_o.run_trials(count, ref_site, ref_fn, with_cr)
                    if ref_key is not None:
                        if len(REF_RUNS) >= MAX_REF_RUNS:
                            REF_RUNS.clear()
                        REF_RUNS[batch.key, ref_key] = refs
            pats = ctx.m_p.run_trials(count, p_addr, 0, with_cr)
            for k in range(count):
                t = batch.first + k
                ref: RunResult | None = None
                if contract is None:
                    ref = refs[k]
                    if not ref.done:
                        return self.verdict("skip", f"the reference run did not complete: "
                                            f"{ref.error}", t, batch.seeds[k], self.versions())
                pat = pats[k]
                init = batch.inits[k]
                if pat.done and not pat.writes and keep(pat.out) == keep(init) and (
                        (ref is None and not (pat.out[fl] ^ init[fl]) & KEPT_FLAGS)
                        or (ref is not None and not ref.writes
                            and not (pat.out[fl] ^ ref.out[fl]) & flag_mask
                            and same(pat.out) == same(ref.out))):
                    continue
                problems = compare_runs(ctx, k, init, preserved, results, ref, pat, with_cr,
                                    flag_mask)
                if problems:
                    return self.verdict("fail", problems[0], t + 1, batch.seeds[k],
                                        [*problems[:MAX_DETAIL], *self.versions()])
        return self.verdict("pass", contract, ctx.job.trials)


def _target_in(img: Image, name: str, addr: int | None) -> int | None:
    """The emulator address of a spec target: the symbol the linker's rule binds
    (pvpatch.plan.targets, as the planner and the rewriter bind it), else the address the
    planner found for a linked image (export table, symbol file)."""
    from ..plan.targets import resolve_target

    try:
        sym = resolve_target(img.elf, name)
    except VerifyError:
        raise
    except PvpatchError:
        sym = None  # ambiguous: the planner refused the name before any site used it
    if sym is not None and sym.defined:
        if img.elf.is_relocatable:
            base = img.section_addr.get(sym.section_index)
            if base is not None:
                return img.arch.wrap(base + sym.value)
        else:
            return img.emu_addr(sym.value)
    if addr is not None and not img.elf.is_relocatable:
        return img.emu_addr(addr)
    return img.symbols.get(name)
