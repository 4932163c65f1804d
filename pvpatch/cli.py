"""Command-line interface: parses arguments, calls the library, formats results.

Exit status: 0 success; 1 the job ran and found something that fails it
(check findings, verification failure); 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__
from .errors import PvpatchError, UsageError

if TYPE_CHECKING:
    from .api import PatchOptions as FileOptions
    from .api import SigningKey
    from .batch import Inputs
    from .plan.stage import Plan
    from .rewrite.output import OutputFile
    from .rules import Finding

EXIT_OK, EXIT_FAIL, EXIT_BAD = 0, 1, 2


def _common_scan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", default="auto", metavar="NAME",
                   help="table layout (default: auto; see `pvpatch layouts`)")
    p.add_argument("--section", default="auto", metavar="NAME",
                   help="table section name (default: auto: .parainstructions, else "
                   ".altinstructions DIRECT_CALL entries)")
    p.add_argument("--ops", default="auto", metavar="SOURCE",
                   help="op names from: auto, none, btf:FILE, dwarf:FILE, catalog:NAME")
    p.add_argument("--max-decompressed", type=_size, default=None, metavar="SIZE",
                   help="refuse a compressed input (.ko.xz, .ko.zst, .ko.gz) that "
                   "decompresses to more than SIZE (default 1GiB)")


def _size(text: str) -> int:
    from .elf.compress import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit(args: argparse.Namespace) -> int:
    """--max-decompressed, or the library's default."""
    from .elf.compress import MAX_DECOMPRESSED

    return int(args.max_decompressed or MAX_DECOMPRESSED)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _tree_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-j", "--jobs", type=_positive, default=None, metavar="N",
                   help="worker processes for a tree of files (default: every core)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: only when stderr is a terminal)")


def _sarif_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sarif", metavar="FILE", default=None,
                   help="also write the findings as SARIF 2.1.0 to FILE")


def _verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=_positive, default=16, metavar="N",
                   help="random machine states per site (default 16)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the random states (default 0): runs are reproducible")
    p.add_argument("--allow-skip", action="store_true",
                   help="a site or thunk that cannot be run (tail ops, traps) does not fail "
                        "verification (it is still listed as not proven)")


def _scan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="ELF files, or directories to walk for ELF files")
    _common_scan_options(p)
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    _tree_options(p)


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="ELF files, or directories to walk for ELF files")
    p.add_argument("--backend", default="native", metavar="native|SPEC.toml",
                   help="the backend whose plan is checked (default: native)")
    _common_scan_options(p)
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    _sarif_option(p)
    p.add_argument("--fail-on", choices=("error", "warning"), default="error",
                   help="exit 1 when a finding is at least this severe (default: error)")
    _tree_options(p)


def _patch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help="an ELF file, or a directory to mirror")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="the output file, or the output directory for a directory INPUT")
    p.add_argument("--backend", default="native", metavar="native|SPEC.toml",
                   help="what ops become (default: native, the kernel's own replacements)")
    _common_scan_options(p)
    p.add_argument("--final", action="store_true",
                   help="make pvpatch's bytes the ones that run: every table entry the "
                   "kernel would apply at a rewritten site at boot or module load "
                   "(.parainstructions, .altinstructions of any era) is dropped or made one "
                   "it skips (a final native image is right only off Xen PV)")
    p.add_argument("--drop-patched", action="store_true",
                   help="remove the table entries of rewritten sites (relocatable files)")
    p.add_argument("--in-place", action="store_true", help="allow OUTPUT to be INPUT")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--no-verify", action="store_true", help="skip emulation of the result")
    _verify_options(p)
    p.add_argument("--dry-run", action="store_true", help="plan and report, write nothing")
    p.add_argument("--symvers", metavar="FILE",
                   help="CRCs for symbols a module newly imports: a Module.symvers file or "
                        "the kernel's vmlinux (modules built with symbol versions)")
    p.add_argument("--symbols", metavar="FILE",
                   help="addresses of spec targets a linked image has neither in .symtab "
                        "nor in its export table (System.map or /proc/kallsyms format)")
    p.add_argument("--sign-key", metavar="KEY", help="sign output modules with this key ...")
    p.add_argument("--sign-cert", metavar="CERT", help="... and this X.509 certificate")
    p.add_argument("--sign-hash", default="sha256", metavar="HASH",
                   help="signature digest: sha256 (default), sha384, sha512, sha224")
    _sarif_option(p)
    _tree_options(p)


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("original", metavar="ORIGINAL")
    p.add_argument("patched", metavar="PATCHED")
    p.add_argument("--backend", default="native", metavar="native|SPEC.toml",
                   help="the backend PATCHED was made with (default: native)")
    _common_scan_options(p)
    _verify_options(p)
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    _sarif_option(p)


