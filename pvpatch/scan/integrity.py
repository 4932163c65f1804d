"""Site integrity: a table entry is input, not truth.

An entry says "here are `len` bytes of a paravirt call".  Before anything rewrites
them, the bytes must be what the entry claims: the call (through the ops table, or a
direct call) followed only by NOP padding, or a form pvpatch itself writes (inline
native code, a call, a jmp, ud2 or NOPs, each padded with NOPs).  Anything else in a
site, a relocation other than the call's own, an instruction that starts before the
site or runs past it, or a branch from outside that lands inside it, means the entry
lies (a toolchain bug or a hostile file), and the site is never rewritten.

Recognising the accepted forms is table lookup (call heads and NOP forms are data, in
`sites.CALL_FORMS` and `Arch.nop_forms`); capstone is used only for sites that fail it
and, where the file has function symbols, to decode the functions that hold sites
(instruction starts and branch targets).
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Callable
from functools import cache

from ..arch import Arch
from ..elf.reader import STT_FUNC, ElfFile
from ..record import record
from ..rules import Finding
from .sites import CALL_FORMS, ScanResult, Site, site_finding

MAX_INSN = 15  # longest x86 instruction: enough look-ahead to see one run past a site


@record
class Head:
    """An instruction a site may start with: its opcode bytes, whole length, what it is,
    and where its relocated operand starts (None: it has none)."""

    opcode: bytes
    length: int
    kind: str  # ops-call | call | jmp | ud2
    operand: int | None


@cache
def heads(arch_name: str) -> tuple[Head, ...]:
    """The forms a site's first instruction may take, as data, longest opcode first."""
    out = [Head(op, len(op) + 4, "ops-call", len(op)) for op, a, _rip in CALL_FORMS
           if a == arch_name]
    out += [Head(b"\xe8", 5, "call", 1), Head(b"\xe9", 5, "jmp", 1),
            Head(b"\x0f\x0b", 2, "ud2", None)]
    return tuple(sorted(out, key=lambda h: -len(h.opcode)))


@cache
def _heads_by_first_byte(arch_name: str) -> dict[int, tuple[Head, ...]]:
    """`heads` grouped by their first opcode byte, longest opcode first in each group."""
    out: dict[int, list[Head]] = {}
    for h in heads(arch_name):
        out.setdefault(h.opcode[0], []).append(h)
    return {byte: tuple(group) for byte, group in out.items()}


def site_form(arch: Arch, code: bytes) -> Head | None:
    """The head a site's bytes are made of (then NOPs only), or None.  All-NOP sites are a
    zero-length head."""
    # Only heads starting with the site's first byte can match (thousands of sites), and
    # most sites are exactly their head, with no padding to read.
    size = len(code)
    for h in _heads_by_first_byte(arch.name).get(code[0], ()) if code else ():
        if code.startswith(h.opcode) and (size == h.length or (
                size > h.length and arch.is_nop_fill(code[h.length :]))):
            return h
    if arch.is_nop_fill(code):
        return Head(b"", 0, "nops", None)
    return None


NativeCode = Callable[[Site], bytes | None]
_UNSEEN = Head(b"", -1, "unseen", None)  # a cache miss, distinct from None (no form)


def _native_lookup(arch: Arch) -> NativeCode:
    """The builtin native backend's inline bytes for a site's op: a site pvpatch already
    patched holds them (then NOPs)."""
    from ..plan.backend import load_backend

    backend = load_backend("native", arch)

    def code(site: Site) -> bytes | None:
        rule = backend.rule_for(site.op, site.type) if site.op is not None else None
        return rule.code if rule is not None and rule.action == "inline" else None

    return code


def site_problems(result: ScanResult) -> list[Finding]:
    """Every integrity finding (all errors) for the sites of `result`."""
    if not result.sites:
        return []
    return _Checker(result).run()


