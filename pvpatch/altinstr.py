"""The `.altinstructions` family (Linux 6.8 and later): paravirt sites as DIRECT_CALL
alternatives.

Since 6.8 a paravirt call `call *pv_ops+off` (`ff 15 disp32`) is an ALTERNATIVE
entry flagged ALT_FLAG_DIRECT_CALL, whose replacement is a `call BUG_func`
placeholder the kernel turns into a direct call to the slot's target.  Most are
followed by a second entry at the same address, `ALT_NOT(X86_FEATURE_XENPV)` (or
NOT PVUNLOCK / VCPUPREEMPT), holding the native instruction.  No clobber mask is
recorded: the register contract comes from the op's type (callee-save ops let
only the return register change).  The entry layout changed over the years, so
layouts are data and `auto` finds the one that decodes (as BOLT's
LinuxKernelRewriter does); only the 6.3+ layout can carry DIRECT_CALL.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

from .elf import ElfFile, Relocation, Section, Symbol
from .errors import TableError, UsageError
from .layouts import AUTO_LAYOUTS, LAYOUTS, TableLayout
from .ops import OpCatalog
from .rules import Finding
from .sites import (
    MAX_PATCH_LEN,
    RelocIndex,
    ScanResult,
    Site,
    Table,
    call_slot_rel,
    entry_finding,
    site_finding,
)

SECTION = ".altinstructions"
REPLACEMENT_SECTION = ".altinstr_replacement"

# ALT_FLAG_* (6.3+ `alt_instr.flags`); older layouts fold NOT into the feature word.
ALT_FLAG_NOT = 1 << 0
ALT_FLAG_DIRECT_CALL = 1 << 1

# arch/x86/include/asm/cpufeatures.h (the same numbers from 5.15 to 6.19).
X86_FEATURE_ALWAYS = 3 * 32 + 21
PARAVIRT_FEATURES: Mapping[int, str] = MappingProxyType({
    8 * 32 + 16: "XENPV",  # ALT_NOT_XEN: the native form unless a Xen PV guest
    8 * 32 + 20: "PVUNLOCK",  # native spin unlock unless paravirt spinlocks
    8 * 32 + 21: "VCPUPREEMPT",  # native vcpu_is_preempted unless a hypervisor's
})

CALL_INSN = b"\xff\x15"  # call *disp32 (rip-relative on x86-64, absolute on i386)
CALL_INSN_LEN = 6
PLACEHOLDER_LEN = 5  # `call BUG_func`, which the kernel retargets


@dataclass(frozen=True)
class AltEntry:
    """One decoded entry; `flags` holds ALT_FLAG_* whatever the layout's era."""

    instr: int  # instr_offset (self-relative) or, in relocatable files, 0
    repl: int
    feature: int
    flags: int
    instrlen: int
    repllen: int


@dataclass(frozen=True)
class AltLayout:
    """One era of `struct alt_instr`: how an entry is laid out, as data."""

    name: str
    stride: int
    fmt: str  # struct format of a whole entry, fields in `fields` order
    fields: tuple[str, ...]  # names among instr, repl, cpuid, flags, instrlen, repllen, pad
    not_bit: int  # the NOT flag inside `cpuid` (5.13-6.2), else 0
    # Where the feature word of a neutralised entry goes and what it holds: an entry
    # testing NOT(X86_FEATURE_ALWAYS) is one the kernel always skips.  None: the era
    # has no NOT flag, so an entry cannot be neutralised in place.
    neutral: tuple[int, bytes] | None
    description: str

    @cached_property
    def _struct(self) -> struct.Struct:
        return struct.Struct(self.fmt)

    @cached_property
    def _positions(self) -> tuple[int, int, int, int | None, int, int]:
        f = self.fields
        return (f.index("instr"), f.index("repl"), f.index("cpuid"),
                f.index("flags") if "flags" in f else None, f.index("instrlen"),
                f.index("repllen"))

    def entries(self, data: bytes) -> list[AltEntry]:
        i_at, r_at, c_at, f_at, il_at, rl_at = self._positions
        not_bit = self.not_bit
        out = []
        # Positional construction: a vmlinux has ten thousand entries.
        for raw in self._struct.iter_unpack(data):
            cpuid = raw[c_at]
            flags = raw[f_at] if f_at is not None else 0
            if not_bit and cpuid & not_bit:
                cpuid &= ~not_bit
                flags |= ALT_FLAG_NOT
            out.append(AltEntry(raw[i_at], raw[r_at], cpuid, flags, raw[il_at], raw[rl_at]))
        return out

    @property
    def direct_calls(self) -> bool:
        return "flags" in self.fields


