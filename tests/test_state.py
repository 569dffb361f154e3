"""The auditor leaves global torch state exactly as it found it."""

from __future__ import annotations

import pytest
import torch
from fixtures import models as zoo
from torch.utils import deterministic as det_utils

import opaudit
from opaudit.engine.record import Recorder
from opaudit.engine.replay import replay
from opaudit.flows.pipeline import build_report


def _state():
    return {
        "det": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "fill": det_utils.fill_uninitialized_memory,
        "grad": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(),
        "rng": torch.get_rng_state().clone(),
        "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
        "tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("det, warn_only, fill, grad", [
    (False, False, True, True),
    (True, True, False, False),
    (True, False, True, True),
])
def test_audit_restores_every_global_flag(det, warn_only, fill, grad):
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    det_utils.fill_uninitialized_memory = fill
    torch.set_grad_enabled(grad)
    torch.backends.cudnn.benchmark = True
    try:
        torch.manual_seed(123)
        before = _state()
        with Recorder() as rec:
            with torch.enable_grad():
                if not (det and not warn_only):
                    zoo.put_no_accumulate()  # raises under strict replay (and in strict user code)
                zoo.accumulate_put()         # toggles modes N times
                zoo.empty_outputs()
                torch.nn.functional.dropout(torch.ones(10), 0.5)  # draws from the RNG
        # recording itself drew from the RNG (randint/randn in the zoo): compare after it
        before["rng"] = torch.get_rng_state().clone()
        build_report(rec, reps=2)
        _assert_same(before, _state())
    finally:
        torch.use_deterministic_algorithms(False)
        det_utils.fill_uninitialized_memory = True
        torch.set_grad_enabled(True)
        torch.backends.cudnn.benchmark = False


def test_state_is_restored_even_when_the_op_fails_on_replay():
    with Recorder() as rec:
        zoo.one_shot_op()
    (sig, func, snap), = [i for i in rec.items() if "one_shot" in i[0].op]
    before = _state()
    obs = replay(func, snap, 2)
    assert obs.error and "stream already consumed" in obs.error
    _assert_same(before, _state())


def test_audit_api_restores_state_after_recording_the_users_function():
    torch.manual_seed(5)
    before = _state()
    _, step = zoo.make_mlp_step(seed=None)
    after_setup = _state()  # building the model drew from the RNG
    opaudit.audit(step, reps=2)
    after = _state()
    # The audit's replays must not consume or reset the user's RNG beyond what the step itself drew.
    assert after["det"] == before["det"] and after["fill"] == before["fill"] and after["grad"] == before["grad"]
    assert not torch.equal(after_setup["rng"], before["rng"])
