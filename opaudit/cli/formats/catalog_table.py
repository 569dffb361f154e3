"""Terminal summary of a catalog: counts, then every entry that is not stable."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opaudit.cli.formats import batch_invariance
from opaudit.data.verdict import Verdict

if TYPE_CHECKING:
    from opaudit.flows.catalog import Catalog

_QUIET = (Verdict.STABLE, Verdict.RANDOM, Verdict.UNINITIALIZED)


def render(catalog: "Catalog") -> str:
    """Plain-text tables (tabulate) for a terminal."""
    from tabulate import tabulate

    env, counts = catalog.environment, catalog.summary
    device = env.get("gpu") or env.get("cpu")
    rows = [[e.verdict.value, e.op, e.dtype, e.variant, e.phase, e.input_kind, e.source]
            for e in sorted(catalog.entries, key=lambda e: (-e.verdict.severity, e.key)) if e.verdict not in _QUIET]
    out = []
    if rows:
        out.append(tabulate(rows, headers=("verdict", "op", "dtype", "variant", "phase", "shown by", "OpInfo entry"),
                            tablefmt="simple"))
        out.append("")
    if catalog.batch_invariance:
        out += [batch_invariance.catalog_table(catalog.batch_invariance), ""]
    parts = ", ".join(f"{counts[v.value]} {v.value}" for v in Verdict if counts[v.value])
    state = "" if catalog.complete else " (INCOMPLETE)"
    out.append(f"catalog of {device}, torch {env.get('torch')}{state}: {counts['entries']} entries "
               f"({counts['ops']} ops) from {counts['swept']} swept entries, {counts['not_swept']} not swept: "
               f"{parts or 'nothing'}")
    return "\n".join(out) + "\n"
