"""CSV report: one row per signature, fixed columns."""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

from opaudit.cli.formats import batch_invariance
from opaudit.data.report import ROW_FIELDS, flat_row

if TYPE_CHECKING:
    from opaudit.data.report import Report


def render(report: "Report") -> str:
    """One row per finding, columns :data:`~opaudit.data.report.ROW_FIELDS`.

    A report of a batch-invariance check (which replays nothing) holds one row per
    op signature of that check instead, columns :data:`~opaudit.data.invariance.OP_ROW_FIELDS`.
    """
    if report.batch_invariance is not None and not report.all_findings:
        return batch_invariance.csv_text(report.batch_invariance)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS), lineterminator="\n")
    w.writeheader()
    for f in report.all_findings:
        w.writerow(flat_row(f))
    return buf.getvalue()
