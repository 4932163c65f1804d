"""The check stage: every problem pvpatch can find in one file, as `Finding`s.

`check` is the CI step: it runs the scanner (PV102..PV109, PV204), turns a
table that cannot be decoded into PV101 and a broken ELF file into PV100
instead of failing the run, decodes instructions around every site (PV105) and
asks the planner what it could not do (PV201..PV203).  Nothing is written.
"""

from __future__ import annotations

import bisect
import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .arch import ARCHES, BY_MACHINE, Arch
from .disasm import insn_starts
from .elf import ELF_MAGIC, STT_FUNC, ElfFile
from .errors import InputError, OpsError, SpecError, TableError, UsageError
from .rules import Finding
from .scan import DEFAULT_SECTION, ScanResult, Site, site_finding

if TYPE_CHECKING:
    from .backend import Backend
    from .plan import Plan
    from .verify import VerifyReport

CALL_LEN = 5  # e8 rel32: the shortest direct call
MAX_INSN = 15  # longest x86 instruction: enough look-ahead to see one run past a site

# Problems with the request rather than with one file: they end the run (exit 2).
FATAL_ERRORS: tuple[type[Exception], ...] = (UsageError, SpecError, OpsError)

Status = Literal["checked", "skipped", "bad"]
ElfKind = Literal["x86", "foreign", "not-elf"]
_X86_MACHINES = frozenset(machine for machine, _bits in BY_MACHINE)


@dataclass(frozen=True)
class CheckOptions:
    backend: str = "native"
    ops: str = "auto"
    layout: str = "auto"
    section: str = DEFAULT_SECTION
    records: bool = False  # build each file's JSON record (scan's fields plus findings)


@dataclass(frozen=True)
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


def elf_kind(data: bytes) -> ElfKind:
    """Sort a file before parsing: ELF for another machine is not ours to judge (firmware
    and host tools share build trees with modules), but an x86 file that fails to parse,
    or one too broken to say its machine, is a finding."""
    if data[:4] != ELF_MAGIC:
        return "not-elf"
    if len(data) >= 20 and data[4] in (1, 2) and data[5] in (1, 2):
        machine = int.from_bytes(data[18:20], "little" if data[5] == 1 else "big")
        if data[5] == 2 or machine not in _X86_MACHINES:
            return "foreign"
    return "x86"


def read_input(path: str) -> bytes:
    """Read a whole file, with the same errors `ElfFile.open` gives."""
    try:
        with open(path, "rb") as fh:  # read-only, as everywhere in pvpatch
            return fh.read()
    except FileNotFoundError:
        raise InputError("no such file", path) from None
    except IsADirectoryError:
        raise InputError("is a directory", path) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path) from None


def check_path(path: str, options: CheckOptions, *, walked: bool = False) -> FileCheck:
    """Check one file.  `walked`: found while walking a directory, where files that are
    not x86 ELF are skipped silently; named files must be x86 ELF (bad input otherwise)."""
    try:
        data = read_input(path)
    except InputError as exc:
        return FileCheck(path, "bad", error=str(exc))
    kind = elf_kind(data)
    if kind != "x86" and walked:
        return FileCheck(path, "skipped", size=len(data))
    try:
        elf = ElfFile(data, path)
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
    except FATAL_ERRORS:
        raise
    except InputError as exc:
        return _broken(elf.path, len(elf.data), exc, elf, options)
    findings = list(result.findings)
    actions: dict[str, int] = {}
    try:
        if result.sites:
            from .plan import make_plan

            plan = make_plan(result, backend_for(options.backend, elf.arch.name))
            actions = plan.counts()
            findings.extend(boundary_findings(result))
            findings.extend(plan_findings(plan))
    except FATAL_ERRORS:
        raise
    except InputError as exc:  # symbols or relocations found broken on the way
        findings.append(Finding("PV100", exc.message))
    findings.sort(key=_finding_order)
    record = None
    if options.records:
        from .report import finding_json, scan_json

        record = scan_json(result)
        record["findings"] = [finding_json(f) for f in findings]
    return FileCheck(elf.path, "checked", tuple(findings), len(result.sites), actions,
                     len(elf.data), record)


