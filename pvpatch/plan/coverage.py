"""Which run-time patchers cover each site, what the kernel will do there, and the table
edits that leave pvpatch's bytes in place (`--final`).

The kernel rewrites paravirt sites itself at boot (vmlinux) and at module load:
`apply_paravirt` re-patches every `.parainstructions` entry to its own choice, and
`apply_alternatives` copies an `.altinstructions` entry's replacement over the site when
its feature test passes (5.13-6.7 carry an `ALT_NOT(X86_FEATURE_XENPV)` entry holding the
native instruction next to most paravirt entries; 6.8+ turn the call itself into a
DIRECT_CALL entry).  Whatever pvpatch wrote at a site survives only if every such entry
is skipped.  This module is pure data and decoding: a `Cover` per entry at a site, a
`SiteCoverage` per site, and the `TableEdit`s the rewriter applies.
"""

from __future__ import annotations

import bisect
import functools
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from ..elf.reader import SHT_NOBITS
from ..record import fast_init, record
from ..scan import altinstr
from ..scan.sites import RelocIndex

if TYPE_CHECKING:
    from ..rules import Finding
    from ..scan.sites import Site
    from ..scan.stage import ScanResult
    from .stage import Decision, Plan

Effect = Literal["repatch", "overwrite", "skip"]
Outcome = Literal["pvpatch", "kernel", "native", "depends"]
EditKind = Literal["drop", "neutralise", "copy"]


@record
class EntryKind:
    """What one kind of table entry makes the kernel do at its site."""

    name: str
    patcher: str  # the kernel function that applies it
    effect: Effect
    says: str  # for the report


# What each table/entry kind makes the kernel do (arch/x86/kernel/alternative.c).
ENTRY_KINDS: Mapping[str, EntryKind] = MappingProxyType({k.name: k for k in (
    EntryKind("paravirt", "apply_paravirt", "repatch",
              "re-patched to the kernel's own choice (a call to the slot's run-time target, "
              "or NOPs)"),
    EntryKind("direct-call", "apply_alternatives", "repatch",
              "re-patched to the kernel's own choice (a call to the slot's run-time target, "
              "or NOPs); BUG() unless the site is still `call *pv_ops+off`"),
    EntryKind("alternative", "apply_alternatives", "overwrite",
              "overwritten with the entry's replacement when its feature test passes"),
    EntryKind("skipped", "apply_alternatives", "skip",
              "skipped (NOT X86_FEATURE_ALWAYS): only runs of 0x90 are merged into long NOPs"),
    EntryKind("site-list", "(see SITE_LISTS)", "overwrite",
              "rewritten when the boot options or CPU call for it"),
)})


@record
class SiteList:
    """A table of places other kernel code patches at boot or load: each entry's first
    field is an s32 self-relative pointer to the place (a PC32 relocation in .o/.ko)."""

    section: str
    size: int  # bytes of the entry without pointer-sized fields
    ptrs: int  # pointer-sized fields (a `long` key)
    patcher: str
    what: str


# Other run-time patchers (arch/x86/kernel/alternative.c, callthunks.c, jump_label.c,
# static_call.c).  None of them names a paravirt call site in Debian's 6.1 or 6.12 images or
# modules; one inside a rewritten site would rewrite pvpatch's bytes, so --final refuses it.
SITE_LISTS: tuple[SiteList, ...] = (
    SiteList(".retpoline_sites", 4, 0, "apply_retpolines", "a retpoline call or jump"),
    SiteList(".return_sites", 4, 0, "apply_returns", "a `jmp __x86_return_thunk`"),
    SiteList(".call_sites", 4, 0, "callthunks_patch_builtin_calls",
             "a direct call, sent to the callee's accounting thunk (retbleed=stuff)"),
    SiteList(".ibt_endbr_seal", 4, 0, "apply_seal_endbr", "an ENDBR64 sealed under IBT"),
    SiteList(".smp_locks", 4, 0, "alternatives_smp_lock", "a LOCK prefix"),
    SiteList(".static_call_sites", 8, 0, "static_call_init", "a static call"),
    SiteList("__jump_table", 8, 1, "jump_label_init", "a static-key jump or NOP"),
)


@record
class Feature:
    """A CPU feature bit an alternative tests, and whether the modelled machine has it.

    The model is bare metal or an HVM guest with native spinlocks (QEMU/KVM without
    paravirt spinlocks): `None` where that does not decide it."""

    name: str
    present: bool | None
    when: str


