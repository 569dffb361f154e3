"""``torch.compile``d models: the report names what ran eagerly under the recorder, and
``--run-check`` checks the compiled step itself (real Dynamo and Inductor on CPU)."""

from __future__ import annotations

import os

import torch
from conftest import ROOT

from opaudit.cli.formats import markdown, table
from opaudit.cli.formats.common import run_check_lines
from opaudit.cli.main import main
from opaudit.data.report import CompiledCode, from_dict, load
from opaudit.engine import loader
from opaudit.engine.record import Recorder
from opaudit.flows.run import audit
from opaudit.flows.runcheck import DEFAULT, DETERMINISTIC, run_check

SCRIPT = os.path.join(ROOT, "tests", "fixtures", "scripts", "compiled_lookup.py")
SHOWN = "tests/fixtures/scripts/compiled_lookup.py"


def _line_of(text: str) -> int:
    with open(SCRIPT, encoding="utf-8") as f:
        return next(i for i, line in enumerate(f, 1) if text in line)


def _dynamo_left_as_found() -> None:
    from torch._dynamo import eval_frame

    assert eval_frame._stance.stance == "default"
    assert eval_frame._callback_from_stance.__module__ == "torch._dynamo.eval_frame"
    assert not hasattr(torch.compile, "_opaudit_watch")


def test_report_names_the_compiled_code_it_recorded_eagerly(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "report.yaml"
    # --exit-zero: whether the eager index_put backward's race shows is the audit's business, not this test's.
    code = main([SCRIPT, "--steps", "1", "--reps", "2", "--no-timing", "--no-deterministic-pass", "--exit-zero",
                 "-q", "-o", str(out)])
    assert code == 0
    report = load(str(out))
    compile_line, decorator = _line_of("compiled = torch.compile(model)"), _line_of("@torch.compile(fullgraph")
    assert report.compiled == (
        CompiledCode("module", "Table", 1, compiled_at=f"{SHOWN}:{compile_line}"),
        # A decorated function's code starts at its decorator: there it is compiled, and defined.
        CompiledCode("function", "loss_of", 1, compiled_at=f"{SHOWN}:{decorator}", defined_at=f"{SHOWN}:{decorator}"),
    )
    # Their ops were recorded one by one (the fullgraph=True function did not raise): the lookup's
    # backward is the eager index_put, and the loss is an eager mul + sum.
    ops = {f.op for f in report.all_findings}
    assert {"aten.index_put.default", "aten.mul.Tensor", "aten.sum.default"} <= ops
    # Named as the model the compile wrapper holds, not as ``OptimizedModule._orig_mod``.
    assert report.finding("aten.index_put.default").modules == ("Table",)
    text = table.report(report)
    assert "Compiled code (torch.compile): recorded and audited eagerly, op by op:" in text
    assert f"  module Table (compiled at {SHOWN}:{compile_line}): 1 call" in text
    assert "## Compiled code (torch.compile)" in markdown.report(report)
    assert from_dict(report.to_dict()) == report
    _dynamo_left_as_found()


def test_an_uncompiled_step_has_no_compiled_section():
    def step():
        torch.ones(4).mul(2).sum()

    report = audit(step, reps=2)
    assert report.compiled == ()
    assert "compiled" not in report.to_dict()
    assert "Compiled code" not in table.report(report)
    assert "Compiled code" not in markdown.report(report)


def test_recording_runs_a_fullgraph_function_eagerly_and_restores_dynamo():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    @torch.compile(backend=backend, fullgraph=True)
    def f(x):
        return x.sin() + 1

    x = torch.randn(4)
    with Recorder() as rec:
        f(x)
        f(x)
    assert [s.op for s in rec.signatures()] == ["aten.sin.default", "aten.add.Tensor"]
    (c,) = rec.compiled()
    assert (c.kind, c.name, c.calls) == ("function", f.__qualname__, 2)
    assert f.__qualname__.endswith("<locals>.f")
    assert graphs == []  # nothing was compiled while recording
    _dynamo_left_as_found()
    f(x)
    assert len(graphs) == 1  # and compilation is back once recording ends


def test_run_check_checks_the_compiled_step_and_deterministic_mode_fixes_it():
    import torch._inductor.config as inductor_config

    target = loader.load_target(SCRIPT)
    before = inductor_config.deterministic
    # A real race (Inductor's atomic adds, 3.2M values into 512 slots). With two busy processes beside,
    # two runs of this compiled backward matched in 5 of 30 pairs: 6 later runs all matching the first
    # is about 1 in 50,000.
    default = run_check(target, DEFAULT, 7)
    det = run_check(target, DETERMINISTIC, 2, compiled=True)
    assert inductor_config.deterministic == before
    _dynamo_left_as_found()
    for r in (default, det):
        # The compiled step ran compiled: graphs were compiled, and no op went through a dispatch mode.
        assert r.compiled == ("module Table", "function loss_of")
        assert r.ops == 0 and r.compiles >= 2 * r.runs
        assert "  checked the compiled step (module Table, function loss_of ran compiled" in run_check_lines(r)[1]
    assert default.inductor_deterministic is False and det.inductor_deterministic is True
    # Inductor's compiled backward adds the 400,000 gradients with racing atomic adds.
    assert not default.reproducible
    assert any(m.startswith("grad of model.rows (") for m in default.mismatches)
    # In deterministic mode it lowers to aten's deterministic index_put: bitwise reproducible.
    assert det.reproducible and det.compared and not det.mismatches
