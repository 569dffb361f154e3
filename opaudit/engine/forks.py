"""Processes the user's code forks while it runs under opaudit.

Two things follow a fork under an audit that do not follow it in the plain
script, and both are undone here for every ``os.fork`` (``multiprocessing``'s
``fork`` start method included) made while :func:`watching`:

- **A warm intra-op pool.** The audit can run the user's code more than once in
  one process (a script with no step after its window runs again for the
  deterministic-mode recording; ``--run-check``'s runs): a later run starts with torch's intra-op thread pool already running, from the
  parallel ops of an earlier one. GNU OpenMP does not survive ``fork``: a child
  forked then waits for ever, in its first parallel op, on threads it does not
  have, where the plain script's child (forked before the parent ran any
  parallel op) runs normally. Such a child runs torch on one thread, as every
  ``DataLoader`` worker does. The first run of a process is left as it is:
  opaudit runs no torch op before it.
- **A child that outlives the audit.** One still running when the audit's process
  ends (hung, or just slow) would hold the command's output pipes open, and
  whoever reads them (a shell pipeline, ``subprocess.run``) would wait for it.
  A child of the auditing process is killed when that process ends
  (``PR_SET_PDEATHSIG``, Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator

_PR_SET_PDEATHSIG = 1

_hooks_installed = False
_watching: list[int] = []
"""The pid of the auditing process, once per :func:`watching` open (innermost last)."""
_runs = 0
"""Runs of the user's code started in this process: after the first, the intra-op pool may be warm."""
_pool_warm = False
"""Whether the run now in progress started after another: what a child forked now inherits."""
_from_main_thread = False
"""Set in the parent just before each fork; the child inherits the value."""


def _before_fork() -> None:
    global _from_main_thread
    _from_main_thread = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    if not _watching:
        return
    if _pool_warm and "torch" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["torch"].set_num_threads(1)
    # Only a child of the auditing process, forked by its main thread (the death signal follows
    # the thread that forked: another thread's end would kill the child early). A grandchild
    # belongs to its own parent.
    if _from_main_thread and os.getppid() == _watching[-1]:
        _die_with_parent()


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux: left as the plain script leaves it
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


@contextlib.contextmanager
def watching() -> Iterator[None]:
    """Around one run of the user's code in this process: handle the forks it makes (see the module)."""
    global _hooks_installed, _runs, _pool_warm
    if not _hooks_installed:
        # ``register_at_fork`` cannot be undone: the hooks do nothing outside ``watching``.
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _hooks_installed = True
    warm_before = _pool_warm
    _pool_warm = _runs > 0
    _runs += 1
    _watching.append(os.getpid())
    try:
        yield
    finally:
        _watching.pop()
        _pool_warm = warm_before
