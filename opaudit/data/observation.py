"""What a replay observed, before any verdict: run statistics, errors, warnings, or why it did not run."""

from __future__ import annotations

from dataclasses import dataclass

NO_DETERMINISTIC_IMPL = "no_deterministic_impl"
CUBLAS_WORKSPACE = "cublas_workspace"
OTHER_ERROR = "error"

TIMEOUT = "timeout"
"""Reason of a signature whose replay ran past the per-op timeout."""

CRASHED = "crashed"
"""Prefix of the reason of a signature whose replay killed or poisoned its worker."""


@dataclass(frozen=True)
class RunStats:
    """Bitwise comparison of ``runs`` replays against the first one."""

    runs: int
    differing: int
    """Runs whose bits differ from the first run."""
    max_abs_diff: float
    frac_differing: float
    """Largest fraction of output elements differing in any run."""
    median_s: float | None
    """Median seconds per call (CUDA synchronised)."""
    outputs: tuple[str, ...] = ()
    """The outputs that differed in any run (``output 1``, ``input self``: see :func:`opaudit.engine.replay.output_names`)."""

    @property
    def diverges(self) -> bool:
        """True when any run differed from the first."""
        return self.differing > 0

    @property
    def ratio(self) -> str:
        """``k/N`` text."""
        return f"{self.differing}/{self.runs}"


@dataclass(frozen=True)
class Unwritten:
    """Part of one output that the kernel leaves as uninitialized memory.

    Found as the elements that differed between default-mode runs and that hold the
    value ``fill_uninitialized_memory`` writes (NaN, or an integer dtype's largest
    value) when the op runs in deterministic mode: memory no run ever wrote
    (``nn.CTCLoss``'s ``log_alpha`` past each sequence's length).
    """

    output: str
    """Which output, as :func:`opaudit.engine.replay.output_names` names it."""
    elements: int
    """Elements holding the fill value under deterministic mode."""
    total: int
    """Elements of that output."""

    def __str__(self) -> str:
        return f"{self.output}: {self.elements} of {self.total} elements never written by the kernel"


@dataclass(frozen=True)
class Crossing:
    """One mode's first run here against the outputs a capsule's source computed in that mode."""

    differs: bool
    max_abs_diff: float | None = None
    """Largest |here - source| over the elements that differ; ``None`` when only digests were compared."""
    max_ulp: int | None = None
    """Largest distance in units in the last place among floating elements that differ (for integer
    outputs, the largest difference); ``None`` when not measurable (digests only, NaN against a number)."""
    frac_differing: float | None = None
    """Fraction of all output elements whose bits differ."""
    outputs: tuple[str, ...] = ()
    """The outputs that differ (``output 1``, ``input self``)."""
    error: str | None = None
    """Why there was nothing to compare (the source could not run the op in this mode)."""


@dataclass(frozen=True)
class Observation:
    """Everything one replay saw, before any verdict."""

    strict_kind: str | None
    """``no_deterministic_impl``, ``cublas_workspace``, ``error`` or ``None`` when strict ran."""
    strict_error: str | None
    warnings: tuple[str, ...]
    """Determinism warnings the deterministic-mode runs raised (``warn_only`` runs included), deduplicated, in order."""
    default: RunStats | None
    deterministic: RunStats | None
    rng_used: bool
    """The op advanced an RNG state."""
    error: str | None = None
    """Why the op could not be replayed at all, if it could not."""
    variants: tuple[tuple[str, RunStats], ...] = ()
    """cuDNN settings → stats, for cuDNN-backed ops on CUDA."""
    unwritten: tuple[Unwritten, ...] = ()
    """Output regions the kernel never writes. When set, every element that differed
    between default runs lay in them, and ``default`` compares only the rest."""
    across: tuple[tuple[str, Crossing], ...] = ()
    """Mode (``default``, ``deterministic``) → its first run against a capsule's source outputs,
    when the replay was given them (:func:`opaudit.engine.replay.replay`'s ``reference``)."""


@dataclass(frozen=True)
class NotReplayed(Observation):
    """An observation that holds no runs, only why: ``timeout`` or ``crashed: ...``.

    ``classify()`` turns it into ``skipped`` with ``reason`` as the reason, as it is,
    unlike ``Observation.error`` which it reports as ``replay failed: ...``.
    """

    reason: str = ""

    @classmethod
    def because(cls, reason: str) -> "NotReplayed":
        """An empty observation carrying ``reason``."""
        return cls(None, None, (), None, None, False, reason=reason)


def error_text(e: BaseException) -> str:
    """``TypeName: first line of the message``: how an error reads in a finding's reason."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
