"""CSV report: one row per signature, fixed columns."""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

from opaudit.data.report import ROW_FIELDS, flat_row

if TYPE_CHECKING:
    from opaudit.data.report import Report


def render(report: "Report") -> str:
    """One row per finding, columns :data:`~opaudit.data.report.ROW_FIELDS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS), lineterminator="\n")
    w.writeheader()
    for f in report.all_findings:
        w.writerow(flat_row(f))
    return buf.getvalue()
