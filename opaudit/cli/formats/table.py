"""Plain-text tables for a terminal, for every document: the worst rows first, then a one-line summary."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from opaudit.cli.formats import batch_invariance, distributed
from opaudit.cli.formats.common import (
    COMPILED_HEAD,
    COMPILED_NOTE,
    FINDING_HEADERS,
    compiled_text,
    crash_rows,
    finding_row,
    grouped_predictions,
    not_crashes_line,
    notable,
    quiet_summary,
    remedy_rows,
    run_check_lines,
    split_quiet,
    summary_line,
    target_name,
    where,
)
from opaudit.cli.formats.escape import text_table, visible
from opaudit.data.verdict import Verdict

if TYPE_CHECKING:
    from opaudit.data.catalog import Catalog
    from opaudit.data.diff import Change, Diff
    from opaudit.data.prediction import Prediction
    from opaudit.data.report import Finding, Report


MAX_FINDINGS = 40
MAX_REASON = 40
"""Longest reason (a skip's, mostly: a replay's error message) in the verdict column; a longer one is cut
there and shown whole under the table."""

_Render = TypeVar("_Render", bound=Callable[..., str])


def _terminal(render: _Render) -> _Render:
    """``render``'s whole text through :func:`~opaudit.cli.formats.escape.visible`: what no table cell holds
    (a file name, a catalog's ``torch`` field) cannot reach the terminal raw either."""
    @functools.wraps(render)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        return visible(render(*args, **kwargs))

    return wrapper  # type: ignore[return-value]


def _short_reason(f: "Finding") -> "Finding":
    """``f`` with its reason cut to :data:`MAX_REASON` characters on one line (``uninitialized`` ones are
    already condensed by the verdict text)."""
    line = f.reason.split("\n", 1)[0]
    if f.verdict is Verdict.UNINITIALIZED or (line == f.reason and len(line) <= MAX_REASON):
        return f
    return dataclasses.replace(f, reason=line[:MAX_REASON - 1].rstrip() + "…")


@_terminal
def outcome(report: "Report") -> str:
    """The whole-step checks and the summary line: what a person needs when the report itself went to a program."""
    lines = ["Whole-step check, " + "\n".join(run_check_lines(r)) for r in report.run_checks]
    return "\n".join([*lines, summary_line(report)]) + "\n"


@_terminal
def report(report: "Report", show_all: bool = False, written_to: str | None = None) -> str:
    """Plain-text tables (tabulate) for a terminal.

    Findings that need something done come first; ``random`` and ``uninitialized``
    ones (model initialisation, mostly) are summarised in one line, and the table
    stops at :data:`MAX_FINDINGS` rows, unless ``show_all``. ``written_to``: where
    the full report went (``-o``), which the hints then name.
    """
    out = []
    if not report.complete:
        out.append("INCOMPLETE: the audit was interrupted; findings below are what was classified so far.\n")
    listed, quiet = (notable(report), []) if show_all else split_quiet(notable(report))
    rows = [finding_row(_short_reason(f)) for f in listed]
    full = f"listed in {written_to}; --show-all shows them here" if written_to else "--show-all lists them"
    if rows:
        shown = rows if show_all else rows[:MAX_FINDINGS]
        out.append(text_table(shown, headers=FINDING_HEADERS))
        if len(rows) > len(shown):
            out.append(f"... {len(rows) - len(shown)} more ({full})")
        cut = [f for f in listed[:len(shown)] if _short_reason(f) is not f]
        if cut:
            out.append("\nReasons cut short above:")
            out.append(text_table([[f.op, where(f.locations, 1), f.reason] for f in cut],
                                  headers=("op", "where", "reason"), maxcolwidths=[None, None, 90]))
    if quiet:
        out.append(f"{'+ ' if rows else ''}{quiet_summary(quiet)}: not listed ({full})")
    crashes = crash_rows(report)
    if crashes:
        out.append("\nWill deterministic mode crash this run? Yes, at these ops (execution order):")
        out.append(text_table(crashes, headers=("#", "op", "where", "phase", "error"),
                              maxcolwidths=[None, None, None, None, 70]))
    note = not_crashes_line(report)
    if note:
        out.append(("" if crashes else "\n") + note)
    if report.compiled:
        out.append(f"\n{COMPILED_HEAD}:")
        out += [f"  {compiled_text(c)}" for c in report.compiled]
        out.append(f"  ({COMPILED_NOTE})")
    for r in report.run_checks:
        out.append("\nWhole-step check, " + "\n".join(run_check_lines(r)))
    if report.distributed:
        out.append("\n" + distributed.table(report))
    remedies = remedy_rows(report, listed)
    if remedies:
        out.append("\nWhat to do:")
        out.append(text_table(remedies, headers=("op", "verdict", "remedy"),
                              maxcolwidths=[None, None, 90]))
    if report.batch_invariance is not None:
        out.append("\n" + batch_invariance.table(report.batch_invariance))
    for w in report.env_warnings:
        out.append(f"warning: {w}")
    if report.all_findings or report.batch_invariance is None:
        out.append("\n" + summary_line(report))
    return "\n".join(out).lstrip("\n") + "\n"


_QUIET = (Verdict.STABLE, Verdict.RANDOM, Verdict.UNINITIALIZED)


@_terminal
def catalog(catalog: "Catalog") -> str:
    """Plain-text tables (tabulate) for a terminal."""
    env, counts = catalog.environment, catalog.summary
    device = env.get("gpu") or env.get("cpu")
    rows = [[e.verdict.value, e.op, e.dtype, e.variant, e.phase, e.input_kind, e.source]
            for e in sorted(catalog.entries, key=lambda e: (-e.verdict.severity, e.key)) if e.verdict not in _QUIET]
    out = []
    if rows:
        out.append(text_table(rows, headers=("verdict", "op", "dtype", "variant", "phase", "shown by",
                                             "OpInfo entry")))
        out.append("")
    if catalog.batch_invariance:
        out += [batch_invariance.catalog_table(catalog.batch_invariance), ""]
    parts = ", ".join(f"{counts[v.value]} {v.value}" for v in Verdict if counts[v.value])
    state = "" if catalog.complete else " (INCOMPLETE)"
    out.append(f"swept: {catalog.selection}")
    out.append(f"catalog of {device}, torch {env.get('torch')}{state}: {counts['entries']} entries "
               f"({counts['ops']} ops) from {counts['swept']} swept entries, {counts['not_swept']} not swept: "
               f"{parts or 'nothing'}")
    return "\n".join(out) + "\n"


MAX_CHANGES = 60


def _diff_rows(changes: "tuple[Change, ...]") -> list[list[str]]:
    return [[c.transition, c.op, c.detail if len(c.detail) <= 60 else c.detail[:59] + "…", c.where]
            for c in changes]


def _value(v: Any) -> str:
    return "-" if v is None else str(v)


@_terminal
def diff(diff: "Diff") -> str:
    """Plain-text tables (tabulate) for a terminal."""
    out = [f"{diff.kind} diff: A = {diff.a}, B = {diff.b}"]
    detail = "dtype/variant" if diff.kind == "catalog" else "signature"
    where = "OpInfo entry" if diff.kind == "catalog" else "where"
    for title, changes in (("verdict changed", diff.changes), ("only in A", diff.only_a), ("only in B", diff.only_b)):
        if not changes:
            continue
        out.append(f"\n{title} ({len(changes)}):")
        out.append(text_table(_diff_rows(changes[:MAX_CHANGES]), headers=("A->B", "op", detail, where)))
        if len(changes) > MAX_CHANGES:
            out.append(f"... {len(changes) - MAX_CHANGES} more (use --format csv or -o diff.yaml for all)")
    for title, fields in (("environment differences", diff.environment), ("settings differences", diff.settings)):
        if fields:
            out.append(f"\n{title}:")
            out.append(text_table([[f.name, _value(f.before), _value(f.after)] for f in fields],
                                headers=("field", "A", "B")))
    s = diff.summary
    out.append(f"\n{s['changed']} changed, {s['only_a']} only in A, {s['only_b']} only in B, "
               f"{s['unchanged']} unchanged")
    return "\n".join(out) + "\n"


MAX_PREDICTIONS = 40


@_terminal
def prediction(prediction: "Prediction") -> str:
    """Plain-text tables (tabulate) for a terminal."""
    rows = [[r.predicted, r.here.value, r.op + (f" (x{n})" if n > 1 else ""), f"{r.dtype} {r.variant}".strip(),
             locs, r.note] for r, locs, n in grouped_predictions(prediction) if r.predicted != Verdict.STABLE.value]
    out = [f"prediction on {target_name(prediction)} (catalog {prediction.catalog})"]
    if not prediction.complete:
        out.append("INCOMPLETE: the audit was interrupted; only the signatures classified so far are predicted.")
    if rows:
        out.append(text_table(rows[:MAX_PREDICTIONS], headers=("predicted", "here", "op", "dtype", "where", "note"),
                              maxcolwidths=[None, None, None, None, 40, 60]))
        if len(rows) > MAX_PREDICTIONS:
            out.append(f"... {len(rows) - MAX_PREDICTIONS} more (use -o prediction.yaml or --format csv for all)")
    s = prediction.summary
    parts = ", ".join(f"{s[k]} {k}" for k in s if k not in ("signatures", "changed") and s[k])
    out.append(f"\n{s['signatures']} signatures: {parts or 'nothing recorded'}; "
               f"{s['changed']} differ from this machine's verdict")
    return "\n".join(out) + "\n"
