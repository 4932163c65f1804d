"""`pvpatch diff`: what a patch did to a file, site by site, and anything else it changed.

For each pair (ORIGINAL, PATCHED), or each pair of files at the same relative path of
two trees:

- the byte accounting of `verify` (pvpatch/verify/accounting.py) is run, not re-done: it says
  which sites differ, which thunks PATCHED holds, which section rule explained each
  changed section, and every difference it cannot explain (those are flagged);
- each site that differs is shown before and after, symbolised (pvpatch/report/symbolic.py),
  with the action recognised from its new bytes and the plan re-made from ORIGINAL
  with the same `--backend`/`--ops` options (its action and reason).  A site whose
  bytes or relocations are not what that plan writes is flagged, as is a changed site
  the plan keeps: nothing explains it;
- the table edits (`.parainstructions` entries dropped, `.altinstructions` entries
  neutralised to NOT(X86_FEATURE_ALWAYS) or dropped), and the sections, symbols,
  relocations and segments PATCHED adds;
- with a verify report (the JSON of `pvpatch verify --json`, or of `pvpatch patch
  --json` for one file or a tree), each site's and thunk's verdict; a failed one, or a
  skip the report did not allow, is flagged.

Nothing here prints: `diff_json` and `diff_text` make what the CLI writes, and
pvpatch/report/html.py the page.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from ..disasm import Insn
from ..elf.compress import MAX_DECOMPRESSED
from ..elf.reader import (
    PF_R,
    PF_W,
    PF_X,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_WRITE,
    SHN_ABS,
    SHN_UNDEF,
    SHT_REL,
    SHT_RELA,
    STT_SECTION,
    ElfFile,
    Relocation,
)
from ..errors import InputError, PvpatchError, UsageError
from ..record import record
from ..scan.stage import DEFAULT_SECTION

if TYPE_CHECKING:
    from ..plan.backend import Backend
    from ..plan.stage import Decision, Plan, ThunkSpec
    from ..scan.stage import ScanResult, Site
    from ..verify.accounting import Accounting, Difference, SectionNote, ThunkPlace
    from .symbolic import Symboliser

ACTIONS = ("inline", "call", "thunk", "jmp", "nop", "ud2", "keep")
_ENTRY_CLAIM = re.compile(r"^entry (\d+) (neutralised|dropped)\b")
_SECTION_TYPES = {0: "NULL", 1: "PROGBITS", 2: "SYMTAB", 3: "STRTAB", 4: "RELA", 5: "HASH",
                  6: "DYNAMIC", 7: "NOTE", 8: "NOBITS", 9: "REL", 11: "DYNSYM",
                  17: "GROUP", 18: "SYMTAB_SHNDX", 19: "RELR"}
_SEGMENT_TYPES = {1: "LOAD", 2: "DYNAMIC", 3: "INTERP", 4: "NOTE", 6: "PHDR", 7: "TLS",
                  0x6474E550: "GNU_EH_FRAME", 0x6474E551: "GNU_STACK",
                  0x6474E552: "GNU_RELRO", 0x6474E553: "GNU_PROPERTY"}
_BINDS = {0: "LOCAL", 1: "GLOBAL", 2: "WEAK"}
_SYMBOL_TYPES = {0: "NOTYPE", 1: "OBJECT", 2: "FUNC", 3: "SECTION", 4: "FILE"}


# -- the data model ----------------------------------------------------------------------


@record
class Verdict:
    """A site's or thunk's verdict in a verify report."""

    status: str  # pass | fail | skip
    reason: str | None
    allowed: bool = False  # a skip the report accepted (--allow-skip)

    @property
    def failed(self) -> bool:
        """Verification did not accept it: a failure, or a skip not allowed."""
        return self.status == "fail" or (self.status == "skip" and not self.allowed)


@record
class SiteDiff:
    """One site whose bytes or relocations differ."""

    index: int  # its table entry (the site's index in `pvpatch scan`)
    section: str
    offset: int
    address: int | None
    file_offset: int | None  # of the site in PATCHED
    op: str | None
    type: int
    len: int
    entries: tuple[int, ...]
    before: bytes
    after: bytes
    before_insns: tuple[Insn, ...]
    after_insns: tuple[Insn, ...]
    relocs_before: tuple[str, ...]  # `+0x2 R_X86_64_PC32 pv_ops+0xec`, place from the site
    relocs_after: tuple[str, ...]
    action: str  # what the new bytes are: inline | call | thunk | jmp | nop | ud2 | keep
    target: str | None  # of a call, thunk or jmp, symbolised
    planned: str  # the plan's action for the site
    reason: str | None  # the plan's reason
    verdict: Verdict | None = None
    flags: tuple[str, ...] = ()  # why the change is not accounted for

    @property
    def where(self) -> str:
        rel = f"{self.section}+{self.offset:#x}"
        return f"{self.address:#x} {rel}" if self.address is not None else rel


@record
class ThunkDiff:
    """A thunk PATCHED holds."""

    symbol: str
    target: str | None  # what it calls (the plan's), None when the plan makes no such thunk
    saves: tuple[str, ...]
    section: str
    offset: int
    address: int | None
    size: int
    insns: tuple[Insn, ...]
    verdict: Verdict | None = None
    flags: tuple[str, ...] = ()


@record
class EntryEdit:
    """A table entry made one the kernel skips, or dropped."""

    entry: int
    edit: Literal["neutralised", "dropped"]
    site: int | None
    was: str  # `DIRECT_CALL`, `NOT(XENPV)`, `type 30 len 6 clobbers 0x1`
    now: str | None  # `NOT(ALWAYS)`; None when dropped


@record
class SectionInfo:
    """A section PATCHED adds (`address` None in a relocatable file)."""

    name: str
    type: str
    flags: str  # W, A, X as readelf writes them
    size: int
    address: int | None


@record
class SymbolInfo:
    """A symbol only one of the files has (section symbols aside), named as readelf names them."""

    name: str
    bind: str
    type: str
    section: str  # UND, ABS or the section's name
    value: int
    size: int


@record
class RelocChange:
    """A relocation PATCHED adds or removes outside the changed sites and the site table's own
    (relocatable files); `symbol` as the relocation names it, `offset` in `section`."""

    how: Literal["added", "removed"]
    section: str  # the section the relocation applies to
    offset: int
    type: str
    symbol: str
    addend: int


@record
class SegmentInfo:
    """A program header PATCHED adds after ORIGINAL's."""

    type: str
    flags: str  # R W E
    offset: int
    vaddr: int
    filesz: int
    memsz: int


