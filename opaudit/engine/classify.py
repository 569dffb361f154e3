"""Classification: turn what a replay observed into one verdict per signature."""

from __future__ import annotations

from opaudit.aten.ops import OpKind
from opaudit.data.observation import CUBLAS_WORKSPACE, NO_DETERMINISTIC_IMPL, NotReplayed, Observation
from opaudit.data.verdict import Verdict
from opaudit.engine.record import RecordedSignature


def classify(sig: RecordedSignature, obs: Observation | None) -> tuple[Verdict, str]:
    """The verdict for ``sig`` and, for ``skipped``, the reason (for an op whose output
    is only partly uninitialized, which output and how much of it).

    ``obs`` is ``None`` when the op was not replayed, and a
    :class:`~opaudit.data.observation.NotReplayed` when its replay crashed or timed out.
    """
    if sig.kind is OpKind.UNINITIALIZED:
        return Verdict.UNINITIALIZED, ""
    if sig.skip_reason:
        return Verdict.SKIPPED, sig.skip_reason
    if obs is None:
        return Verdict.SKIPPED, "not replayed"
    if isinstance(obs, NotReplayed):
        return Verdict.SKIPPED, obs.reason
    if obs.strict_kind in (NO_DETERMINISTIC_IMPL, CUBLAS_WORKSPACE):
        return Verdict.RAISES, ""
    if obs.error is not None or obs.default is None or obs.deterministic is None:
        return Verdict.SKIPPED, f"replay failed: {obs.error or obs.strict_error}"
    # Observed, not taken from the op's ``nondeterministic_seeded`` tag: its arguments
    # can switch the randomness off (SDPA or dropout with p=0, dropout in eval mode).
    random = obs.rng_used
    if obs.default.diverges:
        if obs.deterministic.diverges:
            return Verdict.DIVERGES_DETERMINISTIC, ""
        return Verdict.DIVERGES, ""
    if obs.deterministic.diverges:
        return Verdict.DIVERGES_DETERMINISTIC, ""
    # After the divergences: CUDA's flash attention backward diverges by default, runs
    # deterministically under strict mode and only warns under ``warn_only``: ``diverges``
    # (deterministic mode fixes it) says more than ``warns``; its warnings stay on the finding.
    if obs.warnings:
        return Verdict.WARNS, ""
    if random:
        return Verdict.RANDOM, ""
    if obs.unwritten:
        return Verdict.UNINITIALIZED, "; ".join(str(u) for u in obs.unwritten)
    return Verdict.STABLE, ""

