"""The framework-free half of the callbacks: record a window of optimizer steps, then write a report.

A framework tells :class:`StepAudit` when a step begins and ends, with the
number of optimizer steps completed so far; the audit records steps
``start_step + 1`` to ``start_step + steps`` and, when the last one ends (or
training ends first), replays what it recorded and writes the report
atomically. Training then goes on, unrecorded.
"""

from __future__ import annotations

import os
import warnings

from opaudit.cli.formats import Format, Kind, render
from opaudit.data.errors import OpauditError
from opaudit.data.files import atomic_write
from opaudit.data.report import Report
from opaudit.engine.record import DEFAULT_CAPTURE_BUDGET
from opaudit.engine.window import DEFAULT_STEPS, Recorded, Window, WindowError
from opaudit.flows.pipeline import DEFAULT_REPS
from opaudit.flows.run import AuditRun, RunOptions


class IntegrationError(OpauditError, ValueError):
    """A callback was given options it cannot work with (an unwritable output, a bad window)."""


def checked_output(path: str | os.PathLike[str]) -> str:
    """``path`` made absolute, if a report can be written there; else :class:`IntegrationError`.

    Checked when the callback is built, before any training step, so that a bad
    path costs nothing and no report is lost at the end of a long run.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise IntegrationError(f"cannot write the opaudit report to {path}: it is a directory")
    if not os.path.isdir(parent):
        raise IntegrationError(f"cannot write the opaudit report to {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise IntegrationError(f"cannot write the opaudit report to {path}: permission denied")
    return path


class StepAudit:
    """Records optimizer steps ``start_step + 1 .. start_step + steps`` and writes their audit to ``output``."""

    def __init__(self, output: str | os.PathLike[str], *, steps: int = DEFAULT_STEPS, start_step: int = 0,
                 reps: int = DEFAULT_REPS, seed: int = 0, format: str | None = None,
                 capture_budget: int = DEFAULT_CAPTURE_BUDGET, framework: str = "") -> None:
        try:
            self.window = Window(steps=steps, start=start_step)
        except WindowError as e:
            raise IntegrationError(str(e)) from None
        if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
            raise IntegrationError(f"reps must be a positive integer, got {reps!r}")
        self.output = checked_output(output)
        try:
            self.format = Format.parse(format) if format else Format.from_path(self.output)
        except ValueError as e:
            raise IntegrationError(str(e)) from None
        self.options = RunOptions(reps=reps, seed=seed, capture_budget=capture_budget, deterministic_pass=False)
        self.framework = framework
        self.report: Report | None = None
        """The audit, once written."""
        self._run: AuditRun | None = None
        self._first = 0
        self._last = 0

    @property
    def recording(self) -> bool:
        """Whether steps are being recorded now."""
        return self._run is not None

    def step_begins(self, completed: int) -> None:
        """A step begins, ``completed`` optimizer steps into training: open the window at its start."""
        if self._run is None and self.report is None and completed == self.window.start:
            self._run = AuditRun(self.options, root=os.getcwd())
            self._first = completed + 1
            self._run.begin(mid_run=True)  # the model was built and run before: nothing here is setup

    def step_ends(self, completed: int) -> None:
        """A step ended (``completed`` optimizer steps so far): after the window's last, write the audit."""
        if self._run is None:
            return
        self._last = completed
        if self.window.steps is not None and completed >= self.window.start + self.window.steps:
            self._finish(stopped="steps")

    def training_ends(self, completed: int) -> None:
        """Training is over: write what was recorded, or warn that the window never opened."""
        if self._run is not None:
            self._last = max(self._last, completed)
            self._finish(stopped=None)
        elif self.report is None:
            warnings.warn(f"opaudit: training ended after {completed} optimizer step(s), before start step "
                          f"{self.window.start}: nothing was recorded and {self.output} was not written",
                          RuntimeWarning, stacklevel=2)

    def close(self) -> None:
        """Stop recording without writing anything (training failed)."""
        run, self._run = self._run, None
        if run is not None:
            run.close()

    def _finish(self, stopped: str | None) -> None:
        run, self._run = self._run, None
        assert run is not None
        with run:
            run.end()
            recorded = Recorded("step", self._first, self._last, stopped)
            self.report = run.report({"recorded": recorded.span, "integration": self.framework})
        atomic_write(self.output, render(self.report, Kind.REPORT, self.format))
