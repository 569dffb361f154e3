"""Whole-step reproducibility: run the user's step K times from identical state and compare.

Each run re-executes the script from scratch (a fresh module load, the same seed),
so the model, the optimizer and the inputs start from the same state every time.
The recorder's dispatch mode (:class:`~opaudit.engine.mode.Interception`) hands every
op to a tracer here that digests its inputs and outputs in execution order; after the step, the entry's return value and every parameter's
value and gradient are kept. Run 1 is then compared with each later run:

* the **root cause** is the first op whose outputs differ although all its
  inputs were identical, pinned to the user's source line (backward ops to the
  forward line that created them);
* every other op whose outputs differ is counted as downstream damage;
* if the runs took different op sequences, the check reports where they first
  part instead of failing; ops that compute nothing (views, allocations,
  profiler ``record_function`` markers, which a DataLoader's workers make land
  at different places) do not count;
* return values, gradients, parameters, buffers and optimizer state that differ
  are listed: those reachable from the module's globals, and every parameter,
  module and optimizer the traced step used (``def main(): model = ...``).

The check runs once with ``torch.use_deterministic_algorithms(False)`` and once
with ``True`` (``warn_only=True``, so ops without a deterministic implementation
still run): together they answer "does deterministic mode make my step
reproducible?". Global flags and RNG states are restored afterwards.

A step that calls ``torch.compile``d code is checked as it runs compiled: the
dispatch mode would make Dynamo run it eagerly (see :mod:`opaudit.engine.compiled`),
so once the first traced run shows compiled code, every run is made without it
(:class:`Untraced`) and only the final tensors are compared; in deterministic
mode ``torch._inductor.config.deterministic`` is on as well.

The package: the tracer (:mod:`opaudit.engine.tracer`, shared with ``opaudit trace``), :mod:`~opaudit.flows.runcheck.state`
(what a run leaves and how two states differ), :mod:`~opaudit.flows.runcheck.check` (runs, comparison,
summary), and what collectives (:mod:`~opaudit.flows.runcheck.collectives`) and compiled steps
(:mod:`~opaudit.flows.runcheck.compiled`) add.
"""

from opaudit.flows.runcheck.check import (
    DEFAULT,
    DEFAULT_RUNS,
    DETERMINISTIC,
    MODES,
    RunCheckError,
    run_check,
    run_checks,
    whole_run,
)

__all__ = ["DEFAULT", "DEFAULT_RUNS", "DETERMINISTIC", "MODES", "RunCheckError", "run_check", "run_checks", "whole_run"]