class _Checker:
    def __init__(self, result: ScanResult) -> None:
        self.result = result
        self.elf: ElfFile = result.elf
        self.arch = result.arch
        self._native: NativeCode | None = None
        self._relocs: dict[int, list[int]] = {}
        self.out: list[Finding] = []

    def native(self, site: Site) -> bytes | None:
        if self._native is None:
            self._native = _native_lookup(self.arch)
        return self._native(site)

    def run(self) -> list[Finding]:
        # Thousands of sites share a handful of byte patterns (in relocatable files every
        # call's operand is zero): each pattern is recognised once.
        forms: dict[bytes, Head | None] = {}
        heads_of: list[tuple[Site, Head]] = []
        for site in self.result.sites:
            code = site.code
            head = forms.get(code, _UNSEEN)
            if head is _UNSEEN:
                head = forms[code] = site_form(self.arch, code)
            if head is None:
                native = self.native(site)
                if native is not None and code.startswith(native) and \
                        self.arch.is_nop_fill(code[len(native) :]):
                    head = Head(native, len(native), "inline", None)
            if head is None:
                self._shape(site)
            else:
                heads_of.append((site, head))
        if self.elf.is_relocatable:
            self._relocations(heads_of)
        self._functions()
        return self.out

    # -- the site's own bytes -------------------------------------------------------

    def _shape(self, site: Site) -> None:
        self.out.append(site_finding(
            "PV114", site, f"the site's bytes {site.code.hex()} are not a paravirt call "
            "followed only by NOPs (nor a form pvpatch writes)"))
        why = _end_problem(self.elf, self.arch, site)
        if why is not None:
            self.out.append(site_finding("PV105", site, why))

    def _relocations(self, heads_of: list[tuple[Site, Head]]) -> None:
        """Relocations inside a site: only the call's own operand may carry one."""
        by_sec: dict[int, list[tuple[int, int, Site, Head]]] = defaultdict(list)
        for site, head in heads_of:
            by_sec[site.section_index].append((site.offset, site.index, site, head))
        left, right = bisect.bisect_left, bisect.bisect_left
        for sec_index, rows in by_sec.items():
            offsets = self._reloc_offsets(sec_index)
            for start, _index, site, head in rows:
                lo = left(offsets, start)
                hi = right(offsets, site.end, lo)
                if lo == hi:
                    continue
                allowed = start + head.operand if head.operand is not None else -1
                if hi - lo == 1 and offsets[lo] == allowed:
                    continue  # the common case: the call's own relocation, alone
                for r in offsets[lo:hi]:
                    if r != allowed:
                        self._foreign(site, head, r)

    def _foreign(self, site: Site, head: Head, r: int) -> None:
        sec = self.elf.sections[site.section_index]
        self.out.append(site_finding(
            "PV115", site, f"a relocation at {sec.name}+{r:#x} inside the site is not "
            f"its call's own ({head.kind} at {sec.name}+{site.offset:#x})"))

    def _reloc_offsets(self, sec_index: int) -> list[int]:
        offsets = self._relocs.get(sec_index)
        if offsets is None:
            offsets = self._relocs[sec_index] = sorted(
                r.offset for r in self.elf.relocations_for(self.elf.sections[sec_index]))
        return offsets

    # -- the functions holding sites ------------------------------------------------

    def _functions(self) -> None:
        """PV105 (a site that starts inside an instruction) and PV116 (a branch from
        outside landing inside a site), decoding each function that holds sites from its
        symbol's start; without function symbols neither can be known, and nothing is
        claimed."""
        elf = self.elf
        if elf.symtab is None:
            return
        funcs = _function_index(elf)
        groups: dict[tuple[int, _Func], list[Site]] = defaultdict(list)
        for site in self.result.sites:
            fn = _containing(funcs.get(site.section_index), site)
            if fn is not None:
                groups[(site.section_index, fn)].append(site)
        for (sec_index, fn), sites in groups.items():
            self._decode(sec_index, fn, sites)

    def _decode(self, sec_index: int, fn: _Func, sites: list[Site]) -> None:
        elf, arch = self.elf, self.arch
        sec = elf.sections[sec_index]
        # Addresses as the code sees them: section offsets in relocatable files.
        base = 0 if elf.is_relocatable else sec.addr
        code = bytes(elf.data[sec.offset + fn.start : sec.offset + fn.end])
        starts, branches, stop = _decode(arch, code, base + fn.start)
        if elf.is_relocatable:
            # A relocated branch goes to another section or symbol: the target its bytes
            # give is no address in this section.
            relocs = self._reloc_offsets(sec_index)
            branches = [(at, size, t) for at, size, t in branches
                        if bisect.bisect_left(relocs, at) == bisect.bisect_left(relocs, at + size)]
        spans = sorted((s.offset, s.end, s.index) for s in sites)
        by_index = {s.index: s for s in sites}
        for s in sites:
            rel = s.offset - fn.start
            if rel >= stop:
                continue  # the decoder stopped before the site: nothing certain to say
            i = bisect.bisect_right(starts, rel) - 1
            if starts[i] != rel:
                nxt = starts[i + 1] if i + 1 < len(starts) else stop
                self.out.append(site_finding("PV105", s, (
                    f"site starts inside an instruction: {sec.name}+{fn.start + starts[i]:#x} "
                    f"({nxt - starts[i]} bytes, decoded from {fn.name} at "
                    f"{sec.name}+{fn.start:#x}) covers {sec.name}+{s.offset:#x}")))
        reported: set[int] = set()
        for at, _size, target in branches:
            off = target - base
            at_off = at - base
            k = bisect.bisect_right(spans, (off, 1 << 62)) - 1
            if k < 0:
                continue
            start, end, index = spans[k]
            s = by_index[index]
            if start < off < end and not start <= at_off < end and s.index not in reported:
                reported.add(s.index)
                self.out.append(site_finding("PV116", s, (
                    f"a branch at {sec.name}+{at_off:#x} lands at {sec.name}+{off:#x}, inside "
                    f"the site at {sec.name}+{start:#x} ({s.len} bytes)")))


