"""A Hugging Face ``TrainerCallback`` that audits steps K..K+N of ``Trainer.train()``."""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from opaudit.engine.window import DEFAULT_STEPS
from opaudit.flows.pipeline import DEFAULT_REPS
from opaudit.integrations.steps import StepAudit


class HuggingFaceCallback(TrainerCallback):
    """Record optimizer steps ``start_step + 1 .. start_step + steps`` and write their audit to ``output``.

    >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[HuggingFaceCallback("audit.yaml")])

    A step is one optimizer step of the ``Trainer`` (``state.global_step``; with
    gradient accumulation, all its micro-batches). The report is written when the
    window's last step ends; training goes on unrecorded. An unwritable
    ``output`` raises :class:`~opaudit.integrations.steps.IntegrationError` here,
    before training starts. Under ``torchrun`` or ``accelerate launch`` every
    process records its own steps: give each rank its own ``output`` (e.g. with
    ``args.process_index`` in the name).
    """

    def __init__(self, output: str | os.PathLike[str], *, steps: int = DEFAULT_STEPS, start_step: int = 0,
                 reps: int = DEFAULT_REPS, seed: int = 0, format: str | None = None) -> None:
        self.audit = StepAudit(output, steps=steps, start_step=start_step, reps=reps, seed=seed, format=format,
                               framework="transformers")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.audit.step_begins(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.audit.step_ends(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.audit.training_ends(state.global_step)
