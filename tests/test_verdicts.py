"""Every verdict, produced by real ops replayed on their captured inputs."""

from __future__ import annotations

import pytest
import torch
from fixtures import models as zoo

import opaudit
from opaudit import Verdict


def _only(report, op):
    found = [f for f in report.all_findings if f.op == op]
    assert found, f"{op} not recorded; got {[f.op for f in report.all_findings]}"
    return found


@pytest.mark.parametrize("step, op, documented", [
    (zoo.accumulate_index_put, "aten.index_put_.default",
     "torch.Tensor.index_put with accumulate=True when called on a CPU tensor"),
    (zoo.accumulate_put, "aten.put_.default", "torch.Tensor.put_ with accumulate=True when called on a CPU tensor"),
])
def test_accumulate_with_collisions_diverges_and_deterministic_mode_fixes_it(step, op, documented):
    """A real thread race: the product's claim is about these ATen kernels, so no stand-in op.

    3 million wide-range values added into 1,000 slots by 2 threads: two runs gave the same
    bits in at most 1 of 30 pairs on this 2-core machine with two busy processes beside
    (``scripts/race_rate.py``), so 5 comparisons all missing the race is below 1 in 10^7.
    """
    report = opaudit.audit(step, reps=6)
    (f,) = _only(report, op)
    assert f.verdict is Verdict.DIVERGES
    k, n = map(int, f.default_diverged.split("/"))
    assert n >= 6 and k >= 1  # 6 runs per mode, or more until the race showed
    assert f.deterministic_diverged == f"0/{n}"
    assert f.max_abs_diff and f.max_abs_diff > 0
    assert 0 < f.frac_differing <= 1
    assert f.time_default_us > 0 and f.time_deterministic_us > 0
    # The remedy: the setting, the cost measured here (a figure, whatever it is), and PyTorch's own bullet.
    assert "use_deterministic_algorithms(True)" in f.remedy
    assert f"Measured cost here: {f.det_cost:.2f}x" in f.remedy
    assert f"PyTorch documents: {documented}" in f.remedy


def test_max_unpool_in_every_dimension_raises_with_pytorchs_message():
    report = opaudit.audit(zoo.unpool_all_dims, reps=2)
    raising = report.findings(verdicts=["raises"])
    # max_unpool1d runs as aten.max_unpool2d on a unit dimension.
    assert {f.op for f in raising} == {"aten.max_unpool2d.default", "aten.max_unpool3d.default"}
    assert len(raising) == 3
    for f in raising:
        assert f.alert_kind == "no_deterministic_impl"
        assert "does not have a deterministic implementation, but you set" in f.strict_error
        assert f.warnings and "does not have a deterministic implementation" in f.warnings[0]


def test_put_without_accumulate_raises():
    report = opaudit.audit(zoo.put_no_accumulate, reps=2)
    (f,) = _only(report, "aten.put_.default")
    assert f.verdict is Verdict.RAISES
    assert f.strict_error.startswith("put_ does not have a deterministic implementation")


def test_duplicate_index_copy_is_deterministic_in_deterministic_mode_without_an_alert():
    """``index_copy_`` and ``index_put_`` over duplicate indices: last-writer races.

    Whether the default runs race is not asserted: two threads' last writes to a row
    land in a time-dependent order only when both threads finish together, which
    happened in about 1 of 5 pairs of runs on this machine under load, so a test of
    the race itself would be a test of the machine's load. What holds on every
    machine is asserted: deterministic mode makes the op repeat its bits, and it
    neither raises nor warns (PyTorch documents both as deterministic when enabled).
    """
    report = opaudit.audit(zoo.index_copy_duplicates, reps=4)
    for op in ("aten.index_copy_.default", "aten.index_put_.default"):
        (f,) = _only(report, op)
        # 4 runs per mode, or more (up to the first that differs) for these value-dependent ops.
        k, n = map(int, f.default_diverged.split("/"))
        assert n >= 4 and k <= n and (n == 4 or k <= 1), f.default_diverged
        assert f.deterministic_diverged == f"0/{n}"
        assert f.strict_error is None and not f.warnings


def test_silent_nondeterminism_in_an_extension_op_is_diverges_deterministic():
    # The extension kernel adds in a new order on every call: every run differs from the first, in both modes.
    report = opaudit.audit(zoo.racy_extension_op, reps=6)
    (f,) = _only(report, "opaudit_zoo.scatter_sum.default")
    assert f.verdict is Verdict.DIVERGES_DETERMINISTIC
    assert not f.strict_error and not f.warnings
    assert (f.default_diverged, f.deterministic_diverged) == ("5/6", "5/6")
    assert f.max_abs_diff > 0 and f.frac_differing > 0


def test_an_op_deterministic_only_under_strict_mode_is_measured_as_strict_mode_runs_it():
    """Deterministic mode is measured as ``use_deterministic_algorithms(True)`` runs an op: this one (shaped like
    CUDA's attention backward) takes a deterministic branch under strict mode and keeps its nondeterministic one,
    with a warning, under ``warn_only``. Measured with ``warn_only``, it would be ``warns``, 5/6 in both modes."""
    report = opaudit.audit(zoo.branching_extension_op, reps=6)
    (f,) = _only(report, "opaudit_zoo.branching_sum.default")
    assert f.verdict is Verdict.DIVERGES
    assert (f.default_diverged, f.deterministic_diverged) == ("5/6", "0/6")
    assert not f.strict_error and not f.warnings  # a CPU op gets no warn_only run: nothing on the CPU branches so


