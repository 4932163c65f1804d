"""The plan stage: decide, per site, what it becomes and why.

A plan is pure data: it can be printed or serialised before anything is
written.  The ladder mirrors the kernel's paravirt_patch_default():
inline native code if it fits the site and its clobber mask, else a direct
call when the target's convention fits the mask, else a call through a
register-saving thunk, else the site is kept, with the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import field, replace
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from ..arch import Arch, convention_changes
from ..elf.reader import Symbol
from ..record import fast_init, record
from ..rules import Finding
from ..scan.stage import ScanResult, Site, site_finding
from .backend import Action, Backend, OpRule, returns_to_site
from .targets import SymbolMap, TargetAddress, resolve_target, target_address

if TYPE_CHECKING:
    from .coverage import Coverage

CALL_LEN = 5  # e8/e9 rel32
UD2 = b"\x0f\x0b"


@record
class ThunkSpec:
    """A register-saving wrapper around a C-convention target."""

    symbol: str
    target: str
    saves: tuple[str, ...]  # push order; restored in reverse
    endbr: bool


@record
class BranchEdit:
    """The edit a call, jmp or thunk site asks for, complete: `opcode` (e8 call / e9 jmp)
    with a rel32 to `symbol`, nop-padded to `length` bytes.  `symbol` is the thunk's when
    the branch goes through one (`thunk`); `target` is the function that finally runs.
    Only the rel32 is left to whoever writes it (a relocation, or an address)."""

    opcode: Literal["call", "jmp"]
    symbol: str
    length: int
    thunk: ThunkSpec | None = None

    @property
    def target(self) -> str:
        return self.thunk.target if self.thunk is not None else self.symbol

    def encode(self, arch: Arch, rel32: bytes) -> bytes:
        """The site's new bytes with `rel32` (4 bytes) in the branch's displacement field:
        the one place branch bytes are made (the rewriter's, and diff's expectation)."""
        return (b"\xe9" if self.opcode == "jmp" else b"\xe8") + rel32 + \
            arch.nop_fill(self.length - CALL_LEN)


@fast_init
@record
class Decision:
    """What one site becomes (an action), and why when it is kept."""

    site: Site
    action: Action
    reason: str | None = None
    code: bytes | None = None  # full new site bytes for inline / nop / ud2
    # call / jmp / thunk: the branch to write (the symbol its rel32 names, the thunk it
    # goes through, the function that finally runs); else None, and `code`, when the site
    # is rewritten, is its complete new bytes.
    branch: BranchEdit | None = None
    rule: OpRule | None = None
    tail: bool = False
    rejected: tuple[str, ...] = ()  # why earlier rungs of the ladder did not fit

    @property
    def rewrites(self) -> bool:
        return self.action != "keep"


@record
class Plan:
    """Every site's decision, the thunks they need and what planning found: pure data,
    nothing written."""

    scan: ScanResult = field(repr=False)
    backend: Backend
    decisions: tuple[Decision, ...]
    thunks: tuple[ThunkSpec, ...]
    drop_patched: bool = False
    # What planning found beyond the scan: sites whose bytes are not what their entry
    # claims (PV105, PV114-PV116; never rewritten) and what the backend cannot do
    # (PV201-PV203).  `check` and `patch` report the same list.
    findings: tuple[Finding, ...] = ()
    # Linked files: where each spec target is and what said so (.symtab, the image's
    # export table, a symbol file): the rewriter calls these addresses.
    targets: Mapping[str, TargetAddress] = field(default_factory=dict)
    # --final: every run-time patcher's entry at a rewritten site is neutralised or dropped
    final: bool = False

    @cached_property
    def coverage(self) -> Coverage:
        """Which tables cover each site, what the kernel does there, the table edits."""
        from .coverage import of_plan

        return of_plan(self)

    @property
    def arch(self) -> Arch:
        return self.scan.arch

    def counts(self) -> dict[str, int]:
        return dict(Counter(d.action for d in self.decisions))


def _regs(names: Iterable[str]) -> str:
    return ", ".join(names)


class Planner:
    def __init__(self, scan: ScanResult, backend: Backend,
                 symbols: SymbolMap | None = None) -> None:
        self.scan = scan
        self.backend = backend
        self.symbols = symbols
        self.addresses: dict[str, TargetAddress | None] = {}
        self.arch = scan.arch
        self.thunks: dict[tuple[str, tuple[str, ...]], ThunkSpec] = {}
        elf = scan.elf
        self.endbr = backend.endbr if backend.endbr is not None else elf.has_ibt_property()
        self.linked = not elf.is_relocatable
        self._inline_cache: dict[tuple[str, int, int], tuple[Action, str | None, bytes | None]] = {}
        self._targets: dict[str, Symbol | None] = {}
        self._native_cache: dict[tuple[bytes, int], bytes] = {}

    def plan(self, drop_patched: bool = False, final: bool = False) -> Plan:
        from ..scan.integrity import site_problems

        problems = site_problems(self.scan)
        self.integrity: dict[int, list[Finding]] = {}
        for f in problems:
            if f.site_index is not None:
                self.integrity.setdefault(f.site_index, []).append(f)
        decisions = tuple(self.decide(s) for s in self.scan.sites)
        # A site pvpatch cannot name the shape of but already holds exactly the planned
        # bytes (a spec's own inline code, patched before) is not a lie.
        already = {d.site.index for d in decisions if d.rewrites and d.code == d.site.code}
        kept = [f for f in problems if not (f.rule == "PV114" and f.site_index in already)]
        findings = tuple(kept) + tuple(plan_findings(self.backend, self.arch, decisions))
        targets = {n: a for n, a in self.addresses.items() if a is not None}
        plan = Plan(self.scan, self.backend, decisions, tuple(self.thunks.values()),
                    drop_patched, findings, MappingProxyType(targets), final)
        from .coverage import runtime_findings

        undone = runtime_findings(plan)  # PV206: rewrites the kernel will undo
        if not undone:
            return plan
        again = replace(plan, findings=findings + tuple(undone))
        again.__dict__["coverage"] = plan.coverage  # the same sites, decisions and mode
        return again

    def decide(self, site: Site) -> Decision:
        if site.index in self.scan.unsafe:
            return Decision(site, "keep", self._unsafe_reason(site))
        d = self._decide(site)
        if not self.integrity:
            return d
        bad = self.integrity.get(site.index)
        if bad and d.rewrites and not (all(f.rule == "PV114" for f in bad)
                                       and d.code == site.code):
            return Decision(site, "keep", self._unsafe_reason(site), rule=d.rule)
        return d

    def _decide(self, site: Site) -> Decision:
        rule = self.backend.rule_for(site.op, site.type)
        if site.native is not None and self.backend.builtin and \
                (rule is None or rule.action == "inline"):
            return self._file_native(site, site.native, rule)
        if rule is None:
            rule = self.backend.default
            if site.op is None and self.backend.rules:
                why = "op unknown"
            else:
                why = rule.reason or f"the backend has no rule for {site.op}"
            if rule.action == "keep":
                return Decision(site, "keep", why)
        action = rule.action
        if action == "keep":
            return Decision(site, "keep", rule.reason or "the backend says keep", rule=rule)
        if action == "nop":
            return Decision(site, "nop", code=self.arch.nop_fill(site.len), rule=rule)
        if action == "ud2":
            if site.len < len(UD2):
                return Decision(site, "keep", _short(len(UD2), site.len), rule=rule)
            return Decision(site, "ud2", code=UD2 + self.arch.nop_fill(site.len - 2), rule=rule)
        if action == "inline":
            return self._inline(site, rule)
        if action == "jmp":
            # A spec may name the op by its type number, which only the catalog resolves.
            if returns_to_site(self.arch, site.op):
                return Decision(site, "keep", f"{site.op} returns to its site: a jmp would "
                                "skip the rest of its caller", rule=rule)
            return self._branch(site, rule, "jmp")
        return self._call(site, rule)

    def _unsafe_reason(self, site: Site) -> str:
        found = [*self.scan.findings, *self.integrity.get(site.index, ())]
        rules = sorted({f"{f.rule} {f.name}" for f in found
                        if f.site_index == site.index and f.severity == "error"})
        return "unsafe to rewrite: " + (", ".join(rules) if rules else "PV104 site-overlap")

    def _file_native(self, site: Site, native: bytes, rule: OpRule | None) -> Decision:
        """The kernel's own replacement for this site, carried in the file: what the
        kernel itself writes there on bare metal, so it fits the site by construction."""
        if len(native) > site.len:
            return Decision(site, "keep", _short(len(native), site.len), rule=rule)
        # Thousands of sites, a handful of (form, length) pairs: each padded once.
        key = (native, site.len)
        code = self._native_cache.get(key)
        if code is None:
            code = self._native_cache[key] = native + self.arch.nop_fill(site.len - len(native))
        return Decision(site, "inline", code=code, rule=rule)

    def _inline(self, site: Site, rule: OpRule) -> Decision:
        # Tables have thousands of sites of a few shapes: decide each shape once.
        key = (rule.key, site.len, site.clobbers)
        shape = self._inline_cache.get(key)
        if shape is None:
            shape = self._inline_cache[key] = self._inline_shape(site, rule)
        action, reason, code = shape
        return Decision(site, action, reason, code=code, rule=rule,
                        tail=rule.tail and action == "inline")

    def _inline_shape(self, site: Site, rule: OpRule) -> tuple[Action, str | None, bytes | None]:
        assert rule.code is not None
        if len(rule.code) > site.len:
            return "keep", _short(len(rule.code), site.len), None
        extra = sorted(rule.clobbers - set(site.clobber_regs), key=self._reg_order)
        if extra:
            return "keep", f"clobbers {_regs(extra)}, {_allows(site)}", None
        return "inline", None, rule.code + self.arch.nop_fill(site.len - len(rule.code))

    def _target_problem(self, target: str) -> str | None:
        """A linked file has no linker left to resolve a missing target.  An ambiguous
        name is refused (SpecError) in any file: the rewriter binds the same symbol."""
        if target not in self._targets:
            self._targets[target] = resolve_target(self.scan.elf, target)
        if not self.linked:
            return None
        if target not in self.addresses:
            self.addresses[target] = target_address(self.scan.elf, target, self.symbols)
        if self.addresses[target] is None:
            where = " or the symbol file" if self.symbols is not None else ""
            return (f"target {target} is not defined in this linked file (not in .symtab, "
                    f"the export table{where})")
        return None

    def _unreachable(self, site: Site, rule: OpRule) -> Decision | None:
        """Why a branch to the rule's target cannot be written at this site, if it cannot."""
        assert rule.target is not None
        if site.len < CALL_LEN:
            return Decision(site, "keep", _short(CALL_LEN, site.len), rule=rule)
        problem = self._target_problem(rule.target)
        if problem:
            return Decision(site, "keep", problem, rule=rule)
        return None

    def _branch(self, site: Site, rule: OpRule, kind: Action) -> Decision:
        assert rule.target is not None
        refused = self._unreachable(site, rule)
        if refused is not None:
            return refused
        return Decision(site, kind, branch=BranchEdit("jmp" if kind == "jmp" else "call",
                                                      rule.target, site.len),
                        rule=rule, tail=kind == "jmp")

    def _call(self, site: Site, rule: OpRule) -> Decision:
        assert rule.target is not None
        refused = self._unreachable(site, rule)
        if refused is not None:
            return refused
        allowed = set(site.clobber_regs)
        changes = convention_changes(self.arch, rule.convention)
        extra = sorted(set(changes) - allowed, key=self._reg_order)
        if not extra:
            return Decision(site, "call", branch=BranchEdit("call", rule.target, site.len),
                            rule=rule)
        direct_refused = f"a direct call to {rule.target} clobbers {_regs(extra)}, {_allows(site)}"
        # A thunk saves exactly what the target may change and the site forbids.
        saves = tuple(r for r in changes if r not in allowed)
        thunk = self._thunk(rule.target, saves)
        return Decision(site, "thunk", branch=BranchEdit("call", thunk.symbol, site.len, thunk),
                        rule=rule, rejected=(direct_refused,))

    def _thunk(self, target: str, saves: tuple[str, ...]) -> ThunkSpec:
        key = (target, saves)
        found = self.thunks.get(key)
        if found is None:
            # The kernel's name for the usual set (every caller-saved register
            # but the return one); other sets name what they save.
            standard = tuple(r for r in self.arch.caller_saved if r not in self.arch.return_regs)
            name = f"__raw_callee_save_{target}"
            if saves != standard:
                name += "__" + "_".join(saves)
            found = self.thunks[key] = ThunkSpec(name, target, saves, self.endbr)
        return found

    def _reg_order(self, reg: str) -> int:
        order = (*self.arch.return_regs, *self.arch.caller_saved)
        return order.index(reg) if reg in order else len(order)


