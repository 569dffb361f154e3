"""Loading and running the user's code: a script as ``__main__``, or one entry function.

``opaudit train.py`` runs the script like ``python -m cProfile`` would: as
``__main__``, with ``sys.argv`` set to the script's own arguments and its folder
first on ``sys.path``. If the script defines ``opaudit_step()`` (or the function
named by ``--entry``), the module is imported without running as ``__main__``
and only one call of that function is recorded.

Whatever the user's code does to the process (``sys.argv``, ``sys.path``,
``__main__``, its streams, the working directory, signal handlers and timers,
``atexit`` hooks, ``os._exit``, ``fork``, dispatch modes it leaves entered, the
threads it starts) is undone, run or waited for at the end of the script, before
the audit goes on: see :class:`Sandbox`.
"""

from __future__ import annotations

import ast
import atexit
import builtins
import contextlib
import os
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from opaudit.data.errors import OpauditError
from opaudit.data.fileio import MAX_SCRIPT_BYTES, FileError, read_bytes
from opaudit.engine import forks
from opaudit.engine.exits import (
    REAL_EXIT,
    Interjection,
    ProcessExit,
    capturing_atexit,
    exit_for,
    leave_child,
    run_hooks,
)
from opaudit.engine.scriptio import restore_stdout, script_streams, stdout_to_stderr

DEFAULT_ENTRY = "opaudit_step"

class ModelLoadError(OpauditError):
    """The script cannot be loaded: missing, not Python, syntax error, no such entry."""


class UserCodeError(OpauditError):
    """The user's code raised; ``user_traceback`` holds the traceback trimmed to their frames."""

    def __init__(self, message: str, user_traceback: str) -> None:
        super().__init__(message)
        self.user_traceback = user_traceback

    @property
    def detail(self) -> str:
        """The user's traceback, printed above the one-line message."""
        return self.user_traceback


class ScriptExitError(OpauditError):
    """The script called ``sys.exit`` with a non-zero status, or ``os._exit`` with any status."""

    def __init__(self, status: Any, how: str = "sys.exit") -> None:
        if how == "os._exit":
            message = (f"the script called os._exit({status!r}), which would end opaudit with it; "
                       "end the script with sys.exit() or by returning")
        else:
            message = f"the script exited with status {status!r}"
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Target:
    """A validated script and how to run it."""

    path: str
    """Absolute path of the script."""
    entry: str | None
    """Function to call, or ``None`` to run the script as ``__main__``."""
    argv: tuple[str, ...] = ()
    source: str = ""

    @property
    def root(self) -> str:
        """The script's folder: source sites are reported relative to it."""
        return os.path.dirname(self.path)

    @property
    def name(self) -> str:
        """The script's file name, as reports show it."""
        return os.path.basename(self.path)


def load_target(path: str, entry: str | None = None, argv: tuple[str, ...] | list[str] = ()) -> Target:
    """Check that ``path`` is a runnable Python script and pick the entry.

    Nothing of the user's code runs here: the source is only parsed.
    """
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a directory, not a Python script")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".py", ".pyw", ""):
        raise ModelLoadError(f"{path}: not a Python script (expected a .py file)")
    try:
        source = read_bytes(path, MAX_SCRIPT_BYTES, "scripts").decode("utf-8")
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path}: not a Python script (not UTF-8 text)") from None
    except FileError as e:
        raise ModelLoadError(str(e)) from None
    if "\x00" in source:
        raise ModelLoadError(f"{path}: not a Python script (binary file)")
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise ModelLoadError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    defined = _top_level_functions(tree)
    if entry is not None:
        if entry not in defined:
            hint = f" (it defines: {', '.join(sorted(defined)[:8])})" if defined else ""
            raise ModelLoadError(f"{path}: no function named {entry!r}{hint}")
    elif DEFAULT_ENTRY in defined:
        entry = DEFAULT_ENTRY
    return Target(os.path.abspath(path), entry, tuple(argv), source)


