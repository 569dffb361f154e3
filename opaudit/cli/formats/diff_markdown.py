"""Markdown diff, for a migration review."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opaudit.flows.diff import Change, Diff


def _table(headers: Any, rows: Any) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github")


def _rows(changes: "tuple[Change, ...]") -> list[list[str]]:
    return [[f"{c.before} → {c.after}", f"`{c.op}`", c.detail.replace("|", "\\|"), c.where] for c in changes]


def render(diff: "Diff") -> str:
    """The diff as GitHub-flavoured Markdown."""
    s = diff.summary
    detail = "dtype / variant" if diff.kind == "catalog" else "signature"
    where = "OpInfo entry" if diff.kind == "catalog" else "where"
    out = [f"# opaudit {diff.kind} diff", "", f"- **A**: `{diff.a}`", f"- **B**: `{diff.b}`", "",
           f"{s['changed']} ops changed verdict, {s['only_a']} are only in A, {s['only_b']} only in B, "
           f"{s['unchanged']} are unchanged.", ""]
    transitions = diff.transitions()
    if transitions:
        out += [_table(("A → B", "ops"), [[t.replace("->", " → "), n] for t, n in transitions.items()]), ""]
    for title, changes in (("Verdict changed", diff.changes), ("Only in A", diff.only_a), ("Only in B", diff.only_b)):
        out += [f"## {title} ({len(changes)})", ""]
        out += [_table(("A → B", "op", detail, where), _rows(changes)) if changes else "None.", ""]
    fields = [("environment", f) for f in diff.environment] + [("settings", f) for f in diff.settings]
    out += ["## What differs between the two setups", ""]
    if fields:
        out += [_table(("", "field", "A", "B"),
                       [[k, f.name, "-" if f.before is None else f"`{f.before}`",
                         "-" if f.after is None else f"`{f.after}`"] for k, f in fields]), ""]
    else:
        out += ["Nothing: same environment fingerprint and settings.", ""]
    return "\n".join(out)
