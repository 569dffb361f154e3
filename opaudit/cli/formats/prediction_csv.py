"""CSV prediction: one row per recorded signature."""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opaudit.flows.predict import Prediction

FIELDS = ("predicted", "here", "op", "dtype", "variant", "match", "calls", "phases", "locations", "modules",
          "source", "input_kind", "note", "signature")
"""Column order."""


def render(prediction: "Prediction") -> str:
    """One row per signature, worst prediction first."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FIELDS), lineterminator="\n")
    w.writeheader()
    for r in prediction.rows:
        w.writerow({
            "predicted": r.predicted, "here": r.here.value, "op": r.op, "dtype": r.dtype, "variant": r.variant,
            "match": r.match, "calls": r.calls, "phases": ";".join(r.phases), "locations": ";".join(r.locations),
            "modules": ";".join(dict.fromkeys(s.module for s in r.sites if s.module)), "source": r.source,
            "input_kind": r.input_kind, "note": r.note, "signature": r.signature,
        })
    return buf.getvalue()
