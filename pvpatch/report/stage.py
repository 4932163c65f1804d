"""The report stage: turn results into JSON-ready dicts and readable text.

Nothing here prints; the CLI writes what these functions return.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import VerifyError
from ..rules import Finding
from ..scan.integrity import site_form
from ..scan.stage import ScanResult, Site
from .forms import shown

if TYPE_CHECKING:
    from ..arch import Arch
    from ..disasm import Insn
    from ..plan.coverage import SiteCoverage
    from ..plan.stage import Plan
    from ..rewrite.stage import Rewrite, SitePatch
    from ..verify.records import SiteVerdict, ThunkVerdict, VerifyReport
    from .symbolic import Symboliser


def symboliser(result: ScanResult) -> Symboliser:
    """Names for a scanned file's operands (see pvpatch/report/symbolic.py)."""
    from .symbolic import Symboliser  # listings only: a patch run does not load it

    return Symboliser(result.elf)


def site_insns(sym: Symboliser, site: Site) -> list[Insn]:
    """A site's instructions as the file has them, symbolised: `call *pv_ops+0xf0(%rip)`
    (the relocation at the operand, or in linked files the address's symbol)."""
    return sym.insns(site.code, address=site.address, section_index=site.section_index,
                     offset=site.offset)


def _after_insns(sym: Symboliser, p: SitePatch) -> list[Insn]:
    site, d = p.decision.site, p.decision
    target = d.branch.symbol if d.branch is not None else None
    return sym.insns(p.after, address=site.address, section_index=site.section_index,
                     offset=site.offset, relocs=(), branch_target=target)


def _code(insns: Iterable[Insn]) -> str:
    return "; ".join(i.text for i in insns)


def _kept_code(arch: Arch, site: Site, symbols: Callable[[], Symboliser]) -> str:
    """A kept site's call, as the symboliser names it.  A vmlinux keeps thousands of sites
    that are one `call *pv_ops+slot` each: that form is written from the slot the scan read
    (what objdump and the symboliser say for it), the rest decoded (`symbols()` makes the
    symboliser on first use)."""
    slot = site.slot
    head = site_form(arch, site.code) if slot is not None else None
    if slot is not None and head is not None and head.kind == "ops-call" \
            and len(site.code) == head.length:
        rip = "(%rip)" if head.opcode == b"\xff\x15" and arch.name == "x86_64" else ""
        off = slot * arch.ptr_size
        return f"call *pv_ops{f'+{off:#x}' if off else ''}{rip}"
    return _code(site_insns(symbols(), site))


# Said once per file, not per site: what would name the ops.
UNNAMED = ("  ops unnamed: the file has no BTF, DWARF, module vermagic or kernel release "
           "string a shipped catalog matches; give --ops catalog:NAME (`pvpatch catalogs`), "
           "btf:VMLINUX or dwarf:FILE")


def site_json(result: ScanResult, site: Site, sym: Symboliser | None = None,
              runtime: SiteCoverage | None = None) -> dict[str, Any]:
    sym = sym if sym is not None else symboliser(result)
    out = {
        "index": site.index,
        "section": site.section,
        "offset": site.offset,
        "address": site.address,
        "type": site.type,
        "op": site.op,
        "len": site.len,
        "clobbers": site.clobbers,
        "clobber_regs": list(site.clobber_regs),
        "bytes": site.code.hex(),
        "insns": [i.text for i in site_insns(sym, site)],
        "native": site.native.hex() if site.native is not None else None,
        "entries": list(site.entry_indices),
    }
    if runtime is not None:
        out["runtime"] = runtime_json(runtime)
    return out


def scan_json(result: ScanResult) -> dict[str, Any]:
    from ..plan.coverage import of_scan

    sym = symboliser(result)
    # Which table entries cover each site and what the kernel does there at boot or load.
    cov = of_scan(result)
    table = None
    if result.table is not None:
        table = {
            "section": result.table.section.name,
            "family": result.table.family,
            "layout": result.table.layout.name,
            "entry_size": result.table.entry_size,
            "count": result.table.count,
        }
    return {
        "path": result.path,
        "arch": result.arch.name,
        "elf_type": result.elf_type,
        "table": table,
        "sites": [site_json(result, s, sym, cov.sites.get(s.index)) for s in result.sites],
    }


