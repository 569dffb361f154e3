"""Classification: turn what a replay observed into one verdict per signature."""

from __future__ import annotations

import enum

from opaudit.isolate import NotReplayed
from opaudit.ops import OpKind
from opaudit.record import RecordedSignature
from opaudit.replay import CUBLAS_WORKSPACE, NO_DETERMINISTIC_IMPL, Observation


class Verdict(str, enum.Enum):
    """What opaudit concluded about one op signature."""

    RAISES = "raises"
    DIVERGES_DETERMINISTIC = "diverges_deterministic"
    DIVERGES = "diverges"
    WARNS = "warns"
    RANDOM = "random"
    UNINITIALIZED = "uninitialized"
    SKIPPED = "skipped"
    STABLE = "stable"

    @property
    def severity(self) -> int:
        """Higher is worse; ``at_least`` filters compare these."""
        return _SEVERITY[self]

    @property
    def meaning(self) -> str:
        """One sentence for reports and ``--help``."""
        return MEANINGS[self]

    @classmethod
    def parse(cls, text: str) -> "Verdict":
        """``Verdict`` from its name; ``ValueError`` naming the choices otherwise."""
        try:
            return cls(text.strip())
        except ValueError:
            choices = ", ".join(v.value for v in cls)
            raise ValueError(f"unknown verdict {text.strip()!r} (choose from {choices})") from None


_SEVERITY = {
    Verdict.RAISES: 7, Verdict.DIVERGES_DETERMINISTIC: 6, Verdict.DIVERGES: 5, Verdict.WARNS: 4,
    Verdict.RANDOM: 3, Verdict.UNINITIALIZED: 2, Verdict.SKIPPED: 1, Verdict.STABLE: 0,
}

MEANINGS = {
    Verdict.RAISES: "raises under use_deterministic_algorithms(True): no deterministic implementation",
    Verdict.DIVERGES_DETERMINISTIC: "bits differ run to run even in deterministic mode, and no alert fires",
    Verdict.DIVERGES: "bits differ run to run; deterministic mode makes them identical",
    Verdict.WARNS: "warns under warn_only=True but strict mode does not raise",
    Verdict.RANDOM: "draws from the RNG; identical when the RNG is seeded (seed it to reproduce)",
    Verdict.UNINITIALIZED: "returns uninitialized memory; its bits mean nothing",
    Verdict.SKIPPED: "not replayed; the reason says why",
    Verdict.STABLE: "identical in every run in both modes",
}

FAILING_DEFAULT = (Verdict.RAISES, Verdict.DIVERGES, Verdict.DIVERGES_DETERMINISTIC)
"""Verdicts that fail an audit unless ``--fail-on`` says otherwise."""


def classify(sig: RecordedSignature, obs: Observation | None) -> tuple[Verdict, str]:
    """The verdict for ``sig`` and, for ``skipped``, the reason.

    ``obs`` is ``None`` when the op was not replayed, and a
    :class:`~opaudit.isolate.NotReplayed` when its replay crashed or timed out.
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
    if obs.warnings:
        return Verdict.WARNS, ""
    random = sig.kind is OpKind.RANDOM or obs.rng_used
    if obs.default.diverges:
        if obs.deterministic.diverges:
            return Verdict.DIVERGES_DETERMINISTIC, ""
        return Verdict.DIVERGES, ""
    if obs.deterministic.diverges:
        return Verdict.DIVERGES_DETERMINISTIC, ""
    if random:
        return Verdict.RANDOM, ""
    return Verdict.STABLE, ""

