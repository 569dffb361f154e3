"""The prediction document: a model's signatures with the verdicts a catalog predicts for them.

Pure data: :mod:`opaudit.flows.predict` computes a :class:`Prediction` (``--against
CATALOG``); the renderers read it.
"""

from __future__ import annotations

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