@record
class FileDiff:
    """Everything that differs between one ORIGINAL and its PATCHED."""

    original: str
    patched: str
    arch: str
    elf_type: str
    table: str | None  # the site table's section
    family: str | None
    layout: str | None
    ops: str | None
    backend: str
    sites: tuple[SiteDiff, ...] = ()
    thunks: tuple[ThunkDiff, ...] = ()
    table_edits: tuple[EntryEdit, ...] = ()
    sections_added: tuple[SectionInfo, ...] = ()
    sections_changed: tuple[SectionNote, ...] = ()  # the accounting rule of each
    symbols_added: tuple[SymbolInfo, ...] = ()
    symbols_removed: tuple[SymbolInfo, ...] = ()
    relocations: tuple[RelocChange, ...] = ()  # outside the sites and the table's own
    segments_added: tuple[SegmentInfo, ...] = ()
    signature: str | None = None  # what happened to a module signature
    flagged: tuple[Difference, ...] = ()  # what the accounting cannot explain
    omitted: int = 0  # flagged differences past the accounting's list
    verified: bool = False  # a verify report was matched to this pair
    rel: str = ""  # the pair's path below the trees' roots
    total_sites: int = 0  # sites in ORIGINAL's table, changed or not

    @property
    def identical(self) -> bool:
        return not (self.sites or self.thunks or self.sections_changed or self.flagged
                    or self.omitted)

    @property
    def problems(self) -> int:
        """How many things are flagged: differences, sites and thunks."""
        return (len(self.flagged) + self.omitted + sum(1 for s in self.sites if s.flags)
                + sum(1 for t in self.thunks if t.flags))

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def counts(self) -> dict[str, int]:
        """Changed sites by the action their new bytes are."""
        out = dict.fromkeys(ACTIONS, 0)
        for s in self.sites:
            out[s.action] = out.get(s.action, 0) + 1
        return out

    def by_op(self) -> dict[tuple[str, str], int]:
        """Changed sites by (action, op)."""
        return dict(Counter((s.action, s.op or f"type {s.type}") for s in self.sites))


@record
class Unpaired:
    """A file of one tree with no file at the same relative path in the other."""

    path: str
    missing_in: Literal["original", "patched"]


@record
class DiffReport:
    """What `diff_files` found: one `FileDiff` for a pair of files, one per paired file for two
    trees (`tree`), and what could not be paired or compared."""

    original: str
    patched: str
    tree: bool
    files: tuple[FileDiff, ...]
    unpaired: tuple[Unpaired, ...] = ()
    errors: tuple[str, ...] = ()  # pairs that could not be compared at all (bad input)
    skipped: int = 0  # files of ORIGDIR that are not x86 ELF

    @property
    def problems(self) -> int:
        return sum(f.problems for f in self.files) + len(self.unpaired)

    @property
    def ok(self) -> bool:
        return self.problems == 0 and not self.errors

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(ACTIONS, 0)
        for f in self.files:
            for action, n in f.counts().items():
                out[action] = out.get(action, 0) + n
        return out

    def by_op(self) -> dict[tuple[str, str], int]:
        total: Counter[tuple[str, str]] = Counter()
        for f in self.files:
            total.update(f.by_op())
        return dict(total)


# -- verify reports ----------------------------------------------------------------------


@record
class VerifyDoc:
    """One file's verify report: verdicts by site index and by thunk symbol."""

    input: str | None  # the original it was made from, when the report says
    sites: Mapping[int, Verdict]
    thunks: Mapping[str, Verdict]


def verify_reports(doc: Any) -> tuple[VerifyDoc, ...]:
    """The verify reports in a JSON document: `pvpatch verify --json` (one, naming no
    file), `pvpatch patch --json` (one, naming its input) or `pvpatch patch DIR --json`
    (one per file).  Anything else is an InputError."""
    def one(v: Any, path: str | None) -> VerifyDoc:
        if not isinstance(v, dict) or not isinstance(v.get("sites"), list) \
                or not isinstance(v.get("thunks", []), list):
            raise InputError("not the JSON of `pvpatch verify --json` or `pvpatch patch "
                             "--json`")
        allow = bool(v.get("allow_skip", False))
        try:
            sites = {int(s["index"]): Verdict(str(s["status"]), s.get("reason"),
                                              allow and s["status"] == "skip")
                     for s in v["sites"]}
            thunks = {str(t["symbol"]): Verdict(str(t["status"]), t.get("reason"),
                                                allow and t["status"] == "skip")
                      for t in v.get("thunks", [])}
        except (KeyError, TypeError, ValueError):
            raise InputError("a verify report whose sites or thunks lack index, symbol or "
                             "status") from None
        return VerifyDoc(path, sites, thunks)

    if isinstance(doc, dict) and isinstance(doc.get("files"), list):
        return tuple(one(r["verify"], str(r.get("input"))) for r in doc["files"]
                     if isinstance(r, dict) and r.get("verify") is not None)
    if isinstance(doc, dict) and "input" in doc and "verify" in doc:
        return () if doc["verify"] is None else (one(doc["verify"], str(doc["input"])),)
    return (one(doc, None),)


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def match_report(reports: Sequence[VerifyDoc], original: str, rel: str = "",
                 single: bool = True) -> VerifyDoc | None:
    """The report made from `original` (by path, else by its path below the tree), or for
    a single pair the only report there is."""
    for r in reports:
        if r.input is not None and _same_file(r.input, original):
            return r
    if rel:
        tail = os.sep + rel
        for r in reports:
            if r.input is not None and (r.input.endswith(tail) or r.input == rel):
                return r
    if single and len(reports) == 1:
        return reports[0]
    return None


# -- one pair ----------------------------------------------------------------------------