def finding_json(f: Finding) -> dict[str, Any]:
    return {
        "rule": f.rule,
        "name": f.name,
        "severity": f.severity,
        "message": f.message,
        "section": f.section,
        "offset": f.offset,
        "address": f.address,
        "site_index": f.site_index,
        "op": f.op,
        "file_offset": f.file_offset,
        "length": f.length,
    }


def site_location(site: Site) -> str:
    rel = f"{site.section}+{site.offset:#x}"
    return f"{site.address:#x} {rel}" if site.address is not None else rel


def clobber_text(site: Site) -> str:
    return ",".join(site.clobber_regs) if site.clobber_regs else "none"


def scan_text(result: ScanResult) -> list[str]:
    if result.table is None:
        return [f"{result.path}: {result.arch.name} {result.elf_type}, no paravirt table"]
    t = result.table
    lines = [
        f"{result.path}: {result.arch.name} {result.elf_type}, {t.section.name} "
        f"({t.layout.name}, {t.entry_size}-byte entries), {len(result.sites)} sites"
        + (f", ops from {result.ops.name}" if result.ops is not None else "")
    ]
    if not result.sites:
        return lines
    if result.ops is None:
        lines.append(UNNAMED)
    rows = [("idx", "site", "op", "len", "clobbers", "code")]
    sym = symboliser(result)
    for s in result.sites:
        code = _code(site_insns(sym, s))
        rows.append(
            (
                str(s.index),
                site_location(s),
                s.op or f"type {s.type}",
                str(s.len),
                f"{s.clobbers:#x} {clobber_text(s)}",
                code,
            )
        )
    lines.extend(_columns(rows, right={0, 3}))
    return lines


def findings_text(path: str, findings: Iterable[Finding]) -> list[str]:
    out = []
    for f in findings:
        where = f.where()
        out.append(f"{path}: {f.severity}: {f.rule} {f.name}: {where + ': ' if where else ''}"
                   f"{f.message}")
    return out


def _columns(rows: Sequence[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)
        ]
        out.append("  " + "  ".join(cells).rstrip())
    return out


ACTIONS = ("inline", "call", "thunk", "jmp", "nop", "ud2", "keep")


def runtime_json(sc: SiteCoverage | None) -> dict[str, Any] | None:
    """What the kernel does at a site at boot or module load, entry by entry."""
    if sc is None:
        return None
    return {
        "outcome": sc.outcome,
        "predicted": sc.predicted.hex() if sc.predicted is not None else None,
        "tables": [
            {
                "section": c.section,
                "index": c.index,
                "kind": c.kind,
                "feature": c.feature,
                "not": c.negate,
                "applies": c.applies,
                "edit": c.edit.kind if c.edit is not None else None,
                "copy_of": c.edit.source if c.edit is not None else None,
            }
            for c in sc.covers
        ],
    }


def runtime_text(plan: Plan, patches: Iterable[SitePatch]) -> list[str]:
    """One summary line, then one line per group of rewritten sites the kernel will change
    alike (op, outcome, predicted bytes, the tables that act); `--json` has every site."""
    cov = plan.coverage
    groups: dict[tuple[str, str, str], list[Site]] = {}
    counts: dict[str, int] = {}
    # Thousands of sites, a handful of ways their entries act: each way described once.
    # (What `describe(indexed=False)` and `applies` read of a cover.)
    described: dict[tuple[tuple[str, str, int | None, bool, str | None], ...], str] = {}
    for p in patches:
        if not p.decision.rewrites:
            continue  # (a kept site's coverage is made only when asked for)
        sc = cov.sites.get(p.decision.site.index)
        if sc is None:
            continue
        counts[sc.outcome] = counts.get(sc.outcome, 0) + 1
        if sc.outcome == "pvpatch":
            continue
        site = p.decision.site
        shape = tuple((c.section, c.kind, c.feature, c.negate,
                       c.edit.kind if c.edit is not None else None) for c in sc.covers)
        tables = described.get(shape)
        if tables is None:
            tables = described[shape] = "; ".join(
                c.describe(indexed=False) for c in sc.covers if c.applies is not False)
        bytes_ = f" ({sc.predicted.hex(' ')})" if sc.predicted is not None else ""
        key = (site.op or f"type {site.type}", f"{sc.says()}{bytes_}", tables)
        groups.setdefault(key, []).append(site)
    if not counts:
        return []
    head = ", ".join(f"{n} {RUNTIME_WORDS[k]}" for k, n in sorted(counts.items()))
    hint = "" if counts.keys() == {"pvpatch"} else " (--final keeps pvpatch's bytes)"
    return [f"  at run time: {head}{hint}",
            *(f"  runtime {len(sites):5}  {op}: {says} [{tables}] at {places(sites)}"
              for (op, says, tables), sites in sorted(groups.items()))]


