"""Building a catalog: select the tasks, run each (resuming from a partial file), merge the results."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opaudit.data.catalog import ALL_DTYPES, CRASHED, Catalog, CatalogEntry, SweptOp, load_catalog, swept_order
from opaudit.data.fileio import write_output
from opaudit.data.files import dump_yaml
from opaudit.flows.catalog.config import (
    DEFAULT_DTYPES,
    SweepConfig,
)
from opaudit.flows.catalog.entries import CatalogError, merge_entries
from opaudit.flows.catalog.runner import InProcessRunner, WorkerRunner, worker_memory_limit
from opaudit.flows.catalog.select import check_device, parse_dtypes, select_tasks
from opaudit.flows.catalog.sweep import TaskResult

PARTIAL_EVERY_S = 20.0
"""The partial file is rewritten at most this often while the sweep runs (and once more on Ctrl-C)."""


@dataclass(frozen=True)
class SweepProgress:
    """Where a running sweep stands; passed to an ``on_progress`` callback."""

    done: int
    total: int
    op: str
    """The task just finished (``source:dtype``)."""
    status: str


@dataclass
class _Accumulator:
    """Entries and swept ops so far (mutable, private to :func:`build_catalog`)."""

    entries: dict[tuple, CatalogEntry] = field(default_factory=dict)
    swept: dict[str, SweptOp] = field(default_factory=dict)

    def add(self, result: TaskResult) -> None:
        self.swept[result.swept.task_id] = result.swept
        for e in result.entries:
            self.entries[e.key] = merge_entries(self.entries[e.key], e) if e.key in self.entries else e

    def catalog(self, env: Mapping[str, Any], settings: Mapping[str, Any], complete: bool) -> Catalog:
        return Catalog(environment=env, settings=settings,
                       entries=tuple(self.entries[k] for k in sorted(self.entries)),
                       swept=tuple(sorted(self.swept.values(), key=swept_order)), complete=complete)


_RESUME_KEYS = ("torch", "cuda", "cudnn", "gpu", "cpu", "threads", "platform")
"""Fingerprint fields a resumed sweep must share with its partial file."""


def _check_resume(partial: Catalog, path: str, settings: Mapping[str, Any], env: Mapping[str, Any]) -> None:
    for k in ("device", "dtypes", "reps", "stress", "stress_elements", "stress_samples", "index_reps", "max_samples",
              "seed"):
        if partial.settings.get(k) != settings.get(k):
            raise CatalogError(f"{path}: cannot resume: it was made with {k}={partial.settings.get(k)!r}, "
                               f"this sweep uses {settings.get(k)!r} (start over without --resume)")
    for k in _RESUME_KEYS:
        if partial.environment.get(k) != env.get(k):
            raise CatalogError(f"{path}: cannot resume: it was made with {k}={partial.environment.get(k)!r}, "
                               f"this machine has {env.get(k)!r} (start over without --resume)")


def partial_path(output: str) -> str:
    """Where a sweep writing ``output`` keeps its partial file."""
    return output + ".partial"


@dataclass(frozen=True)
class CatalogRequest:
    """What to sweep, how, and where to keep the partial file: every option of ``opaudit catalog``."""

    config: SweepConfig = SweepConfig()
    """How each op is swept (device, replays, stress inputs, time limit...); its ``device`` is checked
    (``cuda`` becomes ``cuda:0``) before the sweep."""
    ops: tuple[str, ...] = ()
    """Globs over OpInfo names, aten names and modules (see :func:`select_tasks`); empty for every op."""
    dtypes: tuple[str, ...] | str = DEFAULT_DTYPES
    """Dtype names, or one comma-separated string (``float32,bfloat16``)."""
    modules: bool = True
    """Without ``ops``: also the ``torch.nn`` modules OpInfo does not cover."""
    resume: str | None = None
    """A partial file whose swept ops are kept and not swept again."""
    partial: str | None = None
    """Where the partial file is written (atomically, at most every :data:`PARTIAL_EVERY_S` seconds, and on
    Ctrl-C)."""
    isolate: bool = True
    """Each op in a worker process killed at the hard time limit; else here, with only the soft limit."""
    threads: int | None = None
    quiet_worker: bool = True
    """Discard the worker's stderr."""
    batch_invariance: bool = False
    """After the sweep, run the batch-invariance probes (:mod:`opaudit.flows.catalog.batch`) here, for the
    probes ``ops`` selects."""
    shard: tuple[int, int] | None = None
    """``(index, count)``: sweep only every ``count``-th selected task from ``index`` on (one rank of a
    sharded sweep, see :mod:`opaudit.flows.distributed.shard`). Not part of the catalog's settings: the
    shards of one sweep merge into the catalog a single sweep makes."""


