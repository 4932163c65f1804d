"""Byte accounting: every byte that differs between ORIGINAL and PATCHED is explained.

Emulation proves sites and thunks; this module says *which* sites and thunks there
are to prove (from what differs, not from a plan re-made from the original) and
explains every other difference by a positive rule of what pvpatch writes
(pvpatch/rewrite/stage.py).  Sections are paired by name (and occurrence), never by file
offset, and each kind of section has one rule (`KINDS`):

- code: bytes differ only inside sites; each such site is to be proven;
- the site table: entries kept, neutralised (the family's feature-word edit) or
  dropped, each at a site that is proven (or already in its planned form);
- relocations: differences only inside sites (or thunks) that are proven, or labels
  into the table that follow dropped entries;
- symbols: the original symbols kept (locals before globals, new thunk symbols
  between), new undefined globals; string tables only grow; `__versions` gains the
  new imports; groups gain the new relocation sections;
- linked files: load-time relocations inside proven sites become R_*_NONE (RELR
  entries dropped, DT_RELCOUNT/DT_RELRSZ follow), one new R+X PT_LOAD holds the
  program headers and the thunks;
- everything else is identical; moved sections leave zeros; a module signature may
  be removed or replaced.

A difference no rule explains is a `Difference` naming section+offset and file
offset; one that a proof explains is a `Claim`, settled once the verdicts are in.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ..elf.reader import (
    PF_R,
    PF_X,
    PT_LOAD,
    PT_PHDR,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_GROUP,
    SHF_INFO_LINK,
    SHN_UNDEF,
    SHT_GROUP,
    SHT_NOBITS,
    SHT_PROGBITS,
    SHT_REL,
    SHT_RELA,
    SHT_RELR,
    SHT_STRTAB,
    SHT_SYMTAB,
    SHT_SYMTAB_SHNDX,
    STB_GLOBAL,
    STB_LOCAL,
    STT_FUNC,
    STT_SECTION,
    Buffer,
    ElfFile,
    Section,
    Symbol,
)
from ..elf.writer import DT_REL, DT_RELA, DT_RELACOUNT, DT_RELCOUNT, DT_RELRSZ, dynamic_entries
from ..record import record
from ..rewrite.modversions import MODULE_NAME_LEN
from ..scan.altinstr import SECTION as ALT_SECTION

if TYPE_CHECKING:
    from ..plan.stage import Plan
    from ..rewrite.unwind import ThunkFrame
    from ..scan.sites import Site

MAX_LISTED = 200  # differences kept per file: past this, one line says how many more
SHT_DYNAMIC = 6
NEW_SYMBOL = 1 << 40  # a patched symbol with no original counterpart, in relocation keys
PAGE = 0x1000
# objtool's lists of instructions (s32 self-relative entries, one PC32 relocation each)
# that pvpatch appends to when a thunk's return must be listed (CONFIG_RETHUNK).
SITE_LISTS = (".return_sites",)
SITE_LIST_ENTRY = 4
RETURN_JMP = 0xE9  # what a listed return is: jmp __x86_return_thunk
# Call-frame information pvpatch extends (pvpatch/rewrite/unwind.py), and the program header
# that names the lookup table.
EH_FRAME, EH_FRAME_HDR = ".eh_frame", ".eh_frame_hdr"
UNWIND_SECTIONS = (EH_FRAME, EH_FRAME_HDR)
PT_GNU_EH_FRAME = 0x6474E550
ORC_UNWIND, ORC_UNWIND_IP, ORC_HEADER = ".orc_unwind", ".orc_unwind_ip", ".orc_header"
ORC_SECTIONS = (ORC_UNWIND, ORC_UNWIND_IP)


@record
class Difference:
    """Bytes of PATCHED that no proof and no rule accounts for."""

    what: str
    section: str | None = None
    offset: int | None = None  # in the section
    file_offset: int | None = None  # in PATCHED
    length: int = 0

    def where(self) -> str:
        parts = []
        if self.section is not None:
            parts.append(self.section + (f"+{self.offset:#x}" if self.offset is not None
                                         else ""))
        if self.file_offset is not None:
            parts.append(f"file offset {self.file_offset:#x}")
        return ", ".join(parts) or "the file"


@record
class Claim:
    """A difference accounted for once the site (or thunk) it belongs to is proven."""

    diff: Difference
    site: int | None = None
    thunk: str | None = None


@record
class SectionNote:
    """A section of PATCHED that differs, and the rule that accounted for it."""

    section: str
    kind: str
    rule: str


@record
class ThunkPlace:
    """A thunk found in PATCHED: (section name, occurrence) + offset, its size."""

    symbol: str
    section: str
    nth: int
    offset: int
    size: int
    address: int | None = None


@record
class Accounting:
    """What the byte accounting of one file pair found: the sites and thunks to prove, the
    differences their proofs account for (`claims`), those no rule explains (`problems`),
    and each changed section with the rule that accounted for it."""

    changed_sites: tuple[int, ...]  # site indices whose bytes or relocations differ
    thunks: tuple[ThunkPlace, ...]  # new thunks in PATCHED
    claims: tuple[Claim, ...]
    problems: tuple[Difference, ...]
    sections: tuple[SectionNote, ...]
    already: frozenset[int] = frozenset()  # unchanged sites already in their planned form
    omitted: int = 0  # problems past MAX_LISTED

    def unaccounted(self, sites: Mapping[int, str],
                    thunks: Mapping[str, str]) -> tuple[Difference, ...]:
        """The problems, and every claim whose proof is missing.  `sites`/`thunks`: the
        verdict of each site and thunk emulated.  A claim on a site that failed (or was
        skipped) is not repeated: that site's verdict already says it is unproven."""
        out = list(self.problems)
        for c in self.claims:
            status = sites.get(c.site) if c.site is not None else \
                thunks.get(c.thunk or "")
            if status is not None or (c.site is not None and c.site in self.already):
                continue
            who = f"site {c.site}" if c.site is not None else f"thunk {c.thunk}"
            out.append(replace(c.diff, what=f"{c.diff.what}, but {who} is not proven "
                               "(unchanged, or not in the patched file)"))
        return tuple(out)


# -- helpers ---------------------------------------------------------------------------


def diff_runs(a: bytes, b: bytes, limit: int = 8) -> list[tuple[int, int]]:
    """(start, end) of up to `limit` runs where two buffers differ (past the shorter
    one's end counts as different)."""
    n = min(len(a), len(b))
    out: list[tuple[int, int]] = []
    step = 4096
    i = 0
    while i < n and len(out) < limit:
        end = min(i + step, n)
        if a[i:end] == b[i:end]:
            i = end
            continue
        k = i
        while k < end and len(out) < limit:
            if a[k] != b[k]:
                start = k
                while k < end and a[k] != b[k]:
                    k += 1
                if out and out[-1][1] == start:
                    out[-1] = (out[-1][0], k)
                else:
                    out.append((start, k))
            else:
                k += 1
        i = end
    if len(a) != len(b) and len(out) < limit:
        out.append((n, max(len(a), len(b))))
    return out


def _differences(a: Sequence[tuple[int, ...]], b: Sequence[tuple[int, ...]]
                 ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Rows only in `a`, rows only in `b`, as multisets (order does not matter to a
    linker or loader).  Set differences run in C; a Counter only when rows repeat."""
    sa, sb = set(a), set(b)
    if len(sa) == len(a) and len(sb) == len(b):
        return list(sa - sb), list(sb - sa)
    ca, cb = Counter(a), Counter(b)
    return list((ca - cb).elements()), list((cb - ca).elements())


def _offsets(data: bytes, size: int, word: int) -> list[int] | None:
    """The r_offset of each relocation row (the first word), at C speed."""
    if len(data) % size or size % word:
        return None
    return memoryview(data).cast("Q" if word == 8 else "I")[:: size // word].tolist()


def _walk(a: bytes, b: bytes, size: int, word: int) -> tuple[list[bytes], list[bytes]] | None:
    """Rows only in `a`, rows only in `b`, for two relocation sections both sorted by
    offset (as compilers write them and pvpatch keeps them): equal stretches are skipped
    at memcmp speed, so only the rows that differ are looked at.  None when a section is
    not sorted (then every row is compared)."""
    oa, ob = _offsets(a, size, word), _offsets(b, size, word)
    if oa is None or ob is None or oa != sorted(oa) or ob != sorted(ob):
        return None
    removed: list[bytes] = []
    added: list[bytes] = []
    i = j = 0
    while i < len(oa) and j < len(ob):
        # the longest common run from here: galloping, then halving
        step, same = 1, 0
        while i + same + step <= len(oa) and j + same + step <= len(ob) and \
                a[(i + same) * size : (i + same + step) * size] == \
                b[(j + same) * size : (j + same + step) * size]:
            same += step
            step *= 2
        while step > 1:
            step //= 2
            if i + same + step <= len(oa) and j + same + step <= len(ob) and \
                    a[(i + same) * size : (i + same + step) * size] == \
                    b[(j + same) * size : (j + same + step) * size]:
                same += step
        i, j = i + same, j + same
        if i >= len(oa) or j >= len(ob):
            break
        # the lower offset is the row only that side has; equal offsets: a row changed
        take_a, take_b = oa[i] <= ob[j], ob[j] <= oa[i]
        if take_a:
            removed.append(a[i * size : (i + 1) * size])
            i += 1
        if take_b:
            added.append(b[j * size : (j + 1) * size])
            j += 1
    removed += [a[k * size : (k + 1) * size] for k in range(i, len(oa))]
    added += [b[k * size : (k + 1) * size] for k in range(j, len(ob))]
    # The stretches skipped are identical pairs, so what differs as multisets is what is
    # left (a row that only moved within one offset is no difference).
    left, right = Counter(removed), Counter(added)
    return list((left - right).elements()), list((right - left).elements())


_NONZERO = bytes([0] + [1] * 255)


def _not_zeroed(was: bytes, now: bytes) -> bytes:
    """1 where a byte of `now` is neither `was`'s byte nor zero, else 0 (computed at C
    speed, as big integers)."""
    changed = (int.from_bytes(was, "little") ^ int.from_bytes(now, "little")).to_bytes(
        len(was), "little")
    return (int.from_bytes(changed.translate(_NONZERO), "little")
            & int.from_bytes(now.translate(_NONZERO), "little")).to_bytes(len(was), "little")


def _hexes(data: bytes, limit: int = 8) -> str:
    return data[:limit].hex(" ") + (" ..." if len(data) > limit else "")


def _same_header(o: Section, p: Section) -> bool:
    """Every header field but the file offset (moving a section changes nothing)."""
    return (o.name, o.type, o.flags, o.addr, o.size, o.link, o.info, o.addralign,
            o.entsize) == (p.name, p.type, p.flags, p.addr, p.size, p.link, p.info,
                           p.addralign, p.entsize)


def _keys(elf: ElfFile) -> list[tuple[str, int]]:
    """Each section's (name, occurrence among sections of that name)."""
    seen: dict[str, int] = {}
    out = []
    for sec in elf.sections:
        k = seen.get(sec.name, 0)
        seen[sec.name] = k + 1
        out.append((sec.name, k))
    return out