ALT_LAYOUTS: Mapping[str, AltLayout] = MappingProxyType({
    lay.name: lay for lay in (
        AltLayout(
            "linux-alt-6.3", 14, "<iiHHBB",
            ("instr", "repl", "cpuid", "flags", "instrlen", "repllen"), 0,
            (8, struct.pack("<HH", X86_FEATURE_ALWAYS, ALT_FLAG_NOT)),
            "Linux 6.3+: {s32 instr; s32 repl; u16 cpuid; u16 flags (NOT=1, DIRECT_CALL=2); "
            "u8 instrlen; u8 replacementlen}, 14 bytes, packed",
        ),
        AltLayout(
            "linux-alt-5.13", 12, "<iiHBB",
            ("instr", "repl", "cpuid", "instrlen", "repllen"), 1 << 15,
            (8, struct.pack("<H", X86_FEATURE_ALWAYS | 1 << 15)),
            "Linux 5.13-6.2 (and 3.x-4.0 without NOT): {s32 instr; s32 repl; u16 cpuid "
            "(bit 15 = NOT); u8 instrlen; u8 replacementlen}, 12 bytes, packed",
        ),
        AltLayout(
            "linux-alt-4.1", 13, "<iiHBBB",
            ("instr", "repl", "cpuid", "instrlen", "repllen", "pad"), 0, None,
            "Linux 4.1-5.12: {s32 instr; s32 repl; u16 cpuid; u8 instrlen; "
            "u8 replacementlen; u8 padlen}, 13 bytes, packed",
        ),
    )
})
AUTO_ALT_LAYOUTS = ("linux-alt-6.3", "linux-alt-5.13", "linux-alt-4.1")
NEUTRAL_FLAGS = (X86_FEATURE_ALWAYS, ALT_FLAG_NOT)  # (feature, flags) of a skipped entry


@dataclass(frozen=True)
class Decoded:
    """A table decoded with one layout: each entry and where its two pointers lead.

    A location is (section index, offset); None where the pointer leads nowhere
    usable (the reason is in `problems`)."""

    layout: AltLayout
    entries: tuple[AltEntry, ...]
    instr: tuple[tuple[int, int] | None, ...]
    repl: tuple[tuple[int, int] | None, ...]
    problems: Mapping[int, str]

    @property
    def paravirt(self) -> bool:
        """The table holds paravirt sites (or sites pvpatch already rewrote)."""
        return any(e.flags & ALT_FLAG_DIRECT_CALL or (e.feature, e.flags) == NEUTRAL_FLAGS
                   for e in self.entries) and self.layout.direct_calls