def _diff_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("original", metavar="ORIGINAL", help="the file, or tree, before")
    p.add_argument("patched", metavar="PATCHED",
                   help="the file, or tree (files paired by relative path), after")
    p.add_argument("--backend", default="native", metavar="native|SPEC.toml",
                   help="the backend PATCHED was made with (default: native)")
    _common_scan_options(p)
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    p.add_argument("--verify-json", metavar="FILE",
                   help="verdicts from `pvpatch verify --json` (or `pvpatch patch --json`)")
    p.add_argument("-j", "--jobs", type=_positive, default=None, metavar="N",
                   help="worker processes for trees (default: every core)")


def _no_arguments(p: argparse.ArgumentParser) -> None:
    pass


class _Formatter(argparse.HelpFormatter):
    """argparse's own formatter, given the terminal's width as shutil would find it:
    argparse makes one formatter per argument added and imports shutil to size each."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _columns() - 2 if width is None else width)


def _columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else the terminal's, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with `command` only that command's arguments (every
    command is still listed): a run adds the arguments of the one it runs."""
    parser = argparse.ArgumentParser(
        prog="pvpatch",
        description="Static patcher for x86 paravirt call sites (.parainstructions, and "
        ".altinstructions DIRECT_CALL entries since Linux 6.8) in ELF files, with emulation "
        "proof.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"pvpatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    commands: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]], ...] = (
        ("scan", "list the paravirt sites of ELF files and trees", _scan_arguments,
         cmd_scan),
        ("check", "report every wrong paravirt site (for CI)", _check_arguments, cmd_check),
        ("patch", "rewrite the sites of an ELF file or a tree of them", _patch_arguments,
         cmd_patch),
        ("verify", "prove by emulation that PATCHED keeps ORIGINAL's site contracts",
         _verify_arguments, cmd_verify),
        ("diff", "show what a patch changed, site by site, and flag every other difference",
         _diff_arguments, cmd_diff),
        ("layouts", "list the known table layouts", _no_arguments, cmd_layouts),
        ("catalogs", "list the op catalogs shipped with pvpatch", _no_arguments, cmd_catalogs),
    )
    for name, help_text, arguments, func in commands:
        p = sub.add_parser(name, help=help_text, formatter_class=_Formatter)
        if command is None or command == name:
            arguments(p)
        p.set_defaults(func=func)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command `argv` names: its first word that is not an option (the program's own
    options, -h and --version, take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _err(message: str) -> None:
    print(f"pvpatch: {message}", file=sys.stderr)


def _emit_json(doc: Any, out: TextIO = sys.stdout) -> None:
    import json  # only when JSON is asked for: start-up counts for small runs

    json.dump(doc, out, indent=1)
    out.write("\n")


def _expand(paths: Sequence[str]) -> tuple[Inputs, list[str]]:
    """The files under `paths`, and the paths that could not be walked (each reported)."""
    from .batch import expand

    inputs = expand(paths)
    for problem in inputs.problems:
        _err(f"error: {problem}")
    return inputs, list(inputs.problems)


def _jobs(args: argparse.Namespace) -> int:
    if args.jobs is not None:
        return int(args.jobs)
    from .batch import default_jobs

    return default_jobs()


def _write_sarif(path: str, doc: dict[str, Any]) -> None:
    import json

    from .rewrite.output import write_atomic

    # Atomic like every other output: an upload step never sees half a file.
    write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())


