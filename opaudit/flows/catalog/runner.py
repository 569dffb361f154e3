"""Where sweep tasks run: in a worker process killed at a hard time limit, or in this process."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any

from opaudit.data.catalog import CRASHED, FAILED, TIMEOUT, SweptOp
from opaudit.engine.worker import TIMED_OUT, Worker, WorkerStartError, start_interpreter
from opaudit.flows.catalog.config import SweepConfig
from opaudit.flows.catalog.entries import CatalogError
from opaudit.flows.catalog.select import Task, databases
from opaudit.flows.catalog.sweep import TaskResult, error_line, sweep_task


def serve(fd: int) -> None:
    """Entry point of a sweep worker: read its settings, then sweep tasks until told to stop.

    Started with ``python -c`` rather than ``multiprocessing``'s spawn, which would
    re-run the caller's ``__main__`` in the worker.
    """
    import warnings
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    cfg, threads = conn.recv()
    _limit_memory(worker_memory_limit())
    warnings.simplefilter("ignore")
    import torch

    from opaudit.engine.environment import fingerprint

    if threads:
        torch.set_num_threads(threads)
    databases()
    conn.send(("ready", fingerprint(cfg.device)))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        try:
            result = sweep_task(task, cfg)
        except Exception as e:  # reported to the parent as this task's failure
            sys.stderr.write(traceback.format_exc(limit=5))
            result = TaskResult(SweptOp(task.label, task.dtype, FAILED, reason=f"sweep error: {error_line(e)}"), ())
        conn.send(("result", result))


def worker_memory_limit() -> int:
    """Bytes of heap a sweep worker may use: a quarter of this machine's memory, 2 to 16 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 1024**3
    return int(min(16 * 1024**3, max(2 * 1024**3, total // 4)))


def _limit_memory(limit: int) -> None:
    """Make allocations past ``limit`` fail in this process instead of exhausting the machine.

    A few OpInfo samples, scaled, ask an op for an output of many GiB; with the limit
    the op raises (the sample is dropped) rather than pushing the machine into swap or
    its OOM killer, which would take the user's other processes with it.
    """
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass


START_TIMEOUT = 300.0
"""Seconds a fresh sweep worker may take to import torch and PyTorch's OpInfo database."""

_SERVE = "import sys; from opaudit.flows.catalog.runner import serve; serve(int(sys.argv[1]))"


class WorkerRunner:
    """Runs tasks in a sweep worker process, killed at a hard time limit; a new one starts after a timeout
    or a crash."""

    def __init__(self, cfg: SweepConfig, *, quiet: bool, threads: int | None) -> None:
        self.cfg, self.quiet, self.threads = cfg, quiet, threads
        self._worker: Worker | None = None
        self.environment: Mapping[str, Any] = {}
        """The worker's fingerprint: the process that runs the ops is the one the catalog describes."""

    def start(self) -> None:
        """Start a worker and wait until it has imported torch and OpInfo."""
        worker = start_interpreter(_SERVE, quiet=self.quiet)
        worker.conn.send((self.cfg, self.threads))
        try:
            self.environment = worker.await_ready(START_TIMEOUT)
        except WorkerStartError as e:
            raise CatalogError(f"the sweep worker did not start ({e}); rerun with --debug to see its errors") from None
        self._worker = worker

    def run(self, task: Task, limit: float) -> TaskResult:
        """Sweep ``task`` in the worker; kill it after ``limit`` seconds."""
        if self._worker is None:
            self.start()
        worker = self._worker
        assert worker is not None
        try:
            worker.conn.send(task)
        except OSError:
            pass  # it died after the last task: reported below
        reply = worker.receive(time.monotonic() + limit)
        if reply is TIMED_OUT:
            self.stop()
            return TaskResult(SweptOp(task.label, task.dtype, TIMEOUT,
                                      reason=f"killed after {limit:.0f}s (hung or too slow)"), ())
        if reply is None:
            self._worker = None
            return TaskResult(SweptOp(task.label, task.dtype, CRASHED,
                                      reason=f"worker died ({worker.exit_reason()})"), ())
        return reply[1]

    def stop(self) -> None:
        """End the worker (politely, then by force)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop(lambda: worker.conn.send(None), grace=2.0)


class InProcessRunner:
    """Runs tasks in this process (``--in-process``): faster to start, but only the soft time limit applies
    and an op that crashes ends the sweep."""

    def __init__(self, cfg: SweepConfig, *, threads: int | None) -> None:
        import torch

        from opaudit.engine.environment import fingerprint

        self.cfg = cfg
        if threads:
            torch.set_num_threads(threads)
        self.environment: Mapping[str, Any] = fingerprint(cfg.device)

    def run(self, task: Task, limit: float) -> TaskResult:
        """Sweep ``task`` here (``limit`` is not enforced: a running kernel cannot be stopped)."""
        return sweep_task(task, self.cfg)

    def stop(self) -> None:
        """Nothing to stop."""