FEATURES: Mapping[int, Feature] = MappingProxyType({
    altinstr.X86_FEATURE_ALWAYS: Feature("ALWAYS", True, "always set"),
    8 * 32 + 16: Feature("XENPV", False, "set only in a Xen PV guest"),
    8 * 32 + 20: Feature("PVUNLOCK", False, "set when paravirt spinlocks are in use"),
    8 * 32 + 21: Feature("VCPUPREEMPT", False, "set when a hypervisor reports vCPU preemption"),
})

# Order in which the kernel applies the tables, by the era the `.altinstructions` layout
# says (alternative.c `alternative_instructions`, module.c `module_finalize`): before 5.13
# alternatives ran first, so apply_paravirt had the last word; from 5.13 the other way.
APPLY_ORDER: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "linux-alt-4.1": ("altinstructions", "paravirt"),
    "linux-alt-5.13": ("paravirt", "altinstructions"),
    "linux-alt-6.3": ("paravirt", "altinstructions"),
})


# The NOPs the kernel pads an applied alternative with (`x86_nops[]`, asm/nops.h, one
# table per architecture since 5.13; add_nops writes chunks of at most 8 bytes).  Before
# 5.13 the table was chosen at boot by CPU model (`ideal_nops`): no prediction then.
KERNEL_NOPS: Mapping[str, tuple[bytes, ...]] = MappingProxyType({
    "x86_64": tuple(bytes.fromhex(h) for h in (
        "", "90", "6690", "0f1f00", "0f1f4000", "0f1f440000", "660f1f440000",
        "0f1f8000000000", "0f1f840000000000")),
    "i386": tuple(bytes.fromhex(h) for h in (
        "", "90", "89f6", "8d7600", "8d742600", "3e8d742600", "8db600000000",
        "8db42600000000", "3e8db42600000000")),
})
FIXED_NOPS_ERAS = frozenset({"linux-alt-5.13", "linux-alt-6.3"})


@functools.cache  # a handful of lengths, asked for at every predicted site
def kernel_nops(arch: str, length: int) -> bytes:
    """`add_nops(length)` of 5.13+ kernels."""
    table = KERNEL_NOPS[arch]
    out = bytearray()
    while length > 0:
        step = min(length, len(table) - 1)
        out += table[step]
        length -= step
    return bytes(out)


@fast_init
@record
class TableEdit:
    """One planned change to one table entry, so the kernel no longer touches a site.

    drop: the entry is removed (relocatable files; its relocations go with it).
    neutralise: `data` is written at `at` (the feature word: NOT X86_FEATURE_ALWAYS).
    copy: the whole entry becomes `data`, a copy of kept entry `source` (linked
    `.parainstructions`: re-applying an entry is idempotent, see `_copy_edit`)."""

    section: str
    section_index: int
    index: int
    kind: EditKind
    at: int = 0  # offset inside the table section of the bytes written
    data: bytes = b""
    source: int | None = None
    stride: int = 0


@fast_init
@record
class Cover:
    """One table entry whose range overlaps a site."""

    section: str
    index: int
    kind: str  # a key of ENTRY_KINDS
    start: int  # of the entry's range, inside the site's section
    length: int
    feature: int | None = None
    negate: bool = False
    replacement: bytes | None = None  # when the file holds its final bytes
    edit: TableEdit | None = None

    @property
    def applies(self) -> bool | None:
        """Whether the kernel applies the entry on the modelled machine (None: depends)."""
        if self.edit is not None or self.kind == "skipped":
            return False
        if self.kind == "site-list":
            return None  # boot options and CPU decide
        if self.kind != "alternative":
            return True
        feat = FEATURES.get(self.feature) if self.feature is not None else None
        if feat is None or feat.present is None:
            return None
        return feat.present != self.negate

    def describe(self, *, indexed: bool = True) -> str:
        """What the entry does; `indexed=False` leaves out its index (for a line that
        speaks for several sites alike)."""
        what = f"{self.section}[{self.index}]" if indexed else self.section
        if self.edit is not None:
            return f"{what} {self.edit.kind} -> skipped"
        if self.kind == "alternative" and self.feature is not None:
            feat = FEATURES.get(self.feature)
            name = feat.name if feat else f"feature {self.feature}"
            test = f"NOT {name}" if self.negate else name
            when = f" ({feat.when})" if feat else ""
            return f"{what} {test}{when}: {ENTRY_KINDS[self.kind].says}"
        return f"{what}: {ENTRY_KINDS[self.kind].says}"