def _scan(elf: ElfFile, options: CheckOptions) -> ScanResult:
    return scan_for(elf, layout=options.layout, section=options.section, ops=options.ops)


def scan_for(elf: ElfFile, *, layout: str, section: str, ops: str) -> ScanResult:
    """`api.scan_file`, minus naming ops for a file without a table: most files of a
    module tree have none, and finding their op names (BTF, vermagic) costs more than
    the rest of their scan."""
    from .scan import scan_elf

    bare = scan_elf(elf, layout=layout, section=section, ops=None)
    if not bare.sites:
        return bare
    from .api import scan_file

    return scan_file(elf, layout=layout, section=section, ops=ops)


def _finding_order(f: Finding) -> tuple[int, str, int]:
    return (-1 if f.file_offset is None else f.file_offset, f.rule,
            -1 if f.site_index is None else f.site_index)


def _empty_record(path: str, elf: ElfFile | None, findings: Sequence[Finding]) -> dict[str, Any]:
    from .report import finding_json

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
    from .scan import table_section

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
    from .backend import load_backend

    return load_backend(spec, ARCHES[arch_name])


# -- PV105: instruction boundaries ---------------------------------------------------


@dataclass(frozen=True)
class _Func:
    start: int  # section offsets
    end: int
    name: str


def _functions(elf: ElfFile) -> dict[int, tuple[list[int], list[_Func]]]:
    """Sized function symbols by section index, sorted by start (section offsets)."""
    by_sec: dict[int, list[_Func]] = defaultdict(list)
    for sym in elf.symbols:
        if sym.type != STT_FUNC or sym.size == 0 or not sym.defined \
                or not 0 < sym.section_index < len(elf.sections):
            continue
        sec = elf.sections[sym.section_index]
        start = sym.value if elf.is_relocatable else sym.value - sec.addr
        if start >= 0 and start + sym.size <= sec.size:
            by_sec[sym.section_index].append(_Func(start, start + sym.size, sym.name))
    out = {}
    for index, funcs in by_sec.items():
        funcs.sort(key=lambda f: (f.start, -f.end))
        out[index] = ([f.start for f in funcs], funcs)
    return out


def _containing(funcs: tuple[list[int], list[_Func]] | None, site: Site) -> _Func | None:
    if funcs is None:
        return None
    starts, items = funcs
    # The nearest start at or before the site that also covers its end; aliases and
    # nested symbols share starts, so look back a few entries, not just one.
    hi = bisect.bisect_right(starts, site.offset)
    for f in reversed(items[max(0, hi - 8) : hi]):
        if f.end >= site.end:
            return f
    return None


def boundary_findings(result: ScanResult) -> list[Finding]:
    """PV105: a site must start on an instruction boundary of its function (decoded
    from the function symbol's start; without a covering symbol the start is not
    checked, since padding between functions can desynchronise a decoder) and its own
    bytes must decode into whole instructions that end exactly at the site's end."""
    elf, arch = result.elf, result.arch
    funcs = _functions(elf) if elf.symtab is not None else {}
    groups: dict[tuple[int, _Func], list[Site]] = defaultdict(list)
    for site in result.sites:
        fn = _containing(funcs.get(site.section_index), site)
        if fn is not None:
            groups[(site.section_index, fn)].append(site)
    bad_start: dict[int, str] = {}
    for (sec_index, fn), sites in groups.items():
        sec = elf.sections[sec_index]
        upto = max(s.end for s in sites)
        code = elf.data[sec.offset + fn.start : sec.offset + upto]
        starts, stop = insn_starts(arch, code)
        for s in sites:
            rel = s.offset - fn.start
            if rel >= stop:
                continue  # the decoder stopped before the site: nothing certain to say
            i = bisect.bisect_right(starts, rel) - 1
            if starts[i] != rel:
                nxt = starts[i + 1] if i + 1 < len(starts) else stop
                bad_start[s.index] = (
                    f"site starts inside an instruction: {sec.name}+{fn.start + starts[i]:#x} "
                    f"({nxt - starts[i]} bytes, decoded from {fn.name} at "
                    f"{sec.name}+{fn.start:#x}) covers {sec.name}+{s.offset:#x}")
    out = []
    for site in result.sites:
        why = bad_start.get(site.index) or _end_problem(elf, arch, site)
        if why is not None:
            out.append(site_finding("PV105", site, why))
    return out


