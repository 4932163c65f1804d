"""The library API: every CLI command is one of these calls first.

    >>> import pvpatch
    >>> result = pvpatch.load("fixtures/x86_64/kernel61.o", ops="catalog:linux-6.1-x86_64")
    >>> [(s.section, s.offset, s.op) for s in result.sites][:1]
    [('.text', ..., 'irq.save_fl')]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import field
from typing import TYPE_CHECKING

from .elf.compress import MAX_DECOMPRESSED
from .elf.reader import ElfFile, path_text
from .errors import InputError, UsageError
from .record import record
from .scan.opsource import resolve_ops
from .scan.stage import DEFAULT_SECTION, ScanResult, scan_elf

if TYPE_CHECKING:
    from .plan.backend import Backend
    from .plan.stage import Plan
    from .plan.targets import SymbolMap
    from .rewrite.output import OutputFile
    from .rewrite.stage import Rewrite
    from .rules import Finding
    from .scan.ops import OpCatalog
    from .verify import VerifyReport


def open_elf(path: str | os.PathLike[str], *,
             max_decompressed: int = MAX_DECOMPRESSED) -> ElfFile:
    """Read an ELF file (never for writing) and parse its headers.  A compressed one
    (xz, zstd, gzip) is decompressed, refused past `max_decompressed` bytes."""
    return ElfFile.open(path, max_decompressed=max_decompressed)


def load(
    path: str | os.PathLike[str],
    *,
    layout: str = "auto",
    section: str = DEFAULT_SECTION,
    ops: str = "auto",
    max_decompressed: int = MAX_DECOMPRESSED,
) -> ScanResult:
    """Load `path` and scan its paravirt table: sites, op names and findings.

    `layout` is a layout name or "auto"; `ops` an op-name source ("auto",
    "none", "btf:FILE", "dwarf:FILE", "catalog:NAME").  A compressed file is
    decompressed (see `open_elf`).
    """
    elf = ElfFile.open(path, max_decompressed=max_decompressed)
    return scan_file(elf, layout=layout, section=section, ops=ops)


def scan_file(
    elf: ElfFile, *, layout: str = "auto", section: str = DEFAULT_SECTION, ops: str = "auto",
    lazy_ops: bool = False,
) -> ScanResult:
    """Scan an already opened file.

    `lazy_ops`: look for op names only once a table is found (a file without one gets
    `ops` None): most files of a module tree have none, and naming ops (BTF, vermagic)
    costs more than the rest of their scan."""
    from .scan.opsource import catalog_fits

    found: list[OpCatalog | None] = []

    def named() -> OpCatalog | None:
        found.append(resolve_ops(ops, elf))
        return found[0]

    result = scan_elf(elf, layout=layout, section=section, ops=named if lazy_ops else named())
    catalog = found[0] if found else None
    if catalog is not None and "(release " in catalog.name and not catalog_fits(result):
        # A guess from the release string that the sites contradict names nothing.
        result = scan_elf(elf, layout=layout, section=section, ops=None)
    return result


def load_backend(spec: str, elf: ElfFile) -> Backend:
    """`native` (the kernel's own replacements) or a path to a TOML spec."""
    from .plan.backend import load_backend as _load

    return _load(spec, elf.arch)


def make_plan(
    result: ScanResult, backend: str | Backend = "native", *, drop_patched: bool = False,
    symbols: str | os.PathLike[str] | SymbolMap | None = None, final: bool = False,
) -> Plan:
    """Decide what every site becomes; nothing is written.

    `final`: every table entry the kernel would apply at a rewritten site at boot or
    module load is dropped or made one it skips, so pvpatch's bytes are the ones that run
    (`plan.coverage` says which entries cover each site and what the kernel does there).

    `symbols` (a System.map or /proc/kallsyms file, or a `SymbolMap`) gives the addresses
    of spec targets a linked image has neither in `.symtab` nor in its export table."""
    from .plan.stage import make_plan as _make_plan
    from .plan.targets import SymbolMap

    be = load_backend(backend, result.elf) if isinstance(backend, str) else backend
    smap = symbols if isinstance(symbols, SymbolMap) or symbols is None \
        else SymbolMap.read(symbols)
    return _make_plan(result, be, drop_patched=drop_patched, symbols=smap, final=final)


def apply_plan(the_plan: Plan, *, symvers: str | os.PathLike[str] | None = None) -> Rewrite:
    """Apply a plan in memory: the output file's bytes and what changed.

    `symvers` (a Module.symvers file or the kernel's vmlinux) gives the CRCs a
    module with symbol versions needs for kernel functions it newly calls.
    """
    from .rewrite.modversions import read_crcs
    from .rewrite.stage import apply_plan as _apply_plan

    crcs = read_crcs(symvers) if symvers is not None else None
    return _apply_plan(the_plan, crcs=crcs)


@record
class SigningKey:
    """A key and certificate to sign kernel modules with, as the kernel's sign-file does."""

    key: bytes = field(repr=False)
    cert: bytes
    hash: str = "sha256"
    password: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_files(cls, key: str | os.PathLike[str], cert: str | os.PathLike[str],
                   hash: str = "sha256") -> SigningKey:
        """Read KEY and CERT (PEM or DER; may be one file); KBUILD_SIGN_PIN unlocks the key."""
        blobs = []
        for path in (key, cert):
            try:
                with open(path_text(path), "rb") as fh:
                    blobs.append(fh.read())
            except OSError as exc:
                raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from None
        pin = os.environ.get("KBUILD_SIGN_PIN")
        return cls(blobs[0], blobs[1], hash, pin.encode() if pin else None)


def sign_output(result: Rewrite, signing: SigningKey) -> Rewrite:
    """Sign the output module (replacing any signature it has) like scripts/sign-file."""
    from .elf.sign import sign_module

    elf = result.plan.scan.elf
    if not elf.is_relocatable:
        raise UsageError("--sign-key applies to kernel modules (relocatable files)", elf.path)
    signed = sign_module(result.data, signing.key, signing.cert, signing.hash,
                         password=signing.password, path=elf.path)
    return result.with_image(signed, signed=True)


def prepare_output(
    input: str | os.PathLike[str], output: str | os.PathLike[str], *, in_place: bool = False
) -> OutputFile:
    """Open `output` for a later `write_output`, and start copying `input` into it.

    For a linked file (an executable, a shared object, a vmlinux) this takes the
    copy of the input off the critical path: it runs in the kernel on another
    thread while the file is scanned and planned.  Use it as a context manager;
    the output appears only when `write_output` commits it.

        with pvpatch.prepare_output("vmlinux", "vmlinux.pv") as out:
            rw = pvpatch.apply_plan(pvpatch.make_plan(pvpatch.load("vmlinux")))
            pvpatch.write_output(rw, out)
    """
    from .elf.reader import linked_elf
    from .rewrite.output import OutputFile, check_output_path

    check_output_path(input, output, in_place)
    # Only linked files are copied ahead: they are the large ones (a vmlinux) and are
    # patched in place.  A relocatable object often gets a new layout (its relocation
    # and symbol tables change), where a copy made ahead would be wasted work.  A
    # compressed file is never one: `linked_elf` reads the raw header, the container's.
    src = os.fspath(input)
    return OutputFile(output, prefetch=src if linked_elf(src) else None)


def write_output(
    result: Rewrite, output: str | os.PathLike[str] | OutputFile, *, in_place: bool = False
) -> None:
    """Write a rewrite's bytes to `output` atomically (never over the input unless asked).

    `output` is a path, or an `OutputFile` from `prepare_output` (which checked it)."""
    from .rewrite.output import OutputFile, check_output_path

    src = result.plan.scan.path
    if isinstance(output, OutputFile):
        out = output
    else:
        check_output_path(src, output, in_place)
        out = OutputFile(output)
    with out:
        elf = result.plan.scan.elf
        if elf.compression is not None:
            # Compressed the way the input was; the signature, if any, is inside.
            out.commit_compressed(src, result.data, elf.compression, elf.identity)
        elif result.image is None:
            # Same layout as the input: the input's bytes with the edits over them.
            out.commit_edits(src, elf.data, result.edits, elf.identity)
        else:
            out.commit_image(result.image, mode_from=src)


# -- one file, start to end ------------------------------------------------------------


@record
class PatchOptions:
    """How `patch_file` patches one file: the options of `pvpatch patch`."""

    backend: str | Backend = "native"
    layout: str = "auto"
    section: str = DEFAULT_SECTION
    ops: str = "auto"
    drop_patched: bool = False
    final: bool = False  # --final: no table entry the kernel applies left at a rewritten site
    symbols: str | os.PathLike[str] | SymbolMap | None = None
    symvers: str | os.PathLike[str] | None = None
    verify: bool = True
    trials: int = 16
    seed: int = 0
    allow_skip: bool = False  # a site verify cannot run is not a failure
    workers: int | None = None  # verify's processes (None: by the amount of work)
    signing: SigningKey | None = None  # re-sign the output module
    max_decompressed: int = MAX_DECOMPRESSED


@record
class PatchResult:
    """What `patch_file` did: every stage's record, and where the output went."""

    scan: ScanResult
    plan: Plan
    rewrite: Rewrite
    verify: VerifyReport | None  # None with `verify=False`
    output: str | None  # the file written; None when nothing was (failed, or no output)

    @property
    def ok(self) -> bool:
        return self.verify is None or self.verify.ok

    @property
    def findings(self) -> tuple[Finding, ...]:
        """What `check` reports for the file (the scan's and the plan's findings), and a
        PV301 for each verification failure."""
        found = (*self.scan.findings, *self.plan.findings)
        if self.verify is None or self.verify.ok:
            return found
        from .check import verify_findings

        return (*found, *verify_findings(self.verify, self.plan))


def patch_file(
    source: str | os.PathLike[str] | ElfFile,
    output: str | os.PathLike[str] | OutputFile | None,
    options: PatchOptions = PatchOptions(),
    *,
    in_place: bool = False,
    on_plan: Callable[[ScanResult, Plan], None] | None = None,
) -> PatchResult:
    """Load, scan, plan, rewrite, verify, sign and write one file.

    Nothing is written when verification fails (`result.ok` is False) or `output` is
    None (a dry run).  `on_plan` sees the scan and the plan before anything is
    rewritten (the CLI prints their findings then).  Errors raise `PvpatchError`s.

        >>> import pvpatch
        >>> res = pvpatch.patch_file("fixtures/x86_64/kernel61.o", None,
        ...                          pvpatch.PatchOptions(ops="catalog:linux-6.1-x86_64"))
        >>> res.ok, res.plan.counts()["inline"] > 0, res.output
        (True, True, None)
    """
    from .check import scan_for
    from .rewrite.output import OutputFile

    elf = source if isinstance(source, ElfFile) else \
        ElfFile.open(source, max_decompressed=options.max_decompressed)
    if options.signing is not None and not elf.is_relocatable:
        raise UsageError("--sign-key applies to kernel modules (relocatable files)", elf.path)
    # Op names are looked for only when the file has sites: in a module tree most
    # have none, and naming costs more than the rest of their scan.
    result = scan_for(elf, layout=options.layout, section=options.section, ops=options.ops)
    the_plan = make_plan(result, options.backend, drop_patched=options.drop_patched,
                         symbols=options.symbols, final=options.final)
    if on_plan is not None:
        on_plan(result, the_plan)
    rw = apply_plan(the_plan, symvers=options.symvers)
    report = None
    if options.verify and rw.patches:  # a file without sites has nothing to prove
        from .verify import verify_rewrite

        if isinstance(output, OutputFile):
            output.wait()  # no copy thread running while the verifier forks
        report = verify_rewrite(rw, trials=options.trials, seed=options.seed,
                                workers=options.workers, allow_skip=options.allow_skip)
        if not report.ok:
            return PatchResult(result, the_plan, rw, report, None)
    if output is None:
        return PatchResult(result, the_plan, rw, report, None)
    if options.signing is not None:
        rw = sign_output(rw, options.signing)
    write_output(rw, output, in_place=in_place)
    where = output.path if isinstance(output, OutputFile) else os.fspath(output)
    return PatchResult(result, the_plan, rw, report, where)