@fast_init
@record
class SiteCoverage:
    """The table entries that cover one site (`site_index`, its index in the scan) and what the
    kernel leaves there; `rewritten`: the plan rewrites the site."""

    site_index: int
    covers: tuple[Cover, ...]  # in the order the kernel applies them
    outcome: Outcome  # what the site holds once the kernel has run, on the modelled machine
    predicted: bytes | None  # those bytes when the file decides them
    rewritten: bool

    def says(self) -> str:
        return OUTCOME_SAYS[self.outcome]


OUTCOME_SAYS: Mapping[str, str] = MappingProxyType({
    "pvpatch": "pvpatch's bytes run",
    "kernel": "the kernel re-patches it to its own choice",
    "native": "the kernel overwrites it with its native replacement",
    "depends": "depends on CPU features the model does not fix",
})


@record
class Coverage:
    """What the kernel does at every site of a plan (`sites`, by site index: a kept site's is
    made on first lookup), and the table edits that keep it off the rewritten ones."""

    sites: Mapping[int, SiteCoverage]
    edits: tuple[TableEdit, ...]
    problems: tuple[str, ...]  # edits --final needs but cannot make (the rewriter refuses)


# -- decoding -------------------------------------------------------------------------


@record
class _AltTable:
    """The file's `.altinstructions` when it is not the site table, decoded once: `spans` finds
    the entries at a site; `repl_relocs` (relocatable files) shows which replacements are
    relocated, so their bytes are not final."""

    section_name: str
    section_index: int
    decoded: altinstr.Decoded
    layout: altinstr.AltLayout
    # section index -> (start, entry index) of the entries that point there, sorted
    spans: Mapping[int, list[tuple[int, int]]]
    repl_relocs: Mapping[int, RelocIndex]  # replacement section -> its relocations

    def overlapping(self, site: Site) -> list[int]:
        return _overlapping(self, site)

    def head(self, j: int, site: Site) -> tuple[str, int, int]:
        """Entry j's kind, start and length, before its `Cover` is made."""
        d = self.decoded
        loc = d.instr[j]
        assert loc is not None
        return _kind(d.feature[j], d.flags[j]), loc[1], d.instrlen[j]

    def cover(self, scan: ScanResult, site: Site, j: int, kind: str,
              edit: TableEdit | None) -> Cover:
        """Entry j's `Cover` (`kind` as `head` said)."""
        return _alt_cover(scan, self, j, kind, edit)


def _alt_table(scan: ScanResult) -> _AltTable | None:
    elf = scan.elf
    sec = elf.section(altinstr.SECTION)
    if sec is None or sec.type == SHT_NOBITS or not sec.size:
        return None
    found = altinstr.probe(elf, sec)
    if isinstance(found, str):
        return None
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, loc in enumerate(found.instr):
        if loc is not None:
            spans.setdefault(loc[0], []).append((loc[1], i))
    for rows in spans.values():
        rows.sort()
    relocs: dict[int, RelocIndex] = {}
    if elf.is_relocatable:
        for index in {loc[0] for loc in found.repl if loc is not None}:
            relocs[index] = RelocIndex(list(elf.relocations_for(elf.sections[index])))
    return _AltTable(sec.name, sec.index, found, found.layout, spans, relocs)


def _alt_cover(scan: ScanResult, t: _AltTable, j: int, kind: str, edit: TableEdit | None
               ) -> Cover:
    d = t.decoded
    feature, flags, repllen = d.feature[j], d.flags[j], d.repllen[j]
    loc = d.instr[j]
    assert loc is not None
    repl = None
    rloc = d.repl[j]
    if kind == "alternative" and rloc is not None:
        rsec = scan.elf.sections[rloc[0]]
        index = t.repl_relocs.get(rloc[0])
        relocated = index is not None and bool(index.between(rloc[1], rloc[1] + repllen))
        if not relocated and rloc[1] + repllen <= rsec.size:
            raw = scan.elf.section_data(rsec)
            repl = bytes(raw[rloc[1] : rloc[1] + repllen])
    return Cover(t.section_name, j, kind, loc[1], d.instrlen[j], feature,
                 bool(flags & altinstr.ALT_FLAG_NOT), repl, edit)