def _short(need: int, have: int) -> str:
    return f"site too short: {need} bytes needed, {have} available"


def _allows(site: Site) -> str:
    if not site.clobber_regs:
        return "site allows none"
    return f"site allows {_regs(site.clobber_regs)}"


def _needs_thunk(arch: Arch, site: Site) -> bool:
    changes = set(arch.return_regs) | set(arch.caller_saved)
    return bool(changes - set(site.clobber_regs))


def plan_findings(backend: Backend, arch: Arch, decisions: Iterable[Decision]) -> list[Finding]:
    """PV201 (shorter than a direct call), PV202 (a C target at a callee-save site that
    stays unpatched: too short for the call to a thunk, or a linked file where the
    target is not defined), PV203 (the backend has no rule for the op)."""
    out = []
    rules: dict[tuple[str | None, int], OpRule | None] = {}  # a few ops, many sites
    for d in decisions:
        s = d.site
        if s.len < CALL_LEN:
            out.append(site_finding(
                "PV201", s, f"site of {s.len} bytes is too short for a direct call "
                f"({CALL_LEN} bytes): only an inline form fits"))
        key = (s.op, s.type)
        rule = rules.get(key, d.rule)
        if key not in rules:
            rule = rules[key] = backend.rule_for(s.op, s.type)
        if rule is None:
            what = f"op {s.op}" if s.op else f"unnamed op (type {s.type})"
            out.append(site_finding(
                "PV203", s, f"backend {backend.name} has no rule for {what}; the site "
                f"becomes {d.action}" + (f" ({d.reason})" if d.reason else "")))
        elif (d.action == "keep" and rule.action == "call" and rule.convention == "c"
              and _needs_thunk(arch, s)):
            out.append(site_finding(
                "PV202", s, f"C-convention target {rule.target} needs a register-saving "
                f"thunk at this site (it allows {', '.join(s.clobber_regs) or 'no register'}"
                f"), and none can be used: {d.reason}"))
    return out


def make_plan(scan: ScanResult, backend: Backend, *, drop_patched: bool = False,
              symbols: SymbolMap | None = None, final: bool = False) -> Plan:
    backend.check_arch(scan.arch, scan.path)
    return Planner(scan, backend, symbols).plan(drop_patched, final)
