"""One sweep task: record an OpInfo entry's (or module's) samples, replay and classify them like an audit,
and key the findings into catalog entries. Runs in the worker process (or in process with ``--in-process``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from opaudit.data.catalog import FAILED, INPUT_KINDS, OK, OPINFO, PARTIAL, STRESS, CatalogEntry, SweptOp
from opaudit.flows.catalog.cases import module_cases, opinfo_cases, run_case
from opaudit.flows.catalog.config import SweepConfig
from opaudit.flows.catalog.entries import entry_from_finding, first_line, merge_entries
from opaudit.flows.catalog.select import OPINFO_TASK, Task, databases
from opaudit.flows.catalog.stress import is_index, tensor_leaves

CAPTURE_BUDGET = 1024**3


ALARM_GRACE_S = 5.0
"""After the op time limit plus this, Python code of the op is interrupted (see :func:`_alarm`)."""


@dataclass(frozen=True)
class TaskResult:
    """What sweeping one task produced."""

    swept: SweptOp
    entries: tuple[CatalogEntry, ...]


def _has_index(snap: Any) -> bool:
    args, kwargs, _ = snap.materialize()
    return any(is_index(t) for t in tensor_leaves((args, kwargs)))


def _replay_until(deadline: float, index_reps: int = 0) -> Callable[..., Any]:
    """The pipeline's replay, cut off at ``deadline``; signatures with an integer index
    argument get ``index_reps`` runs per mode when that is more."""
    from opaudit.data.observation import Observation
    from opaudit.engine.replay import replay

    def run(func: Any, snap: Any, reps: int, cudnn: bool) -> Observation:
        if time.monotonic() > deadline:
            return Observation(None, None, (), None, None, False, error="op time limit reached")
        if index_reps > reps and _has_index(snap):
            # Colliding writes race only now and then (a few runs in twenty on two busy
            # cores), so the ops that take indices get more chances to show it.
            reps = index_reps
        return replay(func, snap, reps, cudnn_variants=cudnn)

    return run


@dataclass(frozen=True)
class KindResult:
    """What one input kind (OpInfo's samples, or stress ones) of a task gave."""

    entries: tuple[CatalogEntry, ...]
    """One entry per key, already merged within this kind."""
    ran: int
    """Samples that ran."""
    note: str = ""
    """Why there is no sample of this kind, e.g. ``no stress input (...)``."""
    error: str = ""
    """The first error of a sample or of the sample generator."""
    cut: bool = False
    """The soft time limit stopped the samples short."""


def sweep_task(task: Task, cfg: SweepConfig) -> TaskResult:
    """Sweep one OpInfo entry or module for one dtype: record OpInfo and stress samples,
    replay and classify through :func:`opaudit.flows.pipeline.build_report`, and key the findings.

    Never raises for the op's own failures: they become the task's status and reason.
    """
    import torch

    deadline = time.monotonic() + cfg.op_timeout
    dtype = getattr(torch, task.dtype)
    opinfos, module_infos = databases()
    info = opinfos.get(task.source) if task.kind == OPINFO_TASK else module_infos.get(task.source)
    if info is None:
        return TaskResult(SweptOp(task.label, task.dtype, FAILED, reason="not in this torch's OpInfo database"), ())
    kinds = INPUT_KINDS if cfg.stress else (OPINFO,)
    results: dict[str, KindResult] = {}
    cut = False
    gen = torch.Generator().manual_seed(cfg.seed)
    with _alarm(cfg.op_timeout + ALARM_GRACE_S):
        try:
            for kind in kinds:
                if time.monotonic() > deadline:
                    cut = True
                    break
                results[kind] = _sweep_kind(task, info, kind, dtype, cfg, deadline, gen)
        except _OpTimeLimit:
            cut = True
    entries: dict[tuple, CatalogEntry] = {}
    for r in results.values():
        for e in r.entries:
            entries[e.key] = merge_entries(entries[e.key], e, same_sweep=True) if e.key in entries else e
    cut = cut or any(r.cut for r in results.values()) or any(
        e.error == "replay failed: op time limit reached" for e in entries.values())
    first_error = next((r.error for r in results.values() if r.error), "")
    counts = {kind: results[kind].ran if kind in results else 0 for kind in (OPINFO, STRESS)}
    ran = counts[OPINFO] + counts[STRESS]
    if ran == 0:
        status, reason = FAILED, first_error or ("time limit reached before any sample ran" if cut else "no sample ran")
    elif cut:
        status, reason = PARTIAL, f"time limit of {cfg.op_timeout:g}s reached"
    else:
        status, reason = OK, "; ".join(r.note for r in results.values() if r.note)
    swept = SweptOp(task.label, task.dtype, status, counts[OPINFO], counts[STRESS], reason)
    return TaskResult(swept, tuple(entries[k] for k in sorted(entries)))


def _sweep_kind(task: Task, info: Any, kind: str, dtype: Any, cfg: SweepConfig, deadline: float,
                gen: Any) -> KindResult:
    """Record one input kind of a task, then replay and classify it like an audit."""
    import warnings

    import torch

    from opaudit.engine.record import Recorder
    from opaudit.flows.pipeline import build_report

    first_error, cut, ran, note = "", False, 0, ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                make = opinfo_cases if task.kind == OPINFO_TASK else module_cases
                cases, note = make(info, cfg.device, dtype, cfg, kind, task.form)
            except Exception as e:  # OpInfo refusing its own samples is a result
                cases, note = [], ""
                first_error = f"{kind} samples: {error_line(e)}"
            # One capture per signature: a catalog entry describes the op on its sample inputs.
            rec = Recorder(capture_budget=CAPTURE_BUDGET, captures_per_signature=1)
            for case in cases:
                if time.monotonic() > deadline:
                    cut = True
                    break
                try:
                    torch.manual_seed(cfg.seed)
                    run_case(rec, case, gen, cfg.device)
                    ran += 1
                except Exception as e:
                    first_error = first_error or f"{kind} {case.label}: {error_line(e)}"
            try:
                report = build_report(rec, reps=cfg.reps, seed=cfg.seed, remedies=False, timings=False,
                                      replay_fn=_replay_until(deadline, cfg.index_reps if kind == STRESS else 0))
            finally:
                rec.release()
    except _OpTimeLimit:
        # Past the soft deadline already: what this kind recorded is dropped, what ran is counted.
        return KindResult((), ran, note, first_error, cut=True)
    entries: dict[tuple, CatalogEntry] = {}
    for f in report.all_findings:
        e = entry_from_finding(f, kind, task.label)
        entries[e.key] = merge_entries(entries[e.key], e, same_sweep=True) if e.key in entries else e
    return KindResult(tuple(entries.values()), ran, note, first_error, cut)


class _OpTimeLimit(BaseException):
    """Raised by the alarm when an op overruns its time limit in Python code (sample
    generation, a Python-level op). A BaseException so that the ``except Exception``
    around each sample does not swallow it."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`_OpTimeLimit` after ``seconds`` (main thread only; else a no-op).

    A C++ kernel is not interrupted, only the Python code around it: the worker's hard
    limit covers the rest.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise _OpTimeLimit()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def error_line(e: BaseException) -> str:
    line = first_line(str(e))
    return f"{type(e).__name__}: {line}"[:300] if line else type(e).__name__