def _top_level_functions(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def require_functions(target: Target, names: tuple[str, ...], purpose: str) -> None:
    """:class:`ModelLoadError` unless the script defines every one of ``names`` at top level."""
    defined = _top_level_functions(ast.parse(target.source, filename=target.path))
    missing = [n for n in names if n not in defined]
    if missing:
        raise ModelLoadError(f"{target.path}: {purpose} needs the script to define {' and '.join(names)}() "
                             f"(missing: {', '.join(missing)})")


class Sandbox:
    """What one run of the user's code left behind, filled in as :func:`sandboxed` closes.

    The sandbox snapshots the process state a script can change and restores it
    afterwards: ``sys.argv``/``sys.path``/``__main__``, the working directory, the umask,
    ``sys.stdout``/``sys.stderr`` (the script's stdout goes to stderr, at the file
    descriptor level too, so it never mixes with a report on stdout), every signal
    handler, the interval timers (``signal.alarm``, ``setitimer``), ``os._exit``
    and ``atexit``. Hooks the script registers with ``atexit`` run when the script
    ends, as the interpreter would run them at its exit; non-daemon threads are
    waited for, as the interpreter would. Only the process that entered the sandbox
    goes on: a child the script forked that returns into opaudit exits there.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        """The process that runs the audit; only it may replay and write."""
        self.threads_left: tuple[str, ...] = ()
        """Names of daemon threads the user's code started that were still running at its end."""
        self.notes: list[str] = []
        """One line per thing undone that the user may want to know (an atexit hook that failed...)."""


_MISSING = object()


class _Builtins:
    """The interpreter's builtins as a sandbox found them, and what the script changed in them.

    The script's changes (``builtins.len = ...``, ``del builtins.print``) hold
    while its code runs (:func:`call_user`) and are undone whenever opaudit's own
    code runs, between calls and after the script: a ``len`` that returns 0 must
    not break the recorder or the report. Names the script added stay.
    """

    def __init__(self) -> None:
        self.original = dict(vars(builtins))
        self.changed: dict[str, Any] = {}
        """Name → the script's value, or ``_MISSING`` for a name it deleted."""

    def enter(self) -> None:
        """Put the script's changes back (its code is about to run)."""
        names = vars(builtins)
        for name, value in self.changed.items():
            if value is _MISSING:
                names.pop(name, None)
            else:
                names[name] = value

    def leave(self) -> None:
        """Note the script's changes and restore the builtins it replaced or deleted."""
        names = vars(builtins)
        changed = {k: v for k, v in names.items() if k in self.original and self.original[k] is not v}
        changed.update((k, _MISSING) for k in self.original if k not in names)
        self.changed = changed
        for name in changed:
            names[name] = self.original[name]


_BUILTINS: list[_Builtins] = []
"""The builtins of each sandbox open, innermost last."""

_TIMERS = tuple(getattr(signal, n) for n in ("ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF") if hasattr(signal, n))


@contextlib.contextmanager
def sandboxed(target: Target) -> Iterator[Sandbox]:
    """Set argv/path for the script and undo what it changes in the process (see :class:`Sandbox`).

    Every load and run of the user's code happens inside this; so do the forks it
    makes (:mod:`opaudit.engine.forks`: a child never meets an intra-op pool an
    earlier run started, nor outlives the audit).
    """
    with forks.watching(), _sandboxed(target) as box:
        yield box


@contextlib.contextmanager
def _sandboxed(target: Target) -> Iterator[Sandbox]:
    box = Sandbox()
    saved_argv = sys.argv
    saved_path = list(sys.path)
    saved_cwd = os.getcwd()
    saved_umask = os.umask(0o022)
    os.umask(saved_umask)
    saved_main = sys.modules.get("__main__")
    saved_streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    main_thread = threading.current_thread() is threading.main_thread()
    saved_handlers = _signal_handlers() if main_thread else {}
    # As deadlines: a timer opaudit's caller set (pytest-timeout's, say) must still fire on time.
    saved_timers = {t: _deadline(signal.getitimer(t)) for t in _TIMERS} if main_thread else {}
    threads_before = set(threading.enumerate())
    hooks: list[tuple[Callable[..., Any], tuple, dict]] = []
    saved_atexit = (atexit.register, atexit.unregister)
    saved_fd = stdout_to_stderr()
    sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__ = script_streams()  # type: ignore[misc]
    script_builtins = _Builtins()
    _BUILTINS.append(script_builtins)
    os._exit = exit_for(box.pid)  # type: ignore[assignment]
    atexit.register, atexit.unregister = capturing_atexit(hooks)  # type: ignore[assignment]
    sys.argv = [target.path, *target.argv]
    sys.path.insert(0, target.root)
    try:
        yield box
    finally:
        _BUILTINS.remove(script_builtins)
        script_builtins.leave()
        if os.getpid() != box.pid:
            leave_child(None)
        # The interpreter waits for non-daemon threads at exit, then runs the
        # atexit hooks; so do we, before replay flips global flags under them.
        for t in threading.enumerate():
            if t not in threads_before and not t.daemon and t is not threading.current_thread() \
                    and not _executor_worker(t):
                t.join()
        try:
            script_builtins.enter()
            try:
                run_hooks(hooks, box.pid, box.notes)
            finally:
                script_builtins.leave()
        finally:
            atexit.register, atexit.unregister = saved_atexit  # type: ignore[assignment]
            os._exit = REAL_EXIT  # type: ignore[assignment]
            for timer, (deadline, interval) in saved_timers.items():
                delay = 0.0 if deadline is None else max(deadline - time.monotonic(), 1e-6)
                signal.setitimer(timer, delay, interval)
            for signum, handler in saved_handlers.items():
                if signal.getsignal(signum) is not handler:
                    signal.signal(signum, handler)
            restore_stdout(saved_fd)
            sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__ = saved_streams  # type: ignore[misc]
            sys.argv = saved_argv
            sys.path[:] = saved_path
            try:
                os.chdir(saved_cwd)
            except OSError:
                pass
            os.umask(saved_umask)  # else os.umask(0o777) in the script would give the report mode 000
            if saved_main is not None:
                sys.modules["__main__"] = saved_main
            box.threads_left = tuple(sorted(t.name for t in threading.enumerate()
                                            if t not in threads_before and t.is_alive() and not _executor_worker(t)))


def _executor_worker(t: threading.Thread) -> bool:
    """A ``concurrent.futures.ThreadPoolExecutor`` worker (or tqdm's monitor): idle, and never joined here.

    The interpreter stops them at exit itself (``concurrent.futures.thread._python_exit``
    tells them to, then joins); joined without that they wait for work for ever.
    Inductor's compile pool (``torch._inductor.async_compile``) starts some the
    first time a ``torch.compile``d step compiles, and keeps them for the process.
    """
    target = getattr(t, "_target", None)
    if type(t).__module__ == "tqdm._monitor":
        # tqdm's monitor (Dynamo's import makes a "torch.compile()" bar): it only refreshes progress bars.
        return True
    return getattr(target, "__module__", None) == "concurrent.futures.thread" and \
        getattr(target, "__name__", None) == "_worker"


def _deadline(timer: tuple[float, float]) -> tuple[float | None, float]:
    delay, interval = timer
    return (time.monotonic() + delay if delay > 0 else None), interval


def _signal_handlers() -> dict[int, Any]:
    """Every signal's Python-level handler that can be set back (``None``: installed outside Python)."""
    handlers = {}
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        if handler is not None and signum not in (signal.SIGKILL, signal.SIGSTOP):
            handlers[signum] = handler
    return handlers


def _compile(target: Target) -> types.CodeType:
    return compile(target.source, target.path, "exec", dont_inherit=True)


def _user_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` keeping only the user's own frames."""
    from opaudit.engine.sourcefiles import is_internal

    frames = [fs for fs in traceback.extract_tb(exc.__traceback__) if not is_internal(fs.filename)]
    lines = ["Traceback (most recent call last):\n"] + traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def call_user(fn: Callable[[], Any]) -> Any:
    """Call the user's code, turning its failures into :class:`UserCodeError` / :class:`ScriptExitError`.

    ``sys.exit(0)`` and ``sys.exit()`` count as a normal end (returning ``None``);
    ``os._exit`` (inside :func:`sandboxed`) is a :class:`ScriptExitError`. A
    process the user's code forked ends here with the status it would have had.
    Dispatch modes the code entered and never exited are popped, so
    that opaudit's own work is not seen by them.
    """
    owner = os.getpid()
    depth = _mode_depth()
    inference = _inference_mode()
    script_builtins = _BUILTINS[-1] if _BUILTINS else None
    if script_builtins is not None:
        script_builtins.enter()
    try:
        result = fn()
    except BaseException as e:
        if os.getpid() != owner:
            leave_child(e)
        return _failure(e)
    else:
        if os.getpid() != owner:
            leave_child(None)
        return result
    finally:
        if os.getpid() == owner:
            if script_builtins is not None:
                script_builtins.leave()
            try:
                _leave_inference_mode(inference)
            finally:
                _pop_modes(depth)


def _failure(e: BaseException) -> None:
    if isinstance(e, SystemExit):
        if e.code is None or e.code == 0:
            return None
        raise ScriptExitError(e.code) from None
    if isinstance(e, ProcessExit):
        raise ScriptExitError(e.status, "os._exit") from None
    if isinstance(e, (KeyboardInterrupt, Interjection)):
        raise e
    msg = f"{type(e).__name__}: {_text(e)}".rstrip(": ")
    raise UserCodeError(f"the script raised {msg}", _user_traceback(e)) from e


def _text(e: BaseException) -> str:
    """``str(e)``, or a note where the exception's own ``__str__`` fails too."""
    try:
        return str(e)
    except Exception as inner:  # the script's exception class is the script's code
        return f"(its message could not be made: {type(inner).__name__})"


def _inference_mode() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.is_inference_mode_enabled()


def _leave_inference_mode(before: bool) -> None:
    """Exit the ``torch.inference_mode()`` contexts the user's code entered and left entered.

    Left entered, the context's guard would restore its saved dispatch state whenever
    Python frees it (the script's globals dropped, much later): with the recorder's
    dispatch mode in that state and the mode long gone, every op then fails with an
    internal assert. Exited here, before the recorder's mode is left, it restores
    the state it was entered in.
    """
    if before or not _inference_mode():
        return
    import gc

    from torch.autograd.grad_mode import inference_mode

    # Exiting one that was exited already does nothing.
    for cm in [o for o in gc.get_objects() if type(o) is inference_mode]:  # type(): no __class__ lookups
        if hasattr(cm, "_inference_mode_context") and cm.mode:
            cm.__exit__(None, None, None)
    if _inference_mode():
        raise UserCodeError("the script left torch.inference_mode() entered and opaudit cannot leave it; enter it "
                            "with a 'with' block", "")


def _mode_depth() -> int:
    torch = sys.modules.get("torch")
    return torch._C._len_torch_dispatch_stack() if torch is not None else 0


def _pop_modes(depth: int) -> None:
    """Pop the dispatch modes the user's code pushed and left (``mode.__enter__()`` without exit)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    from torch.utils._python_dispatch import _pop_mode

    while torch._C._len_torch_dispatch_stack() > depth:
        _pop_mode()


@dataclass(frozen=True)
class Prepared:
    """The user's code loaded and ready: the callable to record and the module's globals."""

    call: Callable[[], Any]
    """Runs the whole script (script mode) or is the entry function."""
    namespace: dict[str, Any]
    """The globals of the user's module (filled in once ``call`` ran, in script mode)."""


def prepare(target: Target, seed: int | None = 0) -> Prepared:
    """Everything up to the recorded part.

    In script mode the callable runs the whole script as ``__main__``; in entry
    mode the module is imported here (not recorded) and the callable is the entry.
    Must be called inside :func:`sandboxed`.
    """
    code = _compile(target)
    if seed is not None:
        _seed(seed)
    if target.entry is None:
        module = types.ModuleType("__main__")
        module.__dict__.update({"__file__": target.path, "__builtins__": __builtins__, "__spec__": None})
        sys.modules["__main__"] = module
        return Prepared(lambda: exec(code, module.__dict__), module.__dict__)  # running it is the job
    stem = os.path.splitext(target.name)[0]
    module = types.ModuleType(f"_opaudit_target_{stem}")
    module.__dict__.update({"__file__": target.path, "__builtins__": __builtins__})
    sys.modules[module.__name__] = module
    call_user(lambda: exec(code, module.__dict__))
    fn = module.__dict__.get(target.entry)
    if not callable(fn):
        raise ModelLoadError(f"{target.name}: {target.entry!r} is not a function")
    _require_plain_function(target, fn)
    return Prepared(fn, module.__dict__)


def _require_plain_function(target: Target, fn: Callable[..., Any]) -> None:
    """Refuse an ``async def`` or generator entry: calling it runs none of its body, so nothing would be recorded."""
    import inspect

    name = target.entry
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise ModelLoadError(
            f"{target.name}: the entry {name!r} is an async function: calling it runs none of its body; "
            f"add a plain function that runs it (def step(): return asyncio.run({name}())) and give --entry step")
    if inspect.isgeneratorfunction(fn):
        raise ModelLoadError(
            f"{target.name}: the entry {name!r} is a generator function (it yields): calling it runs none of its "
            f"body; make it a plain function, or add one that runs it (def step(): return list({name}())) and "
            "give --entry step")


def require_no_arguments(target: Target, prepared: Prepared) -> None:
    """Refuse an entry that cannot be called as ``entry()`` (an audit calls it with no arguments)."""
    required = _required_parameters(prepared.call) if target.entry is not None else []
    if required:
        raise ModelLoadError(
            f"{target.name}: the entry {target.entry!r} takes required arguments ({', '.join(required)}); "
            "an entry must take no arguments: give them defaults, or add a function that builds them and calls it")


def _required_parameters(fn: Callable[..., Any]) -> list[str]:
    """Names of ``fn``'s parameters without a default (``*args``/``**kwargs`` need none)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _seed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass


def run(target: Target, recording: Callable[[], contextlib.AbstractContextManager[Any]],
        seed: int | None = 0) -> Sandbox:
    """Load ``target`` and run its recorded part inside ``recording()``; what it left behind.

    Raises :class:`UserCodeError` or :class:`ScriptExitError` when the user's code
    fails; ``sys.exit(0)`` ends the script normally.
    """
    with sandboxed(target) as box:
        prepared = prepare(target, seed)
        require_no_arguments(target, prepared)
        with recording():
            call_user(prepared.call)
    return box
