"""Backends: what each op may become, read from a TOML spec (the built-in
`native` backend is the same format, shipped as data).

    arch = "x86_64"                 # optional
    [ops."irq.irq_disable"]         # an op name, or its type number: [ops.31]
    action = "call"                 # inline | call | jmp | nop | ud2 | keep
    target = "xen_irq_disable"
    convention = "c"                # or "callee-save"
    [ops."irq.save_fl"]
    action = "inline"
    asm = "pushfq; pop %rax"        # or bytes = "9c58"
    clobbers = ["rax"]
    [defaults]
    action = "keep"
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from ..arch import ARCHES, Arch
from ..errors import ArchMismatch, SpecError
from ..record import record

Action = Literal["inline", "call", "thunk", "jmp", "nop", "ud2", "keep"]
SPEC_ACTIONS: tuple[str, ...] = ("inline", "call", "jmp", "nop", "ud2", "keep")
Convention = Literal["c", "callee-save"]
CONVENTIONS: tuple[Convention, ...] = ("c", "callee-save")

_OP_KEYS = {
    "action", "asm", "bytes", "clobbers", "target", "convention", "aliases", "tail", "reason",
}
_TOP_KEYS = {"arch", "name", "ops", "defaults", "thunks"}
_DEFAULT_KEYS = {"action", "reason"}
_THUNK_KEYS = {"endbr", "section"}


@record
class OpRule:
    """What one op becomes.  `code` is set for inline rules."""

    key: str  # op name or decimal type number, as written in the spec
    action: Action
    code: bytes | None = None
    asm: str | None = None
    clobbers: frozenset[str] = frozenset()
    target: str | None = None
    convention: Convention = "c"
    tail: bool = False  # control does not come back to the site's end
    reason: str | None = None
    line: int | None = None


@record
class Backend:
    """What each op becomes: the native forms, or a user's spec, as rules by op name or type."""

    name: str
    arch: str | None
    rules: Mapping[str, OpRule]  # by op name or str(type)
    default: OpRule
    source: str  # file the spec came from, or "builtin:native"
    endbr: bool | None = None  # thunks start with endbr: None = as the input's IBT note says
    thunk_section: str = ".text.pvpatch"

    @property
    def builtin(self) -> bool:
        """The kernel's own native forms (`--backend native`), not a user's spec."""
        return self.source.startswith("builtin:")

    def rule_for(self, op: str | None, type_: int) -> OpRule | None:
        """The rule naming this op, by name first, then by type number."""
        if op is not None:
            rule = self.rules.get(op)
            if rule is not None:
                return rule
        return self.rules.get(str(type_))

    def check_arch(self, arch: Arch, path: str) -> None:
        if self.arch is not None and self.arch != arch.name:
            raise ArchMismatch(
                f"backend {self.source} is for {self.arch}, but the file is {arch.name}", path
            )


_HEADER = re.compile(r"""^\s*\[\s*([^\]]+?)\s*\]\s*(?:#.*)?$""")


# A dot outside quotes separates keys of a table header.
_KEY_DOT = re.compile(r"""(\.)(?=(?:[^"']*["'][^"']*["'])*[^"']*$)""")


def _header_name(raw: str) -> str:
    """`ops . "irq.save_fl"` or `ops.'irq.save_fl'` -> `ops.irq.save_fl`."""
    return "".join(part.strip().strip("\"'") for part in _KEY_DOT.split(raw))


def _line(text: str, table: str | None, key: str | None = None) -> int | None:
    """Line (1-based) of `key =` inside `[table]` (top level when None), or of the header."""
    current: str | None = None
    header_line = None
    for n, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            current = _header_name(m.group(1))
            if current == table:
                header_line = n
                if key is None:
                    return n
            continue
        if key is not None and current == table and re.match(
                r"\s*[\"']?" + re.escape(key) + r"[\"']?\s*=", line):
            return n
    return header_line


def _line_of(text: str, key: str) -> int | None:
    """Line of the `[ops.KEY]` header, so errors can point at it."""
    return _line(text, f"ops.{key}")


def _line_of_key(text: str, key: str, table: str | None = None) -> int | None:
    return _line(text, table, key)