def _actions_text(actions: dict[str, int]) -> str:
    from .report.stage import ACTIONS

    return ", ".join(f"{actions[a]} {a}" for a in ACTIONS if actions.get(a)) or "none"


def _add_counts(total: dict[str, int], more: dict[str, int]) -> None:
    for key, n in more.items():
        total[key] = total.get(key, 0) + n


def cmd_scan(args: argparse.Namespace) -> int:
    from .batch import ScanOptions, job, run_ordered, scan_input
    from .progress import open_progress
    from .report.stage import findings_text

    started = time.monotonic()
    inputs, problems = _expand(args.paths)
    status = EXIT_BAD if problems else EXIT_OK
    options = ScanOptions(layout=args.layout, section=args.section, ops=args.ops,
                          json=args.json, max_decompressed=_limit(args))
    bar = open_progress(args.progress, len(inputs.files), "scan", sys.stderr)
    files: list[dict[str, Any]] = []
    scanned = skipped = sites = findings = 0
    try:
        for out in run_ordered(job(scan_input, options), inputs.files, jobs=_jobs(args),
                               on_done=lambda n, item: bar.advance(n, item.path)):
            if out.status == "bad":
                bar.write(f"pvpatch: error: {out.error}", sys.stderr)
                status = EXIT_BAD
                continue
            if out.status == "skipped":
                skipped += 1
                continue
            scanned += 1
            sites += out.sites
            findings += len(out.findings)
            if out.findings:  # one block per file: one redraw of the bar
                bar.write("\n".join(findings_text(out.path, out.findings)), sys.stderr)
            if out.record is not None:
                files.append(out.record)
            elif not args.json:
                bar.write("\n".join(out.lines), sys.stdout)
    finally:
        bar.close()
    if args.json:
        _emit_json({"files": files})
    if inputs.tree and inputs.files:
        # stderr: stdout stays the listing (or the JSON document) alone.
        print(f"pvpatch scan: {scanned} ELF files ({skipped} other files skipped), "
              f"{sites} sites, {findings} findings, "
              f"{time.monotonic() - started:.2f} s", file=sys.stderr)
    return status


def cmd_check(args: argparse.Namespace) -> int:
    from .batch import check_input, job, run_ordered
    from .check import CheckOptions, FileCheck, reaches
    from .progress import open_progress
    from .report.stage import findings_text

    started = time.monotonic()
    inputs, problems = _expand(args.paths)
    options = CheckOptions(backend=args.backend, ops=args.ops, layout=args.layout,
                           section=args.section, records=args.json)
    bar = open_progress(args.progress, len(inputs.files), "check", sys.stderr)
    checked: list[FileCheck] = []
    try:
        for fc in run_ordered(job(check_input, options, max_decompressed=_limit(args)),
                              inputs.files, jobs=_jobs(args),
                              on_done=lambda n, item: bar.advance(n, item.path)):
            if fc.status == "bad":
                bar.write(f"pvpatch: error: {fc.error}", sys.stderr)
                problems.append(fc.error or fc.path)
            elif fc.status == "checked":
                checked.append(fc)
                if fc.findings and not args.json:  # one block per file: one redraw
                    bar.write("\n".join(findings_text(fc.path, fc.findings)), sys.stdout)
    finally:
        bar.close()
    all_findings = [f for fc in checked for f in fc.findings]
    failing = reaches(all_findings, args.fail_on)
    status = EXIT_BAD if problems else (EXIT_FAIL if failing else EXIT_OK)
    actions: dict[str, int] = {}
    for fc in checked:
        _add_counts(actions, fc.actions)
    counts = {sev: sum(1 for f in all_findings if f.severity == sev)
              for sev in ("error", "warning")}
    summary = {
        "files": len(checked),
        "skipped": len(inputs.files) - len(checked) - (len(problems) - len(inputs.problems)),
        "sites": sum(fc.sites for fc in checked),
        "actions": actions,
        "findings": counts,
        "seconds": round(time.monotonic() - started, 3),
    }
    _tree_report(
        args, [(fc.path, fc.findings, fc.size) for fc in checked],
        [fc.record for fc in checked], problems, summary, status,
        f"pvpatch check: {summary['files']} ELF files ({summary['skipped']} other "
        f"files skipped), {summary['sites']} sites ({_actions_text(actions)}); "
        f"{counts['error']} errors, {counts['warning']} warnings; "
        f"{summary['seconds']:.2f} s")
    return status