def _keys(elf: ElfFile) -> list[tuple[str, int]]:
    """Each section's (name, occurrence of that name): how sections are paired, as the
    accounting pairs them."""
    seen: dict[str, int] = {}
    out = []
    for sec in elf.sections:
        k = seen.get(sec.name, 0)
        seen[sec.name] = k + 1
        out.append((sec.name, k))
    return out


def _flags_text(flags: int, bits: Sequence[tuple[int, str]]) -> str:
    return "".join(ch for bit, ch in bits if flags & bit)


def _feature_text(feature: int, flags: int) -> str:
    from ..scan.altinstr import (
        ALT_FLAG_DIRECT_CALL,
        ALT_FLAG_NOT,
        PARAVIRT_FEATURES,
        X86_FEATURE_ALWAYS,
    )

    name = PARAVIRT_FEATURES.get(feature) or (
        "ALWAYS" if feature == X86_FEATURE_ALWAYS else f"{feature // 32}*32+{feature % 32}")
    if flags & ALT_FLAG_DIRECT_CALL:
        # ALT_CALL_ALWAYS: the DIRECT_CALL entry of every paravirt site
        return "DIRECT_CALL" if feature in (0, X86_FEATURE_ALWAYS) else f"DIRECT_CALL({name})"
    return f"NOT({name})" if flags & ALT_FLAG_NOT else name


