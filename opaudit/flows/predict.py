"""``--against CATALOG``: predict a model's behaviour on hardware you are not on.

The model is recorded here (CPU is fine); each recorded signature is filed under
the catalog's key (:func:`opaudit.flows.catalog.entry_key`: op overload, dtype,
variant) and looked up in a catalog measured on the target. An op the catalog
did not measure, or could not, is ``unknown``: never ``stable``.
"""

from __future__ import annotations

from opaudit.data.catalog import ALL_DTYPES, Catalog, CatalogEntry
from opaudit.data.findings import Finding
from opaudit.data.prediction import EXACT, NO_MATCH, OTHER_VARIANT, TWIN, UNKNOWN, Predicted, Prediction, predicted_rank
from opaudit.data.report import Report
from opaudit.data.verdict import Verdict
from opaudit.flows.catalog.keys import NO_DTYPE


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


def _lookup_any(catalog: Catalog, op: str, dtype: str, variant: str,
                implied: bool) -> tuple[CatalogEntry | None, str, str]:
    """:func:`_lookup`, then the out-of-place twin; for a dtype implied by the op (see
    :func:`~opaudit.flows.catalog.keys.implied_dtype`) also under ``none``, as catalogs made before filed it."""
    twin = _twin(op)
    for dt in (dtype, NO_DTYPE) if implied else (dtype,):
        entry, match, note = _lookup(catalog, op, dt, variant)
        if entry is None and twin is not None:
            entry, _, note = _lookup(catalog, twin, dt, variant)
            if entry is not None:
                match = TWIN
                note = f"looked up as {twin}" + (f"; {note}" if note else "")
        if entry is not None:
            return entry, match, note
    return None, NO_MATCH, ""


def _not_found(catalog: Catalog, op: str, dtype: str) -> str:
    """Why ``op`` in ``dtype`` is not in ``catalog``: what the sweep covered, and what would measure it."""
    twin = _twin(op)
    entries = [e for e in catalog.entries if e.op in (op, twin)]
    swept = [str(d) for d in catalog.settings.get("dtypes") or []]
    packet = op.split(".")[1] if op.count(".") == 2 else op
    if not entries:
        ops = [str(o) for o in catalog.settings.get("ops") or ["*"]]
        if ops != ["*"]:
            return f"op not in the catalog, which swept only --ops {','.join(ops)}"
        return "op not in the catalog"
    have = ", ".join(sorted({e.dtype for e in entries}))
    if swept == [ALL_DTYPES] or dtype in swept:
        return f"catalog has {op} only for {have}: its sweep did not reach {dtype}"
    # The OpInfo entry named after the op if one ran it, else the aten name ``--ops`` also takes.
    ops = packet if any(e.source == packet for e in entries) else f"aten.{packet}"
    return (f"catalog has {op} only for {have}: it swept {', '.join(swept)} only (other dtypes come from other "
            f"ops' samples); {dtype} was left out to keep a full sweep's time down (--dtypes all, every dtype "
            f"each op supports, sweeps several times as many): opaudit catalog --ops {ops} --dtypes {dtype} measures it")


def predict_finding(f: Finding, catalog: Catalog) -> Predicted:
    """The catalog's prediction for one :class:`~opaudit.data.report.Finding`."""
    from opaudit.aten.signature import signature_dtype
    from opaudit.flows.catalog import entry_key

    op, dtype, variant = entry_key(f.op, f.signature)
    # A factory op called without dtype= (``torch.zeros(4, 4)``) ran with the default dtype.
    implied = dtype if signature_dtype(f.signature) == NO_DTYPE else ""
    base = dict(op=op, dtype=dtype, variant=variant, signature=f.signature, here=f.verdict, calls=f.calls,
                phases=f.phases, sites=f.sites)
    entry, match, note = _lookup_any(catalog, op, dtype, variant, bool(implied))
    if implied:
        why = f"no dtype in the signature: looked up as {implied}, the dtype the op ran with"
        note = f"{why}; {note}" if note else why
    if entry is None:
        return Predicted(**base, predicted=UNKNOWN, match=NO_MATCH, note=_not_found(catalog, op, dtype))
    if entry.verdict is Verdict.SKIPPED:
        return Predicted(**base, predicted=UNKNOWN, match=match, source=entry.source, input_kind=entry.input_kind,
                         note=f"the catalog could not measure it: {entry.error or 'skipped'}")
    return Predicted(**base, predicted=entry.verdict.value, match=match, source=entry.source,
                     input_kind=entry.input_kind, note=note)


def predict(report: Report, catalog: Catalog, catalog_label: str = "catalog") -> Prediction:
    """Predict every signature of ``report`` (recorded here) on ``catalog``'s hardware."""
    rows = [predict_finding(f, catalog) for f in report.all_findings]
    rows.sort(key=lambda r: (predicted_rank(r.predicted), r.op, r.dtype, r.variant, r.signature))
    return Prediction(catalog=catalog_label, target=dict(catalog.environment), here=dict(report.environment),
                      rows=tuple(rows), complete=report.complete)
