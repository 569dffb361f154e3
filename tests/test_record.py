"""Recording: signatures, dedup, attribution, phases, exact captures, no self-tracing."""

from __future__ import annotations

import inspect
import os
import warnings

import pytest
import torch
from fixtures import models as zoo
from torch.utils._python_dispatch import TorchDispatchMode

import opaudit
import opaudit.cli
from opaudit.aten.ops import OpKind, op_kind
from opaudit.aten.tensors import Snapshot
from opaudit.engine.record import Recorder, RecordError
from opaudit.flows.pipeline import build_report


def _line_of(fn, text):
    src, start = inspect.getsourcelines(fn)
    for i, line in enumerate(src):
        if text in line:
            return start + i
    raise AssertionError(text)


def test_backward_op_is_attributed_to_the_forward_line_that_created_it():
    model = zoo.Lookup()
    ids = torch.randint(0, 1000, (4096,))
    w = torch.randn(4096, 16)
    report = opaudit.audit(zoo.lookup_step, model, ids, w, reps=2)
    (f,) = [f for f in report.all_findings if f.op == "aten.index_put.default"]
    assert f.phases == ("backward",)
    site = f.sites[0]
    assert site.file == os.path.relpath(zoo.__file__).replace(os.sep, "/")
    assert site.line == _line_of(zoo.Lookup.forward, "self.table[ids]")
    assert site.function == "forward"
    assert site.module == "Lookup"
    # The forward index op points at the same line, with phase forward.
    (fwd,) = [f for f in report.all_findings if f.op == "aten.index.Tensor"]
    assert fwd.phases == ("forward",) and fwd.sites[0].line == site.line


def test_module_paths_are_fully_qualified_and_optimizer_ops_have_their_phase():
    _, step = zoo.make_mlp_step()
    with Recorder() as rec:
        step()
    sigs = rec.signatures()
    addmm = [s for s in sigs if s.op == "aten.addmm.default" and "forward" in s.phases]
    assert {site.module for s in addmm for site in s.sites} == {"MLP.net.0", "MLP.net.3"}
    assert any("optimizer" in s.phases for s in sigs)
    assert any("backward" in s.phases for s in sigs)


def test_calls_are_deduplicated_by_signature():
    x = torch.randn(8, 8)
    with Recorder() as rec:
        for _ in range(10):
            torch.mm(x, x)
        torch.mm(x.t(), x)  # another stride: another signature
    mms = [s for s in rec.signatures() if s.op == "aten.mm.default"]
    assert sorted(s.calls for s in mms) == [1, 10]
    assert any("{1,8}" in s.signature for s in mms)


def _adamw_schedule_loop(steps: int) -> Recorder:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * 0.99**s)
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
    with Recorder() as rec:
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return rec


def test_signatures_do_not_grow_with_optimizer_steps():
    # The learning rate, bias corrections and step size are new Python floats every step.
    few, many = _adamw_schedule_loop(2), _adamw_schedule_loop(25)
    assert many.total_calls > 10 * few.total_calls
    assert len(many.signatures()) == len(few.signatures())
    # Replay uses the first call's values: the text shows step 1's learning rate (1e-4).
    decay = [s for s in many.signatures() if s.op == "aten.mul_.Tensor" and "optimizer" in s.phases]
    assert decay and all("0.999999" in s.signature for s in decay)  # 1 - lr * weight_decay at step 1


def test_values_that_select_behaviour_still_key_signatures():
    x = torch.randn(64)
    z, idx = torch.zeros(8), torch.tensor([1, 1, 2])
    with Recorder() as rec:
        torch.linalg.vector_norm(x, 2.0)
        torch.linalg.vector_norm(x, float("inf"))  # another reduction
        torch.linalg.vector_norm(x, 1.0)
        x.add(x, alpha=0.3)
        x.add(x, alpha=0.7)  # same kernel: one signature, two calls
        x.sum(0)
        x.unsqueeze(0).sum(1)  # an int dim: by value
        z.index_put_((idx,), torch.ones(3), accumulate=True)
        z.index_put_((idx,), torch.ones(3), accumulate=False)
    by_op: dict[str, list] = {}
    for s in rec.signatures():
        by_op.setdefault(s.op, []).append(s)
    assert len(by_op["aten.linalg_vector_norm.default"]) == 3
    (add,) = by_op["aten.add.Tensor"]
    assert add.calls == 2 and "alpha=0.3" in add.signature
    assert len(by_op["aten.index_put_.default"]) == 2


def test_view_and_metadata_ops_are_counted_not_replayed():
    x = torch.randn(4, 4)
    with Recorder() as rec:
        y = x.t().reshape(16).view(4, 4).detach()
        (y + 1).sum()
    assert all(s.kind is not OpKind.VIEW for s in rec.signatures())
    assert rec.view_calls and sum(rec.view_calls.values()) >= 3
    assert op_kind(torch.ops.aten.view.default)[0] is OpKind.VIEW
    assert op_kind(torch.ops.aten.t.default)[0] is OpKind.VIEW


def test_the_recorder_does_not_record_its_own_cloning():
    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    def work():
        a = torch.randn(64, 64)
        b = a.index_put((torch.tensor([1, 1, 2]),), torch.ones(3, 64), accumulate=True)
        (a @ b).relu_().sum()

    with Count():
        torch.manual_seed(0)
        work()
    with Recorder() as rec:
        torch.manual_seed(0)
        work()
    assert rec.total_calls == Count.n