class _PairDiff:
    def __init__(self, result: ScanResult, patched: ElfFile, backend: str | Backend,
                 verify: VerifyDoc | None, rel: str) -> None:
        from ..api import make_plan
        from ..verify.accounting import account
        from .symbolic import Named, Symboliser, extra_names

        if patched.arch != result.arch:
            raise InputError(f"PATCHED is {patched.arch.name}, ORIGINAL {result.arch.name}",
                             patched.path)
        if patched.is_relocatable != result.elf.is_relocatable:
            raise InputError("PATCHED is not the same kind of ELF file as ORIGINAL "
                             f"({patched.elf_type}, not {result.elf_type})", patched.path)
        self.result = result
        self.o = result.elf
        self.p = patched
        self.arch = result.arch
        self.verify = verify
        self.rel = rel
        self.plan: Plan = make_plan(result, backend)
        self.acc: Accounting = account(self.plan, patched)
        okeys, self.pkeys = _keys(self.o), _keys(patched)
        where = {k: i for i, k in enumerate(self.pkeys)}
        self.o2p = {i: where[k] for i, k in enumerate(okeys) if k in where}
        self.okeys = set(okeys)
        targets = {n: t.address for n, t in self.plan.targets.items()}
        self.thunk_at = {t.symbol: t for t in self.acc.thunks}
        thunk_names = [Named(t.address, t.size, t.symbol) for t in self.acc.thunks
                       if t.address is not None]
        self.osym: Symboliser = Symboliser(self.o, extra_names(targets))
        self.psym: Symboliser = Symboliser(patched, [*thunk_names, *extra_names(targets)])
        self.targets = targets
        self.decisions: dict[int, Decision] = {d.site.index: d for d in self.plan.decisions}
        self.specs: dict[str, ThunkSpec] = {t.symbol: t for t in self.plan.thunks}

    def run(self) -> FileDiff:
        acc, res = self.acc, self.result
        sites = tuple(self._site(i) for i in acc.changed_sites)
        thunks = tuple(self._thunk(t) for t in acc.thunks)
        # What the accounting explains only once a proof is in: the diff shows every site
        # and thunk that differs (and checks it against the plan), so those claims stand.
        flagged = acc.unaccounted(dict.fromkeys(acc.changed_sites, "shown"),
                                  {t.symbol: "shown" for t in acc.thunks})
        table = res.table
        return FileDiff(
            original=res.path, patched=self.p.path, arch=self.arch.name,
            elf_type=res.elf_type, table=table.section.name if table else None,
            family=table.family if table else None,
            layout=table.layout.name if table else None,
            ops=res.ops.name if res.ops is not None else None,
            backend=self.plan.backend.source, sites=sites, thunks=thunks,
            table_edits=self._table_edits(),
            sections_added=self._sections_added(),
            sections_changed=tuple(n for n in acc.sections if n.kind != "signature"),
            symbols_added=self._symbols[0], symbols_removed=self._symbols[1],
            relocations=self._relocations(sites), segments_added=self._segments(),
            signature=next((n.rule for n in acc.sections if n.kind == "signature"), None),
            flagged=flagged, omitted=acc.omitted, verified=self.verify is not None,
            rel=self.rel, total_sites=len(res.sites))

    # -- sites -----------------------------------------------------------------------

    def _site(self, index: int) -> SiteDiff:
        from ..scan.integrity import site_form

        d = self.decisions[index]
        site = d.site
        flags: list[str] = []
        pi = self.o2p.get(site.section_index)
        if pi is None:
            after, file_offset = b"", None
            flags.append(f"section {site.section} is not in PATCHED")
        else:
            psec = self.p.sections[pi]
            file_offset = psec.offset + site.offset
            # The site's bytes alone (slicing a vmlinux's .text per site costs seconds).
            after = bytes(self.p.data[file_offset : psec.offset + min(site.end, psec.size)]) \
                if psec.file_size else b""
        before_insns = self.osym.insns(site.code, address=site.address,
                                       section_index=site.section_index, offset=site.offset)
        after_relocs = self.psym.relocations(pi, site.offset, site.len) \
            if pi is not None else []
        after_insns = self.psym.insns(after, address=site.address, section_index=pi,
                                      offset=site.offset, relocs=after_relocs)
        if self.o.is_relocatable:
            relocs_before = tuple(
                self.osym.reloc_text(r, site.offset)
                for r in self.osym.relocations(site.section_index, site.offset, site.len))
            relocs_after = tuple(self.psym.reloc_text(r, site.offset) for r in after_relocs)
        else:
            assert site.address is not None
            relocs_before = tuple(self.osym.dynamic_relocations(site.address, site.len))
            relocs_after = tuple(self.psym.dynamic_relocations(site.address, site.len))
        head = site_form(self.arch, after)
        kind = "inline" if head is None else head.kind
        target = target_addr = None
        if kind in ("call", "jmp"):
            target, target_addr = self._branch_target(site, after, after_relocs)
        action = {"nops": "nop", "ops-call": "keep"}.get(kind, kind)
        if action == "call" and target is not None and (
                target in self.thunk_at or any(t.address == target_addr
                                               for t in self.acc.thunks if t.address)):
            action = "thunk"
        if len(after) == site.len:
            flags += self._plan_problems(d, after, after_relocs, relocs_after, target,
                                         target_addr)
        verdict = self._verdict_site(index, flags)
        return SiteDiff(site.index, site.section, site.offset, site.address, file_offset,
                        site.op, site.type, site.len, site.entry_indices, site.code, after,
                        tuple(before_insns), tuple(after_insns), relocs_before, relocs_after,
                        action, target, d.action, d.reason, verdict, tuple(flags))

    def _branch_target(self, site: Site, after: bytes, relocs: Sequence[Relocation]
                       ) -> tuple[str | None, int | None]:
        """The name (and, linked, the address) a direct call or jmp at the site reaches."""
        if self.o.is_relocatable:
            r = next((r for r in relocs if r.offset == site.offset + 1), None)
            if r is None:
                return None, None
            kind = self.arch.reloc(r.type)
            if not kind.pc_relative:
                return None, None
            from .symbolic import plus

            return plus(self.psym.symbol_name(r), r.addend + 4), None
        assert site.address is not None
        disp = int.from_bytes(after[1:5], "little", signed=True)
        addr = self.arch.wrap(site.address + 5 + disp)
        return self.psym.name_at(addr), addr

    def _expected(self, d: Decision) -> tuple[bytes | None, str | None]:
        """The bytes the plan writes at the site (None: not known here), or why not."""
        from ..plan.stage import CALL_LEN

        site = d.site
        if d.code is not None:
            return d.code, None
        b = d.branch
        if b is None:
            return None, None
        if self.o.is_relocatable:
            # The linker writes the displacement; the rewriter leaves the addend there
            # only where there is no explicit one (REL).
            disp = 0 if self.arch.uses_rela else -4
        else:
            assert site.address is not None
            where = self.thunk_at.get(b.symbol) if b.thunk is not None else None
            addr = where.address if where is not None else self.targets.get(b.symbol)
            if addr is None:
                return None, f"the plan's target {b.symbol} has no address here"
            disp = self.arch.signed(addr - (site.address + CALL_LEN))
            if not -(1 << 31) <= disp < 1 << 31:
                return None, f"the plan's target {b.symbol} is out of a rel32's reach"
        return b.encode(self.arch, (disp & 0xFFFFFFFF).to_bytes(4, "little")), None

    def _plan_problems(self, d: Decision, after: bytes, after_relocs: Sequence[Relocation],
                       relocs_after: Sequence[str], target: str | None,
                       target_addr: int | None) -> list[str]:
        site = d.site
        if not d.rewrites:
            return [f"the plan keeps this site ({d.reason}): nothing explains the change "
                    "(were other --backend/--ops options used to patch it?)"]
        out = []
        # The symbol the plan's branch names (the thunk's, through one).
        symbol = d.branch.symbol if d.branch is not None else None
        want, why = self._expected(d)
        if why is not None:
            out.append(why)
        elif want is not None and after != want:
            out.append(f"PATCHED holds {after.hex()}, the plan ({d.action}"
                       f"{' ' + symbol if symbol else ''}) writes {want.hex()}")
        if self.o.is_relocatable:
            have = sorted((r.offset - site.offset, self.arch.reloc_name(r.type),
                           self.psym.symbol_name(r), r.addend) for r in after_relocs)
            wanted = [] if d.code is not None else [
                (1, self.arch.reloc_name(self.arch.r_call), symbol or "?", -4)]
            if have != wanted:
                out.append(f"relocations in the site are {list(relocs_after) or 'none'}; "
                           f"the plan's {d.action} has "
                           + (f"+0x1 {wanted[0][1]} {wanted[0][2]}-0x4" if wanted else "none"))
        else:
            live = [r for r in relocs_after if not r.split()[1].endswith("_NONE")]
            if live:
                out.append(f"load-time relocations left inside the rewritten site: {live}")
        if symbol is not None and target is not None and target != symbol and not out:
            out.append(f"the site reaches {target}, the plan's {d.action} {symbol}")
        return out

    def _verdict_site(self, index: int, flags: list[str]) -> Verdict | None:
        if self.verify is None:
            return None
        v = self.verify.sites.get(index)
        if v is None:
            flags.append("the verify report has no verdict for this site")
        elif v.failed:
            flags.append(f"verify: {v.status}" + (f": {v.reason}" if v.reason else ""))
        return v

    # -- thunks ----------------------------------------------------------------------

    def _thunk(self, t: ThunkPlace) -> ThunkDiff:
        spec = self.specs.get(t.symbol)
        flags: list[str] = []
        key = (t.section, t.nth)
        pi = next((i for i, k in enumerate(self.pkeys) if k == key), None)
        code = b""
        insns: list[Insn] = []
        if pi is not None:
            psec = self.p.sections[pi]
            end = psec.offset + min(t.offset + t.size, psec.file_size)
            code = bytes(self.p.data[psec.offset + t.offset : end])
            insns = self.psym.insns(code, address=t.address, section_index=pi,
                                    offset=t.offset)
        if spec is None:
            flags.append("a thunk the plan does not make: nothing to prove it against")
        else:
            flags += self._thunk_problems(spec, t, pi, code)
        verdict = None
        if self.verify is not None:
            verdict = self.verify.thunks.get(t.symbol)
            if verdict is None:
                flags.append("the verify report has no verdict for this thunk")
            elif verdict.failed:
                flags.append(f"verify: {verdict.status}"
                             + (f": {verdict.reason}" if verdict.reason else ""))
        return ThunkDiff(t.symbol, spec.target if spec else None,
                         spec.saves if spec else (), t.section, t.offset, t.address, t.size,
                         tuple(insns), verdict, tuple(flags))

    def _thunk_problems(self, spec: ThunkSpec, t: ThunkPlace, pi: int | None,
                        code: bytes) -> list[str]:
        """The thunk's bytes against the plan's, its rel32 fields aside (the linker's or
        the addresses'); in relocatable files each field's relocation names its symbol."""
        from ..rewrite.thunk import planned_thunk_code

        try:
            want = planned_thunk_code(self.plan, spec)
        except PvpatchError as exc:
            return [f"the plan's thunk cannot be laid out here: {exc.message}"]
        if len(code) != len(want.code):
            return [f"{len(code)} bytes, the plan's thunk {len(want.code)}"]
        have, expect = bytearray(code), bytearray(want.code)
        for b in want.branches:
            have[b.field : b.field + 4] = expect[b.field : b.field + 4] = bytes(4)
        out = []
        if have != expect:
            out.append(f"bytes differ from the plan's thunk ({want.code.hex()})")
        if self.p.is_relocatable and pi is not None:
            relocs = {r.offset - t.offset: self.psym.symbol_name(r)
                      for r in self.psym.relocations(pi, t.offset, t.size)}
            named = {b.field: b.symbol for b in want.branches}
            if relocs != named:
                out.append(f"its relocations name {relocs or 'nothing'}, the plan's thunk "
                           f"{named}")
        return out

    # -- the table, sections, symbols, relocations, segments ----------------------------

    def _table_edits(self) -> tuple[EntryEdit, ...]:
        table = self.result.table
        if table is None:
            return ()
        stride = table.entry_size
        odata = self.o.section_data(table.section)
        pi = self.o2p.get(table.section.index)
        pdata = self.p.section_data(self.p.sections[pi]) if pi is not None else b""
        sites = {i: s for s in self.result.sites for i in s.entry_indices}
        alt = None
        if table.family == "altinstructions":
            from ..scan.altinstr import ALT_LAYOUTS

            alt = ALT_LAYOUTS.get(table.layout.name)
        out = []
        for c in self.acc.claims:
            m = _ENTRY_CLAIM.match(c.diff.what)
            if m is None or c.diff.section != table.section.name:
                continue
            i, edit = int(m[1]), m[2]
            was = now = None
            if alt is not None:
                (e,) = alt.entries(odata[i * stride : (i + 1) * stride])
                was = _feature_text(e.feature, e.flags)
                if edit == "neutralised" and len(pdata) == len(odata):
                    (n,) = alt.entries(pdata[i * stride : (i + 1) * stride])
                    now = _feature_text(n.feature, n.flags)
            else:
                s = sites.get(i)
                was = f"type {s.type} len {s.len} clobbers {s.clobbers:#x}" \
                    if s is not None else f"entry {i}"
            out.append(EntryEdit(i, "dropped" if edit == "dropped" else "neutralised",
                                 c.site, was, now))
        return tuple(sorted(out, key=lambda e: e.entry))

    def _sections_added(self) -> tuple[SectionInfo, ...]:
        out = []
        for sec, key in zip(self.p.sections, self.pkeys, strict=True):
            if key in self.okeys:
                continue
            out.append(SectionInfo(
                sec.name, _SECTION_TYPES.get(sec.type, f"{sec.type:#x}"),
                _flags_text(sec.flags, ((SHF_WRITE, "W"), (SHF_ALLOC, "A"),
                                        (SHF_EXECINSTR, "X"))),
                sec.size, sec.addr if not self.p.is_relocatable else None))
        return tuple(out)

    def _symbol_rows(self, elf: ElfFile) -> Counter[SymbolInfo]:
        rows: Counter[SymbolInfo] = Counter()
        for s in elf.symbols[1:]:
            if s.type == STT_SECTION:
                continue  # one per section: named with the sections
            if s.shndx == SHN_UNDEF:
                where = "UND"
            elif s.shndx == SHN_ABS:
                where = "ABS"
            elif s.defined and s.section_index < len(elf.sections):
                where = elf.sections[s.section_index].name
            else:
                where = f"{s.shndx:#x}"
            rows[SymbolInfo(s.name, _BINDS.get(s.bind, str(s.bind)),
                            _SYMBOL_TYPES.get(s.type, str(s.type)), where, s.value,
                            s.size)] += 1
        return rows

    @cached_property
    def _symbols(self) -> tuple[tuple[SymbolInfo, ...], tuple[SymbolInfo, ...]]:
        """Symbols only PATCHED has, and only ORIGINAL has (a label in a table whose
        entries were dropped is both: it moved)."""
        if not any(n.kind == "symbols" for n in self.acc.sections):
            return (), ()  # .symtab did not change
        a, b = self._symbol_rows(self.o), self._symbol_rows(self.p)
        return tuple((b - a).elements()), tuple((a - b).elements())

    def _reloc_rows(self, elf: ElfFile, relsec_index: int) -> Counter[tuple[int, str, str, int]]:
        from .symbolic import Symboliser

        sym = self.osym if elf is self.o else self.psym
        assert isinstance(sym, Symboliser)
        rows: Counter[tuple[int, str, str, int]] = Counter()
        for r in elf.relocations(elf.sections[relsec_index]):
            rows[(r.offset, self.arch.reloc_name(r.type), sym.symbol_name(r), r.addend)] += 1
        return rows

    def _relocations(self, sites: Sequence[SiteDiff]) -> tuple[RelocChange, ...]:
        """Relocation rows PATCHED adds or removes outside the changed sites (shown with
        each site) and the table's own (they follow its entries)."""
        if not self.o.is_relocatable:
            return ()
        changed = {n.section for n in self.acc.sections
                   if n.kind in ("relocations", "symbols")}
        if not changed:
            return ()
        table = self.result.table
        p2o = {j: i for i, j in self.o2p.items()}
        spans: dict[str, list[tuple[int, int]]] = {}
        for s in sites:
            spans.setdefault(s.section, []).append((s.offset, s.offset + s.len))
        out = []
        for sec in self.p.sections:
            if sec.type not in (SHT_REL, SHT_RELA) or sec.is_alloc \
                    or not 0 < sec.info < len(self.p.sections):
                continue
            target = self.p.sections[sec.info]
            oi = p2o.get(sec.index)
            if table is not None and p2o.get(target.index) == table.section.index:
                continue
            after = self._reloc_rows(self.p, sec.index)
            before = self._reloc_rows(self.o, oi) if oi is not None else Counter()
            inside = spans.get(target.name, [])
            for how, rows in (("removed", before - after), ("added", after - before)):
                for off, rtype, name, addend in sorted(rows.elements()):
                    if any(lo <= off < hi for lo, hi in inside):
                        continue
                    out.append(RelocChange("removed" if how == "removed" else "added",
                                           target.name, off, rtype, name, addend))
        return tuple(out)

    def _segments(self) -> tuple[SegmentInfo, ...]:
        extra = self.p.segments[len(self.o.segments) :]
        return tuple(SegmentInfo(_SEGMENT_TYPES.get(s.type, f"{s.type:#x}"),
                                 _flags_text(s.flags, ((PF_R, "R"), (PF_W, "W"), (PF_X, "E"))),
                                 s.offset, s.vaddr, s.filesz, s.memsz) for s in extra)