def _tree_report(args: argparse.Namespace,
                 artifacts: Sequence[tuple[str, Sequence[Finding], int | None]],
                 records: list[Any], problems: list[str], summary: dict[str, Any],
                 status: int, text: str) -> None:
    """What a run over a tree ends with: the SARIF file if asked, then JSON or one line."""
    if args.sarif:
        from .report.sarif import ArtifactFindings, sarif_log

        _write_sarif(args.sarif, sarif_log(
            [ArtifactFindings(path, tuple(found), size) for path, found, size in artifacts],
            exit_code=status, problems=problems, arguments=args.argv))
    if args.json:
        _emit_json({"files": records, "errors": problems, "summary": summary})
    else:
        print(text)


def _signing(args: argparse.Namespace) -> SigningKey | None:
    if (args.sign_key is None) != (args.sign_cert is None):
        raise UsageError("--sign-key and --sign-cert go together")
    if args.sign_key is None:
        return None
    from .api import SigningKey

    return SigningKey.from_files(args.sign_key, args.sign_cert, args.sign_hash)


def cmd_patch(args: argparse.Namespace) -> int:
    signing = _signing(args)
    if os.path.isdir(args.input):
        return cmd_patch_tree(args, signing)
    from .api import prepare_output

    if args.dry_run:
        from .rewrite.output import check_output_path

        check_output_path(args.input, args.output, args.in_place)
        return _patch_one(args, signing, None)
    # The output file is opened first: copying the input into it then overlaps the
    # scan and the plan (see OutputFile).
    with prepare_output(args.input, args.output, in_place=args.in_place) as out:
        return _patch_one(args, signing, out)


def _patch_options(args: argparse.Namespace, signing: SigningKey | None,
                   workers: int | None = None) -> FileOptions:
    """The per-file options of `pvpatch patch` (one file, or each file of a tree); the
    backend and the symbol file stay names here, loaded where they are used."""
    from .api import PatchOptions

    return PatchOptions(
        layout=args.layout, section=args.section, ops=args.ops,
        drop_patched=args.drop_patched, final=args.final, symvers=args.symvers,
        verify=not args.no_verify,
        trials=args.trials, seed=args.seed, allow_skip=args.allow_skip, workers=workers,
        signing=signing, max_decompressed=_limit(args))


def _patch_one(args: argparse.Namespace, signing: SigningKey | None,
               out: OutputFile | None) -> int:
    from dataclasses import replace

    from .api import patch_file
    from .report.stage import findings_text, patch_json, patch_text, verify_summary
    from .scan.stage import ScanResult

    options = replace(_patch_options(args, signing), backend=args.backend,
                      symbols=args.symbols)
    shown: tuple[Finding, ...] = ()

    def on_plan(result: ScanResult, the_plan: Plan) -> None:
        nonlocal shown
        # The report below lists every kept site with its reason: the plan's warnings
        # (what the backend cannot do) would say it twice, so they are counted, not listed.
        shown = (*result.findings, *(f for f in the_plan.findings if f.severity == "error"))
        for line in findings_text(result.path, shown):
            print(line, file=sys.stderr)

    res = patch_file(args.input, out, options, in_place=args.in_place, on_plan=on_plan)
    _hold_until_exit(res)
    path, rw = res.scan.path, res.rewrite
    verify_doc = None
    if res.verify is not None:
        from .report.stage import report_failures, verify_json, verify_text

        verify_doc = verify_json(res.verify)
        if not res.ok:
            # Nothing is written when a rewritten site breaks its contract.
            for line in verify_text(res.verify, path):
                print(line, file=sys.stderr)
            _err(f"error: {report_failures(res.verify)}; nothing written")
            if args.json:
                _emit_json(patch_json(rw, None, verify_doc))
            _patch_sarif(args, path, res.findings, len(res.scan.elf.data), EXIT_FAIL)
            return EXIT_FAIL
    output = None if out is None else args.output
    if args.json:
        _emit_json(patch_json(res.rewrite, output, verify_doc))
    else:
        print("\n".join(patch_text(res.rewrite, output)))
        if res.verify is not None:
            print(verify_summary(res.verify, args.trials, args.seed))
    findings = res.findings
    if len(shown) < len(findings):
        print(f"{path}: {len(findings) - len(shown)} warning(s) about kept sites "
              "or rewrites the kernel will undo (`pvpatch check` lists them)", file=sys.stderr)
    _patch_sarif(args, path, findings, len(res.scan.elf.data), EXIT_OK)
    return EXIT_OK


