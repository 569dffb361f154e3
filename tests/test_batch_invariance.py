"""Batch invariance: a row's output against the same row in a bigger batch, on real CPU kernels."""

from __future__ import annotations

import csv
import inspect
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import EXAMPLES, ROOT
from fixtures.models import Control, Projection, branch_on_rows, centre_over_batch

import opaudit
import opaudit.testing
from opaudit.cli import main
from opaudit.cli.formats import Format, Kind, render
from opaudit.data.files import ReportError
from opaudit.data.invariance import BATCH_INVARIANT, BATCH_VARIANT, NOT_COMPARABLE
from opaudit.data.report import from_dict
from opaudit.flows.batchinv import BatchInvarianceError, batch_report

ROWS = (1, 2, 7)


@pytest.fixture(scope="module")
def wide():
    return torch.randn(256, 64, generator=torch.Generator().manual_seed(0))


def test_the_physics_this_file_relies_on(wide):
    """CPU sgemm gives 1, 2 and 7 rows of 256 other bits; the control model's ops do not."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    full = wide @ w
    assert all(not torch.equal(wide[:b] @ w, full[:b]) for b in ROWS)
    control = Control()
    with torch.no_grad():
        assert all(torch.equal(control(wide[:b]), control(wide)[:b]) for b in ROWS)


def test_matmul_is_the_root_cause_at_every_row_count(wide):
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    result = opaudit.batch_invariance(lambda x: x @ w, wide, sizes=ROWS)
    assert not result.invariant and result.rows == ROWS and result.batch_size == 256
    for check in result.checks:
        assert not check.invariant and check.mismatches[0].startswith("output (")
        rc = check.root_cause
        assert rc["op"] == "aten.mm.default" and rc["inputs_identical"] and rc["max_abs_diff"] > 0
        assert rc["signature"] == "f32[256,64], f32[64,64]" and rc["row_signature"] == f"f32[{check.rows},64], f32[64,64]"
        assert rc["where"] == "tests/test_batch_invariance.py:" + str(_line_of("lambda x: x @ w"))
    (op,) = result.ops
    assert op.verdict == BATCH_VARIANT and op.variant_rows == ROWS and op.max_abs_diff > 0
    assert "pad every batch to at least 8 rows" in op.remedy


def _line_of(text: str) -> int:
    with open(__file__, encoding="utf-8") as f:
        return next(i for i, line in enumerate(f, 1) if text in line and "_line_of" not in line)


def test_control_model_is_invariant_and_every_op_judged_invariant(wide):
    result = opaudit.batch_invariance(Control(), wide, sizes=ROWS)
    assert result.invariant and all(c.root_cause is None and c.differing_ops == 0 for c in result.checks)
    assert result.ops and {o.verdict for o in result.ops} == {BATCH_INVARIANT}
    assert {o.op for o in result.ops} >= {"aten.gelu.default", "aten.native_layer_norm.default",
                                          "aten._softmax.default"}


def test_linear_points_at_the_module_and_downstream_ops_are_probed(wide):
    model = torch.nn.Sequential(Projection(), torch.nn.GELU(), torch.nn.Linear(64, 32))
    result = opaudit.batch_invariance(model, wide, sizes=(1,))
    (check,) = result.checks
    rc = check.root_cause
    assert rc["op"] == "aten.addmm.default" and rc["module"] == "Sequential.0.linear" and rc["index"] == 2
    assert rc["downstream"] == 2  # gelu and the second addmm carried it
    by_module = {o.site.module: o for o in result.ops}
    # The second projection got different inputs, yet is judged on its own (rerun on the leading rows).
    assert by_module["Sequential.2"].verdict == BATCH_VARIANT
    assert by_module["Sequential.1"].verdict == BATCH_INVARIANT


def _tiny_gpt2():
    """A random 2-layer GPT-2 built from a config (no download), in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=16, bos_token_id=0,
                     eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).eval()