def diff_loaded(result: ScanResult, patched: ElfFile, backend: str | Backend = "native", *,
                verify: VerifyDoc | None = None, rel: str = "") -> FileDiff:
    """Compare a scanned ORIGINAL with an opened PATCHED (see the module docstring)."""
    return _PairDiff(result, patched, backend, verify, rel).run()


def diff_pair(original: str | os.PathLike[str], patched: str | os.PathLike[str], *,
              backend: str = "native", ops: str = "auto", layout: str = "auto",
              section: str = DEFAULT_SECTION, verify: VerifyDoc | None = None,
              max_decompressed: int = MAX_DECOMPRESSED) -> FileDiff:
    """Compare two files (compressed ones are read decompressed)."""
    from ..api import load, open_elf

    result = load(original, layout=layout, section=section, ops=ops,
                  max_decompressed=max_decompressed)
    return diff_loaded(result, open_elf(patched, max_decompressed=max_decompressed),
                       backend, verify=verify)


# -- trees -------------------------------------------------------------------------------


@record
class _Options:
    """The options every pair of a tree is compared with (`diff_pair`'s)."""

    backend: str
    ops: str
    layout: str
    section: str
    max_decompressed: int


@record
class _Pair:
    """Two files at the same relative path (`rel`) of the trees, and the verify report matched
    to them."""

    original: str
    patched: str
    rel: str
    verify: VerifyDoc | None = None


