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
from collections.abc import Mapping, Sequence
from functools import cached_property
from types import MappingProxyType

from ..elf.reader import ElfFile, Relocation, Section, Symbol
from ..errors import TableError, UsageError
from ..record import record
from ..rules import Finding
from .layouts import AUTO_LAYOUTS, LAYOUTS, TableLayout
from .ops import OpCatalog
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


@record
class AltEntry:
    """One decoded entry; `flags` holds ALT_FLAG_* whatever the layout's era."""

    instr: int  # instr_offset (self-relative) or, in relocatable files, 0
    repl: int
    feature: int
    flags: int
    instrlen: int
    repllen: int


@record
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

    def columns(self, data: bytes) -> tuple[tuple[int, ...], ...]:
        """Every entry's fields as columns (instr, repl, feature, flags, instrlen,
        repllen), `flags` holding ALT_FLAG_* whatever the era: one pass in C, no object
        per entry (a vmlinux has ten thousand)."""
        rows = list(self._struct.iter_unpack(data))
        if not rows:
            return ((),) * 6
        cols = tuple(zip(*rows, strict=True))
        i_at, r_at, c_at, f_at, il_at, rl_at = self._positions
        cpuid = cols[c_at]
        flags = cols[f_at] if f_at is not None else (0,) * len(rows)
        not_bit = self.not_bit
        if not_bit:
            flags = tuple(f | ALT_FLAG_NOT if c & not_bit else f
                          for c, f in zip(cpuid, flags, strict=True))
            cpuid = tuple(c & ~not_bit for c in cpuid)
        return cols[i_at], cols[r_at], cpuid, flags, cols[il_at], cols[rl_at]

    def entries(self, data: bytes) -> list[AltEntry]:
        return [AltEntry(*fields) for fields in zip(*self.columns(data), strict=True)]

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


Loc = tuple[int, int]


@record
class Decoded:
    """A table decoded with one layout, as columns: entry i's fields are `feature[i]`,
    `flags[i]` (ALT_FLAG_*), `instrlen[i]`, `repllen[i]`, and its two pointers lead to
    `instr[i]` and `repl[i]`.

    A location is (section index, offset); None where the pointer leads nowhere
    usable (the reason is in `problems`)."""

    layout: AltLayout
    feature: tuple[int, ...]
    flags: tuple[int, ...]
    instrlen: tuple[int, ...]
    repllen: tuple[int, ...]
    instr: tuple[Loc | None, ...]
    repl: tuple[Loc | None, ...]
    problems: Mapping[int, str]

    @property
    def count(self) -> int:
        return len(self.flags)

    @property
    def paravirt(self) -> bool:
        """The table holds paravirt sites (or sites pvpatch already rewrote)."""
        return self.layout.direct_calls and (
            any(f & ALT_FLAG_DIRECT_CALL for f in self.flags)
            or NEUTRAL_FLAGS in zip(self.feature, self.flags, strict=True))


