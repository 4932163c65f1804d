"""Resolve an `--ops SOURCE` string into an `OpCatalog` for one file.

SOURCE is `auto` (the file's own BTF, then its DWARF, then a shipped catalog
chosen from a module's vermagic or a kernel image's release string), `none`,
`btf:FILE`, `dwarf:FILE` or `catalog:NAME`.  External sources are cached: a tree
of modules named from one vmlinux reads its BTF once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from functools import lru_cache
from typing import TYPE_CHECKING

from ..elf.reader import ElfFile, Section
from ..errors import ArchMismatch, OpsError, UsageError

if TYPE_CHECKING:
    from .sites import ScanResult
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
    return _btf_of(elf, sec, ptr, f"btf:{path}")


def _btf_of(elf: ElfFile, sec: Section, ptr: int, origin: str) -> OpCatalog:
    """The catalog from a file's `.BTF`, read where it lies in the file (no copy)."""
    size = sec.file_size  # (0 for a section with no bytes in the file)
    return catalog_from_btf(elf.data, ptr, origin=origin, start=sec.offset if size else 0,
                            size=size)


@lru_cache(maxsize=8)
def _dwarf_file(path: str, ptr: int) -> OpCatalog:
    return catalog_from_dwarf(path, ptr)


def _auto(elf: ElfFile) -> OpCatalog | None:
    ptr = elf.arch.ptr_size
    btf = elf.section(".BTF")
    if btf is not None:
        try:
            return _btf_of(elf, btf, ptr, f"btf:{elf.path}")
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
    release = kernel_release(elf)
    if release is not None:
        cat = catalog_for_vermagic(release, elf.arch.name)
        if cat is not None:
            # Say where the guess came from: the report prints the catalog's name.
            return dataclasses.replace(cat, name=f"{cat.name} (release {release})")
    return None


# linux_banner: "Linux version 6.1.0-57-686-pae (debian-kernel@...) (gcc ...) #1 SMP ..."
_BANNER = re.compile(rb"Linux version (\d+\.\d+[^\s()]*) \(")


def kernel_release(elf: ElfFile) -> str | None:
    """The release a linked kernel image says it is, from its `linux_banner` string in
    read-only data (distribution images have no BTF, DWARF or .symtab, but this)."""
    if elf.is_relocatable:
        return None
    for sec in elf.sections:
        if not sec.is_alloc or sec.is_exec or not sec.file_size:
            continue
        data = elf.section_data(sec)
        at = data.find(b"Linux version ")
        while at >= 0:
            m = _BANNER.match(data, at)
            if m is not None:
                return m.group(1).decode("ascii", "replace")
            at = data.find(b"Linux version ", at + 1)
    return None


def catalog_fits(result: ScanResult) -> bool:
    """A catalog guessed from the release string must agree with what the file itself
    says about its sites: every site's slot is one of the catalog's; where the table
    records a clobber mask, the callee-save sites are exactly the catalog's callee-save
    ops; where it carries a native form, that is the named op's (a wrong configuration
    of the same release shifts slots and breaks this)."""
    ops = result.ops
    if ops is None:
        return True
    layout = result.layout
    native = None
    for site in result.sites:
        if site.type not in ops.slots:
            return False
        if result.family == "paravirt" and layout is not None and \
                layout.is_callee_save(site.clobbers) != ops.is_callee_save(site.type):
            return False
        if site.native is not None:
            # 6.8+ tables carry the native form: it must be the named op's own.
            if native is None:
                from ..plan.backend import load_backend

                native = load_backend("native", result.arch)
            # An op the native table does not know with a native form is as suspect as
            # a wrong form: the guess is dropped rather than trusted.
            rule = native.rule_for(ops.name_of(site.type), site.type)
            if rule is None or rule.code != site.native:
                return False
    return True
