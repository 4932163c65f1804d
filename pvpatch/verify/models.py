"""The reference models: independent implementations of the kernel's native paravirt
functions (pvpatch/data/reference/ARCH.toml), what a rewritten site is proven against."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import VerifyError
from ..record import record

if TYPE_CHECKING:
    pass


@record
class RefModel:
    """An op's reference model (pvpatch/data/reference/ARCH.toml): `code`, the native
    function's bytes, or `skip`, why no snippet can run it; `cr`: the result depends on
    control registers (CR0.TS, CR2 and CR3 are compared)."""

    op: str
    code: bytes | None
    cr: bool = False
    skip: str | None = None
    flags_arg: bool = False  # the first argument is a flags image (popf loads it)
    flags_result: bool = False  # the op sets every flag: all are compared


@cache
def reference_models(arch_name: str) -> Mapping[str, RefModel]:
    """Op name (and alias) -> model, from pvpatch/data/reference/ARCH.toml."""
    text = (Path(__file__).parent.parent / "data" / "reference" / f"{arch_name}.toml").read_text()
    doc = tomllib.loads(text)
    out: dict[str, RefModel] = {}
    for name, body in doc.get("ops", {}).items():
        raw = body.get("bytes")
        model = RefModel(name, bytes.fromhex(raw) if raw is not None else None,
                         bool(body.get("cr", False)), body.get("skip"),
                         bool(body.get("flags_arg", False)),
                         bool(body.get("flags_result", False)))
        if model.code is None and model.skip is None:
            raise VerifyError(f"reference model {name} has neither bytes nor skip")
        for alias in (name, *body.get("aliases", [])):
            out[alias] = model
    return out
