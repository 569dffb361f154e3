"""Assertions for a project's own test suite: fail a test when a model gains a nondeterministic op.

    import opaudit.testing

    def test_training_step_is_deterministic():
        opaudit.testing.assert_deterministic(train_step, reps=3)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opaudit.data.report import Finding, Report
from opaudit.data.verdict import Verdict


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
    from opaudit.flows.pipeline import audit

    report = audit(fn, *args, reps=reps, **kwargs)
    check(report, at_least, allow)
    return report
