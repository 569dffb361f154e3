"""Terminal diff: what changed verdict, what is on one side only, and the fingerprint fields that differ."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opaudit.flows.diff import Change, Diff

MAX_ROWS = 60


def _rows(changes: "tuple[Change, ...]") -> list[list[str]]:
    return [[c.transition, c.op, c.detail if len(c.detail) <= 60 else c.detail[:59] + "…", c.where]
            for c in changes]


def _value(v: Any) -> str:
    return "-" if v is None else str(v)


def render(diff: "Diff") -> str:
    """Plain-text tables (tabulate) for a terminal."""
    from tabulate import tabulate

    out = [f"{diff.kind} diff: A = {diff.a}, B = {diff.b}"]
    detail = "dtype/variant" if diff.kind == "catalog" else "signature"
    where = "OpInfo entry" if diff.kind == "catalog" else "where"
    for title, changes in (("verdict changed", diff.changes), ("only in A", diff.only_a), ("only in B", diff.only_b)):
        if not changes:
            continue
        out.append(f"\n{title} ({len(changes)}):")
        out.append(tabulate(_rows(changes[:MAX_ROWS]), headers=("A->B", "op", detail, where), tablefmt="simple"))
        if len(changes) > MAX_ROWS:
            out.append(f"... {len(changes) - MAX_ROWS} more (use --format csv or -o diff.yaml for all)")
    for title, fields in (("environment differences", diff.environment), ("settings differences", diff.settings)):
        if fields:
            out.append(f"\n{title}:")
            out.append(tabulate([[f.name, _value(f.before), _value(f.after)] for f in fields],
                                headers=("field", "A", "B"), tablefmt="simple"))
    s = diff.summary
    out.append(f"\n{s['changed']} changed, {s['only_a']} only in A, {s['only_b']} only in B, "
               f"{s['unchanged']} unchanged")
    return "\n".join(out) + "\n"
