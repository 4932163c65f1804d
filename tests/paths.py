"""Where the tests find the repository's own files (one home for these paths)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "fixtures"
SPECS = FIX / "specs"
PROG_SPEC = SPECS / "prog.toml"  # the prog fixtures' sites sent to their own C functions
SARIF_SCHEMA = FIX / "schemas" / "sarif-schema-2.1.0.json"
ARCH_NAMES = ("x86_64", "i386")
