"""Symbolised disassembly: bytes as AT&T text with names, as `objdump -d -r` shows them.

capstone decodes; names come from where the file says an operand points:

- relocatable files: the relocation at the operand (`call *pv_ops+0xf0(%rip)` rather
  than `call *(%rip)`, `call native_save_fl` for a direct call's PLT32/PC32);
- linked files: the operand's address looked up in `.symtab`, else the kernel image's
  export table (`pvpatch/elf/ksymtab.py`), and in names the caller adds (thunks a patch
  placed, spec targets); a load-time relocation naming a symbol at the operand wins.

Mnemonics follow objdump where capstone only spells them longer (`callq` is `call`,
`pushfq` is `pushf`, `pushq %rdi` is `push %rdi`); everything else is capstone's text.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping
from functools import cache, cached_property
from typing import Any

from ..arch import Arch
from ..disasm import Insn, capstone_mode, disassemble
from ..elf.reader import (
    SHT_REL,
    SHT_RELA,
    STT_FILE,
    STT_SECTION,
    ElfFile,
    Relocation,
)
from ..errors import PvpatchError
from ..record import record
from ..scan.sites import RelocIndex

# A name is given to an address at most this far past a symbol whose size is unknown
# (exports carry no size): farther than this, a name would mislead more than help.
SIZELESS_REACH = 0x10000

# capstone's long spellings objdump (binutils 2.40) does not use.
_ALIASES = {"callq": "call", "calll": "call", "jmpq": "jmp", "jmpl": "jmp", "retq": "ret",
            "retl": "ret", "pushfq": "pushf", "pushfl": "pushf", "popfq": "popf",
            "popfl": "popf"}
# Mnemonics whose size suffix objdump drops when a register operand says the size.
_SUFFIXED = frozenset({"push", "pop", "mov", "lea", "add", "sub", "and", "or", "xor",
                       "cmp", "test", "inc", "dec", "neg", "not"})
_MEM = re.compile(r"^(?P<star>\*?)(?P<seg>%[a-z]{2}:)?(?P<disp>-?(?:0x[0-9a-f]+|\d+))?"
                  r"(?P<rest>\(.*\))?$")


@record
class Named:
    """An address range with a name (a symbol, a thunk, an export)."""

    address: int
    size: int  # 0: unknown
    name: str


def plus(name: str, offset: int) -> str:
    """`name`, `name+0x10` or `name-0x4`, as objdump writes symbol offsets."""
    if offset == 0:
        return name
    return f"{name}+{offset:#x}" if offset > 0 else f"{name}-{-offset:#x}"


@cache
def _engine(arch_name: str) -> Any:
    import capstone  # heavy: only when something is disassembled

    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone_mode(arch_name))
    cs.syntax = capstone.CS_OPT_SYNTAX_ATT
    cs.detail = True  # operand kinds and where the displacement/immediate fields are
    return cs


def _split_operands(op_str: str) -> list[str]:
    """capstone's operand text split at top-level commas (not those inside parens)."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in op_str:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if cur or out:
        out.append("".join(cur).strip())
    return out


def _mnemonic(mnemonic: str, operands: list[str]) -> str:
    if mnemonic in _ALIASES:
        return _ALIASES[mnemonic]
    base = mnemonic[:-1]
    if mnemonic[-1:] in ("b", "w", "l", "q") and base in _SUFFIXED and any(
            op.startswith("%") and ":" not in op for op in operands):
        return base
    return mnemonic