@record
class _Outcome:
    """What `_diff_job` made of one pair (picklable: it comes back from worker processes):
    "skipped" when ORIGINAL is not x86 ELF; "bad": `error` says why it could not be compared."""

    status: Literal["diffed", "skipped", "bad"]
    diff: FileDiff | None = None
    error: str | None = None


def _diff_job(options: _Options, pair: _Pair) -> _Outcome:
    """One pair of a tree: files that are not x86 ELF are skipped, a bad one is its
    error (the others go on)."""
    from ..batch import read_payload
    from ..check import backend_for, scan_for
    from ..elf.reader import elf_kind

    try:
        data, compression = read_payload(pair.original, options.max_decompressed)
        if elf_kind(data) != "x86":
            return _Outcome("skipped")
        elf = ElfFile(data, pair.original, compression=compression)
        result = scan_for(elf, layout=options.layout, section=options.section,
                          ops=options.ops)
        pdata, pcomp = read_payload(pair.patched, options.max_decompressed)
        patched = ElfFile(pdata, pair.patched, compression=pcomp)
        backend = backend_for(options.backend, elf.arch.name)
        return _Outcome("diffed", diff_loaded(result, patched, backend, verify=pair.verify,
                                              rel=pair.rel))
    except UsageError:
        raise
    except PvpatchError as exc:
        return _Outcome("bad", error=str(exc))


def _files(top: str) -> tuple[dict[str, str], int]:
    """Relative path -> path of every regular file below `top` that may be ELF (plain or
    compressed), walked as every tree command walks; and how many other files there are."""
    from ..batch import expand
    from ..elf.compress import MAGIC_MAX, detect

    out = {}
    others = 0
    for f in expand([top]).files:
        try:
            with open(f.path, "rb") as fh:
                head = fh.read(MAGIC_MAX)
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", f.path) from None
        if head.startswith(b"\x7fELF") or detect(head) is not None:
            out[f.rel] = f.path
        else:
            others += 1
    return out, others


def _kind(path: str, limit: int) -> str:
    """"x86" or "other" for a file of a tree, or why it cannot be read."""
    from ..batch import read_payload
    from ..elf.reader import elf_kind

    try:
        data, _compression = read_payload(path, limit)
    except PvpatchError as exc:
        return str(exc)
    return "x86" if elf_kind(data) == "x86" else "other"


