"""CSV diff: one row per op that changed or is on one side only."""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opaudit.flows.diff import Diff

FIELDS = ("change", "op", "detail", "before", "after", "where")
"""Column order; ``change`` is ``changed``, ``only_a`` or ``only_b``."""


def render(diff: "Diff") -> str:
    """Verdict changes, then ops only in the first document, then ops only in the second."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FIELDS), lineterminator="\n")
    w.writeheader()
    for label, changes in (("changed", diff.changes), ("only_a", diff.only_a), ("only_b", diff.only_b)):
        for c in changes:
            w.writerow({"change": label, "op": c.op, "detail": c.detail, "before": c.before, "after": c.after,
                        "where": c.where})
    return buf.getvalue()