def test_gpt2_decode_step_is_variant_in_a_linear_layer():
    model = _tiny_gpt2()
    ids = torch.randint(0, 128, (8, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids[:1]).logits - model(ids).logits[:1]).abs().max().item()
    assert 0 < diff < 1e-5
    line = inspect.currentframe().f_lineno + 1
    result = opaudit.batch_invariance(lambda b: model(b, use_cache=False).logits, ids, sizes=(1,))
    rc = result.checks[0].root_cause
    assert not result.invariant and rc["op"] == "aten.addmm.default"
    assert rc["module"] == "GPT2LMHeadModel.transformer.h.0.attn.c_attn"
    # transformers is installed in site-packages: the user's innermost frame is this test's call.
    assert rc["where"] == f"tests/test_batch_invariance.py:{line}" and rc["downstream"] > 10
    assert {o.op for o in result.variant_ops()} == {"aten.addmm.default", "aten.mm.default"}


def test_op_that_mixes_rows_is_named_not_called_variant(wide):
    result = opaudit.batch_invariance(centre_over_batch, wide, sizes=(2,))
    rc = result.checks[0].root_cause
    assert not result.invariant and rc["op"] == "aten.mean.dim" and "mixes the rows" in rc["reason"]
    verdicts = {o.op: o for o in result.ops}
    assert verdicts["aten.mean.dim"].verdict == NOT_COMPARABLE and "no batch dim" in verdicts["aten.mean.dim"].reason


def test_runs_that_take_different_paths_say_where_they_part(wide):
    result = opaudit.batch_invariance(branch_on_rows, wide, sizes=(1, 2))
    one, two = result.checks
    assert two.invariant and two.path_split is None
    assert not one.invariant and one.path_split["index"] == 1
    assert one.path_split["full_batch_op"] == "aten.exp.default" and one.path_split["row_op"] == "aten.sigmoid.default"
    assert one.path_split["where"].startswith("tests/fixtures/models.py:")


def test_batch_of_several_tensors_and_nested_output():
    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.randn(16, 32, generator=g), "mask": torch.rand(16, 32, generator=g) > 0.5}
    result = opaudit.batch_invariance(lambda b: (b["x"].masked_fill(b["mask"], 0), [b["x"].relu()]), batch,
                                      sizes=(1, 3))
    assert result.invariant and all(o.verdict == BATCH_INVARIANT for o in result.ops)


def test_batch_dim_other_than_zero(wide):
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    seq = wide.view(2, 128, 64)  # (time, batch, features): the batch is dim 1
    result = opaudit.batch_invariance(lambda x: torch.softmax(x, -1), seq, sizes=(1, 7), dim=1)
    assert result.invariant and result.dim == 1
    result = opaudit.batch_invariance(lambda x: x @ w, seq, sizes=(1,), dim=1)
    # The matmul folds (time, batch) into rows with time outermost: its leading rows are not the
    # request's, so the outputs are compared along dim 1 but no op can be named the root cause.
    assert not result.invariant and result.root_cause is None
    assert result.checks[0].mismatches[0].startswith("output (")


@pytest.mark.parametrize("call, needle", [
    (lambda x: opaudit.batch_invariance(torch.relu, x, sizes=(0,)), "selects no row"),
    (lambda x: opaudit.batch_invariance(torch.relu, x, sizes=(8,)), "not smaller than the batch"),
    (lambda x: opaudit.batch_invariance(torch.relu, x, sizes=(9,)), "not smaller than the batch"),
    (lambda x: opaudit.batch_invariance(torch.relu, x, sizes=()), "no row counts"),
    (lambda x: opaudit.batch_invariance(torch.relu, x, dim=2), "past the rank"),
    (lambda x: opaudit.batch_invariance(torch.relu, {"ids": [1, 2]}), "holds no tensor"),
    (lambda x: opaudit.batch_invariance(torch.relu, (x, x[:4])), "has 4 rows"),
    (lambda x: opaudit.batch_invariance(torch.sum, x), "has no batch dim"),
])
def test_bad_input_is_one_clear_error(call, needle):
    with pytest.raises(BatchInvarianceError, match=needle):
        call(torch.randn(8, 4))


