"""Catalog keys from signature text: ``(op, dtype, variant)``, shared by the sweep and ``--against``."""

from __future__ import annotations

import functools
import re

_TENSOR_TOKEN = re.compile(r"(?<![\w.])([a-z][a-z0-9_]*)\[")


_DTYPE_KWARG = re.compile(r"\bdtype=torch\.([a-z0-9_]+)")


@functools.cache
def dtype_abbreviations() -> dict[str, str]:
    import torch

    from opaudit.aten.signature import DTYPE_ABBR  # the recorder's own spelling of dtypes

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
    import torch

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
    args = split_signature(signature)
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for a in args:
        m = _KWARG.match(a)
        if m:
            keywords[m.group(1)] = m.group(2)
        else:
            positional.append(a)
    out = []
    for name, pos, default in modes:
        value = keywords.get(name) if pos is None or name in keywords else (
            positional[pos] if pos < len(positional) else None)
        if value is None or value == default or (value == "None" and default in ("", "None")):
            continue
        out.append(f"{name}={value}")
    return ",".join(out)


def entry_key(op: str, signature: str) -> tuple[str, str, str]:
    """``(op, dtype, variant)`` under which a recorded signature is filed in a catalog."""
    return (op, signature_dtype(signature), signature_variant(op, signature))
