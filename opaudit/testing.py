"""Assertions for a project's own test suite: fail a test when a model gains a nondeterministic op.

    import opaudit.testing

    def test_training_step_is_deterministic():
        opaudit.testing.assert_deterministic(train_step, reps=3)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opaudit.data.report import Finding, Report
from opaudit.data.verdict import Verdict

if TYPE_CHECKING:
    from opaudit.data.invariance import BatchInvariance, RowCheck


class NondeterminismFound(AssertionError):
    """A test's audited function has findings at or above the threshold."""

    def __init__(self, findings: list[Finding]) -> None:
        lines = [f"{len(findings)} nondeterministic op signature(s):"]
        for f in findings:
            where = f.locations[0] if f.locations else "?"
            lines.append(f"  {f.verdict.value:<22} {f.op} at {where} ({'/'.join(f.phases)})"
                         f"{' - ' + f.remedy if f.remedy else ''}")
        super().__init__("\n".join(lines))
        self.findings = findings


def check(report: Report, at_least: Verdict | str = Verdict.DIVERGES, allow: tuple[str, ...] = ()) -> None:
    """Raise :class:`NondeterminismFound` for findings at or above ``at_least`` not in ``allow`` (op names)."""
    bad = [f for f in report.findings(at_least=at_least) if f.op not in allow]
    if bad:
        raise NondeterminismFound(bad)


def assert_deterministic(fn: Callable[..., Any], *args: Any, at_least: Verdict | str = Verdict.DIVERGES,
                         allow: tuple[str, ...] = (), reps: int = 3, **kwargs: Any) -> Report:
    """Audit ``fn(*args, **kwargs)`` and fail if any op is at or above ``at_least``.

    ``allow`` lists op names accepted as known (e.g. ``("aten.index_put.default",)``).
    Returns the report so that a test can assert more.
    """
    from opaudit.flows.run import audit

    report = audit(fn, *args, reps=reps, **kwargs)
    check(report, at_least, allow)
    return report


class BatchVarianceFound(AssertionError):
    """A test's forward gave a row other bits when the batch had another size."""

    def __init__(self, result: "BatchInvariance", failing: list["RowCheck"]) -> None:
        lines = [f"not batch-invariant (batch of {result.batch_size} rows along dim {result.dim}):"]
        for c in failing:
            rc = c.root_cause
            cause = "no op turned identical input rows into different output rows"
            if rc:
                cause = (f"root cause {rc.get('op')} at {rc.get('where', '?')} ({rc.get('module') or '-'}), "
                         f"max |diff| {float(rc.get('max_abs_diff') or 0):.3g}")
            elif c.path_split:
                cause = f"the runs took different paths at op #{c.path_split.get('index')}"
            lines.append(f"  {c.rows} row(s): {'; '.join(c.mismatches) or 'outputs differ'}; {cause}")
        remedies = {o.op: o.remedy for o in result.variant_ops() if o.remedy}
        for c in failing:
            op = (c.root_cause or {}).get("op")
            if op in remedies:
                lines.append(f"  what to do about {op}: {remedies.pop(op)}")
        super().__init__("\n".join(lines))
        self.result = result


def assert_batch_invariant(forward: Callable[[Any], Any], batch: Any, sizes: tuple[int, ...] = (1, 2, 3),
                           dim: int = 0, allow: tuple[str, ...] = ()) -> "BatchInvariance":
    """Fail unless ``forward(batch[:b])`` is bitwise ``forward(batch)[:b]`` for every ``b`` in ``sizes``.

    ``allow`` lists op names accepted as known causes (e.g. ``("aten.addmm.default",)``):
    a row count whose root cause is one of them does not fail. Returns the
    :class:`~opaudit.data.invariance.BatchInvariance` so that a test can assert more.
    """
    from opaudit.flows.batchinv import batch_invariance

    result = batch_invariance(forward, batch, sizes, dim)
    failing = [c for c in result.checks
               if not c.invariant and not (c.root_cause and c.root_cause.get("op") in allow)]
    if failing:
        raise BatchVarianceFound(result, failing)
    return result
