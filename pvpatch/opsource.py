"""Resolve an `--ops SOURCE` string into an `OpCatalog` for one file.

SOURCE is `auto` (the file's own BTF, then its DWARF, then a shipped catalog
chosen from a module's vermagic), `none`, `btf:FILE`, `dwarf:FILE` or
`catalog:NAME`.  External sources are cached: a tree of modules named from
one vmlinux reads its BTF once.
"""

from __future__ import annotations

import os
from functools import lru_cache

from .elf import ElfFile
from .errors import ArchMismatch, OpsError, UsageError
from .ops import (
    OpCatalog,
    builtin_catalog,
    catalog_for_vermagic,
    catalog_from_btf,
    catalog_from_dwarf,
    catalog_from_file,
)

SOURCE_KINDS = ("auto", "none", "btf:FILE", "dwarf:FILE", "catalog:NAME")


def resolve_ops(source: str, elf: ElfFile) -> OpCatalog | None:
    ptr = elf.arch.ptr_size
    if source == "none":
        return None
    if source == "auto":
        return _auto(elf)
    kind, sep, arg = source.partition(":")
    if not sep or not arg:
        raise UsageError(f"bad --ops {source!r}: expected one of {', '.join(SOURCE_KINDS)}")
    if kind == "btf":
        return _btf_file(arg, ptr)
    if kind == "dwarf":
        return _dwarf_file(arg, ptr)
    if kind == "catalog":
        # A bundled catalog's name, or a path to a catalog file of the same format.
        is_file = arg.endswith(".toml") or os.sep in arg
        cat = catalog_from_file(arg) if is_file else builtin_catalog(arg)
        if cat.ptr_size != ptr:
            raise ArchMismatch(f"catalog {arg!r} is for {cat.ptr_size}-byte pointers, "
                               f"this file has {ptr}-byte pointers", elf.path)
        return cat
    raise UsageError(f"bad --ops {source!r}: expected one of {', '.join(SOURCE_KINDS)}")


@lru_cache(maxsize=8)
def _btf_file(path: str, ptr: int) -> OpCatalog:
    elf = ElfFile.open(path)
    sec = elf.section(".BTF")
    if sec is None:
        raise OpsError("no .BTF section", path)
    return catalog_from_btf(elf.section_data(sec), ptr, origin=f"btf:{path}")


@lru_cache(maxsize=8)
def _dwarf_file(path: str, ptr: int) -> OpCatalog:
    return catalog_from_dwarf(path, ptr)


def _auto(elf: ElfFile) -> OpCatalog | None:
    ptr = elf.arch.ptr_size
    btf = elf.section(".BTF")
    if btf is not None:
        try:
            return catalog_from_btf(elf.section_data(btf), ptr, origin=f"btf:{elf.path}")
        except OpsError:
            pass  # split BTF of a module, or no template in it: try the next source
    if elf.section(".debug_info") is not None:
        try:
            return catalog_from_dwarf(elf.path, ptr)
        except OpsError:
            pass
    vermagic = elf.modinfo().get("vermagic")
    if vermagic:
        return catalog_for_vermagic(vermagic, elf.arch.name)
    return None