def test_global_torch_state_is_restored_and_no_mode_is_left(wide):
    def meddling(x):
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        torch.randn(3)
        return torch.nn.functional.dropout(x, 0.5, training=True)

    torch.manual_seed(123)
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    grad = torch.is_grad_enabled()
    result = opaudit.batch_invariance(meddling, wide, sizes=(2,))
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled() == grad
    assert torch._C._len_torch_dispatch_stack() == 0
    # Dropout draws from the RNG: never judged, never called variant.
    assert all(o.verdict != BATCH_VARIANT for o in result.ops)
    assert [o.op for o in result.ops if o.reason == "draws from the RNG"] == ["aten.randn.default",
                                                                              "aten.bernoulli_.float"]


def test_assert_batch_invariant(wide):
    opaudit.testing.assert_batch_invariant(Control(), wide, sizes=ROWS)
    with pytest.raises(opaudit.testing.BatchVarianceFound) as e:
        opaudit.testing.assert_batch_invariant(Projection(), wide, sizes=(1, 2))
    msg = str(e.value)
    assert "root cause aten.addmm.default at tests/fixtures/models.py:" in msg and "(Projection.linear)" in msg
    assert "what to do about aten.addmm.default" in msg
    opaudit.testing.assert_batch_invariant(Projection(), wide, sizes=(1, 2), allow=("aten.addmm.default",))


# -- report ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def variant_report(wide):
    return batch_report(opaudit.batch_invariance(Projection(), wide, sizes=(1, 8)), {"script": "x.py"})


def test_section_round_trips_through_yaml_and_json(variant_report, tmp_path):
    for fmt, ext in ((Format.YAML, "yaml"), (Format.JSON, "json")):
        path = tmp_path / f"r.{ext}"
        path.write_text(render(variant_report, Kind.REPORT, fmt))
        loaded = opaudit.load_report(str(path))
        assert loaded.batch_invariance == variant_report.batch_invariance
        assert loaded.version == 2
    d = yaml.safe_load(render(variant_report, Kind.REPORT, Format.YAML))["batch_invariance"]
    assert d["invariant"] is False and [c["rows"] for c in d["checks"]] == [1, 8]
    assert d["checks"][1] == {"rows": 8, "invariant": True, "ops": 2, "differing_ops": 0}  # t, addmm
    assert d["counts"] == {"batch_variant": 1, "not_comparable": 0, "batch_invariant": 0}


def test_section_in_csv_markdown_and_table(variant_report):
    rows = list(csv.DictReader(io.StringIO(render(variant_report, Kind.REPORT, Format.CSV))))
    assert len(rows) == 1 and rows[0]["verdict"] == BATCH_VARIANT and rows[0]["variant_rows"] == "1"
    assert rows[0]["module"] == "Projection.linear" and rows[0]["location"].startswith("tests/fixtures/models.py:")
    md = render(variant_report, Kind.REPORT, Format.MARKDOWN)
    assert "## Batch invariance" in md and "root cause: op #" in md and "### What to do" in md
    table = render(variant_report, Kind.REPORT, Format.TABLE)
    assert "NOT invariant" in table and "8 rows vs the first 8 rows of the full batch: bitwise identical" in table
    assert "unique signatures" not in table  # an audit's summary line does not belong to this check


def test_bad_sections_are_refused(variant_report):
    d = json.loads(render(variant_report, Kind.REPORT, Format.JSON))
    with pytest.raises(ReportError, match="version 1 report cannot hold"):
        from_dict({**d, "version": 1})
    bad = json.loads(json.dumps(d))
    bad["batch_invariance"]["ops"][0]["verdict"] = "sometimes"
    with pytest.raises(ReportError, match="unknown verdict 'sometimes'"):
        from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["batch_invariance"]["invariant"] = True
    with pytest.raises(ReportError, match="contradicts its checks"):
        from_dict(bad)


# -- command line ---------------------------------------------------------------------
def _script(tmp_path, body):
    p = tmp_path / "serve.py"
    p.write_text(textwrap.dedent(body))
    return str(p)