def diff_files(original: str | os.PathLike[str], patched: str | os.PathLike[str], *,
               backend: str = "native", ops: str = "auto", layout: str = "auto",
               section: str = DEFAULT_SECTION, verify: Any = None,
               max_decompressed: int = MAX_DECOMPRESSED, jobs: int = 1,
               on_done: Callable[[int, str], None] | None = None) -> DiffReport:
    """Compare ORIGINAL with PATCHED: two files, or two trees whose files are paired by
    relative path (every core with `jobs`; `on_done(n, path)` as pairs finish).

    `verify`: a parsed JSON document of `pvpatch verify --json` (one pair) or
    `pvpatch patch --json` (one file or a tree); its verdicts are matched to the sites.
    Bad input (a missing path, a file and a directory, a report that is not one) raises;
    in a tree, a pair that cannot be compared is its error in `errors`."""
    orig, pat = os.fspath(original), os.fspath(patched)
    for path in (orig, pat):
        if not os.path.exists(path):
            raise InputError("no such file or directory", path)
    reports = verify_reports(verify) if verify is not None else ()
    options = _Options(backend, ops, layout, section, max_decompressed)
    if not os.path.isdir(orig) and not os.path.isdir(pat):
        report = match_report(reports, orig) if reports else None
        if reports and report is None:
            raise InputError(f"the verify report names no file matching {orig}")
        one = diff_pair(orig, pat, backend=backend, ops=ops, layout=layout, section=section,
                        verify=report, max_decompressed=max_decompressed)
        if on_done is not None:
            on_done(1, orig)
        return DiffReport(orig, pat, False, (one,))
    if os.path.isdir(orig) != os.path.isdir(pat):
        raise UsageError("ORIGINAL and PATCHED must both be files or both be directories")
    if any(r.input is None for r in reports):
        raise UsageError("a `pvpatch verify --json` report names no file: give it with one "
                         "pair of files, or give the JSON of `pvpatch patch DIR --json`")
    (ofiles, others), (pfiles, _) = _files(orig), _files(pat)
    if not ofiles:
        raise InputError("is a directory without ELF files", orig)
    pairs = [_Pair(path, pfiles[rel], rel, match_report(reports, path, rel, single=False))
             for rel, path in ofiles.items() if rel in pfiles]
    unpaired: list[Unpaired] = []
    errors: list[str] = []
    skipped = others
    # A file alone in one tree is flagged when it is x86 ELF (`patch DIR` writes every
    # such file, and no other).
    for alone, missing_in in ((set(ofiles) - set(pfiles), "patched"),
                              (set(pfiles) - set(ofiles), "original")):
        for rel in sorted(alone):
            path = (ofiles if missing_in == "patched" else pfiles)[rel]
            kind = _kind(path, max_decompressed)
            if kind == "x86":
                unpaired.append(Unpaired(path, "patched" if missing_in == "patched"
                                         else "original"))
            elif kind != "other":
                errors.append(kind)
            elif missing_in == "patched":
                skipped += 1
    from functools import partial

    from ..batch import run_ordered

    files: list[FileDiff] = []

    def done(n: int, pair: _Pair) -> None:
        if on_done is not None:
            on_done(n, pair.original)

    for out in run_ordered(partial(_diff_job, options), pairs, jobs=jobs, on_done=done):
        if out.status == "skipped":
            skipped += 1
        elif out.status == "bad":
            errors.append(out.error or "?")
        elif out.diff is not None:
            files.append(out.diff)
    return DiffReport(orig, pat, True, tuple(files), tuple(unpaired), tuple(errors), skipped)


# -- reports -----------------------------------------------------------------------------


def _insns_json(insns: Iterable[Insn]) -> list[str]:
    return [i.text for i in insns]


def _verdict_json(v: Verdict | None) -> dict[str, Any] | None:
    if v is None:
        return None
    return {"status": v.status, "reason": v.reason, "allowed": v.allowed}


def file_json(f: FileDiff) -> dict[str, Any]:
    return {
        "original": f.original,
        "patched": f.patched,
        "path": f.rel or None,
        "arch": f.arch,
        "elf_type": f.elf_type,
        "table": None if f.table is None else {"section": f.table, "family": f.family,
                                                "layout": f.layout},
        "ops": f.ops,
        "backend": f.backend,
        "sites": [{
            "index": s.index, "section": s.section, "offset": s.offset,
            "address": s.address, "file_offset": s.file_offset, "op": s.op,
            "type": s.type, "len": s.len, "entries": list(s.entries),
            "action": s.action, "target": s.target,
            "plan": {"action": s.planned, "reason": s.reason},
            "before": s.before.hex(), "after": s.after.hex(),
            "before_insns": _insns_json(s.before_insns),
            "after_insns": _insns_json(s.after_insns),
            "relocations_before": list(s.relocs_before),
            "relocations_after": list(s.relocs_after),
            "verdict": _verdict_json(s.verdict), "flags": list(s.flags),
        } for s in f.sites],
        "thunks": [{
            "symbol": t.symbol, "target": t.target, "saves": list(t.saves),
            "section": t.section, "offset": t.offset, "address": t.address, "size": t.size,
            "insns": _insns_json(t.insns), "verdict": _verdict_json(t.verdict),
            "flags": list(t.flags),
        } for t in f.thunks],
        "table_edits": [{"entry": e.entry, "edit": e.edit, "site": e.site, "was": e.was,
                         "now": e.now} for e in f.table_edits],
        "sections_added": [{"name": s.name, "type": s.type, "flags": s.flags,
                            "size": s.size, "address": s.address} for s in f.sections_added],
        "sections_changed": [{"section": n.section, "kind": n.kind, "rule": n.rule}
                             for n in f.sections_changed],
        "symbols_added": [_symbol_json(s) for s in f.symbols_added],
        "symbols_removed": [_symbol_json(s) for s in f.symbols_removed],
        "relocations": [{"how": r.how, "section": r.section, "offset": r.offset,
                         "type": r.type, "symbol": r.symbol, "addend": r.addend}
                        for r in f.relocations],
        "segments_added": [{"type": s.type, "flags": s.flags, "offset": s.offset,
                            "vaddr": s.vaddr, "filesz": s.filesz, "memsz": s.memsz}
                           for s in f.segments_added],
        "signature": f.signature,
        "flagged": [{"what": d.what, "section": d.section, "offset": d.offset,
                     "file_offset": d.file_offset, "length": d.length} for d in f.flagged],
        "omitted": f.omitted,
        "counts": f.counts(),
        "verified": f.verified,
        "total_sites": f.total_sites,
        "ok": f.ok,
    }


def _symbol_json(s: SymbolInfo) -> dict[str, Any]:
    return {"name": s.name, "bind": s.bind, "type": s.type, "section": s.section,
            "value": s.value, "size": s.size}


def diff_json(report: DiffReport) -> dict[str, Any]:
    """The `pvpatch diff --json` document (its shape is in the README)."""
    return {
        "original": report.original,
        "patched": report.patched,
        "tree": report.tree,
        "files": [file_json(f) for f in report.files],
        "unpaired": [{"path": u.path, "missing_in": u.missing_in} for u in report.unpaired],
        "errors": list(report.errors),
        "summary": {
            "files": len(report.files),
            "changed_files": sum(1 for f in report.files if not f.identical),
            "skipped": report.skipped,
            "sites": sum(len(f.sites) for f in report.files),
            "thunks": sum(len(f.thunks) for f in report.files),
            "actions": report.counts(),
            "by_op": [{"action": a, "op": op, "count": n}
                      for (a, op), n in sorted(report.by_op().items())],
            "flagged": report.problems,
            "ok": report.ok,
        },
    }


def _side_by_side(left: Sequence[str], right: Sequence[str], indent: str) -> list[str]:
    width = max((len(t) for t in left), default=0)
    width = max(width, 24)
    out = []
    for k in range(max(len(left), len(right))):
        a = left[k] if k < len(left) else ""
        b = right[k] if k < len(right) else ""
        out.append(f"{indent}{a:<{width}}  | {b}".rstrip())
    return out


