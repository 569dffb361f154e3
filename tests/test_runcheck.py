"""The whole-step reproducibility check (``--run-check``), on real ops and real scripts."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from conftest import EXAMPLES

from opaudit.cli.formats.common import run_check_lines
from opaudit.cli.main import main
from opaudit.data.report import Report, from_dict
from opaudit.engine import loader
from opaudit.flows.runcheck import DEFAULT, DETERMINISTIC, RunCheckError, run_check, run_checks

RECOMMENDER = os.path.join(EXAMPLES, "recommender.py")


def _script(tmp_path, body, name="step.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return loader.load_target(str(p))


def _line_of(path, text):
    with open(path, encoding="utf-8") as f:
        return next(i for i, line in enumerate(f, 1) if text in line)


# A table lookup whose backward adds 3.2M wide-range values into 512 slots with
# ``index_put(accumulate=True)``: on 2 threads the adds race, and the sum's bits
# change from run to run. With two busy processes beside the suite two runs still
# matched in up to 2 of 30 pairs (scripts/race_rate.py): a check that wants the race
# runs 5 times (4 later runs all matching the first: about 1 in 50,000).
COLLIDE = """
    import torch
    from torch import nn

    N = 400_000


    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.rows = nn.Parameter(torch.randn(64, 8))

        def forward(self, ids):
            return self.rows[ids]  # LOOKUP


    model = Table()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 64, (N,))
    weights = torch.randn(N, 8) * torch.logspace(-3, 3, N).unsqueeze(1)


    def opaudit_step():
        opt.zero_grad()
        loss = (model(ids) * weights).sum()
        loss.backward()
        opt.step()
        return loss
"""


# The op sequence depends on a counter kept in a file, which each run bumps:
# runs 1 and 3 add, run 2 exponentiates.
COUNTER_PATH = """
    import os
    import torch

    path = os.environ["RUNCHECK_COUNTER"]
    with open(path) as f:
        n = int(f.read() or 0)
    with open(path, "w") as f:
        f.write(str(n + 1))
    y = torch.arange(6.0) * 2
    if n % 2 == 0:
        z = y + 1
    else:
        z = y.exp()  # ODD RUNS
    z.sum()
"""


# The input data depends on the same counter: every op is deterministic, but the
# data comes in from outside the ops, so no op is to blame.
COUNTER_DATA = """
    import os
    import torch
    from torch import nn

    path = os.environ["RUNCHECK_COUNTER"]
    with open(path) as f:
        n = int(f.read() or 0)
    with open(path, "w") as f:
        f.write(str(n + 1))
    model = nn.Linear(4, 1)
    x = torch.tensor([[1.0, 2.0, 3.0, float(n)]])


    def opaudit_step():
        model.zero_grad()
        loss = model(x).sum()
        loss.backward()
        return loss