class _Decoder:
    """Where an entry's self-relative pointers lead, in linked and relocatable files."""

    def __init__(self, elf: ElfFile, table: Section) -> None:
        self.elf = elf
        self.table = table
        self._relocs: dict[int, Relocation] | None = None
        self._targets: dict[int, tuple[int, int] | str] = {}

    @property
    def relocs(self) -> dict[int, Relocation]:
        if self._relocs is None:
            self._relocs = {r.offset: r for r in self.elf.relocations_for(self.table)}
        return self._relocs

    def linked(self, values: Sequence[int], field_at: int, stride: int,
               problems: dict[int, str]) -> list[Loc | None]:
        """Linked: each entry's field (at `field_at` in the entry) is self-relative, so
        entry i's pointer leads to table address + i * stride + field_at + value.  One
        pass over the column, a bisect over the executable sections per pointer."""
        execs = sorted((s.addr, s.addr + s.size, s.index) for s in self.elf.sections
                       if s.is_alloc and s.is_exec and s.size)
        starts = [a for a, _e, _i in execs]
        mask = (1 << 8 * self.elf.arch.ptr_size) - 1  # Arch.wrap
        base = self.table.addr + field_at
        out: list[Loc | None] = []
        find = bisect.bisect_right
        # Consecutive entries mostly point into one section: try the last one found first.
        start, end, index = execs[0] if execs else (0, 0, 0)
        for i, value in enumerate(values):
            addr = (base + i * stride + value) & mask
            if start <= addr < end:
                out.append((index, addr - start))
                continue
            k = find(starts, addr) - 1
            if k >= 0 and addr < execs[k][1]:
                start, end, index = execs[k]
                out.append((index, addr - start))
                continue
            problems.setdefault(i, f"points at {addr:#x}, outside every executable section")
            out.append(None)
        return out

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
        instr_v, repl_v, feature, flags, instrlen, repllen = \
            layout.columns(elf.section_data(table))
        instr: list[Loc | None]
        repl: list[Loc | None]
        problems: dict[int, str] = {}
        if elf.is_relocatable:
            instr, repl = [], []
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
            # The instr field's miss is the one reported when both miss (set first).
            instr = self.linked(instr_v, 0, stride, problems)
            repl = self.linked(repl_v, 4, stride, problems)
            misses = instr.count(None) + repl.count(None)
            # A wrong stride decodes garbage: most pointers then lead nowhere.
            if misses * 8 > 2 * count:
                return f"{misses} of {2 * count} pointers lead outside executable sections"
        return Decoded(layout, feature, flags, instrlen, repllen, tuple(instr), tuple(repl),
                       problems)


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
        c_mask = sum(1 << bit for bit, reg in enumerate(self.clbr.clobber_bits)
                     if reg in self.arch.caller_saved or reg in self.arch.return_regs)
        # A site's mask and registers are one of two pairs, by the op's convention.
        self._c_clobbers = c_mask, self.clbr.regs(c_mask)
        self._callee_save = self.clbr.ret_mask, self.clbr.regs(self.clbr.ret_mask)
        self._tables = {table.index, getattr(self.replacement, "index", -1)}
        self.relocatable = elf.is_relocatable
        self._data, self._sections = elf.data, elf.sections
        rep = self.replacement
        self._rep = (rep.index, rep.size) if rep is not None else (-1, -1)
        self._rip = elf.arch.name == "x86_64"
        self._mask = (1 << 8 * elf.arch.ptr_size) - 1  # Arch.wrap
        self._named: dict[int, tuple[str | None, int, tuple[str, ...]]] = {}

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
        start = self._sections[loc[0]].offset + loc[1]
        return self._data[start : start + length]  # a copy, from bytes or a map alike

    @cached_property
    def _pv_ops(self) -> tuple[int | None, int | None]:
        """(address, size) of pv_ops in a linked file: .symtab, else the export table."""
        elf = self.elf
        sym = elf.symbols_by_name.get("pv_ops") if elf.symtab is not None else None
        size = self.ops.template_size if self.ops is not None else None
        if sym is not None and sym.defined:
            return sym.value, sym.size or size
        from ..elf.ksymtab import export_address

        return export_address(elf, "pv_ops"), size

    # -- the scan ------------------------------------------------------------------

    def run(self) -> ScanResult:
        d = self.d
        flags, instr = d.flags, d.instr
        direct = [i for i, f in enumerate(flags) if f & ALT_FLAG_DIRECT_CALL]
        for i, why in sorted(d.problems.items()):
            if flags[i] & ALT_FLAG_DIRECT_CALL:
                self._entry_finding(i, why, "PV102")
        by_loc: dict[Loc, list[int]] = {}
        for i, loc in enumerate(instr):
            if loc is not None:
                group = by_loc.get(loc)
                if group is None:
                    by_loc[loc] = [i]
                else:
                    group.append(i)
        overlaps = _Spans(d, by_loc)
        sites: list[Site] = []
        made: set[Loc] = set()
        for i in direct:
            loc = instr[i]
            if loc is None or loc in made:
                continue  # the site was made from the first DIRECT_CALL entry at it
            made.add(loc)
            site = self._site(i, loc, by_loc[loc])
            if site is not None:
                self._check_overlaps(site, loc, overlaps)
                sites.append(site)
        layout = d.layout
        return ScanResult(
            self.elf, self.elf.path, self.arch,
            Table(self.table, layout, d.count, "altinstructions"),
            tuple(sites), tuple(self.findings), self.ops, self.clbr, frozenset(self.unsafe))

    def _site(self, i: int, loc: Loc, group: list[int]) -> Site | None:
        elf, d = self.elf, self.d
        sec = elf.sections[loc[0]]
        off = loc[1]
        relocatable = self.relocatable
        address = None if relocatable else sec.addr + off
        base = i * d.layout.stride
        instrlen = d.instrlen[i]
        if instrlen == 0 or instrlen > MAX_PATCH_LEN:
            self._entry_finding(i, f"site length {instrlen} (must be 1..{MAX_PATCH_LEN})",
                                "PV109")
            return None
        if sec.file_size == 0:
            self._entry_finding(i, f"site at {sec.name}+{off:#x} is in a section with no bytes "
                                "in the file (SHT_NOBITS)", "PV102")
            return None
        if sec.index in self._tables:
            # Rewriting it would rewrite the tables the kernel reads.
            self._entry_finding(i, f"site at {sec.name}+{off:#x} is inside the alternatives "
                                "tables themselves", "PV102")
            return None
        if off + instrlen > sec.size:
            self._entry_finding(i, f"site of {instrlen} bytes at {sec.name}+{off:#x} runs "
                                f"past the end of {sec.name} ({sec.size:#x} bytes)", "PV103")
            return None
        start = sec.offset + off
        code = self._data[start : start + instrlen]
        if instrlen != CALL_INSN_LEN or not code.startswith(CALL_INSN):
            self._entry_finding(i, f"DIRECT_CALL site at {sec.name}+{off:#x} is {code.hex()} "
                                f"({instrlen} bytes), not a 6-byte call *pv_ops+off",
                                "PV110")
            return None
        slot, why = self._slot(sec, off, code)
        if slot is None:
            self._entry_finding(i, f"DIRECT_CALL site at {sec.name}+{off:#x}: {why}", "PV111")
            return None
        ops = self.ops
        named = self._named.get(slot)
        if named is None:  # a few dozen slots, thousands of sites
            op = ops.name_of(slot) if ops is not None else None
            callee_save = ops.is_callee_save(slot) if op is not None and ops else True
            named = self._named[slot] = (op, *(self._callee_save if callee_save
                                               else self._c_clobbers))
        op, clob, regs = named
        native, problems = self._partners(i, group)
        site = Site(i, sec.name, sec.index, off, address, slot, instrlen, clob, regs, op, code,
                    start, base, slot, native, tuple(group))
        if ops is not None and op is None:
            self._site_finding("PV111", site, f"the call reads pv_ops slot {slot}, outside "
                               f"the {ops.name} catalog's {len(ops.slots)} ops")
        elif why:  # a slot outside pv_ops' known size
            self._site_finding("PV111", site, why)
        for rule, message in problems:
            self._site_finding(rule, site, message)
        if relocatable:
            for message in self._crossings(sec, off, instrlen):
                self._site_finding("PV107", site, message)
        return site

    def _slot(self, sec: Section, off: int, code: bytes) -> tuple[int | None, str]:
        """The pv_ops slot the call at `off` in `sec` reads, or why none; a slot past the
        table's known size comes with the complaint."""
        elf, arch = self.elf, self.arch
        field_at = len(CALL_INSN)
        if self.relocatable:
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
        target = (sec.addr + off + CALL_INSN_LEN + disp if self._rip else disp) & self._mask
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

    def _partners(self, i: int, group: list[int]) -> tuple[bytes | None, list[tuple[str, str]]]:
        """The native replacement among the other entries at the site, and what is wrong
        with the entries there."""
        d = self.d
        flags, instrlen, repllen = d.flags, d.instrlen, d.repllen
        rep_index, rep_size = self._rep  # inlined _in_replacements: one call per entry
        problems: list[tuple[str, str]] = []
        rloc = d.repl[i]
        if rloc is None or rloc[0] != rep_index or rloc[1] + repllen[i] > rep_size:
            problems.append(("PV113", "the call's placeholder lies outside "
                             f"{REPLACEMENT_SECTION}"))
        elif repllen[i] != PLACEHOLDER_LEN or self._bytes(rloc, 1) != b"\xe8":
            problems.append(("PV110", "the DIRECT_CALL replacement is not a 5-byte call "
                             "placeholder (the kernel BUG()s on it)"))
        native: bytes | None = None
        natives = 0
        for j in group:
            if j == i:
                continue
            if flags[j] & ALT_FLAG_DIRECT_CALL:
                if (instrlen[j], repllen[j]) != (instrlen[i], repllen[i]):
                    problems.append(("PV112", f"DIRECT_CALL entries {i} and {j} name the site "
                                     "with different lengths"))
                else:
                    problems.append(("PV204", f"entries {i} and {j} both name the site as a "
                                     "DIRECT_CALL"))
                continue
            if instrlen[j] != instrlen[i]:
                problems.append(("PV112", f"entry {j} at the site says {instrlen[j]} "
                                 f"bytes, the call's entry {instrlen[i]}"))
            if not flags[j] & ALT_FLAG_NOT or d.feature[j] not in PARAVIRT_FEATURES:
                continue  # not a native form: only neutralised along with the site
            natives += 1
            rloc = d.repl[j]
            if rloc is None or rloc[0] != rep_index or rloc[1] + repllen[j] > rep_size:
                problems.append(("PV113", f"entry {j}'s replacement lies outside "
                                 f"{REPLACEMENT_SECTION}"))
            elif repllen[j] > instrlen[i]:
                problems.append(("PV112", f"entry {j}'s replacement ({repllen[j]} bytes) is "
                                 "longer than the site"))
            elif not self.relocatable or not self._relocated(rloc, repllen[j]):
                native = self._bytes(rloc, repllen[j])
        if natives > 1:
            problems.append(("PV112", f"{natives} native replacements for one site"))
            native = None
        return native, problems

    def _relocated(self, loc: tuple[int, int], length: int) -> bool:
        """A relocation inside a replacement: its bytes are not final in this file."""
        if not self.relocatable:
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

    def _check_overlaps(self, site: Site, loc: Loc, spans: _Spans) -> None:
        """Another entry whose range overlaps the site without starting at it."""
        start, end = loc[1], loc[1] + site.len
        if loc not in spans.suspect:
            return
        rows = spans.rows
        k = bisect.bisect_left(rows, (loc[0], start - MAX_PATCH_LEN))
        while k < len(rows) and rows[k][:2] < (loc[0], end):
            sec_index, s, e, j = rows[k]
            k += 1
            if sec_index != loc[0] or s == start or e <= start:
                continue
            self._site_finding("PV104", site, f"entry {j} ({s:#x}..{e:#x}) overlaps the site "
                               f"at {site.section}+{start:#x} without starting at it")


class _Spans:
    """Which sites may overlap another entry, found in one sweep over the entries' start
    locations in order; the few that may are checked exactly against every entry's range
    (section, start, end, entry), sorted."""

    def __init__(self, d: Decoded, by_loc: Mapping[Loc, list[int]]) -> None:
        self.d = d
        instrlen = d.instrlen
        suspect: set[Loc] = set()
        locs = sorted(by_loc)
        length = instrlen.__getitem__
        sec, far = -1, -1  # the farthest end of the entries starting earlier in `sec`
        for loc, nxt in zip(locs, [*locs[1:], (-1, 0)], strict=True):
            if loc[0] != sec:
                sec, far = loc[0], -1
            end = loc[1] + max(map(length, by_loc[loc]))
            # An earlier entry reaching past this start, or a later one starting before
            # this location's farthest end (which is at least the site's end).
            if far > loc[1] or (nxt[0] == sec and nxt[1] < end):
                suspect.add(loc)
            if end > far:
                far = end
        self.suspect = suspect

    @cached_property
    def rows(self) -> list[tuple[int, int, int, int]]:
        d = self.d
        return sorted((loc[0], loc[1], loc[1] + d.instrlen[i], i)
                      for i, loc in enumerate(d.instr) if loc is not None)