class _SpecReader:
    def __init__(self, text: str, source: str, builtin: bool, file_arch: Arch | None) -> None:
        self.text = text
        self.source = source
        self.builtin = builtin
        self.file_arch = file_arch

    def fail(self, message: str, line: int | None = None) -> SpecError:
        where = f"{self.source}:{line}" if line else self.source
        return SpecError(f"{where}: {message}")

    def read(self) -> Backend:
        try:
            doc = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            raise self.fail(f"not valid TOML: {exc}") from None
        for key in doc:
            if key not in _TOP_KEYS:
                raise self.fail(f"unknown key {key!r}", _line_of_key(self.text, key))
        arch_name = doc.get("arch")
        if arch_name is not None and arch_name not in ARCHES:
            raise self.fail(f"unknown arch {arch_name!r} (x86_64 or i386)",
                            _line_of_key(self.text, "arch"))
        if arch_name is not None and self.file_arch is not None \
                and arch_name != self.file_arch.name:
            line = _line_of_key(self.text, "arch")
            where = f"{self.source}:{line}" if line else self.source
            # Not the spec's fault, nor the run's: over a mixed tree only this file fails.
            raise ArchMismatch(f"{where}: the spec is for {arch_name}, the file is "
                               f"{self.file_arch.name}")
        # Registers and asm are checked against the spec's arch, else the file's.
        arch = ARCHES[arch_name] if arch_name else self.file_arch
        ops = doc.get("ops", {})
        if not isinstance(ops, dict):
            raise self.fail("`ops` must be a table of tables")
        rules: dict[str, OpRule] = {}
        for key, body in ops.items():
            rule = self._rule(str(key), body, arch)
            names = (rule.key, *self._aliases(rule.key, body))
            if rule.action == "jmp" and not self.builtin and arch is not None:
                for name in names:
                    if returns_to_site(arch, name):
                        raise self.fail(
                            f"op {name!r} returns to its site (the native backend knows it): "
                            "a jmp would skip the rest of its caller; use call", rule.line)
            for name in names:
                if name in rules:
                    raise self.fail(f"op {name!r} is given twice", _line_of(self.text, rule.key))
                rules[name] = rule
        default = self._default(doc.get("defaults", {}))
        thunks = doc.get("thunks", {})
        if not isinstance(thunks, dict) or set(thunks) - _THUNK_KEYS:
            extra = sorted(set(thunks) - _THUNK_KEYS) if isinstance(thunks, dict) else []
            raise self.fail(f"[thunks] takes only {sorted(_THUNK_KEYS)}",
                            _line(self.text, "thunks", extra[0] if extra else None))
        endbr = thunks.get("endbr")
        if endbr is not None and not isinstance(endbr, bool):
            raise self.fail("[thunks] endbr must be true or false",
                            _line(self.text, "thunks", "endbr"))
        section = thunks.get("section", ".text.pvpatch")
        if not isinstance(section, str) or not section.startswith("."):
            raise self.fail("[thunks] section must be a section name starting with '.'",
                            _line(self.text, "thunks", "section"))
        name = doc["name"] if "name" in doc else _stem(self.source)
        if not isinstance(name, str):
            raise self.fail("name must be a string", _line(self.text, None, "name"))
        return Backend(
            name=name,
            arch=arch_name,
            rules=MappingProxyType(rules),
            default=default,
            source=self.source,
            endbr=endbr,
            thunk_section=section,
        )

    def _aliases(self, key: str, body: dict[str, Any]) -> list[str]:
        aliases = body.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise self.fail("aliases must be a list of op names", _line_of(self.text, key))
        return list(aliases)

    def _default(self, body: Any) -> OpRule:
        if not isinstance(body, dict):
            raise self.fail("[defaults] must be a table")
        for k in body:
            if k not in _DEFAULT_KEYS:
                raise self.fail(f"unknown key {k!r} in [defaults]",
                                _line(self.text, "defaults", k))
        action = body.get("action", "keep")
        if action not in ("keep", "nop", "ud2"):
            raise self.fail(f"[defaults] action must be keep, nop or ud2, not {action!r}",
                            _line(self.text, "defaults", "action"))
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise self.fail("[defaults] reason must be a string",
                            _line(self.text, "defaults", "reason"))
        return OpRule("*", action, reason=reason)

    def _rule(self, key: str, body: Any, arch: Arch | None) -> OpRule:
        line = _line_of(self.text, key)
        if not isinstance(body, dict):
            raise self.fail(f"op {key!r} must be a table", line)
        for k in body:
            if k not in _OP_KEYS:
                raise self.fail(f"unknown key {k!r} for op {key!r}", line)
        action = body.get("action")
        if action not in SPEC_ACTIONS:
            raise self.fail(
                f"op {key!r}: action must be one of {', '.join(SPEC_ACTIONS)}, not {action!r}",
                line,
            )
        convention = body.get("convention", "c")
        if convention not in CONVENTIONS:
            raise self.fail(f"op {key!r}: convention must be \"c\" or \"callee-save\"", line)
        target = body.get("target")
        if action in ("call", "jmp"):
            if not isinstance(target, str) or not target:
                raise self.fail(f"op {key!r}: action {action!r} needs a target symbol", line)
        elif target is not None:
            raise self.fail(f"op {key!r}: target makes sense only with call or jmp", line)
        tail = body.get("tail", action == "jmp")
        if not isinstance(tail, bool):
            raise self.fail(f"op {key!r}: tail must be true or false", line)
        if action == "jmp":
            self._check_jmp(key, tail, arch, line)
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise self.fail(f"op {key!r}: reason must be a string", line)
        clobbers = body.get("clobbers", [])
        if not isinstance(clobbers, list) or not all(isinstance(c, str) for c in clobbers):
            raise self.fail(f"op {key!r}: clobbers must be a list of register names", line)
        if arch is not None:
            known = set(arch.caller_saved) | set(arch.return_regs) | set(arch.preserved)
            for reg in clobbers:
                if reg not in known:
                    raise self.fail(f"op {key!r}: unknown {arch.name} register {reg!r}", line)
        code = None
        asm = body.get("asm")
        if action == "inline":
            code = self._inline_code(key, body, arch, line)
        elif asm is not None or "bytes" in body:
            raise self.fail(f"op {key!r}: asm/bytes make sense only with action inline", line)
        return OpRule(
            key=key,
            action=action,
            code=code,
            asm=asm,
            clobbers=frozenset(clobbers),
            target=target,
            convention=convention,
            tail=tail,
            reason=reason,
            line=line,
        )

    def _check_jmp(self, key: str, tail: bool, arch: Arch | None, line: int | None) -> None:
        """A `jmp target` never comes back to the site: the target's `ret` would return
        from the site's caller and skip the rest of it, so only a tail op may jump."""
        if not tail:
            raise self.fail(f"op {key!r}: a jmp never returns to the site, so it is only for "
                            "tail ops (tail = true)", line)

    def _inline_code(self, key: str, body: dict[str, Any], arch: Arch | None,
                     line: int | None) -> bytes:
        raw = body.get("bytes")
        asm = body.get("asm")
        if raw is None and asm is None:
            raise self.fail(f"op {key!r}: inline needs asm or bytes", line)
        if "clobbers" not in body:
            raise self.fail(f"op {key!r}: inline needs clobbers (the registers it changes)", line)
        code = None
        if raw is not None:
            try:
                code = bytes.fromhex(str(raw))
            except ValueError:
                raise self.fail(f"op {key!r}: bytes {raw!r} is not hex", line) from None
        if asm is not None and (code is None or not self.builtin):
            if arch is None:
                raise self.fail(f"op {key!r}: asm needs the spec's arch to be set", line)
            assembled = assemble(str(asm), arch, where=f"{self.source}:{line or '?'}")
            if code is not None and assembled != code:
                raise self.fail(
                    f"op {key!r}: asm assembles to {assembled.hex()}, bytes say {code.hex()}",
                    line,
                )
            code = assembled
        assert code is not None
        return code




