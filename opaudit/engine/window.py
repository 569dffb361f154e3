"""Step windows: which part of the user's run is recorded, and stopping the script after it.

A real ``train.py`` trains for thousands of steps; an audit needs a few. A
**step** is one ``optimizer.step()`` of the first optimizer that steps (seen
through PyTorch's global optimizer step hooks, so no change to the script), or,
in entry mode, one call of the entry function. A :class:`Window` says which
steps are recorded: ``start`` steps run first without recording, at full speed,
then ``steps`` steps are recorded, then the script is stopped.

Recording ends when the window's last ``optimizer.step()`` returns; the rest of
that step (scheduler, logging, a checkpoint) runs unrecorded, and the script is
stopped when it calls ``optimizer.step()`` once more. Stopping raises a private
``BaseException`` out of that call, so it unwinds the script like an exception would (its ``finally``
blocks and ``with`` exits run, a bare ``except Exception`` does not swallow it),
and is caught here: no traceback. The frames it unwound are then cleared and
the script's globals dropped, so DataLoader worker processes are shut down and
files the script left open are flushed and closed before the audit goes on.

A script without an optimizer is recorded to its end, or for ``max_seconds``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import signal
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opaudit.data.errors import OpauditError
from opaudit.engine.exits import Interjection
from opaudit.engine.loader import (
    Prepared,
    Sandbox,
    ScriptExitError,
    Target,
    UserCodeError,
    call_user,
    prepare,
    require_no_arguments,
    sandboxed,
)
from opaudit.engine.mode import skip_dynamo

DEFAULT_STEPS = 3
"""Steps recorded by default in script mode: enough to see warm-up effects, as cheap as a few steps."""

DEFAULT_ENTRY_CALLS = 1
"""Calls of the entry function recorded by default."""

DEFAULT = "default"
"""``steps`` for :func:`window_for`: the default of the mode (:data:`DEFAULT_STEPS` or :data:`DEFAULT_ENTRY_CALLS`)."""


class WindowError(OpauditError):
    """A window that cannot be (``steps`` < 1, negative ``start``...) or that recorded nothing."""


@dataclass(frozen=True)
class Window:
    """Which steps of a run are recorded (:func:`window_for` picks the default number)."""

    steps: int | None
    """Steps recorded; ``None`` records to the end of the script (an entry: until ``max_seconds``)."""
    start: int = 0
    """Steps run (unrecorded) before the window opens."""
    max_seconds: float | None = None
    """Stop recording (and the script) after this long, even mid-step; ``None``: no limit."""

    def __post_init__(self) -> None:
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise WindowError(f"steps must be a positive integer, got {self.steps!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise WindowError(f"start step must be 0 or more, got {self.start!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise WindowError(f"max seconds must be positive, got {self.max_seconds!r}")


@dataclass(frozen=True)
class Recorded:
    """What a run through a :class:`Window` recorded."""

    unit: str
    """``step`` (optimizer steps of a script) or ``call`` (calls of the entry)."""
    first: int
    """1-based number of the first recorded step."""
    last: int
    """Number of the last step that ended while recording (``first - 1`` if none did)."""
    stopped: str | None
    """Why the script was stopped: ``steps``, ``seconds``; ``None`` if it ran to its end."""
    entry: str | None = None
    sandbox: Sandbox | None = None
    """What the run left behind in the process (threads still running, notes): see :class:`Sandbox`."""
    then: tuple[int, int] | None = None
    """The steps ``(first, last)`` the second recording (``then`` of :func:`run_window`) held, after the
    window; ``None`` if it never began, ``last < first`` if no step ended while it recorded."""
    then_error: str | None = None
    """How the user's code failed while the second recording ran (the window's own recording is whole)."""

    @property
    def span(self) -> str:
        """``steps 1-3``, ``step 4``, ``call 1``: the recorded steps, short (report settings); a window
        that ended by time says so (``start of the script (stopped by --max-record-seconds)``)."""
        if self.last < self.first:
            if self.first > 1:
                text = f"from {self.unit} {self.first}"
            elif self.stopped == "seconds":
                text = "start of the script" if self.unit == "step" else f"part of {self.unit} 1"
            else:
                text = "whole script"
        else:
            text = _span(self.unit, self.first, self.last)
        return text + (" (stopped by --max-record-seconds)" if self.stopped == "seconds" else "")

    @property
    def then_steps(self) -> int:
        """How many steps (or calls) ended while the second recording ran."""
        return 0 if self.then is None else max(0, self.then[1] - self.then[0] + 1)

    def describe(self, then: str = "") -> str:
        """One line for the user: what was recorded and how the script ended.

        ``then`` says how the second recording was made (``in deterministic mode``).
        """
        after = f", then {_span(self.unit, *self.then)} {then}".rstrip() if self.then and self.then_steps else ""
        if self.unit == "call":
            text = f"recorded {self.span} of {self.entry}"
            if self.first > 1:
                text += f" ({_plural(self.first - 1, 'call')} before ran unrecorded)"
            return text + after
        if self.last >= self.first:
            text = f"recorded {self.span} of the script"
        elif self.first == 1:
            text = "recorded the whole script" if self.stopped is None else "recorded the script"
            text += " (no optimizer step)"
        else:
            text = f"recorded what ran after step {self.first - 1}, the script's last optimizer step"
        if self.first > 1 and self.last >= self.first:
            text += f" (steps 1-{self.first - 1} ran unrecorded)"
        text += after
        if self.stopped == "steps":
            return text + "; stopped it there"
        if self.stopped == "seconds":
            return text + "; stopped it there (--max-record-seconds)"
        return text + ("; it ended there" if self.last >= self.first else "")


def window_for(entry: bool, steps: int | str | None = DEFAULT, start: int = 0,
               max_seconds: float | None = None) -> Window:
    """The window an audit records: the one place where the default number of steps is decided.

    ``steps`` is a number, ``None`` (all: a script to its end) or :data:`DEFAULT`
    (3 optimizer steps of a script, 1 call of an entry function). An entry
    function has no end of its own: ``None`` calls it until ``max_seconds``, and
    is refused without it.
    """
    if steps == DEFAULT:
        steps = DEFAULT_ENTRY_CALLS if entry else DEFAULT_STEPS
    if entry and steps is None and max_seconds is None:
        raise WindowError("--steps all records a script to its end, and an entry function has none: give a number "
                          "of calls, or --max-record-seconds to call it until then")
    return Window(steps=steps, start=start, max_seconds=max_seconds)  # type: ignore[arg-type]


def _span(unit: str, first: int, last: int) -> str:
    return f"{unit} {first}" if last == first else f"{unit}s {first}-{last}"


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


class _StopScript(Interjection):
    """Raised out of the hook that ends the window; caught by :func:`run_window`."""


def _deadline_dispatch(self: _Deadline, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
    if torch._C._current_graph_task_id() == -1 and self._stop_now():
        raise _StopScript
    return func(*args, **(kwargs or {}))


# Marked like the recorder's dispatch function (see :func:`opaudit.engine.mode.skip_dynamo`): with
# TorchDispatchMode's own wrapper the first op under the deadline imports Dynamo (seconds, on a
# loaded machine longer than a short deadline: the window then closed before its first op ran).
_DEADLINE_SKIPPED = skip_dynamo(_deadline_dispatch.__code__)


class _Deadline(TorchDispatchMode):
    """Stops the script once ``deadline`` has passed, wherever it is: at its first forward op after it,
    or, when it runs no ops (it sleeps, waits in C, loops in plain Python), within a tick.

    A timer thread sends :data:`_STOP_SIGNAL` to the main thread every :data:`_TICK_S`
    seconds once the deadline has passed; the handler raises only at a safe point: the
    innermost code running is the user's (not opaudit's recorder or hooks, nor code
    they called) and no backward runs on this thread. A blocking wait in Python (``sleep``,
    ``Event.wait``, a lock) is interrupted by the signal; a C function that retries its
    wait itself stops when it returns. A script that swallows the stop gets it again
    after :data:`_GRACE_S` seconds (its ``finally`` blocks get that long to run).
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return not _DEADLINE_SKIPPED

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline
        self.expired = False
        """Whether the stop was raised (at least once)."""
        self._raised_at = 0.0
        self._done = threading.Event()
        self._timer: threading.Thread | None = None
        self._previous: Any = None

    def __enter__(self) -> _Deadline:
        if _DEADLINE_SKIPPED:
            skip_dynamo(_deadline_dispatch.__code__)  # again: ``torch._dynamo.reset()`` may have cleared it
        super().__enter__()
        if _STOP_SIGNAL is not None and threading.current_thread() is threading.main_thread():
            # Without SA_RESTART (Python's default), or a lock wait would resume without looking at the handler.
            self._previous = signal.signal(_STOP_SIGNAL, self._on_signal)
            self._timer = threading.Thread(target=self._tick, name="opaudit-max-record-seconds", daemon=True)
            self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        if self._timer is not None:
            self._timer.join()
            if signal.getsignal(_STOP_SIGNAL) == self._on_signal:
                signal.signal(_STOP_SIGNAL, self._previous)
        super().__exit__(*exc)

    def _tick(self) -> None:
        main = threading.main_thread().ident
        if self._done.wait(max(0.0, self.deadline - time.monotonic())) or main is None:
            return
        while not self._done.is_set():
            signal.pthread_kill(main, _STOP_SIGNAL)
            self._done.wait(_TICK_S)

    def _stop_now(self) -> bool:
        now = time.monotonic()
        if now < self.deadline or (self.expired and now - self._raised_at < _GRACE_S):
            return False
        self.expired, self._raised_at = True, now
        return True

    def _on_signal(self, signum: int, frame: Any) -> None:
        if _safe_to_stop(frame) and self._stop_now():
            raise _StopScript

    __torch_dispatch__ = _deadline_dispatch


