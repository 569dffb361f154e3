"""CSV catalog: one row per entry, fixed columns."""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opaudit.flows.catalog import Catalog

FIELDS = ("op", "dtype", "variant", "verdict", "input_kind", "phase", "source", "opinfo", "stress", "seen_in",
          "alert", "error", "warning", "signature")
"""Column order."""


def render(catalog: "Catalog") -> str:
    """One row per entry, columns :data:`FIELDS`, sorted like the catalog."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FIELDS), lineterminator="\n")
    w.writeheader()
    for e in catalog.entries:
        w.writerow({
            "op": e.op, "dtype": e.dtype, "variant": e.variant, "verdict": e.verdict.value,
            "input_kind": e.input_kind, "phase": e.phase, "source": e.source,
            "opinfo": e.opinfo.value if e.opinfo else "", "stress": e.stress.value if e.stress else "",
            "seen_in": e.seen_in, "alert": e.alert or "", "error": e.error, "warning": e.warning,
            "signature": e.signature,
        })
    return buf.getvalue()
