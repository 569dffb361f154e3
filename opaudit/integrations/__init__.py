"""Audit steps K..K+N of a framework's own training loop, from a callback.

* :class:`HuggingFaceCallback`: a ``transformers.TrainerCallback`` for ``Trainer.train()``;
* :class:`LightningCallback`: a ``lightning.pytorch.Callback`` for ``Trainer.fit()``.

>>> trainer = transformers.Trainer(..., callbacks=[HuggingFaceCallback("audit.yaml", start_step=100)])

Both are imported on first use, so ``import opaudit.integrations`` needs neither
framework; install them with ``pip install 'opaudit[integrations]'``. The shared
mechanism, framework-free, is :class:`~opaudit.integrations.steps.StepAudit`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HuggingFaceCallback", "LightningCallback", "StepAudit"]


def __getattr__(name: str) -> Any:
    if name == "HuggingFaceCallback":
        from opaudit.integrations.huggingface import HuggingFaceCallback

        return HuggingFaceCallback
    if name == "LightningCallback":
        from opaudit.integrations.lightning import LightningCallback

        return LightningCallback
    if name == "StepAudit":
        from opaudit.integrations.steps import StepAudit

        return StepAudit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
