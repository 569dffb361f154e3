"""``--against CATALOG``: predict a model's behaviour on hardware you are not on.

The model is recorded here (CPU is fine); each recorded signature is filed under
the catalog's key (:func:`opaudit.flows.catalog.entry_key`: op overload, dtype,
variant) and looked up in a catalog measured on the target. An op the catalog
did not measure, or could not, is ``unknown``: never ``stable``.
"""

from __future__ import annotations

import re

from opaudit.data.catalog import Catalog, CatalogEntry
from opaudit.data.findings import Finding
from opaudit.data.prediction import EXACT, NO_MATCH, OTHER_VARIANT, TWIN, UNKNOWN, Predicted, Prediction, predicted_rank
from opaudit.data.report import Report
from opaudit.data.verdict import Verdict


def _merge_rank(v: Verdict) -> int:
    return -1 if v is Verdict.SKIPPED else v.severity


def _twin(op: str) -> str | None:
    """``aten.put.default`` for ``aten.put_.default``; ``None`` for an op that is not in-place."""
    parts = op.split(".")
    if len(parts) == 3 and parts[1].endswith("_") and not parts[1].startswith("_"):
        return f"{parts[0]}.{parts[1][:-1]}.{parts[2]}"
    return None


def _lookup(catalog: Catalog, op: str, dtype: str, variant: str) -> tuple[CatalogEntry | None, str, str]:
    """``(entry, match, note)``: this op's entry, else another variant's, else ``(None, none, "")``."""
    entry = catalog.get(op, dtype, variant)
    if entry is not None:
        return entry, EXACT, ""
    others = catalog.variants(op, dtype)
    if others:
        worst = max(others, key=lambda e: (_merge_rank(e.verdict), e.variant))
        shown = ", ".join(e.variant or "(defaults)" for e in others)
        return worst, OTHER_VARIANT, f"catalog measured {op} {dtype} only with {shown}; worst of those"
    return None, NO_MATCH, ""


def predict_finding(f: Finding, catalog: Catalog) -> Predicted:
    """The catalog's prediction for one :class:`~opaudit.data.report.Finding`."""
    from opaudit.flows.catalog import entry_key

    op, dtype, variant = entry_key(f.op, f.signature)
    implied = ""
    if dtype == "none":
        # A factory op called without dtype= (``torch.zeros(4, 4)``) ran with the default dtype.
        dtype = implied = implied_dtype(op, f.signature)
    base = dict(op=op, dtype=dtype, variant=variant, signature=f.signature, here=f.verdict, calls=f.calls,
                phases=f.phases, sites=f.sites)
    entry, match, note = _lookup(catalog, op, dtype, variant)
    twin = _twin(op)
    if entry is None and twin is not None:
        entry, _, note = _lookup(catalog, twin, dtype, variant)
        if entry is not None:
            match = TWIN
            note = f"looked up as {twin}" + (f"; {note}" if note else "")
    if implied:
        why = f"no dtype in the signature: looked up as {implied}, the dtype the op ran with"
        note = f"{why}; {note}" if note else why
    if entry is None:
        dtypes = sorted({e.dtype for e in catalog.entries if e.op in (op, twin)})
        note = (f"catalog has {op} only for {', '.join(dtypes)}" if dtypes else "op not in the catalog")
        return Predicted(**base, predicted=UNKNOWN, match=NO_MATCH, note=note)
    if entry.verdict is Verdict.SKIPPED:
        return Predicted(**base, predicted=UNKNOWN, match=match, source=entry.source, input_kind=entry.input_kind,
                         note=f"the catalog could not measure it: {entry.error or 'skipped'}")
    return Predicted(**base, predicted=entry.verdict.value, match=match, source=entry.source,
                     input_kind=entry.input_kind, note=note)


_INTEGER_FACTORIES = ("aten.randint.", "aten.randperm.")
_INFERRING_FACTORIES = ("aten.arange.", "aten.range.", "aten.full.", "aten.scalar_tensor.")
_FLOAT_LITERAL = re.compile(r"(?<![\w.])-?(?:\d+\.\d*(?:e-?\d+)?|\d+e-?\d+|inf|nan)(?![\w.])")


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


def predict(report: Report, catalog: Catalog, catalog_label: str = "catalog") -> Prediction:
    """Predict every signature of ``report`` (recorded here) on ``catalog``'s hardware."""
    rows = [predict_finding(f, catalog) for f in report.all_findings]
    rows.sort(key=lambda r: (predicted_rank(r.predicted), r.op, r.dtype, r.variant, r.signature))
    return Prediction(catalog=catalog_label, target=dict(catalog.environment), here=dict(report.environment),
                      rows=tuple(rows), complete=report.complete)