def _patch_sarif(args: argparse.Namespace, path: str, findings: Sequence[Finding],
                 size: int | None, status: int) -> None:
    if args.sarif:
        from .report.sarif import ArtifactFindings, sarif_log

        _write_sarif(args.sarif, sarif_log([ArtifactFindings(path, tuple(findings), size)],
                                           exit_code=status, arguments=args.argv))


def _check_outdir(indir: str, outdir: str, in_place: bool) -> None:
    src, dst = os.path.realpath(indir), os.path.realpath(outdir)
    if src == dst:
        if not in_place:
            raise UsageError(f"output directory {outdir} is the input directory; "
                             "give --in-place to rewrite the tree where it is")
        return
    if dst.startswith(src + os.sep):
        # A later run would walk the outputs as inputs.
        raise UsageError(f"output directory {outdir} is inside the input directory {indir}")
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UsageError(f"output {outdir} exists and is not a directory")


def cmd_patch_tree(args: argparse.Namespace, signing: SigningKey | None = None) -> int:
    from .batch import PatchOptions, job, patch_input, run_ordered
    from .progress import open_progress

    started = time.monotonic()
    _check_outdir(args.input, args.output, args.in_place)
    inputs, problems = _expand([args.input])
    # One process per file already: the verifier must not start its own pool.
    options = PatchOptions(
        outdir=args.output, file=_patch_options(args, signing, workers=1),
        backend=args.backend, symbols=args.symbols, dry_run=args.dry_run, json=args.json)
    bar = open_progress(args.progress, len(inputs.files), "patch", sys.stderr)
    from .batch import PatchOutcome
    from .report.stage import findings_text

    done: list[PatchOutcome] = []
    try:
        for out in run_ordered(job(patch_input, options), inputs.files, jobs=_jobs(args),
                               on_done=lambda n, item: bar.advance(n, item.path)):
            if out.status == "bad":
                bar.write(f"pvpatch: error: {out.error}", sys.stderr)
                problems.append(out.error or out.path)
                continue
            if out.status == "skipped":
                continue
            done.append(out)
            if out.findings:  # one block per file: one redraw of the bar
                bar.write("\n".join(findings_text(out.path, out.findings)), sys.stderr)
            if out.status == "failed":
                bar.write("\n".join(out.lines), sys.stderr)
            elif not args.json and out.sites:
                bar.write("\n".join(out.lines), sys.stdout)
    finally:
        bar.close()
    failed = sum(1 for o in done if o.status == "failed")
    status = EXIT_BAD if problems else (EXIT_FAIL if failed else EXIT_OK)
    actions: dict[str, int] = {}
    for o in done:
        _add_counts(actions, o.actions)
    summary = {
        "files": len(done),
        "written": sum(1 for o in done if o.output is not None),
        "failed": failed,
        "sites": sum(o.sites for o in done),
        "actions": actions,
        "findings": sum(len(o.findings) for o in done),
        "seconds": round(time.monotonic() - started, 3),
    }
    _tree_report(
        args, [(o.path, o.findings, o.size) for o in done],
        [o.record for o in done if o.record is not None], problems, summary, status,
        f"pvpatch patch: {summary['files']} ELF files, {summary['written']} written to "
        f"{args.output}{' (dry run)' if args.dry_run else ''}, {summary['sites']} sites "
        f"({_actions_text(actions)}), {failed} failed verification, "
        f"{summary['findings']} findings; {summary['seconds']:.2f} s")
    return status


