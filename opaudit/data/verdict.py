"""Verdicts: what opaudit concluded about one op signature, ordered by severity."""

from __future__ import annotations

import enum
from collections.abc import Iterable


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
    Verdict.WARNS: "warns under warn_only=True but strict mode does not raise, and no run diverged",
    Verdict.RANDOM: "draws from the RNG; identical when the RNG is seeded (seed it to reproduce)",
    Verdict.UNINITIALIZED: "returns uninitialized memory; its bits mean nothing",
    Verdict.SKIPPED: "not replayed; the reason says why",
    Verdict.STABLE: "identical in every run in both modes",
}

FAILING_DEFAULT = (Verdict.RAISES, Verdict.DIVERGES, Verdict.DIVERGES_DETERMINISTIC)
"""Verdicts that fail an audit unless ``--fail-on`` says otherwise."""


def verdict_counts(verdicts: Iterable[Verdict]) -> dict[str, int]:
    """How many of each verdict, every verdict present (zero when absent), in severity order."""
    counts = {v.value: 0 for v in Verdict}
    for v in verdicts:
        counts[v.value] += 1
    return counts
