"""Register-saving thunks (the seed's PV_CALLEE_SAVE_REGS_THUNK), generated as bytes.

    [endbr64]  push <saves...>  [lea -pad(%rsp),%rsp]  call target
               [lea pad(%rsp),%rsp]  pop <saves reversed>  <return> [int3]

Unlike the seed's thunk, the stack pointer is kept aligned as the psABI wants
at the inner call (assuming an aligned call site), using `lea` so that the
flags the target leaves are not disturbed on the way out.

A thunk follows the conventions of the object it goes into, read from the file
(`file_conventions`) and described as data (`RETURN_FORMS`, `SLS_PADDING`):

- how code returns: a bare `ret`, or (CONFIG_RETHUNK) `jmp __x86_return_thunk`
  with every such jmp listed in `.return_sites`, so the kernel can send it to the
  return thunk it chooses at boot;
- straight-line-speculation padding (`-mharden-sls=all`): an `int3` after every
  return and jump, so the CPU does not speculate past it into the next bytes;
- `endbr` when the input asks for IBT (decided by the plan: `ThunkSpec.endbr`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ..arch import Arch
from ..elf.reader import SHF_ALLOC, SHT_NOBITS, STT_FUNC, ElfFile, Section
from ..errors import RewriteError
from ..plan.stage import Plan, ThunkSpec
from ..record import record

if TYPE_CHECKING:
    # The unwind encoders load with the first thunk made: a native-only patch never needs them.
    from .unwind import ThunkFrame

THUNK_ALIGN = 16
DEFAULT_SECTION = ".text.pvpatch"


@record
class SiteTable:
    """A section listing instructions as s32 offsets, each relative to its own entry,
    as objtool writes them (section flags, alignment and entry size included)."""

    section: str
    flags: int = SHF_ALLOC
    addralign: int = 1
    entsize: int = 4
    entry_size: int = 4


@record
class ReturnForm:
    """How an object's code returns: `opcode`, then a rel32 to `symbol` when there is one,
    and where each such return is listed."""

    name: str
    opcode: bytes
    symbol: str | None = None  # the return thunk every return jumps to
    table: SiteTable | None = None  # the section listing every return


BARE_RET = ReturnForm("ret", b"\xc3")
# CONFIG_RETHUNK (Linux 5.19+): gcc -mfunction-return=thunk-extern writes every return
# as `jmp __x86_return_thunk`; objtool --rethunk lists each in .return_sites, and the
# kernel rewrites the listed ones at boot (`ret; int3`, or a jmp to the thunk it chose).
RETURN_THUNK = ReturnForm("return-thunk", b"\xe9", "__x86_return_thunk",
                          SiteTable(".return_sites"))
# The forms a file may use instead of a bare `ret`, tried in order.
RETURN_FORMS: tuple[ReturnForm, ...] = (RETURN_THUNK,)

# -mharden-sls=all: an int3 after every ret and indirect jmp (gcc; the kernel's
# CONFIG_SLS).  Read from the code: a majority of its rets and indirect jmps is
# followed by this byte.
SLS_PADDING = b"\xcc"
# Decoding the code for SLS evidence stops after this many returns and indirect jumps,
# or this many bytes: a kernel image has millions of instructions.
SLS_EVIDENCE = 64
SLS_DECODE_BUDGET = 1 << 20


@record
class Conventions:
    """What a thunk's return looks like in one file."""

    returns: ReturnForm = BARE_RET
    # Linked files: the address `returns.symbol` has (its jmp is resolved here).
    return_address: int | None = None
    # Each return is added to `returns.table` (relocatable files: linked ones cannot
    # grow a table whose bounds are compiled into the code).
    listed: bool = False
    padding: bytes = b""  # after every return and jump

    @property
    def description(self) -> str:
        parts = [self.returns.name if self.returns.symbol is None
                 else f"jmp {self.returns.symbol}"]
        if self.returns.table is not None:
            parts.append(f"{'listed in' if self.listed else 'not listed in'} "
                         f"{self.returns.table.section}")
        if self.padding:
            parts.append("int3 after it")
        return ", ".join(parts)


