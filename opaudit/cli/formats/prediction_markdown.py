"""Markdown prediction, for a pre-migration review."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opaudit.cli.formats.prediction_table import grouped, target_name

if TYPE_CHECKING:
    from opaudit.flows.predict import Prediction


def _table(headers: Any, rows: Any) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github")


def render(prediction: "Prediction") -> str:
    """The prediction as GitHub-flavoured Markdown."""
    s = prediction.summary
    out = [f"# opaudit prediction: {target_name(prediction)}", "",
           f"Recorded here on {prediction.here.get('gpu') or prediction.here.get('cpu')} "
           f"(torch {prediction.here.get('torch')}); verdicts looked up in `{prediction.catalog}`. "
           "`unknown` means the catalog did not measure that op, dtype and variant: it is not a promise "
           "of stability.", ""]
    if not prediction.complete:
        out += ["> **Incomplete**: the audit was interrupted.", ""]
    out += [_table(("predicted", "signatures"), [[k, v] for k, v in s.items() if k not in ("signatures", "changed")]),
            ""]
    rows = [[r.predicted, r.here.value, f"`{r.op}`" + (f" (x{n})" if n > 1 else ""),
             f"{r.dtype} {r.variant}".strip(), locs, r.note.replace("|", "\\|")]
            for r, locs, n in grouped(prediction, 3) if r.predicted != "stable"]
    out += ["## Ops that are not predicted stable", ""]
    out += [_table(("predicted", "here", "op", "dtype / variant", "where", "note"), rows) if rows
            else "None: every recorded op is stable in the catalog.", ""]
    return "\n".join(out)
