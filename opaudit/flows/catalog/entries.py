"""Catalog entries from audit findings, and merging two entries of one key; the catalog flow's error.

The records themselves (:class:`~opaudit.data.catalog.CatalogEntry`,
:class:`~opaudit.data.catalog.Catalog`...) and their file form live in
:mod:`opaudit.data.catalog`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from opaudit.data.catalog import INPUT_KINDS, OPINFO, STRESS, CatalogEntry
from opaudit.data.errors import OpauditError
from opaudit.data.verdict import Verdict
from opaudit.flows.catalog.keys import entry_key


class CatalogError(OpauditError):
    """A catalog cannot be built or read: bad options, no CUDA, a mismatched partial file."""


def _rank(v: Verdict | None) -> int:
    """Severity for merging: ``skipped`` says nothing about the op, so any measurement beats it."""
    if v is None:
        return -2
    return -1 if v is Verdict.SKIPPED else v.severity


def _worse(a: Verdict | None, b: Verdict | None) -> Verdict | None:
    return a if _rank(a) >= _rank(b) else b


def _preference(e: CatalogEntry) -> tuple:
    return (-_rank(e.verdict), INPUT_KINDS.index(e.input_kind), e.source, e.phase, e.signature)


def merge_entries(a: CatalogEntry, b: CatalogEntry, *, same_sweep: bool = False) -> CatalogEntry:
    """One entry for the same key: the worse verdict's evidence, both kinds' verdicts.

    Ties go to OpInfo's own samples, then to the alphabetically first source, so
    the result does not depend on the order ops were swept in.
    """
    best = min(a, b, key=_preference)
    return dataclasses.replace(
        best, opinfo=_worse(a.opinfo, b.opinfo), stress=_worse(a.stress, b.stress),
        seen_in=max(a.seen_in, b.seen_in) if same_sweep else a.seen_in + b.seen_in,
    )


def first_line(text: str | None) -> str:
    """The first non-blank line of ``text``, stripped (``""`` for none)."""
    return (text or "").strip().splitlines()[0].strip() if (text or "").strip() else ""


def entry_from_finding(f: Any, kind: str, source: str) -> CatalogEntry:
    """A one-sample :class:`CatalogEntry` from an audit :class:`~opaudit.data.report.Finding`."""
    op, dtype, variant = entry_key(f.op, f.signature)
    error = f.reason if f.verdict is Verdict.SKIPPED else (
        _alert_text(f.strict_error) if f.verdict is Verdict.RAISES else "")
    return CatalogEntry(
        op=op, dtype=dtype, variant=variant, verdict=f.verdict, input_kind=kind, phase="/".join(f.phases),
        source=source, signature=f.signature, opinfo=f.verdict if kind == OPINFO else None,
        stress=f.verdict if kind == STRESS else None, seen_in=1, alert=f.alert_kind,
        error=error, warning=_alert_text(f.warnings[0]) if f.warnings and f.verdict is Verdict.WARNS else "",
    )


def _alert_text(message: str | None) -> str:
    """What PyTorch's alert says about the op, without its boilerplate advice."""
    line = first_line(message)
    return line.split(", but you set 'torch.use_deterministic_algorithms", 1)[0]
