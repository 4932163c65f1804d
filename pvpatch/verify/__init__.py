"""The verify stage (see stage.py for what it proves and how)."""

from .stage import (
    SiteVerdict,
    ThunkVerdict,
    VerifyReport,
    reference_models,
    report_failures,
    verify_files,
    verify_findings,
    verify_json,
    verify_rewrite,
    verify_text,
)

__all__ = [
    "SiteVerdict",
    "ThunkVerdict",
    "VerifyReport",
    "reference_models",
    "report_failures",
    "verify_files",
    "verify_findings",
    "verify_json",
    "verify_rewrite",
    "verify_text",
]
