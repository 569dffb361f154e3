"""Recording in forked child processes: a ``DataLoader``'s worker processes.

A worker is forked from the recording process while the recording mode is on the
stack of the thread that forks, which is the child's only thread: its ops reach
the child's copy of the :class:`~opaudit.engine.record.Recorder`. At the fork that copy
forgets what the parent recorded; when the worker exits normally
(``multiprocessing`` runs its finalizers) it saves what it recorded into a
private folder of the parent's, which merges every shipment when recording ends.
A child that never ships (killed, ``os._exit``, a bare ``os.fork``) is counted,
so the report can say that its ops went unrecorded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from typing import Any

_SUFFIX = ".opaudit-child"

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
        self._dir: str | None = None

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
            _active = weakref.ref(self)
        try:
            from multiprocessing import util
        except ImportError:
            return
        # A multiprocessing child clears the finalizers it inherits, then runs these.
        util.register_after_fork(self, ChildProcesses._in_multiprocessing_child)

    def finish(self) -> list[tuple[Any, ...]]:
        """Stop watching; the shipments of the children that exited, in worker order.

        Each shipment is ``(order key, shipment)`` as made by :meth:`Recorder.shipment`.
        """
        global _active
        with _lock:
            if _active is not None and _active() is self:
                _active = None
        if self._dir is None:
            return []
        import torch

        shipments = []
        try:
            for name in sorted(os.listdir(self._dir)):
                if not name.endswith(_SUFFIX):
                    continue
                try:
                    # Written by our own child into our private folder, never user input.
                    shipments.append(torch.load(os.path.join(self._dir, name), weights_only=False))
                except Exception:  # a child killed while writing: counted as unrecorded
                    continue
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        shipments.sort(key=lambda s: s[0])
        self.recorded = len(shipments)
        return shipments

    @property
    def unrecorded(self) -> int:
        """Child processes whose ops did not come back."""
        return max(0, self.forked - self.recorded)

    # -- child ----------------------------------------------------------------
    def in_child(self) -> None:
        """In a freshly forked child: record only the child's own ops, and ship them when it exits."""
        rec = self._recorder()
        if rec is None or self._dir is None:
            return
        rec.forget_for_child()

    def _in_multiprocessing_child(self) -> None:
        from multiprocessing import util

        # ``multiprocessing`` runs its finalizers when a worker process exits normally.
        if _active is not None and _active() is self:
            util.Finalize(None, self._ship, exitpriority=100)

    def _ship(self) -> None:
        rec = self._recorder()
        if rec is None or self._dir is None or not os.path.isdir(self._dir):
            return
        import torch
        from torch.utils._python_dispatch import _disable_current_modes

        try:
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            order = (0, info.id) if info is not None else (1, os.getpid())
            with _disable_current_modes():  # the recorder's own copies are not the worker's ops
                payload = (order, rec.shipment())
                fd, tmp = tempfile.mkstemp(dir=self._dir, suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    torch.save(payload, f)
            os.replace(tmp, os.path.join(self._dir, f"{os.getpid()}{_SUFFIX}"))
        except Exception:  # a worker must exit whatever happens; it counts as unrecorded
            pass
