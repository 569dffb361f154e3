"""``--against CATALOG``: predict a model's behaviour on hardware you are not on.

The model is recorded here (CPU is fine); each recorded signature is filed under
the catalog's key (:func:`opaudit.flows.catalog.entry_key`: op overload, dtype,
variant) and looked up in a catalog measured on the target. An op the catalog
did not measure, or could not, is ``unknown``: never ``stable``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opaudit.data.site import Site, locations_of
from opaudit.data.verdict import FAILING_DEFAULT, Verdict

FORMAT = "opaudit-prediction"
VERSION = 1
UNKNOWN = "unknown"
"""Predicted verdict of an op the catalog does not cover."""

EXACT, OTHER_VARIANT, TWIN, NO_MATCH = "exact", "other variant", "functional twin", "none"
"""How a signature matched the catalog: same key / same op and dtype, other bool or string
arguments (the worst of those entries is predicted) / the out-of-place twin of an in-place
op (``aten.put.default`` for ``aten.put_.default``: OpInfo sweeps the functional form, which
runs the same kernel) / not at all."""

# Where ``unknown`` sorts: after every verdict that fails by default, before the rest,
# so that a reader sees what will break, then what nobody measured.
_ORDER = [Verdict.RAISES.value, Verdict.DIVERGES_DETERMINISTIC.value, Verdict.DIVERGES.value, UNKNOWN,
          Verdict.WARNS.value, Verdict.RANDOM.value, Verdict.UNINITIALIZED.value, Verdict.SKIPPED.value,
          Verdict.STABLE.value]


def predicted_rank(value: str) -> int:
    """Sort position of a predicted verdict, worst first."""
    return _ORDER.index(value)


@dataclass(frozen=True)
class Predicted:
    """One recorded signature and what the catalog says it will do on the target."""

    op: str
    dtype: str
    variant: str
    signature: str
    here: Verdict
    """The verdict measured on this machine."""
    predicted: str
    """A verdict name, or ``unknown``."""
    match: str
    """``exact``, ``other variant`` or ``none``."""
    calls: int = 0
    phases: tuple[str, ...] = ()
    sites: tuple[Site, ...] = ()
    source: str = ""
    """Catalog entry's OpInfo source (what the target measurement ran)."""
    input_kind: str = ""
    """Catalog entry's input kind: ``opinfo`` or ``stress``."""
    note: str = ""
    """Why the prediction is approximate or unknown."""

    @property
    def locations(self) -> tuple[str, ...]:
        """Distinct ``file:line`` locations, in first-seen order."""
        return locations_of(self.sites)


@dataclass(frozen=True)
class Prediction:
    """A model's signatures with the verdicts a catalog predicts for them."""

    catalog: str
    """Path or label of the catalog."""
    target: Mapping[str, Any]
    """The catalog's environment fingerprint."""
    here: Mapping[str, Any]
    """The report's environment fingerprint."""
    rows: tuple[Predicted, ...]
    """Worst prediction first."""
    complete: bool = True
    """False when the report it was made from was interrupted."""
    format: str = FORMAT
    version: int = VERSION

    @property
    def summary(self) -> dict[str, int]:
        """Signatures per predicted verdict (``unknown`` included), plus totals."""
        counts = {v: 0 for v in _ORDER}
        for r in self.rows:
            counts[r.predicted] += 1
        counts["signatures"] = len(self.rows)
        counts["changed"] = sum(1 for r in self.rows if r.predicted != r.here.value)
        return counts

    def failing(self, verdicts: Iterable[Verdict] = FAILING_DEFAULT) -> list[Predicted]:
        """Rows predicted to be one of ``verdicts`` on the target."""
        want = {Verdict(v).value for v in verdicts}
        return [r for r in self.rows if r.predicted in want]

    def to_dict(self) -> dict[str, Any]:
        """Plain, ordered, serialisable form."""
        def row(r: Predicted) -> dict[str, Any]:
            d: dict[str, Any] = {
                "op": r.op, "dtype": r.dtype, "variant": r.variant, "predicted": r.predicted,
                "here": r.here.value, "match": r.match, "calls": r.calls, "phases": list(r.phases),
                "sites": [s.to_dict() for s in r.sites],
                "signature": r.signature, "source": r.source, "input_kind": r.input_kind, "note": r.note,
            }
            return {k: v for k, v in d.items() if v not in ("", None) or k == "variant"}

        return {
            "format": self.format, "version": self.version, "complete": self.complete, "catalog": self.catalog,
            "target": dict(sorted(self.target.items())), "here": dict(sorted(self.here.items())),
            "summary": self.summary, "predictions": [row(r) for r in self.rows],
        }


def _merge_rank(v: Verdict) -> int:
    return -1 if v is Verdict.SKIPPED else v.severity


def _twin(op: str) -> str | None:
    """``aten.put.default`` for ``aten.put_.default``; ``None`` for an op that is not in-place."""
    parts = op.split(".")
    if len(parts) == 3 and parts[1].endswith("_") and not parts[1].startswith("_"):
        return f"{parts[0]}.{parts[1][:-1]}.{parts[2]}"
    return None


def _lookup(catalog: Any, op: str, dtype: str, variant: str) -> tuple[Any, str, str]:
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


def predict_finding(f: Any, catalog: Any) -> Predicted:
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


def predict(report: Any, catalog: Any, catalog_label: str = "catalog") -> Prediction:
    """Predict every signature of ``report`` (recorded here) on ``catalog``'s hardware."""
    rows = [predict_finding(f, catalog) for f in report.all_findings]
    rows.sort(key=lambda r: (predicted_rank(r.predicted), r.op, r.dtype, r.variant, r.signature))
    return Prediction(catalog=catalog_label, target=dict(catalog.environment), here=dict(report.environment),
                      rows=tuple(rows), complete=report.complete)
