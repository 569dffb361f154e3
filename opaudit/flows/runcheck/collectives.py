"""The collective calls of a whole-step check, for a rank of a torchrun job.

Under torchrun every rank runs its own run check (:mod:`opaudit.flows.runcheck`).
To say afterwards which rank diverged first and through which collective the
difference spread (:mod:`opaudit.flows.distributed.runchecks`), each rank keeps,
for every collective call its runs made, whether its inputs and its outputs
differed run to run, and how many collective calls came before its root cause.

The tracer waits for each collective to finish before digesting its outputs
(:func:`opaudit.engine.tracer.settle`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opaudit.aten.ops import is_collective

MAX_LISTED = 20
"""Differing collective calls listed per check: the first ones tell how a difference spread."""

Call = tuple[int, bool, bool]
"""``(position in run 1, inputs differ, outputs differ)`` of one collective call."""


def aligned_calls(first: Sequence[tuple[int, Any]], other: Sequence[Any]) -> tuple[Call, ...]:
    """The collective calls among two runs' aligned ops (run 1's ``(position, step)``, the other run's
    step), each with whether its inputs and its outputs differed. Steps have ``func``, ``ins``, ``outs``."""
    return tuple((i, a.ins != b.ins, a.outs != b.outs)
                 for (i, a), b in zip(first, other) if is_collective(a.func))


def summary(steps: Sequence[Any], location: Callable[[int], str], comparisons: Sequence[Sequence[Call]],
            root_cause: dict[str, Any] | None) -> dict[str, Any] | None:
    """Run 1's collective calls (``calls``), the first that differed in any later run
    (``differing``: call number, op position, op, site, inputs/outputs differ), and
    ``before_root_cause``: the collective calls made before the root-cause op, which
    places it in the timeline every rank shares (``root_cause_call`` when the root
    cause is itself a collective). ``None`` when the step made no collective call.
    """
    calls = [i for i, s in enumerate(steps) if s.outs is not None and is_collective(s.func)]
    if not calls:
        return None
    number = {i: k for k, i in enumerate(calls, 1)}
    flags: dict[int, list[bool]] = {}
    for comparison in comparisons:
        for i, ins, outs in comparison:
            seen = flags.setdefault(i, [False, False])
            seen[0], seen[1] = seen[0] or ins, seen[1] or outs
    differing = [{"call": number[i], "index": i + 1, "op": str(steps[i].func), "where": location(i),
                  "inputs_differ": f[0], "outputs_differ": f[1]}
                 for i, f in sorted(flags.items()) if f[0] or f[1]]
    out: dict[str, Any] = {"calls": len(calls), "differing": differing[:MAX_LISTED]}
    if len(differing) > MAX_LISTED:
        out["differing_not_listed"] = len(differing) - MAX_LISTED
    if root_cause is not None:
        root = root_cause["index"] - 1
        out["before_root_cause"] = sum(1 for i in calls if i < root)
        if root in number:
            out["root_cause_call"] = number[root]
    return out
