"""Terminal prediction: what the model's ops will do on the catalog's hardware."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opaudit.data.verdict import Verdict

if TYPE_CHECKING:
    from opaudit.flows.predict import Predicted, Prediction

MAX_ROWS = 40


def where(r: "Predicted", limit: int = 2) -> str:
    """``file:line`` of the first sites, with ``+N`` for the rest."""
    locs = list(r.locations)
    more = len(locs) - limit
    return ", ".join(locs[:limit]) + (f" +{more}" if more > 0 else "")


def grouped(prediction: "Prediction", limit: int = 2) -> list[tuple["Predicted", str, int]]:
    """Rows that differ only in signature merged: ``(first row, where, signatures)``, in order."""
    groups: dict[tuple, list["Predicted"]] = {}
    for r in prediction.rows:
        groups.setdefault((r.predicted, r.here, r.op, r.dtype, r.variant, r.note), []).append(r)
    out = []
    for rows in groups.values():
        locs = list(dict.fromkeys(loc for r in rows for loc in r.locations))
        more = len(locs) - limit
        out.append((rows[0], ", ".join(locs[:limit]) + (f" +{more}" if more > 0 else ""), len(rows)))
    return out


def target_name(prediction: "Prediction") -> str:
    """``NVIDIA H100 80GB HBM3, torch 2.x`` style label of the catalog's machine."""
    t = prediction.target
    return f"{t.get('gpu') or t.get('cpu') or '?'}, torch {t.get('torch')}"


def render(prediction: "Prediction") -> str:
    """Plain-text tables (tabulate) for a terminal."""
    from tabulate import tabulate

    rows = [[r.predicted, r.here.value, r.op + (f" (x{n})" if n > 1 else ""), f"{r.dtype} {r.variant}".strip(),
             locs, r.note] for r, locs, n in grouped(prediction) if r.predicted != Verdict.STABLE.value]
    out = [f"prediction on {target_name(prediction)} (catalog {prediction.catalog})"]
    if not prediction.complete:
        out.append("INCOMPLETE: the audit was interrupted; only the signatures classified so far are predicted.")
    if rows:
        out.append(tabulate(rows[:MAX_ROWS], headers=("predicted", "here", "op", "dtype", "where", "note"),
                            tablefmt="simple", maxcolwidths=[None, None, None, None, 40, 60]))
        if len(rows) > MAX_ROWS:
            out.append(f"... {len(rows) - MAX_ROWS} more (use -o prediction.yaml or --format csv for all)")
    s = prediction.summary
    parts = ", ".join(f"{s[k]} {k}" for k in s if k not in ("signatures", "changed") and s[k])
    out.append(f"\n{s['signatures']} signatures: {parts or 'nothing recorded'}; "
               f"{s['changed']} differ from this machine's verdict")
    return "\n".join(out) + "\n"
