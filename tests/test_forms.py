"""pvpatch/report/forms.py: the native forms a patch summary shows without a disassembler.

Every row is checked against objdump (instruction boundaries, mnemonics, operands) and
against the symboliser the summary used before (the exact text, padded or not, in linked
and relocatable files); a whole `patch` summary is the same with and without the table,
and with it the command imports no disassembler or emulator.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import corpus
import pytest

from pvpatch.arch import ARCHES
from pvpatch.elf.reader import ElfFile
from pvpatch.report.forms import SHOWN, shown
from pvpatch.report.stage import _code, _unpadded
from pvpatch.report.symbolic import Symboliser

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "fixtures"
ROWS = sorted(SHOWN.items())
OBJDUMP_MACHINE = {"x86_64": "i386:x86-64", "i386": "i386"}


def _ids(rows: list[tuple[tuple[str, bytes], str]]) -> list[str]:
    return [f"{arch}-{code.hex()}" for (arch, code), _text in rows]


@pytest.mark.parametrize(("key", "text"), ROWS, ids=_ids(ROWS))
def test_row_is_what_the_symboliser_shows(key: tuple[str, bytes], text: str) -> None:
    arch_name, code = key
    arch = ARCHES[arch_name]
    linked = Symboliser(ElfFile.open(FIX / arch_name / "prog"))
    reloc_elf = ElfFile.open(FIX / arch_name / "kernel612.o")
    relocatable = Symboliser(reloc_elf)
    text_index = reloc_elf.section(".text")
    assert text_index is not None
    for pad in (0, 1, 2, 3, 5, 8, 11):
        padded = code + arch.nop_fill(pad)
        assert shown(arch, padded) == text
        for address in (0x1000, arch.wrap(-0x7F000000)):
            insns = linked.insns(padded, address=address)
            assert _code(_unpadded(arch, padded, insns)) == text, (pad, hex(address))
        insns = relocatable.insns(padded, section_index=text_index.index, offset=0x40,
                                  relocs=())
        assert _code(_unpadded(arch, padded, insns)) == text, pad


def _normalise(insn: str) -> tuple[str, str]:
    """(mnemonic without a size suffix, operands with immediates in decimal)."""
    mnemonic, _, operands = insn.strip().partition(" ")
    operands = re.sub(r"\$0x([0-9a-f]+)", lambda m: f"${int(m[1], 16)}", operands.strip())
    return re.sub(r"(?<=[a-z]{3})[lq]$", "", mnemonic), operands


@pytest.mark.parametrize(("key", "text"), ROWS, ids=_ids(ROWS))
def test_row_matches_objdump(key: tuple[str, bytes], text: str, tmp_path: Path) -> None:
    arch_name, code = key
    blob = tmp_path / "form.bin"
    blob.write_bytes(code)
    listing = subprocess.run(
        ["objdump", "-D", "-b", "binary", "-m", OBJDUMP_MACHINE[arch_name], str(blob)],
        check=True, capture_output=True, text=True).stdout
    sizes, insns = [], []
    for line in listing.splitlines():
        m = re.match(r"^\s+[0-9a-f]+:\t((?:[0-9a-f]{2} )+)\s*\t(.*)$", line)
        if m:
            sizes.append(len(m[1].split()))
            insns.append(_normalise(m[2]))
    assert sum(sizes) == len(code)  # whole instructions, nothing left over
    assert insns == [_normalise(t) for t in text.split("; ")]
    # No trailing instruction is one the summary would drop as padding.
    assert not ARCHES[arch_name].is_nop_fill(code[-sizes[-1]:])


@pytest.mark.parametrize("arch_name", sorted(ARCHES))
def test_every_native_backend_form_is_listed(arch_name: str) -> None:
    """The native backend's inline forms never send a summary to the disassembler."""
    with open(REPO / "pvpatch" / "data" / "backends" / f"native-{arch_name}.toml", "rb") as fh:
        ops = tomllib.load(fh)["ops"]
    forms = {bytes.fromhex(op["bytes"]) for op in ops.values() if op.get("action") == "inline"}
    assert forms
    assert sorted(f.hex() for f in forms - {c for a, c in SHOWN if a == arch_name}) == []


SUMMARY = r"""
import contextlib, io, json, sys
import pvpatch.report.forms
if sys.argv[1] == "decode":
    pvpatch.report.forms.SHOWN = {}  # every form through the symboliser, as before the table
from pvpatch.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["patch", sys.argv[2], "-o", sys.argv[3], "--no-verify"])
heavy = sorted(m for m in ("capstone", "unicorn", "lief", "keystone", "pathlib", "tempfile",
                          "shutil") if m in sys.modules)
print(json.dumps({"rc": rc, "text": out.getvalue().replace(sys.argv[3], "OUT"),
                  "heavy": heavy}))
"""


def _summary(mode: str, path: Path, out: Path) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", SUMMARY, mode, str(path), str(out)],
                          capture_output=True, text=True, cwd=REPO, check=True)
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def _same_summary(path: Path, tmp_path: Path) -> dict[str, object]:
    table = _summary("table", path, tmp_path / "a")
    decoded = _summary("decode", path, tmp_path / "b")
    assert table["rc"] == decoded["rc"] == 0
    assert " -> " in str(table["text"])  # some group's new form is shown
    assert table["text"] == decoded["text"]
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    return table


@pytest.mark.parametrize("name", ["x86_64/kernel612.o", "x86_64/kernel61.o", "x86_64/prog",
                                  "i386/kernel612.o", "i386/kernel61.o", "i386/prog"])
def test_summary_same_with_the_table(name: str, tmp_path: Path) -> None:
    _same_summary(FIX / name, tmp_path)


@pytest.mark.corpus
@pytest.mark.parametrize("kind", ["x86_64-6.12", "x86_64"])
def test_vmlinux_patch_imports_no_disassembler(kind: corpus.Kind, tmp_path: Path) -> None:
    """A vmlinux (no function symbols to decode for the integrity check) is patched and
    summed up without capstone, Unicorn or LIEF, nor the stdlib modules that cost a run
    milliseconds to import (pathlib, tempfile, shutil)."""
    table = _same_summary(corpus.ensure(kind) / "vmlinux", tmp_path)
    assert table["heavy"] == []
