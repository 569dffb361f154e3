"""Recording in forked child processes: a ``DataLoader``'s worker processes.

A worker is forked from the recording process while the recording mode is on the
stack of the thread that forks, which is the child's only thread: its ops reach
the child's copy of the :class:`~opaudit.engine.record.Recorder`. At the fork that copy
forgets what the parent recorded. A ``multiprocessing`` child (every
``DataLoader`` worker) ships what it recorded into a private folder of the
parent's twice over: when the parent's recording ends, whether or not the worker
still runs (a window of steps ends mid-epoch; ``persistent_workers=True``), and
when it exits normally (``multiprocessing`` runs its finalizers). The parent asks
for the first through a pipe that a thread of the worker waits on, and waits
for every worker still alive to answer, or to end, before it merges the shipments.

A child that never ships is counted, with the reason, so that the report can say
why its ops went unrecorded: forked with a bare ``os.fork`` (only
``multiprocessing`` processes ship), ended before shipping (killed, ``os._exit``),
or still busy when the wait ran out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
import weakref
from typing import Any

_SUFFIX = ".opaudit-child"
_WORKER = ".worker"
"""Marker a ``multiprocessing`` child leaves: it will ship, and answers the parent's request."""
_ANSWERED = ".answered"
"""Marker a worker leaves once it shipped at the parent's request."""

_WORKER_LOOP_FILE = os.path.join("data", "_utils", "worker.py")

ANSWER_SECONDS = 30.0
"""How long the parent waits, when its recording ends, for its live workers to ship."""

_active: weakref.ReferenceType[ChildProcesses] | None = None
"""The children tracker of the recorder recording now, if any (one at a time per process)."""
_hooks_installed = False
_lock = threading.Lock()


def _after_fork_in_parent() -> None:
    tracker = _active() if _active is not None else None
    if tracker is not None and tracker.owner_pid == os.getpid():
        tracker.forked += 1


def _after_fork_in_child() -> None:
    tracker = _active() if _active is not None else None
    if tracker is not None:
        tracker.in_child()


