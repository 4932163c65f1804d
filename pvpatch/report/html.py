"""`pvpatch diff --html`: the diff as one self-contained page.

Inline CSS only: no script, no font, no image, nothing fetched (the page's own
Content-Security-Policy forbids it), so it can be kept as a build artifact and opened
anywhere.  Sections: what is flagged (first, in red), a summary by action and by op,
a table of files (trees), then each file's sites before and after side by side with
their plan and verify verdict, thunks, table edits and what was added.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

from .diff import ACTIONS, DiffReport, FileDiff, SiteDiff, Verdict, flagged_text

CSS = """
:root { --ok: #1a7f37; --bad: #cf222e; --muted: #57606a; --line: #d0d7de; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
       margin: 0 auto; padding: 1.2em 2em 3em; max-width: 1400px; }
h1 { font-size: 1.6em; margin: 0 0 .2em; }
h2 { font-size: 1.25em; margin: 1.6em 0 .5em; padding-bottom: .2em;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05em; margin: 1.2em 0 .4em; }
h2 code { font-size: .95em; }
code, pre, .mono { font: 12.5px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; }
pre { margin: 0; white-space: pre; }
.paths { color: var(--muted); margin: 0 0 .8em; word-break: break-all; }
.status { display: inline-block; padding: .35em .9em; border-radius: 6px; font-weight: 600;
          color: #fff; }
.status.ok { background: var(--ok); } .status.bad { background: var(--bad); }
.flagged { border: 2px solid var(--bad); background: #ffebe9; border-radius: 6px;
           padding: .6em 1em; margin: 1em 0; }
.flagged h2 { color: var(--bad); border: 0; margin-top: .2em; }
.flagged li { margin: .2em 0; }
table { border-collapse: collapse; margin: .4em 0 1em; }
th, td { border: 1px solid var(--line); padding: .3em .55em; text-align: left;
         vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
table.sites { width: 100%; }
table.sites td.code { width: 30%; background: #fbfcfd; }
td.before pre { color: #82071e; } td.after pre { color: #055d20; }
.reloc { color: var(--muted); }
tr.flag td { background: #fff0ee; }
.why { color: var(--bad); font-weight: 600; }
.badge { display: inline-block; padding: 0 .5em; border-radius: 1em; font-size: .85em;
         font-weight: 600; border: 1px solid transparent; white-space: nowrap; }
.a-inline { background: #dafbe1; color: #116329; } .a-call { background: #ddf4ff; color: #0550ae; }
.a-thunk { background: #fbefff; color: #8250df; } .a-jmp { background: #fff8c5; color: #7d4e00; }
.a-nop { background: #eaeef2; color: #424a53; } .a-ud2 { background: #ffebe9; color: #a40e26; }
.a-keep { background: #eaeef2; color: #424a53; }
.v-pass { background: #dafbe1; color: #116329; } .v-fail { background: #ffebe9; color: #a40e26; }
.v-skip { background: #fff8c5; color: #7d4e00; } .v-none { color: var(--muted); }
.muted { color: var(--muted); }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .1em 1em; margin: .4em 0; }
dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; }
details { margin: .4em 0; } summary { cursor: pointer; font-weight: 600; }
details > pre { display: inline-block; min-width: 26em; margin: .3em 0 .2em 1.2em;
                padding: .4em .8em; background: #fbfcfd; border: 1px solid var(--line);
                border-radius: 4px; }
"""


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _badge(action: str) -> str:
    return f'<span class="badge a-{_e(action)}">{_e(action)}</span>'


def _verdict(v: Verdict | None) -> str:
    if v is None:
        return '<span class="v-none">&mdash;</span>'
    extra = " (allowed)" if v.status == "skip" and v.allowed else ""
    reason = f'<div class="muted">{_e(v.reason)}</div>' if v.reason else ""
    return f'<span class="badge v-{_e(v.status)}">{_e(v.status)}{extra}</span>{reason}'


def _pre(lines: Iterable[str], relocs: Iterable[str] = ()) -> str:
    body = "\n".join(_e(t) for t in lines)
    rel = "\n".join(f'<span class="reloc">  {_e(r)}</span>' for r in relocs)
    return f"<pre>{body}{chr(10) + rel if rel else ''}</pre>"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "",
           numeric: frozenset[int] = frozenset()) -> str:
    """Cells are HTML already (escape text before)."""
    out = [f'<table class="{cls}"><thead><tr>'
           + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(
            f'<td class="n">{c}</td>' if k in numeric else f"<td>{c}</td>"
            for k, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _flagged(report: DiffReport) -> str:
    items = []
    for f in report.files:
        for s in f.sites:
            items += [f"<li><code>{_e(f.original)}</code> site {s.index} "
                      f"<code>{_e(s.where)}</code>: {_e(why)}</li>" for why in s.flags]
        for t in f.thunks:
            items += [f"<li><code>{_e(f.original)}</code> thunk <code>{_e(t.symbol)}</code>: "
                      f"{_e(why)}</li>" for why in t.flags]
        for d in f.flagged:
            items.append(f"<li><code>{_e(f.patched)}</code> <code>{_e(d.where())}</code>: "
                         f"{_e(d.what)}</li>")
        if f.omitted:
            items.append(f"<li><code>{_e(f.patched)}</code>: and {f.omitted} more</li>")
    for u in report.unpaired:
        items.append(f"<li><code>{_e(u.path)}</code>: no counterpart in "
                     f"{_e(u.missing_in.upper())}</li>")
    for err in report.errors:
        items.append(f"<li>could not compare: {_e(err)}</li>")
    if not items:
        return ""
    return ('<section class="flagged" id="flagged"><h2>Flagged: not accounted for</h2><ul>'
            + "".join(items) + "</ul></section>")


def _summary(report: DiffReport) -> str:
    counts = report.counts()
    rows = [(_badge(a), str(counts[a])) for a in ACTIONS if counts.get(a)]
    by_op = sorted(report.by_op().items(), key=lambda kv: (kv[0][1], kv[0][0]))
    op_rows = [(f"<code>{_e(op)}</code>", _badge(action), str(n))
               for (action, op), n in by_op]
    total = sum(counts.values())
    parts = ['<section id="summary"><h2>Summary</h2>',
             f"<p>{len(report.files)} file pair{'s' if len(report.files) != 1 else ''}, "
             f"{total} changed site{'s' if total != 1 else ''}, "
             f"{sum(len(f.thunks) for f in report.files)} thunks, "
             f"{sum(len(f.table_edits) for f in report.files)} table edits.</p>"]
    if rows:
        parts.append("<h3>By action</h3>" + _table(("action", "sites"), rows, "counts",
                                                    frozenset({1})))
        parts.append("<h3>By op</h3>" + _table(("op", "action", "sites"), op_rows, "ops",
                                                frozenset({2})))
    parts.append("</section>")
    return "".join(parts)


def _verify_summary(f: FileDiff) -> str:
    if not f.verified:
        return '<span class="v-none">no report</span>'
    seen = [s.verdict.status for s in f.sites if s.verdict is not None]
    seen += [t.verdict.status for t in f.thunks if t.verdict is not None]
    parts = [f"{seen.count(st)} {st}" for st in ("pass", "fail", "skip") if seen.count(st)]
    return _e(", ".join(parts) or "nothing to verify")


def _files(report: DiffReport) -> str:
    rows = []
    for k, f in enumerate(report.files):
        counts = f.counts()
        acts = " ".join(f"{_badge(a)}&nbsp;{counts[a]}" for a in ACTIONS if counts.get(a))
        status = ('<span class="badge v-pass">ok</span>' if f.ok else
                  f'<span class="badge v-fail">{f.problems} flagged</span>')
        rows.append((f'<a href="#f{k}"><code>{_e(f.rel or f.original)}</code></a>',
                     _e(f"{f.arch} {f.elf_type}"), str(len(f.sites)), acts or "&mdash;",
                     str(len(f.thunks)), str(len(f.table_edits)), _verify_summary(f), status))
    return ('<section id="files"><h2>Files</h2>'
            + _table(("file", "kind", "sites", "actions", "thunks", "table edits", "verify",
                      "status"), rows, "files", frozenset({2, 4, 5}))
            + "</section>")


def _site_row(s: SiteDiff) -> str:
    plan = _badge(s.planned) + (f'<div class="muted">{_e(s.reason)}</div>' if s.reason else "")
    action = _badge(s.action) + (f"<div><code>{_e(s.target)}</code></div>"
                                 if s.target and s.action != "inline" else "")
    why = "".join(f'<div class="why">{_e(w)}</div>' for w in s.flags)
    cls = ' class="flag"' if s.flags else ""
    return (f"<tr{cls}><td class=\"n\">{s.index}</td><td><code>{_e(s.where)}</code></td>"
            f"<td><code>{_e(s.op or f'type {s.type}')}</code>{why}</td><td>{action}</td>"
            f"<td>{plan}</td><td>{_verdict(s.verdict)}</td>"
            f'<td class="code before">{_pre((i.text for i in s.before_insns), s.relocs_before)}'
            f'</td><td class="code after">{_pre((i.text for i in s.after_insns), s.relocs_after)}'
            "</td></tr>")


def _file(k: int, f: FileDiff) -> str:
    parts = [f'<section class="file" id="f{k}"><h2><code>{_e(f.rel or f.original)}</code></h2>']
    meta = [("original", f.original), ("patched", f.patched),
            ("file", f"{f.arch} {f.elf_type}"),
            ("table", f"{f.table} ({f.family}, {f.layout})" if f.table else "none"),
            ("sites", f"{len(f.sites)} of {f.total_sites} changed"),
            ("backend", f.backend), ("ops", f.ops or "unnamed")]
    if f.signature:
        meta.append(("module signature", f.signature))
    parts.append('<dl class="meta">' + "".join(f"<dt>{_e(a)}</dt><dd><code>{_e(b)}</code></dd>"
                                               for a, b in meta) + "</dl>")
    status = ('<p class="status ok">every difference accounted for</p>' if f.ok else
              f'<p class="status bad">{flagged_text(f.problems)} flagged</p>')
    parts.append(status)
    if f.identical:
        parts.append("<p>The files are identical where it matters: nothing changed.</p>")
    if f.flagged or f.omitted:
        items = "".join(f"<li><code>{_e(d.where())}</code>: {_e(d.what)}</li>"
                        for d in f.flagged)
        if f.omitted:
            items += f"<li>and {f.omitted} more</li>"
        parts.append(f'<div class="flagged"><h3>Changed outside every site</h3><ul>{items}'
                     "</ul></div>")
    if f.sites:
        parts.append(f"<h3>Sites ({len(f.sites)})</h3>"
                     '<table class="sites"><thead><tr><th>site</th><th>where</th><th>op</th>'
                     "<th>now</th><th>plan</th><th>verify</th><th>before</th><th>after</th>"
                     "</tr></thead><tbody>" + "".join(_site_row(s) for s in f.sites)
                     + "</tbody></table>")
    for t in f.thunks:
        where = f"{t.address:#x}" if t.address is not None else f"{t.section}+{t.offset:#x}"
        why = "".join(f'<div class="why">{_e(w)}</div>' for w in t.flags)
        parts.append(f"<details open><summary>thunk <code>{_e(t.symbol)}</code> at "
                     f"<code>{_e(where)}</code>, {t.size} bytes"
                     + (f": calls <code>{_e(t.target)}</code>, saves "
                        f"{_e(', '.join(t.saves) or 'nothing')}" if t.target else "")
                     + f" {_verdict(t.verdict) if t.verdict else ''}</summary>{why}"
                     + _pre(i.text for i in t.insns) + "</details>")
    if f.table_edits:
        rows = [(str(e.entry), _e(e.edit), "&mdash;" if e.site is None else str(e.site),
                 f"<code>{_e(e.was)}</code>", f"<code>{_e(e.now or '')}</code>")
                for e in f.table_edits]
        parts.append(f"<details><summary>Table edits ({len(rows)})</summary>"
                     + _table(("entry", "edit", "site", "was", "now"), rows, "edits",
                              frozenset({0, 2})) + "</details>")
    added: list[str] = []
    if f.sections_added:
        added.append("<h3>Sections added</h3>" + _table(
            ("section", "type", "flags", "size", "address"),
            [(f"<code>{_e(s.name)}</code>", _e(s.type), _e(s.flags), str(s.size),
              "" if s.address is None else f"<code>{s.address:#x}</code>")
             for s in f.sections_added], "added", frozenset({3})))
    if f.segments_added:
        added.append("<h3>Segments added</h3>" + _table(
            ("type", "flags", "offset", "vaddr", "filesz", "memsz"),
            [(_e(s.type), _e(s.flags), f"{s.offset:#x}", f"{s.vaddr:#x}", f"{s.filesz:#x}",
              f"{s.memsz:#x}") for s in f.segments_added], "added"))
    if f.symbols_added or f.symbols_removed:
        syms = [(how, f"<code>{_e(s.name)}</code>", _e(s.bind), _e(s.type), _e(s.section),
                 f"{s.value:#x}", str(s.size))
                for how, which in (("added", f.symbols_added), ("removed", f.symbols_removed))
                for s in which]
        added.append("<h3>Symbols</h3>" + _table(
            ("", "name", "bind", "type", "section", "value", "size"), syms, "added",
            frozenset({6})))
    if f.relocations:
        from .symbolic import plus

        added.append("<h3>Relocations outside the sites</h3>" + _table(
            ("", "place", "type", "symbol"),
            [(_e(r.how), f"<code>{_e(r.section)}+{r.offset:#x}</code>", _e(r.type),
              f"<code>{_e(plus(r.symbol, r.addend))}</code>") for r in f.relocations],
            "added"))
    if f.sections_changed:
        added.append("<h3>Changed sections and the rule that accounts for each</h3>" + _table(
            ("section", "kind", "rule"),
            [(f"<code>{_e(n.section)}</code>", _e(n.kind), _e(n.rule))
             for n in f.sections_changed], "changed"))
    parts.extend(added)
    parts.append("</section>")
    return "".join(parts)


def diff_html(report: DiffReport) -> str:
    """The whole page for a `DiffReport`."""
    status = ('<p class="status ok">Every difference accounted for</p>' if report.ok else
              f'<p class="status bad">{flagged_text(report.problems + len(report.errors))} '
              "flagged</p>")
    body = [f"<header><h1>pvpatch diff</h1><p class=\"paths\"><code>{_e(report.original)}"
            f"</code> &rarr; <code>{_e(report.patched)}</code></p>{status}</header>",
            _flagged(report), _summary(report)]
    if report.tree:
        body.append(_files(report))
    shown = [(k, f) for k, f in enumerate(report.files) if not (report.tree and f.identical)]
    body.extend(_file(k, f) for k, f in shown)
    title = f"pvpatch diff: {report.original} \u2192 {report.patched}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            # Nothing may be fetched or run: the page is its own artifact.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")