def build_catalog(request: CatalogRequest, on_progress: Callable[[SweepProgress], None] | None = None) -> Catalog:
    """Sweep the ops ``request`` selects and return the :class:`Catalog`.

    A ``KeyboardInterrupt`` writes the partial file (if ``request.partial``) before propagating.
    """
    if request.config.reps < 1:
        raise CatalogError("reps must be at least 1")
    if request.config.op_timeout <= 0:
        raise CatalogError("the op time limit must be positive")
    device = check_device(request.config.device)
    dtype_names = parse_dtypes(request.dtypes)
    patterns = tuple(p.strip() for p in request.ops if p.strip())
    cfg = dataclasses.replace(request.config, device=device)
    tasks = select_tasks(device, patterns, dtype_names, modules=request.modules)
    if request.shard is not None:
        index, count = request.shard
        tasks = tasks[index::count]
    settings = cfg.settings(dtype_names, patterns, request.modules)
    if request.isolate:
        settings["worker_memory_gib"] = round(worker_memory_limit() / 1024**3, 1)
    acc = _Accumulator()
    prior: Catalog | None = None
    if request.resume is not None:
        if not os.path.exists(request.resume):
            raise CatalogError(f"--resume: no partial file at {request.resume}")
        prior = load_catalog(request.resume)
    runner: WorkerRunner | InProcessRunner
    if request.isolate:
        runner = WorkerRunner(cfg, quiet=request.quiet_worker, threads=request.threads)
        runner.start()
    else:
        runner = InProcessRunner(cfg, threads=request.threads)
    env = dict(runner.environment)
    try:
        if prior is not None:
            _check_resume(prior, request.resume or "", settings, env)
            for s in prior.swept:
                acc.swept[s.task_id] = s
            for e in prior.entries:
                acc.entries[e.key] = e
        todo = [t for t in tasks if t.task_id not in acc.swept]
        done = len(tasks) - len(todo)
        last_write = time.monotonic()
        hard_limit = cfg.op_timeout * 1.5 + 30
        try:
            for i, task in enumerate(todo):
                result = runner.run(task, hard_limit)
                if request.isolate and result.swept.status == CRASHED:
                    # Once more in the fresh worker: a crash can come from the state an
                    # earlier op left behind (a failed allocation deep in a kernel).
                    result = runner.run(task, hard_limit)
                acc.add(result)
                if on_progress is not None:
                    on_progress(SweepProgress(done + i + 1, len(tasks), task.task_id, result.swept.status))
                if request.partial and time.monotonic() - last_write > PARTIAL_EVERY_S:
                    _write_partial(request.partial, acc.catalog(env, settings, complete=False))
                    last_write = time.monotonic()
        except KeyboardInterrupt:
            if request.partial:
                _write_partial(request.partial, acc.catalog(env, settings, complete=False))
            raise
    finally:
        runner.stop()
    catalog = acc.catalog(env, settings, complete=True)
    if request.batch_invariance:
        from opaudit.flows.catalog.batch import BATCH, BATCH_DTYPES, ROWS, probe_batch_invariance

        # ``--dtypes all``: the probes' own floating dtypes (their inputs are floating).
        probed = BATCH_DTYPES if dtype_names == (ALL_DTYPES,) else dtype_names
        entries = probe_batch_invariance(device, probed, patterns, request.threads)
        settings["batch_invariance"] = {"batch": BATCH, "rows": list(ROWS)}
        catalog = dataclasses.replace(catalog, settings=settings, batch_invariance=entries)
    return catalog


def _write_partial(path: str, catalog: Catalog) -> None:
    write_output(path, dump_yaml(catalog.to_dict()))
