"""A worker process the parent can always get rid of: start, ready handshake, requests with a deadline, kill,
and why it ended.

One mechanism for both users: :mod:`opaudit.engine.isolate` replays an audit's ops
in a ``multiprocessing`` child (forked or spawned), and the catalog sweeps ops in a
fresh ``python -c`` interpreter (which, unlike ``multiprocessing``'s spawn, does not
re-run the caller's ``__main__``). Either way the parent holds a :class:`Worker`:
the child's handle and the parent's end of a duplex connection.

A child says ``("ready", payload)`` once it can take requests; :meth:`Worker.await_ready`
waits for that, and anything else (an exit, silence past the start timeout) is a
:class:`WorkerStartError` with the reason.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from opaudit.data.errors import OpauditError

JOIN_TIMEOUT = 10.0
"""Seconds to wait for a worker told to stop, or killed, to be gone."""

TIMED_OUT = object()
"""What :meth:`Worker.receive` returns when the deadline passed with no message."""


class WorkerStartError(OpauditError):
    """The worker process did not start, or did not say it was ready."""


def exit_reason(exitcode: int | None) -> str:
    """``SIGSEGV``, ``exit status 3``, or ``the worker stopped answering`` (still running when asked)."""
    if exitcode is None:
        return "the worker stopped answering"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit status {exitcode}"


class Worker:
    """One live worker process and the parent's end of its connection.

    ``process`` is a ``multiprocessing.Process`` or a ``subprocess.Popen``; the
    two differ only in how they are waited for and killed, which this hides.
    """

    def __init__(self, process: Any, conn: Any) -> None:
        self.process = process
        self.conn = conn

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        return self.process.pid

    def _wait(self, timeout: float) -> int | None:
        """The exit code after waiting up to ``timeout`` seconds; ``None`` if it still runs."""
        p = self.process
        if isinstance(p, subprocess.Popen):
            try:
                return p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        p.join(timeout)
        return p.exitcode

    def alive(self) -> bool:
        """Whether the process is still running."""
        p = self.process
        return p.poll() is None if isinstance(p, subprocess.Popen) else p.is_alive()

    def await_ready(self, timeout: float) -> Any:
        """The payload of the worker's ``("ready", payload)``; :class:`WorkerStartError` otherwise."""
        try:
            ready = self.conn.poll(timeout)
            hello = self.conn.recv() if ready else None
        except (EOFError, OSError):
            ready, hello = True, None
        except BaseException:
            self.kill()
            raise
        if not (isinstance(hello, tuple) and len(hello) == 2 and hello[0] == "ready"):
            reason = self.exit_reason() if ready else "no answer in time"
            self.kill()
            raise WorkerStartError(reason)
        return hello[1]

    def receive(self, deadline: float | None) -> Any:
        """The worker's next message; :data:`TIMED_OUT` past ``deadline``; ``None`` if it went away."""
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            if not self.conn.poll(wait):
                return TIMED_OUT
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def kill(self) -> None:
        """End the process now (if it still runs) and close the connection."""
        if self.alive():
            self.process.kill()
        self._wait(JOIN_TIMEOUT)
        self.conn.close()

    def stop(self, goodbye: Callable[[], None], grace: float = JOIN_TIMEOUT) -> None:
        """Ask the worker to end (``goodbye`` sends the request), wait up to ``grace`` seconds, then kill it."""
        try:
            goodbye()
        except (OSError, ValueError):
            pass
        self._wait(grace)
        self.kill()

    def exit_reason(self) -> str:
        """Collect a worker that went away and say why: ``SIGSEGV``, ``exit status 1``...

        A worker still running after :data:`JOIN_TIMEOUT` is killed, and said to
        have stopped answering.
        """
        code = self._wait(JOIN_TIMEOUT)
        if code is None:
            self.kill()
            return exit_reason(None)
        self.conn.close()
        return exit_reason(code)


def start_interpreter(code: str, *, quiet: bool) -> Worker:
    """A fresh ``python -c code FD`` whose end of a socket pair is file descriptor ``FD``.

    ``code`` reads ``int(sys.argv[1])`` and wraps it in
    ``multiprocessing.connection.Connection``. Its stdout is discarded; its stderr
    too when ``quiet``.
    """
    from multiprocessing.connection import Connection

    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", code, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if quiet else None)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return Worker(process, Connection(ours.detach()))
