"""Whole-step reproducibility: run the step K times per mode from a fresh load and compare run 1 with each other."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from opaudit.data.errors import OpauditError
from opaudit.data.report import RunCheck
from opaudit.engine import loader
from opaudit.engine.compiled import compiles_so_far
from opaudit.engine.globalstate import preserved_state, set_deterministic
from opaudit.engine.sites import SiteTracker
from opaudit.engine.tracer import Step, Tracer
from opaudit.engine.window import DEFAULT as WINDOW_DEFAULT
from opaudit.engine.window import Window, finalize, run_window, window_for
from opaudit.flows.runcheck.collectives import aligned_calls, summary
from opaudit.flows.runcheck.compiled import InductorDeterministic, Untraced, compiled_names
from opaudit.flows.runcheck.state import final_state, state_mismatches

DEFAULT, DETERMINISTIC = "default", "deterministic"
MODES = (DEFAULT, DETERMINISTIC)
"""The determinism settings a step is checked under, in report order."""

DEFAULT_RUNS = 2

_END = "<end of run>"


def whole_run(target: loader.Target) -> Window:
    """The window a check runs by default: the whole script, or the audit's default calls of the entry."""
    return window_for(target.entry is not None, None if target.entry is None else WINDOW_DEFAULT)


class RunCheckError(OpauditError):
    """The check cannot be set up: fewer than two runs, or an unknown mode."""


# -- one run ------------------------------------------------------------------
@dataclass(frozen=True)
class _Run:
    """What one run left behind: its op trace and its final tensors."""

    steps: tuple[Step, ...]
    state: dict[str, Any]
    """``return value[i]``, ``grad of model.x``, ``value of model.x`` → tensor or scalar."""
    sites: SiteTracker
    """Resolves the site ids in ``steps``."""
    error: str | None = None
    """Why the run stopped early (the user's code raised), if it did."""
    compiled: tuple[str, ...] = ()
    """The ``torch.compile``d modules and functions the run called (``module MLP``)."""
    compiles: int = 0
    """Graphs Dynamo compiled during the run."""

    def op_fields(self, i: int) -> dict[str, Any]:
        """Report fields of op ``i`` (0-based): number, op, site and phase."""
        step = self.steps[i]
        fields: dict[str, Any] = {"index": i + 1, "op": str(step.func)}
        if step.where is not None:
            phase, site = ", ".join(self.sites.phase_names(step.where[0])), self.sites.site(step.where[1])
            fields.update(where=site.location, function=site.function, module=site.module, phase=phase)
        return fields

    def location(self, i: int) -> str:
        """``file:line (phase)`` of op ``i``, or ``""``."""
        if i >= len(self.steps) or self.steps[i].where is None:
            return ""
        f = self.op_fields(i)
        return f"{f['where']} ({f['phase']})"


def _execute(target: loader.Target, mode: str, seed: int | None, *, keep_errors: bool,
             window: Window | None = None, compiled: bool = False) -> _Run:
    """Run the target once, from a fresh module load, under ``mode``, tracing ``window``'s steps.

    With ``keep_errors``, the user's code failing ends the run early with its
    error recorded instead of raising. With ``compiled``, the window runs
    untraced (:class:`Untraced`), so that ``torch.compile``d code runs compiled.
    """
    window = window or whole_run(target)
    set_deterministic(mode == DETERMINISTIC, warn_only=True)
    tracer: Any = Untraced(target.root) if compiled else Tracer(target.root)
    watch = tracer.compiled
    result: Any = None
    compiles = compiles_so_far()
    with loader.sandboxed(target):
        try:
            prepared = loader.prepare(target, seed)
            loader.require_no_arguments(target, prepared)
            namespace = prepared.namespace
            recorded, result = run_window(prepared, lambda: tracer, window, target.entry)
        except (loader.UserCodeError, loader.ScriptExitError) as e:
            if not keep_errors:
                raise
            return _Run(tuple(tracer.steps), {}, tracer.sites, error=str(e), compiled=compiled_names(watch),
                        compiles=compiles_so_far() - compiles)
    with _disable_current_modes(), torch.no_grad():
        state = final_state(result if target.entry is not None else None, namespace, tracer)
    if recorded.stopped is not None and target.entry is None:
        finalize(namespace)
    names = compiled_names(watch)
    watch.release()
    return _Run(tuple(tracer.steps), state, tracer.sites, compiled=names, compiles=compiles_so_far() - compiles)


