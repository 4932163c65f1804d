"""Command-line interface: parses arguments, calls the library, formats results.

Exit status: 0 success; 1 the job ran and found something that fails it
(check findings, verification failure); 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from . import __version__
from .errors import PvpatchError, UsageError

EXIT_OK, EXIT_FAIL, EXIT_BAD = 0, 1, 2


def _common_scan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", default="auto", metavar="NAME",
                   help="table layout (default: auto; see `pvpatch layouts`)")
    p.add_argument("--section", default=".parainstructions", metavar="NAME",
                   help="table section name (default: .parainstructions)")
    p.add_argument("--ops", default="auto", metavar="SOURCE",
                   help="op names from: auto, none, btf:FILE, dwarf:FILE, catalog:NAME")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=_positive, default=16, metavar="N",
                   help="random machine states per site (default 16)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the random states (default 0): runs are reproducible")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvpatch",
        description="Static patcher for x86 paravirt call sites (.parainstructions) in ELF "
        "files, with emulation proof.",
    )
    parser.add_argument("--version", action="version", version=f"pvpatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("scan", help="list the paravirt sites of ELF files")
    p.add_argument("paths", nargs="+", metavar="PATH")
    _common_scan_options(p)
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("patch", help="rewrite the sites of one ELF file")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    p.add_argument("--backend", default="native", metavar="native|SPEC.toml",
                   help="what ops become (default: native, the kernel's own replacements)")
    _common_scan_options(p)
    p.add_argument("--drop-patched", action="store_true",
                   help="remove the table entries of rewritten sites (relocatable files)")
    p.add_argument("--in-place", action="store_true", help="allow OUTPUT to be INPUT")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--no-verify", action="store_true", help="skip emulation of the result")
    _verify_options(p)
    p.add_argument("--dry-run", action="store_true", help="plan and report, write nothing")
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser("verify",
                       help="prove by emulation that PATCHED keeps ORIGINAL's site contracts")
    p.add_argument("original", metavar="ORIGINAL")
    p.add_argument("patched", metavar="PATCHED")
    p.add_argument("--backend", default="native", metavar="native|SPEC.toml",
                   help="the backend PATCHED was made with (default: native)")
    _common_scan_options(p)
    _verify_options(p)
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("layouts", help="list the known table layouts")
    p.set_defaults(func=cmd_layouts)

    p = sub.add_parser("catalogs", help="list the op catalogs shipped with pvpatch")
    p.set_defaults(func=cmd_catalogs)
    return parser


def _err(message: str) -> None:
    print(f"pvpatch: {message}", file=sys.stderr)


def _emit_json(doc: Any, out: TextIO = sys.stdout) -> None:
    json.dump(doc, out, indent=1)
    out.write("\n")


def cmd_scan(args: argparse.Namespace) -> int:
    from .api import load
    from .report import findings_text, scan_json, scan_text

    status = EXIT_OK
    files = []
    for path in args.paths:
        try:
            result = load(path, layout=args.layout, section=args.section, ops=args.ops)
        except UsageError:
            raise
        except PvpatchError as exc:
            _err(f"error: {exc}")
            status = EXIT_BAD
            continue
        for line in findings_text(result.path, result.findings):
            print(line, file=sys.stderr)
        if args.json:
            files.append(scan_json(result))
        else:
            print("\n".join(scan_text(result)))
    if args.json:
        _emit_json({"files": files})
    return status


def cmd_patch(args: argparse.Namespace) -> int:
    from .api import apply_plan, load, make_plan, write_output
    from .output import check_output_path
    from .report import findings_text, patch_json, patch_text

    check_output_path(args.input, args.output, args.in_place)
    result = load(args.input, layout=args.layout, section=args.section, ops=args.ops)
    for line in findings_text(result.path, result.findings):
        print(line, file=sys.stderr)
    the_plan = make_plan(result, args.backend, drop_patched=args.drop_patched)
    rw = apply_plan(the_plan)
    verify_doc = None
    if not args.no_verify:
        from .verify import report_failures, verify_json, verify_rewrite, verify_text

        report = verify_rewrite(rw, trials=args.trials, seed=args.seed)
        verify_doc = verify_json(report)
        if not report.ok:
            # Nothing is written when a rewritten site breaks its contract.
            for line in verify_text(report, result.path):
                print(line, file=sys.stderr)
            _err(f"error: {report_failures(report)}; nothing written")
            if args.json:
                _emit_json(patch_json(rw, None, verify_doc))
            return EXIT_FAIL
    output = None if args.dry_run else args.output
    if output is not None:
        write_output(rw, output, in_place=args.in_place)
    if args.json:
        _emit_json(patch_json(rw, output, verify_doc))
    else:
        print("\n".join(patch_text(rw, output)))
        if verify_doc is not None:
            summary, thunks = verify_doc["summary"], verify_doc["thunk_summary"]
            print(f"  verify: sites {summary['pass']} pass, {summary['fail']} fail, "
                  f"{summary['skip']} skip; thunks {thunks['pass']} pass, {thunks['fail']} fail "
                  f"({args.trials} trials each, seed {args.seed})")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from .api import load, make_plan, open_elf
    from .verify import verify_files, verify_json, verify_text

    original = load(args.original, layout=args.layout, section=args.section, ops=args.ops)
    patched = open_elf(args.patched)
    report = verify_files(original, patched, make_plan(original, args.backend),
                          trials=args.trials, seed=args.seed)
    if args.json:
        _emit_json(verify_json(report))
    else:
        print("\n".join(verify_text(report, args.patched)))
    return EXIT_OK if report.ok else EXIT_FAIL


def cmd_layouts(args: argparse.Namespace) -> int:
    from .layouts import LAYOUTS

    for lay in LAYOUTS.values():
        print(f"{lay.name:22} {lay.description}")
    return EXIT_OK


def cmd_catalogs(args: argparse.Namespace) -> int:
    from .ops import builtin_catalog, builtin_catalog_names

    for name in builtin_catalog_names():
        cat = builtin_catalog(name)
        print(f"{name:24} {len(cat.slots)} slots")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PvpatchError as exc:
        _err(f"error: {exc}")
        return EXIT_BAD
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`pvpatch scan ... | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # a bug: still one line, unless debugging
        if os.environ.get("PVPATCH_DEBUG"):
            traceback.print_exc()
        _err(f"internal error: {type(exc).__name__}: {exc} (set PVPATCH_DEBUG=1 for a traceback)")
        return EXIT_BAD
