"""Finding rules: a stable id, a short name, a severity and what it means.

`scan`, `check`, `patch` and `verify` all report problems as `Finding`s that
name one of these rules, so JSON, text and SARIF output agree on ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

from .record import fast_init, record

Severity = Literal["error", "warning", "note"]


@record
class Rule:
    """One check pvpatch reports: its id, name, severity and what it means."""

    id: str
    name: str
    severity: Severity
    summary: str


RULES: Mapping[str, Rule] = MappingProxyType(
    {
        r.id: r
        for r in (
            Rule("PV100", "bad-elf", "error",
                 "The file claims to be ELF but its structure is broken or truncated."),
            Rule("PV101", "table-size", "error",
                 "The table is not a whole number of entries of its layout."),
            Rule("PV102", "entry-target", "error",
                 "A table entry points outside every executable section, into one with no "
                 "bytes in the file (SHT_NOBITS), or (in a linked file) into one that no "
                 "PT_LOAD segment loads."),
            Rule("PV103", "site-overrun", "error", "A site runs past the end of its section."),
            Rule("PV104", "site-overlap", "error", "Two sites overlap."),
            Rule("PV105", "insn-boundary", "error",
                 "A site does not start and end on instruction boundaries."),
            Rule("PV106", "slot-mismatch", "error",
                 "The ops slot the site calls disagrees with the entry's type."),
            Rule("PV107", "reloc-crossing", "error", "A relocation crosses a site boundary."),
            Rule("PV108", "entry-unrelocated", "error",
                 "A table entry of a relocatable file has no relocation for its pointer."),
            Rule("PV109", "site-length", "error",
                 "A site's length is zero or larger than the kernel's patch buffer (254)."),
            Rule("PV110", "alt-call-form", "error",
                 "An .altinstructions DIRECT_CALL entry does not describe a 6-byte "
                 "`call *pv_ops+off` with a 5-byte `call` placeholder as its replacement "
                 "(the kernel BUG()s on it)."),
            Rule("PV111", "alt-slot", "error",
                 "A DIRECT_CALL site's call does not read a slot inside pv_ops."),
            Rule("PV112", "entries-disagree", "error",
                 "The table entries at one site disagree: different types, clobbers or "
                 "lengths, a replacement longer than the site, or several native forms."),
            Rule("PV113", "alt-replacement", "error",
                 "An entry at a paravirt site has its replacement outside "
                 ".altinstr_replacement."),
            Rule("PV114", "site-shape", "error",
                 "A site's bytes are not a paravirt call followed only by NOPs (nor a form "
                 "pvpatch writes): the entry's length or address lies."),
            Rule("PV115", "foreign-reloc", "error",
                 "A relocation inside a site is not its call's own."),
            Rule("PV116", "branch-into-site", "error",
                 "A branch from outside a site lands inside it."),
            Rule("PV201", "site-too-short", "warning",
                 "A site is too short for a direct call (under 5 bytes)."),
            Rule("PV202", "no-thunk", "warning",
                 "A C-convention target for a callee-save site where no thunk can be injected."),
            Rule("PV203", "op-unknown", "warning", "The backend does not know the site's op."),
            Rule("PV204", "duplicate-entry", "warning", "Several table entries name one site."),
            Rule("PV205", "clobber-bits", "warning",
                 "A site's clobber mask has bits no register of the layout stands for."),
            Rule("PV206", "runtime-overwrite", "warning",
                 "The kernel will rewrite a rewritten site again at boot or module load "
                 "(a .parainstructions entry, or an .altinstructions entry such as "
                 "ALT_NOT(X86_FEATURE_XENPV)): what runs is not what pvpatch wrote. "
                 "Patch with --final to neutralise those entries."),
            Rule("PV301", "verify-failed", "error",
                 "Emulation showed a rewritten site breaking its contract."),
        )
    }
)


@fast_init
@record
class Finding:
    """One thing a check found, and where."""

    rule: str
    message: str
    section: str | None = None
    offset: int | None = None
    address: int | None = None
    site_index: int | None = None
    op: str | None = None
    file_offset: int | None = None
    length: int | None = None

    @property
    def severity(self) -> Severity:
        return RULES[self.rule].severity

    @property
    def name(self) -> str:
        return RULES[self.rule].name

    def where(self) -> str:
        if self.address is not None:
            loc = f"{self.address:#x}"
            if self.section:
                loc += f" ({self.section}+{self.offset:#x})" if self.offset is not None else ""
            return loc
        if self.section is not None:
            return f"{self.section}+{self.offset:#x}" if self.offset is not None else self.section
        return ""
