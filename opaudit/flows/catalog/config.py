"""How a sweep runs each op: the defaults and :class:`SweepConfig`, which the worker receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_DTYPES = ("float32",)


DEFAULT_REPS = 3


DEFAULT_INDEX_REPS = 20
"""Replays per mode of a stress signature that takes an integer index argument."""


DEFAULT_OP_TIMEOUT = 60.0


DEFAULT_MAX_SAMPLES = 6
"""OpInfo samples recorded per op and dtype (the first ones OpInfo yields)."""


DEFAULT_STRESS_SAMPLES = 3
"""Stress samples recorded per op and dtype: the largest of each mode that run within :data:`STRESS_CALL_S`."""


STRESS_ELEMENTS = 1_000_000
"""Target size of a stress sample, in elements over all its tensors."""


@dataclass(frozen=True)
class SweepConfig:
    """How each op is swept; stored in the catalog's ``settings``."""

    device: str = "cpu"
    reps: int = DEFAULT_REPS
    stress: bool = True
    op_timeout: float = DEFAULT_OP_TIMEOUT
    max_samples: int = DEFAULT_MAX_SAMPLES
    stress_samples: int = DEFAULT_STRESS_SAMPLES
    stress_elements: int = STRESS_ELEMENTS
    index_reps: int = DEFAULT_INDEX_REPS
    seed: int = 0

    def settings(self, dtypes: tuple[str, ...], ops: tuple[str, ...], modules: bool) -> dict[str, Any]:
        """The catalog's ``settings`` mapping."""
        return {
            "device": self.device, "dtypes": list(dtypes), "ops": list(ops) or ["*"],
            "modules": modules and not ops, "reps": self.reps,
            "stress": self.stress, "stress_elements": self.stress_elements if self.stress else 0,
            "stress_samples": self.stress_samples if self.stress else 0, "max_samples": self.max_samples,
            "index_reps": self.index_reps if self.stress else 0, "op_timeout_s": self.op_timeout,
            "seed": self.seed,
            "grad": "standard normal (non-uniform)",
        }
