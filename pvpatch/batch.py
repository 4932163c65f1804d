"""Whole trees: walk the inputs, run one job per file on every core, keep input order.

The per-file jobs (`scan_input`, `check_input`, `patch_input`) are plain
functions of picklable arguments returning picklable outcomes, so the same
code runs in-process for one or two files and in a process pool for a tree.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .check import FATAL_ERRORS, CheckOptions, FileCheck, check_data
from .elf.compress import MAGIC_MAX, MAX_DECOMPRESSED, detect, named_like, unpack
from .elf.reader import elf_kind
from .errors import InputError, PvpatchError, UsageError
from .record import record
from .rules import Finding
from .scan.stage import DEFAULT_SECTION

if TYPE_CHECKING:
    from .api import PatchOptions as FileOptions
    from .plan.targets import SymbolMap

T = TypeVar("T")
R = TypeVar("R")

IN_PROCESS_MAX = 2  # a pool costs more than it saves for this few files
CHUNK_MAX = 16  # files per task: small enough for a lively bar and even load


@record
class InputFile:
    """One file to run a job on: named on the command line, or found below a named directory."""

    path: str
    walked: bool = False  # found by walking a directory (not named on the command line)
    rel: str = ""  # path below the walked directory (the output path in a mirrored tree)


@record
class Inputs:
    """What `expand` made of the command line's paths: every file to run a job on, in order."""

    files: tuple[InputFile, ...]
    problems: tuple[str, ...]  # named paths that cannot be used: one message each
    tree: bool  # some input was a directory


def expand(paths: Sequence[str]) -> Inputs:
    """Files named on the command line, and every regular file below named directories
    (walked in sorted order, symbolic links not followed, so a tree is listed once)."""
    files: list[InputFile] = []
    problems: list[str] = []
    tree = False
    for path in paths:
        if not os.path.isdir(path):
            files.append(InputFile(path, rel=os.path.basename(path)))
            continue
        tree = True
        found = list(_walk(path, problems))
        if not any(_looks_elf(f.path) for f in found):
            problems.append(str(InputError("is a directory without ELF files", path)))
        files.extend(found)
    return Inputs(tuple(files), tuple(problems), tree)


def _walk(top: str, problems: list[str]) -> Iterator[InputFile]:
    def onerror(exc: OSError) -> None:
        problems.append(str(InputError(f"cannot read: {exc.strerror or exc}",
                                       exc.filename or top)))

    for dirpath, dirnames, filenames in os.walk(top, onerror=onerror):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            yield InputFile(path, walked=True, rel=os.path.relpath(path, top))