# -- section kinds: how a difference in each is accounted for ---------------------------


@record
class Kind:
    """A kind of section and the one rule a difference in it is accounted for by: `account`
    checks a section of PATCHED against ORIGINAL's (None when PATCHED added it)."""

    name: str
    rule: str  # shown in the report
    resizable: bool  # its size may change
    phase: int  # symbols before relocations before code before the table before the rest
    account: Callable[[_Accountant, Section | None, Section], None]
    may_be_new: bool = False  # a section PATCHED may add


def _is_rel(sec: Section) -> bool:
    return sec.type in (SHT_REL, SHT_RELA)


# (predicate on (accountant, file, section), kind): the first that matches wins.
def _kinds() -> tuple[tuple[Callable[[_Accountant, ElfFile, Section], bool], Kind], ...]:
    A = _Accountant
    return (
        (lambda a, e, s: s.index == 0,
         Kind("null", "section 0: only extended numbering changes", True, 9, A.nothing)),
        (lambda a, e, s: s.type == SHT_SYMTAB,
         Kind("symbols", "original symbols kept; new thunk symbols and undefined call "
              "targets added; indices remapped", True, 0, A.symbols)),
        (lambda a, e, s: s.type == SHT_SYMTAB_SHNDX,
         Kind("symbol indices", "extends .symtab: checked with the symbols", True, 1,
              A.symbol_indices, may_be_new=True)),
        (lambda a, e, s: _is_rel(s) and not s.is_alloc and a.is_table(e, s.info),
         Kind("table relocations", "follow their entries (kept, or dropped with them)", True,
              1, A.table_relocations)),
        (lambda a, e, s: _is_rel(s) and not s.is_alloc and
         a.is_alternatives(e, e.sections[s.info] if 0 < s.info < len(e.sections) else s),
         Kind("alternatives relocations", "follow their entries (kept, or dropped with "
              "them)", True, 1, A.alternatives_relocations)),
        (lambda a, e, s: _is_rel(s) and not s.is_alloc,
         Kind("relocations", "differ only inside proven sites and thunks, in entries listing "
              "thunk returns, or follow what they point at in the table", True, 2,
              A.relocations, may_be_new=True)),
        (lambda a, e, s: _is_rel(s) and s.is_alloc,
         Kind("load-time relocations", "entries inside proven sites made R_*_NONE", False, 3,
              A.dynamic_relocations)),
        (lambda a, e, s: s.type == SHT_RELR,
         Kind("packed relocations", "entries inside proven sites dropped, re-encoded", True,
              3, A.relr)),
        (lambda a, e, s: s.type == SHT_DYNAMIC,
         Kind("dynamic", "only DT_RELCOUNT, DT_RELACOUNT and DT_RELRSZ follow the "
              "relocations", False, 4, A.dynamic)),
        (lambda a, e, s: a.is_table(e, s.index),
         Kind("site table", "entries kept, neutralised or dropped at proven sites", True, 1,
              A.table)),
        (lambda a, e, s: a.is_alternatives(e, s),
         Kind("alternatives", "entries at proven sites neutralised (NOT X86_FEATURE_ALWAYS, "
              "--final)", True, 1, A.alternatives)),
        (lambda a, e, s: s.type == SHT_STRTAB,
         Kind("strings", "original strings kept, names appended", True, 4, A.strings)),
        (lambda a, e, s: s.name == "__versions",
         Kind("symbol versions", "entries appended for new imports", True, 4, A.versions)),
        (lambda a, e, s: s.type == SHT_GROUP,
         Kind("group", "members appended: new relocation sections of its members", True, 4,
              A.group)),
        (lambda a, e, s: s.name in SITE_LISTS and s.type != SHT_NOBITS,
         Kind("site list", "entries appended, each listing the return of a proven thunk",
              True, 4, A.site_list, may_be_new=True)),
        (lambda a, e, s: s.name in ORC_SECTIONS and s.type != SHT_NOBITS and e.is_relocatable,
         Kind("orc", "old entries kept; an ORC entry per change of a new thunk's stack and a "
              "terminator after it, as pvpatch describes the stack", True, 6, A.orc_tables)),
        (lambda a, e, s: s.name in UNWIND_SECTIONS and s.type != SHT_NOBITS,
         Kind("unwind", "old entries kept (moved whole in a linked file, pc-relative "
              "pointers rebased); a CIE and an FDE per new thunk, as pvpatch describes its "
              "stack; a lookup table over them all", True, 6, A.unwind_tables)),
        (lambda a, e, s: a.is_thunk_section(e, s),
         Kind("thunks", "thunks proven by emulation, zero padding", False, 5, A.thunks,
              may_be_new=True)),
        (lambda a, e, s: s.is_exec and s.type != SHT_NOBITS,
         Kind("code", "differs only inside proven sites (and references into the table "
              "that follow dropped entries)", False, 3, A.code)),
        (lambda a, e, s: True,
         Kind("other", "identical (but references into the table that follow dropped "
              "entries)", False, 4, A.identical)),
    )