class _Decoder:
    """Where an entry's self-relative pointers lead, in linked and relocatable files."""

    def __init__(self, elf: ElfFile, table: Section) -> None:
        self.elf = elf
        self.table = table
        self._relocs: dict[int, Relocation] | None = None
        self._targets: dict[int, tuple[int, int] | str] = {}
        execs = sorted((s.addr, s.addr + s.size, s.index) for s in elf.sections
                       if s.is_alloc and s.is_exec and s.size)
        self._starts = [a for a, _e, _i in execs]
        self._execs = execs

    @property
    def relocs(self) -> dict[int, Relocation]:
        if self._relocs is None:
            self._relocs = {r.offset: r for r in self.elf.relocations_for(self.table)}
        return self._relocs

    def _linked_fast(self) -> Callable[[int, int], tuple[int, int] | str]:
        """`linked`, trying the section of the last hit first: entries point into one or
        two sections in long runs."""
        table_addr, wrap = self.table.addr, self.elf.arch.wrap
        last = [0, 0, -1]  # start, end, index

        def find(field_at: int, value: int) -> tuple[int, int] | str:
            addr = wrap(table_addr + field_at + value)
            if last[0] <= addr < last[1]:
                return last[2], addr - last[0]
            found = self.linked(field_at, value)
            if not isinstance(found, str):
                sec = self.elf.sections[found[0]]
                last[:] = [sec.addr, sec.addr + sec.size, sec.index]
            return found

        return find

    def linked(self, field_at: int, value: int) -> tuple[int, int] | str:
        addr = self.elf.arch.wrap(self.table.addr + field_at + value)
        k = bisect.bisect_right(self._starts, addr) - 1
        if k >= 0:
            start, end, index = self._execs[k]
            if addr < end:
                return index, addr - start
        return f"points at {addr:#x}, outside every executable section"

    def relocated(self, field_at: int) -> tuple[int, int] | str:
        """Relocatable: a PC32 relocation S + A - P, which the kernel turns back into S + A."""
        r = self.relocs.get(field_at)
        if r is None:
            return f"no relocation at +{field_at % 16:#x}"
        if r.type != self.elf.arch.r_pc32:
            return f"field relocated by {self.elf.arch.reloc_name(r.type)}"
        found = self._targets.get(r.sym)
        if found is None:
            found = self._targets[r.sym] = self._symbol_target(self.elf.symbol(r.sym))
        if isinstance(found, str):
            return found
        index, value = found
        return index, value + r.addend

    def _symbol_target(self, sym: Symbol) -> tuple[int, int] | str:
        if not sym.defined or sym.section_index >= len(self.elf.sections):
            return f"points at symbol {sym.name or sym.index!r}, not in a section of this file"
        sec = self.elf.sections[sym.section_index]
        if not sec.is_exec:
            return f"points into non-executable section {sec.name}"
        return sec.index, sym.value

    def decode(self, layout: AltLayout) -> Decoded | str:
        """The table decoded with `layout`, or why the layout does not fit."""
        elf, table, stride = self.elf, self.table, layout.stride
        count, rest = divmod(table.size, stride)
        if rest or not count:
            return f"size {table.size} is not a whole number of {stride}-byte entries"
        entries = layout.entries(elf.section_data(table))
        instr: list[tuple[int, int] | None] = []
        repl: list[tuple[int, int] | None] = []
        problems: dict[int, str] = {}
        if elf.is_relocatable:
            offsets = self.relocs.keys()
            if len(offsets) != 2 * count or any(o % stride not in (0, 4) for o in offsets):
                return f"its relocations are not two per {stride}-byte entry"
            for i in range(count):
                for field_at, out in ((i * stride, instr), (i * stride + 4, repl)):
                    where = self.relocated(field_at)
                    if isinstance(where, str):
                        problems.setdefault(i, where)
                        out.append(None)
                    else:
                        out.append(where)
        else:
            misses = 0
            linked = self._linked_fast()
            for i, e in enumerate(entries):
                base = i * stride
                for field_at, value, out in ((base, e.instr, instr), (base + 4, e.repl, repl)):
                    where = linked(field_at, value)
                    if isinstance(where, str):
                        problems.setdefault(i, where)
                        misses += 1
                        out.append(None)
                    else:
                        out.append(where)
            # A wrong stride decodes garbage: most pointers then lead nowhere.
            if misses * 8 > 2 * count:
                return f"{misses} of {2 * count} pointers lead outside executable sections"
        return Decoded(layout, tuple(entries), tuple(instr), tuple(repl), problems)


def probe(elf: ElfFile, table: Section, layout: str = "auto") -> Decoded | str:
    """Decode `table` with the named layout, or the first of the auto list that fits."""
    decoder = _Decoder(elf, table)
    if layout != "auto":
        lay = ALT_LAYOUTS.get(layout)
        if lay is None:
            raise UsageError(f"unknown layout {layout!r}")
        return decoder.decode(lay)
    reasons = []
    for name in AUTO_ALT_LAYOUTS:
        found = decoder.decode(ALT_LAYOUTS[name])
        if isinstance(found, Decoded):
            return found
        reasons.append(f"{name}: {found}")
    return "; ".join(reasons)


def clbr_layout(arch_name: str) -> TableLayout:
    """The CLBR bit layout the sites' masks are written in (the one 6.1's tables used)."""
    return LAYOUTS[AUTO_LAYOUTS[arch_name][0]]