PLACES_SHOWN = 3  # locations named on a grouped line; `--json` lists every site


def places(sites: Sequence[Site]) -> str:
    """`.text+0x10, .text+0x40, .text+0x90 and 12 more`."""
    named = ", ".join(site_location(s) for s in sites[:PLACES_SHOWN])
    more = len(sites) - PLACES_SHOWN
    return f"{named} and {more} more" if more > 0 else named


RUNTIME_WORDS = {
    "pvpatch": "keep pvpatch's bytes",
    "kernel": "re-patched by the kernel",
    "native": "overwritten with the kernel's native replacement",
    "depends": "depend on CPU features",
}


def patch_json(rw: Rewrite, output: str | None, verify: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    plan = rw.plan
    cov = plan.coverage
    sites = []
    for p in rw.patches:
        d, s = p.decision, p.decision.site
        sites.append({
            "index": s.index,
            "section": s.section,
            "offset": s.offset,
            "address": s.address,
            "type": s.type,
            "op": s.op,
            "len": s.len,
            "clobbers": s.clobbers,
            "action": d.action,
            "reason": d.reason,
            "before": p.before.hex(),
            "after": p.after.hex(),
            "runtime": runtime_json(cov.sites.get(s.index)),
        })
    counts = {a: 0 for a in ACTIONS}
    for p in rw.patches:
        counts[p.decision.action] += 1
    return {
        "input": plan.scan.path,
        "output": output,
        "arch": plan.arch.name,
        "backend": plan.backend.source,
        "sites": sites,
        "targets": [
            {"name": t.name, "address": t.address, "source": t.source}
            for t in plan.targets.values()
        ],
        "thunks": [
            {
                "symbol": t.spec.symbol,
                "target": t.spec.target,
                "saves": list(t.spec.saves),
                "section": t.section,
                "offset": t.offset,
                "address": t.address,
            }
            for t in rw.thunks
        ],
        "counts": counts,
        "dropped_entries": rw.dropped_entries,
        "neutralised_entries": rw.neutralised_entries,
        "copied_entries": rw.copied_entries,
        "final": plan.final,
        "signature": signature_state(rw),
        "verify": verify,
    }


def _unpadded(arch: Arch, code: bytes, insns: Sequence[Insn]) -> list[Insn]:
    """`insns` without the NOPs that pad them to the site's end."""
    out = list(insns)
    while out and arch.is_nop_fill(code[out[-1].offset : out[-1].offset + out[-1].size]):
        out.pop()
    return out or list(insns)


def signature_state(rw: Rewrite) -> str:
    """What happened to a module signature: signed, removed, kept or none."""
    if rw.signed:
        return "signed"
    if rw.signature_removed:
        return "removed"
    return "kept" if rw.plan.scan.elf.module_signature is not None else "none"


def patch_text(rw: Rewrite, output: str | None) -> list[str]:
    plan = rw.plan
    counts: dict[str, int] = {}
    by_op: dict[tuple[str, str], int] = {}
    # What each (action, op) group's sites become, when they all become the same thing
    # (NOP padding aside): `irq.save_fl -> pushf; pop %rax`.
    heads: dict[tuple[str, str], str | None] = {}
    # Made on first use: only a form forms.py cannot read needs the disassembler.
    symbols = functools.cache(functools.partial(symboliser, plan.scan))

    # A vmlinux has thousands of sites and a handful of new forms: each decoded once.
    decoded: dict[tuple[bytes, str | None], str] = {}
    arch = plan.arch
    # Kept sites, one line per (op, reason, call): a vmlinux keeps a thousand or more.
    kept: dict[tuple[str, str, str], list[Site]] = {}
    for p in rw.patches:
        d = p.decision
        action, site = d.action, d.site
        counts[action] = counts.get(action, 0) + 1
        op = site.op or f"type {site.type}"
        key = (action, op)
        by_op[key] = by_op.get(key, 0) + 1
        if action == "keep":
            kept.setdefault((op, d.reason or "", _kept_code(arch, site, symbols)),
                            []).append(site)
        else:
            form = (p.after, d.branch.symbol if d.branch is not None else None)
            head = decoded.get(form)
            if head is None:
                # A native form is read from pvpatch/report/forms.py (no disassembler to import).
                head = shown(arch, p.after) \
                    if action == "inline" and p.after != p.before else None
            if head is None:
                # Only the new form is shown: the old one (and the names it needs, which
                # in a stripped image means reading the whole export table) is not decoded.
                after = _after_insns(symbols(), p) if p.after != p.before \
                    else site_insns(symbols(), d.site)
                head = _code(_unpadded(arch, p.after, after))
            decoded[form] = head
            heads[key] = head if heads.get(key, head) == head else None
    parts = [f"{len(rw.patches)} sites", *(f"{counts[a]} {a}" for a in ACTIONS if counts.get(a))]
    if plan.scan.ops is not None:
        parts.append(f"ops from {plan.scan.ops.name}")
    lines = [f"{plan.scan.path} -> {output or '(not written)'}: {', '.join(parts)}"]
    if plan.scan.ops is None and rw.patches:
        lines.append(UNNAMED)
    for (name, op), n in sorted(by_op.items()):
        becomes = heads.get((name, op))
        lines.append(f"  {name:6} {n:5}  {op}" + (f" -> {becomes}" if becomes else ""))
    for tgt in plan.targets.values():
        lines.append(f"  target {tgt.name} at {tgt.address:#x} (from {tgt.source})")
    for t in rw.thunks:
        where = f"{t.address:#x}" if t.address is not None else f"{t.section}+{t.offset:#x}"
        lines.append(f"  thunk  {t.spec.symbol} at {where}: saves {', '.join(t.spec.saves)}, "
                     f"calls {t.spec.target}")
    for (op, reason, code), sites in sorted(kept.items()):
        lines.append(f"  kept   {len(sites):5}  {op}: {reason} [{code}] at {places(sites)}")
    if rw.dropped_entries:
        lines.append(f"  dropped {rw.dropped_entries} table entries of rewritten sites")
    if rw.neutralised_entries:
        lines.append(f"  neutralised {rw.neutralised_entries} table entries of rewritten sites "
                     "(the kernel skips them)")
    if rw.copied_entries:
        lines.append(f"  replaced {rw.copied_entries} table entries of rewritten sites by copies "
                     "of a kept entry (the kernel re-applies that entry to its own site)")
    lines.extend(runtime_text(plan, rw.patches))
    if rw.signed:
        lines.append("  module signed (the previous signature, if any, replaced)")
    elif rw.signature_removed:
        lines.append("  module signature removed (the module no longer matches it); "
                     "re-sign it (--sign-key/--sign-cert) or load it unsigned")
    return lines


def verify_summary(report: VerifyReport, trials: int, seed: int) -> str:
    """The one verify line under a patch report (one file or each file of a tree)."""
    s, t = report.summary, report.thunk_summary
    return (f"  verify: sites {s['pass']} pass, {s['fail']} fail, {s['skip']} skip; "
            f"thunks {t['pass']} pass, {t['fail']} fail ({trials} trials each, seed {seed})")


def _where(v: SiteVerdict | ThunkVerdict) -> str:
    from ..verify.records import ThunkVerdict

    if isinstance(v, ThunkVerdict):
        return f"thunk {v.symbol}" + (f" at {v.address:#x}" if v.address is not None else "")
    at = f"{v.address:#x} " if v.address is not None else ""
    return f"site {v.index} {at}{v.section}+{v.offset:#x} {v.op or '?'} ({v.action})"


def verify_json(report: VerifyReport) -> dict[str, Any]:
    from ..verify.records import SiteVerdict, ThunkVerdict

    def one(v: SiteVerdict) -> dict[str, Any]:
        return {"index": v.index, "section": v.section, "offset": v.offset,
                "address": v.address, "op": v.op, "action": v.action, "status": v.status,
                "reason": v.reason, "trials": v.trials, "seed": v.seed,
                "detail": list(v.detail)}

    return {
        "sites": [one(v) for v in report.sites],
        "thunks": [{"symbol": t.symbol, "target": t.target, "address": t.address,
                    "status": t.status, "reason": t.reason, "trials": t.trials,
                    "seed": t.seed, "detail": list(t.detail)} for t in report.thunks],
        "summary": report.summary,
        "thunk_summary": report.thunk_summary,
        "allow_skip": report.allow_skip,
        "unproven": [{"site": v.index if isinstance(v, SiteVerdict) else None,
                      "thunk": v.symbol if isinstance(v, ThunkVerdict) else None,
                      "where": _where(v), "status": v.status, "reason": v.reason,
                      "allowed": v.status == "skip" and report.allow_skip}
                     for v in report.unproven],
        "accounting": {
            "sections": [{"section": n.section, "kind": n.kind, "rule": n.rule}
                         for n in report.sections],
            "unaccounted": [{"section": d.section, "offset": d.offset,
                             "file_offset": d.file_offset, "length": d.length,
                             "what": d.what} for d in report.unaccounted],
            "omitted": report.omitted,
        },
        "ok": report.ok,
    }


def verify_text(report: VerifyReport, path: str = "") -> list[str]:
    """Readable lines: the summary, then every site and thunk not proven (and why), then
    every difference nothing accounts for."""
    s, t = report.summary, report.thunk_summary
    bad = len(report.unaccounted) + report.omitted
    lines = [f"{path + ': ' if path else ''}verify: sites {s['pass']} pass, {s['fail']} fail, "
             f"{s['skip']} skip"
             + (f"; thunks {t['pass']} pass, {t['fail']} fail, {t['skip']} skip"
                if report.thunks else "")
             + f"; {len(report.sections)} changed sections, "
             + (f"{bad} differences not accounted for" if bad else "every difference "
                "accounted for")]
    for v in report.verdicts:
        if v.status == "pass" and not v.reason:
            continue
        note = ""
        if v.status == "skip":
            note = " (not proven: allowed by --allow-skip)" if report.allow_skip else \
                " (not proven: a failure without --allow-skip)"
        lines.append(f"  {v.status:4} {_where(v)}: {v.reason}{note}"
                     + (f" [seed {v.seed}]" if v.seed is not None else ""))
        if v.status == "fail":
            lines.extend(f"         {d}" for d in v.detail)
    for d in report.unaccounted:
        lines.append(f"  diff {d.where()}: {d.what}")
    if report.omitted:
        lines.append(f"  diff ... and {report.omitted} more")
    return lines


# -- the engine (runs in a worker or in-process) ------------------------------------


def report_failures(report: VerifyReport) -> VerifyError | None:
    """A VerifyError naming every failed (or unallowed skipped) site and thunk and every
    difference nothing accounts for, or None if verification passed."""
    from ..verify.records import SiteVerdict

    parts = []
    for v in report.failures:
        if isinstance(v, SiteVerdict):
            parts.append(f"site {v.index} ({v.section}+{v.offset:#x} {v.op or '?'}): "
                         f"{v.reason}" + (" (skipped)" if v.status == "skip" else ""))
        else:
            parts.append(f"thunk {v.symbol}: {v.reason}")
    parts += [f"{d.where()}: {d.what}" for d in report.unaccounted]
    if not parts and not report.omitted:
        return None
    more = len(parts) - 5 + report.omitted
    return VerifyError(f"verification failed: {'; '.join(parts[:5])}"
                       + (f" and {more} more" if more > 0 else ""))
