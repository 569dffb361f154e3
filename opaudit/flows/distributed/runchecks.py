"""``--run-check`` across ranks: each rank's whole-step checks merged, and where a difference began.

Every rank runs its step K times per mode, as a single process does
(:mod:`opaudit.flows.runcheck`); its root cause is the first op, in that rank's
own execution order, whose outputs differed while its inputs had not. A rank
that only received a difference finds its root cause in a collective (its
inputs were identical there, its outputs were not). Pure data, on rank 0:

* **diverged first**: the rank whose root cause comes earliest in the timeline
  all ranks share, the sequence of collective calls. An op between collective
  calls ``c`` and ``c+1`` comes before collective call ``c+1`` itself; ties go
  to the lower op position, then the lower rank;
* **spread through**: the first collective call whose input differed (run to
  run) on some rank while its output differed on every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from opaudit.data.report import RunCheck


def _timeline(rc: RunCheck) -> tuple[int, int] | None:
    """Where ``rc``'s root cause sits among the collective calls: ``(2*calls before it + is a collective,
    op position)``; ``None`` when the check found no root cause."""
    if rc.root_cause is None:
        return None
    coll = rc.collectives or {}
    before = int(coll.get("before_root_cause", 0))
    return 2 * before + (1 if "root_cause_call" in coll else 0), int(rc.root_cause.get("index", 0))


def _first_diverged(checks: Mapping[int, RunCheck]) -> dict[str, Any] | None:
    placed = [(t, r) for r, rc in checks.items() if (t := _timeline(rc)) is not None]
    if not placed:
        return None
    _, rank = min(placed)
    rc = checks[rank]
    rcause = rc.root_cause or {}
    coll = rc.collectives or {}
    out: dict[str, Any] = {"rank": rank, "index": rcause.get("index"), "op": rcause.get("op")}
    if rcause.get("where"):
        out["where"] = rcause["where"]
    out["inputs_identical"] = bool(rcause.get("inputs_identical", True))
    if "root_cause_call" in coll:
        out["collective_call"] = coll["root_cause_call"]
        out["note"] = ("its root cause is a collective whose inputs were identical on that rank: no rank diverged "
                       "before it, the collective itself gave different bits")
    else:
        out["before_collective_call"] = int(coll.get("before_root_cause", 0)) + 1
    others = sorted(r for _, r in placed if r != rank and "root_cause_call" not in (checks[r].collectives or {}))
    if others:
        out["also_diverged_on_their_own"] = others  # root causes that are not collectives: local ops of theirs
    return out


def _spread(checks: Mapping[int, RunCheck]) -> dict[str, Any] | None:
    """The first collective call whose input differed on some rank and whose output differed on all."""
    by_call: dict[int, dict[int, dict[str, Any]]] = {}
    for r, rc in checks.items():
        for c in (rc.collectives or {}).get("differing", ()):
            by_call.setdefault(int(c["call"]), {})[r] = c
    ranks = sorted(checks)
    for call in sorted(by_call):
        at = by_call[call]
        inputs = [r for r in ranks if at.get(r, {}).get("inputs_differ")]
        if inputs and all(at.get(r, {}).get("outputs_differ") for r in ranks):
            first = at[inputs[0]]
            return {"call": call, "op": first["op"], "where": first.get("where", ""),
                    "inputs_differed_on": inputs, "outputs_differed_on": ranks,
                    "index_on_rank": {str(r): at[r]["index"] for r in ranks}}
    return None


def merge_run_checks(per_rank: Mapping[int, Sequence[RunCheck]]) -> tuple[tuple[RunCheck, ...], list[dict[str, Any]]]:
    """Every rank's checks (each tagged with its rank; by mode, then rank) and, per mode, the cross-rank
    summary: which ranks reproduced, which diverged first, the collective the difference spread through."""
    modes = list(dict.fromkeys(rc.mode for r in sorted(per_rank) for rc in per_rank[r]))
    merged: list[RunCheck] = []
    summary: list[dict[str, Any]] = []
    for mode in modes:
        checks = {r: rc for r in sorted(per_rank) for rc in per_rank[r] if rc.mode == mode}
        merged += [dataclasses.replace(rc, rank=r) for r, rc in checks.items()]
        entry: dict[str, Any] = {
            "mode": mode,
            "reproducible_on": [r for r, rc in checks.items() if rc.reproducible],
            "not_reproducible_on": [r for r, rc in checks.items() if not rc.reproducible],
        }
        first = _first_diverged(checks)
        if first is not None:
            entry["diverged_first"] = first
        spread = _spread(checks)
        if spread is not None:
            entry["spread_through"] = spread
        summary.append(entry)
    return tuple(merged), summary
