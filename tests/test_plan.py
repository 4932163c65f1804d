"""The plan stage and its backends on their own: what each site becomes and why, as data
(nothing is rewritten here), on the kernel-style fixture with ops named by the 6.1 catalog.

The other suites see the plan through its rewrites; these pin the ladder itself (inline,
direct call, thunk, keep with the reason), the complete branch request a call, jmp or
thunk site carries, and how a spec is read into rules.
"""

from __future__ import annotations

import pytest
from paths import FIX

from pvpatch import api
from pvpatch.arch import ARCHES
from pvpatch.errors import SpecError
from pvpatch.plan.backend import load_backend, parse_spec_text
from pvpatch.plan.stage import BranchEdit, Plan, ThunkSpec, make_plan
from pvpatch.scan.stage import ScanResult

X86_64 = ARCHES["x86_64"]
# Every caller-saved register but rax: what a C target may change and a callee-save
# site (clobbers: rax) forbids.
SAVED = ("rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")
SPEC = """
arch = "x86_64"
[ops."irq.save_fl"]
action = "call"
target = "my_save_fl"
[ops."irq.irq_disable"]
action = "call"
target = "my_irq_disable"
convention = "callee-save"
[ops."irq.irq_enable"]
action = "nop"
[ops."cpu.io_delay"]
action = "ud2"
"""


@pytest.fixture(scope="module")
def scan() -> ScanResult:
    return api.load(FIX / "x86_64" / "kernel61.o", ops="catalog:linux-6.1-x86_64")


def by_op(plan: Plan) -> dict[str, set[tuple[object, ...]]]:
    out: dict[str, set[tuple[object, ...]]] = {}
    for d in plan.decisions:
        assert d.site.op is not None
        out.setdefault(d.site.op, set()).add((d.action, d.code, d.branch, d.reason))
    return out


def test_native_inlines_what_fits_and_keeps_the_rest_with_the_reason(scan: ScanResult) -> None:
    plan = make_plan(scan, load_backend("native", X86_64))
    assert plan.counts() == {"inline": 17, "keep": 4}
    assert plan.thunks == () and plan.targets == {}
    ops = by_op(plan)
    # cli, padded to the 6-byte site with the arch's NOP
    assert ops["irq.irq_disable"] == {("inline", b"\xfa" + X86_64.nop_fill(5), None, None)}
    assert ops["irq.save_fl"] == {("inline", b"\x9c\x58" + X86_64.nop_fill(4), None, None)}
    kept = {op for op, ds in ops.items() if {d[0] for d in ds} == {"keep"}}
    assert kept == {"cpu.io_delay", "mmu.flush_tlb_user", "irq.safe_halt"}
    for d in plan.decisions:
        assert (d.branch is None) == (d.action != "thunk" and d.action != "call")
        assert d.rewrites == (d.action != "keep")


def test_a_spec_ladder_call_thunk_nop_ud2_keep(scan: ScanResult) -> None:
    plan = make_plan(scan, parse_spec_text(SPEC, X86_64))
    assert plan.counts() == {"thunk": 2, "call": 3, "nop": 2, "ud2": 2, "keep": 12}
    thunk = ThunkSpec("__raw_callee_save_my_save_fl", "my_save_fl", SAVED, False)
    assert plan.thunks == (thunk,)
    ops = by_op(plan)
    # A C target at a callee-save site: through a thunk that saves what the site forbids.
    # The request is complete: the rel32 names the thunk, the function that runs is known.
    ((action, code, branch, reason),) = ops["irq.save_fl"]
    assert (action, code, reason) == ("thunk", None, None)
    assert branch == BranchEdit("call", thunk.symbol, 6, thunk)
    assert branch is not None and branch.target == "my_save_fl"
    # A callee-save target is called directly.
    assert ops["irq.irq_disable"] == {
        ("call", None, BranchEdit("call", "my_irq_disable", 6), None)}
    assert ops["irq.irq_enable"] == {("nop", X86_64.nop_fill(6), None, None)}
    assert ops["cpu.io_delay"] == {("ud2", b"\x0f\x0b" + X86_64.nop_fill(4), None, None)}
    assert ops["mmu.read_cr2"] == {("keep", None, None, "the backend has no rule for "
                                    "mmu.read_cr2")}
    rejected = {d.rejected for d in plan.decisions if d.action == "thunk"}
    assert rejected == {(f"a direct call to my_save_fl clobbers {', '.join(SAVED)}, "
                         "site allows rax",)}


def test_the_branch_request_encodes_the_site_bytes() -> None:
    call = BranchEdit("call", "f", 7)
    assert call.encode(X86_64, b"\x01\x02\x03\x04") == b"\xe8\x01\x02\x03\x04" + \
        X86_64.nop_fill(2)
    assert BranchEdit("jmp", "f", 5).encode(X86_64, bytes(4)) == b"\xe9" + bytes(4)
    assert call.target == "f"


def test_plan_findings_name_the_sites_the_backend_has_no_rule_for(scan: ScanResult) -> None:
    plan = make_plan(scan, parse_spec_text(SPEC, X86_64))
    no_rule = {f.site_index for f in plan.findings if f.rule == "PV203"}
    assert no_rule == {d.site.index for d in plan.decisions if d.reason is not None
                       and d.reason.startswith("the backend has no rule")}
    assert len(no_rule) == 12


def test_backend_rules_by_name_then_type_number() -> None:
    b = parse_spec_text('arch = "x86_64"\n[ops.30]\naction = "nop"\n'
                        '[ops."irq.save_fl"]\naction = "keep"\nreason = "mine"\n', X86_64)
    assert not b.builtin and b.arch == "x86_64" and b.thunk_section == ".text.pvpatch"
    rule = b.rule_for("irq.save_fl", 30)
    assert rule is not None and (rule.action, rule.reason) == ("keep", "mine")
    by_type = b.rule_for("irq.other", 30)
    assert by_type is not None and by_type.action == "nop"
    assert b.rule_for(None, 31) is None and b.default.action == "keep"
    native = load_backend("native", X86_64)
    assert native.builtin and native.rule_for("irq.irq_disable", 0) is not None


@pytest.mark.parametrize(("text", "words"), [
    ('[ops."irq.save_fl"]\naction = "call"\n', "needs a target symbol"),
    ('[ops."irq.save_fl"]\naction = "nop"\ntarget = "f"\n', "only with call or jmp"),
    ('[ops."irq.save_fl"]\naction = "call"\ntarget = "f"\nconvention = "pascal"\n',
     "convention must be"),
    ('[defaults]\naction = "call"\n', "[defaults] action must be keep, nop or ud2"),
    ('colour = "blue"\n', "unknown key 'colour'"),
])
def test_backend_spec_errors(text: str, words: str) -> None:
    with pytest.raises(SpecError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_spec_text(text, X86_64)