def test_a_divergence_outranks_a_warning():
    """An op that diverges by default, is fixed by strict mode and warns under ``warn_only`` (CUDA's flash
    attention backward) is ``diverges``: its warnings stay on the finding. Without a divergence: ``warns``."""
    from opaudit.data.observation import Observation, RunStats
    from opaudit.engine.classify import classify
    from opaudit.engine.record import Recorder

    with Recorder() as rec:
        zoo.warning_extension_op()
    (sig, _, _), = [i for i in rec.items() if i[0].op == "opaudit_zoo.warn_nondet_add.default"]
    warned = ("opaudit_zoo::warn_nondet_add does not have a deterministic implementation",)
    stable, differing = RunStats(5, 0, 0.0, 0.0, 1e-6), RunStats(5, 3, 1e-7, 0.5, 1e-6)
    assert classify(sig, Observation(None, None, warned, differing, stable, False))[0] is Verdict.DIVERGES
    assert classify(sig, Observation(None, None, warned, differing, differing, False))[0] \
        is Verdict.DIVERGES_DETERMINISTIC
    assert classify(sig, Observation(None, None, warned, stable, stable, False))[0] is Verdict.WARNS


def test_op_that_only_warns_is_warns():
    report = opaudit.audit(zoo.warning_extension_op, reps=2)
    (f,) = _only(report, "opaudit_zoo.warn_nondet_add.default")
    assert f.verdict is Verdict.WARNS
    assert f.strict_error is None
    assert "does not have a deterministic implementation" in f.warnings[0]


def test_clean_mlp_step_with_dropout_is_random_not_diverging():
    _, step = zoo.make_mlp_step()
    report = opaudit.audit(step, reps=3)
    assert not report.findings(at_least="warns")
    random_ops = {f.op for f in report.findings(verdicts=["random"])}
    assert any("dropout" in op or "bernoulli" in op for op in random_ops), random_ops
    assert report.findings(verdicts=["stable"])
    assert all(f.rng for f in report.findings(verdicts=["random"]))


def test_forgotten_manual_seed_makes_ops_random_and_the_report_says_seed_it():
    _, step = zoo.make_mlp_step(seed=None)
    report = opaudit.audit(step, reps=3)
    random_findings = report.findings(verdicts=["random"])
    assert random_findings
    assert not report.findings(verdicts=["diverges", "diverges_deterministic"])
    assert all("manual_seed" in f.remedy for f in random_findings)


def test_empty_is_uninitialized_and_not_replayed():
    report = opaudit.audit(zoo.empty_outputs, reps=2)
    unin = report.findings(verdicts=["uninitialized"])
    assert {f.op for f in unin} == {"aten.empty.memory_format", "aten.empty_like.default"}
    assert all(f.default_diverged == "" for f in unin)
    assert any("fill_uninitialized_memory" in w for w in report.env_warnings)


def test_replay_failure_is_skipped_with_the_error_and_the_audit_goes_on():
    report = opaudit.audit(zoo.one_shot_op, reps=2)
    (f,) = _only(report, "opaudit_zoo.one_shot.default")
    assert f.verdict is Verdict.SKIPPED
    assert f.reason == "replay failed: RuntimeError: one_shot: stream already consumed"


def test_collective_is_skipped_not_replayed():
    report = opaudit.audit(zoo.collective_op, reps=2)
    (f,) = [f for f in report.all_findings if f.op.startswith("c10d.")]
    assert f.verdict is Verdict.SKIPPED and f.reason == "collective"


def test_capture_budget_skips_with_reason_and_drops_nothing():
    report = opaudit.audit(zoo.accumulate_put, reps=2, capture_budget=1024)
    (f,) = _only(report, "aten.put_.default")
    assert f.verdict is Verdict.SKIPPED and f.reason == "capture budget"
    assert report.summary["skipped"] >= 1


def test_summary_counts_add_up():
    _, step = zoo.make_mlp_step()
    report = opaudit.audit(step, reps=2)
    s = report.summary
    assert sum(s[v.value] for v in Verdict) == s["signatures"] == len(report.all_findings)
    assert sum(f.calls for f in report.all_findings) + s["view_calls"] == s["total_calls"]


def test_max_abs_diff_of_infinities_and_nans_is_inf_not_the_largest_double():
    import math

    from opaudit.aten.bitwise import difference

    one = torch.ones(3)
    pos, neg = one / torch.zeros(3), one / -torch.zeros(3)  # +inf and -inf, as a kernel would give them
    nan = torch.zeros(3) / torch.zeros(3)
    for a, b in ((pos, neg), (pos, one), (neg, one), (one, nan)):
        assert difference(a, b).max_abs_diff == math.inf, (a, b)
        assert difference(a.to(torch.complex64), b.to(torch.complex64)).max_abs_diff == math.inf
    assert difference(pos, pos).max_abs_diff == 0.0
    assert difference(math.inf, -math.inf).max_abs_diff == math.inf
    assert difference(math.nan, 1.0).max_abs_diff == math.inf
    assert difference(2.0, 1.5).max_abs_diff == 0.5