PLAIN = Conventions()


@record
class Branch:
    """A rel32 field of a thunk and the symbol it reaches."""

    field: int  # offset of the rel32 in the thunk
    symbol: str


@record
class ThunkCode:
    """A thunk's bytes with every rel32 field zero, bound where it is placed (by a relocation
    or from addresses)."""

    code: bytes
    call_field: int  # offset of the rel32 of the inner call
    branches: tuple[Branch, ...] = ()  # every rel32: the inner call, a return through a thunk
    listed: tuple[int, ...] = ()  # offsets of the instructions the return table lists
    # The stack after each push, lea and pop: what the unwind data says (pvpatch/rewrite/unwind.py).
    frame: ThunkFrame | None = None


def stack_pad(arch: Arch, pushes: int) -> int:
    """Bytes to lower the stack so the inner call sees an aligned stack pointer.

    At the thunk's entry the call that reached it has pushed one word, so the
    stack is a word short of aligned; each push takes one more.
    """
    return -(arch.ptr_size * (1 + pushes)) % arch.stack_align


def thunk_code(arch: Arch, spec: ThunkSpec, conventions: Conventions = PLAIN) -> ThunkCode:
    from .unwind import FrameBuilder

    out = bytearray(arch.endbr if spec.endbr else b"")
    frame = FrameBuilder(arch)
    for reg in spec.saves:
        out += arch.push(reg)
        frame.push(len(out), reg)
    pad = stack_pad(arch, len(spec.saves))
    if pad:
        out += arch.adjust_sp(-pad)
        frame.adjust(len(out), -pad)
    out += b"\xe8"
    call_field = len(out)
    branches = [Branch(call_field, spec.target)]
    out += bytes(4)
    if pad:
        out += arch.adjust_sp(pad)
        frame.adjust(len(out), pad)
    for reg in reversed(spec.saves):
        out += arch.pop(reg)
        frame.pop(len(out), reg)
    form = conventions.returns
    returns_at = len(out)
    out += form.opcode
    if form.symbol is not None:
        branches.append(Branch(len(out), form.symbol))
        out += bytes(4)
    out += conventions.padding
    listed = (returns_at,) if conventions.listed and form.table is not None else ()
    return ThunkCode(bytes(out), call_field, tuple(branches), listed, frame.frame(len(out)))


@record
class ThunkSlot:
    """A thunk's place in the thunk section and its code (branches not yet bound)."""

    spec: ThunkSpec
    offset: int
    code: ThunkCode


def lay_out_thunks(arch: Arch, specs: Iterable[ThunkSpec],
                   conventions: Conventions) -> Iterator[ThunkSlot]:
    """Where the rewriter puts each thunk in the thunk section it creates: THUNK_ALIGN
    apart, in the order given (the plan's), from offset 0."""
    end = 0
    for spec in specs:
        at = (end + THUNK_ALIGN - 1) // THUNK_ALIGN * THUNK_ALIGN
        tc = thunk_code(arch, spec, conventions)
        yield ThunkSlot(spec, at, tc)
        end = at + len(tc.code)


def planned_thunk_layout(plan: Plan) -> Iterator[ThunkSlot]:
    """The plan's thunks where the rewriter puts them in a section of their own."""
    return lay_out_thunks(plan.arch, plan.thunks,
                          file_conventions(plan.scan.elf, plan.backend.thunk_section))


def planned_thunk_code(plan: Plan, spec: ThunkSpec) -> ThunkCode:
    """The thunk the rewriter writes for `spec` in the plan's file (its conventions): what
    anything that lays thunks out again (verify) must measure."""
    return thunk_code(plan.arch, spec,
                      file_conventions(plan.scan.elf, plan.backend.thunk_section))


# -- reading the conventions from a file ------------------------------------------------

_CACHE: weakref.WeakKeyDictionary[ElfFile, dict[str, Conventions]] = \
    weakref.WeakKeyDictionary()