def flagged_text(n: int) -> str:
    return f"{n} difference{'' if n == 1 else 's'}"


def _where(d: Difference) -> str:
    return d.where()


def _ranges(values: Sequence[int]) -> str:
    """`0-19, 22, 25-28`."""
    out: list[str] = []
    run: list[int] = []
    for v in sorted(values):
        if run and v == run[-1] + 1:
            run.append(v)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [v]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def file_text(f: FileDiff) -> list[str]:
    counts = f.counts()
    head = f"{f.original} -> {f.patched}: {f.arch} {f.elf_type}"
    if f.table is not None:
        head += f", {f.table}"
    if f.identical:
        return [head + ": identical"]
    acts = ", ".join(f"{counts[a]} {a}" for a in ACTIONS if counts.get(a))
    head += f", {len(f.sites)} of {f.total_sites} sites changed" + (f" ({acts})" if acts else "")
    head += f", backend {f.backend}" + (f", ops from {f.ops}" if f.ops else "")
    lines = [head]
    # What nothing explains comes first: it is what a reviewer must see.
    for d in f.flagged:
        lines.append(f"  FLAGGED {_where(d)}: {d.what}")
    if f.omitted:
        lines.append(f"  FLAGGED ... and {f.omitted} more")
    for s in f.sites:
        plan = s.planned if s.planned == s.action else f"{s.planned}, bytes are {s.action}"
        lines.append(f"  site {s.index} {s.where} {s.op or f'type {s.type}'}: {s.action}"
                     + (f" {s.target}" if s.target and s.action != "inline" else "")
                     + f" (plan: {plan}{'; ' + s.reason if s.reason else ''})"
                     + (f" [verify: {s.verdict.status}]" if s.verdict else ""))
        left = [i.text for i in s.before_insns] + [f"  {r}" for r in s.relocs_before]
        right = [i.text for i in s.after_insns] + [f"  {r}" for r in s.relocs_after]
        lines.extend(_side_by_side(left, right, "      "))
        for why in s.flags:
            lines.append(f"    FLAGGED: {why}")
    for t in f.thunks:
        where = f"{t.address:#x}" if t.address is not None else f"{t.section}+{t.offset:#x}"
        lines.append(f"  thunk {t.symbol} at {where} ({t.size} bytes): "
                     + (f"calls {t.target}, saves {', '.join(t.saves) or 'nothing'}"
                        if t.target else "not the plan's")
                     + (f" [verify: {t.verdict.status}]" if t.verdict else ""))
        lines.extend(f"      {i.text}" for i in t.insns)
        for why in t.flags:
            lines.append(f"    FLAGGED: {why}")
    # One line per kind of edit (a vmlinux has thousands): the entries as ranges.
    groups: dict[tuple[str, str, str | None], list[int]] = {}
    for e in f.table_edits:
        groups.setdefault((e.edit, e.was if e.now else "", e.now), []).append(e.entry)
    for (edit, was, now), entries in groups.items():
        change = f" {was} -> {now}" if now else ""
        lines.append(f"  table: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} "
                     f"{edit}{change}: {_ranges(entries)}")
    for sec in f.sections_added:
        at = f" at {sec.address:#x}" if sec.address is not None else ""
        lines.append(f"  section added: {sec.name} ({sec.type} {sec.flags or '-'}, "
                     f"{sec.size} bytes{at})")
    for seg in f.segments_added:
        lines.append(f"  segment added: {seg.type} {seg.flags} offset {seg.offset:#x} vaddr "
                     f"{seg.vaddr:#x} filesz {seg.filesz:#x} memsz {seg.memsz:#x}")
    for sym in f.symbols_added:
        lines.append(f"  symbol added: {sym.name} ({sym.bind} {sym.type}, {sym.section}"
                     + (f"+{sym.value:#x}, {sym.size} bytes)" if sym.section != "UND" else ")"))
    for sym in f.symbols_removed:
        lines.append(f"  symbol removed: {sym.name} ({sym.bind} {sym.type}, {sym.section}"
                     f"+{sym.value:#x})")
    for r in f.relocations:
        from .symbolic import plus

        lines.append(f"  relocation {r.how}: {r.section}+{r.offset:#x} {r.type} "
                     f"{plus(r.symbol, r.addend)}")
    if f.signature:
        lines.append(f"  module signature {f.signature}")
    if f.sections_changed:
        lines.append("  sections changed: " + ", ".join(f"{n.section} ({n.kind})"
                                                        for n in f.sections_changed))
    lines.append("  " + (f"FLAGGED: {flagged_text(f.problems)} not accounted for"
                         if f.problems else "every difference accounted for"))
    return lines


def diff_text(report: DiffReport) -> list[str]:
    """The text report: each pair, then (for trees) a summary line."""
    lines: list[str] = []
    for f in report.files:
        if report.tree and f.identical:
            continue
        lines.extend(file_text(f))
    for u in report.unpaired:
        lines.append(f"FLAGGED {u.path}: no counterpart in {u.missing_in.upper()}")
    if report.tree:
        counts = report.counts()
        acts = ", ".join(f"{counts[a]} {a}" for a in ACTIONS if counts.get(a)) or "none"
        changed = sum(1 for f in report.files if not f.identical)
        lines.append(f"pvpatch diff: {len(report.files)} ELF file pairs ({changed} changed, "
                     f"{report.skipped} other files skipped), "
                     f"{sum(len(f.sites) for f in report.files)} sites ({acts}); "
                     + (f"{flagged_text(report.problems)} flagged" if report.problems
                        else "every difference accounted for")
                     + (f"; {len(report.errors)} errors" if report.errors else ""))
    return lines


__all__ = [
    "DiffReport", "EntryEdit", "FileDiff", "RelocChange", "SectionInfo", "SegmentInfo",
    "SiteDiff", "SymbolInfo", "ThunkDiff", "Unpaired", "Verdict", "VerifyDoc",
    "diff_files", "diff_json", "diff_loaded", "diff_pair", "diff_text", "verify_reports",
]