def assemble(text: str, arch: Arch, where: str = "asm") -> bytes:
    """Assemble AT&T `text` with GNU as; the code must need no relocations."""
    import shutil
    import subprocess
    import tempfile

    from ..elf.reader import ElfFile  # local: only user specs with asm need an assembler run

    as_bin = shutil.which("as")
    if as_bin is None:
        raise SpecError(f"{where}: GNU as is needed to assemble {text!r} (install binutils)")
    flag = f"--{arch.elf_class}"
    with tempfile.TemporaryDirectory(prefix="pvpatch-as-") as tmp:
        src = os.path.join(tmp, "in.s")
        obj = os.path.join(tmp, "out.o")
        with open(src, "w") as fh:
            fh.write(".text\n" + text.replace(";", "\n") + "\n")
        proc = subprocess.run([as_bin, flag, "-o", obj, src], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            msg = " ".join(
                ln.split("Error:", 1)[-1].strip() for ln in proc.stderr.splitlines()
                if "Error" in ln
            ) or proc.stderr.strip()
            raise SpecError(f"{where}: asm {text!r} does not assemble: {msg}")
        elf = ElfFile.open(obj)
        sec = elf.section(".text")
        if sec is None:
            raise SpecError(f"{where}: asm {text!r} produced no code")
        if elf.relocation_sections(sec):
            raise SpecError(f"{where}: asm {text!r} needs relocations; inline code must not")
        return elf.section_data(sec)


def load_backend(spec: str, arch: Arch) -> Backend:
    """`native` or a path to a TOML spec file."""
    if spec == "native":
        return _native(arch.name)
    from pathlib import Path  # (not imported by a run on the built-in backend)

    path = Path(spec)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{spec}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{spec}: cannot read spec: {exc}") from None
    return _SpecReader(text, spec, False, arch).read()


def returns_to_site(arch: Arch, op: str | None) -> bool:
    """The native backend knows `op` as one whose call comes back to the site (no jmp)."""
    known = _native(arch.name).rules.get(op) if op is not None else None
    return known is not None and not known.tail


@functools.cache
def _native(arch_name: str) -> Backend:
    # Shipped data, read once per process (a tree of modules shares it).
    name = f"native-{arch_name}.toml"
    folder = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "backends")
    with open(os.path.join(folder, name), encoding="utf-8") as fh:
        text = fh.read()
    return _SpecReader(text, f"builtin:native ({name})", True, ARCHES[arch_name]).read()


def _stem(source: str) -> str:
    from pathlib import PurePath

    return PurePath(source).stem


def parse_spec_text(text: str, arch: Arch | None = None, source: str = "<spec>") -> Backend:
    """Parse a spec given as text (for tools that build specs in memory)."""
    return _SpecReader(text, source, False, arch).read()