def _end_problem(elf: ElfFile, arch: Arch, site: Site) -> str | None:
    sec = elf.sections[site.section_index]
    # A few bytes past the site show whether its last instruction runs over the end.
    ahead = min(MAX_INSN, sec.size - site.end)
    code = elf.data[site.file_offset : site.file_offset + site.len + max(ahead, 0)]
    starts, stop = insn_starts(arch, code)
    if site.len in starts or stop == site.len:
        return None
    if stop < site.len:
        return (f"byte {code[stop]:#04x} at site+{stop:#x} does not decode "
                f"({site.len}-byte site)")
    last = max(s for s in starts if s < site.len)
    nxt = min([s for s in starts if s > last] + [stop])
    return (f"the instruction at site+{last:#x} ({nxt - last} bytes) runs "
            f"{nxt - site.len} byte(s) past the end of the {site.len}-byte site")


# -- PV201..PV203: what the planner cannot do -----------------------------------------


def _needs_thunk(arch: Arch, site: Site) -> bool:
    changes = set(arch.return_regs) | set(arch.caller_saved)
    return bool(changes - set(site.clobber_regs))


def plan_findings(plan: Plan) -> list[Finding]:
    """PV201 (shorter than a direct call), PV202 (a C target at a callee-save site that
    stays unpatched: too short for the call to a thunk, or a linked file where the
    target is not defined), PV203 (the backend has no rule for the op)."""
    out = []
    backend = plan.backend
    for d in plan.decisions:
        s = d.site
        if s.len < CALL_LEN:
            out.append(site_finding(
                "PV201", s, f"site of {s.len} bytes is too short for a direct call "
                f"({CALL_LEN} bytes): only an inline form fits"))
        rule = backend.rule_for(s.op, s.type)
        if rule is None:
            what = f"op {s.op}" if s.op else f"unnamed op (type {s.type})"
            out.append(site_finding(
                "PV203", s, f"backend {backend.name} has no rule for {what}; the site "
                f"becomes {d.action}" + (f" ({d.reason})" if d.reason else "")))
        elif (d.action == "keep" and rule.action == "call" and rule.convention == "c"
              and _needs_thunk(plan.arch, s)):
            out.append(site_finding(
                "PV202", s, f"C-convention target {rule.target} needs a register-saving "
                f"thunk at this site (it allows {', '.join(s.clobber_regs) or 'no register'}"
                f"), and none can be used: {d.reason}"))
    return out


# -- PV301: verification failures as findings ----------------------------------------


def verify_findings(report: VerifyReport, plan: Plan,
                    elf: ElfFile | None = None) -> list[Finding]:
    """Failed verdicts as PV301 findings located at their sites.  `elf`: the file the
    locations should point into (the patched file for `verify`); default the original."""
    from .verify import SiteVerdict

    sites = {d.site.index: d.site for d in plan.decisions}
    out = []
    for v in report.failures:
        if isinstance(v, SiteVerdict):
            site = sites.get(v.index)
            file_offset = site.file_offset if site is not None else None
            if elf is not None:
                sec = elf.section(v.section)
                file_offset = sec.offset + v.offset if sec is not None else None
            out.append(Finding(
                "PV301", f"site {v.index} ({v.action}): {v.reason}", section=v.section,
                offset=v.offset, address=v.address, site_index=v.index, op=v.op,
                file_offset=file_offset, length=site.len if site is not None else None))
        else:
            out.append(Finding("PV301", f"thunk {v.symbol} (calls {v.target}): {v.reason}",
                               address=v.address))
    return out


def severity_rank(severity: str) -> int:
    return {"note": 0, "warning": 1, "error": 2}[severity]


def reaches(findings: Sequence[Finding], fail_on: str) -> bool:
    """True when some finding is at least as severe as `fail_on`."""
    floor = severity_rank(fail_on)
    return any(severity_rank(f.severity) >= floor for f in findings)