def _busy_worker_loop() -> bool:
    """Whether this process's main thread runs a ``DataLoader`` worker loop that has tasks left.

    Idle is the loop waiting in ``index_queue.get`` (blocked in ``select``) with
    nothing queued: no more task can start until the parent sends one. Read from
    the main thread's frames (torch's ``_worker_loop`` and its ``index_queue``);
    a process that runs something else is never busy here.
    """
    main = threading.main_thread().ident
    inner = sys._current_frames().get(main) if main is not None else None
    f = inner
    while f is not None and not (f.f_code.co_name == "_worker_loop"
                                 and f.f_code.co_filename.endswith(_WORKER_LOOP_FILE)):
        f = f.f_back
    if f is None or inner is None:
        return False
    queue = f.f_locals.get("index_queue")
    empty = getattr(queue, "empty", None)
    if empty is None:
        return False
    waiting = inner.f_code.co_name == "select" and inner.f_code.co_filename.endswith("selectors.py")
    try:
        return not (waiting and empty())
    except Exception:  # the queue closed under us: the worker is ending
        return False


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, ended but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()
        return bool(state) and state[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


class ChildProcesses:
    """Counts the child processes forked while ``recorder`` records, and merges what they recorded."""

    def __init__(self, recorder: Any) -> None:
        """``recorder`` is the :class:`~opaudit.engine.record.Recorder` that owns this tracker (held weakly)."""
        self._recorder = weakref.ref(recorder)
        self.owner_pid = os.getpid()
        self.forked = 0
        """Child processes forked while recording."""
        self.recorded = 0
        """Of those, the ones whose recording came back and was merged."""
        self.unrecorded_why: dict[str, int] = {}
        """Why the others did not come back (a phrase for the report) → how many."""
        self._dir: str | None = None
        self._ask: tuple[int, int] | None = None
        """The request pipe ``(read end, write end)``: a byte for each worker asks it to ship now."""

    # -- parent ---------------------------------------------------------------
    def start(self) -> None:
        """Watch for forks until :meth:`finish`."""
        global _active, _hooks_installed
        with _lock:
            if not _hooks_installed:
                # ``register_at_fork`` cannot be undone: the hooks look up the active tracker.
                os.register_at_fork(after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
                _hooks_installed = True
            self._dir = tempfile.mkdtemp(prefix="opaudit-children-")
            self._ask = os.pipe()
            _active = weakref.ref(self)
        try:
            from multiprocessing import util
        except ImportError:
            return
        # A multiprocessing child clears the finalizers it inherits, then runs these.
        util.register_after_fork(self, ChildProcesses._in_multiprocessing_child)

    def finish(self, wait: float = ANSWER_SECONDS) -> list[tuple[Any, ...]]:
        """Stop watching; the shipments of the children, in worker order.

        Workers still alive are asked to ship what they recorded until now, and
        waited for (at most ``wait`` seconds). Each shipment is ``(order key,
        shipment)`` as made by :meth:`Recorder.shipment`.
        """
        global _active
        with _lock:
            if _active is not None and _active() is self:
                _active = None
        if self._dir is None:
            return []
        import torch

        shipments = []
        workers: dict[int, bool] = {}
        try:
            workers = self._answered(wait)
            for pid in sorted(workers):
                path = os.path.join(self._dir, f"{pid}{_SUFFIX}")
                try:
                    # Written by our own child into our private folder, never user input.
                    shipments.append(torch.load(path, weights_only=False))
                except Exception:  # none, or a child killed while writing
                    why = (f"still busy after {wait:g} s" if workers[pid] else
                           "ended before shipping (killed, or os._exit)")
                    self.unrecorded_why[why] = self.unrecorded_why.get(why, 0) + 1
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self._close_pipe()
        shipments.sort(key=lambda s: s[0])
        self.recorded = len(shipments)
        bare = self.forked - len(workers)
        if bare > 0:
            why = "forked with os.fork, not multiprocessing (only multiprocessing processes ship their ops)"
            self.unrecorded_why[why] = bare
        return shipments

    def _answered(self, wait: float) -> dict[int, bool]:
        """Ask the live workers to ship, wait for them; worker pid → whether it is still alive and silent."""
        assert self._dir is not None and self._ask is not None
        names = os.listdir(self._dir)
        workers = sorted(int(n[:-len(_WORKER)]) for n in names if n.endswith(_WORKER))
        if not workers:
            return {}
        with contextlib.suppress(OSError):
            os.write(self._ask[1], b"\0" * len(workers))
        deadline = time.monotonic() + wait
        pending = set(workers)
        while True:
            pending = {p for p in pending
                       if not os.path.exists(os.path.join(self._dir, f"{p}{_ANSWERED}")) and _alive(p)}
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        return {p: p in pending for p in workers}

    def _close_pipe(self) -> None:
        ask, self._ask = self._ask, None
        for fd in ask or ():
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    @property
    def unrecorded(self) -> int:
        """Child processes whose ops did not come back."""
        return max(0, self.forked - self.recorded)

    def warning(self) -> str | None:
        """The report's line on children whose ops are missing, with why; ``None`` if none are."""
        if not self.unrecorded:
            return None
        why = "; ".join(f"{text}: {n}" for text, n in sorted(self.unrecorded_why.items()))
        return (f"{self.unrecorded} of {self.forked} child process(es) forked while recording ran ops that were not "
                f"recorded: {why or 'unknown'}; their ops are missing here")

    # -- child ----------------------------------------------------------------
    def in_child(self) -> None:
        """In a freshly forked child: record only the child's own ops, and ship them when asked or at exit."""
        rec = self._recorder()
        if rec is None or self._dir is None:
            return
        rec.forget_for_child()
        if self._ask is not None and self._ask[1] >= 0:
            with contextlib.suppress(OSError):
                os.close(self._ask[1])  # the parent's end: the child never asks
            self._ask = (self._ask[0], -1)  # (a grandchild must not close whatever reuses the number)

    def _in_multiprocessing_child(self) -> None:
        from multiprocessing import util

        if _active is None or _active() is not self or self._dir is None or self._ask is None:
            return
        try:
            with open(os.path.join(self._dir, f"{os.getpid()}{_WORKER}"), "wb"):
                pass
        except OSError:  # the parent's recording already ended
            return
        # ``multiprocessing`` runs its finalizers when a worker process exits normally.
        util.Finalize(None, self._ship, exitpriority=100)
        threading.Thread(target=self._answer, args=(self._ask[0],), name="opaudit-ship", daemon=True).start()

    def _answer(self, fd: int) -> None:
        """Wait for the parent's request (its recording ended), then ship what was recorded until now.

        A ``DataLoader`` worker first finishes the tasks it was sent (the parent
        sends none while it waits): what it ran ahead of the parent, up to
        ``prefetch_factor`` batches, is then the same in every run, and so is
        the report.
        """
        try:
            asked = os.read(fd, 1)
        except OSError:
            return
        if not asked:
            return
        deadline = time.monotonic() + ANSWER_SECONDS
        while _busy_worker_loop() and time.monotonic() < deadline:
            time.sleep(0.005)
        if self._ship() and self._dir is not None:
            with contextlib.suppress(OSError), open(os.path.join(self._dir, f"{os.getpid()}{_ANSWERED}"), "wb"):
                pass

    def _ship(self) -> bool:
        rec = self._recorder()
        if rec is None or self._dir is None or not os.path.isdir(self._dir):
            return False
        import torch
        from torch.utils._python_dispatch import _disable_current_modes

        try:
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            order = (0, info.id) if info is not None else (1, os.getpid())
            with rec.shipping(), _disable_current_modes():  # the recorder's own copies are not the worker's ops
                payload = (order, rec.shipment())
                fd, tmp = tempfile.mkstemp(dir=self._dir, suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    torch.save(payload, f)
                os.replace(tmp, os.path.join(self._dir, f"{os.getpid()}{_SUFFIX}"))
        except Exception:  # a worker must go on (or exit) whatever happens; it counts as unrecorded
            return False
        return True
