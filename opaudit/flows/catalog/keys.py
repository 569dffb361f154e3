"""Catalog keys from signature text: ``(op, dtype, variant)``, shared by the sweep and ``--against``."""

from __future__ import annotations

import re

from opaudit.aten.signature import signature_dtype, signature_variant

_INTEGER_FACTORIES = ("aten.randint.", "aten.randperm.", "aten.tril_indices.", "aten.triu_indices.")
_INFERRING_FACTORIES = ("aten.arange.", "aten.range.", "aten.full.", "aten.scalar_tensor.")
_FLOAT_LITERAL = re.compile(r"(?<![\w.])-?(?:\d+\.\d*(?:e-?\d+)?|\d+e-?\d+|inf|nan)(?![\w.])")

NO_DTYPE = "none"
"""What :func:`~opaudit.aten.signature.signature_dtype` says of a call with no tensor and no ``dtype=``."""


def entry_key(op: str, signature: str) -> tuple[str, str, str]:
    """``(op, dtype, variant)`` under which a recorded signature is filed in a catalog.

    A call with no tensor and no ``dtype=`` (``torch.randint(0, 10, (5,))``) is
    filed under the dtype it ran with (:func:`implied_dtype`), by the sweep and
    the lookup alike.
    """
    dtype = signature_dtype(signature)
    if dtype == NO_DTYPE:
        dtype = implied_dtype(op, signature)
    return (op, dtype, signature_variant(op, signature))


def implied_dtype(op: str, signature: str) -> str:
    """The dtype an op given no tensor and no ``dtype=`` ran with: the default dtype, except for
    the factories whose default is integer (``randint``) or follows their values (``arange(4)``)."""
    import torch

    default = str(torch.get_default_dtype()).replace("torch.", "")
    if op.startswith(_INTEGER_FACTORIES):
        return "int64"
    if op.startswith(_INFERRING_FACTORIES):
        return default if _FLOAT_LITERAL.search(signature) else "int64"
    return default
