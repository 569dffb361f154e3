"""The audit run (opaudit.flows.run): one object records, replays and tears down, whoever calls it."""

from __future__ import annotations

import textwrap

import torch

from opaudit.engine import loader
from opaudit.engine.window import window_for
from opaudit.flows.run import INFO, AuditRun, Hooks, RunOptions

STEP = """
    import torch

    def opaudit_step():
        x = torch.arange(12.0).reshape(3, 4)
        return (x @ x.T).sum()
"""


class _Heard(Hooks):
    def __init__(self):
        self.said, self.replayed_ops = [], []

    def say(self, kind, text):
        self.said.append((kind, text))

    def replayed(self, progress):
        self.replayed_ops.append(progress.op)


def _target(tmp_path):
    path = tmp_path / "step.py"
    path.write_text(textwrap.dedent(STEP))
    return loader.load_target(str(path))


def test_a_run_records_without_replaying_and_lets_go_of_its_captures_when_closed(tmp_path):
    target = _target(tmp_path)
    heard = _Heard()
    with AuditRun(RunOptions(reps=1), root=target.root, hooks=heard) as run:
        recorded = run.record_target(target, window_for(entry=True))
        assert recorded.span == "call 1"
        held = [snap for _, _, snap in run.recorder.items() if snap is not None]
        assert held and run.deterministic is not None
        assert heard.replayed_ops == []  # recorded, not replayed
    assert all(snap is None for _, _, snap in run.recorder.items())
    assert run.recorder.captured_bytes == 0 and run.deterministic.captured_bytes == 0
    assert (INFO, "recorded call 1 of opaudit_step, then call 2 in deterministic mode") in heard.said


def test_a_run_reports_what_it_recorded_with_its_settings(tmp_path):
    target = _target(tmp_path)
    heard = _Heard()
    strict = torch.are_deterministic_algorithms_enabled()  # an earlier test's script may have left it on
    with AuditRun(RunOptions(reps=1, timings=False), root=target.root, hooks=heard) as run:
        run.record_target(target, window_for(entry=True))
        report = run.report()
    assert "aten.mm.default" in heard.replayed_ops
    assert report.complete
    assert {k: report.settings[k] for k in ("script", "entry", "recorded", "deterministic_pass", "timing")} == {
        "script": "step.py", "entry": "opaudit_step", "recorded": "call 1", "deterministic_pass": True,
        "timing": False}
    assert torch.are_deterministic_algorithms_enabled() == strict