@dataclass(frozen=True)
class _Comparison:
    """How one later run differs from run 1."""

    run: int
    """1-based number of the later run."""
    split: int | None
    """0-based op position where the sequences part, if they do."""
    split_info: dict[str, Any] | None
    differing: frozenset[int]
    """0-based positions, before any split, of ops whose outputs differ."""
    root: int | None
    """First of ``differing`` whose inputs were identical."""
    mismatches: tuple[tuple[str, str], ...]
    """``(key, description)`` of the final tensors that differ."""
    error: str | None
    """Why the later run stopped early, if it did."""
    collectives: tuple[tuple[int, bool, bool], ...] = ()
    """``(position in run 1, inputs differ, outputs differ)`` of each collective call before any split."""


def _compare(first: _Run, other: _Run, run: int) -> _Comparison:
    a, b = first.steps, other.steps
    # The path is the sequence of ops that compute. Views, profiler markers and
    # allocations compute nothing, and a DataLoader's workers make them land at
    # different places (``record_function`` markers; ``empty`` + ``set_`` as each
    # batch arrives from shared memory): they neither split the path nor shift the alignment.
    ca = [i for i, s in enumerate(a) if s.outs is not None]
    cb = [i for i, s in enumerate(b) if s.outs is not None]
    n = min(len(ca), len(cb))
    split = next((j for j in range(n) if a[ca[j]].func is not b[cb[j]].func), None)
    if split is None and len(ca) != len(cb):
        split = n
    split_info = None
    if split is not None:
        ia = ca[split] if split < len(ca) else len(a)
        ib = cb[split] if split < len(cb) else len(b)
        split_info = {
            "index": ia + 1,
            "runs": [1, run],
            "ops": [str(a[ia].func) if ia < len(a) else _END, str(b[ib].func) if ib < len(b) else _END],
            "where": [first.location(ia), other.location(ib)],
        }
    differing: set[int] = set()
    root = None
    for j in range(n if split is None else split):
        sa, sb = a[ca[j]], b[cb[j]]
        if sa.outs == sb.outs:
            continue
        differing.add(ca[j])
        if root is None and sa.ins == sb.ins:
            root = ca[j]
    # A run that raised has no final state to compare; its error says enough.
    mismatches = () if other.error else state_mismatches(first.state, other.state, run)
    stop = n if split is None else split
    return _Comparison(run, split, split_info, frozenset(differing), root, mismatches, other.error,
                       aligned_calls([(i, a[i]) for i in ca[:stop]], [b[j] for j in cb[:stop]]))


def _summarise(mode: str, runs: int, first: _Run, comparisons: list[_Comparison],
               compiles: int | None = None, inductor_deterministic: bool | None = None) -> RunCheck:
    differing = frozenset().union(*(c.differing for c in comparisons))
    mismatches: dict[str, str] = {}
    for c in comparisons:
        for key, text in c.mismatches:
            mismatches.setdefault(key, text)  # each tensor once, as the first run that differed saw it
    roots = [c.root for c in comparisons if c.root is not None]
    root_cause = None
    if roots or differing:
        # Without a root, no traced op turned identical inputs into different
        # outputs: the difference came in from outside the ops (Python or NumPy
        # values, files, uninitialized memory); the first op that saw it is shown.
        i = min(roots) if roots else min(differing)
        root_cause = {**first.op_fields(i), "inputs_identical": bool(roots),
                      "downstream": sum(1 for j in differing if j > i)}
        if min(differing) < i:
            # Data from outside the ops already differed before the root cause.
            earlier = first.op_fields(min(differing))
            root_cause["first_difference"] = {k: earlier[k] for k in ("index", "op", "where") if k in earlier}
    splits = [c for c in comparisons if c.split is not None]
    path_split = min(splits, key=lambda c: (c.split, c.run)).split_info if splits else None
    error = "; ".join(f"run {c.run}: {c.error}" for c in comparisons if c.error) or None
    return RunCheck(
        mode=mode, runs=runs, ops=len(first.steps), differing_ops=len(differing),
        reproducible=not (differing or mismatches or path_split or error),
        root_cause=root_cause, path_split=path_split, mismatches=tuple(mismatches.values()), error=error,
        compared=len(first.state),
        collectives=summary(first.steps, first.location, [c.collectives for c in comparisons], root_cause),
        compiled=first.compiled if compiles is not None else (),
        compiles=compiles, inductor_deterministic=inductor_deterministic,
    )