def _head(path: str) -> bytes:
    """A regular file's first bytes (a pipe's would be taken from its reader)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return b""
        with open(path, "rb") as fh:
            return fh.read(MAGIC_MAX)
    except OSError:
        return b""


def _looks_elf(path: str) -> bool:
    """ELF, or a compressed container (a tree of `.ko.xz` is a tree of modules)."""
    head = _head(path)
    return head.startswith(b"\x7fELF") or detect(head) is not None


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
    return check_data(path, data, options, walked=walked)


def read_payload(path: str, limit: int = MAX_DECOMPRESSED) -> tuple[bytes, str | None]:
    """A whole file, decompressed when it is a compressed container, and the container's
    name (None for a plain file).  Errors are `InputError`s naming the file."""
    return unpack(read_input(path), path, limit)


def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _warm_up() -> None:
    """Import what every job needs once, before forking, instead of once per worker."""
    import importlib

    for name in ("api", "check", "plan.stage", "report.stage", "scan.opsource", "disasm"):
        importlib.import_module(f".{name}", __package__)
    import capstone  # noqa: F401  (the disassembler: sites are decoded in every job)


def _run_chunk(func: Callable[[T], R], chunk: Sequence[T]) -> list[R]:
    return [func(item) for item in chunk]


def run_ordered(
    func: Callable[[T], R],
    items: Sequence[T],
    *,
    jobs: int,
    on_done: Callable[[int, T], None] | None = None,
) -> Iterator[R]:
    """`func` over `items`, results yielded in input order whatever the scheduling.

    `on_done(n, last_item)` is called as each batch of `n` items finishes (for a
    progress bar).  `func` must be picklable (a module-level function or a partial
    of one).  An exception in `func` ends the run and is raised here.
    """
    if jobs <= 1 or len(items) <= IN_PROCESS_MAX:
        for item in items:
            result = func(item)
            if on_done is not None:
                on_done(1, item)
            yield result
        return
    _warm_up()
    size = max(1, min(CHUNK_MAX, len(items) // (jobs * 8)))
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    # fork: workers inherit imported modules and caches instead of re-importing.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(max_workers=min(jobs, len(chunks)), mp_context=ctx) as pool:
        futures: dict[Future[list[R]], int] = {
            pool.submit(_run_chunk, func, chunk): n for n, chunk in enumerate(chunks)
        }
        pending: set[Future[list[R]]] = set(futures)
        ready: dict[int, list[R]] = {}
        next_chunk = 0
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: futures[f]):
                    n = futures[fut]
                    ready[n] = fut.result()
                    if on_done is not None:
                        on_done(len(chunks[n]), chunks[n][-1])
                while next_chunk in ready:
                    yield from ready.pop(next_chunk)
                    next_chunk += 1
        finally:
            for fut in pending:
                fut.cancel()


# -- per-file jobs ----------------------------------------------------------------------


def check_input(options: CheckOptions, item: InputFile, *,
                max_decompressed: int = MAX_DECOMPRESSED) -> FileCheck:
    """`check_path`; a compressed file (or one named like it) is decompressed first, then
    checked like a plain one (a broken ELF payload is a PV100 finding either way)."""
    if detect(_head(item.path)) is None and named_like(item.path) is None:
        return check_path(item.path, options, walked=item.walked)
    try:
        data, compression = read_payload(item.path, max_decompressed)
    except InputError as exc:
        return FileCheck(item.path, "bad", error=str(exc))
    return check_data(item.path, data, options, walked=item.walked, compression=compression)


@record
class ScanOptions:
    """The `scan` options every file of a run is scanned with (as on the command line)."""

    layout: str = "auto"
    section: str = DEFAULT_SECTION
    ops: str = "auto"
    json: bool = False
    max_decompressed: int = MAX_DECOMPRESSED  # compressed inputs are refused past this


@record
class ScanOutcome:
    """What `scan` made of one file (picklable: it comes back from worker processes).

    status "skipped": not an x86 ELF file met while walking a tree; "bad": `error` says why
    the file could not be read or scanned.  `sites`: how many sites the scan found."""

    path: str
    status: Literal["scanned", "skipped", "bad"]
    lines: tuple[str, ...] = ()  # the text listing (without --json)
    record: dict[str, Any] | None = None  # the JSON record (with --json)
    findings: tuple[Finding, ...] = ()
    sites: int = 0
    error: str | None = None


def scan_input(options: ScanOptions, item: InputFile) -> ScanOutcome:
    from .check import scan_for
    from .elf.reader import ElfFile
    from .report.stage import scan_json, scan_text

    try:
        data, compression = read_payload(item.path, options.max_decompressed)
        if item.walked and elf_kind(data) != "x86":
            return ScanOutcome(item.path, "skipped")
        result = scan_for(ElfFile(data, item.path, compression=compression),
                          layout=options.layout,
                          section=options.section, ops=options.ops)
    except UsageError:
        raise
    except PvpatchError as exc:
        return ScanOutcome(item.path, "bad", error=str(exc))
    if options.json:
        return ScanOutcome(item.path, "scanned", record=scan_json(result),
                           findings=result.findings, sites=len(result.sites))
    return ScanOutcome(item.path, "scanned", tuple(scan_text(result)),
                       findings=result.findings, sites=len(result.sites))


@record
class PatchOptions:
    """A tree run: where outputs go, and the options every file is patched with (`backend`
    and `symbols` are named here and loaded once per process)."""

    outdir: str
    file: FileOptions
    backend: str = "native"
    symbols: str | None = None  # System.map / kallsyms for targets of stripped images
    dry_run: bool = False
    json: bool = False


@record
class PatchOutcome:
    """What patching one file of a tree came to (picklable: it comes back from worker processes).

    status "failed": verification failed and nothing was written; "skipped" and "bad" as in
    `ScanOutcome`.  `output`: the path written (None in a dry run); `record`: the JSON record
    (with --json); `actions`: the plan's sites by action; `size`: bytes in the
    file (decompressed)."""

    path: str
    status: Literal["patched", "failed", "skipped", "bad"]
    output: str | None = None
    lines: tuple[str, ...] = ()  # the text report, or what failed
    record: dict[str, Any] | None = None
    findings: tuple[Finding, ...] = ()  # scan and plan findings, PV301 for failed verification
    sites: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    size: int = 0
    error: str | None = None


def patch_input(options: PatchOptions, item: InputFile) -> PatchOutcome:
    """Patch one file of a tree into the mirrored tree under `options.outdir`."""
    from dataclasses import replace

    from .api import patch_file
    from .check import backend_for
    from .elf.reader import ElfFile
    from .report.stage import patch_json, patch_text, verify_summary

    out = os.path.join(options.outdir, item.rel)
    try:
        data, compression = read_payload(item.path, options.file.max_decompressed)
        if item.walked and elf_kind(data) != "x86":
            return PatchOutcome(item.path, "skipped")
        # A compressed input is written back in its container (write_output), under
        # the same name.
        elf = ElfFile(data, item.path, compression=compression)
        file_options = replace(
            options.file, backend=backend_for(options.backend, elf.arch.name),
            symbols=_symbol_map(options.symbols),
            # Modules are signed; a linked file of the tree is written unsigned.
            signing=options.file.signing if elf.is_relocatable else None)
        output = None if options.dry_run else out
        if output is not None:
            os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        res = patch_file(elf, output, file_options, in_place=True)
    except FATAL_ERRORS:
        raise
    except PvpatchError as exc:
        return PatchOutcome(item.path, "bad", error=str(exc))
    rw, plan = res.rewrite, res.plan
    verify_doc = None
    lines: list[str] = []
    if res.verify is not None:
        from .report.stage import verify_json, verify_text

        verify_doc = verify_json(res.verify)
        if not res.ok:
            record = patch_json(rw, None, verify_doc) if options.json else None
            return PatchOutcome(item.path, "failed", None,
                                (*verify_text(res.verify, item.path),
                                 f"{item.path}: verification failed; nothing written"),
                                record, res.findings, len(res.scan.sites), plan.counts(),
                                len(data))
        lines.append(verify_summary(res.verify, options.file.trials, options.file.seed))
    record = patch_json(rw, res.output, verify_doc) if options.json else None
    # The same findings `check` reports for the file: the scan's and the plan's.
    return PatchOutcome(item.path, "patched", res.output, (*patch_text(rw, res.output), *lines),
                        record, res.findings, len(res.scan.sites), plan.counts(), len(data))


@functools.lru_cache(maxsize=4)
def _symbol_map(path: str | None) -> SymbolMap | None:
    """One read per process of a symbol file shared by every file of a tree."""
    from .plan.targets import SymbolMap

    return SymbolMap.read(path) if path is not None else None


def job(func: Callable[..., R], options: Any, **kwargs: Any) -> Callable[[InputFile], R]:
    """A picklable one-argument job for `run_ordered`."""
    return functools.partial(func, options, **kwargs)
