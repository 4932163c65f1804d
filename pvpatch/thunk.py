"""Register-saving thunks (the seed's PV_CALLEE_SAVE_REGS_THUNK), generated as bytes.

    [endbr64]  push <saves...>  [lea -pad(%rsp),%rsp]  call target
               [lea pad(%rsp),%rsp]  pop <saves reversed>  ret

Unlike the seed's thunk, the stack pointer is kept aligned as the psABI wants
at the inner call (assuming an aligned call site), using `lea` so that the
flags the target leaves are not disturbed on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass

from .arch import Arch
from .plan import ThunkSpec

THUNK_ALIGN = 16


@dataclass(frozen=True)
class ThunkCode:
    code: bytes
    call_field: int  # offset of the rel32 of the inner call


def stack_pad(arch: Arch, pushes: int) -> int:
    """Bytes to lower the stack so the inner call sees an aligned stack pointer.

    At the thunk's entry the call that reached it has pushed one word, so the
    stack is a word short of aligned; each push takes one more.
    """
    return -(arch.ptr_size * (1 + pushes)) % arch.stack_align


def thunk_code(arch: Arch, spec: ThunkSpec) -> ThunkCode:
    out = bytearray(arch.endbr if spec.endbr else b"")
    for reg in spec.saves:
        out += arch.push(reg)
    pad = stack_pad(arch, len(spec.saves))
    if pad:
        out += arch.adjust_sp(-pad)
    out += b"\xe8"
    call_field = len(out)
    out += bytes(4)
    if pad:
        out += arch.adjust_sp(pad)
    for reg in reversed(spec.saves):
        out += arch.pop(reg)
    out += b"\xc3"
    return ThunkCode(bytes(out), call_field)