"""


@pytest.fixture
def counter(tmp_path, monkeypatch):
    path = tmp_path / "counter"
    path.write_text("0")
    monkeypatch.setenv("RUNCHECK_COUNTER", str(path))
    return path


def test_diverging_step_names_the_root_cause_op_and_its_forward_line(tmp_path):
    target = _script(tmp_path, COLLIDE)
    r = run_check(target, "default", runs=5)
    assert not r.reproducible
    rc = r.root_cause
    assert rc["op"] == "aten.index_put.default"
    assert rc["phase"] == "backward"
    assert rc["where"] == f"step.py:{_line_of(target.path, '# LOOKUP')}"
    assert rc["module"] == "Table"
    assert rc["inputs_identical"] is True
    # The forward is identical in every run: nothing before the backward differs.
    assert r.differing_ops >= 1 and rc["downstream"] == r.differing_ops - 1
    assert r.path_split is None and r.error is None
    # The gradient, the parameter after the step and the loss's graph: the gradient
    # and the stepped parameter differ; the loss (computed before backward) does not.
    assert any(m.startswith("grad of model.rows (") for m in r.mismatches), r.mismatches
    assert any(m.startswith("value of model.rows (") for m in r.mismatches), r.mismatches
    assert not any(m.startswith("return value") for m in r.mismatches)
    names = [m.split(" (")[0] for m in r.mismatches]
    assert len(names) == len(set(names)), "each tensor is listed once, however many runs differ"


def test_deterministic_mode_makes_the_same_step_reproducible(tmp_path):
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    r = run_check(_script(tmp_path, COLLIDE), "deterministic", runs=3)
    assert r.reproducible, run_check_lines(r)
    assert (r.differing_ops, r.root_cause, r.path_split, r.mismatches, r.error) == (0, None, None, (), None)
    assert r.ops > 10
    # Global flags are restored afterwards.
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before


def test_runs_that_take_different_paths_report_where_they_part(tmp_path, counter):
    target = _script(tmp_path, COUNTER_PATH)
    r = run_check(target, "default", runs=3)
    assert not r.reproducible
    ps = r.path_split
    assert ps["ops"] == ["aten.add.Tensor", "aten.exp.default"]
    assert ps["runs"] == [1, 2]
    assert ps["where"][1] == f"step.py:{_line_of(target.path, '# ODD RUNS')} (forward)"
    assert ps["index"] >= 2
    # Up to the split the runs were identical.
    assert r.differing_ops == 0 and r.root_cause is None
    assert counter.read_text() == "3"
    assert "runs took different paths at op #" in "\n".join(run_check_lines(r))


def test_data_from_outside_the_ops_is_reported_with_the_gradients_it_changed(tmp_path, counter):
    r = run_check(_script(tmp_path, COUNTER_DATA), "deterministic", runs=2)
    assert not r.reproducible
    # Only the weight's gradient depends on x; the bias's does not.
    assert [m.split(" (")[0] for m in r.mismatches] == ["return value", "grad of model.weight"]
    assert "1 of 4 elements, max |diff| 1" in r.mismatches[1]
    rc = r.root_cause
    assert rc["inputs_identical"] is False and rc["op"] == "aten.addmm.default" and rc["phase"] == "forward"
    assert "came from outside the ops" in "\n".join(run_check_lines(r))


def test_outside_data_before_the_root_cause_is_pointed_out_too(tmp_path, counter):
    """Both at once: ``x`` changes from run to run, and a later op's own bits change too.

    That op is the test-only extension op that adds in another order on every call
    (``tests/fixtures/models.py``): the point here is where the report puts each
    difference, not whether a thread race shows on a loaded machine (that is
    ``test_diverging_step_names_the_root_cause_op_and_its_forward_line``).
    """
    target = _script(tmp_path, """
        import os

        import torch
        from fixtures import models as zoo
        from torch import nn

        side = nn.Linear(2, 1)
        with open(os.environ["RUNCHECK_COUNTER"], "r+") as f:
            n = int(f.read() or 0)
            f.seek(0)
            f.write(str(n + 1))
        x = torch.tensor([[1.0, float(n)]])
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, 100, (zoo.N_EXT,), generator=g)
        vals = torch.randn(zoo.N_EXT, generator=g) * torch.logspace(-3, 3, zoo.N_EXT)


        def opaudit_step():
            side(x).sum().backward()  # OUTSIDE
            torch.ops.opaudit_zoo.scatter_sum(idx, vals, 100)  # ITS OWN
    """)
    r = run_check(target, "default", runs=3)
    rc = r.root_cause
    assert (rc["op"], rc["inputs_identical"]) == ("opaudit_zoo.scatter_sum.default", True)
    assert rc["where"] == f"step.py:{_line_of(target.path, '# ITS OWN')}"
    first = rc["first_difference"]
    assert (first["op"], first["where"]) == ("aten.addmm.default", f"step.py:{_line_of(target.path, '# OUTSIDE')}")
    assert first["index"] < rc["index"]
    assert "already got different inputs from outside the ops" in "\n".join(run_check_lines(r))


def test_a_later_run_that_fails_is_reported_not_raised(tmp_path, counter):
    target = _script(tmp_path, """
        import os
        import torch

        path = os.environ["RUNCHECK_COUNTER"]
        with open(path) as f:
            n = int(f.read() or 0)
        with open(path, "w") as f:
            f.write(str(n + 1))
        torch.ones(3).sum()
        if n == 1:
            raise RuntimeError("second run breaks")
    """)
    r = run_check(target, "default", runs=2)
    assert not r.reproducible
    assert r.error == "run 2: the script raised RuntimeError: second run breaks"
    assert r.mismatches == ()


def test_setup_errors_and_user_errors(tmp_path):
    target = _script(tmp_path, "import torch\ntorch.ones(2).sum()\n")
    with pytest.raises(RunCheckError, match="at least 2 runs"):
        run_check(target, runs=1)
    with pytest.raises(RunCheckError, match="unknown mode 'fast'"):
        run_check(target, "fast")
    broken = _script(tmp_path, "import torch\nraise ValueError('nope')\n", name="broken.py")
    with pytest.raises(loader.UserCodeError, match="nope"):
        run_check(broken)


def test_parameters_are_found_through_containers_and_user_objects(tmp_path):
    target = _script(tmp_path, """
        import torch
        from torch import nn


        class Trainer:
            def __init__(self):
                self.net = nn.Linear(2, 2)
                self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1)


        trainer = Trainer()
        heads = {"a": nn.Linear(2, 1)}
        scale = torch.ones(2, requires_grad=True)
        (trainer.net(torch.ones(1, 2)) * scale).sum().backward()
        heads["a"](torch.ones(1, 2)).sum().backward()
        trainer.opt.step()
    """)
    from opaudit.engine.globalstate import preserved_state
    from opaudit.flows.runcheck.check import _execute  # the state a run leaves is what gets compared

    with preserved_state():
        state = _execute(target, "default", 0, keep_errors=False).state
    assert list(state) == [
        "grad of trainer.net.weight", "value of trainer.net.weight",
        "grad of trainer.net.bias", "value of trainer.net.bias",
        "grad of heads['a'].weight", "value of heads['a'].weight",
        "grad of heads['a'].bias", "value of heads['a'].bias",
        "grad of scale", "value of scale",
    ]


def test_run_checks_round_trip_through_a_report(tmp_path, counter):
    checks = run_checks(_script(tmp_path, COUNTER_PATH), runs=2)
    assert [c.mode for c in checks] == ["default", "deterministic"]
    report = Report(environment={}, settings={}, all_findings=(), run_checks=checks)
    again = from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.run_checks == checks


def test_the_shipped_example_is_not_reproducible_by_default_and_is_in_deterministic_mode():
    """The quick start's run check: the root cause is the backward of a lookup; deterministic mode fixes it.

    A real race on the example's own sizes, on 4 threads (conftest restores 2): with two busy
    processes beside the suite and 2 threads, a lookup's backward repeated its bits in up to
    13 of 30 pairs of runs; with 4 threads, in none of 30 (scripts/race_rate.py --threads 4).
    The CLI's rendering of run checks is tested on other scripts.
    """
    torch.set_num_threads(4)
    target = loader.load_target(RECOMMENDER)
    default = run_check(target, DEFAULT, runs=3)
    assert default.runs == 3 and not default.reproducible
    rc = default.root_cause
    lookups = {f"opaudit/examples/recommender.py:{_line_of(RECOMMENDER, text)}"
               for text in ("self.users[user_ids]", "self.items[item_ids]")}
    assert (rc["op"], rc["phase"], rc["inputs_identical"]) == ("aten.index_put.default", "backward", True)
    assert rc["where"] in lookups
    assert any(m.startswith("grad of model.") for m in default.mismatches)
    deterministic = run_check(target, DETERMINISTIC, runs=2)
    assert (deterministic.reproducible, deterministic.ops, deterministic.differing_ops, deterministic.mismatches,
            deterministic.compared) == (True, default.ops, 0, (), 31)


@pytest.mark.parametrize("value, message", [
    ("1", "needs at least 2 runs to compare, got 1"),
    ("two", "expected a number of runs, got 'two'"),
])
def test_cli_rejects_a_bad_run_count(tmp_path, capsys, value, message):
    script = tmp_path / "s.py"
    script.write_text("import torch\n")
    assert main([str(script), "--run-check", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"opaudit: error: argument --run-check: {message}") and err.count("\n") == 1
