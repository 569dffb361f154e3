"""What deterministic mode really runs: a second, light recording under use_deterministic_algorithms(True)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import ROOT

from opaudit.aten.tensors import Snapshot
from opaudit.cli.main import main
from opaudit.data.report import load
from opaudit.data.verdict import Verdict
from opaudit.engine.optraits import live_op
from opaudit.engine.replay import NOT_REGISTERED, replay, run_in_modes

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
    # The calls of signatures only the deterministic path made are counted too.
    assert report.total_calls == sum(f.calls for f in report.all_findings)
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
    assert calls == [False, True]  # called twice: deterministic mode second
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


def test_deterministic_mode_is_recorded_as_strict_mode_runs_it():
    """Code can read ``warn_only`` too (on CUDA, ``scaled_dot_product_attention`` choosing its kernel): the
    deterministic-mode recording runs what ``use_deterministic_algorithms(True)`` runs, and an op strict mode
    refuses there still runs, and is recorded as called."""
    import opaudit

    def step():
        x = torch.arange(12.0)
        if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
            torch.cumsum(x, 0)
        else:
            x.sum()
        torch.zeros(100).put_(torch.tensor([3, 3]), torch.tensor([1.0, 2.0]))  # strict mode refuses it

    report = opaudit.audit(step, reps=1, deterministic_pass=True)
    assert report.finding("aten.cumsum.default").recorded_in == ("deterministic",)
    assert report.finding("aten.sum.default").recorded_in == ("default",)
    put = report.finding("aten.put_.default")
    assert put.recorded_in == ("default", "deterministic") and put.verdict is Verdict.RAISES
    assert [f.op for f in report.crashes()] == ["aten.put_.default"]
    assert not torch.are_deterministic_algorithms_enabled()
    assert not any("turned on torch.use_deterministic_algorithms" in w for w in report.env_warnings)


DET_BRANCH_TRAIN = os.path.join(ROOT, "tests", "fixtures", "scripts", "det_branch_train.py")


def test_deterministic_mode_is_recorded_over_the_next_steps_of_the_same_run(tmp_path, capsys, monkeypatch):
    strict = torch.are_deterministic_algorithms_enabled()  # an earlier test's script may have left it on
    loads = tmp_path / "loads.txt"
    monkeypatch.setenv("LOADS", str(loads))
    out = tmp_path / "r.yaml"
    code = main([DET_BRANCH_TRAIN, "--steps", "2", "--reps", "1", "-o", str(out)])
    _, err = capsys.readouterr()
    assert code == 1, err
    assert loads.read_text() == "loaded\n"  # the script ran once: no second load for deterministic mode
    assert "recorded steps 1-2 of the script, then steps 3-4 in deterministic mode; stopped it there" in err
    report = load(str(out))
    assert [f.op for f in report.crashes()] == ["aten.max_unpool2d.default"]
    assert report.finding("aten.put_.default").recorded_in == ("default",)
    assert report.finding("aten.max_unpool2d.default").recorded_in == ("deterministic",)
    assert report.finding("aten.index_add.default").recorded_in == ("deterministic",)
    assert report.finding("aten.randperm.default").recorded_in == ("default", "deterministic")
    # Built once, before the window's steps: the steps after it cannot say whether deterministic mode calls it.
    ones = report.finding("aten.ones.default")
    assert ones.phases == ("setup",) and ones.recorded_in == () and ones.deterministic_path
    assert report.settings["deterministic_pass"] is True
    assert torch.are_deterministic_algorithms_enabled() == strict


LIBRARY = """
import torch

lib = torch.library.Library("{ns}", "DEF")
lib.define("shift(Tensor x) -> Tensor")
lib.impl("shift", lambda x: x + 0.5, "CPU")

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range({steps}):
    x = torch.ops.{ns}.shift(torch.randn(8, 4))
    model(x).pow(2).mean().backward()
    if {steps} > 1:
        opt.step()