class Symboliser:
    """Names for the operands of one file's code."""

    def __init__(self, elf: ElfFile, extra: Iterable[Named] = ()) -> None:
        self.elf = elf
        self.arch: Arch = elf.arch
        self.extra = sorted(extra, key=lambda n: n.address)
        self._relocs: dict[int, RelocIndex] = {}

    # -- names ------------------------------------------------------------------------

    @cached_property
    def _symbols(self) -> tuple[list[int], list[Named]]:
        """Defined, named symbols of `.symtab` by address (linked files), the better name
        first among several at one address: global before local, sized before not."""
        rows = []
        for s in self.elf.symbols:
            if s.defined and s.name and s.type not in (STT_SECTION, STT_FILE):
                rows.append((s.value, s.bind == 0, s.size == 0, s.name, s.size))
        rows.sort()
        named = [Named(v, size, name) for v, _local, _sizeless, name, size in rows]
        return [n.address for n in named], named

    @cached_property
    def _exports(self) -> tuple[list[int], list[Named]]:
        from ..elf.ksymtab import exported_symbols

        named = sorted((Named(a, 0, n) for n, a in exported_symbols(self.elf).items()),
                       key=lambda n: (n.address, n.name))
        return [n.address for n in named], named

    @staticmethod
    def _lookup(addr: int, keys: list[int], named: list[Named],
                reach: int = SIZELESS_REACH) -> str | None:
        """`sym+off` from the symbols `named` (sorted by address): the nearest covering
        `addr`, a sizeless one reaching `reach` bytes past its address."""
        k = bisect.bisect_right(keys, addr)
        if k == 0:
            return None
        # Among symbols at or below `addr`: the nearest one covering it.
        best = None
        start = keys[k - 1]
        j = k - 1
        while j >= 0 and keys[j] == start:
            n = named[j]
            covers = addr < n.address + n.size if n.size else addr - n.address <= reach
            if covers and (best is None or (n.size and not best.size)):
                best = n
            j -= 1
        if best is None:
            # A sized symbol just below may be passed by a longer one further down.
            for n in reversed(named[max(0, k - 8) : k - 1]):
                if n.size and n.address <= addr < n.address + n.size:
                    best = n
                    break
        return plus(best.name, addr - best.address) if best is not None else None

    def name_at(self, addr: int) -> str | None:
        """`sym+off` for an address of a linked file, or None when nothing names it."""
        if self.extra:
            keys = [n.address for n in self.extra]
            # Names the caller adds are exact: a spec target's size is not known.
            found = self._lookup(addr, keys, self.extra, reach=0)
            if found is not None:
                return found
        if self.elf.symtab is not None:
            found = self._lookup(addr, *self._symbols)
            if found is not None:
                return found
        if not self.elf.is_relocatable:
            return self._lookup(addr, *self._exports)
        return None

    # -- relocations -------------------------------------------------------------------

    def relocations(self, section_index: int, offset: int, length: int) -> list[Relocation]:
        """The relocations of a relocatable file's section inside [offset, offset+length)."""
        if not self.elf.is_relocatable or not 0 <= section_index < len(self.elf.sections):
            return []
        idx = self._relocs.get(section_index)
        if idx is None:
            sec = self.elf.sections[section_index]
            idx = self._relocs[section_index] = RelocIndex(list(self.elf.relocations_for(sec)))
        return idx.between(offset, offset + length)

    def symbol_name(self, r: Relocation) -> str:
        sym = self.elf.symbol(r.sym)
        if sym.type == STT_SECTION and 0 <= sym.section_index < len(self.elf.sections):
            return self.elf.sections[sym.section_index].name
        return sym.name or f"sym{r.sym}"

    def reloc_text(self, r: Relocation, base: int = 0) -> str:
        """`+0x2 R_X86_64_PC32 pv_ops+0xec`: a relocation as objdump -r lists it, its place
        relative to `base`."""
        return f"+{r.offset - base:#x} {self.arch.reloc_name(r.type)} " \
            f"{plus(self.symbol_name(r), r.addend)}"

    @cached_property
    def _dynamic(self) -> tuple[list[int], list[tuple[int, str]]]:
        """Load-time relocations of a linked file, (address, text) sorted by address."""
        elf = self.elf
        named = elf.symbolic_dynamic_relocations
        rows: list[tuple[int, str]] = []
        for sec in elf.sections:
            if not sec.is_alloc or sec.type not in (SHT_REL, SHT_RELA):
                continue
            fmt = elf.cls.rela if sec.type == SHT_RELA else elf.cls.rel
            data = elf.section_data(sec)
            for rec in fmt.iter_unpack(data[: len(data) // fmt.size * fmt.size]):
                sym, rtype = elf.cls.split_info(rec[1])
                text = self.arch.reloc_name(rtype)
                found = named.get(rec[0])
                if found is not None and sym and found[0] == rtype:
                    text += f" {plus(found[1], found[2])}"
                rows.append((rec[0], text))
        rows.sort()
        return [a for a, _t in rows], rows

    def dynamic_relocations(self, address: int, length: int) -> list[str]:
        """Load-time relocations inside [address, address+length) of a linked file."""
        if self.elf.is_relocatable:
            return []
        keys, rows = self._dynamic
        lo, hi = bisect.bisect_left(keys, address), bisect.bisect_left(keys, address + length)
        return [f"+{a - address:#x} {t}" for a, t in rows[lo:hi]]

    # -- instructions ------------------------------------------------------------------

    def insns(self, code: bytes, *, address: int | None = None,
              section_index: int | None = None, offset: int = 0,
              relocs: Iterable[Relocation] | None = None,
              branch_target: str | None = None) -> list[Insn]:
        """`code` decoded and symbolised.  Relocatable files: the relocations of section
        `section_index` at `offset` (or `relocs`, offsets in that section) name the
        operands; linked files: `address` is where `code` is.  `branch_target` names the
        target of a direct call or jmp at the start of `code` when nothing in the file
        can (a report made before the output exists).  A file too broken to name
        anything gets capstone's plain text: a listing is no place to fail."""
        try:
            return self._insns(code, address, section_index, offset, relocs, branch_target)
        except PvpatchError:
            return disassemble(self.arch, code, address if address is not None else offset)

    def _insns(self, code: bytes, address: int | None, section_index: int | None,
               offset: int, relocs: Iterable[Relocation] | None,
               branch_target: str | None) -> list[Insn]:
        if relocs is None:
            relocs = self.relocations(section_index, offset, len(code)) \
                if section_index is not None else []
        by_place: dict[int, Relocation] = {r.offset - offset: r for r in relocs}
        linked = not self.elf.is_relocatable and address is not None
        # Unrelocated branches in a relocatable file read as section offsets (objdump's).
        base = address if address is not None else offset
        out: list[Insn] = []
        pos = 0
        cs = _engine(self.arch.name)
        while pos < len(code):
            for insn in cs.disasm(code[pos:], base + pos):
                mine = {k - pos: r for k, r in by_place.items() if pos <= k < pos + insn.size}
                text = self._text(insn, mine, linked,
                                  branch_target if pos == 0 else None)
                out.append(Insn(pos, insn.size, text))
                pos += insn.size
            if pos < len(code):
                out.append(Insn(pos, 1, f".byte {code[pos]:#04x}"))
                pos += 1
        return out

    def _text(self, insn: Any, relocs: dict[int, Relocation], linked: bool,
              branch_target: str | None) -> str:
        from capstone import CS_GRP_BRANCH_RELATIVE
        from capstone.x86 import X86_OP_IMM, X86_OP_MEM, X86_REG_INVALID, X86_REG_RIP

        ops = _split_operands(insn.op_str)
        used: set[int] = set()
        detail = list(insn.operands)
        if len(detail) == len(ops):
            for k, op in enumerate(detail):
                if op.type == X86_OP_IMM and insn.imm_size:
                    field = insn.imm_offset
                    r = relocs.get(field)
                    if insn.group(CS_GRP_BRANCH_RELATIVE):
                        name = self._field_name(r, insn.size - field) if r else None
                        if r is None and branch_target is not None:
                            name = branch_target
                        elif r is None and linked:
                            name = self.name_at(op.imm)
                        if name is not None:
                            ops[k] = name
                            used.add(field)
                    elif r is not None:
                        name = self._field_name(r, insn.size - field, absolute=True)
                        if name is not None:
                            ops[k] = "$" + name
                            used.add(field)
                elif op.type == X86_OP_MEM:
                    m = _MEM.match(ops[k])
                    if m is None:
                        continue
                    field = insn.disp_offset
                    rip = op.mem.base == X86_REG_RIP
                    r = relocs.get(field) if insn.disp_size else None
                    name = None
                    if r is not None:
                        name = self._field_name(r, insn.size - field, absolute=not rip)
                        if name is not None:
                            used.add(field)
                    elif linked:
                        name = self._linked_mem(insn, op, rip,
                                                op.mem.base == X86_REG_INVALID
                                                and op.mem.index == X86_REG_INVALID)
                    rest = (m["rest"] or "").replace(" ", "")
                    ops[k] = f"{m['star']}{m['seg'] or ''}{name if name else m['disp'] or ''}" \
                        f"{rest}"
        text = _mnemonic(insn.mnemonic, ops)
        if ops:
            text += " " + ",".join(ops)
        for at, r in sorted(relocs.items()):
            if at not in used:  # a relocation capstone's fields do not account for
                text += f"  # {self.arch.reloc_name(r.type)} {plus(self.symbol_name(r), r.addend)}"
        return text

    def _field_name(self, r: Relocation, to_end: int, absolute: bool = False) -> str | None:
        """What a relocated field makes the operand name.  PC-relative: the field ends
        `to_end` bytes before the next instruction, so the operand is S + A + to_end;
        absolute: S + A.  GOT and TLS forms are left to the comment."""
        kind = self.arch.reloc(r.type)
        if "GOT" in kind.name or "TLS" in kind.name or "TPOFF" in kind.name:
            return None
        if kind.pc_relative == absolute:
            return None
        return plus(self.symbol_name(r), r.addend + (0 if absolute else to_end))

    def _linked_mem(self, insn: Any, op: Any, rip: bool, bare: bool) -> str | None:
        field_addr = insn.address + insn.disp_offset
        dyn = self.elf.symbolic_dynamic_relocations.get(field_addr) \
            if insn.disp_size else None
        if dyn is not None and not self.arch.reloc(dyn[0]).pc_relative \
                and self.arch.reloc(dyn[0]).width:
            return plus(dyn[1], dyn[2])  # filled in at load time: S + A
        if rip:
            return self.name_at(self.arch.wrap(insn.address + insn.size + op.mem.disp))
        if bare:
            return self.name_at(self.arch.wrap(op.mem.disp))
        return None


def extra_names(names: Mapping[str, int]) -> list[Named]:
    """Names with addresses and no known size (spec targets a plan found)."""
    return [Named(a, 0, n) for n, a in names.items()]
