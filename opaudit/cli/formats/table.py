"""Terminal summary: worst findings first, then crashes, remedies and warnings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opaudit.cli.formats import batch_invariance
from opaudit.cli.formats._common import (
    FINDING_HEADERS,
    crash_rows,
    finding_row,
    notable,
    remedy_rows,
    run_check_lines,
    summary_line,
)

if TYPE_CHECKING:
    from opaudit.data.report import Report

MAX_ROWS = 40


def render(report: "Report") -> str:
    """Plain-text tables (tabulate) for a terminal."""
    from tabulate import tabulate

    out = []
    if not report.complete:
        out.append("INCOMPLETE: the audit was interrupted; findings below are what was classified so far.\n")
    rows = [finding_row(f) for f in notable(report)]
    if rows:
        shown = rows[:MAX_ROWS]
        out.append(tabulate(shown, headers=FINDING_HEADERS, tablefmt="simple"))
        if len(rows) > MAX_ROWS:
            out.append(f"... {len(rows) - MAX_ROWS} more (see the full report with -o report.yaml)")
    crashes = crash_rows(report)
    if crashes:
        out.append("\nWill deterministic mode crash this run? Yes, at these ops (execution order):")
        out.append(tabulate(crashes, headers=("#", "op", "where", "phase", "error"), tablefmt="simple",
                            maxcolwidths=[None, None, None, None, 70]))
    for r in report.run_checks:
        out.append("\nWhole-step check, " + "\n".join(run_check_lines(r)))
    remedies = remedy_rows(report)
    if remedies:
        out.append("\nWhat to do:")
        out.append(tabulate(remedies, headers=("op", "verdict", "remedy"), tablefmt="simple",
                            maxcolwidths=[None, None, 90]))
    if report.batch_invariance is not None:
        out.append("\n" + batch_invariance.table(report.batch_invariance))
    for w in report.env_warnings:
        out.append(f"warning: {w}")
    if report.all_findings or report.batch_invariance is None:
        out.append("\n" + summary_line(report))
    return "\n".join(out).lstrip("\n") + "\n"
