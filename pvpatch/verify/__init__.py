"""The verify stage: prove by emulation that PATCHED keeps ORIGINAL's site contracts,
and account for every other byte that differs (stage.py says what is proven, and how).

The modules, by job:

- `stage`: the entry points (`verify_rewrite`, `verify_files`): account for the
  differences, make the jobs, spread them over processes, gather the verdicts.
- `jobs`: what a worker is sent (sites, thunks, files), made from a plan.
- `engine`: one file pair loaded in its engines, and the trial states in batches.
- `sitecheck`, `thunkcheck` (with the unwind check), `compare`: the checks.
- `records`: the verdicts and the report; `models`: the reference models.
- `runtime`, `loader`, `machine`: the harness code, the ELF-to-emulator loader and
  the Unicorn engine (imported lazily: `pvpatch --help` does not load it).

The report's text, JSON and error are made in pvpatch/report/stage.py, its findings in
pvpatch/check.py; they are re-exported here.
"""

from ..check import verify_findings
from ..report.stage import report_failures, verify_json, verify_text
from .models import reference_models
from .records import SiteVerdict, ThunkVerdict, VerifyReport
from .stage import verify_files, verify_rewrite

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
