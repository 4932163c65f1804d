"""Op catalogs: which `struct paravirt_patch_template` member a `.parainstructions` type means.

A site's `type` byte is offsetof(struct paravirt_patch_template, op) / sizeof(void *).
A catalog maps those indices to dotted member paths ("irq.save_fl",
"pv_irq_ops.irq_disable"). It comes from BTF, from DWARF, or from a built-in
TOML table under pvpatch/data/ops/.

Flattening rule (same for every source): walk the template; a pointer member, or
a struct member whose only member is a pointer (`struct paravirt_callee_save`),
is one slot named by its path; other struct members are walked recursively
(`mmu.lazy_mode.enter`); anything else is skipped. Slot = byte offset / ptr_size.

Built-in TOML format (loaded with tomllib)::

    name = "linux-6.1-x86_64"      # must equal the file stem
    arch = "x86_64"                # "x86_64" or "i386"
    ptr_size = 8                   # 4 or 8
    kernel = "6.1"                 # version prefix that vermagic is matched against
    template_size = 672            # optional: sizeof(struct paravirt_patch_template)
    complete = true                # false when only some slots are known
    [slots]
    0 = "cpu.io_delay"                                 # plain slot
    30 = { op = "irq.save_fl", callee_save = true }    # callee-save slot
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pvpatch.arch import ARCHES
from pvpatch.elf.btf import KIND_PTR, KIND_STRUCT, Btf
from pvpatch.errors import OpsError

from ..record import record

if TYPE_CHECKING:
    import mmap
    from pathlib import Path

TEMPLATE_STRUCT = "paravirt_patch_template"
CALLEE_SAVE_STRUCT = "paravirt_callee_save"
_DATA_DIR = ("data", "ops")  # inside the pvpatch package
_MAX_DEPTH = 16
_ARCH_ALIASES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x86-64": "x86_64",
    "i386": "i386",
    "i486": "i386",
    "i586": "i386",
    "i686": "i386",
    "x86": "i386",
    "x86_32": "i386",
}


@record
class OpCatalog:
    """Op names by `.parainstructions` type index for one kernel layout."""

    name: str
    ptr_size: int
    slots: Mapping[int, str]
    callee_save: frozenset[int] = frozenset()
    template_size: int | None = None  # sizeof(template) in bytes, when known
    complete: bool = True  # False: some slots of the template are not listed
    _by_name: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.ptr_size not in (4, 8):
            raise OpsError(f"pointer size must be 4 or 8, not {self.ptr_size}", self.name)
        by_name: dict[str, int] = {}
        for index, op in self.slots.items():
            if index < 0:
                raise OpsError(f"negative slot index {index}", self.name)
            if op in by_name:
                raise OpsError(f"op {op!r} at slots {by_name[op]} and {index}", self.name)
            by_name[op] = index
        stray = self.callee_save - self.slots.keys()
        if stray:
            raise OpsError(f"callee-save slots without an op: {sorted(stray)}", self.name)
        # Copies behind read-only views keep the frozen catalog really immutable.
        object.__setattr__(self, "slots", MappingProxyType(dict(sorted(self.slots.items()))))
        object.__setattr__(self, "_by_name", MappingProxyType(by_name))

    def __hash__(self) -> int:
        return hash((self.name, self.ptr_size, tuple(self.slots.items()), self.callee_save))

    def name_of(self, type_: int) -> str | None:
        """The op path for a site's type byte, or None if the catalog has no such slot."""
        return self.slots.get(type_)

    def type_of(self, name: str) -> int | None:
        """The type index of an op path, or None."""
        return self._by_name.get(name)

    def is_callee_save(self, type_: int) -> bool:
        return type_ in self.callee_save

    def same_layout(self, other: OpCatalog) -> bool:
        """True if both give the same names and callee-save flags (names of catalogs aside)."""
        return (
            self.ptr_size == other.ptr_size
            and dict(self.slots) == dict(other.slots)
            and self.callee_save == other.callee_save
        )


# -- the source-independent flattening -------------------------------------------


@record
class _Ptr:
    """A pointer member (an op) in a template's shape."""

    size: int | None  # None when the source does not record it (BTF)


@record
class _Other:
    """A member that is neither a pointer nor a struct."""

    pass


@record
class _Field:
    """A named member of a struct, at its byte offset."""

    name: str
    offset: int  # bytes from the start of the enclosing struct
    shape: _Shape


@record
class _Struct:
    """A struct's shape: its size and members."""

    name: str
    size: int
    fields: tuple[_Field, ...]


_Shape = _Ptr | _Struct | _Other


