"""opaudit: an op-level nondeterminism auditor for PyTorch.

Record every aten op a step runs, replay each unique signature under PyTorch's
determinism modes, and report which ops raise, warn or give different bits.

>>> import opaudit
>>> report = opaudit.audit(train_step)
>>> assert not report.findings(at_least="diverges")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opaudit.data.version import __version__

__all__ = ["Recorder", "Report", "Finding", "Verdict", "audit", "batch_invariance", "build_report", "load_report", "__version__"]

if TYPE_CHECKING:
    from opaudit.data.findings import Finding
    from opaudit.data.report import Report
    from opaudit.data.report import load as load_report
    from opaudit.data.verdict import Verdict
    from opaudit.engine.record import Recorder
    from opaudit.flows.batchinv import batch_invariance
    from opaudit.flows.pipeline import build_report
    from opaudit.flows.run import audit

_LAZY = {
    "Recorder": ("opaudit.engine.record", "Recorder"),
    "Report": ("opaudit.data.report", "Report"),
    "Finding": ("opaudit.data.findings", "Finding"),
    "Verdict": ("opaudit.data.verdict", "Verdict"),
    "audit": ("opaudit.flows.run", "audit"),
    "build_report": ("opaudit.flows.pipeline", "build_report"),
    "batch_invariance": ("opaudit.flows.batchinv", "batch_invariance"),
    "load_report": ("opaudit.data.report", "load"),
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
