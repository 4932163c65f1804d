"""pvpatch: static patcher for x86 paravirt call sites in ELF files.

The pipeline is load -> scan -> plan -> rewrite -> verify -> report; each stage
is a module with its own data model.  The names below are the public API.
They are imported on first use so that `pvpatch --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load": "api",
    "open_elf": "api",
    "scan_file": "api",
    "make_plan": "api",
    "apply_plan": "api",
    "write_output": "api",
    "prepare_output": "api",
    "patch_file": "api",
    "PatchOptions": "api",
    "PatchResult": "api",
    "OutputFile": "rewrite.output",
    "load_backend": "api",
    "Plan": "plan.stage",
    "Decision": "plan.stage",
    "ThunkSpec": "plan.stage",
    "Rewrite": "rewrite.stage",
    "SitePatch": "rewrite.stage",
    "Backend": "plan.backend",
    "verify_rewrite": "verify",
    "verify_files": "verify",
    "verify_json": "verify",
    "VerifyReport": "verify",
    "SiteVerdict": "verify",
    "ThunkVerdict": "verify",
    "ScanResult": "scan.stage",
    "Site": "scan.stage",
    "Table": "scan.stage",
    "Finding": "rules",
    "RULES": "rules",
    "PvpatchError": "errors",
    "InputError": "errors",
    "ArchMismatch": "errors",
    "ElfFormatError": "errors",
    "TableError": "errors",
    "OpsError": "errors",
    "SpecError": "errors",
    "UsageError": "errors",
    "RewriteError": "errors",
    "OutputError": "errors",
    "VerifyError": "errors",
    "diff_files": "report.diff",
    "diff_json": "report.diff",
    "DiffReport": "report.diff",
    "FileDiff": "report.diff",
    "SiteDiff": "report.diff",
    "diff_html": "report.html",
}

__all__ = [
    "RULES",
    "ArchMismatch",
    "Backend",
    "Decision",
    "DiffReport",
    "ElfFormatError",
    "FileDiff",
    "Finding",
    "InputError",
    "OpsError",
    "OutputError",
    "OutputFile",
    "PatchOptions",
    "PatchResult",
    "Plan",
    "PvpatchError",
    "Rewrite",
    "RewriteError",
    "ScanResult",
    "Site",
    "SiteDiff",
    "SitePatch",
    "SiteVerdict",
    "SpecError",
    "Table",
    "TableError",
    "ThunkSpec",
    "ThunkVerdict",
    "UsageError",
    "VerifyError",
    "VerifyReport",
    "__version__",
    "apply_plan",
    "diff_files",
    "diff_html",
    "diff_json",
    "load",
    "load_backend",
    "make_plan",
    "open_elf",
    "patch_file",
    "prepare_output",
    "scan_file",
    "verify_files",
    "verify_json",
    "verify_rewrite",
    "write_output",
]

if TYPE_CHECKING:
    from .api import (
        PatchOptions,
        PatchResult,
        apply_plan,
        load,
        load_backend,
        make_plan,
        open_elf,
        patch_file,
        prepare_output,
        scan_file,
        write_output,
    )
    from .errors import (
        ArchMismatch,
        ElfFormatError,
        InputError,
        OpsError,
        OutputError,
        PvpatchError,
        RewriteError,
        SpecError,
        TableError,
        UsageError,
        VerifyError,
    )
    from .plan.backend import Backend
    from .plan.stage import Decision, Plan, ThunkSpec
    from .report.diff import DiffReport, FileDiff, SiteDiff, diff_files, diff_json
    from .report.html import diff_html
    from .rewrite.output import OutputFile
    from .rewrite.stage import Rewrite, SitePatch
    from .rules import RULES, Finding
    from .scan.stage import ScanResult, Site, Table
    from .verify import (
        SiteVerdict,
        ThunkVerdict,
        VerifyReport,
        verify_files,
        verify_json,
        verify_rewrite,
    )


def __dir__() -> list[str]:
    # help(pvpatch) and tab completion list the public API, loaded on demand, rather than
    # only what has been imported so far.
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pvpatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