_STOP_SIGNAL: int | None = getattr(signal, "SIGURG", None)
"""The signal that stops a script at its deadline: ignored by default, so one that arrives after the
handler is gone does nothing, and used by no library we know of (it reports out-of-band socket data
only to a process that asks for it)."""
_TICK_S = 0.05
_GRACE_S = 1.0


def _safe_to_stop(frame: Any) -> bool:
    """Whether an exception raised in ``frame`` starts in the user's own code.

    The audit goes on in this process after the stop, so the stop must not cut
    anything else in half: not opaudit's code (the recorder's dispatch, its hooks,
    setting up or tearing down), not torch's or another library's (a lazy
    initialisation left half done would break the replays), not an import
    anywhere on the stack (a module half imported stays in ``sys.modules``), not
    backward. The innermost frame outside the standard library must be the
    user's; the standard library's own frames inside it (a ``threading.Event``
    wait, a ``queue.get``) unwind cleanly.
    """
    if torch._C._current_graph_task_id() != -1:
        return False
    from opaudit.engine.sourcefiles import is_internal

    decided: bool | None = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_IMPORTING):
            return False
        if decided is None and not _stdlib(name):
            decided = not is_internal(name)
        frame = frame.f_back
    return bool(decided)


_IMPORTING = "<frozen importlib"
_STDLIB = tuple(sorted({sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "platstdlib")}))


