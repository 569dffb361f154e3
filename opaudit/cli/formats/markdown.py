"""Markdown report, for pasting into a review or an issue."""

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
from opaudit.data.verdict import Verdict

if TYPE_CHECKING:
    from opaudit.data.report import Report


def _table(headers, rows) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github")


def render(report: "Report") -> str:
    """The report as GitHub-flavoured Markdown."""
    env = report.environment
    out = ["# opaudit report", ""]
    if not report.complete:
        out += ["> **Incomplete**: the audit was interrupted; this lists what was classified so far.", ""]
    device = env.get("gpu") or env.get("cpu")
    if report.batch_invariance is not None and not report.all_findings:
        # A batch-invariance check replays nothing: its section is the whole report.
        out += [f"torch {env.get('torch')} on {device}, {env.get('threads')} threads.", ""]
        out += batch_invariance.markdown(report.batch_invariance)
        out += (["## Environment", ""] + [f"- {w}" for w in report.env_warnings] + [""]) if report.env_warnings else []
        return "\n".join(out)
    out += [f"torch {env.get('torch')} on {device}, {env.get('threads')} threads; "
            f"{report.settings.get('reps')} replays per mode.", "", summary_line(report), ""]
    counts = report.summary
    out += [_table(("verdict", "signatures", "meaning"),
                   [[v.value, counts[v.value], v.meaning] for v in Verdict]), ""]
    crashes = crash_rows(report)
    out += ["## Will deterministic mode crash this run?", ""]
    if crashes:
        out += ["Yes. Every op that raises under `torch.use_deterministic_algorithms(True)`, in execution order:", "",
                _table(("#", "op", "where", "phase", "error"), crashes), ""]
    else:
        out += ["No op raises under `torch.use_deterministic_algorithms(True)`.", ""]
    if report.run_checks:
        out += ["## Whole-step reproducibility", ""]
        for r in report.run_checks:
            lines = run_check_lines(r)
            out += [f"- **{lines[0]}**"] + [f"  - {line.strip()}" for line in lines[1:]]
        out.append("")
    rows = [finding_row(f) for f in notable(report)]
    out += ["## Findings", ""]
    out += [_table(FINDING_HEADERS, rows) if rows else "Every replayed op was stable.", ""]
    remedies = remedy_rows(report)
    if remedies:
        out += ["## What to do", "", _table(("op", "verdict", "remedy"), remedies), ""]
    if report.batch_invariance is not None:
        out += batch_invariance.markdown(report.batch_invariance)
    if report.env_warnings:
        out += ["## Environment", ""] + [f"- {w}" for w in report.env_warnings] + [""]
    return "\n".join(out)
