"""The check stage: every problem pvpatch can find in one file, as `Finding`s (reading
and sorting files is the tree runner's job, pvpatch/batch.py).

`check` is the CI step: it runs the scanner (PV102..PV109, PV204), turns a
table that cannot be decoded into PV101 and a broken ELF file into PV100
instead of failing the run, decodes instructions around every site (PV105) and
asks the planner what it could not do (PV201..PV203).  Nothing is written.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import field
from typing import TYPE_CHECKING, Any, Literal

from .arch import ARCHES
from .elf.reader import ElfFile, elf_kind
from .errors import ArchMismatch, InputError, OpsError, SpecError, TableError, UsageError
from .record import record
from .rules import Finding
from .scan.stage import DEFAULT_SECTION, ScanResult

if TYPE_CHECKING:
    from .plan.backend import Backend
    from .plan.stage import Plan
    from .verify.records import VerifyReport

# Problems with the request rather than with one file: they end the run (exit 2).
FATAL_ERRORS: tuple[type[Exception], ...] = (UsageError, SpecError, OpsError)

Status = Literal["checked", "skipped", "bad"]


@record
class CheckOptions:
    """The `check` options every file of a run is checked with (as on the command line);
    `backend`: "native" or a backend spec file (SPEC.toml)."""

    backend: str = "native"
    ops: str = "auto"
    layout: str = "auto"
    section: str = DEFAULT_SECTION
    records: bool = False  # build each file's JSON record (scan's fields plus findings)


@record
class FileCheck:
    """What `check` found in one file (picklable: it comes back from worker processes)."""

    path: str
    status: Status  # skipped: not an x86 ELF file met while walking a tree
    findings: tuple[Finding, ...] = ()
    sites: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    size: int = 0  # bytes in the file
    record: dict[str, Any] | None = None
    error: str | None = None  # status "bad": why the file could not be read at all

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)


def check_data(path: str, data: bytes, options: CheckOptions, *, walked: bool = False,
               compression: str | None = None) -> FileCheck:
    """`batch.check_path` on bytes already read (and decompressed: `compression` names the
    container they came from), so a compressed module gets the same findings."""
    kind = elf_kind(data)
    if kind != "x86" and walked:
        return FileCheck(path, "skipped", size=len(data))
    try:
        elf = ElfFile(data, path, compression=compression)
    except InputError as exc:
        if kind != "x86":
            return FileCheck(path, "bad", size=len(data), error=str(exc))
        return _broken(path, len(data), exc, None, options)
    return check_elf(elf, options)


def check_elf(elf: ElfFile, options: CheckOptions) -> FileCheck:
    """Every finding for an opened file.  Problems with the options themselves (unknown
    layout, unreadable --ops source, bad backend spec) are raised, not reported."""
    try:
        result = _scan(elf, options)
    except TableError as exc:
        return _table_broken(elf, exc, options)
    except ArchMismatch as exc:  # an option for the other architecture: this file only
        return _mismatch(elf, exc)
    except FATAL_ERRORS:
        raise
    except InputError as exc:
        return _broken(elf.path, len(elf.data), exc, elf, options)
    findings = list(result.findings)
    actions: dict[str, int] = {}
    try:
        if result.sites:
            from .plan.stage import make_plan

            plan = make_plan(result, backend_for(options.backend, elf.arch.name))
            actions = plan.counts()
            findings.extend(plan.findings)
    except ArchMismatch as exc:
        return _mismatch(elf, exc)
    except FATAL_ERRORS:
        raise
    except InputError as exc:  # symbols or relocations found broken on the way
        findings.append(Finding("PV100", exc.message))
    findings.sort(key=_finding_order)
    record = None
    if options.records:
        from .report.stage import finding_json, scan_json

        record = scan_json(result)
        record["findings"] = [finding_json(f) for f in findings]
    return FileCheck(elf.path, "checked", tuple(findings), len(result.sites), actions,
                     len(elf.data), record)


def _mismatch(elf: ElfFile, exc: ArchMismatch) -> FileCheck:
    return FileCheck(elf.path, "bad", size=len(elf.data), error=f"{elf.path}: {exc.message}")


def _scan(elf: ElfFile, options: CheckOptions) -> ScanResult:
    return scan_for(elf, layout=options.layout, section=options.section, ops=options.ops)


def scan_for(elf: ElfFile, *, layout: str, section: str, ops: str) -> ScanResult:
    """`api.scan_file`, naming ops only for a file with a table (`lazy_ops`)."""
    from .api import scan_file

    return scan_file(elf, layout=layout, section=section, ops=ops, lazy_ops=True)


def _finding_order(f: Finding) -> tuple[int, str, int]:
    return (-1 if f.file_offset is None else f.file_offset, f.rule,
            -1 if f.site_index is None else f.site_index)


def _empty_record(path: str, elf: ElfFile | None, findings: Sequence[Finding]) -> dict[str, Any]:
    from .report.stage import finding_json

    return {
        "path": path,
        "arch": elf.arch.name if elf is not None else None,
        "elf_type": elf.elf_type if elf is not None else None,
        "table": None,
        "sites": [],
        "findings": [finding_json(f) for f in findings],
    }


def _broken(path: str, size: int, exc: InputError, elf: ElfFile | None,
            options: CheckOptions) -> FileCheck:
    findings = (Finding("PV100", exc.message),)
    record = _empty_record(path, elf, findings) if options.records else None
    return FileCheck(path, "checked", findings, size=size, record=record)


def _table_broken(elf: ElfFile, exc: TableError, options: CheckOptions) -> FileCheck:
    from .scan.stage import table_section

    sec = table_section(elf, options.section, options.layout)
    finding = Finding(
        "PV101", exc.message,
        section=sec.name if sec is not None else options.section,
        offset=0 if sec is not None else None,
        file_offset=sec.offset if sec is not None else None,
        length=sec.size if sec is not None else None,
    )
    record = _empty_record(elf.path, elf, (finding,)) if options.records else None
    return FileCheck(elf.path, "checked", (finding,), size=len(elf.data), record=record)


@functools.lru_cache(maxsize=16)
def backend_for(spec: str, arch_name: str) -> Backend:
    """Backends are loaded once per process: a tree has thousands of files, one spec."""
    from .plan.backend import load_backend

    return load_backend(spec, ARCHES[arch_name])


def severity_rank(severity: str) -> int:
    return {"note": 0, "warning": 1, "error": 2}[severity]


def reaches(findings: Sequence[Finding], fail_on: str) -> bool:
    """True when some finding is at least as severe as `fail_on`."""
    floor = severity_rank(fail_on)
    return any(severity_rank(f.severity) >= floor for f in findings)


def verify_findings(report: VerifyReport, plan: Plan | None = None,
                    elf: ElfFile | None = None) -> list[Finding]:
    """PV301 findings for every failure: sites and thunks that fail (or are skipped when
    skips are not allowed), and differences nothing accounts for.  `elf`: the file the
    locations point into (PATCHED for `verify`); default the original."""
    from .verify.records import SiteVerdict

    sites = {d.site.index: d.site for d in plan.decisions} if plan is not None else {}
    out = []
    for v in report.failures:
        if isinstance(v, SiteVerdict):
            site = sites.get(v.index)
            file_offset = site.file_offset if site is not None else None
            if elf is not None:
                sec = elf.section(v.section)
                file_offset = sec.offset + v.offset if sec is not None else None
            what = "not proven (skipped)" if v.status == "skip" else v.action
            out.append(Finding("PV301", f"site {v.index} ({what}): {v.reason}",
                               section=v.section, offset=v.offset, address=v.address,
                               site_index=v.index, op=v.op, file_offset=file_offset,
                               length=site.len if site is not None else None))
        else:
            out.append(Finding("PV301", f"thunk {v.symbol} (calls {v.target}): {v.reason}",
                               address=v.address))
    for d in report.unaccounted:
        out.append(Finding("PV301", f"not accounted for: {d.what}", section=d.section,
                           offset=d.offset, file_offset=d.file_offset,
                           length=d.length or None))
    return out
