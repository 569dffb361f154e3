"""The float32 precision (TF32) flags, read and restored without mixing torch's two APIs.

torch 2.9+ has a new per-backend API (``torch.backends.cuda.matmul.fp32_precision``,
``torch.backends.cudnn.conv.fp32_precision``...) beside the legacy one
(``allow_tf32``, ``set_float32_matmul_precision``). Once a program has used both,
the legacy getters raise ("mix of the legacy and new APIs"), and writing a legacy
flag, even to the value it already has, counts as using the legacy API. So a flag
is read with the legacy getter where that works and the new one where it does not,
and written back only when it really changed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_LEGACY = {
    "tf32_matmul": (lambda: bool(torch.backends.cuda.matmul.allow_tf32),
                    lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)),
    "tf32_cudnn": (lambda: bool(torch.backends.cudnn.allow_tf32),
                   lambda v: setattr(torch.backends.cudnn, "allow_tf32", v)),
    "float32_matmul_precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
}
"""Legacy name -> (getter, setter); the names are the environment fingerprint's fields."""

_NEW = {
    "tf32_matmul": ("cuda", "matmul"),
    "tf32_cudnn": ("cudnn", "conv"),
    "float32_matmul_precision": ("mkldnn", "matmul"),
}
"""Where the new API keeps each flag (``torch.backends.<a>.<b>.fp32_precision``)."""


def _new_value(name: str) -> str | None:
    obj: Any = torch.backends
    try:
        for part in _NEW[name]:
            obj = getattr(obj, part)
        return str(obj.fp32_precision)
    except (AttributeError, RuntimeError):
        return None


def read(name: str) -> Any:
    """The flag's legacy value, or ``fp32_precision=<value>`` where the legacy getter refuses."""
    try:
        return _LEGACY[name][0]()
    except RuntimeError:
        return f"fp32_precision={_new_value(name)}"


def snapshot() -> dict[str, Any]:
    """Every flag's value, for :func:`restore`."""
    return {name: read(name) for name in _LEGACY}


def restore(saved: dict[str, Any]) -> None:
    """Write back the flags that changed since :func:`snapshot`, through the legacy setters."""
    for name, value in saved.items():
        if read(name) == value or (isinstance(value, str) and value.startswith("fp32_precision=")):
            continue  # unchanged, or only readable through the new API: leave it to the program
        with _mutation_allowed():
            _LEGACY[name][1](value)


def _mutation_allowed() -> contextlib.AbstractContextManager[Any]:
    # torch.testing's common_utils forbids setting cuDNN flags outside a ``with``
    # block (catalog sweeps import it); restoring them is always allowed.
    allow = getattr(torch.backends, "__allow_nonbracketed_mutation", None)
    return allow() if allow is not None else contextlib.nullcontext()
