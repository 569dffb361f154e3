"""How the user's code ends its process, and what runs at its end, while opaudit runs it.

``os._exit`` in the process running the audit raises :class:`ProcessExit` instead
(a child the script forked exits for real); the script's ``atexit`` hooks are
kept and run at the end of the script; a forked child that returns into opaudit
ends there (:func:`leave_child`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

REAL_EXIT = os._exit
"""``os._exit`` itself, for a forked child and to put back."""


class Interjection(BaseException):
    """Raised by opaudit through the user's code to stop it (the recording window's end): passed on as it
    is, never taken for the script's own failure (any other ``BaseException`` the script raises is)."""


class ProcessExit(BaseException):
    """``os._exit`` called by the user's code in the process running the audit."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def exit_for(owner: int, raised: Callable[[int], BaseException] = ProcessExit) -> Callable[[int], Any]:
    """``os._exit`` for the user's code: ``raised(status)`` (:class:`ProcessExit`) in process ``owner``,
    the real exit elsewhere."""
    def _exit(status: int) -> None:
        if os.getpid() != owner:
            REAL_EXIT(status)  # a child the script (or the op) forked: exactly what it asked for
        raise raised(status)

    _exit.__doc__ = REAL_EXIT.__doc__
    _exit.__qualname__ = "os._exit"  # what a note about an atexit hook calls it
    return _exit


def capturing_atexit(hooks: list) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``atexit.register``/``unregister`` that keep the user's hooks for the end of the script.

    Hooks registered by torch, opaudit or the standard library (``multiprocessing``
    importing itself, say) are the process's, not the script's: they go to the real
    ``atexit``.
    """
    real_register, real_unregister = atexit.register, atexit.unregister
    from opaudit.engine.sourcefiles import is_internal

    def register(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
        if is_internal(sys._getframe(1).f_code.co_filename):
            return real_register(func, *args, **kwargs)
        hooks.append((func, args, kwargs))
        return func

    def unregister(func: Callable[..., Any]) -> None:
        hooks[:] = [h for h in hooks if h[0] != func]
        real_unregister(func)

    return register, unregister


def run_hooks(hooks: list, pid: int, notes: list[str]) -> None:
    """Run the script's atexit hooks, last registered first; what they raise is reported (a line in
    ``notes``), not fatal. ``pid`` is the process running the audit: in any other, an exit is real."""
    while hooks:
        func, args, kwargs = hooks.pop()
        name = getattr(func, "__qualname__", repr(func))
        try:
            func(*args, **kwargs)
        except ProcessExit as e:
            if os.getpid() != pid:
                REAL_EXIT(e.status)
            notes.append(f"the script's atexit hook {name} called os._exit({e.status}); its remaining "
                             "atexit hooks were not run")
            hooks.clear()
        except BaseException as e:  # the interpreter ignores these too
            if os.getpid() != pid:
                leave_child(e)
            if isinstance(e, KeyboardInterrupt):
                raise
            if not isinstance(e, SystemExit):
                notes.append(f"the script's atexit hook {name} raised {type(e).__name__}: {e} (ignored)")


def leave_child(exc: BaseException | None) -> None:
    """End a process the user's code forked that returned into opaudit: it must not audit or write."""
    status = 0
    if isinstance(exc, SystemExit):
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            with contextlib.suppress(Exception):
                sys.stderr.write(f"{exc.code}\n")
    elif isinstance(exc, ProcessExit):
        status = exc.status
    elif exc is not None:
        status = 1
        with contextlib.suppress(Exception):
            traceback.print_exception(exc)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    REAL_EXIT(status)
