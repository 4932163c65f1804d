"""The rewrite stage: apply a plan to the file's bytes, relocations and symbols.

Relocatable files: relocations inside a rewritten site are removed (else the
linker would write into the new bytes), a direct call gets its own relocation,
missing targets become undefined symbols, thunks go into a new section with
local FUNC symbols (inserted before the globals, every symbol index remapped).

Linked files: bytes are rewritten in place, call displacements computed from
addresses, dynamic relocations inside rewritten sites are neutralised, and
thunks go into a new read+execute PT_LOAD segment past the existing ones (never in
a kernel image, which knows nothing past its end).

Table entries at rewritten sites are edited as the plan's coverage says
(`pvpatch.plan.coverage`): dropped with their relocations, neutralised in place, or (linked
`.parainstructions`, --final) replaced by a copy of a kept entry.

Everything else stays byte-identical: changed sections that still fit are
written in place, grown ones and new ones are appended.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from functools import cached_property
from typing import NamedTuple

from ..arch import Arch
from ..elf.reader import (
    PF_R,
    PF_X,
    PT_LOAD,
    PT_PHDR,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_PROGBITS,
    SHT_REL,
    SHT_RELA,
    SHT_RELR,
    STB_GLOBAL,
    STB_LOCAL,
    STT_FUNC,
    STT_NOTYPE,
    STT_SECTION,
    Buffer,
    ElfFile,
    Relocation,
    Section,
    Symbol,
)
from ..elf.writer import (
    DT_REL,
    DT_RELA,
    DT_RELACOUNT,
    DT_RELCOUNT,
    DT_RELRSZ,
    ElfWriter,
    NewSymbol,
    SymbolTable,
    align_up,
    dynamic_entries,
    encode_relr,
    pack_program_header,
    pack_relocations,
)
from ..errors import RewriteError
from ..plan.coverage import TableEdit
from ..plan.stage import CALL_LEN, Decision, Plan, ThunkSpec
from ..plan.targets import resolve_target
from ..record import fast_init, record
from .thunk import (
    PLAIN,
    THUNK_ALIGN,
    Conventions,
    ReturnForm,
    ThunkCode,
    file_conventions,
    lay_out_thunks,
    thunk_code,
)

EH_FRAME = ".eh_frame"
EH_FRAME_HDR = ".eh_frame_hdr"
ORC_UNWIND, ORC_UNWIND_IP, ORC_HEADER = ".orc_unwind", ".orc_unwind_ip", ".orc_header"
ORC_ARCHES = ("x86_64",)  # the kernel's ORC unwinder exists for x86-64 only
PT_GNU_EH_FRAME = 0x6474E550


@record
class _LinkedUnwind:
    """A linked file's new `.eh_frame` and `.eh_frame_hdr` (section index, address, bytes)."""

    eh_index: int
    eh_addr: int
    eh: bytes
    hdr_index: int
    hdr_addr: int
    hdr: bytes

    old_eh: tuple[int, int]  # the old .eh_frame's address and where its entries end
    old_hdr: int  # the old .eh_frame_hdr's address

    @property
    def end(self) -> int:
        return self.hdr_addr + len(self.hdr)

    def moves(self, elf: ElfFile) -> dict[int, Callable[[int], int]]:
        """Section index -> where an address in the old table is in the new one: the
        entries keep their offsets, what followed them (the terminator) follows the new
        ones; the header's fields keep theirs."""
        (old, end), tail = self.old_eh, len(self.eh) - 4

        def eh(value: int) -> int:
            off = value - old
            return self.eh_addr + (off if off < end else tail + off - end)

        def hdr(value: int) -> int:
            return self.hdr_addr + value - self.old_hdr

        return {self.eh_index: eh, self.hdr_index: hdr}

PAGE = 0x1000
MAX_FILE_PAD = 16 << 20  # most zero padding a linked file may grow by to place thunks


@fast_init
@record
class SitePatch:
    """One site of the plan as the rewrite left it: its bytes before and after (the same for a
    kept site)."""

    decision: Decision
    before: bytes
    after: bytes
    already: bool  # the site was in the planned form already: nothing to do


@record
class PlacedThunk:
    """A planned thunk where the output holds it: `size` bytes at `offset` in `section` (and at
    `address` in a linked file); added by this rewrite, or left by an earlier run and reused."""

    spec: ThunkSpec
    section: str
    offset: int
    address: int | None
    size: int
    conventions: Conventions = PLAIN  # how it returns (thunks of an earlier run: unknown)


class SiteRelocation(NamedTuple):
    """A relocation inside a site: its relocation section, its position there, the entry."""

    section: int
    position: int
    relocation: Relocation


@record
class NewThunk:
    """A thunk this rewrite adds: where it goes, and its code (branches not yet bound)."""

    placed: PlacedThunk
    code: ThunkCode


def _thunk_section(thunks: Iterable[NewThunk], bodies: Iterable[bytes]) -> bytearray:
    """The thunk section's bytes: each body at its thunk's offset, zeros between."""
    code = bytearray()
    for t, body in zip(thunks, bodies, strict=True):
        code += bytes(t.placed.offset - len(code)) + body
    return code


@record
class Rewrite:
    """The result of applying a plan: the output file, in memory.

    The output is either a whole new image or, when the layout did not change,
    the input with `edits` (file offset, new bytes) applied; `data` builds the
    bytes on first use, and `pvpatch.write_output` writes edits without it.
    """

    plan: Plan = field(repr=False)
    image: bytes | None = field(repr=False)
    edits: tuple[tuple[int, bytes], ...]
    patches: tuple[SitePatch, ...]
    thunks: tuple[PlacedThunk, ...]
    signature_removed: bool
    dropped_entries: int
    signed: bool = False  # the output carries a new module signature
    neutralised_entries: int = 0  # table entries made ones the kernel skips
    # linked .parainstructions entries replaced by a copy of a kept entry (--final)
    copied_entries: int = 0
    # Unwind data the new thunks got: "eh_frame", "orc", or "none: why" ("" no new thunks).
    unwind: str = ""

    def with_image(self, image: bytes, *, signed: bool = False) -> Rewrite:
        """The same rewrite with its output replaced (signed, or altered by a test)."""
        return dataclasses.replace(self, image=image, edits=(), signed=signed)

    @property
    def _input(self) -> Buffer:
        """The input file's bytes, which `edits` apply to."""
        return self.plan.scan.elf.data

    @cached_property
    def data(self) -> bytes:
        if self.image is not None:
            return self.image
        out = bytearray(self._input)
        for offset, new in self.edits:
            out[offset : offset + len(new)] = new
        return bytes(out)

    @property
    def changed(self) -> bool:
        if self.image is None:
            base = self._input
            return any(base[o : o + len(b)] != b for o, b in self.edits)
        base = self._input
        return len(self.image) != len(base) or self.image != base[:]  # base may be a map