def _flatten(template: _Struct, ptr_size: int, origin: str) -> OpCatalog:
    slots: dict[int, str] = {}
    callee: set[int] = set()
    extents: list[int] = []  # bytes from each pointer slot to the next member

    def add(path: str, offset: int, extent: int, is_callee: bool) -> None:
        if offset % ptr_size:
            raise OpsError(f"{path} at byte {offset} is not pointer-aligned", origin)
        index = offset // ptr_size
        if index in slots:
            raise OpsError(f"{path} and {slots[index]} share slot {index}", origin)
        slots[index] = path
        extents.append(extent)
        if is_callee:
            callee.add(index)

    def walk(struct: _Struct, base: int, prefix: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise OpsError(f"{prefix or TEMPLATE_STRUCT} nests too deeply", origin)
        for i, f in enumerate(struct.fields):
            path = f"{prefix}.{f.name}" if prefix and f.name else (f.name or prefix)
            offset = base + f.offset
            nxt = struct.fields[i + 1].offset if i + 1 < len(struct.fields) else struct.size
            extent = nxt - f.offset
            shape = f.shape
            if isinstance(shape, _Ptr):
                _check_ptr(shape, path)
                add(path, offset, extent, False)
            elif isinstance(shape, _Struct):
                only = shape.fields[0].shape if len(shape.fields) == 1 else None
                if isinstance(only, _Ptr) and shape.fields[0].offset == 0:
                    _check_ptr(only, path)
                    add(path, offset, extent, shape.name == CALLEE_SAVE_STRUCT)
                else:
                    walk(shape, offset, path, depth + 1)

    def _check_ptr(ptr: _Ptr, path: str) -> None:
        if ptr.size is not None and ptr.size != ptr_size:
            raise OpsError(f"{path} is a {ptr.size}-byte pointer, not {ptr_size}", origin)

    walk(template, 0, "", 0)
    if not slots:
        raise OpsError(f"struct {TEMPLATE_STRUCT} has no pointer members", origin)
    # A wrong ptr_size would still divide the offsets; the tightest spacing between
    # a slot and the next member gives the real pointer width away.
    if min(extents) != ptr_size:
        raise OpsError(
            f"struct {TEMPLATE_STRUCT} packs pointers {min(extents)} bytes apart,"
            f" but ptr_size is {ptr_size}",
            origin,
        )
    return OpCatalog(origin, ptr_size, slots, frozenset(callee), template.size, True)


# -- BTF ---------------------------------------------------------------------------


def _btf_shape(btf: Btf, type_id: int, depth: int) -> _Shape:
    if depth > _MAX_DEPTH:
        raise OpsError(f"BTF type {type_id} nests too deeply", btf.path)
    t = btf.resolve(type_id)
    if t.kind == KIND_PTR:
        return _Ptr(None)
    if t.kind != KIND_STRUCT:
        return _Other()
    fields = []
    for m in t.members:
        if m.bitfield_size or m.bit_offset % 8:
            continue  # a bitfield is never an op slot
        if m.bit_offset // 8 > t.size:
            raise OpsError(f"member {m.name} of struct {t.name} lies past its end", btf.path)
        fields.append(_Field(m.name, m.bit_offset // 8, _btf_shape(btf, m.type_id, depth + 1)))
    return _Struct(t.name, t.size, tuple(fields))


def catalog_from_btf(
    data: bytes | mmap.mmap, ptr_size: int, *, base: bytes | None = None, origin: str = "btf",
    start: int = 0, size: int | None = None,
) -> OpCatalog:
    """Build the catalog from a raw `.BTF` blob (split on `base` if given), which is
    `data[start:start + size]` (a section read in place from a mapped file).

    `origin` names the source in the catalog name ("btf:<origin>" unless it
    already starts with "btf") and in error messages.
    """
    name = origin if origin.startswith("btf") else f"btf:{origin}"
    base_btf = Btf(base, path=f"{origin} (base)") if base is not None else None
    btf = Btf(data, base=base_btf, path=origin, start=start, size=size)
    template = btf.find_struct(TEMPLATE_STRUCT)
    if template is None:
        raise OpsError(f"no struct {TEMPLATE_STRUCT} in the BTF", origin)
    shape = _btf_shape(btf, template.type_id, 0)
    assert isinstance(shape, _Struct)  # find_struct only returns STRUCTs
    return _flatten(shape, ptr_size, name)


# -- DWARF -------------------------------------------------------------------------

_DW_OP_PLUS_UCONST = 0x23
_DWARF_MODIFIERS = frozenset(
    {
        "DW_TAG_typedef",
        "DW_TAG_const_type",
        "DW_TAG_volatile_type",
        "DW_TAG_restrict_type",
        "DW_TAG_atomic_type",
    }
)


def _member_offset(die: Any, origin: str) -> int | None:
    attr = die.attributes.get("DW_AT_data_member_location")
    if attr is None:
        # No location means offset 0, unless DWARF 4+ gives a bitfield's bit offset.
        return 0 if "DW_AT_data_bit_offset" not in die.attributes else None
    value = attr.value
    if isinstance(value, int):
        return int(value)
    # DWARF 2/3 location expression: DW_OP_plus_uconst ULEB128.
    if isinstance(value, list) and value and value[0] == _DW_OP_PLUS_UCONST:
        result, shift = 0, 0
        for raw in value[1:]:
            byte = int(raw)
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result
    raise OpsError(f"unsupported DW_AT_data_member_location {value!r}", origin)


def _dwarf_shape(die: Any, depth: int, origin: str) -> _Shape:
    if depth > _MAX_DEPTH:
        raise OpsError("DWARF type nests too deeply", origin)
    for _ in range(_MAX_DEPTH * 4):
        if die.tag not in _DWARF_MODIFIERS:
            break
        if "DW_AT_type" not in die.attributes:
            return _Other()  # e.g. `const void`
        die = die.get_DIE_from_attribute("DW_AT_type")
    if die.tag == "DW_TAG_pointer_type":
        size = die.attributes.get("DW_AT_byte_size")
        return _Ptr(int(size.value) if size is not None else None)
    if die.tag != "DW_TAG_structure_type" or "DW_AT_declaration" in die.attributes:
        return _Other()
    fields = []
    for child in die.iter_children():
        if child.tag != "DW_TAG_member" or "DW_AT_bit_size" in child.attributes:
            continue
        offset = _member_offset(child, origin)
        if offset is None or "DW_AT_type" not in child.attributes:
            continue
        name_attr = child.attributes.get("DW_AT_name")
        name = name_attr.value.decode("utf-8", "replace") if name_attr is not None else ""
        target = child.get_DIE_from_attribute("DW_AT_type")
        fields.append(_Field(name, offset, _dwarf_shape(target, depth + 1, origin)))
    size_attr = die.attributes.get("DW_AT_byte_size")
    name_attr = die.attributes.get("DW_AT_name")
    name = name_attr.value.decode("utf-8", "replace") if name_attr is not None else ""
    return _Struct(name, int(size_attr.value) if size_attr is not None else 0, tuple(fields))


def _find_template_die(dwarf: Any) -> Any:
    want = TEMPLATE_STRUCT.encode()
    for cu in dwarf.iter_CUs():
        # Only top-level DIEs: the template is never declared inside a function.
        for die in cu.get_top_DIE().iter_children():
            if die.tag != "DW_TAG_structure_type":
                continue
            name = die.attributes.get("DW_AT_name")
            if (
                name is not None
                and name.value == want
                and "DW_AT_byte_size" in die.attributes
                and "DW_AT_declaration" not in die.attributes
            ):
                return die
    return None


def catalog_from_dwarf(path: str | Path, ptr_size: int) -> OpCatalog:
    """Build the catalog from the DWARF of an ELF file (object, module or vmlinux)."""
    # pyelftools only when DWARF is asked for: scanning must start fast.
    from elftools.common.exceptions import DWARFError, ELFError, ELFParseError
    from elftools.construct import ConstructError
    from elftools.elf.elffile import ELFFile

    origin = str(path)
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            if not elf.has_dwarf_info():
                raise OpsError("no DWARF debug info", origin)
            die = _find_template_die(elf.get_dwarf_info())
            if die is None:
                raise OpsError(f"no struct {TEMPLATE_STRUCT} in the DWARF", origin)
            shape = _dwarf_shape(die, 0, origin)
    except OpsError:
        raise
    except (
        OSError,
        ELFError,
        ELFParseError,
        DWARFError,
        ConstructError,
        KeyError,
        IndexError,
        ValueError,
        AttributeError,
        UnicodeDecodeError,
    ) as exc:
        raise OpsError(f"cannot read DWARF: {exc}", origin) from exc
    assert isinstance(shape, _Struct)
    from pathlib import Path

    return _flatten(shape, ptr_size, f"dwarf:{Path(path).name}")


# -- built-in catalogs -------------------------------------------------------------

_TOP_KEYS = {"name", "arch", "ptr_size", "kernel", "template_size", "complete", "slots"}


def _data_dir() -> str:
    # The package's own files (not importlib.resources, nor pathlib: they cost imports at
    # start-up, and pvpatch is never run from a zip).
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), *_DATA_DIR)


def builtin_catalog_names() -> list[str]:
    """Names of the bundled catalogs (file stems under pvpatch/data/ops)."""
    return sorted(name[:-5] for name in os.listdir(_data_dir()) if name.endswith(".toml"))


def _builtin_table(name: str) -> dict[str, Any]:
    if name not in builtin_catalog_names():
        raise OpsError(
            f"no built-in op catalog {name!r} (have: {', '.join(builtin_catalog_names())})"
        )
    where = f"pvpatch/data/ops/{name}.toml"
    try:
        with open(os.path.join(_data_dir(), f"{name}.toml"), encoding="utf-8") as fh:
            return tomllib.loads(fh.read())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise OpsError(f"bad catalog file: {exc}", where) from exc


def _parse_slots(raw: Any, where: str) -> Iterator[tuple[int, str, bool]]:
    if not isinstance(raw, dict):
        raise OpsError("[slots] must be a table", where)
    for key, value in raw.items():
        if not key.isdigit():
            raise OpsError(f"slot key {key!r} is not a decimal index", where)
        if isinstance(value, str):
            op, callee = value, False
        elif isinstance(value, dict) and set(value) <= {"op", "callee_save"} and "op" in value:
            op, callee = value["op"], value.get("callee_save", False)
        else:
            raise OpsError(f"slot {key}: want a string or {{op=, callee_save=}}", where)
        if not isinstance(op, str) or not op or not isinstance(callee, bool):
            raise OpsError(f"slot {key}: bad op or callee_save", where)
        yield int(key), op, callee


@functools.cache
def builtin_catalog(name: str) -> OpCatalog:
    """Load pvpatch/data/ops/<name>.toml (once per process: catalogs are immutable)."""
    table = _builtin_table(name)
    where = f"pvpatch/data/ops/{name}.toml"
    if table.get("name") != name:
        raise OpsError(f"name {table.get('name')!r} does not match the file name", where)
    return _catalog_from_table(table, where, f"catalog:{name}")


def catalog_from_file(path: str | Path) -> OpCatalog:
    """Load a catalog written in the built-in catalogs' TOML format from a file."""
    where = str(path)
    try:
        from pathlib import Path

        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OpsError("no such catalog file", where) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise OpsError(f"bad catalog file: {exc}", where) from None
    return _catalog_from_table(table, where, f"catalog:{where}")


def _catalog_from_table(table: dict[str, Any], where: str, label: str) -> OpCatalog:
    unknown = set(table) - _TOP_KEYS
    if unknown:
        raise OpsError(f"unknown keys {sorted(unknown)}", where)
    if not isinstance(table.get("name"), str):
        raise OpsError("missing catalog name", where)
    ptr_size = table.get("ptr_size")
    arch = table.get("arch")
    known = {(a.name, a.ptr_size) for a in ARCHES.values()}
    if not isinstance(ptr_size, int) or (arch, ptr_size) not in known:
        pairs = " or ".join(f"{n}/{p}" for n, p in sorted(known))
        raise OpsError(f"arch/ptr_size {arch!r}/{ptr_size!r} not {pairs}", where)
    if not isinstance(table.get("kernel"), str):
        raise OpsError("missing kernel version string", where)
    size = table.get("template_size")
    if size is not None and (not isinstance(size, int) or size <= 0 or size % ptr_size):
        raise OpsError(f"bad template_size {size!r}", where)
    complete = table.get("complete", True)
    if not isinstance(complete, bool):
        raise OpsError("complete must be true or false", where)
    slots: dict[int, str] = {}
    callee: set[int] = set()
    for index, op, is_callee in _parse_slots(table.get("slots"), where):
        if size is not None and index >= size // ptr_size:
            raise OpsError(f"slot {index} beyond template_size {size}", where)
        slots[index] = op
        if is_callee:
            callee.add(index)
    if complete and size is not None and len(slots) != size // ptr_size:
        raise OpsError(f"complete catalog has {len(slots)} slots, not {size // ptr_size}", where)
    try:
        return OpCatalog(label, ptr_size, slots, frozenset(callee), size, complete)
    except OpsError as exc:
        raise OpsError(exc.message, where) from exc


_VERMAGIC_RE = re.compile(r"\s*(\d+)\.(\d+)(?:\.(\d+))?")


def catalog_for_vermagic(vermagic: str, arch: str) -> OpCatalog | None:
    """The built-in catalog for a kernel release, or None if none is bundled.

    3.x and later match on major.minor ("6.1.0-56-cloud-amd64" -> linux-6.1-<arch>);
    2.6.x matches on all three numbers. The vermagic cannot show the kernel's
    config, so a bundled table fits only the configuration its file describes.
    """
    m = _VERMAGIC_RE.match(vermagic)
    norm_arch = _ARCH_ALIASES.get(arch.strip().lower())
    if m is None or norm_arch is None:
        return None
    major, minor, patch = m.group(1), m.group(2), m.group(3)
    if major == "2" and patch is None:
        return None
    version = f"{major}.{minor}.{patch}" if major == "2" else f"{major}.{minor}"
    name = f"linux-{version}-{norm_arch}"
    if name not in builtin_catalog_names():
        return None
    return builtin_catalog(name)
