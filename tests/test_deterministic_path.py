"""What deterministic mode really runs: a second recording under use_deterministic_algorithms(True)."""

from __future__ import annotations

import os

import torch
from conftest import ROOT

from opaudit.cli.main import main
from opaudit.data.report import load

DET_BRANCH = os.path.join(ROOT, "tests", "fixtures", "scripts", "det_branch.py")


def _report(tmp_path, capsys, *flags):
    out = tmp_path / "r.yaml"
    code = main([DET_BRANCH, "--reps", "1", "-o", str(out), *flags])
    _, err = capsys.readouterr()
    assert code == 1, err
    return load(str(out)), err


def test_the_crash_list_comes_from_what_deterministic_mode_runs(tmp_path, capsys):
    report, err = _report(tmp_path, capsys)
    # put_ raises under strict mode, but deterministic mode never calls it; max_unpool (only on
    # the deterministic path) does crash it.
    assert [f.op for f in report.crashes()] == ["aten.max_unpool2d.default"]
    assert report.finding("aten.put_.default").recorded_in == ("default",)
    assert report.finding("aten.max_unpool2d.default").recorded_in == ("deterministic",)
    # An op only the deterministic path calls is audited too.
    index_add = report.finding("aten.index_add.default")
    assert index_add.recorded_in == ("deterministic",) and index_add.default_diverged
    assert report.finding("aten.randperm.default").recorded_in == ("default", "deterministic")
    assert "Not crashes: aten.put_.default" in err
    assert report.settings["deterministic_pass"] is True
    assert not torch.are_deterministic_algorithms_enabled()


def test_without_the_second_recording_the_default_path_is_all_there_is(tmp_path, capsys):
    report, _ = _report(tmp_path, capsys, "--no-deterministic-pass")
    assert [f.op for f in report.crashes()] == ["aten.put_.default"]
    assert "aten.max_unpool2d.default" not in {f.op for f in report.all_findings}
    assert all(f.recorded_in == () for f in report.all_findings)


def _branching_step(calls: list[bool]):
    """The fixture's branch as a Python-API step: put_ by default, max_unpool + index_add in deterministic mode."""
    from torch.nn import functional as F

    def step():
        calls.append(torch.are_deterministic_algorithms_enabled())
        g = torch.Generator().manual_seed(0)
        x, idx, out = torch.randn(16, generator=g), torch.randperm(16, generator=g), torch.zeros(16)
        if torch.are_deterministic_algorithms_enabled():
            pooled, where = F.max_pool1d(x.view(1, 1, -1), 2, return_indices=True)
            out = out + F.max_unpool1d(pooled, where, 2).view(-1)
            return out.index_add(0, idx, x)
        return out.put_(idx, x)

    return step


def test_the_python_api_records_deterministic_mode_when_asked():
    import opaudit

    calls: list[bool] = []
    report = opaudit.audit(_branching_step(calls), reps=1, deterministic_pass=True)
    assert calls == [True, False]  # called twice: deterministic mode first
    assert [f.op for f in report.crashes()] == ["aten.max_unpool2d.default"]
    assert report.finding("aten.put_.default").recorded_in == ("default",)
    assert report.finding("aten.index_add.default").recorded_in == ("deterministic",)
    assert report.settings["deterministic_pass"] is True
    assert not torch.are_deterministic_algorithms_enabled()

    calls.clear()
    report = opaudit.audit(_branching_step(calls), reps=1)
    assert calls == [False]  # by default fn runs once
    assert [f.op for f in report.crashes()] == ["aten.put_.default"]
    assert "deterministic_pass" not in report.settings