def test_inputs_are_captured_before_an_in_place_op_runs():
    x = torch.zeros(5)
    with Recorder() as rec:
        x.add_(1.0)
    (sig, func, snap), = [i for i in rec.items() if i[0].op == "aten.add_.Tensor"]
    args, _, written = snap.materialize()
    assert torch.equal(args[0], torch.zeros(5))
    assert written and written[0] is args[0]
    assert torch.equal(x, torch.ones(5))


def test_snapshot_keeps_strides_offsets_and_aliasing():
    base = torch.arange(24.0).reshape(4, 6)
    view = base[1:, 2:5]                  # offset, non-contiguous
    expanded = torch.randn(3).expand(4, 3)  # stride 0
    snap = Snapshot((view, base, expanded), {}, written=[True, False, False])
    (v, b, e), _, written = snap.materialize()
    assert (v.shape, v.stride(), v.storage_offset()) == (view.shape, view.stride(), view.storage_offset())
    assert e.stride() == (0, 1)
    assert torch.equal(v, view) and torch.equal(b, base) and torch.equal(e, expanded)
    # view and base alias the same storage in the snapshot too: a write shows in both.
    assert v.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    v.fill_(-1)
    assert (b[1:, 2:5] == -1).all()
    # and each materialize() is fresh for written buffers
    (v2, _, _), _, _ = snap.materialize()
    assert torch.equal(v2, view)


def _quantized_inputs():
    """Real quantized tensors of every scheme a capture keeps: per tensor (a strided view of one), per
    channel on axis 1, per channel with float zero points, and a 4-bit type packed two to a byte."""
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    x = torch.linspace(-2, 2, 24)
    per_tensor = torch.quantize_per_tensor(x.reshape(4, 6), 0.05, 7, torch.quint8)[1:, ::2]
    per_channel = torch.quantize_per_channel(x.reshape(4, 6), torch.linspace(0.01, 0.06, 6, dtype=torch.float64),
                                             torch.arange(6), 1, torch.qint8)
    float_qparams = torch.quantize_per_channel(x.reshape(4, 6), torch.tensor([0.02, 0.03, 0.04, 0.05]),
                                               torch.tensor([0.5, -1.0, 0.0, 2.0]), 0, torch.quint8)
    packed = torch.quantize_per_tensor(x[:8], 0.25, 3, torch.quint4x2)
    return per_tensor, per_channel, float_qparams, packed


def _quantizer(t):
    if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return t.qscheme(), t.q_scale(), t.q_zero_point()
    return (t.qscheme(), t.q_per_channel_scales().tolist(), t.q_per_channel_zero_points().tolist(),
            t.q_per_channel_axis())


def test_quantized_inputs_keep_their_quantizer_and_bits(tmp_path):
    inputs = _quantized_inputs()
    snap = Snapshot(inputs, {}, written=[True, False, False, False])
    path = tmp_path / "snap.pt"
    torch.save(snap, path)  # how --isolate's spawned worker receives it
    for copy in (snap, torch.load(path, weights_only=False)):
        rebuilt, _, _ = copy.materialize()
        for got, want in zip(rebuilt, inputs, strict=True):
            assert (got.dtype, got.shape, got.stride(), _quantizer(got)) == \
                (want.dtype, want.shape, want.stride(), _quantizer(want))
            assert torch.equal(got.int_repr(), want.int_repr()) and torch.equal(got.dequantize(), want.dequantize())


def test_ops_on_quantized_tensors_are_replayed(tmp_path, capsys):
    script = tmp_path / "quantized.py"
    script.write_text("import warnings\nimport torch\n\n" + inspect.getsource(_quantized_inputs)
                      + "\n\ndef opaudit_step():\n    for q in _quantized_inputs():\n        q.dequantize().sum()\n"
                      "    torch.empty_like(_quantized_inputs()[0])\n"
                      "    torch.relu(_quantized_inputs()[0]).int_repr()\n")
    out = tmp_path / "r.yaml"
    assert opaudit.cli.main([str(script), "--reps", "2", "-q", "-o", str(out)]) == 0, capsys.readouterr().err
    findings = opaudit.load_report(str(out)).all_findings
    dequantize = [f for f in findings if f.op == "aten.dequantize.self"]
    assert len(dequantize) == 4 and {f.verdict.value for f in dequantize} == {"stable"}
    assert [f.verdict.value for f in findings if f.op == "aten.relu.default"] == ["stable"]
    assert [f.verdict.value for f in findings if f.op == "aten.empty_like.default"] == ["uninitialized"]
    assert not [f for f in findings if f.verdict.value == "skipped"]


def test_explicit_generator_is_snapshotted_and_the_users_generator_untouched():
    g = torch.Generator().manual_seed(7)
    with Recorder() as rec:
        torch.randn(10, generator=g)
    state_after_user = g.get_state().clone()
    report = build_report(rec, reps=3, remedies=False)
    (f,) = [f for f in report.all_findings if f.op == "aten.randn.generator"]
    assert f.verdict.value == "random" and f.default_diverged == "0/3"
    assert torch.equal(g.get_state(), state_after_user)


def test_nested_recording_is_refused():
    rec = Recorder()
    with rec:
        with pytest.raises(RecordError, match="already recording"):
            with rec:
                pass
        torch.ones(2).sum()
    # The refused nesting left the outer recording running, and ended it cleanly.
    assert [s.op for s in rec.signatures()] == ["aten.ones.default", "aten.sum.default"]
    assert torch._C._len_torch_dispatch_stack() == 0
