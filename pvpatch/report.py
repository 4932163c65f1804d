"""The report stage: turn results into JSON-ready dicts and readable text.

Nothing here prints; the CLI writes what these functions return.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .forms import shown
from .rules import Finding
from .scan import ScanResult, Site

if TYPE_CHECKING:
    from .arch import Arch
    from .disasm import Insn
    from .rewrite import Rewrite, SitePatch
    from .symbolic import Symboliser


def symboliser(result: ScanResult) -> Symboliser:
    """Names for a scanned file's operands (see pvpatch/symbolic.py)."""
    from .symbolic import Symboliser  # listings only: a patch run does not load it

    return Symboliser(result.elf)


def site_insns(sym: Symboliser, site: Site) -> list[Insn]:
    """A site's instructions as the file has them, symbolised: `call *pv_ops+0xf0(%rip)`
    (the relocation at the operand, or in linked files the address's symbol)."""
    return sym.insns(site.code, address=site.address, section_index=site.section_index,
                     offset=site.offset)


def patch_insns(sym: Symboliser, p: SitePatch) -> tuple[list[Insn], list[Insn]]:
    """A rewritten site before and after, symbolised.  The new relocations exist only in
    the output, so a new call or jmp is named from the plan (`call native_save_fl`)."""
    before = site_insns(sym, p.decision.site)
    if p.after == p.before:
        return before, before
    return before, _after_insns(sym, p)


def _after_insns(sym: Symboliser, p: SitePatch) -> list[Insn]:
    site, d = p.decision.site, p.decision
    target = d.target if d.action in ("call", "thunk", "jmp") else None
    return sym.insns(p.after, address=site.address, section_index=site.section_index,
                     offset=site.offset, relocs=(), branch_target=target)


def _code(insns: Iterable[Insn]) -> str:
    return "; ".join(i.text for i in insns)


def _kept_code(sym: Symboliser, site: Site) -> str:
    """A kept site's call, as the symboliser names it.  A vmlinux keeps thousands of sites
    that are one `call *pv_ops+slot` each: that form is written from the slot the scan read
    (what objdump and the symboliser say for it), the rest decoded."""
    from .integrity import site_form

    slot = site.slot
    head = site_form(sym.arch, site.code) if slot is not None else None
    if slot is not None and head is not None and head.kind == "ops-call" \
            and len(site.code) == head.length:
        rip = "(%rip)" if head.opcode == b"\xff\x15" and sym.arch.name == "x86_64" else ""
        off = slot * sym.arch.ptr_size
        return f"call *pv_ops{f'+{off:#x}' if off else ''}{rip}"
    return _code(site_insns(sym, site))


# Said once per file, not per site: what would name the ops.
UNNAMED = ("  ops unnamed: the file has no BTF, DWARF, module vermagic or kernel release "
           "string a shipped catalog matches; give --ops catalog:NAME (`pvpatch catalogs`), "
           "btf:VMLINUX or dwarf:FILE")


def site_json(result: ScanResult, site: Site, sym: Symboliser | None = None
              ) -> dict[str, Any]:
    sym = sym if sym is not None else symboliser(result)
    return {
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


def scan_json(result: ScanResult) -> dict[str, Any]:
    sym = symboliser(result)
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
        "sites": [site_json(result, s, sym) for s in result.sites],
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


def patch_json(rw: Rewrite, output: str | None, verify: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    plan = rw.plan
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
    sym = symboliser(plan.scan)
    # A vmlinux has thousands of sites and a handful of new forms: each decoded once.
    decoded: dict[tuple[bytes, str | None], str] = {}
    for p in rw.patches:
        d = p.decision
        counts[d.action] = counts.get(d.action, 0) + 1
        key = (d.action, d.site.op or f"type {d.site.type}")
        by_op[key] = by_op.get(key, 0) + 1
        if d.rewrites:
            form = (p.after, d.target)
            head = decoded.get(form)
            if head is None:
                # A native form is read from pvpatch/forms.py (no disassembler to import).
                head = shown(plan.arch, p.after) \
                    if d.action == "inline" and p.after != p.before else None
            if head is None:
                # Only the new form is shown: the old one (and the names it needs, which
                # in a stripped image means reading the whole export table) is not decoded.
                after = _after_insns(sym, p) if p.after != p.before else site_insns(sym, d.site)
                head = _code(_unpadded(plan.arch, p.after, after))
            decoded[form] = head
            heads[key] = head if heads.get(key, head) == head else None
    lines = [
        f"{plan.scan.path} -> {output or '(not written)'}: {len(rw.patches)} sites, "
        + ", ".join(f"{counts[a]} {a}" for a in ACTIONS if counts.get(a))
        + (f", ops from {plan.scan.ops.name}" if plan.scan.ops is not None else "")
    ]
    if plan.scan.ops is None and rw.patches:
        lines.append(UNNAMED)
    for (action, op), n in sorted(by_op.items()):
        becomes = heads.get((action, op))
        lines.append(f"  {action:6} {n:5}  {op}" + (f" -> {becomes}" if becomes else ""))
    for tgt in plan.targets.values():
        lines.append(f"  target {tgt.name} at {tgt.address:#x} (from {tgt.source})")
    for t in rw.thunks:
        where = f"{t.address:#x}" if t.address is not None else f"{t.section}+{t.offset:#x}"
        lines.append(f"  thunk  {t.spec.symbol} at {where}: saves {', '.join(t.spec.saves)}, "
                     f"calls {t.spec.target}")
    kept = [p for p in rw.patches if p.decision.action == "keep"]
    for p in kept:
        d = p.decision
        lines.append(f"  kept   {site_location(d.site)} {d.site.op or f'type {d.site.type}'}: "
                     f"{d.reason} [{_kept_code(sym, d.site)}]")
    if rw.dropped_entries:
        lines.append(f"  dropped {rw.dropped_entries} table entries of rewritten sites")
    if rw.neutralised_entries:
        lines.append(f"  neutralised {rw.neutralised_entries} table entries of rewritten sites "
                     "(the kernel skips them)")
    if rw.signed:
        lines.append("  module signed (the previous signature, if any, replaced)")
    elif rw.signature_removed:
        lines.append("  module signature removed (the module no longer matches it); "
                     "re-sign it (--sign-key/--sign-cert) or load it unsigned")
    return lines
