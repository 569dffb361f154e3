"""Phase labels (issue 13, item 11): setup, data, forward, backward and optimizer, as users name them."""

from __future__ import annotations

import os

import yaml
from conftest import ROOT

from opaudit.cli.main import main

SCRIPTS = os.path.join(ROOT, "tests", "fixtures", "scripts")


def _report(tmp_path, capsys, script: str, *argv: str) -> tuple[int, dict]:
    path = tmp_path / "r.yaml"
    code = main([os.path.join(SCRIPTS, script), "--no-timing", "--reps", "1", "-o", str(path), "-q", *argv])
    capsys.readouterr()
    assert path.exists()
    return code, yaml.safe_load(path.read_text())


def _phases(report: dict, op: str, line: int | None = None) -> set[tuple[str, ...]]:
    """The phase tuples of ``op``'s findings (those first seen at ``line``, when given)."""
    return {tuple(f["phases"]) for f in report["findings"]
            if f["op"] == op and (line is None or f["sites"][0]["line"] == line)}


def test_a_plain_training_loop_has_setup_data_forward_backward_and_optimizer(tmp_path, capsys):
    _, report = _report(tmp_path, capsys, "train_loop.py", "--", "--steps", "2")
    # Line 40 builds the model (its initialisation draws), line 46 iterates the DataLoader
    # (base seed, collate), the dataset's __getitem__ draws the items.
    assert _phases(report, "aten.uniform_.default") == {("setup",)}
    assert _phases(report, "aten.random_.default", 46) == {("data",)}
    assert _phases(report, "aten.stack.default", 46) == {("data",)}
    assert _phases(report, "aten.randn.generator") == {("data",)}
    assert _phases(report, "aten.addmm.default") == {("forward",)}
    assert _phases(report, "aten.mm.default") == {("backward",)}
    assert _phases(report, "aten.ones_like.default", 49) == {("backward",)}  # loss.backward()'s gradient seed
    assert _phases(report, "aten.addcdiv_.default") == {("optimizer",)}
    # The DataLoader entry points the data phase wraps are torch's own again.
    from torch.utils.data import dataloader

    for cls, name in ((dataloader.DataLoader, "__iter__"), (dataloader._BaseDataLoaderIter, "__next__")):
        assert not hasattr(cls.__dict__[name], "__wrapped__")


def test_lbfgs_closure_runs_forward_and_backward_not_optimizer(tmp_path, capsys):
    _, report = _report(tmp_path, capsys, "lbfgs_closure.py")
    assert _phases(report, "aten.addmm.default") == {("forward",)}
    assert _phases(report, "aten.tanh.default") == {("forward",)}
    assert _phases(report, "aten.mse_loss.default") == {("forward",)}
    assert _phases(report, "aten.mm.default") == {("backward",)}
    # LBFGS's own arithmetic (the two-loop recursion, the parameter update) is the optimizer's.
    assert ("optimizer",) in _phases(report, "aten.add_.Tensor")
    assert _phases(report, "aten.dot.default") == {("optimizer",)}


def test_lightning_deterministic_trainer_gets_its_raising_op_and_closure_phases(tmp_path, capsys, recwarn):
    # Trainer(deterministic=True) turns strict mode on; automatic optimization runs
    # training_step inside optimizer.step's closure.
    code, report = _report(tmp_path, capsys, "lightning_strict.py")
    assert code == 1
    raising = [(f["op"], f["sites"][0]["line"], f["phases"]) for f in report["findings"] if f["verdict"] == "raises"]
    assert raising == [("aten.max_unpool2d.default", 23, ["forward"])]
    assert _phases(report, "aten.addmm.default", 21) == {("forward",)}
    assert _phases(report, "aten.max_pool2d_with_indices_backward.default") == {("backward",)}
    assert {p for f in report["findings"] if f["op"] == "aten.mul_.Tensor" for p in f["phases"]} == {"optimizer"}
    assert _phases(report, "aten.uniform_.default", 17) == {("setup",)}
    # The refused op ran without its C++ warn_only warning (which would print once per call).
    assert not [w for w in recwarn if "does not have a deterministic implementation" in str(w.message)]


def test_data_made_before_the_first_module_is_setup(tmp_path, capsys):
    """Issue 21 item 5: a tensor above the model, a Dataset's ``__init__``, ``randint`` in ``main()``."""
    _, report = _report(tmp_path, capsys, "data_first.py")
    assert _phases(report, "aten.randn.default", 9) == {("setup",)}
    assert _phases(report, "aten.rand.default", 14) == {("setup",)}  # in Dataset.__init__
    assert _phases(report, "aten.randint.low", 15) == {("setup",)}
    assert _phases(report, "aten.randint.low", 25) == {("setup",)}  # in main()
    assert _phases(report, "aten.uniform_.default", 27) == {("setup",)}  # the Linear's initialisation
    assert _phases(report, "aten.stack.default") == {("data",)}
    assert _phases(report, "aten.addmm.default") == {("forward",)}
    assert _phases(report, "aten.index.Tensor") == {("forward",)}
    assert _phases(report, "aten.mm.default") == {("backward",)}


def test_a_window_after_start_step_has_no_setup(tmp_path, capsys):
    """A window that opens mid-run (after step 1) never saw the run start: nothing in it is setup."""
    _, report = _report(tmp_path, capsys, "train_loop.py", "--start-step", "1", "--steps", "1", "--",
                        "--steps", "3", "--log", str(tmp_path / "log.txt"))
    # ``loss.item()`` for the log (line 53) runs after step 1's optimizer.step(), before step 2's forward.
    assert not [f for f in report["findings"] if "setup" in f["phases"]]
    assert "forward" in _phases(report, "aten._local_scalar_dense.default").pop()
    assert _phases(report, "aten.addmm.default") == {("forward",)}