def cmd_verify(args: argparse.Namespace) -> int:
    from .api import load, make_plan, open_elf
    from .report.stage import verify_json, verify_text
    from .verify import verify_files

    original = load(args.original, layout=args.layout, section=args.section, ops=args.ops,
                    max_decompressed=_limit(args))
    patched = open_elf(args.patched, max_decompressed=_limit(args))
    the_plan = make_plan(original, args.backend)
    report = verify_files(original, patched, the_plan, trials=args.trials, seed=args.seed,
                          allow_skip=args.allow_skip)
    if args.json:
        _emit_json(verify_json(report))
    else:
        print("\n".join(verify_text(report, args.patched)))
    status = EXIT_OK if report.ok else EXIT_FAIL
    if args.sarif:
        from .check import verify_findings

        # The failures are in the patched file: locate them there.
        _patch_sarif(args, patched.path, verify_findings(report, the_plan, patched),
                     len(patched.data), status)
    return status


def cmd_diff(args: argparse.Namespace) -> int:
    import json

    from .errors import InputError
    from .report.diff import diff_files, diff_json, diff_text

    verify = None
    if args.verify_json:
        try:
            with open(args.verify_json, encoding="utf-8") as fh:
                verify = json.load(fh)
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", args.verify_json) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"not JSON: {exc}", args.verify_json) from None
    report = diff_files(args.original, args.patched, backend=args.backend, ops=args.ops,
                        layout=args.layout, section=args.section, verify=verify,
                        max_decompressed=_limit(args), jobs=_jobs(args))
    if args.html:
        from .report.html import diff_html
        from .rewrite.output import write_atomic

        write_atomic(args.html, diff_html(report).encode())
    if args.json:
        _emit_json(diff_json(report))
    else:
        print("\n".join(diff_text(report)))
    for error in report.errors:
        _err(f"error: {error}")
    return EXIT_BAD if report.errors else (EXIT_OK if report.ok else EXIT_FAIL)


def cmd_layouts(args: argparse.Namespace) -> int:
    from .scan.altinstr import ALT_LAYOUTS
    from .scan.layouts import LAYOUTS

    rows = [(lay.name, lay.description) for lay in LAYOUTS.values()]
    rows += [(lay.name, lay.description) for lay in ALT_LAYOUTS.values()]
    for name, description in rows:
        print(f"{name:22} {description}")
    return EXIT_OK


def cmd_catalogs(args: argparse.Namespace) -> int:
    from .scan.ops import builtin_catalog, builtin_catalog_names

    for name in builtin_catalog_names():
        cat = builtin_catalog(name)
        print(f"{name:24} {len(cat.slots)} slots")
    return EXIT_OK


def _failure_sarif(args: argparse.Namespace, problem: str) -> None:
    """A run that failed on bad input still leaves a SARIF file saying so, so the CI step
    that uploads it does not fail for a missing file instead."""
    path = getattr(args, "sarif", None)
    if not path:
        return
    from .report.sarif import sarif_log

    try:
        _write_sarif(path, sarif_log([], exit_code=EXIT_BAD, problems=[problem],
                                     arguments=args.argv))
    except (OSError, PvpatchError) as exc:
        _err(f"error: cannot write {path}: {exc}")


# What the `pvpatch` program keeps to its os._exit; None while main() runs any other way.
_held: list[object] | None = None


def _hold_until_exit(result: object) -> None:
    """The `pvpatch` program keeps a file's result to its end, which os._exit makes
    without freeing it object by object (3.5 ms for a vmlinux's plan and rewrite); main()
    called any other way holds nothing."""
    if _held is not None:
        _held.append(result)