class _OwnAlt:
    """The 6.8+ family's own table: the entries at a site are the scan's (`entry_indices`;
    an entry overlapping a site without starting at it makes the site unsafe, never
    rewritten), read straight from the table without decoding its pointers again."""

    def __init__(self, scan: ScanResult) -> None:
        table = scan.table
        assert table is not None
        self.section_name = table.section.name
        self.section_index = table.section.index
        self.layout = altinstr.ALT_LAYOUTS[table.layout.name]
        data = scan.elf.section_data(table.section)
        # Columns, not an object per entry: a vmlinux has ten thousand.
        _instr, _repl, self.feature, self.flags, self.instrlen, self.repllen = \
            self.layout.columns(bytes(data[: len(data) - len(data) % self.layout.stride]))

    def overlapping(self, site: Site) -> list[int]:
        return list(site.entry_indices)

    def head(self, j: int, site: Site) -> tuple[str, int, int]:
        """Entry j's kind, start and length, before its `Cover` is made."""
        return _kind(self.feature[j], self.flags[j]), site.offset, self.instrlen[j]

    def cover(self, scan: ScanResult, site: Site, j: int, kind: str,
              edit: TableEdit | None) -> Cover:
        feature, flags = self.feature[j], self.flags[j]
        negate = bool(flags & altinstr.ALT_FLAG_NOT)
        # The scan read the native replacement of the one NOT-paravirt entry (if final).
        repl = site.native if kind == "alternative" and negate and \
            feature in altinstr.PARAVIRT_FEATURES and site.native is not None and \
            len(site.native) == self.repllen[j] else None
        return Cover(self.section_name, j, kind, site.offset, self.instrlen[j], feature, negate,
                     repl, edit)


def _kind(feature: int, flags: int) -> str:
    if flags & altinstr.ALT_FLAG_DIRECT_CALL:
        return "direct-call"
    if (feature, flags & altinstr.ALT_FLAG_NOT) == altinstr.NEUTRAL_FLAGS:
        return "skipped"
    return "alternative"


def _overlapping(t: _AltTable, site: Site) -> list[int]:
    d = t.decoded
    rows = t.spans.get(site.section_index, [])
    out = []
    # An entry is at most 255 bytes long (u8 instrlen).
    k = bisect.bisect_left(rows, (site.offset - 255, -1))
    while k < len(rows) and rows[k][0] < site.end:
        start, j = rows[k]
        k += 1
        if start + d.instrlen[j] > site.offset:
            out.append(j)
    return out