GOOD = """
    import torch
    model = torch.nn.Sequential(torch.nn.GELU(), torch.nn.LayerNorm(16))

    def opaudit_batch():
        return torch.randn(8, 16, generator=torch.Generator().manual_seed(0))

    def opaudit_forward(x):
        return model(x)
"""


def test_cli_invariant_model_exits_0_and_writes_every_format(tmp_path, capsys):
    script = _script(tmp_path, GOOD)
    for ext in ("yaml", "json", "csv", "md"):
        out = tmp_path / f"r.{ext}"
        assert main([script, "--batch-invariance", "-o", str(out), "-q"]) == 0
        assert out.read_text()
    assert yaml.safe_load((tmp_path / "r.yaml").read_text())["batch_invariance"]["invariant"] is True
    assert main([script, "--batch-invariance", "--batch-sizes", "1,7"]) == 0
    assert "invariant at every row count" in capsys.readouterr().out


@pytest.mark.parametrize("argv, body, needle", [
    (["--batch-sizes", "0"], GOOD, "row count 0 selects no row"),
    (["--batch-sizes", "1,x"], GOOD, "expected comma-separated row counts"),
    (["--batch-sizes", "9"], GOOD, "row count 9 is not smaller than the batch (8 rows)"),
    (["--batch-dim", "2"], GOOD, "batch dim 2 is past the rank of the batch (shape [8, 16])"),
    (["--batch-dim", "-1"], GOOD, "must be 0 or more"),
    ([], GOOD.replace("return torch.randn(8, 16, generator=torch.Generator().manual_seed(0))",
                      "return {'ids': [1, 2, 3]}"), "the batch holds no tensor"),
    ([], GOOD.replace("return model(x)", "return model(x).sum()"), "the forward's output has no batch dim"),
    ([], GOOD.replace("def opaudit_batch", "def make_batch"), "needs the script to define opaudit_batch and"),
    ([], GOOD.replace("def opaudit_forward", "def forward"), "(missing: opaudit_forward)"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, body, needle):
    code = main([_script(tmp_path, body), "--batch-invariance", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and not out
    assert err.startswith("opaudit: error: ") and err.count("\n") == 1 and needle in err, err


def test_cli_batch_flags_need_the_check(tmp_path, capsys):
    assert main([_script(tmp_path, GOOD), "--batch-sizes", "1"]) == 2
    assert "--batch-sizes needs --batch-invariance" in capsys.readouterr().err


def test_example_decoder_is_variant_with_its_line_and_remedy():
    """The shipped example, end to end in a fresh process: exit 1, the line of its qkv projection."""
    proc = subprocess.run([sys.executable, "-m", "opaudit", os.path.join(EXAMPLES, "decoder.py"),
                           "--batch-invariance", "--batch-sizes", "1,2,7"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr
    assert ("root cause: op #8 aten.addmm.default at opaudit/examples/decoder.py:36 (Decoder.blocks.0.qkv)"
            in proc.stdout)
    assert "What to do:" in proc.stdout and "aten.addmm.default, aten.mm.default" in proc.stdout
    zero = subprocess.run([sys.executable, "-m", "opaudit", os.path.join(EXAMPLES, "decoder.py"),
                           "--batch-invariance", "--batch-sizes", "1", "--exit-zero", "-q", "--format", "json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    section = json.loads(zero.stdout)["batch_invariance"]
    assert zero.returncode == 0 and section["invariant"] is False
    variant = [op for op in section["ops"] if op["verdict"] == BATCH_VARIANT]
    assert variant and all("pad every batch to at least 8 rows" in op["remedy"] for op in variant)


def test_an_audit_without_the_flag_never_loads_the_check():
    code = ("import sys; from opaudit.cli import main; "
            "rc = main([sys.argv[1], '--reps', '1', '--no-timing', '-q']); "
            "print(rc, sorted(m for m in sys.modules if m in ('opaudit.flows.batchinv', 'opaudit.engine.batchtrace')))")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(EXAMPLES, "mlp.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout + proc.stderr


def test_diff_of_two_reports_shows_batch_invariance_transitions(variant_report):
    import dataclasses

    from opaudit.flows.diff import BATCH_FIELD, diff_documents

    bi = variant_report.batch_invariance
    fixed = dataclasses.replace(variant_report, batch_invariance=dataclasses.replace(bi, ops=tuple(
        dataclasses.replace(o, verdict=BATCH_INVARIANT, variant_rows=(), max_abs_diff=None, remedy="")
        for o in bi.ops)))
    diff = diff_documents(fixed, variant_report)
    (change,) = diff.changes
    assert change.field == BATCH_FIELD and change.transition == "batch_invariant->batch_variant"
    assert change.op == "aten.addmm.default" and change.where.startswith("tests/fixtures/models.py:")
    assert diff_documents(variant_report, variant_report).changes == ()


# -- the root cause follows the data (issue 21 item 1) ------------------------------------
def test_a_mask_check_feeding_python_is_not_the_root_cause(tmp_path, capsys):
    """``bool(mask.sum() == mask.numel())``: the sum differs, but only the Linear's result reaches the output."""
    script = os.path.join(ROOT, "tests", "fixtures", "scripts", "mask_check.py")
    out = tmp_path / "r.yaml"
    assert main([script, "--batch-invariance", "--batch-sizes", "1,2", "-o", str(out), "-q"]) == 1
    for check in yaml.safe_load(out.read_text())["batch_invariance"]["checks"]:
        rc = check["root_cause"]
        assert rc["op"] == "aten.addmm.default" and rc["module"] == "Linear"
        assert rc["where"] == "tests/fixtures/scripts/mask_check.py:22" and "reaches_output" not in rc
        assert rc["downstream"] == 1  # the ``* 1.0`` reads the projection; the ``eq`` after the sum does not
        (side,) = check["unreached"]
        assert side["op"] == "aten.sum.default" and side["where"] == "tests/fixtures/scripts/mask_check.py:21"
    assert main([script, "--batch-invariance", "--batch-sizes", "1"]) == 1
    text = capsys.readouterr().out
    assert "differs but does not reach the output: op #1 aten.sum.default at tests/fixtures/scripts/mask_check.py:21" in text


def test_gpt2_with_an_attention_mask_blames_c_attn_not_the_mask_check():
    model = _tiny_gpt2()
    ids = torch.randint(0, 128, (8, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones(8, 6, dtype=torch.long)}
    line = inspect.currentframe().f_lineno + 1
    result = opaudit.batch_invariance(lambda b: model(**b, use_cache=False).logits[:, -1], batch, sizes=(1,))
    (check,) = result.checks
    rc = check.root_cause
    assert not result.invariant and rc["op"] == "aten.addmm.default"
    assert rc["module"] == "GPT2LMHeadModel.transformer.h.0.attn.c_attn"
    assert rc["where"] == f"tests/test_batch_invariance.py:{line}" and 10 < rc["downstream"] < check.differing_ops
    # The mask check is a sum over the whole batch: it differs, and is named apart.
    assert [u["op"] for u in check.unreached] == ["aten.sum.default"]
    assert check.unreached[0]["index"] < rc["index"]


def test_a_number_computed_in_python_from_the_batch_carries_its_source(wide):
    """``x * x.sum().item()``: the sum is the root cause (its number reaches the mul), not the mul."""
    result = opaudit.batch_invariance(lambda x: x * x.sum().item(), wide, sizes=(2,))
    rc = result.checks[0].root_cause
    assert rc["op"] == "aten.sum.default" and "mixes the rows" in rc["reason"] and rc["downstream"] == 1
    assert {o.op: o.verdict for o in result.ops}["aten.mul.Tensor"] == BATCH_INVARIANT
    # A number made from the row count in Python enters at the mul: named there, not called its fault.
    result = opaudit.batch_invariance(lambda x: x * (1.0 / len(x)), wide, sizes=(2,))
    rc = result.checks[0].root_cause
    assert rc["op"] == "aten.mul.Tensor" and not rc["inputs_identical"]
    assert rc["reason"].endswith("a number passed to it was not: 0.00390625 (full batch) vs 0.5")
    assert [o.verdict for o in result.ops] == [BATCH_INVARIANT]