class _Accountant:
    def __init__(self, plan: Plan, patched: ElfFile) -> None:
        self.plan = plan
        self.scan = plan.scan
        self.o = plan.scan.elf
        self.p = patched
        self.thunk_name = plan.backend.thunk_section
        self.problems: list[Difference] = []
        self.omitted = 0
        self.claims: list[Claim] = []
        self.notes: list[SectionNote] = []
        self.changed: set[int] = set()
        self.thunk_places: list[ThunkPlace] = []
        ok, pk = _keys(self.o), _keys(self.p)
        by_key = {k: i for i, k in enumerate(ok)}
        self.p2o: dict[int, int] = {j: by_key[k] for j, k in enumerate(pk) if k in by_key}
        self.o2p: dict[int, int] = {i: j for j, i in self.p2o.items()}
        self.pkeys = pk
        # sites by original section, sorted by offset; sites by address (linked files)
        self.sites: dict[int, Site] = {s.index: s for s in self.scan.sites}
        by_sec: dict[int, list[Site]] = {}
        for s in self.scan.sites:
            by_sec.setdefault(s.section_index, []).append(s)
        self.by_sec = {k: sorted(v, key=lambda s: s.offset) for k, v in by_sec.items()}
        self.starts = {k: [s.offset for s in v] for k, v in self.by_sec.items()}
        # Several entries may name one address (duplicates, lies): sorted by key alone.
        linked = sorted((s for s in self.scan.sites if s.address is not None),
                        key=lambda s: (s.address, s.index))
        self.by_addr = linked
        self.addr_starts = [s.address for s in linked if s.address is not None]
        self.entry_site: dict[int, int] = {}
        for s in self.scan.sites:
            for j in s.entry_indices:
                self.entry_site.setdefault(j, s.index)
        # symbol mapping, PATCHED index -> ORIGINAL index (-1: new); None = identity
        self.sym_map: list[int] | None = None
        self.new_globals: set[str] = set()
        self.dropped: list[int] = []  # table entries dropped
        self.silenced: set[int] = set()  # ... and those dropped or neutralised
        self.table_done = False
        self._entry_bytes: dict[bytes, int] | None = None  # original entry -> first index
        self.copies: list[tuple[int, int]] = []  # (entry, the entry it now copies)
        self.alt_done = False  # the second table (.altinstructions of 5.13-6.7) accounted
        self.table_moved: Callable[[int], int] | None = None
        self.pending_syms: list[tuple[Symbol, Symbol]] = []
        self.pending_relocs: list[tuple[str, Section, tuple[int, ...]]] = []
        self.new_segment: tuple[int, int] | None = None  # file range of the thunks' PT_LOAD
        self.vacated: list[tuple[int, int]] = []
        # (site list section index in PATCHED, offset) of entries relocated to a thunk
        self.listed: set[tuple[int, int]] = set()
        # Thunk symbols of a linked file: (name, offset in its section, size), checked
        # against where the rewriter puts each thunk.
        self.linked_syms: list[tuple[str, int, int]] = []
        self._eh_new: tuple[bytes, dict[int, str]] | None = None
        self._orc_new: tuple[bytes, dict[int, tuple[str, int]]] | None = None
        # References into a table whose entries were dropped: REL places (original section
        # -> [(offset, new bytes)]) and RELA addends ((section, offset, info) -> addend).
        self._refs: tuple[dict[int, list[tuple[int, bytes]]],
                          dict[tuple[int, int, int], int]] | None = None

    # -- bookkeeping ------------------------------------------------------------------

    def problem(self, what: str, sec: Section | None = None, offset: int | None = None,
                length: int = 0, file_offset: int | None = None) -> None:
        if len(self.problems) >= MAX_LISTED:
            self.omitted += 1
            return
        if file_offset is None and sec is not None and offset is not None \
                and sec.type != SHT_NOBITS:
            file_offset = sec.offset + offset
        self.problems.append(Difference(what, sec.name if sec is not None else None, offset,
                                        file_offset, length))

    def claim(self, what: str, sec: Section, offset: int, length: int, *,
              site: int | None = None, thunk: str | None = None, gone: bool = False) -> None:
        """`gone`: the bytes are in ORIGINAL only (a dropped entry): no PATCHED offset."""
        fo = sec.offset + offset if sec.type != SHT_NOBITS and not gone else None
        self.claims.append(Claim(Difference(what, sec.name, offset, fo, length), site, thunk))

    def runs(self, what: str, sec: Section, a: bytes, b: bytes, base: int = 0) -> None:
        """A problem per run of bytes where `b` (PATCHED) differs from `a`."""
        for lo, hi in diff_runs(a, b):
            self.problem(f"{what}: {_hexes(b[lo:hi]) or 'gone'} (was "
                         f"{_hexes(a[lo:hi]) or 'nothing'})", sec, base + lo, hi - lo)

    def is_table(self, elf: ElfFile, index: int) -> bool:
        table = self.scan.table
        if table is None:
            return False
        if elf is self.o:
            return index == table.section.index
        return self.p2o.get(index) == table.section.index

    def is_alternatives(self, elf: ElfFile, sec: Section) -> bool:
        """An `.altinstructions` table beside the site table (5.13-6.7 kernels)."""
        return self.scan.family == "paravirt" and sec.name == ALT_SECTION and \
            not _is_rel(sec) and sec.type != SHT_NOBITS

    def is_thunk_section(self, elf: ElfFile, sec: Section) -> bool:
        return sec.name == self.thunk_name and sec.is_exec and (
            elf is self.p and sec.index not in self.p2o)

    def sites_over(self, sec_index: int, offset: int, width: int) -> list[Site]:
        """Sites of original section `sec_index` overlapping [offset, offset+width)."""
        sites = self.by_sec.get(sec_index)
        if not sites:
            return []
        hi = bisect.bisect_left(self.starts[sec_index], offset + width)
        out = []
        for s in reversed(sites[max(0, hi - 256) : hi]):  # a site is at most 254 bytes
            if s.end > offset:
                out.append(s)
        return out

    def sites_at_addr(self, addr: int, width: int) -> list[Site]:
        hi = bisect.bisect_left(self.addr_starts, addr + width)
        return [s for s in self.by_addr[max(0, hi - 256) : hi]
                if s.address is not None and s.address + s.len > addr]

    def thunk_over(self, sec: Section, offset: int) -> ThunkPlace | None:
        key = self.pkeys[sec.index]
        for t in self.thunk_places:
            if (t.section, t.nth) == key and t.offset <= offset < t.offset + t.size:
                return t
        return None

    def pdata(self, sec: Section) -> bytes:
        return self.p.section_data(sec)

    def odata(self, sec: Section) -> bytes:
        return self.o.section_data(sec)

    # -- the run ------------------------------------------------------------------------

    def run(self) -> Accounting:
        o, p = self.o, self.p
        self.already = self._already()
        if memoryview(p.data) == memoryview(o.data):  # no copy of a large image
            return Accounting((), (), (), (), (), self.already)
        kinds = _kinds()

        def kind_of(elf: ElfFile, sec: Section) -> Kind:
            return next(k for pred, k in kinds if pred(self, elf, sec))

        work: list[tuple[int, Kind, Section | None, Section]] = []
        for sec in p.sections:
            oi = self.p2o.get(sec.index)
            osec = o.sections[oi] if oi is not None else None
            if osec is not None and oi == sec.index and _same_header(osec, sec) and \
                    sec.type not in (SHT_SYMTAB, SHT_GROUP, SHT_SYMTAB_SHNDX) and \
                    not self._differs(osec, sec):
                continue  # nothing to account for (.symtab and friends: the mapping may)
            kind = kind_of(p, sec)
            if osec is None and not kind.may_be_new:
                self.problem(f"section {sec.name} added (a {kind.name} section pvpatch never "
                             "adds)", sec, 0, sec.size)
                continue
            if osec is None:
                self._new_header(kind, sec)
            work.append((kind.phase, kind, osec, sec))
        for sec in o.sections:
            if sec.index not in self.o2p:
                self.problem(f"section {sec.name} removed", None, None, 0, sec.offset)
        for _phase, kind, osec, sec in sorted(work, key=lambda w: (w[0], w[3].index)):
            if osec is None or self._differs(osec, sec):
                kind.account(self, osec, sec)
                if kind.name != "null":
                    self.notes.append(SectionNote(sec.name, kind.name, kind.rule))
            if osec is not None:  # after its rule: .symtab's sets the symbol mapping
                self._header(kind, osec, sec)
        self._settle_pending()
        self._table_follows()
        if not o.is_relocatable:
            self._segments()
        self._elf_header()
        self._gaps()
        self._signature()
        return Accounting(tuple(sorted(self.changed)), tuple(self.thunk_places),
                          tuple(self.claims), tuple(self.problems), tuple(self.notes),
                          self.already, self.omitted)

    def _already(self) -> frozenset[int]:
        """Sites the plan rewrites whose bytes are already the planned ones."""
        out = set()
        for d in self.plan.decisions:
            if d.rewrites and d.code is not None and d.code == d.site.code:
                out.add(d.site.index)
        return frozenset(out)

    def _differs(self, o: Section, p: Section) -> bool:
        return o.size != p.size or self.odata(o) != self.pdata(p)

    # -- headers --------------------------------------------------------------------------

    def _header(self, kind: Kind, o: Section, p: Section) -> None:
        if kind.name == "null":
            # all zeros, but the count and the name table's index under extended numbering
            count_ok = p.size in (o.size, len(self.p.sections))
            link_ok = p.link in (o.link, getattr(self.p, "shstrndx", 0))
            if (p.name_offset, p.type, p.flags, p.addr, p.offset, p.info, p.addralign,
                    p.entsize) != (0,) * 8 or not (count_ok and link_ok):
                self.problem("section header 0 changed", None, None, 0, self.p.e_shoff)
            return
        same: tuple[str, ...] = ("type", "flags", "addr", "addralign", "entsize")
        if kind.name == "unwind" and not self.p.is_relocatable:
            same = ("type", "flags", "addralign", "entsize")  # moved: checked in _segments
        for name in same:
            a, b = getattr(o, name), getattr(p, name)
            if a != b:
                self.problem(f"section header: sh_{name} {a:#x} became {b:#x}", p, 0)
        if not kind.resizable and o.size != p.size:
            self.problem(f"size {o.size:#x} became {p.size:#x}", p, 0)
        if (self.o2p.get(o.link) if o.link else 0) != p.link:
            self.problem(f"section header: sh_link {o.link} became {p.link}", p, 0)
        mapping = self.sym_map
        if _is_rel(o) or o.flags & 0x40:  # SHF_INFO_LINK: a section index
            good = self.o2p.get(o.info) == p.info
        elif o.type == SHT_GROUP and o.link == getattr(self.o.symtab, "index", -1):
            # its signature symbol, through the mapping of the symbols
            good = (p.info if mapping is None else
                    mapping[p.info] if p.info < len(mapping) else -1) == o.info
        elif o.type == SHT_SYMTAB and mapping is not None:
            good = True  # the first global moved by the new locals: checked with them
        else:
            good = o.info == p.info
        if not good:
            self.problem(f"section header: sh_info {o.info} became {p.info}", p, 0)

    def _new_header(self, kind: Kind, p: Section) -> None:
        """A section pvpatch adds has the header pvpatch writes for it."""
        elf = self.p
        symtab = getattr(elf.symtab, "index", -1)
        rec = (elf.cls.rela if elf.arch.uses_rela else elf.cls.rel).size
        # kind -> (type, flags it has, flags it may also have, entsize, link)
        want: dict[str, tuple[int, int, int, int, int | None]] = {
            "thunks": (SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, 0, 0, 0),
            "relocations": (SHT_RELA if elf.arch.uses_rela else SHT_REL, SHF_INFO_LINK,
                            SHF_GROUP, rec, symtab),
            "site list": (SHT_PROGBITS, SHF_ALLOC, 0, SITE_LIST_ENTRY, 0),
            "symbol indices": (SHT_SYMTAB_SHNDX, 0, 0, 4, symtab),
        }
        rule = want.get(kind.name)
        if rule is None:
            return
        stype, flags, optional, entsize, link = rule
        if p.type != stype or p.flags & ~optional != flags or p.entsize != entsize \
                or (link is not None and p.link != link):
            self.problem(f"section {p.name} added with a header pvpatch does not write "
                         f"(type {p.type}, flags {p.flags:#x}, entsize {p.entsize}, link "
                         f"{p.link})", p, 0)

    def _elf_header(self) -> None:
        o, p = self.o, self.p
        names = ("e_ident", "e_type", "e_machine", "e_version", "e_entry", "e_phoff",
                 "e_shoff", "e_flags", "e_ehsize", "e_phentsize", "e_phnum", "e_shentsize",
                 "e_shnum", "e_shstrndx")
        free = {"e_shoff", "e_shnum", "e_shstrndx"}
        if self.new_segment is not None:
            free |= {"e_phoff", "e_phnum"}
        a, b = o.cls.ehdr.unpack_from(o.data, 0), p.cls.ehdr.unpack_from(p.data, 0)
        for name, x, y in zip(names, a, b, strict=True):
            if x != y and name not in free:
                self.problem(f"ELF header: {name} changed", None, None, 0, 0)
        if self.o2p.get(getattr(o, "shstrndx", 0)) != getattr(p, "shstrndx", 0):
            self.problem("ELF header: e_shstrndx names another section", None, None, 0, 0)

    # -- rules ----------------------------------------------------------------------------

    def nothing(self, o: Section | None, p: Section) -> None:
        """Accounted by another section's rule."""

    def _unmoved(self, o: Section, od: bytes, masked: bytearray) -> None:
        """Put back the original bytes where a REL place holds the implicit addend of a
        reference into the table that followed dropped entries, as expected."""
        for off, want in self.references()[0].get(o.index, ()):
            if bytes(masked[off : off + len(want)]) == want:
                masked[off : off + len(want)] = od[off : off + len(want)]

    def identical(self, o: Section | None, p: Section) -> None:
        assert o is not None
        od, pd = self.odata(o), self.pdata(p)
        masked = bytearray(pd)
        if len(od) == len(pd):
            self._unmoved(o, od, masked)
        self.runs("changed", p, od, bytes(masked))

    def code(self, o: Section | None, p: Section) -> None:
        assert o is not None
        od, pd = self.odata(o), self.pdata(p)
        if len(od) != len(pd):
            return  # the size change is already named
        masked = bytearray(pd)
        for s in self.by_sec.get(o.index, ()):
            if od[s.offset : s.end] != pd[s.offset : s.end]:
                self.changed.add(s.index)
                masked[s.offset : s.end] = od[s.offset : s.end]
        self._unmoved(o, od, masked)
        if masked != od:
            self.runs("changed outside every site", p, od, bytes(masked))

    def references(self) -> tuple[dict[int, list[tuple[int, bytes]]],
                                  dict[tuple[int, int, int], int]]:
        """Where references into the table go when entries were dropped: what they point
        at moves as a label does (a pc-relative displacement in code is biased by its
        width, as GNU as writes `lea tbl+0x20(%rip)`)."""
        if self._refs is not None:
            return self._refs
        places: dict[int, list[tuple[int, bytes]]] = {}
        addends: dict[tuple[int, int, int], int] = {}
        self._refs = (places, addends)
        moved, table = self.table_moved, self.scan.table
        if moved is None or table is None:
            return self._refs
        elf = self.o
        inside = {sym.index for sym in elf.symbols
                  if sym.defined and sym.section_index == table.section.index}
        for relsec in elf.sections:
            if not _is_rel(relsec) or relsec.is_alloc or relsec.link != getattr(
                    elf.symtab, "index", -1) or relsec.info == table.section.index \
                    or not 0 < relsec.info < len(elf.sections):
                continue
            place = elf.sections[relsec.info]
            for r in elf.relocations(relsec):
                if r.sym not in inside:
                    continue
                sym = elf.symbols[r.sym]
                kind = elf.arch.reloc(r.type)
                bias = kind.width if kind.pc_relative and place.is_exec else 0
                label = 0 if sym.type == STT_SECTION else sym.value
                new_label = 0 if sym.type == STT_SECTION else moved(sym.value)
                addend = moved(label + r.addend + bias) - bias - new_label
                if relsec.type == SHT_RELA:
                    addends[relsec.index, r.offset, r.type] = addend
                elif kind.width:
                    places.setdefault(place.index, []).append(
                        (r.offset, (addend & ((1 << 8 * kind.width) - 1)).to_bytes(
                            kind.width, "little")))
        return self._refs

    def site_list(self, o: Section | None, p: Section) -> None:
        od = self.odata(o) if o is not None else b""
        pd = self.pdata(p)
        if pd[: len(od)] != od:
            self.runs("entries changed (only appending is allowed)", p, od, pd[: len(od)])
            return
        if (len(pd) - len(od)) % SITE_LIST_ENTRY:
            self.problem("grew by a part of an entry", p, len(od), len(pd) - len(od))
            return
        for at in range(len(od), len(pd), SITE_LIST_ENTRY):
            if (p.index, at) not in self.listed:
                self.problem("entry appended that lists no thunk's return", p, at,
                             SITE_LIST_ENTRY)
            elif self.o.arch.uses_rela and pd[at : at + SITE_LIST_ENTRY] != \
                    bytes(SITE_LIST_ENTRY):
                self.problem("entry appended with bytes besides its relocation's", p, at,
                             SITE_LIST_ENTRY)

    def strings(self, o: Section | None, p: Section) -> None:
        assert o is not None
        od, pd = self.odata(o), self.pdata(p)
        if pd[: len(od)] != od:
            self.runs("strings changed (only appending is allowed)", p, od, pd[: len(od)])
        elif len(pd) > len(od) and pd[-1:] != b"\0":
            self.problem("appended strings do not end in NUL", p, len(pd) - 1, 1)

    def versions(self, o: Section | None, p: Section) -> None:
        assert o is not None
        od, pd = self.odata(o), self.pdata(p)
        if pd[: len(od)] != od:
            self.runs("__versions entries changed (only appending is allowed)", p, od,
                      pd[: len(od)])
            return
        from ..rewrite.modversions import names_in

        have = names_in(od, self.o.arch)
        extra = pd[len(od) :]
        if len(extra) % MODULE_NAME_LEN:
            self.problem("__versions grew by a part of an entry", p, len(od), len(extra))
            return
        for at in range(0, len(extra), MODULE_NAME_LEN):
            (name,) = names_in(extra[at : at + MODULE_NAME_LEN], self.o.arch)
            if name in have or name not in self.new_globals:
                self.problem(f"__versions entry for {name!r} added, which is no new import",
                             p, len(od) + at, MODULE_NAME_LEN)

    def group(self, o: Section | None, p: Section) -> None:
        assert o is not None
        od, pd = self.odata(o), self.pdata(p)
        if pd[: len(od)] != od or len(pd) % 4:
            self.runs("group members changed (only appending is allowed)", p, od, pd)
            return
        members = {self.o2p.get(v) for (v,) in struct.iter_unpack("<I", od[4:])}
        for k, (v,) in enumerate(struct.iter_unpack("<I", pd[len(od) :])):
            new = self.p.sections[v] if v < len(self.p.sections) else None
            if new is None or v in self.p2o or not _is_rel(new) or new.info not in members:
                self.problem(f"group member {v} added, which is not a new relocation section "
                             "of a member", p, len(od) + 4 * k, 4)

    # symbols ---------------------------------------------------------------------------

    def _symkey(self, s: Symbol, other: Symbol) -> bool:
        """`other` (PATCHED) is `s` (ORIGINAL): everything but the index."""
        if (s.name, s.value, s.size, s.type, s.bind, s.other) != \
                (other.name, other.value, other.size, other.type, other.bind, other.other):
            return False
        if s.defined:
            return other.defined and self.o2p.get(s.section_index) == other.section_index
        return other.shndx == s.shndx

    def symbols(self, o: Section | None, p: Section) -> None:
        assert o is not None
        osyms, psyms = self.o.symbols, self.p.symbols
        fg, pfg = o.info, p.info
        nloc = pfg - fg
        if nloc < 0 or len(psyms) < len(osyms) + nloc:
            self.problem(f"symbols removed ({len(osyms)} became {len(psyms)}, first global "
                         f"{fg} became {pfg})", p, 0)
            self.sym_map = [-1] * len(psyms)
            return
        mapping = [-1] * len(psyms)
        table = self.scan.table
        tindex = table.section.index if table is not None else -1
        for i, s in enumerate(osyms):
            j = i if i < fg else i + nloc
            q = psyms[j]
            if self._symkey(s, q):
                mapping[j] = i
            elif s.defined and s.section_index == tindex and s.type != STT_SECTION and \
                    self._symkey(replace(s, value=q.value, size=q.size), q):
                mapping[j] = i
                self.pending_syms.append((s, q))  # a label in the table: checked after it
            elif s.defined and self._moved_label(s) == q.value and \
                    self._symkey(replace(s, value=q.value), q):
                mapping[j] = i  # a label in a call-frame table that moved with it
            else:
                self.problem(f"symbol {i} ({s.name or '?'}) changed or moved", p,
                             j * self.p.cls.sym.size, self.p.cls.sym.size)
        for j in range(fg, fg + nloc):
            q = psyms[j]
            sec = self.p.sections[q.section_index] if q.defined and \
                q.section_index < len(self.p.sections) else None
            # A linked file's symbols hold addresses: the offset is from the section's.
            at = q.value - (sec.addr if sec is not None and not self.p.is_relocatable else 0)
            if q.bind == STB_LOCAL and q.type == STT_FUNC and sec is not None \
                    and self.is_thunk_section(self.p, sec) and at >= 0 \
                    and at + q.size <= sec.size:
                name, nth = self.pkeys[sec.index]
                if self.p.is_relocatable:
                    self.thunk_places.append(ThunkPlace(q.name, name, nth, at, q.size))
                else:  # the thunk's place is the rewriter's: the symbol must name it
                    self.linked_syms.append((q.name, at, q.size))
                self.claim(f"thunk symbol {q.name}", p, j * self.p.cls.sym.size,
                           self.p.cls.sym.size, thunk=q.name)
            else:
                self.problem(f"local symbol {q.name or '?'} added, which is no thunk in "
                             f"{self.thunk_name} (inside it)", p, j * self.p.cls.sym.size,
                             self.p.cls.sym.size)
        for j in range(len(osyms) + nloc, len(psyms)):
            q = psyms[j]
            if q.bind == STB_GLOBAL and q.shndx == SHN_UNDEF and q.name:
                self.new_globals.add(q.name)  # an import: used only by relocations checked
            else:
                self.problem(f"symbol {q.name or '?'} added, which is no undefined global",
                             p, j * self.p.cls.sym.size, self.p.cls.sym.size)
        if any(m != j for j, m in enumerate(mapping[: len(osyms)])) or len(psyms) != \
                len(osyms):
            self.sym_map = mapping

    def _moved_label(self, s: Symbol) -> int | None:
        """Where a label in `.eh_frame` / `.eh_frame_hdr` goes when a linked file's table
        moved into the new segment: the old entries keep their offsets, a label past them
        (the terminator's, `__FRAME_END__`) follows the new entries."""
        if self.p.is_relocatable or s.section_index >= len(self.o.sections):
            return None
        o = self.o.sections[s.section_index]
        j = self.o2p.get(o.index)
        if o.name not in UNWIND_SECTIONS or j is None:
            return None
        p = self.p.sections[j]
        if p.addr == o.addr:
            return None
        off = s.value - o.addr
        if o.name == EH_FRAME_HDR:
            return p.addr + off
        from ..rewrite.unwind import UnwindError, parse_eh_frame

        try:
            end = parse_eh_frame(self.odata(o), o.addr, self.o.arch.ptr_size).end
        except UnwindError:
            return None
        return p.addr + (off if off < end else p.size - 4 + off - end)

    def symbol_indices(self, o: Section | None, p: Section) -> None:
        """Read through .symtab: when .symtab itself is unchanged, the section of every
        symbol whose index lives here must be the same section."""
        if self.sym_map is not None or o is None:
            return  # the symbols were compared, section indices included
        for s, q in zip(self.o.symbols, self.p.symbols, strict=False):
            if s.defined and self.o2p.get(s.section_index) != q.section_index:
                self.problem(f"symbol {s.index} ({s.name or '?'}) moved to another section",
                             p, 4 * s.index, 4)

    # relocations -----------------------------------------------------------------------

    def _rows(self, elf: ElfFile, sec: Section) -> list[tuple[int, ...]]:
        fmt = elf.cls.rela if sec.type == SHT_RELA else elf.cls.rel
        data = elf.section_data(sec)
        if len(data) % fmt.size:
            return []  # ElfFile refuses such a file before it gets here
        return list(fmt.iter_unpack(data))

    def _remapped(self, rows: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """PATCHED relocation rows with their symbols as ORIGINAL indices."""
        mapping = self.sym_map
        if mapping is None:
            return list(rows)
        shift = self.p.cls.info_shift
        tmask = (1 << shift) - 1
        out = []
        for row in rows:
            sym = row[1] >> shift
            m = mapping[sym] if sym < len(mapping) else -1
            key = m if m >= 0 else NEW_SYMBOL + sym
            out.append((row[0], key << shift | (row[1] & tmask), *row[2:]))
        return out

    def _describe(self, elf: ElfFile, row: tuple[int, ...], mapped: bool) -> str:
        shift = elf.cls.info_shift
        sym, rtype = row[1] >> shift, row[1] & ((1 << shift) - 1)
        name = "?"
        if sym >= NEW_SYMBOL:
            sym -= NEW_SYMBOL
            mapped = False
        syms = self.o.symbols if mapped else elf.symbols
        if sym < len(syms):
            s = syms[sym]
            name = s.name or (self.o.sections[s.section_index].name if mapped and s.defined
                              and s.section_index < len(self.o.sections) else "")
        addend = f"{row[2]:+#x}" if len(row) > 2 else ""
        return f"{elf.arch.reloc_name(rtype)} {name}{addend}"

    def _width(self, row: tuple[int, ...]) -> int:
        rtype = row[1] & ((1 << self.o.cls.info_shift) - 1)
        return max(self.o.arch.reloc(rtype).width, 1)  # R_*_NONE still names its place

    def relocations(self, o: Section | None, p: Section) -> None:
        if p.info >= len(self.p.sections):
            self.problem("relocations for a section that does not exist", p, 0)
            return
        target = self.p.sections[p.info]
        target_o = self.p2o.get(target.index)
        if o is not None and self.o2p.get(o.info) != p.info:
            return  # named with the header
        if o is not None and self.sym_map is None and self.odata(o) == self.pdata(p):
            return
        fmt = self.p.cls.rela if p.type == SHT_RELA else self.p.cls.rel
        walked = _walk(self.odata(o), self.pdata(p), fmt.size, self.p.cls.addr.size) \
            if o is not None and self.sym_map is None else None
        if walked is not None:  # the usual case: only the rows that differ are decoded
            found = tuple([fmt.unpack(r) for r in rows] for rows in walked)
        else:
            before = self._rows(self.o, o) if o is not None else []
            found = _differences(before, self._remapped(self._rows(self.p, p)))
        for how, rows in zip(("removed", "added"), found, strict=True):
            for row in rows:
                self._relocation_differs(how, p, target, target_o, row)

    def _listed_return(self, target: Section, row: tuple[int, ...]) -> ThunkPlace | None:
        """The thunk whose return an entry appended to a site list lists, if it does:
        a PC32 relocation against the thunk's symbol reaching its `jmp` return."""
        old = self.o.sections[self.p2o[target.index]].size if target.index in self.p2o else 0
        off = row[0]
        shift = self.p.cls.info_shift
        key, rtype = row[1] >> shift, row[1] & ((1 << shift) - 1)
        if off < old or off % SITE_LIST_ENTRY or rtype != self.p.arch.r_pc32 \
                or key < NEW_SYMBOL:
            return None
        sym = self.p.symbols[key - NEW_SYMBOL] if key - NEW_SYMBOL < len(self.p.symbols) \
            else None
        thunk = next((t for t in self.thunk_places if sym is not None and t.symbol == sym.name),
                     None)
        if thunk is None or sym is None:
            return None
        data = self.pdata(target)
        addend = row[2] if len(row) > 2 else \
            int.from_bytes(data[off : off + 4], "little", signed=True)
        at = sym.value + addend  # the listed instruction, in the thunk section
        code = self.pdata(self.p.sections[sym.section_index])
        if not (thunk.offset <= at and at + 5 <= thunk.offset + thunk.size
                and code[at] == RETURN_JMP):
            return None
        self.listed.add((target.index, off))
        return thunk

    def _relocation_differs(self, how: str, relsec: Section, target: Section,
                            target_o: int | None, row: tuple[int, ...]) -> None:
        off = row[0]
        what = f"relocation {how} at {target.name}+{off:#x} " \
            f"({self._describe(self.p, row, True)})"
        listed = self._listed_return(target, row) if how == "added" and \
            target.name in SITE_LISTS else None
        if listed is not None:
            self.claim(what, target, off, self._width(row), thunk=listed.symbol)
            return
        if how == "added" and target.name == ORC_UNWIND_IP and self.p.is_relocatable:
            thunk_name = self._orc_ip_field(target, row)
            if thunk_name is not None:
                self.claim(what, target, off, self._width(row), thunk=thunk_name)
                return
        if how == "added" and target.name == EH_FRAME and self.p.is_relocatable:
            thunk_name = self._eh_frame_field(target, row)
            if thunk_name is not None:
                self.claim(what, target, off, self._width(row), thunk=thunk_name)
                return
        if target_o is not None:
            sites = self.sites_over(target_o, off, self._width(row))
            for s in sites:
                self.changed.add(s.index)
                self.claim(what, target, off, self._width(row), site=s.index)
            if not sites:
                self.pending_relocs.append((how, target, row))
            return
        thunk = self.thunk_over(target, off) if self.is_thunk_section(self.p, target) else None
        if thunk is not None:
            self.claim(what, target, off, self._width(row), thunk=thunk.symbol)
        else:
            self.problem(what + ", outside every site and thunk", target, off,
                         self._width(row))

    # the table ---------------------------------------------------------------------------

    def _entry_relocs(self, elf: ElfFile, sec: Section, count: int, stride: int,
                      patched: bool) -> list[tuple[tuple[int, ...], ...]]:
        per: list[list[tuple[int, ...]]] = [[] for _ in range(count)]
        for relsec in elf.relocation_sections(sec):
            rows = self._rows(elf, relsec)
            if patched:
                rows = self._remapped(rows)
            for row in rows:
                k, rest = divmod(row[0], stride)
                if 0 <= k < count:
                    per[k].append((rest, *row[1:]))
                else:
                    self.problem(f"relocation past the end of the table at {row[0]:#x}",
                                 sec, row[0])
        return [tuple(sorted(x)) for x in per]

    def table_relocations(self, o: Section | None, p: Section) -> None:
        """Entries and their relocations are compared together, by the table's rule."""
        table = self.scan.table
        where = self.o2p.get(table.section.index) if table is not None else None
        if table is not None and where is not None and not self.table_done:
            self.table(table.section, self.p.sections[where])

    def table(self, o: Section | None, p: Section) -> None:
        assert o is not None
        table = self.scan.table
        assert table is not None
        if self.table_done:
            return
        self.table_done = True
        from ..scan.stage import family_of

        stride, count = table.entry_size, table.count
        od = self.odata(o)
        od += bytes(max(0, count * stride - len(od)))
        pd = self.pdata(p)
        n_p = -(-len(pd) // stride)
        pd += bytes(n_p * stride - len(pd))
        rel_o = self._entry_relocs(self.o, o, count, stride, False)
        rel_p = self._entry_relocs(self.p, p, n_p, stride, True)
        edit = family_of(table).entry_edit(table)

        def entry(data: bytes, i: int) -> bytes:
            return data[i * stride : (i + 1) * stride]

        def neutral(b: bytes) -> bytes | None:
            if edit is None:
                return None
            at, new = edit
            return b[:at] + new + b[at + len(new) :]

        neutralised: list[int] = []
        dropped: list[int] = []
        if n_p == count:
            for i in range(count):
                a, b = entry(od, i), entry(pd, i)
                if rel_o[i] != rel_p[i]:
                    self.problem(f"entry {i}: its relocations changed", p, i * stride, stride)
                elif a == b:
                    continue
                elif b == neutral(a):
                    neutralised.append(i)
                elif not self.o.is_relocatable and i in self.entry_site and \
                        (k := self._copied_from(od, count, stride, b, i)) is not None:
                    # --final: a copy of kept entry k, which the kernel re-applies to k's
                    # own site (idempotent) instead of touching this one.
                    owner = self.entry_site[i]
                    s = self.sites[owner]
                    self.claim(f"entry {i} replaced by a copy of entry {k} (site {owner} at "
                               f"{s.section}+{s.offset:#x})", p, i * stride, stride,
                               site=owner)
                else:
                    self.runs(f"entry {i} changed", p, a, b, i * stride)
        else:
            j = 0
            for i in range(count):
                if j < n_p and rel_o[i] == rel_p[j]:
                    a, b = entry(od, i), entry(pd, j)
                    if a == b or b == neutral(a):
                        if a != b:
                            neutralised.append(i)
                        j += 1
                        continue
                dropped.append(i)
            if j < n_p:
                self.problem(f"entries changed, not only dropped: patched entry {j} is no "
                             "original entry", p, j * stride, stride)
                return
        for how, entries in (("neutralised", neutralised), ("dropped", dropped)):
            at = edit[0] if how == "neutralised" and edit is not None else 0
            for i in entries:
                site = self.entry_site.get(i)
                what = f"entry {i} {how}"
                if site is None:
                    if how == "neutralised":  # named at the bytes that changed
                        self.problem(what + ", which describes no paravirt site", p,
                                     i * stride + at, len(edit[1]) if edit else stride)
                    else:
                        self.problem(what + ", which describes no paravirt site", None,
                                     i * stride, stride)
                    continue
                s = self.sites[site]
                what += f" (site {site} at {s.section}+{s.offset:#x})"
                if how == "neutralised":
                    self.claim(what, p, i * stride + at, len(edit[1]) if edit else stride,
                               site=site)
                else:
                    self.claim(what, o, i * stride, stride, site=site, gone=True)
        self.dropped = dropped
        self.silenced = set(neutralised) | set(dropped) | {i for i, _k in self.copies}
        if dropped:
            keep = [i for i in range(count) if i not in set(dropped)]
            kept = set(keep)
            size_o, size_p = o.size, p.size

            def moved(offset: int) -> int:
                if offset >= size_o:
                    return size_p
                k, rest = divmod(offset, stride)
                return bisect.bisect_left(keep, k) * stride + (rest if k in kept else 0)

            self.table_moved = moved

    def alternatives_relocations(self, o: Section | None, p: Section) -> None:
        """Compared with their entries, by `alternatives`."""
        osec, psec = self.o.section(ALT_SECTION), self.p.section(ALT_SECTION)
        if osec is not None and psec is not None:
            self.alternatives(osec, psec)

    def alternatives(self, o: Section | None, p: Section) -> None:
        """`--final` makes each entry of the second table at a rewritten site test NOT
        X86_FEATURE_ALWAYS in place, or drops it with its relocations (relocatable files,
        --drop-patched); any other change is unexplained."""
        assert o is not None
        if self.alt_done:
            return
        self.alt_done = True
        from ..plan.coverage import _alt_table, _overlapping

        alt = _alt_table(self.scan)
        od, pd = self.odata(o), self.pdata(p)
        if alt is None:
            self.runs("changed (not an alternatives table pvpatch edits)", p, od, pd)
            return
        lay = alt.decoded.layout
        stride = lay.stride
        site_of: dict[int, int] = {}
        for s in self.scan.sites:
            for j in _overlapping(alt, s):
                site_of.setdefault(j, s.index)
        n_o, n_p = len(od) // stride, len(pd) // stride
        rel_o = self._entry_relocs(self.o, o, n_o, stride, False)
        rel_p = self._entry_relocs(self.p, p, n_p, stride, True)

        def neutral(a: bytes) -> bytes | None:
            if lay.neutral is None:
                return None
            at, new = lay.neutral
            return a[:at] + new + a[at + len(new):]

        j = 0
        for i in range(n_o):
            a = od[i * stride : (i + 1) * stride]
            b = pd[j * stride : (j + 1) * stride] if j < n_p else None
            site = site_of.get(i)
            where = "" if site is None else \
                f" (site {site} at {self.sites[site].section}+{self.sites[site].offset:#x})"
            if b is not None and rel_o[i] == rel_p[j] and (a == b or b == neutral(a)):
                if a != b:
                    if site is None:
                        self.runs(f"alternative {i} changed", p, a, b, j * stride)
                    else:
                        assert lay.neutral is not None
                        at, new = lay.neutral
                        self.claim(f"alternative {i} neutralised{where}", p, j * stride + at,
                                   len(new), site=site)
                j += 1
            elif n_p < n_o and site is not None:
                self.claim(f"alternative {i} dropped{where}", o, i * stride, stride, site=site,
                           gone=True)
            else:
                self.problem(f"alternative {i} changed or dropped, at no paravirt site", o,
                             i * stride, stride)
                return
        if j < n_p:
            self.problem(f"alternatives changed, not only dropped: patched entry {j} is no "
                         "original entry", p, j * stride, stride)
        tail_o, tail_p = od[n_o * stride:], pd[n_p * stride:]
        if tail_o != tail_p:
            self.runs("changed", p, tail_o, tail_p, n_p * stride)

    def _copied_from(self, od: bytes, count: int, stride: int, b: bytes, i: int
                     ) -> int | None:
        """The original entry (not `i`, not at a changed site) that `b` copies."""
        if self._entry_bytes is None:
            self._entry_bytes = {}
            for k in range(count):
                self._entry_bytes.setdefault(od[k * stride : (k + 1) * stride], k)
        src = self._entry_bytes.get(b)
        if src is None or src == i:
            return None
        self.copies.append((i, src))
        return src

    def _table_follows(self) -> None:
        """In a family whose kernel would undo or BUG() on a rewritten site (6.8+
        DIRECT_CALL alternatives), every entry at a changed site must be silenced."""
        table = self.scan.table
        from ..scan.stage import family_of

        for i, k in self.copies:
            if self.entry_site.get(k) in self.changed:
                self.problem(f"entry {i} copies entry {k}, whose site pvpatch changed: the "
                             "kernel would re-patch it")
        if table is None or not family_of(table).must_neutralise:
            return
        stride = table.entry_size
        where = self.o2p.get(table.section.index)
        sec = self.p.sections[where] if where is not None else None
        for index in sorted(self.changed):
            site = self.sites[index]
            for j in site.entry_indices:
                if j not in self.silenced:
                    self.problem(f"entry {j} at changed site {index} ({site.section}+"
                                 f"{site.offset:#x}) is neither neutralised nor dropped: the "
                                 "kernel would still apply it", sec, j * stride, stride)

    def _settle_pending(self) -> None:
        """Labels in the table (symbols, relocations against it) that follow dropped entries."""
        moved = self.table_moved
        for s, q in self.pending_syms:
            if moved is None or (q.value, q.size) != (
                    moved(s.value), moved(s.value + s.size) - moved(s.value)):
                self.problem(f"symbol {s.name} in the table moved to {q.value:#x} (size "
                             f"{q.size:#x}), not with its entry", None, None)
        addends = self.references()[1]
        shift = self.o.cls.info_shift
        tmask = (1 << shift) - 1
        removed = {(target.index, row[0], row[1]) for how, target, row in self.pending_relocs
                   if how == "removed"}
        followed = set()
        for how, target, row in self.pending_relocs:
            if how != "added" or len(row) < 3:
                continue
            o_target = self.p2o.get(target.index)
            relsec = next((r for r in self.o.sections if o_target is not None and _is_rel(r)
                           and not r.is_alloc and r.info == o_target), None)
            want = addends.get((relsec.index, row[0], row[1] & tmask)) \
                if relsec is not None else None
            if want == row[2] and (target.index, row[0], row[1]) in removed:
                followed.add((target.index, row[0], row[1]))
        for how, target, row in self.pending_relocs:
            if (target.index, row[0], row[1]) in followed:
                continue  # a reference into the table that followed what it points at
            self.problem(f"relocation {how} at {target.name}+{row[0]:#x} "
                         f"({self._describe(self.p, row, True)}), outside every site",
                         target, row[0], self._width(row))

    # linked files: load-time relocations, RELR, .dynamic ----------------------------

    def dynamic_relocations(self, o: Section | None, p: Section) -> None:
        assert o is not None
        gone, new = (Counter(rows) for rows in _differences(self._rows(self.o, o),
                                                              self._rows(self.p, p)))
        spare: dict[tuple[int, ...], int] = {}
        for row, n in gone.items():
            key = (row[0], *row[2:])
            spare[key] = spare.get(key, 0) + n
        for row, n in new.items():
            key = (row[0], *row[2:])
            sites = self.sites_at_addr(row[0], self.o.cls.addr.size)
            if row[1] != 0 or spare.get(key, 0) < n or not sites:
                self.problem(f"load-time relocation at {row[0]:#x} changed "
                             f"({self._describe(self.p, row, False)}), not neutralised inside "
                             "a site", p, None)
                continue
            spare[key] -= n
            for s in sites:
                self.changed.add(s.index)
                self.claim(f"load-time relocation at {row[0]:#x} neutralised", p,
                           0, 0, site=s.index)
        if any(v for v in spare.values()):
            self.problem("load-time relocations removed", p, 0)

    def relr(self, o: Section | None, p: Section) -> None:
        assert o is not None
        before = list(self.o.relr_addresses(o))
        after = list(self.p.relr_addresses(p))
        if set(after) - set(before) or len(after) != len(set(after)):
            self.problem("packed relocations added", p, 0)
        for addr in sorted(set(before) - set(after)):
            sites = self.sites_at_addr(addr, self.o.cls.addr.size)
            if not sites:
                self.problem(f"packed relocation at {addr:#x} dropped outside every site", p, 0)
            for s in sites:
                self.changed.add(s.index)
                self.claim(f"packed relocation at {addr:#x} dropped", p, 0, 0, site=s.index)

    def dynamic(self, o: Section | None, p: Section) -> None:
        assert o is not None
        a, b = dynamic_entries(self.o, o), dynamic_entries(self.p, p)
        tags = dict(b)
        word = self.p.cls.addr.size
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            if x == y:
                continue
            tag = x[0]
            if y[0] != tag or tag not in (DT_RELCOUNT, DT_RELACOUNT, DT_RELRSZ):
                self.problem(f"dynamic entry {k} (tag {tag:#x}) changed", p, k * 2 * word,
                             2 * word)
            elif tag == DT_RELRSZ:
                relr = next((s for s in self.p.sections if s.type == SHT_RELR and s.is_alloc),
                            None)
                if relr is None or relr.size != y[1]:
                    self.problem("DT_RELRSZ is not the size of the packed relocations", p,
                                 k * 2 * word, 2 * word)
            else:
                table_tag = DT_RELA if tag == DT_RELACOUNT else DT_REL
                rel = next((s for s in self.p.sections if _is_rel(s) and s.is_alloc
                            and s.addr == tags.get(table_tag)), None)
                rows = self._rows(self.p, rel) if rel is not None else []
                shift = self.p.cls.info_shift
                relative = self.p.arch.r_relative
                if y[1] > x[1] or y[1] > len(rows) or any(
                        r[1] & ((1 << shift) - 1) != relative for r in rows[: y[1]]):
                    self.problem(f"{'DT_RELACOUNT' if tag == DT_RELACOUNT else 'DT_RELCOUNT'} "
                                 f"{y[1]} does not count a prefix of RELATIVE relocations", p,
                                 k * 2 * word, 2 * word)

    # thunks ------------------------------------------------------------------------------

    def thunks(self, o: Section | None, p: Section) -> None:
        data = self.pdata(p)
        key = self.pkeys[p.index]
        if not self.p.is_relocatable:
            self._linked_thunks(p, key)
        mine = sorted((t for t in self.thunk_places if (t.section, t.nth) == key),
                      key=lambda t: t.offset)
        masked = bytearray(data)
        for t in mine:
            if t.offset + t.size > len(data):
                self.problem(f"thunk {t.symbol} runs past its section", p, t.offset, t.size)
                continue
            self.claim(f"thunk {t.symbol}", p, t.offset, t.size, thunk=t.symbol)
            masked[t.offset : t.offset + t.size] = bytes(t.size)
        if any(masked):
            for lo, hi in diff_runs(bytes(len(masked)), bytes(masked)):
                self.problem(f"bytes outside every thunk, where only zero padding goes: "
                             f"{_hexes(bytes(masked[lo:hi]))}", p, lo, hi - lo)

    def _linked_thunks(self, p: Section, key: tuple[str, int]) -> None:
        """Where the rewriter puts each thunk of the plan: 16-aligned, in plan order."""
        from ..rewrite.thunk import planned_thunk_layout

        # as the rewriter writes each in this file: its return form, its padding
        for slot in planned_thunk_layout(self.plan):
            off, size = slot.offset, len(slot.code.code)
            if off + size > p.size:
                break
            self.thunk_places.append(ThunkPlace(slot.spec.symbol, key[0], key[1], off, size,
                                                p.addr + off))
        places = {(t.symbol, t.offset, t.size) for t in self.thunk_places}
        for name, at, size in self.linked_syms:
            if (name, at, size) not in places:
                self.problem(f"symbol {name} (offset {at:#x}, size {size}) names no thunk "
                             "where the rewriter puts it", p, at, size)

    # unwind data -------------------------------------------------------------------------

    def _frames(self, places: Sequence[ThunkPlace]) -> list[ThunkFrame] | None:
        from ..rewrite.thunk import planned_thunk_code

        specs = {t.symbol: t for t in self.plan.thunks}
        frames = []
        for t in places:
            spec = specs.get(t.symbol)
            frame = planned_thunk_code(self.plan, spec).frame if spec is not None else None
            if frame is None:
                return None
            frames.append(frame)
        return frames

    def _eh_appended(self) -> tuple[bytes, dict[int, str]]:
        """A relocatable file: the entries the rewriter appends to `.eh_frame` for its new
        thunks, and the offset of each FDE's address field -> the thunk it names."""
        if self._eh_new is None:
            from ..rewrite.unwind import eh_frame_entries

            o = self.o.section(EH_FRAME)
            places = sorted((t for t in self.thunk_places if t.section == self.thunk_name),
                            key=lambda t: (t.nth, t.offset))
            frames = self._frames(places)
            if o is None or frames is None or not places:
                self._eh_new = (b"", {})
            else:
                entries = eh_frame_entries(self.o.arch, frames)
                self._eh_new = (entries.data, {o.size + f: t.symbol for f, t in
                                               zip(entries.pc_fields, places, strict=True)})
        return self._eh_new

    def _eh_frame_field(self, target: Section, row: tuple[int, ...]) -> str | None:
        """The thunk an added `.eh_frame` relocation gives its FDE's address: a PC32
        against the thunk's symbol, addend 0, at the FDE's pc_begin."""
        name = self._eh_appended()[1].get(row[0])
        shift = self.p.cls.info_shift
        key, rtype = row[1] >> shift, row[1] & ((1 << shift) - 1)
        if name is None or rtype != self.p.arch.r_pc32 or key < NEW_SYMBOL:
            return None
        index = key - NEW_SYMBOL
        sym = self.p.symbols[index] if index < len(self.p.symbols) else None
        data = self.pdata(target)
        addend = row[2] if len(row) > 2 else \
            int.from_bytes(data[row[0] : row[0] + 4], "little", signed=True)
        if sym is None or sym.name != name or addend != 0:
            return None
        return name

    def unwind_tables(self, o: Section | None, p: Section) -> None:
        assert o is not None
        od, pd = self.odata(o), self.pdata(p)
        if self.p.is_relocatable:
            if p.name != EH_FRAME:
                self.runs("changed", p, od, pd)
                return
            want, fields = self._eh_appended()
            if pd[: len(od)] != od or pd[len(od) :] != want:
                self.runs("entries changed (only a CIE and an FDE per new thunk may be "
                          "appended)", p, od + want, pd)
                return
            self._claim_fdes(p, len(od), {f: n for f, n in fields.items()})
            return
        from ..rewrite.unwind import UnwindError, eh_frame_entries, eh_frame_hdr, rebase_eh_frame

        word = self.o.arch.ptr_size
        eh = self.p.section(EH_FRAME)
        eh_o = self.o.section(EH_FRAME)
        places = sorted((t for t in self.thunk_places if t.address is not None),
                        key=lambda t: t.address or 0)
        frames = self._frames(places)
        if eh is None or eh_o is None or frames is None or not places:
            self.runs("changed, but no new thunk needs unwind data", p, od, pd)
            return
        try:
            if p.name == EH_FRAME:
                old = rebase_eh_frame(od, o.addr, p.addr, word)
                new = eh_frame_entries(self.o.arch, frames, p.addr + len(old),
                                       [t.address for t in places if t.address is not None])
                want = old + new.data + bytes(4)
                if pd == want:
                    self._claim_fdes(p, len(old), {len(old) + f: t.symbol for f, t in
                                                   zip(new.pc_fields, places, strict=True)})
                    return
            else:
                want = eh_frame_hdr(self.pdata(eh), eh.addr, p.addr, word)
                if pd == want:
                    return
        except UnwindError as exc:
            self.problem(f"cannot be rebuilt to compare: {exc.message}", p, 0)
            return
        self.runs("not the table pvpatch writes (the old entries rebased, one per new "
                  "thunk, a sorted lookup table)", p, want, pd)

    def _orc_appended(self) -> tuple[bytes, dict[int, tuple[str, int]]]:
        """A kernel object: the ORC entries the rewriter appends for its new thunks, and
        for each new `.orc_unwind_ip` slot (its offset) the thunk and addend it names."""
        if self._orc_new is None:
            from ..rewrite.unwind import ORC_IP_SIZE, orc_entries, orc_layout

            self._orc_new = (b"", {})
            ip = self.o.section(ORC_UNWIND_IP)
            header = self.o.section(ORC_HEADER)
            layout = orc_layout(self.odata(header) if header is not None else None)
            places = sorted((t for t in self.thunk_places if t.section == self.thunk_name),
                            key=lambda t: (t.nth, t.offset))
            frames = self._frames(places)
            if ip is None or layout is None or frames is None or not places:
                return self._orc_new
            by_start = {t.offset: t for t in places}
            starts = sorted(by_start)
            entries = orc_entries(layout, [(t.offset, f) for t, f in
                                           zip(places, frames, strict=True)])
            slots = {}
            for k, (where, _e) in enumerate(entries):
                owner = by_start[starts[bisect.bisect_right(starts, where) - 1]]
                slots[ip.size + k * ORC_IP_SIZE] = (owner.symbol, where - owner.offset)
            self._orc_new = (b"".join(e for _w, e in entries), slots)
        return self._orc_new

    def _orc_ip_field(self, target: Section, row: tuple[int, ...]) -> str | None:
        """The thunk an added `.orc_unwind_ip` relocation names: a PC32 against the thunk's
        symbol plus the offset of its entry."""
        want = self._orc_appended()[1].get(row[0])
        shift = self.p.cls.info_shift
        key, rtype = row[1] >> shift, row[1] & ((1 << shift) - 1)
        if want is None or rtype != self.p.arch.r_pc32 or key < NEW_SYMBOL or len(row) < 3:
            return None
        index = key - NEW_SYMBOL
        sym = self.p.symbols[index] if index < len(self.p.symbols) else None
        if sym is None or (sym.name, row[2]) != want:
            return None
        return want[0]

    def orc_tables(self, o: Section | None, p: Section) -> None:
        assert o is not None
        from ..rewrite.unwind import ORC_ENTRY, ORC_IP_SIZE

        od, pd = self.odata(o), self.pdata(p)
        entries, slots = self._orc_appended()
        want = entries if p.name == ORC_UNWIND else bytes(len(slots) * ORC_IP_SIZE)
        if pd[: len(od)] != od or pd[len(od) :] != want:
            self.runs("entries changed (only the new thunks' entries may be appended)", p,
                      od + want, pd)
            return
        if p.name == ORC_UNWIND:
            ip = self.o.section(ORC_UNWIND_IP)
            base = ip.size if ip is not None else 0
            for k in range(len(entries) // ORC_ENTRY.size):
                name = slots[base + k * ORC_IP_SIZE][0]
                self.claim(f"ORC entry of thunk {name}", p, len(od) + k * ORC_ENTRY.size,
                           ORC_ENTRY.size, thunk=name)

    def _claim_fdes(self, p: Section, start: int, fields: Mapping[int, str]) -> None:
        """Each new FDE is as good as the proof of its thunk (verify checks its rules)."""
        for field, name in fields.items():
            self.claim(f"call-frame information of thunk {name}", p, field - 8, 8,
                       thunk=name)

    # segments, gaps, signature ---------------------------------------------------------

    def _segments(self) -> None:
        o, p = self.o, self.p
        a, b = list(o.segments), list(p.segments)
        rows = [(s.type, s.flags, s.offset, s.vaddr, s.paddr, s.filesz, s.memsz, s.align)
                for s in a]
        if len(b) < len(a):
            self.problem("program headers removed", None, None, 0, p.e_phoff)
            return
        for k, (s, q) in enumerate(zip(a, b[: len(a)], strict=True)):
            if (q.type, q.flags, q.offset, q.vaddr, q.paddr, q.filesz, q.memsz, q.align) \
                    == rows[k]:
                continue
            if s.type == q.type == PT_PHDR and q.offset == p.e_phoff and \
                    q.filesz == q.memsz == p.e_phnum * p.e_phentsize:
                continue  # it follows the table into the new segment
            hdr = p.section(EH_FRAME_HDR)
            if s.type == q.type == PT_GNU_EH_FRAME and hdr is not None and \
                    (q.flags, q.align) == (s.flags, s.align) and \
                    (q.offset, q.vaddr, q.filesz, q.memsz) == \
                    (hdr.offset, hdr.addr, hdr.size, hdr.size):
                continue  # it follows the lookup table into the new segment (checked below)
            self.problem(f"program header {k} changed", None, None, 0,
                         p.e_phoff + k * p.e_phentsize)
        extra = b[len(a) :]
        if not extra:
            if (p.e_phoff, p.e_phnum) != (o.e_phoff, o.e_phnum):
                self.problem("program header table moved", None, None, 0, p.e_phoff)
            return
        seg = extra[0]
        loads = [s for s in a if s.type == PT_LOAD]
        clash = any(s.vaddr < seg.vaddr + seg.memsz and seg.vaddr < s.vaddr + s.memsz
                    for s in loads)
        table = (p.e_phoff, p.e_phoff + p.e_phnum * p.e_phentsize)
        # paddr follows the segment it is placed after (a vmlinux is loaded by it)
        last = max(loads, key=lambda s: s.vaddr + s.memsz) if loads else None
        paddr = (seg.vaddr - (last.vaddr - last.paddr)) & ((1 << p.cls.bits) - 1) \
            if last is not None else seg.paddr
        if len(extra) != 1 or seg.type != PT_LOAD or seg.flags != PF_R | PF_X or clash \
                or seg.offset < o.content_end or seg.filesz != seg.memsz \
                or seg.align < PAGE or seg.align & (seg.align - 1) \
                or (seg.vaddr - seg.offset) % seg.align or seg.paddr != paddr \
                or not seg.offset <= table[0] < table[1] <= seg.offset + seg.filesz:
            self.problem("program headers added beyond one R+X PT_LOAD holding the program "
                         "header table and the thunks", None, None, 0, p.e_phoff)
            return
        self.new_segment = (seg.offset, seg.offset + seg.filesz)
        for sec in p.sections:
            oi = self.p2o.get(sec.index)
            moved = sec.name in UNWIND_SECTIONS and oi is not None and \
                o.sections[oi].addr != sec.addr
            if (sec.index not in self.p2o or moved) and sec.size and not (
                    seg.offset <= sec.offset and sec.offset + sec.size <= seg.offset + seg.filesz
                    and seg.vaddr <= sec.addr
                    and sec.addr + sec.size <= seg.vaddr + seg.memsz):
                self.problem(f"section {sec.name} is not inside the new segment", sec, 0)

    def _covered(self, elf: ElfFile) -> list[tuple[int, int]]:
        out = [(0, elf.cls.ehdr.size)]
        if elf.e_phoff and elf.e_phnum:
            out.append((elf.e_phoff, elf.e_phoff + elf.e_phnum * elf.e_phentsize))
        if elf.e_shoff:
            out.append((elf.e_shoff, elf.e_shoff + len(elf.sections) * elf.e_shentsize))
        out += [(s.offset, s.offset + s.file_size) for s in elf.sections if s.file_size]
        out.append((elf.content_end, len(elf.data)))
        return sorted(out)

    def _gaps(self) -> None:
        """Bytes of PATCHED outside every header and section: unchanged, or zeros (a moved
        section's old place, alignment, the new segment's padding), never inside a
        segment the original loads (but where a section there shrank)."""
        o, p = self.o, self.p
        od, pd = o.data, p.data
        loaded = [(s.offset, s.offset + s.filesz) for s in o.segments if s.type == PT_LOAD]
        # Where a section that shrank or moved used to be: zeros there are its old place.
        self.vacated = [(sec.offset, sec.offset + sec.file_size) for sec in o.sections
                        if sec.file_size and sec.index in self.o2p and (
                            (q := p.sections[self.o2p[sec.index]]).offset != sec.offset
                            or q.file_size < sec.file_size)]
        pos = 0
        gaps = []
        for lo, hi in self._covered(p):
            if lo > pos:
                gaps.append((pos, lo))
            pos = max(pos, hi)
        if pos < p.content_end:
            gaps.append((pos, p.content_end))
        cuts = sorted({x for r in (*loaded, *self.vacated) for x in r} | {len(od)})
        for lo, hi in gaps:
            if hi <= len(od) and od[lo:hi] == pd[lo:hi]:
                continue
            # Pieces that are wholly inside or outside each range, each judged alone.
            edges = [lo, *(c for c in cuts if lo < c < hi), hi]
            for a, b in itertools.pairwise(edges):
                self._gap_piece(a, b, loaded, od, pd)

    def _gap_piece(self, lo: int, hi: int, loaded: Sequence[tuple[int, int]], od: Buffer,
                   pd: Buffer) -> None:
        was = od[lo:hi] if lo < len(od) else b""
        now = pd[lo:hi]
        if was == now:
            return
        strict = any(a <= lo < b for a, b in loaded) and not any(
            a <= lo < b for a, b in self.vacated)
        if strict:
            bad = diff_runs(was, now, 1)
        else:  # zeros where bytes were (a moved section, padding, past the original's end)
            padded = was + bytes(len(now) - len(was))
            bad = diff_runs(bytes(len(now)), _not_zeroed(padded, now), 1)
        for a, b in bad:
            self.problem(f"bytes outside every section changed: {_hexes(now[a:b])} (were "
                         f"{_hexes(was[a:b]) or 'past the end'})", None, None, b - a, lo + a)

    def _signature(self) -> None:
        o, p = self.o, self.p
        if o.module_signature is None and p.module_signature is None:
            return
        if o.module_signature is not None and p.module_signature is None:
            how = "removed: it signed the old bytes"
        elif o.module_signature is None:
            how = "added"
        elif o.data[o.content_end :] == p.data[p.content_end :]:
            return
        else:
            how = "replaced"
        self.notes.append(SectionNote("(module signature)", "signature", how))


def account(plan: Plan, patched: ElfFile) -> Accounting:
    """Compare `patched` with the file `plan` was made from: the sites whose bytes or
    relocations differ, the thunks it holds, and every other difference either
    explained (a note per section), conditional on a proof (a claim), or a problem."""
    return _Accountant(plan, patched).run()
