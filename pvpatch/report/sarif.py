"""SARIF 2.1.0 output, for code-scanning front ends.

One run; the driver lists every rule of `pvpatch.rules`.  Each result's
artifact is the ELF file; its region is the byte offset and length of the site
(or table entry) in the file, and its address the site's virtual address, its
offset in its section and the section's name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .. import __version__
from ..record import record
from ..rules import RULES, Finding

SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
SRCROOT = "%SRCROOT%"
_LEVELS = {"error": "error", "warning": "warning", "note": "note"}


@record
class ArtifactFindings:
    """One file of the run and its findings: a SARIF artifact and its results."""

    path: str
    findings: tuple[Finding, ...]
    length: int | None = None  # file size in bytes, when known


def artifact_location(path: str, cwd: str) -> dict[str, Any]:
    """A path under `cwd` as a relative URI against %SRCROOT% (the repository, in CI),
    anything else as an absolute file URI."""
    absolute = os.path.abspath(os.path.join(cwd, path))
    root = os.path.abspath(cwd)
    if os.path.commonpath([absolute, root]) == root and absolute != root:
        rel = Path(os.path.relpath(absolute, root)).as_posix()
        return {"uri": quote(rel), "uriBaseId": SRCROOT}
    return {"uri": Path(absolute).as_uri()}


def _rules() -> list[dict[str, Any]]:
    return [
        {
            "id": r.id,
            "name": r.name,
            "shortDescription": {"text": r.summary},
            "fullDescription": {"text": r.summary},
            "defaultConfiguration": {"level": _LEVELS[r.severity]},
            "properties": {"tags": ["paravirt", r.severity]},
        }
        for r in sorted(RULES.values(), key=lambda r: r.id)
    ]


def fingerprint(uri: str, f: Finding) -> str:
    """Stable across runs and unrelated edits: the rule, the file and where in it."""
    key = "\0".join(str(x) for x in (f.rule, uri, f.section, f.offset, f.address, f.op))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _result(f: Finding, location: dict[str, Any], art_index: int,
            rule_index: dict[str, int]) -> dict[str, Any]:
    physical: dict[str, Any] = {"artifactLocation": {**location, "index": art_index}}
    if f.file_offset is not None:
        region: dict[str, Any] = {"byteOffset": f.file_offset}
        if f.length is not None:
            region["byteLength"] = f.length
        physical["region"] = region
    address: dict[str, Any] = {}
    if f.address is not None:
        address["absoluteAddress"] = f.address
    if f.offset is not None:
        address["relativeAddress"] = f.offset
    if f.section is not None:
        address["name"] = f.section
    if f.length is not None and address:
        address["length"] = f.length
    if address:
        physical["address"] = address
    where = f.where()
    text = (f"{where}{f' ({f.op})' if f.op else ''}: " if where else "") + f.message
    properties: dict[str, Any] = {}
    if f.op is not None:
        properties["op"] = f.op
    if f.site_index is not None:
        properties["siteIndex"] = f.site_index
    out: dict[str, Any] = {
        "ruleId": f.rule,
        "ruleIndex": rule_index[f.rule],
        "level": _LEVELS[f.severity],
        "message": {"text": text},
        "locations": [{"physicalLocation": physical}],
        "partialFingerprints": {"pvpatchLocation/v1": fingerprint(location["uri"], f)},
    }
    if properties:
        out["properties"] = properties
    return out


def sarif_log(
    artifacts: Sequence[ArtifactFindings],
    *,
    exit_code: int,
    problems: Sequence[str] = (),
    arguments: Sequence[str] | None = None,
    cwd: str | None = None,
) -> dict[str, Any]:
    """The whole SARIF document.  `problems`: inputs that could not be analysed at all
    (reported as tool execution notifications); `exit_code`: pvpatch's own."""
    cwd = cwd or os.getcwd()
    rules = _rules()
    rule_index = {r["id"]: i for i, r in enumerate(rules)}
    arts: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for art in artifacts:
        location = artifact_location(art.path, cwd)
        entry: dict[str, Any] = {"location": location, "roles": ["analysisTarget"]}
        if art.length is not None:
            entry["length"] = art.length
        index = len(arts)
        arts.append(entry)
        results.extend(_result(f, location, index, rule_index) for f in art.findings)
    invocation: dict[str, Any] = {
        # Findings are the tool working as intended; only bad input or usage is not.
        "executionSuccessful": exit_code in (0, 1),
        "exitCode": exit_code,
        "workingDirectory": {"uri": Path(os.path.abspath(cwd)).as_uri() + "/"},
    }
    if arguments is not None:
        invocation["arguments"] = list(arguments)
    if problems:
        invocation["toolExecutionNotifications"] = [
            {"level": "error", "message": {"text": p}} for p in problems
        ]
    return {
        "$schema": SCHEMA_URI,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "pvpatch",
                        "version": __version__,
                        "semanticVersion": __version__,
                        "rules": rules,
                    }
                },
                "originalUriBaseIds": {
                    SRCROOT: {"uri": Path(os.path.abspath(cwd)).as_uri() + "/"}
                },
                "artifacts": arts,
                "results": results,
                "invocations": [invocation],
                "columnKind": "unicodeCodePoints",
            }
        ],
    }
