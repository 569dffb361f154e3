"""CSV for every document: one row per finding, entry, change or prediction, with fixed columns."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opaudit.cli.formats import batch_invariance
from opaudit.cli.formats.common import csv_text
from opaudit.data.findings import ROW_FIELDS, flat_row
from opaudit.data.site import modules_of

if TYPE_CHECKING:
    from opaudit.data.catalog import Catalog
    from opaudit.data.diff import Diff
    from opaudit.data.prediction import Prediction
    from opaudit.data.report import Report

CATALOG_FIELDS = ("op", "dtype", "variant", "verdict", "input_kind", "phase", "source", "opinfo", "stress",
                  "seen_in", "alert", "error", "warning", "signature", "selection")
"""Column order of a catalog; ``selection`` (what the sweep ran, the same on every row) keeps a subset
catalog's rows from reading as the whole database's."""

DIFF_FIELDS = ("change", "op", "detail", "before", "after", "where")
"""Column order of a diff; ``change`` is ``changed``, ``only_a`` or ``only_b``."""

PREDICTION_FIELDS = ("predicted", "here", "op", "dtype", "variant", "match", "calls", "phases", "locations",
                     "modules", "source", "input_kind", "note", "signature")
"""Column order of a prediction."""


def report(r: "Report") -> str:
    """One row per finding, worst first, columns :data:`~opaudit.data.report.ROW_FIELDS` and ``complete``.

    ``complete`` is ``False`` on every row of an interrupted audit's partial report:
    a CSV has no header block to carry it, and a partial file must not look whole.

    A report of a batch-invariance check (which replays nothing) holds one row per
    op signature of that check instead, columns :data:`~opaudit.data.invariance.OP_ROW_FIELDS`.
    """
    if r.batch_invariance is not None and not r.all_findings:
        return batch_invariance.csv_text(r.batch_invariance)
    return csv_text((*ROW_FIELDS, "complete"), ({**flat_row(f), "complete": r.complete} for f in r.all_findings))


def catalog(c: "Catalog") -> str:
    """One row per entry, columns :data:`CATALOG_FIELDS`, sorted like the catalog."""
    selection = c.selection
    return csv_text(CATALOG_FIELDS, ({
        "op": e.op, "dtype": e.dtype, "variant": e.variant, "verdict": e.verdict.value,
        "input_kind": e.input_kind, "phase": e.phase, "source": e.source,
        "opinfo": e.opinfo.value if e.opinfo else "", "stress": e.stress.value if e.stress else "",
        "seen_in": e.seen_in, "alert": e.alert or "", "error": e.error, "warning": e.warning,
        "signature": e.signature, "selection": selection,
    } for e in c.entries))


def diff(d: "Diff") -> str:
    """Verdict changes, then ops only in the first document, then ops only in the second."""
    return csv_text(DIFF_FIELDS, (
        {"change": label, "op": c.op, "detail": c.detail, "before": c.before, "after": c.after, "where": c.where}
        for label, changes in (("changed", d.changes), ("only_a", d.only_a), ("only_b", d.only_b))
        for c in changes))


def prediction(p: "Prediction") -> str:
    """One row per signature, worst prediction first."""
    return csv_text(PREDICTION_FIELDS, ({
        "predicted": r.predicted, "here": r.here.value, "op": r.op, "dtype": r.dtype, "variant": r.variant,
        "match": r.match, "calls": r.calls, "phases": ";".join(r.phases), "locations": ";".join(r.locations),
        "modules": ";".join(modules_of(r.sites)), "source": r.source,
        "input_kind": r.input_kind, "note": r.note, "signature": r.signature,
    } for r in p.rows))
