"""The auditor leaves global torch state exactly as it found it.

Every test takes a snapshot of the global state, runs the part of the audit
that toggles it (replays flip the determinism mode, restore RNG states and
switch cuDNN settings hundreds of times), takes a second snapshot after, and
compares the two.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from fixtures import models as zoo
from torch.utils import deterministic as det_utils

import opaudit
from opaudit.engine.globalstate import preserved_state, set_deterministic
from opaudit.engine.record import Recorder
from opaudit.engine.replay import replay
from opaudit.flows.pipeline import build_report

INDUCTOR_CONFIG = "torch._inductor.config"


def _state() -> dict:
    state = {
        "det": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "fill": det_utils.fill_uninitialized_memory,
        "grad": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(),
        "cpu_rng": torch.get_rng_state(),
        "cudnn": (torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic,
                  torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32),
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if INDUCTOR_CONFIG in sys.modules:
        state["inductor_det"] = sys.modules[INDUCTOR_CONFIG].deterministic
    return state


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k, b in before.items():
        a = after[k]
        if isinstance(b, torch.Tensor):
            assert torch.equal(b, a), k
        elif isinstance(b, list):  # CUDA RNG states, one per device
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(b, a)), k
        else:
            assert b == a, (k, b, a)


@pytest.fixture
def odd_flags():
    """Every flag the replays touch, set away from the replays' own values; put back afterwards."""
    saved = _state()
    yield
    torch.use_deterministic_algorithms(saved["det"], warn_only=saved["warn_only"])
    det_utils.fill_uninitialized_memory = saved["fill"]
    torch.set_grad_enabled(saved["grad"])
    (torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) = saved["cudnn"]
    torch.backends.cuda.matmul.allow_tf32 = saved["matmul_tf32"]


@pytest.mark.parametrize("det, warn_only, fill, grad", [
    (False, False, False, True),
    (True, True, False, False),
    (True, False, True, True),
])
def test_classify_restores_every_global_flag_and_the_rng(odd_flags, det, warn_only, fill, grad):
    torch.manual_seed(123)
    with Recorder() as rec:
        with torch.enable_grad():
            if not (det and not warn_only):
                zoo.put_no_accumulate()  # raises under strict replay (and in strict user code)
            zoo.accumulate_put()         # diverges: toggles the modes 2N+1 times
            zoo.empty_outputs()          # uninitialized: timed with fill_uninitialized_memory on
            torch.nn.functional.dropout(torch.ones(10), 0.5)  # draws from the RNG on every replay
    set_deterministic(det, warn_only)  # after recording: strict user code would have raised above
    det_utils.fill_uninitialized_memory = fill
    torch.set_grad_enabled(grad)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = True
    before = _state()
    report = build_report(rec, reps=2)
    after = _state()
    # The replays really ran: a dropout replay that leaves the RNG where it ends would show.
    assert {f.op for f in report.findings(verdicts=["random"])} & {"aten.bernoulli_.float", "aten.native_dropout.default"}
    _assert_same(before, after)


def test_state_is_restored_even_when_the_op_fails_on_replay():
    with Recorder() as rec:
        zoo.one_shot_op()
    (sig, func, snap), = [i for i in rec.items() if "one_shot" in i[0].op]
    before = _state()
    obs = replay(func, snap, 2)
    assert obs.error and "stream already consumed" in obs.error
    _assert_same(before, _state())


def _mlp_rng_after_one_step() -> torch.Tensor:
    torch.manual_seed(5)
    _, step = zoo.make_mlp_step(seed=None)
    step()
    return torch.get_rng_state()


def test_audit_leaves_the_rng_where_the_step_itself_leaves_it():
    """``audit(step)`` runs the step once (recording) and replays every op many times:
    afterwards the RNG is where one plain call of the step leaves it, no further."""
    expected = _mlp_rng_after_one_step()  # dropout drew from the RNG
    torch.manual_seed(5)
    assert not torch.equal(torch.get_rng_state(), expected)
    _, step = zoo.make_mlp_step(seed=None)
    before = _state()
    report = opaudit.audit(step, reps=3)
    after = _state()
    assert report.findings(verdicts=["random"])  # dropout was replayed, drawing each time
    assert torch.equal(after.pop("cpu_rng"), expected)
    before.pop("cpu_rng")
    _assert_same(before, after)


def test_inductor_flag_is_kept_and_restored_when_inductor_is_loaded(odd_flags):
    """With Inductor's config imported, replays keep its flag in step with ATen's and
    put it back as it was, even where the user set the two differently."""
    import importlib

    inductor = importlib.import_module(INDUCTOR_CONFIG)  # slow (Dynamo comes with it)
    saved = inductor.deterministic
    try:
        torch.use_deterministic_algorithms(False)
        inductor.deterministic = True  # set on its own, not through use_deterministic_algorithms
        with preserved_state():
            set_deterministic(True, warn_only=True)
            assert torch.are_deterministic_algorithms_enabled() and inductor.deterministic
            set_deterministic(False)
            assert not torch.are_deterministic_algorithms_enabled() and not inductor.deterministic
        assert not torch.are_deterministic_algorithms_enabled() and inductor.deterministic is True
        with Recorder() as rec:
            zoo.accumulate_put()
        before = _state()
        build_report(rec, reps=2)
        _assert_same(before, _state())
    finally:
        inductor.deterministic = saved


def test_an_audit_never_imports_inductor_or_dynamo():
    """``torch.use_deterministic_algorithms`` imports Inductor's config (and Dynamo) on
    first use, about 1.5 s; eager replays set ATen's flag only."""
    code = (
        "import sys, torch, opaudit\n"
        "from fixtures import models as zoo\n"
        "r = opaudit.audit(zoo.accumulate_put, reps=2)\n"
        "assert any(f.op == 'aten.put_.default' and f.default_diverged for f in r.all_findings)\n"
        "print(sorted(m for m in ('torch._inductor.config', 'torch._dynamo') if m in sys.modules))\n"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