def _site_list_places(scan: ScanResult, rewritten: Iterable[Site]
                      ) -> dict[int, list[tuple[str, int, int]]]:
    """Rewritten site index -> (section, entry index, offset) of each SITE_LISTS entry
    that points inside it."""
    elf = scan.elf
    sites = list(rewritten)
    if not sites:
        return {}
    found: dict[int, list[tuple[str, int, int]]] = {}
    # Every byte of every rewritten site: (section index, offset) in relocatable files,
    # the address in linked ones (a vmlinux lists some 230,000 call sites).
    if elf.is_relocatable:
        rel_bytes = {(s.section_index, off): s for s in sites for off in range(s.offset, s.end)}
    else:
        abs_bytes = {a: s for s in sites if s.address is not None
                     for a in range(s.address, s.address + s.len)}
    for lst in SITE_LISTS:
        sec = elf.section(lst.section)
        if sec is None or sec.type == SHT_NOBITS:
            continue
        stride = lst.size + lst.ptrs * elf.arch.ptr_size
        if elf.is_relocatable:
            for r in elf.relocations_for(sec):
                sym = elf.symbol(r.sym)
                if r.offset % stride or not sym.defined:
                    continue
                site = rel_bytes.get((sym.section_index, sym.value + r.addend))
                if site is not None:
                    found.setdefault(site.index, []).append(
                        (lst.section, r.offset // stride, sym.value + r.addend))
            continue
        data = elf.section_data(sec)
        count = len(data) // stride
        firsts = struct.unpack_from(f"<{count * stride // 4}i", data)[:: stride // 4]
        # In bulk: every entry's target, then only the few inside a site looked at again.
        targets = [f + at for f, at in zip(firsts, range(sec.addr, sec.addr + count * stride,
                                                         stride), strict=True)]
        inside = abs_bytes.keys() & set(targets)
        for k, addr in enumerate(targets):
            if addr in inside:
                site = abs_bytes[addr]
                assert site.address is not None
                found.setdefault(site.index, []).append(
                    (lst.section, k, site.offset + addr - site.address))
    return found


# -- edits ----------------------------------------------------------------------------


def _alt_edit(relocatable: bool, t: _AltTable | _OwnAlt, j: int, drop: bool
              ) -> TableEdit | str:
    """`drop`: remove the entry (relocatable files), else make it test NOT ALWAYS."""
    lay = t.layout
    # An era without a NOT flag (4.1-5.12) cannot skip an entry in place: only dropping it
    # (relocatable files) keeps the kernel off the site.
    if relocatable and (drop or lay.neutral is None):
        return TableEdit(t.section_name, t.section_index, j, "drop", stride=lay.stride)
    if lay.neutral is None:
        return (f"{t.section_name} entry {j} ({lay.name}) has no NOT flag, so it cannot be "
                "made one the kernel skips in place")
    at, data = lay.neutral
    return TableEdit(t.section_name, t.section_index, j, "neutralise", j * lay.stride + at,
                     data, stride=lay.stride)


def _copy_edit(scan: ScanResult, site: Site, kept: int | None) -> TableEdit | str:
    """A linked `.parainstructions` entry of a rewritten site becomes a copy of a kept
    entry.  The kernel walks the table between bounds compiled into its code, so no entry
    can go; a zero length BUG()s in apply_paravirt.  apply_paravirt computes an entry's
    bytes from (type, pv_ops[type], address, len) alone, never from what the site holds,
    and nothing else writes that site between two entries of one walk: applying the kept
    entry twice leaves exactly what applying it once does."""
    table = scan.table
    assert table is not None
    sec = table.section
    if kept is None:
        return (f"every {sec.name} entry covers a rewritten site: none is left to copy over "
                "them (the kernel walks the whole table, so none can be removed)")
    if scan.elf.relocation_sections(sec):
        return (f"{sec.name} has relocations (a vmlinux linked with --emit-relocs): a copied "
                "entry's pointer would not be relocated with the kernel")
    stride = table.entry_size
    raw = scan.elf.section_data(sec)
    data = bytes(raw[kept * stride : (kept + 1) * stride])
    if len(data) != stride:
        return f"{sec.name} entry {kept} is short"
    return TableEdit(sec.name, sec.index, site.index, "copy", site.index * stride, data,
                     kept, stride)


def _own_edit(scan: ScanResult, site: Site, j: int, *, final: bool, drop: bool,
              kept: int | None) -> TableEdit | str | None:
    """The edit of an entry of the file's own site table at a rewritten site."""
    table = scan.table
    assert table is not None
    relocatable = scan.elf.is_relocatable
    if table.family == "paravirt":
        if relocatable and (final or drop):
            return TableEdit(table.section.name, table.section.index, j, "drop",
                             stride=table.entry_size)
        if not relocatable and final:
            return _copy_edit(scan, site, kept)
        return None
    return None  # .altinstructions: decoded as an alternatives table (`_alt_edit`)


# -- the model --------------------------------------------------------------------------


def _predict(scan: ScanResult, site: Site, cover: Cover, era: str) -> bytes | None:
    """What an applied alternative leaves at the site: the replacement, padded with 0x90
    that the kernel merges into its long NOPs (`optimize_nops`, `add_nops`)."""
    if cover.replacement is None or cover.start != site.offset or cover.length != site.len \
            or len(cover.replacement) > site.len or era not in FIXED_NOPS_ERAS \
            or scan.arch.name not in KERNEL_NOPS:
        return None
    return cover.replacement + kernel_nops(scan.arch.name, site.len - len(cover.replacement))


def build(scan: ScanResult, decisions: Iterable[Decision], *, final: bool = False,
          drop_patched: bool = False) -> Coverage:
    """Every entry covering each site, the edits for rewritten sites, and the outcome."""
    model = _Model(scan, list(decisions), final, drop_patched)
    # The model is not told its `_Sites`, which holds it (for the kept sites made on
    # lookup): no reference cycle, so a file's whole model is freed by reference counting
    # once its plan goes (a tree of modules is patched one file after another).
    sites = _Sites(model.made, {d.site.index: d for d in model.decisions}, model.site)
    return Coverage(sites, tuple(model.edits), tuple(model.problems))


class _Model:
    """The kernel's patchers at each site.  A rewritten site is modelled at once, since its
    table edits are the rewriter's input; a kept site, which no edit or problem comes from,
    only when it is looked up (`_Sites`): a vmlinux keeps some 1,700 sites that a text
    report never asks about."""

    def __init__(self, scan: ScanResult, decisions: list[Decision], final: bool,
                 drop_patched: bool) -> None:
        self.scan = scan
        self.final = final
        self.drop = drop_patched
        rewritten = {d.site.index for d in decisions if d.rewrites}
        self.own_alt = scan.family == "altinstructions"
        self.alt = _OwnAlt(scan) if self.own_alt else _alt_table(scan)
        self.era = self.alt.layout.name if self.alt is not None else ""
        order = APPLY_ORDER.get(self.era, APPLY_ORDER["linux-alt-6.3"])
        self.kept = None
        if scan.family == "paravirt" and not scan.elf.is_relocatable and final:
            covered = {j for s in scan.sites if s.index in rewritten for j in s.entry_indices}
            table = scan.table
            assert table is not None
            self.kept = next((i for i in range(table.count) if i not in covered), None)
        self.edits: list[TableEdit] = []
        self.problems: list[str] = []
        self.seen: set[tuple[str, int]] = set()
        # Each list names instructions of one form (a direct call, a LOCK prefix...) that
        # a paravirt site never holds, so only a lying table puts an entry there: looked
        # for when --final promises pvpatch's bytes (a vmlinux lists some 300,000 places).
        self.listed = _site_list_places(scan, (d.site for d in decisions if d.rewrites)) \
            if final else {}
        # Loop invariants hoisted: `site` runs once per site, thousands of times a vmlinux.
        self.own_table = scan.table if scan.family == "paravirt" else None
        self.alt_first = order.index("altinstructions") < order.index("paravirt")
        self.silence = self.own_alt or final  # which alternatives a rewrite silences
        self.relocatable = scan.elf.is_relocatable
        self.effect = {name: k.effect for name, k in ENTRY_KINDS.items()}
        made = {d.site.index: self.site(d, True) for d in decisions if d.rewrites}
        self.decisions = decisions
        self.made = made

    def add(self, edit: TableEdit | str | None) -> TableEdit | None:
        if isinstance(edit, str):
            if edit not in self.problems:
                self.problems.append(edit)
            return None
        if edit is not None and (edit.section, edit.index) not in self.seen:
            self.seen.add((edit.section, edit.index))
            self.edits.append(edit)
        return edit

    def site(self, d: Decision, is_rw: bool) -> SiteCoverage:
        """One site's coverage; at a rewritten site, the edits it needs are added."""
        scan, site, alt = self.scan, d.site, self.alt
        index = site.index
        own: tuple[Cover, ...] = ()
        if self.own_table is not None:
            edit = self.add(_own_edit(scan, site, index, final=self.final, drop=self.drop,
                                      kept=self.kept)) if is_rw else None
            own = (Cover(self.own_table.section.name, index, "paravirt", site.offset,
                         site.len, edit=edit),)
        alts: list[Cover] = []
        if alt is not None:
            for j in alt.overlapping(site):
                kind, start, length = alt.head(j, site)
                edit = None
                # The 6.8+ family's own entries are always silenced at a rewritten site
                # (the kernel BUG()s or undoes it); others only with --final.
                if is_rw and self.silence and kind != "skipped":
                    if start != site.offset and not self.own_alt:
                        self.problems.append(
                            f"{alt.section_name} entry {j} spans {site.section}"
                            f"+{start:#x}..{start + length:#x}, beyond the site at "
                            f"+{site.offset:#x}: disabling it would change other code")
                    else:
                        edit = self.add(_alt_edit(self.relocatable, alt, j, self.drop))
                alts.append(alt.cover(scan, site, j, kind, edit))
        ordered = (*alts, *own) if self.alt_first else (*own, *alts)
        listed = self.listed.get(index) if is_rw else None
        if listed:
            others = tuple(Cover(name, j, "site-list", off, 1) for name, j, off in listed)
            self.problems.append(f"{others[0].section} entry {others[0].index} names "
                                 f"{site.section}+{others[0].start:#x}, inside a rewritten "
                                 "site: the kernel would patch pvpatch's bytes there")
            ordered += others
        outcome: Outcome = "pvpatch"
        predicted = d.code if is_rw else site.code
        effect = self.effect
        for c in ordered:
            applies = c.applies
            if applies is False:
                continue
            if applies is None:
                outcome, predicted = "depends", None
            elif effect[c.kind] == "repatch":
                outcome, predicted = "kernel", None
            else:
                outcome, predicted = "native", _predict(scan, site, c, self.era)
        if outcome == "pvpatch" and is_rw and d.code is None:
            predicted = None  # a call or thunk: its bytes are known once the rewrite runs
        return SiteCoverage(index, ordered, outcome, predicted, is_rw)


class _Sites(Mapping[int, SiteCoverage]):
    """Site index -> its coverage, in decision order; a kept site's is made on its first
    lookup (`_Model`).  Pickled as the plain dict of every site: a `Coverage` stays plain
    data."""

    def __init__(self, made: dict[int, SiteCoverage], decisions: dict[int, Decision],
                 make: Callable[[Decision, bool], SiteCoverage]) -> None:
        self._made = made
        self._decisions = decisions  # every site's, in order
        self._make: Callable[[Decision, bool], SiteCoverage] | None = make

    def __getitem__(self, index: int) -> SiteCoverage:
        sc = self._made.get(index)
        if sc is None:
            d = self._decisions[index]  # KeyError: not a site of this plan
            assert self._make is not None and not d.rewrites
            sc = self._made[index] = self._make(d, False)
            if len(self._made) == len(self._decisions):
                self._make = None  # every site made: the model can go
        return sc

    def __iter__(self) -> Iterator[int]:
        return iter(self._decisions)

    def __len__(self) -> int:
        return len(self._decisions)

    def __reduce__(self) -> tuple[type[dict[int, SiteCoverage]], tuple[dict[int, SiteCoverage]]]:
        return dict, (dict(self.items()),)


def of_scan(scan: ScanResult) -> Coverage:
    """What the kernel does at each site of a file as it is (nothing rewritten)."""
    from .stage import Decision

    return build(scan, [Decision(s, "keep") for s in scan.sites])


def of_plan(plan: Plan) -> Coverage:
    return build(plan.scan, plan.decisions, final=plan.final, drop_patched=plan.drop_patched)


def _same_but_nops(plan: Plan, sc: SiteCoverage, code: bytes | None) -> bool:
    """The kernel writes pvpatch's very instructions there (its NOP padding may differ:
    i386 kernels pad with `lea` forms, pvpatch with `nopl`)."""
    if sc.predicted is None or code is None:
        return False
    if sc.predicted == code:
        return True
    repl = next((c.replacement for c in reversed(sc.covers)
                 if c.applies and c.replacement is not None), None)
    if repl is None or not code.startswith(repl):
        return False
    tail = code[len(repl):]
    return sc.predicted.startswith(repl) and (not tail or plan.arch.is_nop_fill(tail))


def runtime_findings(plan: Plan) -> list[Finding]:
    """PV206 for each rewritten site the kernel will rewrite again, to other bytes than
    pvpatch's (a native backend's inline form that the kernel writes too is no loss)."""
    if plan.final or plan.scan.family != "paravirt" \
            or not any(d.rewrites for d in plan.decisions):
        return []  # the 6.8+ family's entries at rewritten sites are always neutralised
    from ..scan.sites import site_finding

    cov = plan.coverage
    out = []
    seen: set[tuple[int, int]] = set()  # duplicate entries name one site: one finding
    for d in plan.decisions:
        if not d.rewrites:
            continue
        sc = cov.sites.get(d.site.index)
        where = (d.site.section_index, d.site.offset)
        if sc is None or sc.outcome == "pvpatch" or where in seen:
            continue
        seen.add(where)
        if _same_but_nops(plan, sc, d.code):
            continue
        tables = ", ".join(f"{c.section}[{c.index}]" for c in sc.covers
                           if c.applies is not False)
        out.append(site_finding("PV206", d.site, f"{d.action} rewrite undone at run time: "
                                f"{sc.says()} ({tables}); patch with --final"))
    return out
