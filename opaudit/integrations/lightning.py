"""A Lightning ``Callback`` that audits steps K..K+N of ``Trainer.fit()``."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.callbacks import Callback

from opaudit.engine.window import DEFAULT_STEPS
from opaudit.flows.pipeline import DEFAULT_REPS
from opaudit.integrations.steps import StepAudit


class LightningCallback(Callback):
    """Record optimizer steps ``start_step + 1 .. start_step + steps`` and write their audit to ``output``.

    >>> trainer = L.Trainer(max_steps=1000, callbacks=[LightningCallback("audit.yaml", start_step=100)])

    A step is one optimizer step (``trainer.global_step``); a window opens on
    the first batch of its first step and closes after the batch that completes
    its last. The report is written then; training goes on unrecorded. An
    unwritable ``output`` raises
    :class:`~opaudit.integrations.steps.IntegrationError` here, before training
    starts. With several processes (``torchrun``, ``devices=N``), give each rank
    its own ``output``.
    """

    def __init__(self, output: str | os.PathLike[str], *, steps: int = DEFAULT_STEPS, start_step: int = 0,
                 reps: int = DEFAULT_REPS, seed: int = 0, format: str | None = None) -> None:
        self.audit = StepAudit(output, steps=steps, start_step=start_step, reps=reps, seed=seed, format=format,
                               framework="lightning")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.audit.step_begins(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.audit.step_ends(trainer.global_step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.audit.training_ends(trainer.global_step)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.audit.close()