def scan_alternatives(elf: ElfFile, table: Section, layout: str, ops: OpCatalog | None,
                      decoded: Decoded | None = None) -> ScanResult:
    """Every DIRECT_CALL entry of `table` as a site, with findings."""
    if decoded is None:
        found = probe(elf, table, layout)
        if isinstance(found, str):
            raise TableError(f"{table.name}: no layout fits ({found})", elf.path)
        decoded = found
    return _AltScanner(elf, table, decoded, ops).run()


class _AltScanner:
    def __init__(self, elf: ElfFile, table: Section, decoded: Decoded,
                 ops: OpCatalog | None) -> None:
        self.elf = elf
        self.arch = elf.arch
        self.table = table
        self.d = decoded
        self.ops = ops
        self.clbr = clbr_layout(elf.arch.name)
        self.findings: list[Finding] = []
        self.unsafe: set[int] = set()
        self._relocs: dict[int, RelocIndex] = {}
        self.replacement = elf.section(REPLACEMENT_SECTION)
        self._c_mask = sum(1 << bit for bit, reg in enumerate(self.clbr.clobber_bits)
                           if reg in self.arch.caller_saved or reg in self.arch.return_regs)

    # -- helpers -------------------------------------------------------------------

    def _entry_finding(self, index: int, message: str, rule: str) -> None:
        self.findings.append(entry_finding(self.table, self.d.layout.stride, index, message,
                                           rule))

    def _site_finding(self, rule: str, site: Site, message: str) -> None:
        self.findings.append(site_finding(rule, site, message))
        if rule != "PV204":
            self.unsafe.add(site.index)

    def _relocs_of(self, sec_index: int) -> RelocIndex:
        idx = self._relocs.get(sec_index)
        if idx is None:
            sec = self.elf.sections[sec_index]
            idx = self._relocs[sec_index] = RelocIndex(list(self.elf.relocations_for(sec)))
        return idx

    def _bytes(self, loc: tuple[int, int], length: int) -> bytes:
        sec = self.elf.sections[loc[0]]
        start = sec.offset + loc[1]
        return bytes(self.elf.data[start : start + length])

    @cached_property
    def _pv_ops(self) -> tuple[int | None, int | None]:
        """(address, size) of pv_ops in a linked file: .symtab, else the export table."""
        elf = self.elf
        sym = elf.symbols_by_name.get("pv_ops") if elf.symtab is not None else None
        size = self.ops.template_size if self.ops is not None else None
        if sym is not None and sym.defined:
            return sym.value, sym.size or size
        from .ksymtab import export_address

        return export_address(elf, "pv_ops"), size

    # -- the scan ------------------------------------------------------------------

    def run(self) -> ScanResult:
        d = self.d
        for i, why in sorted(d.problems.items()):
            if d.entries[i].flags & ALT_FLAG_DIRECT_CALL:
                self._entry_finding(i, why, "PV102")
        by_loc: dict[tuple[int, int], list[int]] = {}
        for i, loc in enumerate(d.instr):
            if loc is not None:
                by_loc.setdefault(loc, []).append(i)
        spans = sorted((loc[0], loc[1], loc[1] + d.entries[i].instrlen, i)
                       for i, loc in enumerate(d.instr) if loc is not None)
        sites: list[Site] = []
        for i, e in enumerate(d.entries):
            loc = d.instr[i]
            if not e.flags & ALT_FLAG_DIRECT_CALL or loc is None:
                continue
            group = by_loc[loc]
            if next(j for j in group if d.entries[j].flags & ALT_FLAG_DIRECT_CALL) != i:
                continue  # the site was made from the first DIRECT_CALL entry at it
            site = self._site(i, e, loc, group)
            if site is not None:
                self._check_overlaps(site, loc, spans)
                sites.append(site)
        layout = d.layout
        return ScanResult(
            self.elf, self.elf.path, self.arch,
            Table(self.table, layout, len(d.entries), "altinstructions"),
            tuple(sites), tuple(self.findings), self.ops, self.clbr, frozenset(self.unsafe))

    def _site(self, i: int, e: AltEntry, loc: tuple[int, int], group: list[int]
              ) -> Site | None:
        elf, d = self.elf, self.d
        sec = elf.sections[loc[0]]
        off = loc[1]
        relocatable = elf.is_relocatable
        address = None if relocatable else sec.addr + off
        base = i * d.layout.stride
        if e.instrlen == 0 or e.instrlen > MAX_PATCH_LEN:
            self._entry_finding(i, f"site length {e.instrlen} (must be 1..{MAX_PATCH_LEN})",
                                "PV109")
            return None
        if sec.file_size == 0:
            self._entry_finding(i, f"site at {sec.name}+{off:#x} is in a section with no bytes "
                                "in the file (SHT_NOBITS)", "PV102")
            return None
        if sec.index in (self.table.index, getattr(self.replacement, "index", -1)):
            # Rewriting it would rewrite the tables the kernel reads.
            self._entry_finding(i, f"site at {sec.name}+{off:#x} is inside the alternatives "
                                "tables themselves", "PV102")
            return None
        if off + e.instrlen > sec.size:
            self._entry_finding(i, f"site of {e.instrlen} bytes at {sec.name}+{off:#x} runs "
                                f"past the end of {sec.name} ({sec.size:#x} bytes)", "PV103")
            return None
        code = self._bytes(loc, e.instrlen)
        if e.instrlen != CALL_INSN_LEN or not code.startswith(CALL_INSN):
            self._entry_finding(i, f"DIRECT_CALL site at {sec.name}+{off:#x} is {code.hex()} "
                                f"({e.instrlen} bytes), not a 6-byte call *pv_ops+off",
                                "PV110")
            return None
        slot, why = self._slot(loc, code)
        if slot is None:
            self._entry_finding(i, f"DIRECT_CALL site at {sec.name}+{off:#x}: {why}", "PV111")
            return None
        op = self.ops.name_of(slot) if self.ops is not None else None
        callee_save = self.ops.is_callee_save(slot) if op is not None and self.ops else True
        clob = self.clbr.ret_mask if callee_save else self._c_mask
        native, problems = self._partners(i, e, group)
        site = Site(i, sec.name, sec.index, off, address, slot, e.instrlen, clob,
                    self.clbr.regs(clob), op, code, sec.offset + off, base, slot, native,
                    tuple(group))
        if self.ops is not None and op is None:
            self._site_finding("PV111", site, f"the call reads pv_ops slot {slot}, outside "
                               f"the {self.ops.name} catalog's {len(self.ops.slots)} ops")
        elif why:  # a slot outside pv_ops' known size
            self._site_finding("PV111", site, why)
        for rule, message in problems:
            self._site_finding(rule, site, message)
        if relocatable:
            for message in self._crossings(sec, off, e.instrlen):
                self._site_finding("PV107", site, message)
        return site

    def _slot(self, loc: tuple[int, int], code: bytes) -> tuple[int | None, str]:
        """The pv_ops slot the site's call reads, or why none; a slot past the table's
        known size comes with the complaint."""
        elf, arch = self.elf, self.arch
        sec = elf.sections[loc[0]]
        off = loc[1]
        field_at = len(CALL_INSN)
        if elf.is_relocatable:
            inside = self._relocs_of(sec.index).between(off, off + CALL_INSN_LEN)
            calls = [r for r in inside if r.offset == off + field_at]
            if len(calls) != 1:
                return None, "the call's operand has no relocation"
            slot = call_slot_rel(elf, code, field_at, calls[0], self.ops)
            if slot is None:
                r = calls[0]
                return None, (f"the call reads {elf.symbol(r.sym).name or '?'}"
                              f"{r.addend:+#x} ({arch.reloc_name(r.type)}), not a pv_ops slot")
            return slot, ""
        disp = int.from_bytes(code[field_at : field_at + 4], "little", signed=True)
        # x86-64 reads rip-relative; i386 reads an absolute address.
        address = sec.addr + off
        target = arch.wrap(address + CALL_INSN_LEN + disp) if arch.name == "x86_64" \
            else arch.wrap(disp)
        base, size = self._pv_ops
        if base is None:
            return None, "pv_ops is neither in .symtab nor exported, so no slot can be named"
        delta = target - base
        if delta < 0 or delta % arch.ptr_size:
            return None, f"the call reads {target:#x}, not a pv_ops slot (pv_ops = {base:#x})"
        slot = delta // arch.ptr_size
        if size is not None and delta >= size:
            return slot, f"the call reads {target:#x}, past the end of pv_ops ({size} bytes)"
        return slot, ""

    def _partners(self, i: int, e: AltEntry, group: list[int]
                  ) -> tuple[bytes | None, list[tuple[str, str]]]:
        """The native replacement among the other entries at the site, and what is wrong
        with the entries there."""
        d = self.d
        problems: list[tuple[str, str]] = []
        rloc = d.repl[i]
        if not self._in_replacements(rloc, e.repllen):
            problems.append(("PV113", "the call's placeholder lies outside "
                             f"{REPLACEMENT_SECTION}"))
        elif rloc is None or e.repllen != PLACEHOLDER_LEN \
                or self._bytes(rloc, 1) != b"\xe8":
            problems.append(("PV110", "the DIRECT_CALL replacement is not a 5-byte call "
                             "placeholder (the kernel BUG()s on it)"))
        native: bytes | None = None
        natives = 0
        for j in group:
            if j == i:
                continue
            other = d.entries[j]
            if other.flags & ALT_FLAG_DIRECT_CALL:
                if (other.instrlen, other.repllen) != (e.instrlen, e.repllen):
                    problems.append(("PV112", f"DIRECT_CALL entries {i} and {j} name the site "
                                     "with different lengths"))
                else:
                    problems.append(("PV204", f"entries {i} and {j} both name the site as a "
                                     "DIRECT_CALL"))
                continue
            if other.instrlen != e.instrlen:
                problems.append(("PV112", f"entry {j} at the site says {other.instrlen} "
                                 f"bytes, the call's entry {e.instrlen}"))
            if not other.flags & ALT_FLAG_NOT or other.feature not in PARAVIRT_FEATURES:
                continue  # not a native form: only neutralised along with the site
            natives += 1
            rloc = d.repl[j]
            if not self._in_replacements(rloc, other.repllen):
                problems.append(("PV113", f"entry {j}'s replacement lies outside "
                                 f"{REPLACEMENT_SECTION}"))
            elif other.repllen > e.instrlen:
                problems.append(("PV112", f"entry {j}'s replacement ({other.repllen} bytes) is "
                                 "longer than the site"))
            elif rloc is not None and not self._relocated(rloc, other.repllen):
                native = self._bytes(rloc, other.repllen)
        if natives > 1:
            problems.append(("PV112", f"{natives} native replacements for one site"))
            native = None
        return native, problems

    def _in_replacements(self, loc: tuple[int, int] | None, length: int) -> bool:
        rep = self.replacement
        return (loc is not None and rep is not None and loc[0] == rep.index
                and loc[1] + length <= rep.size)

    def _relocated(self, loc: tuple[int, int], length: int) -> bool:
        """A relocation inside a replacement: its bytes are not final in this file."""
        if not self.elf.is_relocatable:
            return False
        return bool(self._relocs_of(loc[0]).between(loc[1], loc[1] + length))

    def _crossings(self, sec: Section, off: int, length: int) -> list[str]:
        out = []
        end = off + length
        for r in self._relocs_of(sec.index).between(off - 8, end):
            width = self.arch.reloc(r.type).width
            if r.offset + width <= off:
                continue
            if r.offset < off or r.offset + width > end or r.offset != off + len(CALL_INSN):
                out.append(f"{self.arch.reloc_name(r.type)} at {sec.name}+{r.offset:#x} is not "
                           f"the call's own relocation in the site at {sec.name}+{off:#x} "
                           f"({length} bytes)")
        return out

    def _check_overlaps(self, site: Site, loc: tuple[int, int],
                        spans: Sequence[tuple[int, int, int, int]]) -> None:
        """Another entry whose range overlaps the site without starting at it."""
        start, end = loc[1], loc[1] + site.len
        k = bisect.bisect_left(spans, (loc[0], start - MAX_PATCH_LEN))
        while k < len(spans) and spans[k][:2] < (loc[0], end):
            sec_index, s, e, j = spans[k]
            k += 1
            if sec_index != loc[0] or s == start or e <= start:
                continue
            self._site_finding("PV104", site, f"entry {j} ({s:#x}..{e:#x}) overlaps the site "
                               f"at {site.section}+{start:#x} without starting at it")