# Young-generation collections every 700 new objects cost ~6% of patching a vmlinux (tens
# of thousands of sites, each a few small objects, no garbage cycles): collect every
# 100,000 instead while a command runs, as mypy does.
YOUNG_GC_THRESHOLD = 100_000


def main(argv: Sequence[str] | None = None) -> int:
    saved = gc.get_threshold()
    try:
        gc.set_threshold(YOUNG_GC_THRESHOLD, *saved[1:])
        try:
            return _main(argv)
        finally:
            gc.set_threshold(*saved)
    except KeyboardInterrupt:  # landed between a command's own handler and here
        _err("interrupted")
        return 130


def run() -> None:
    """The `pvpatch` program: `main()`, then exit without a window for a late signal and
    without the interpreter's teardown.

    Once `main()` returns, outputs are either renamed into place or removed, so a SIGINT
    or SIGTERM arriving now has nothing left to clean up; blocked, it cannot turn a
    finished run into a traceback on the way out (pending signals die with the process).
    """
    import signal

    late = {signal.SIGINT, signal.SIGTERM}
    # The program keeps main()'s young-collection threshold to its end: main() puts back
    # the one it found, and with Python's 700 the first allocation after that would start
    # a collection of every object the command made (3 ms for a vmlinux), just before exit.
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
    global _held
    _held = []
    try:
        try:
            code = main()
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, late)
    except KeyboardInterrupt:
        signal.pthread_sigmask(signal.SIG_BLOCK, late)
        _err("interrupted")
        code = 130
    code = _flush_outputs(code)
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)  # profiled or traced (cProfile, coverage): their exit work must run
    # Every output is renamed into place or removed and every file closed by now: skip the
    # interpreter's teardown (a full garbage collection, then freeing every object one by
    # one: 4% of patching a vmlinux), as mypy does.
    os._exit(code)


def _flush_outputs(code: int) -> int:
    """What the interpreter's teardown would have done for run(): end the workers of a pool
    whose shutdown a second Ctrl-C cut short (not orphan them), and flush stdout and
    stderr.  Returns the exit status, EXIT_BAD if the report could not be written."""
    mp = sys.modules.get("multiprocessing")
    if mp is not None:
        for child in mp.active_children():
            child.terminate()  # SIGTERM: a worker's open OutputFile still removes its file
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # the program started with that descriptor closed
            continue
        try:
            stream.flush()
        except BrokenPipeError:  # the reader left after our last line: not a failure of ours
            pass
        except OSError as exc:  # ENOSPC, EFBIG, EIO: the report is incomplete
            if stream is sys.stdout:
                lost = _report_lost(exc)
                code = code or lost
    return code


def _report_lost(exc: OSError) -> int:
    """Standard output refused the report: say so on stderr; the rest of it is dropped."""
    _err(f"error: cannot write standard output: {exc.strerror or exc}")
    _drop_stdout()
    return EXIT_BAD


def _drop_stdout() -> None:
    """Send what stdout still holds, and anything printed later, to /dev/null."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _main(argv: Sequence[str] | None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_of(words))
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded in SARIF
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PvpatchError as exc:
        _err(f"error: {exc}")
        _failure_sarif(args, str(exc))
        return EXIT_BAD
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`pvpatch scan ... | head`): not an error of ours.
        _drop_stdout()
        return EXIT_OK
    except OSError as exc:
        # Every file pvpatch writes fails as an OutputError naming it; a full disk or a size
        # limit reaching here is standard output's (the report), the environment's failure.
        if exc.errno not in STDOUT_FULL or sys.stdout is None:
            return _internal_error(exc)
        return _report_lost(exc)
    except Exception as exc:
        return _internal_error(exc)


STDOUT_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _internal_error(exc: Exception) -> int:
    """A bug: still one line, unless debugging."""
    if os.environ.get("PVPATCH_DEBUG"):
        import traceback

        traceback.print_exception(exc)
    _err(f"internal error: {type(exc).__name__}: {exc} (set PVPATCH_DEBUG=1 for a traceback)")
    return EXIT_BAD