def _result(plan: Plan, output: ElfWriter | None, patches: list[SitePatch],
            thunks: Iterable[PlacedThunk], signature_removed: bool, dropped: int,
            neutralised: int = 0, unwind: str = "", copied: int = 0) -> Rewrite:
    image = output.build() if output is not None else None
    edits = tuple(output.edits) if output is not None and image is None else ()
    return Rewrite(plan, image, edits, tuple(patches), tuple(thunks), signature_removed, dropped,
                   neutralised_entries=neutralised, unwind=unwind, copied_entries=copied)


# Sections only a kernel image (vmlinux) has: init code freed after boot, its export table.
KERNEL_IMAGE_SECTIONS = (".init.text", "__ksymtab")
KERNEL_IMAGE_REASON = (
    "the kernel knows nothing of memory past its end (free memory once it runs), so a call "
    "there would run whatever is placed there later")
KERNEL_IMAGE_THUNKS = ("thunks are refused in a kernel image: they would live in a new "
                       f"segment past the kernel's end, and {KERNEL_IMAGE_REASON}")


def is_kernel_image(elf: ElfFile) -> bool:
    """A linked kernel image (vmlinux), which loads nothing pvpatch adds past its end."""
    return not elf.is_relocatable and all(elf.section(n) is not None
                                          for n in KERNEL_IMAGE_SECTIONS)


def _drops_by_section(edits: Iterable[TableEdit]) -> dict[int, dict[int, int]]:
    """Table section index -> {entry index: stride} of the entries to drop."""
    out: dict[int, dict[int, int]] = {}
    for e in edits:
        if e.kind == "drop":
            out.setdefault(e.section_index, {})[e.index] = e.stride
    return out


def _table_edits(plan: Plan) -> list[TableEdit]:
    """The plan's table edits (`pvpatch.plan.coverage`): entries dropped, neutralised or
    replaced so the kernel leaves rewritten sites alone; refused when one cannot be made."""
    cov = plan.coverage
    if cov.problems:
        more = f" (and {len(cov.problems) - 1} more)" if len(cov.problems) > 1 else ""
        raise RewriteError(f"cannot keep the kernel off a rewritten site: {cov.problems[0]}"
                           f"{more}", plan.scan.path)
    return list(cov.edits)


def _rel32(disp: int, path: str, arch: Arch) -> bytes:
    """A rel32 field.  On i386 any displacement reaches (the address space wraps around);
    on x86-64 one out of range is an error, never a silent wrap through the top of the
    address space (kernel text reaching a per-CPU symbol at 0 is a mistake, not a call)."""
    if arch.rel32_wraps:
        disp = arch.signed(disp)
    if not -(1 << 31) <= disp < 1 << 31:
        raise RewriteError(f"a branch displacement of {disp} bytes does not fit in 32 bits",
                           path)
    return (disp & 0xFFFFFFFF).to_bytes(4, "little")


@record
class _TableMover:
    """Where an offset in a table section goes when entries are dropped (`keep`: the
    entries kept, in order): one in a kept entry follows it, one in a dropped entry goes
    to where the next kept entry now starts, one at or past the old end to the new end;
    one before the table stays."""

    table: Section
    stride: int
    keep: list[int]
    new_size: int

    def __call__(self, offset: int) -> int:
        if offset < 0:
            return offset
        if offset >= self.table.size:
            return self.new_size
        k, rest = divmod(offset, self.stride)
        before = bisect.bisect_left(self.keep, k)  # kept entries ahead of entry k
        kept = before < len(self.keep) and self.keep[before] == k
        return before * self.stride + (rest if kept else 0)


# -- the rewriter ------------------------------------------------------------


class _Rewriter:
    def __init__(self, plan: Plan, crcs: Mapping[str, int] | None = None) -> None:
        self.plan = plan
        self.crcs = crcs
        self.elf: ElfFile = plan.scan.elf
        self.arch = plan.arch
        self.output = ElfWriter(self.elf)
        self.texts: dict[int, bytearray] = {}
        self.patches: list[SitePatch] = []
        self._targets: dict[str, Symbol | None] = {}
        # What unwind data the new thunks got ("eh_frame", or "none: why"; "" no thunks).
        self.unwind = ""

    def text(self, index: int) -> bytearray:
        buf = self.texts.get(index)
        if buf is None:
            buf = self.texts[index] = bytearray(self.elf.section_data(self.elf.sections[index]))
        return buf

    def site_bytes(self, d: Decision, disp: int) -> bytes:
        """A rewritten site's new bytes: the plan's own, or the branch it asks for with
        `disp` in its rel32 (the one place either kind of file makes branch bytes)."""
        b = d.branch
        if b is None:
            assert d.code is not None
            return d.code
        return b.encode(self.arch, _rel32(disp, self.elf.path, self.arch))

    def target_symbol(self, name: str) -> Symbol | None:
        """The symbol a spec target binds to (pvpatch.plan.targets: the planner's rule too)."""
        if name not in self._targets:
            self._targets[name] = resolve_target(self.elf, name)
        return self._targets[name]

    @cached_property
    def conventions(self) -> Conventions:
        """What thunks placed in this file look like (read from the input)."""
        return file_conventions(self.elf, self.plan.backend.thunk_section)

    def laid_out(self, specs: Iterable[ThunkSpec], address: int | None) -> list[NewThunk]:
        """The thunks this rewrite adds, laid out THUNK_ALIGN apart in the thunk section
        (the one layout of relocatable and linked files); `address`: the section's, when
        the file is linked."""
        section, conv = self.plan.backend.thunk_section, self.conventions
        return [NewThunk(PlacedThunk(slot.spec, section, slot.offset,
                                     None if address is None else address + slot.offset,
                                     len(slot.code.code), conv), slot.code)
                for slot in lay_out_thunks(self.arch, specs, conv)]