"""


def test_a_script_that_defines_its_own_ops_is_loaded_once(tmp_path, capsys):
    """Issue 22 item 5: torch.library.Library(ns, "DEF") twice in one process fails; the script is loaded once."""
    script = tmp_path / "custom.py"
    script.write_text(LIBRARY.format(ns="opaudit_lib_loop", steps=10))
    out = tmp_path / "r.yaml"
    code = main([str(script), "--reps", "1", "-o", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "deterministic mode failed" not in err
    report = load(str(out))
    assert report.settings["deterministic_pass"] is True
    shift = report.finding("opaudit_lib_loop.shift.default")
    assert shift.recorded_in == ("default", "deterministic") and shift.verdict is Verdict.STABLE


def test_a_script_without_steps_that_defines_its_own_ops_is_audited_without_the_second_recording(tmp_path, capsys):
    # No optimizer step: deterministic mode needs a second load, which the library refuses. The audit goes on.
    script = tmp_path / "custom.py"
    script.write_text(LIBRARY.format(ns="opaudit_lib_once", steps=1))
    out = tmp_path / "r.yaml"
    code = main([str(script), "--reps", "1", "-o", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "opaudit: warning: the run in deterministic mode failed (the script raised RuntimeError" in err
    report = load(str(out))
    assert report.settings["deterministic_pass"] is False
    assert report.finding("opaudit_lib_once.shift.default").recorded_in == ()


CUSTOM_OP = """
import torch

@torch.library.custom_op("{ns}::halve", mutates_args=())
def halve(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5

torch.manual_seed(0)
print(float(torch.ops.{ns}.halve(torch.randn(64)).sum()))
"""


def test_a_script_without_steps_that_defines_a_custom_op_is_loaded_twice_and_its_op_replayed(tmp_path, capsys):
    # custom_op lets the second load register the op again: the deterministic pass runs, and the
    # replay calls the op's live registration (the recorded overload's schema is freed).
    script = tmp_path / "custom.py"
    script.write_text(CUSTOM_OP.format(ns="opaudit_twice_script"))
    out = tmp_path / "r.yaml"
    code = main([str(script), "--reps", "2", "-o", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    report = load(str(out))
    assert report.settings["deterministic_pass"] is True
    halve = report.finding("opaudit_twice_script.halve.default")
    assert halve.recorded_in == ("default", "deterministic") and halve.verdict is Verdict.STABLE


class _Stale(torch._ops.OpOverload):
    """What a recorded overload is once its registration was destroyed: calling it is a bug."""

    def __init__(self, recorded) -> None:
        self._schema, self._overloadname, self._name = recorded._schema, recorded._overloadname, recorded._name

    def __call__(self, *args, **kwargs):
        raise AssertionError("the recorded overload was called, not the live one")


def test_an_op_registered_again_is_replayed_through_its_live_registration():
    def define(scale: float):
        @torch.library.custom_op("opaudit_twice::scale", mutates_args=())
        def scale_op(x: torch.Tensor) -> torch.Tensor:
            return x * scale

        return torch.ops.opaudit_twice.scale.default

    first = define(2.0)
    assert live_op(first) is first and live_op(torch.ops.aten.mm.default) is torch.ops.aten.mm.default
    second = define(3.0)  # destroys the first registration
    assert second is not first and live_op(first) is second
    x = torch.arange(4.0)
    stale = _Stale(first)
    assert str(stale) == str(first) and live_op(stale) is second
    observed = replay(stale, Snapshot((x,), {}), reps=2)
    assert observed.error is None and observed.default.runs == 2 and not observed.default.diverges
    runs, _ = run_in_modes(stale, Snapshot((x,), {}))
    assert torch.equal(runs["default"].outputs[0], x * 3.0) and torch.equal(runs["deterministic"].outputs[0], x * 3.0)


LET_GO = """
import torch

def main():
    lib = torch.library.Library("opaudit_let_go", "DEF")
    lib.define("shift(Tensor x) -> Tensor")
    lib.impl("shift", lambda x: x + 0.5, "CPU")
    return torch.ops.opaudit_let_go.shift(torch.ones(8)).sum() + torch.ones(3).sum()

print(float(main()))
"""


def test_an_op_whose_library_the_script_let_go_of_is_skipped_not_called(tmp_path):
    # The library lives in main()'s frame only: by replay time its op is gone, and calling the
    # recorded overload would run freed memory (a segfault before live_op).
    script = tmp_path / "let_go.py"
    script.write_text(LET_GO)
    out = tmp_path / "r.yaml"
    proc = subprocess.run([sys.executable, "-m", "opaudit.cli", str(script), "--reps", "1", "-o", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = load(str(out))
    shift = report.finding("opaudit_let_go.shift.default")
    assert shift.verdict is Verdict.SKIPPED and NOT_REGISTERED in shift.reason
    assert report.finding("aten.sum.default").verdict is Verdict.STABLE
