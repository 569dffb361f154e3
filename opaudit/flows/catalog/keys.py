"""Catalog keys from signature text: ``(op, dtype, variant)``, shared by the sweep and ``--against``."""

from __future__ import annotations

from opaudit.aten.signature import signature_dtype, signature_variant


def entry_key(op: str, signature: str) -> tuple[str, str, str]:
    """``(op, dtype, variant)`` under which a recorded signature is filed in a catalog."""
    return (op, signature_dtype(signature), signature_variant(op, signature))
