"""Signature text and ids: how a call's arguments read in reports, and the stable id built from them."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

DTYPE_ABBR = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "b8", torch.complex64: "c64", torch.complex128: "c128",
}
"""Short dtype names used in signature text (``f32[4,3]``); catalogs key entries by them."""


def describe(a: Any) -> str:
    """Readable signature text of one argument: ``f32[4,3]{1,4}@cuda:0``."""
    if isinstance(a, torch.Tensor):
        dt = DTYPE_ABBR.get(a.dtype, str(a.dtype).replace("torch.", ""))
        s = f"{dt}[{','.join(map(str, a.shape))}]"
        if a.layout == torch.strided and not a.is_contiguous():
            s += "{" + ",".join(map(str, a.stride())) + "}"
        elif a.layout != torch.strided:
            s += f"<{str(a.layout).replace('torch.', '')}>"
        if a.device.type != "cpu":
            s += f"@{a.device}"
        return s
    if isinstance(a, (list, tuple)):
        inner = ", ".join(describe(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, torch.dtype):
        return str(a)
    if isinstance(a, torch.ScriptObject):
        return script_object_text(a)
    if isinstance(a, torch.Generator):
        return f"Generator({a.device})"  # its repr holds its address
    if isinstance(a, float):
        return repr(a)
    return repr(a)


def script_object_text(obj: Any) -> str:
    """A stable text for a TorchScript object argument (``repr`` would hold its address).

    Collectives take their process group and reduce op as such objects:
    ``ProcessGroup(size=2)``, ``ReduceOp.SUM``.
    """
    name = obj._type().qualified_name().rsplit(".", 1)[-1]
    try:
        import torch.distributed as dist

        if name == "ProcessGroup":
            return f"ProcessGroup(size={dist.ProcessGroup.unbox(obj).size()})"
        if name == "ReduceOp":
            code = int(obj.op())
            names = {int(v): k for k, v in dist.ReduceOp.RedOpType.__members__.items()}
            return f"ReduceOp.{names.get(code, code)}"
    except Exception:  # noqa: BLE001 - another build of torch: the type name still reads stably
        pass
    return name


def signature_text(args: tuple, kwargs: dict) -> str:
    """The signature of one call as text, used in reports and for the stable id."""
    parts = [describe(a) for a in args]
    parts += [f"{k}={describe(v)}" for k, v in sorted(kwargs.items())]
    return ", ".join(parts)


def signature_id(op: str, text: str) -> str:
    """Stable 12-hex id of a signature: the same op and text give the same id everywhere."""
    return hashlib.sha1(f"{op}({text})".encode()).hexdigest()[:12]