class _RelocatableRewriter(_Rewriter):
    def run(self) -> Rewrite:
        elf = self.elf
        if elf.symtab is None:
            raise RewriteError("a relocatable file without a symbol table", elf.path)
        self.syms = list(elf.symbols)
        self.first_global = elf.symtab.info
        self.new_locals: list[NewSymbol] = []
        self.new_globals: list[NewSymbol] = []
        self.global_index: dict[str, int] = {}
        # Edits per relocation section: positions removed, entries added, or
        # (for the table) the whole list replaced.  Built lazily, never O(n) per site.
        self.removed: dict[int, set[int]] = {}
        self.added: dict[int, list[Relocation]] = {}
        self.replaced: dict[int, list[Relocation]] = {}
        self.new_reloc_lists: dict[int, list[Relocation]] = {}  # sections without a .rela
        self.symbol_updates: dict[int, tuple[int, int]] = {}  # index -> (value, size)
        # relocation section -> position -> new addend (references into a shrunk table)
        self.addend_updates: dict[int, dict[int, int]] = {}
        # text section -> its relocations sorted by offset, and those offsets (for bisect)
        self._by_text: dict[int, tuple[list[int], list[SiteRelocation]]] = {}
        thunks = self._place_thunks()
        for d in self.plan.decisions:
            if d.rewrites:
                self._patch_site(d, thunks)
            else:
                self.patches.append(SitePatch(d, d.site.code, d.site.code, False))
        edits = _table_edits(self.plan)
        dropped = 0
        for index, rows in _drops_by_section(edits).items():
            dropped += self._drop_entries(self.elf.sections[index], rows)
        neutralised, copied = self._neutralise_entries(
            [e for e in edits if e.kind != "drop"])
        changed_sites = any(not p.already for p in self.patches if p.decision.rewrites)
        if not (changed_sites or self.new_thunks or dropped or neutralised or copied):
            # Nothing to change: the file (and any signature on it) stays as it is.
            return _result(self.plan, None, self.patches, (), False, 0)
        self._emit()
        return _result(self.plan, self.output, self.patches, thunks.values(),
                       elf.module_signature is not None, dropped, neutralised, self.unwind,
                       copied)

    # symbols -------------------------------------------------------------

    # Relocations built here name symbols by provisional index: an input
    # symbol's own index, or one of these bases plus the new symbol's rank.
    # `_final` maps every index to the output's numbering.
    NEW_LOCAL = 1 << 40
    NEW_GLOBAL = 1 << 41

    def symbol_index(self, name: str) -> int:
        """Provisional index of the symbol `name` binds to, adding an undefined global if
        the file has none."""
        sym = self.target_symbol(name)
        if sym is not None:
            return sym.index
        if name not in self.global_index:
            self.global_index[name] = len(self.new_globals)
            self.new_globals.append(NewSymbol(name, STB_GLOBAL << 4 | STT_NOTYPE, 0, SHN_UNDEF,
                                              0, 0))
        return self.NEW_GLOBAL + self.global_index[name]

    def _final(self, index: int) -> int:
        nloc = len(self._planned_locals)
        if index >= self.NEW_GLOBAL:
            return len(self.syms) + nloc + index - self.NEW_GLOBAL
        if index >= self.NEW_LOCAL:
            return self.first_global + index - self.NEW_LOCAL
        return index + nloc if index >= self.first_global else index

    # thunks ----------------------------------------------------------------

    def _existing_thunks(self) -> dict[str, PlacedThunk]:
        """Thunks an earlier run already placed (defined in the thunk section): reused."""
        found: dict[str, PlacedThunk] = {}
        name = self.plan.backend.thunk_section
        for spec in self.plan.thunks:
            sym = self.elf.symbols_by_name.get(spec.symbol)
            if sym is None or not sym.defined or sym.section_index >= len(self.elf.sections):
                continue
            if self.elf.sections[sym.section_index].name == name:
                found[spec.symbol] = PlacedThunk(spec, name, sym.value, None, sym.size)
        return found

    def _place_thunks(self) -> dict[str, PlacedThunk]:
        existing = self._existing_thunks()
        specs = [t for t in self.plan.thunks if t.symbol not in existing]
        self._planned_locals = list(specs)
        self.new_thunks = bool(specs)
        if not specs:
            self.thunk_sec = None
            return existing
        conv = self.conventions
        new = self.laid_out(specs, None)
        placed = {t.placed.spec.symbol: t.placed for t in new}
        code = _thunk_section(new, (t.code.code for t in new))
        branches = [(t.placed.offset + b.field, b.symbol) for t in new for b in t.code.branches]
        # (thunk, offset in it) of each listed return
        listed = [(t.placed.spec.symbol, at) for t in new for at in t.code.listed]
        out = self.output
        self.thunk_sec = out.add_section(
            self.plan.backend.thunk_section, sh_type=SHT_PROGBITS,
            sh_flags=SHF_ALLOC | SHF_EXECINSTR, sh_addralign=THUNK_ALIGN,
        )
        for spec in specs:
            p = placed[spec.symbol]
            self.new_locals.append(NewSymbol(spec.symbol, STB_LOCAL << 4 | STT_FUNC, 0,
                                             self.thunk_sec, p.offset, p.size))
        if not self.arch.uses_rela:
            for off, _t in branches:
                code[off : off + 4] = (-4 & 0xFFFFFFFF).to_bytes(4, "little")
        out.set_data(self.thunk_sec, bytes(code))
        # GNU as relocates `call sym` and `jmp sym` alike (PLT32 / PC32).
        relocs = [
            Relocation(off, self.arch.r_call, self.symbol_index(target), -4)
            for off, target in branches
        ]
        self.new_reloc_lists[self.thunk_sec] = relocs
        if listed:
            self._list_in_table(conv.returns, [(self._thunk_symbol_index(name), at)
                                               for name, at in listed])
        self._describe_frames(new)
        return {**existing, **placed}

    def _describe_frames(self, thunks: list[NewThunk]) -> None:
        """Unwind data for the new thunks: a CIE and an FDE per thunk appended to the
        object's `.eh_frame` (the linker merges it into the program's and indexes it in
        `.eh_frame_hdr`), each FDE's address a PC32 relocation against its thunk.  An
        object without `.eh_frame` (a kernel object: ORC describes its frames) gets none."""
        from .unwind import eh_frame_entries  # only a rewrite that adds thunks needs it

        sec = self.elf.section(EH_FRAME)
        if sec is None or sec.type == SHT_NOBITS or not sec.is_alloc or sec.size % 4:
            self._orc_frames(thunks)
            return
        old = self.elf.section_data(sec)
        entries = eh_frame_entries(self.arch, [t.code.frame for t in thunks
                                               if t.code.frame is not None])
        relocs = [Relocation(len(old) + field, self.arch.r_pc32,
                             self._thunk_symbol_index(t.placed.spec.symbol), 0)
                  for t, field in zip(thunks, entries.pc_fields, strict=True)]
        relsecs = self.elf.relocation_sections(sec)
        if relsecs:
            self.added.setdefault(relsecs[0].index, []).extend(relocs)
        else:
            self.new_reloc_lists.setdefault(sec.index, []).extend(relocs)
        self.output.set_data(sec.index, old + entries.data)
        self.unwind = "eh_frame"

    def _orc_frames(self, thunks: list[NewThunk]) -> None:
        """A kernel object's unwind data: ORC entries for every point where a thunk's stack
        changes and a terminator after it, appended to `.orc_unwind`, their addresses to
        `.orc_unwind_ip` (a PC32 relocation each, against the thunk's symbol: the module
        loader sorts the table)."""
        from .unwind import ORC_ENTRY, ORC_IP_SIZE, orc_entries, orc_layout

        elf = self.elf
        orc, orc_ip = elf.section(ORC_UNWIND), elf.section(ORC_UNWIND_IP)
        if orc is None or orc_ip is None or self.arch.name not in ORC_ARCHES:
            self.unwind = "none: the object has neither .eh_frame nor .orc_unwind"
            return
        header = elf.section(ORC_HEADER)
        layout = orc_layout(elf.section_data(header) if header is not None else None)
        relsecs = elf.relocation_sections(orc_ip)
        if layout is None or orc.size % ORC_ENTRY.size or orc_ip.size % ORC_IP_SIZE or \
                orc.size // ORC_ENTRY.size != orc_ip.size // ORC_IP_SIZE or not relsecs:
            self.unwind = "none: .orc_unwind is not in a layout pvpatch knows"
            return
        placed = []
        offsets = {}
        for t in thunks:
            assert t.code.frame is not None
            placed.append((t.placed.offset, t.code.frame))
            offsets[t.placed.offset] = t.placed.spec.symbol
        entries = orc_entries(layout, placed)
        starts = sorted(offsets)
        ips: list[Relocation] = []
        for where, _entry in entries:
            # addressed from the thunk it is in (a terminator: the one it ends)
            start = starts[bisect.bisect_right(starts, where) - 1]
            ips.append(Relocation(orc_ip.size + len(ips) * ORC_IP_SIZE, self.arch.r_pc32,
                                  self._thunk_symbol_index(offsets[start]), where - start))
        self.output.set_data(orc.index, elf.section_data(orc) + b"".join(e for _w, e in entries))
        self.output.set_data(orc_ip.index, elf.section_data(orc_ip) + bytes(ORC_IP_SIZE *
                                                                          len(entries)))
        self.added.setdefault(relsecs[0].index, []).extend(ips)
        self.unwind = f"orc: {layout.name}"

    def _list_in_table(self, form: ReturnForm, entries: list[tuple[int, int]]) -> None:
        """Append an entry per (symbol, offset) to the form's table (objtool's .return_sites:
        s32 self-relative, one PC32 relocation each), creating the table as objtool does
        when the file has none.  An existing table keeps its header: its flags, group and
        relocation section are the ones the rest of the file already agreed on."""
        table = form.table
        assert table is not None
        arch, out = self.arch, self.output
        sec = self.elf.section(table.section)
        if sec is not None and (sec.type == SHT_NOBITS or sec.size % table.entry_size):
            raise RewriteError(f"{table.section} is not a table of {table.entry_size}-byte "
                               "entries: the thunks' returns cannot be listed in it",
                               self.elf.path)
        old = self.elf.section_data(sec) if sec is not None else b""
        # RELA files carry the addend in the relocation, REL ones in the entry itself.
        blob = b"".join(bytes(table.entry_size) if arch.uses_rela else
                        (addend & 0xFFFFFFFF).to_bytes(table.entry_size, "little")
                        for _sym, addend in entries)
        relocs = [Relocation(len(old) + k * table.entry_size, arch.r_pc32, sym, addend)
                  for k, (sym, addend) in enumerate(entries)]
        if sec is None:
            index = out.add_section(table.section, sh_type=SHT_PROGBITS, sh_flags=table.flags,
                                    sh_addralign=table.addralign, sh_entsize=table.entsize)
            self.new_reloc_lists[index] = relocs
        else:
            index = sec.index
            relsecs = self.elf.relocation_sections(sec)
            if relsecs:
                self.added.setdefault(relsecs[0].index, []).extend(relocs)
            else:
                self.new_reloc_lists.setdefault(index, []).extend(relocs)
        out.set_data(index, old + blob)

    # sites -----------------------------------------------------------------

    def _site_relocs(self, d: Decision) -> list[SiteRelocation]:
        """The relocations inside a site."""
        site = d.site
        index = self._by_text.get(site.section_index)
        if index is None:
            rows = []
            for relsec in self.elf.relocation_sections(self.elf.sections[site.section_index]):
                rows += [SiteRelocation(relsec.index, pos, r)
                         for pos, r in enumerate(self.elf.relocations(relsec))]
            rows.sort(key=lambda row: row.relocation.offset)
            index = self._by_text[site.section_index] = (
                [row.relocation.offset for row in rows], rows)
        offsets, entries = index
        lo = bisect.bisect_left(offsets, site.offset)
        hi = bisect.bisect_left(offsets, site.offset + site.len, lo)
        if lo == hi:
            return []
        # Only a site named twice in the table finds its relocations already removed.
        removed = self.removed
        return [e for e in entries[lo:hi] if e.position not in removed.get(e.section, ())]

    def _patch_site(self, d: Decision, thunks: dict[str, PlacedThunk]) -> None:
        site = d.site
        arch = self.arch
        inside = self._site_relocs(d)
        want_reloc: Relocation | None = None
        # RELA: the addend is in the relocation; REL: in the field (-4, from the field's end).
        after = self.site_bytes(d, 0 if arch.uses_rela else -4)
        b = d.branch
        if b is not None:
            target_index = self._thunk_symbol_index(b.symbol) if b.thunk is not None \
                else self.symbol_index(b.symbol)
            # GNU as relocates `call sym` and `jmp sym` alike (PLT32 / PC32).
            want_reloc = Relocation(site.offset + 1, arch.r_call, target_index, -4)
        if after == site.code and self._already(inside, want_reloc, d):
            self.patches.append(SitePatch(d, site.code, after, True))
            return
        text = self.text(site.section_index)
        text[site.offset : site.end] = after
        for e in inside:
            self.removed.setdefault(e.section, set()).add(e.position)
        if want_reloc is not None:
            relsecs = self.elf.relocation_sections(self.elf.sections[site.section_index])
            if relsecs:
                self.added.setdefault(relsecs[0].index, []).append(want_reloc)
            else:
                self.new_reloc_lists.setdefault(site.section_index, []).append(want_reloc)
        self.patches.append(SitePatch(d, site.code, after, False))

    def _thunk_symbol_index(self, symbol: str) -> int:
        for k, spec in enumerate(self._planned_locals):
            if spec.symbol == symbol:
                return self.NEW_LOCAL + k
        sym = self.elf.symbols_by_name.get(symbol)  # placed by an earlier run
        if sym is not None:
            return sym.index
        raise RewriteError(f"thunk {symbol} was not placed", self.elf.path)

    def _already(self, inside: list[SiteRelocation], want: Relocation | None,
                 d: Decision) -> bool:
        if want is None:
            return not inside
        if len(inside) != 1:
            return False
        r = inside[0].relocation
        # The same symbol, not just the same name: an `ld -r` output may hold two.
        return (r.offset == want.offset and r.type == want.type and r.addend == want.addend
                and r.sym == want.sym)

    # table -----------------------------------------------------------------

    def _neutralise_entries(self, edits: list[TableEdit]) -> tuple[int, int]:
        """Edit entries in place (a feature word, which carries no relocation).  Returns
        (neutralised, copied) entries that changed; copies are for linked files only."""
        counts = {"neutralise": 0, "copy": 0}
        by_section: dict[int, list[TableEdit]] = {}
        for e in edits:
            by_section.setdefault(e.section_index, []).append(e)
        for index, rows in by_section.items():
            data = bytearray(self.elf.section_data(self.elf.sections[index]))
            changed = False
            for e in rows:
                if data[e.at : e.at + len(e.data)] != e.data:
                    data[e.at : e.at + len(e.data)] = e.data
                    counts[e.kind] += 1
                    changed = True
            if changed:
                self.output.set_data(index, bytes(data))
        return counts["neutralise"], counts["copy"]

    def _drop_entries(self, sec: Section, drop: Mapping[int, int]) -> int:
        """Remove entries (index -> stride) of the table `sec` with their relocations."""
        if not drop:
            return 0
        elf = self.elf
        stride = next(iter(drop.values()))
        table = self.plan.scan.table
        count = table.count if table is not None and table.section.index == sec.index \
            else -(-sec.size // stride)
        data = elf.section_data(sec)
        data += bytes(count * stride - len(data))
        keep = [i for i in range(count) if i not in drop]
        moved = {old * stride: new * stride for new, old in enumerate(keep)}
        new = bytearray(b"".join(data[i * stride : (i + 1) * stride] for i in keep))
        short = count * stride - sec.size  # a last entry without padding
        if short and keep and keep[-1] == count - 1:
            new = new[:-short]  # it is still last: it stays short
        mover = _TableMover(sec, stride, keep, len(new))
        self._move_table_symbols(mover)
        for relsec in elf.relocation_sections(sec):
            out = []
            for r in self._entries(relsec.index):
                base = r.offset - r.offset % stride
                if base in moved:
                    r = r._replace(offset=moved[base] + r.offset % stride)
                    addend = self._moved_addend(r, sec, mover)
                    if addend is not None:
                        r = r._replace(addend=addend)
                        if not self.arch.uses_rela:  # REL: the addend is in the entry
                            self._write_addend(new, r)
                    out.append(r)
            self.replaced[relsec.index] = out
        self.output.set_data(sec.index, bytes(new))
        self._move_table_references(sec, mover)
        return count - len(keep)

    def _move_table_symbols(self, mover: _TableMover) -> None:
        """Labels inside the table follow their entries; one on a dropped entry moves to
        where the next kept entry now starts, and an end label to the new end."""
        for sym in self.elf.symbols:
            if not sym.defined or sym.section_index != mover.table.index or \
                    sym.type == STT_SECTION:
                continue
            value, end = mover(sym.value), mover(sym.value + sym.size)
            if (value, end - value) != (sym.value, sym.size):
                self.symbol_updates[sym.index] = (value, end - value)

    def _moved_addend(self, r: Relocation, place: Section, mover: _TableMover) -> int | None:
        """The new addend of a relocation that points into the table (through its section
        symbol or a label in it), or None when it does not point there or stays put.

        What it points at moves the way labels do.  A PC-relative relocation in code is
        read as an instruction's displacement, which GNU as biases by its own width
        (`lea tbl+0x20(%rip)` has addend 0x1c); in data (`.long tbl+0x20 - .`) there
        is no bias."""
        if not 0 <= r.sym < len(self.syms):
            return None
        sym = self.syms[r.sym]
        if not sym.defined or sym.section_index != mover.table.index:
            return None
        kind = self.arch.reloc(r.type)
        bias = kind.width if kind.pc_relative and place.is_exec else 0
        label = 0 if sym.type == STT_SECTION else sym.value
        new_label = 0 if sym.type == STT_SECTION else mover(sym.value)
        addend = mover(label + r.addend + bias) - bias - new_label
        return addend if addend != r.addend else None

    def _write_addend(self, buf: bytearray, r: Relocation) -> None:
        width = self.arch.reloc(r.type).width
        if width and r.offset >= 0 and r.offset + width <= len(buf):
            buf[r.offset : r.offset + width] = \
                (r.addend & ((1 << 8 * width) - 1)).to_bytes(width, "little")

    def _move_table_references(self, table: Section, mover: _TableMover) -> None:
        """Relocations elsewhere (`.quad .parainstructions+0x20` in .data) that point into
        the table follow what they point at: the addend of a RELA entry, the bytes at the
        place for REL (the implicit addend)."""
        elf = self.elf
        symtab = elf.symtab
        inside = {s.index for s in self.syms
                  if s.defined and s.section_index == table.index}
        if symtab is None or not inside:
            return
        for relsec in elf.sections:
            if relsec.type not in (SHT_REL, SHT_RELA) or relsec.is_alloc or \
                    relsec.link != symtab.index or relsec.info == table.index or \
                    not 0 < relsec.info < len(elf.sections):
                continue
            place = elf.sections[relsec.info]
            updates: dict[int, int] = {}
            for pos, r in enumerate(elf.relocations(relsec)):
                if r.sym in inside:
                    addend = self._moved_addend(r, place, mover)
                    if addend is not None:
                        updates[pos] = addend
                        if relsec.type == SHT_REL:
                            self._write_addend(self.text(place.index), r._replace(addend=addend))
            if updates:
                self.addend_updates.setdefault(relsec.index, {}).update(updates)

    # emit --------------------------------------------------------------------

    def _emit(self) -> None:
        elf, out = self.elf, self.output
        for index, buf in self.texts.items():
            out.set_data(index, bytes(buf))
        shift = len(self._planned_locals)
        symtab = elf.symtab
        assert symtab is not None
        # Every relocation section that names symbols must be rewritten if
        # new locals moved the globals.
        touched = set(self.removed) | set(self.added) | set(self.replaced) | \
            set(self.addend_updates)
        for sec in elf.sections:
            if sec.type in (SHT_REL, SHT_RELA) and sec.link == symtab.index and shift:
                touched.add(sec.index)
        for relsec_index in sorted(touched):
            sec = elf.sections[relsec_index]
            fixed = self._entries(relsec_index)
            if shift or self.new_globals:
                fixed = [r._replace(sym=self._final(r.sym)) for r in fixed]
            fixed.sort(key=lambda r: r.offset)  # stable: equal offsets keep their order
            out.set_data(relsec_index, pack_relocations(elf.cls, sec.type == SHT_RELA, fixed))
        rela = self.arch.uses_rela
        for text_index, relocs in self.new_reloc_lists.items():
            if not relocs:
                continue
            idx = out.add_relocation_section(text_index, symtab.index, rela)
            fixed = sorted((r._replace(sym=self._final(r.sym)) for r in relocs),
                           key=lambda r: r.offset)
            out.set_data(idx, pack_relocations(elf.cls, rela, fixed))
        self._emit_symbols()
        self._emit_versions()

    def _emit_versions(self) -> None:
        """Modules with symbol versions need a CRC for every symbol they now import."""
        sec = self.elf.section("__versions")
        if sec is None or not self.new_globals:
            return
        data = self.elf.section_data(sec)
        from . import modversions  # only modules that gain symbols need it

        extra = modversions.versions_for([g.name for g in self.new_globals], self.crcs,
                                         modversions.names_in(data, self.arch), self.arch,
                                         self.elf.path)
        if extra:
            self.output.set_data(sec.index, data + extra)

    def _entries(self, relsec_index: int) -> list[Relocation]:
        """A relocation section's entries after this rewrite's edits."""
        if relsec_index in self.replaced:
            return self.replaced[relsec_index]
        removed = self.removed.get(relsec_index, set())
        orig = self.elf.relocations(self.elf.sections[relsec_index])
        addends = self.addend_updates.get(relsec_index)
        if addends:
            orig = tuple(r._replace(addend=addends[pos]) if pos in addends else r
                         for pos, r in enumerate(orig))
        kept = [r for pos, r in enumerate(orig) if pos not in removed] if removed else list(orig)
        return kept + self.added.get(relsec_index, [])

    def _emit_symbols(self) -> None:
        symtab = self.elf.symtab
        assert symtab is not None
        table = SymbolTable(self.elf, symtab)
        for index, (value, size) in self.symbol_updates.items():
            table.update(index, value, size)
        table.locals, table.globals = self.new_locals, self.new_globals
        table.write(self.output)


class _LinkedRewriter(_Rewriter):
    def run(self) -> Rewrite:
        elf = self.elf
        if self.plan.drop_patched:
            raise RewriteError(
                "--drop-patched is refused for linked files: the kernel walks the table between "
                "bounds compiled into its code, so entries cannot be removed",
                elf.path,
            )
        thunks = self._place_thunks()
        kernel = is_kernel_image(elf)
        ranges: list[tuple[int, int]] = []
        for d in self.plan.decisions:
            site = d.site
            assert site.address is not None
            if not d.rewrites:
                self.patches.append(SitePatch(d, site.code, site.code, False))
                continue
            b = d.branch
            disp = 0
            if b is not None:
                target = thunks[b.symbol].address if b.thunk is not None else \
                    self._linked_target(b.symbol)
                assert target is not None
                if kernel and not self._kernel_text(target):
                    raise RewriteError(f"{b.symbol} at {target:#x} is in none of the kernel "
                                       f"image's executable sections: {KERNEL_IMAGE_REASON}",
                                       elf.path)
                disp = target - (site.address + CALL_LEN)
            after = self.site_bytes(d, disp)
            already = after == site.code
            if not already:
                # Sites of a linked file are patched in the output image directly.
                self.output.poke(site.file_offset, after)
                ranges.append((site.address, site.address + site.len))
            self.patches.append(SitePatch(d, site.code, after, already))
        self._neutralise_dynamic_relocs(sorted(ranges))
        counts = {"neutralise": 0, "copy": 0, "drop": 0}
        for e in _table_edits(self.plan):
            if e.kind == "drop":  # the planner never drops in linked files
                raise RewriteError(f"{e.section} entry {e.index} cannot be removed from a "
                                   "linked file", self.elf.path)
            where = self.elf.sections[e.section_index].offset + e.at
            if self.elf.data[where : where + len(e.data)] != e.data:
                self.output.poke(where, e.data)
                counts[e.kind] += 1
        return _result(self.plan, self.output, self.patches, thunks.values(), False, 0,
                       counts["neutralise"], self.unwind, counts["copy"])

    def _kernel_text(self, addr: int) -> bool:
        """`addr` lies in an executable section of the kernel image that is not pvpatch's."""
        return any(sec.is_exec and sec.addr <= addr < sec.addr + sec.size
                   and sec.name != self.plan.backend.thunk_section
                   for sec in self.elf.sections)

    def _neutralise_dynamic_relocs(self, ranges: list[tuple[int, int]]) -> None:
        """A load-time relocation inside a rewritten site would write into the new bytes.

        It becomes R_*_NONE.  The loader assumes the first DT_RELCOUNT /
        DT_RELACOUNT entries are RELATIVE (glibc asserts it on i386), so a
        neutralised entry is first swapped to the end of that prefix and the
        count lowered.
        """
        if not ranges:
            return
        elf = self.elf
        starts = [r[0] for r in ranges]
        self._drop_relr(ranges, starts)
        counts = self._relative_counts()
        for sec in elf.sections:
            if not sec.is_alloc or sec.type not in (SHT_REL, SHT_RELA):
                continue
            fmt = elf.cls.rela if sec.type == SHT_RELA else elf.cls.rel
            raw = elf.section_data(sec)
            # A malformed section may end in a partial entry: it is kept as it is.
            whole = len(raw) - len(raw) % fmt.size
            rows = [list(rec) for rec in fmt.iter_unpack(raw[:whole])]
            hits = []
            for k, rec in enumerate(rows):
                pos = bisect.bisect_right(starts, rec[0]) - 1
                if pos >= 0 and rec[0] < ranges[pos][1]:
                    hits.append(k)
            if not hits:
                continue
            count_at = counts.get(sec.addr)
            count = min(count_at[1], len(rows)) if count_at is not None else 0
            for k in sorted(hits, reverse=True):
                if k < count:
                    rows[k], rows[count - 1] = rows[count - 1], rows[k]
                    k = count - 1
                    count -= 1
                rows[k][1] = 0  # r_info: R_*_NONE against no symbol
            self.output.set_data(sec.index, b"".join(fmt.pack(*r) for r in rows) + raw[whole:])
            if count_at is not None:
                self.output.set_dynamic(count_at[0], count)

    def _drop_relr(self, ranges: list[tuple[int, int]], starts: list[int]) -> None:
        """RELR (packed RELATIVE) entries inside rewritten sites are dropped and the table
        re-encoded; it may shrink (DT_RELRSZ follows) but never grow in a linked file."""
        elf = self.elf
        word = elf.cls.addr.size
        for sec in elf.sections:
            if sec.type != SHT_RELR or not sec.is_alloc:
                continue
            addrs = list(elf.relr_addresses(sec))
            keep = [a for a in addrs
                    if not ((pos := bisect.bisect_right(starts, a) - 1) >= 0
                            and a < ranges[pos][1])]
            if len(keep) == len(addrs):
                continue
            packed = encode_relr(keep, word)
            if len(packed) > sec.size:
                raise RewriteError("dropping a RELR relocation inside a rewritten site would "
                                   "grow .relr.dyn", elf.path)
            self.output.set_data(sec.index, packed)
            for i, entry in enumerate(dynamic_entries(elf)):
                if entry.d_tag == DT_RELRSZ:
                    self.output.set_dynamic(i, len(packed))

    def _relative_counts(self) -> dict[int, tuple[int, int]]:
        """Address of the REL/RELA table -> (index in .dynamic of its count tag, count)."""
        dyn = dynamic_entries(self.elf)
        tags = {tag: (i, val) for i, (tag, val) in enumerate(dyn)}
        out = {}
        for table_tag, count_tag in ((DT_RELA, DT_RELACOUNT), (DT_REL, DT_RELCOUNT)):
            if table_tag in tags and count_tag in tags:
                out[tags[table_tag][1]] = (tags[count_tag][0], tags[count_tag][1])
        return out

    def _existing_thunks(self) -> dict[str, PlacedThunk]:
        """Thunks an earlier run placed in this linked file, recognised by their bytes."""
        elf = self.elf
        name = self.plan.backend.thunk_section
        found: dict[str, PlacedThunk] = {}
        for sec in elf.sections:
            if sec.name != name or not sec.is_exec:
                continue
            data = elf.section_data(sec)
            for spec in self.plan.thunks:
                for off in range(0, len(data), THUNK_ALIGN):
                    want = self._thunk_at(spec, sec.addr + off)
                    if spec.symbol not in found and data[off : off + len(want)] == want:
                        found[spec.symbol] = PlacedThunk(spec, name, off, sec.addr + off,
                                                         len(want), self.conventions)
        return found

    def _linked_target(self, name: str) -> int:
        found = self.plan.targets.get(name)  # where the planner found it
        if found is not None:
            return found.address
        sym = self.target_symbol(name)
        if sym is None or not sym.defined:  # the planner keeps such sites
            raise RewriteError(f"target {name} is not defined in this linked file",
                               self.elf.path)
        return sym.value

    def _thunk_at(self, spec: ThunkSpec, addr: int) -> bytes:
        """The bytes of `spec`'s thunk placed at `addr` (its branches resolved)."""
        return self._bound(thunk_code(self.arch, spec, self.conventions), addr)

    def _bound(self, tc: ThunkCode, addr: int) -> bytes:
        """A thunk's code placed at `addr`, its branches bound to their targets."""
        conv = self.conventions
        body = bytearray(tc.code)
        for b in tc.branches:
            if b.symbol == conv.returns.symbol and conv.return_address is not None:
                target = conv.return_address
            else:
                target = self._linked_target(b.symbol)
            body[b.field : b.field + 4] = _rel32(target - (addr + b.field + 4), self.elf.path,
                                                 self.arch)
        return bytes(body)

    def _place_thunks(self) -> dict[str, PlacedThunk]:
        existing = self._existing_thunks()
        specs = [t for t in self.plan.thunks if t.symbol not in existing]
        if not specs:
            return existing
        elf = self.elf
        if is_kernel_image(elf):
            raise RewriteError(KERNEL_IMAGE_THUNKS, elf.path)
        loads = [s for s in elf.segments if s.type == PT_LOAD]
        if not loads:
            raise RewriteError("no PT_LOAD segment to place thunks after", elf.path)
        # Kernels before 5.18 find the program headers (AT_PHDR) from the first
        # PT_LOAD in table order; the new segment keeps its vaddr - offset.
        first = loads[0]
        bias = first.vaddr - first.offset
        # Physical addresses follow the segment the new one is placed after (a
        # vmlinux's percpu segment sits at vaddr 0 with an unrelated paddr).
        last = max(loads, key=lambda s: s.vaddr + s.memsz)
        end_vaddr = last.vaddr + last.memsz
        offset = align_up(elf.content_end, PAGE)
        vaddr = bias + offset
        if vaddr < end_vaddr:
            gap = align_up(end_vaddr - vaddr, PAGE)
            if gap <= max(len(elf.data), MAX_FILE_PAD):
                # Pad the file so vaddr - offset stays that of the first segment:
                # kernels before 5.18 compute AT_PHDR assuming so.
                offset += gap
                vaddr += gap
            else:
                # A large bss: place the segment past it without padding the file.
                vaddr = align_up(end_vaddr, PAGE) + offset % PAGE
        if vaddr + PAGE > 1 << (8 * elf.arch.ptr_size):
            raise RewriteError("no address space left past the last segment for the thunks",
                               elf.path)
        # The new segment holds a copy of the program headers (one more entry)
        # and then the thunks: there is rarely room to grow the old table.
        phnum = len(elf.segments) + 1
        ph_size = phnum * elf.cls.phdr.size
        base = align_up(ph_size, THUNK_ALIGN)
        new = self.laid_out(specs, vaddr + base)
        code = _thunk_section(new, (self._bound(t.code, vaddr + base + t.placed.offset)
                                    for t in new))
        total = base + len(code)
        unwind = self._unwind_tables(vaddr + total, new)
        if unwind is not None:
            total = unwind.end - vaddr
        rows: list[bytes] = []
        paddr = vaddr - (last.vaddr - last.paddr)
        cls = elf.cls
        for s in elf.segments:
            if s.type == PT_PHDR:
                rows.append(pack_program_header(cls, s.type, s.flags, offset, vaddr, paddr,
                                                ph_size, ph_size, s.align))
            elif s.type == PT_GNU_EH_FRAME and unwind is not None:
                # The unwinders (libgcc, glibc) find the new table through this header.
                hdr_at = unwind.hdr_addr - vaddr
                rows.append(pack_program_header(cls, s.type, s.flags, offset + hdr_at,
                                                unwind.hdr_addr, paddr + hdr_at,
                                                len(unwind.hdr), len(unwind.hdr), s.align))
            else:
                rows.append(pack_program_header(cls, s.type, s.flags, s.offset, s.vaddr,
                                                s.paddr, s.filesz, s.memsz, s.align))
        rows.append(pack_program_header(cls, PT_LOAD, PF_R | PF_X, offset, vaddr, paddr, total,
                                        total, PAGE))
        out = self.output
        image = out.image
        pad = offset - len(image)
        image.extend(bytes(pad) + bytes(total))
        image[offset + base : offset + base + len(code)] = code
        out.set_program_headers(offset, rows)
        sec = out.add_section(self.plan.backend.thunk_section, sh_type=SHT_PROGBITS,
                              sh_flags=SHF_ALLOC | SHF_EXECINSTR, sh_addr=vaddr + base,
                              sh_addralign=THUNK_ALIGN)
        thunk_header = out.headers[sec]
        thunk_header.sh_offset, thunk_header.sh_size = offset + base, len(code)
        thunk_header.data = None  # written into the new segment above
        if unwind is not None:
            for index, at, blob in ((unwind.eh_index, unwind.eh_addr, unwind.eh),
                                    (unwind.hdr_index, unwind.hdr_addr, unwind.hdr)):
                where = offset + at - vaddr
                image[where : where + len(blob)] = blob
                # The section header follows its table into the new segment; the old
                # bytes stay where they were, loaded but no longer looked up.
                sh = out.headers[index]
                sh.sh_addr, sh.sh_offset, sh.sh_size, sh.data = at, where, len(blob), None
        self._name_thunks(sec, [t.placed for t in new],
                          unwind.moves(elf) if unwind is not None else {})
        self.unwind = "eh_frame" if unwind is not None else self.unwind
        return {**existing, **{t.placed.spec.symbol: t.placed for t in new}}

    def _unwind_tables(self, at: int, thunks: list[NewThunk]) -> _LinkedUnwind | None:
        """A new `.eh_frame` (the old entries, rebased, then a CIE and an FDE per thunk) and
        a new `.eh_frame_hdr` over all of them, laid out from address `at` on; None when
        the file has no `.eh_frame_hdr` that PT_GNU_EH_FRAME names (a kernel image) or
        its call-frame information cannot be moved (`self.unwind` says why)."""
        from .unwind import UnwindError, eh_frame_entries, eh_frame_hdr, rebase_eh_frame

        elf = self.elf
        eh, hdr = elf.section(EH_FRAME), elf.section(EH_FRAME_HDR)
        seg = next((s for s in elf.segments if s.type == PT_GNU_EH_FRAME), None)
        if eh is None or hdr is None or seg is None or seg.vaddr != hdr.addr \
                or eh.type == SHT_NOBITS or not eh.is_alloc:
            self.unwind = "none: no .eh_frame_hdr named by PT_GNU_EH_FRAME"
            return None
        word = self.arch.ptr_size
        eh_addr = align_up(at, word)
        try:
            old = rebase_eh_frame(self.elf.section_data(eh), eh.addr, eh_addr, word)
            frames = []
            for t in thunks:
                assert t.code.frame is not None and t.placed.address is not None
                frames.append(t.code.frame)
            new = eh_frame_entries(self.arch, frames, eh_addr + len(old),
                                   [t.placed.address for t in thunks
                                    if t.placed.address is not None])
            data = old + new.data + bytes(4)  # the zero terminator
            hdr_addr = align_up(eh_addr + len(data), 4)
            table = eh_frame_hdr(data, eh_addr, hdr_addr, word)
        except UnwindError as exc:
            self.unwind = f"none: {exc.message}"
            return None
        return _LinkedUnwind(eh.index, eh_addr, data, hdr.index, hdr_addr, table,
                             (eh.addr, len(old)), hdr.addr)

    def _name_thunks(self, sec: int, thunks: list[PlacedThunk],
                     moves: Mapping[int, Callable[[int], int]]) -> None:
        """A local FUNC symbol with its size for each thunk, when the file has a `.symtab`
        (inserted before the first global; relocation sections naming `.symtab`'s symbols
        follow the renumbering).  Labels in a table that moved (`moves`: section index ->
        new address of an old one; `__GNU_EH_FRAME_HDR`, `__FRAME_END__`) follow it."""
        elf = self.elf
        symtab = elf.symtab
        if symtab is None or not thunks or not SymbolTable.extendable(elf, symtab):
            return  # none, or one pvpatch cannot extend consistently: left as it is
        table = SymbolTable(elf, symtab)
        for k in range(table.count) if moves else ():
            sym = table.entry(k)
            if sym.st_shndx in moves:
                table.update(k, moves[sym.st_shndx](sym.st_value), sym.st_size)
        for t in thunks:
            assert t.address is not None
            table.locals.append(NewSymbol(t.spec.symbol, STB_LOCAL << 4 | STT_FUNC, 0, sec,
                                          t.address, t.size))
        table.write(self.output)
        table.renumber_relocations(self.output)


def apply_plan(plan: Plan, *, crcs: Mapping[str, int] | None = None) -> Rewrite:
    """Produce the output file's bytes for `plan` (nothing is written to disk).

    `crcs` maps exported kernel symbols to their version CRCs (see
    `pvpatch.rewrite.modversions.read_crcs`), needed when a module with symbol versions
    gains a call to a kernel function it did not import before.
    """
    if plan.scan.elf.is_relocatable:
        return _RelocatableRewriter(plan, crcs).run()
    return _LinkedRewriter(plan, crcs).run()