def file_conventions(elf: ElfFile, thunk_section: str = DEFAULT_SECTION) -> Conventions:
    """The conventions thunks placed in `elf` follow (the thunk section itself, left by
    an earlier run, is not evidence).  Raises RewriteError when a linked file uses return
    thunks but the return thunk's address cannot be found."""
    per_file = _CACHE.setdefault(elf, {})
    found = per_file.get(thunk_section)
    if found is None:
        form, address, listed = _return_form(elf)
        padding = SLS_PADDING if _sls_padded(elf, thunk_section) else b""
        found = per_file[thunk_section] = Conventions(form, address, listed, padding)
    return found


def _return_form(elf: ElfFile) -> tuple[ReturnForm, int | None, bool]:
    for form in RETURN_FORMS:
        assert form.symbol is not None and form.table is not None
        table = elf.section(form.table.section)
        if elf.is_relocatable:
            if table is not None or _referenced(elf, form.symbol):
                return form, None, True
            continue
        if table is None or not table.is_alloc:
            continue
        address = _linked_address(elf, form.symbol)
        if address is None:
            raise RewriteError(f"the file lists its returns in {form.table.section}, but "
                               f"{form.symbol} is in neither .symtab nor the export table: "
                               "thunks could not return through it", elf.path)
        return form, address, False
    return BARE_RET, None, False


def _referenced(elf: ElfFile, symbol: str) -> bool:
    """A relocation in an executable section names `symbol` (gcc's return jmps do)."""
    indices = {s.index for s in elf.symbols if s.name == symbol}
    if not indices:
        return False
    for sec in elf.sections:
        if sec.is_exec:
            for relsec in elf.relocation_sections(sec):
                if any(r.sym in indices for r in elf.relocations(relsec)):
                    return True
    return False


def _linked_address(elf: ElfFile, symbol: str) -> int | None:
    sym = elf.symbols_by_name.get(symbol)
    if sym is not None and sym.defined:
        return sym.value
    from ..elf.ksymtab import export_address  # distribution kernels have no .symtab

    return export_address(elf, symbol)


def _code_ranges(elf: ElfFile, skip: str) -> list[tuple[Section, int, int]]:
    """(section, start, end) to decode: every function, else every executable section."""
    sections = elf.sections
    usable = {s.index for s in sections
              if s.is_exec and s.type != SHT_NOBITS and s.name != skip and s.size}
    funcs = []
    for sym in elf.symbols:
        if sym.type == STT_FUNC and sym.size and sym.defined and sym.section_index in usable:
            sec = sections[sym.section_index]
            # A linked file's symbols hold addresses, a relocatable file's offsets.
            start = sym.value if elf.is_relocatable else sym.value - sec.addr
            if start >= 0 and start + sym.size <= sec.size:
                funcs.append((sec, start, start + sym.size))
    if funcs:
        return funcs
    return [(sections[i], 0, sections[i].size) for i in sorted(usable)]


def _sls_padded(elf: ElfFile, skip: str) -> bool:
    """Most of the code's rets and indirect jmps are followed by an int3."""
    from ..disasm import engine  # capstone: only files that get thunks need it

    cs = engine(elf.arch.name)
    padded = bare = decoded = 0
    width = len(SLS_PADDING)
    cache: dict[int, bytes] = {}
    for sec, start, end in _code_ranges(elf, skip):
        data = cache.get(sec.index)
        if data is None:
            data = cache[sec.index] = elf.section_data(sec)
        pos = start
        while pos < end:
            if padded + bare >= SLS_EVIDENCE or decoded >= SLS_DECODE_BUDGET:
                return padded > bare
            stop = min(end, pos + SLS_DECODE_BUDGET - decoded)
            before = pos
            for _addr, size, mnemonic, op_str in cs.disasm_lite(data[pos:stop], pos):
                pos += size
                word = mnemonic.split()[-1]
                if (word.startswith("ret") or (word.startswith("jmp") and op_str[:1] == "*")) \
                        and pos + width <= len(data):
                    if data[pos : pos + width] == SLS_PADDING:
                        padded += 1
                    else:
                        bare += 1
            if pos < stop:
                pos += 1  # a byte that does not decode: go on after it
            decoded += pos - before
    return padded > bare
