"""Signature text and ids: how a call's arguments read in reports, and the stable id built from them."""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Any

import torch

DTYPE_ABBR = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "b8", torch.complex64: "c64", torch.complex128: "c128",
}
"""Short dtype names used in signature text (``f32[4,3]``); catalogs key entries by them."""

KEYED_FLOATS = frozenset((0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, float("inf"), float("-inf")))
"""Python floats that key a signature by value; every other float keys it by type.

Floats that change from call to call (an optimizer's ``lr`` under a scheduler,
bias corrections computed from the step count, ``eps``) do not change which
kernel runs, and keying them by value made every optimizer step new signatures.
The values here are the ones kernels do special-case: ``beta=0`` in ``addmm``
skips reading ``self``, ``alpha=1`` skips a multiply, ``pow`` has fast paths for
``2``, ``0.5``, ``-1``, ``-0.5``, ``-2``, ``3``, and ``ord``/``p`` of ``1``,
``2`` and ``inf`` pick different norm reductions. NaN keys as one value.
"""

_NAN_KEY = ("nan",)
_FLOAT_KEY = ("float",)


def scalar_key(a: Any) -> Any:
    """The rule for which argument values key a signature (tensors aside).

    Python floats key by type unless in :data:`KEYED_FLOATS`; everything else
    (ints, bools, strings, dtypes, ``None``) keys by value, because ints are
    sizes, dims and flags such as ``accumulate`` that select behaviour. A
    signature merged this way is replayed with its first call's values.
    """
    if a.__class__ is float and a not in KEYED_FLOATS:
        return _NAN_KEY if a != a else _FLOAT_KEY
    return a


def describe(a: Any) -> str:
    """Readable signature text of one argument: ``f32[4,3]{1,4}@cuda:0``."""
    if isinstance(a, torch.Tensor):
        dt = DTYPE_ABBR.get(a.dtype, str(a.dtype).replace("torch.", ""))
        if a.is_nested:  # no single shape: a strided nested tensor raises on .shape
            layout = str(a.layout).replace("torch.", "")
            return f"{dt}<nested {layout}, {a.size(0)} tensors>" + (f"@{a.device}" if a.device.type != "cpu" else "")
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
    text = repr(a)
    if " at 0x" in text:
        # A default ``object.__repr__``: the address is process-specific, and signature text feeds the stable id.
        return f"<{type(a).__name__}>"
    return text


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
    except Exception:  # another build of torch: the type name still reads stably
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


_TENSOR_TOKEN = re.compile(r"(?<![\w.])([a-z][a-z0-9_]*)\[")


_DTYPE_KWARG = re.compile(r"\bdtype=torch\.([a-z0-9_]+)")


@functools.cache
def dtype_abbreviations() -> dict[str, str]:
    """Dtype names by their spelling in signature text: ``f32`` → ``float32``, ``float32`` → ``float32``."""
    out = {abbr: str(dt).replace("torch.", "") for dt, abbr in DTYPE_ABBR.items()}
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            out.setdefault(name, name)
    return out


_FLOATING = ("float", "bfloat", "complex", "half", "double", "cfloat", "cdouble", "chalf")


def signature_dtype(signature: str) -> str:
    """The dtype a signature is filed under: its first floating or complex tensor's, else its
    first tensor's, else its ``dtype=`` argument's, else ``none``.

    Floating first because index and mask arguments (``where``'s bool condition,
    ``embedding``'s indices) do not pick the kernel's arithmetic.
    """
    abbr = dtype_abbreviations()
    names = [abbr[m.group(1)] for m in _TENSOR_TOKEN.finditer(signature) if m.group(1) in abbr]
    for n in names:
        if n.startswith(_FLOATING):
            return n
    if names:
        return names[0]
    m = _DTYPE_KWARG.search(signature)
    return m.group(1) if m else "none"


def split_signature(signature: str) -> list[str]:
    """Top-level arguments of a signature text (brackets and quotes respected)."""
    parts, depth, quote, start = [], 0, "", 0
    i = 0
    while i < len(signature):
        c = signature[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(signature[start:i].strip())
            start = i + 1
        i += 1
    tail = signature[start:].strip()
    if tail:
        parts.append(tail)
    return parts


_KWARG = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.S)


@functools.lru_cache(maxsize=4096)
def _mode_arguments(op: str) -> tuple[tuple[str, int | None, str], ...] | None:
    """``(name, position or None for keyword-only, repr of default)`` of the op's bool and str arguments."""
    parts = op.split(".")
    if len(parts) != 3:
        return None
    ns, packet, overload = parts
    try:
        func = getattr(getattr(getattr(torch.ops, ns), packet), overload)
    except (AttributeError, RuntimeError):
        return None
    out, pos = [], 0
    for a in func._schema.arguments:
        t = str(a.type)
        if t in ("bool", "str", "Optional[bool]", "Optional[str]"):
            default = repr(a.default_value) if a.has_default_value() else ""
            out.append((a.name, None if a.kwarg_only else pos, default))
        if not a.kwarg_only:
            pos += 1
    return tuple(out)


def signature_variant(op: str, signature: str) -> str:
    """The op's bool and string arguments that differ from their defaults, e.g. ``accumulate=True``.

    These select a different kernel (``accumulate``, ``reduce='sum'``,
    ``align_corners``, ``training``), so a catalog keeps one entry per variant.
    """
    modes = _mode_arguments(op)
    if not modes:
        return ""
    out = []
    for name, value, default in _mode_values(modes, signature):
        if value is None or value == default or (value == "None" and default in ("", "None")):
            continue
        out.append(f"{name}={value}")
    return ",".join(out)


def mode_values(op: str, signature: str) -> dict[str, str]:
    """Every bool and string argument of ``op`` as this call has it: given, else the default (as text)."""
    modes = _mode_arguments(op)
    if not modes:
        return {}
    return {name: default if value is None else value for name, value, default in _mode_values(modes, signature)}


def _mode_values(modes: tuple[tuple[str, int | None, str], ...],
                 signature: str) -> list[tuple[str, str | None, str]]:
    """``(name, value given or None, default)`` for each mode argument."""
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for a in split_signature(signature):
        m = _KWARG.match(a)
        if m:
            keywords[m.group(1)] = m.group(2)
        else:
            positional.append(a)
    out = []
    for name, pos, default in modes:
        value = keywords.get(name) if pos is None or name in keywords else (
            positional[pos] if pos < len(positional) else None)
        out.append((name, value, default))
    return out