def _stdlib(filename: str) -> bool:
    if filename.startswith("<frozen "):
        return True
    return filename.startswith(_STDLIB) and "-packages" + os.sep not in filename


Recording = Callable[[], contextlib.AbstractContextManager[Any]]
"""Makes the context a window is recorded inside (entered at its first step, left after its last)."""


class _Clock:
    """Counts optimizer steps and opens and closes the recording at the window's edges.

    The optimizer that steps first is found by a global pre-step hook, and the
    steps are counted by a post-step hook on that optimizer alone. PyTorch runs
    an optimizer's own post hooks before the global ones, so opening or closing
    the recording there (which adds or removes the recorder's global hooks)
    never changes a hook table while PyTorch walks it. With ``then``, a second
    recording takes over for as many steps again when the window closes.
    """

    def __init__(self, window: Window, recording: Recording, then: Recording | None = None,
                 on_last_step: Callable[[], None] | None = None) -> None:
        self.window = window
        self.recording = recording
        self.then = then
        self.on_last_step = on_last_step
        self.steps = 0
        self.first_recorded: int | None = None
        self.last_recorded = 0
        self.then_first: int | None = None
        self.then_last = 0
        self.stopped: str | None = None
        self._optimizer: Any = None
        self._thread = threading.get_ident()
        self._stack: contextlib.ExitStack | None = None
        self._in_then = False
        self._deadline: _Deadline | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> _Clock:
        from torch.optim import optimizer as optim_module

        self._handles.append(optim_module.register_optimizer_step_pre_hook(self._before_step))
        if self.window.start == 0:
            self._open()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._close()
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._optimizer = None

    def _open(self) -> None:
        self.first_recorded = self.steps + 1
        self.last_recorded = self.steps
        stack = contextlib.ExitStack()
        stack.enter_context(self.recording())
        if self.window.max_seconds is not None:
            # Entered after the recorder, so it sees each op first and stops before the recorder counts it.
            self._deadline = stack.enter_context(_Deadline(time.monotonic() + self.window.max_seconds))
        self._stack = stack

    def _open_then(self, then: Recording) -> None:
        self.then_first = self.steps + 1
        self.then_last = self.steps
        stack = contextlib.ExitStack()
        stack.enter_context(then())
        self._stack, self._in_then = stack, True

    def _close(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            if self._deadline is not None and self._deadline.expired and self.stopped is None:
                self.stopped = "seconds"
            self._deadline = None
            stack.close()

    def _before_step(self, optimizer: Any, *_: Any) -> None:
        if threading.get_ident() != self._thread:
            return
        if self.stopped is not None:
            # The window closed after the last step's ``optimizer.step()``, and the
            # rest of that step (scheduler, logging, checkpoints) ran: stop here.
            raise _StopScript
        if self._optimizer is None:
            self._optimizer = optimizer
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _after_step(self, optimizer: Any, *_: Any) -> None:
        if threading.get_ident() != self._thread:
            return
        self.steps += 1
        w = self.window
        if self._stack is None:
            if self.steps == w.start and self.stopped is None:
                self._open()
            return
        if self._in_then:
            self.then_last = self.steps
            if w.steps is not None and self.steps >= self.last_recorded + w.steps:
                self.stopped = "steps"
                self._close()
            return
        self.last_recorded = self.steps
        if w.steps is not None and self.steps >= w.start + w.steps:
            self._close()
            if self.then is not None and self.stopped is None:
                self._open_then(self.then)
            else:
                self.stopped = self.stopped or "steps"
        elif self.on_last_step is not None and w.steps is not None and self.steps == w.start + w.steps - 1:
            self.on_last_step()


def _forget(e: BaseException) -> None:
    """Let go of every frame ``e`` unwound (and the iterators, files, loaders they held)."""
    tb = e.__traceback__
    if tb is not None:
        traceback.clear_frames(tb)
    e.__traceback__ = None


_OP_LIBRARIES: list[Any] = []
"""The op libraries of stopped scripts, kept for the process: see :func:`finalize`."""


def finalize(namespace: dict[str, Any]) -> None:
    """Drop a stopped script's globals, as the interpreter does at exit.

    DataLoader iterators shut their worker processes down when they are freed,
    and files the script never closed are flushed and closed. The ops the script
    defined (a ``torch.library.Library`` or ``torch.library.custom_op`` in its
    globals) stay: the replays call them, and a library let go of unregisters
    its ops (a replay then called freed memory).
    """
    # Dunder names stay: ``__builtins__``, and what Dynamo installed for compiled code
    # (``__compiled_fn_1``, ``__builtins_dict___0``), which it deletes itself when done.
    names = [k for k in namespace if not k.startswith("__")]
    _OP_LIBRARIES.extend(v for k in names if _defines_ops(v := namespace[k]))
    for name in names:
        del namespace[name]
    gc.collect()


def _defines_ops(value: Any) -> bool:
    library = getattr(torch, "library", None)
    if library is not None and isinstance(value, library.Library):
        return True
    return type(value).__name__ == "CustomOpDef"  # ``custom_op``'s result, which holds its own Library


def run_window(prepared: Prepared, recording: Recording, window: Window, entry: str | None = None, *,
               then: Recording | None = None, on_last_step: Callable[[], None] | None = None) -> tuple[Recorded, Any]:
    """Run the user's code, recording inside ``recording()`` only for ``window``'s steps.

    With ``then``, the run goes on for as many steps (or calls) again after the
    window, recorded inside ``then()``, before it is stopped (see
    :attr:`Recorded.then`); if the user's code fails meanwhile, the window's own
    recording is whole and the failure is :attr:`Recorded.then_error`.
    ``on_last_step()`` is called as the window's last step begins (if it has
    more than one). Returns what was recorded and, in entry mode, the last
    recorded call's return value. Raises :class:`WindowError` if the run ended
    before the window opened (nothing was recorded), and the loader's errors if
    the user's code fails. Must be called inside :func:`opaudit.engine.loader.sandboxed`.
    """
    if entry is not None:
        return _run_entry(prepared, recording, window, entry, then, on_last_step)
    clock = _Clock(window, recording, then, on_last_step)
    then_error = None
    try:
        with clock:
            call_user(prepared.call)
    except _StopScript as e:
        _forget(e)
    except (UserCodeError, ScriptExitError) as e:
        if clock.then_first is None:
            raise
        then_error = str(e)
        _forget(e)
    if clock.first_recorded is None:
        raise WindowError(
            f"the script ended after {_plural(clock.steps, 'optimizer step')}, before --start-step "
            f"{window.start} was reached: nothing was recorded")
    after = (clock.then_first, clock.then_last) if clock.then_first is not None else None
    return Recorded("step", clock.first_recorded, clock.last_recorded, clock.stopped, then=after,
                    then_error=then_error), None


def _calls(prepared: Prepared, recording: contextlib.AbstractContextManager[Any], calls: int | None,
           max_seconds: float | None, before_last: Callable[[], None] | None = None) -> tuple[int, Any, str | None]:
    """Call the entry ``calls`` times (``None``: until ``max_seconds``) inside ``recording``.

    ``before_last()`` is called before the last of several calls. Returns the
    calls that ended, the last one's result, and ``seconds`` if the time limit stopped them.
    """
    done, result = 0, None
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(recording)
            deadline = None
            if max_seconds is not None:
                deadline = stack.enter_context(_Deadline(time.monotonic() + max_seconds))
            while calls is None or done < calls:
                if deadline is not None and time.monotonic() >= deadline.deadline:
                    raise _StopScript  # an entry that runs no torch op never meets the deadline's check
                if before_last is not None and calls is not None and done == calls - 1 > 0:
                    before_last()
                result = call_user(prepared.call)
                done += 1
    except _StopScript as e:
        _forget(e)
        return done, result, "seconds"
    return done, result, None


def _run_entry(prepared: Prepared, recording: Recording, window: Window, entry: str,
               then: Recording | None = None, on_last_step: Callable[[], None] | None = None) -> tuple[Recorded, Any]:
    if window.steps is None and window.max_seconds is None:
        raise WindowError(f"an entry function has no end: record a number of calls of {entry}, or until a time limit")
    for _ in range(window.start):
        call_user(prepared.call)
    done, result, stopped = _calls(prepared, recording(), window.steps, window.max_seconds, on_last_step)
    after = then_error = None
    if then is not None:
        first = window.start + done + 1
        try:
            more, _, _ = _calls(prepared, then(), window.steps or max(done, 1), window.max_seconds)
        except (UserCodeError, ScriptExitError) as e:
            more, then_error = 0, str(e)
            _forget(e)
        after = (first, first + more - 1)
    return Recorded("call", window.start + 1, window.start + done, stopped, entry, then=after,
                    then_error=then_error), result


def run_target(target: Target, recording: Recording, window: Window, seed: int | None = 0, *,
               keep_module: bool = True, then: Recording | None = None,
               on_last_step: Callable[[], None] | None = None) -> Recorded:
    """Load ``target`` and record ``window``'s steps of it inside ``recording()``.

    ``then`` and ``on_last_step`` are :func:`run_window`'s. The windowed
    counterpart of :func:`opaudit.engine.loader.run`: a script stopped
    after its window has its globals dropped (:func:`finalize`) before this returns.
    With ``keep_module=False`` the imported module of an entry function is let go
    of as well, so that a run that follows does not hold two copies of the
    user's model and data.
    """
    with sandboxed(target) as box:
        prepared = prepare(target, seed)
        require_no_arguments(target, prepared)
        recorded, _ = run_window(prepared, recording, window, target.entry, then=then, on_last_step=on_last_step)
    # The box is filled in as the sandbox closes (threads still running, notes of the script's hooks).
    recorded = dataclasses.replace(recorded, sandbox=box)
    if recorded.stopped is not None and target.entry is None:
        finalize(prepared.namespace)
    if not keep_module:
        name = prepared.namespace.get("__name__")
        if target.entry is not None and isinstance(name, str) and sys.modules.get(name) is not None \
                and sys.modules[name].__dict__ is prepared.namespace:
            del sys.modules[name]
        del prepared
        gc.collect()
    return recorded