# -- public -------------------------------------------------------------------
def run_check(
    target: loader.Target,
    mode: str = DEFAULT,
    runs: int = DEFAULT_RUNS,
    *,
    seed: int | None = 0,
    on_run: Callable[[str, int, int], None] | None = None,
    window: Window | None = None,
    compiled: bool | None = None,
) -> RunCheck:
    """Run ``target`` ``runs`` times from identical state under ``mode`` and compare the bits.

    ``mode`` is ``"default"`` (deterministic algorithms off) or ``"deterministic"``
    (on, with ``warn_only=True``). ``on_run(mode, i, runs)`` is called before run
    ``i`` (1-based). The user's code failing in the first run raises the loader's
    :class:`~opaudit.engine.loader.UserCodeError` or :class:`~opaudit.engine.loader.ScriptExitError`;
    a later run failing where the first did not is reported in ``RunCheck.error``.
    ``seed=None`` leaves the RNG unseeded, so ops that draw from it differ run to run.
    ``window`` picks the steps traced (the audit's own window, so a long script is
    stopped after it); by default the whole script, or one call of the entry.
    ``compiled=True`` checks a step that calls ``torch.compile``d code as it runs
    compiled (no dispatch mode: final tensors only; in deterministic mode with
    ``torch._inductor.config.deterministic`` on); ``None`` finds out from the
    first run, which is traced.
    """
    if mode not in MODES:
        raise RunCheckError(f"unknown mode {mode!r} (expected one of: {', '.join(MODES)})")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
        raise RunCheckError(f"a run check needs at least 2 runs, got {runs!r}")
    with preserved_state(), InductorDeterministic(mode == DETERMINISTIC and bool(compiled)) as inductor:
        if on_run is not None:
            on_run(mode, 1, runs)
        first = _execute(target, mode, seed, keep_errors=False, window=window, compiled=bool(compiled))
        if first.compiled and not compiled:
            # The traced run ran compiled code eagerly: check the step as it really runs, compiled.
            return run_check(target, mode, runs, seed=seed, on_run=on_run, window=window, compiled=True)
        compiles = first.compiles
        comparisons = []
        for k in range(2, runs + 1):
            if on_run is not None:
                on_run(mode, k, runs)
            other = _execute(target, mode, seed, keep_errors=True, window=window, compiled=bool(compiled))
            compiles += other.compiles
            comparisons.append(_compare(first, other, k))
            del other
            gc.collect()  # the previous run's model and optimizer, before the next run builds its own
    if not compiled:
        return _summarise(mode, runs, first, comparisons)
    return _summarise(mode, runs, first, comparisons, compiles=compiles, inductor_deterministic=inductor)


def run_checks(
    target: loader.Target,
    runs: int = DEFAULT_RUNS,
    *,
    seed: int | None = 0,
    modes: Iterable[str] = MODES,
    on_run: Callable[[str, int, int], None] | None = None,
    window: Window | None = None,
) -> tuple[RunCheck, ...]:
    """:func:`run_check` under each of ``modes`` (default and deterministic), in that order.

    Whether the step runs compiled code is found out once, in the first mode.
    """
    out: list[RunCheck] = []
    compiled: bool | None = None
    for mode in modes:
        out.append(run_check(target, mode, runs, seed=seed, on_run=on_run, window=window, compiled=compiled))
        compiled = bool(out[-1].compiled)
    return tuple(out)
