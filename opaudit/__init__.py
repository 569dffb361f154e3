"""opaudit: an op-level nondeterminism auditor for PyTorch.

Record every aten op a step runs, replay each unique signature under PyTorch's
determinism modes, and report which ops raise, warn or give different bits.

>>> import opaudit
>>> report = opaudit.audit(train_step)
>>> assert not report.findings(at_least="diverges")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Recorder", "Report", "Finding", "Verdict", "audit", "load_report", "__version__"]

if TYPE_CHECKING:
    from opaudit.classify import Verdict
    from opaudit.pipeline import audit
    from opaudit.record import Recorder
    from opaudit.report import Finding, Report
    from opaudit.report import load as load_report

_LAZY = {
    "Recorder": ("opaudit.record", "Recorder"),
    "Report": ("opaudit.report", "Report"),
    "Finding": ("opaudit.report", "Finding"),
    "Verdict": ("opaudit.classify", "Verdict"),
    "audit": ("opaudit.pipeline", "audit"),
    "load_report": ("opaudit.report", "load"),
}


def __getattr__(name: str) -> Any:
    # Lazy so that ``import opaudit`` does not import torch until it is used.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'opaudit' has no attribute {name!r}")