@record
class _Func:
    """A sized function symbol, as section offsets."""

    start: int  # section offsets
    end: int
    name: str


def _function_index(elf: ElfFile) -> dict[int, tuple[list[int], list[_Func]]]:
    """Sized function symbols by section index, sorted by start (section offsets)."""
    by_sec: dict[int, list[_Func]] = defaultdict(list)
    for sym in elf.symbols:
        if sym.type != STT_FUNC or sym.size == 0 or not sym.defined \
                or not 0 < sym.section_index < len(elf.sections):
            continue
        sec = elf.sections[sym.section_index]
        start = sym.value if elf.is_relocatable else sym.value - sec.addr
        if start >= 0 and start + sym.size <= sec.size and sec.file_size:
            by_sec[sym.section_index].append(_Func(start, start + sym.size, sym.name))
    out = {}
    for index, funcs in by_sec.items():
        funcs.sort(key=lambda f: (f.start, -f.end))
        out[index] = ([f.start for f in funcs], funcs)
    return out


def _containing(funcs: tuple[list[int], list[_Func]] | None, site: Site) -> _Func | None:
    if funcs is None:
        return None
    starts, items = funcs
    # The nearest start at or before the site that also covers its end; aliases and
    # nested symbols share starts, so look back a few entries, not just one.
    hi = bisect.bisect_right(starts, site.offset)
    for f in reversed(items[max(0, hi - 8) : hi]):
        if f.end >= site.end:
            return f
    return None


_DIRECT = re.compile(r"^\$?(0x[0-9a-f]+)$")


def _decode(arch: Arch, code: bytes, address: int
            ) -> tuple[list[int], list[tuple[int, int, int]], int]:
    """Instruction starts (offsets into `code`), direct branches as (address of the branch,
    its size, target address), and where decoding stopped."""
    from ..disasm import engine

    starts: list[int] = []
    branches: list[tuple[int, int, int]] = []
    pos = 0
    for addr, size, mnemonic, op_str in engine(arch.name).disasm_lite(code, address):
        starts.append(pos)
        pos += size
        if mnemonic[0] == "j" or mnemonic.startswith(("call", "loop")):
            m = _DIRECT.match(op_str)
            if m is not None:
                branches.append((addr, size, int(m.group(1), 16)))
    return starts, branches, pos


def _end_problem(elf: ElfFile, arch: Arch, site: Site) -> str | None:
    """Whether the site's own bytes decode into whole instructions ending at its end."""
    from ..disasm import insn_starts

    sec = elf.sections[site.section_index]
    # A few bytes past the site show whether its last instruction runs over the end.
    ahead = min(MAX_INSN, sec.size - site.end)
    code = elf.data[site.file_offset : site.file_offset + site.len + max(ahead, 0)]
    starts, stop = insn_starts(arch, code)
    if site.len in starts or stop == site.len:
        return None
    if stop < site.len:
        return (f"byte {code[stop]:#04x} at site+{stop:#x} does not decode "
                f"({site.len}-byte site)")
    last = max(s for s in starts if s < site.len)
    nxt = min([s for s in starts if s > last] + [stop])
    return (f"the instruction at site+{last:#x} ({nxt - last} bytes) runs "
            f"{nxt - site.len} byte(s) past the end of the {site.len}-byte site")
