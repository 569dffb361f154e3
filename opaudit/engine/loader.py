"""Loading and running the user's code: a script as ``__main__``, or one entry function.

``opaudit train.py`` runs the script like ``python -m cProfile`` would: as
``__main__``, with ``sys.argv`` set to the script's own arguments and its folder
first on ``sys.path``. If the script defines ``opaudit_step()`` (or the function
named by ``--entry``), the module is imported without running as ``__main__``
and only one call of that function is recorded.

Whatever the user's code does to ``sys.argv``, ``sys.path``, ``__main__``,
``sys.stdout``/``sys.stderr``, the working directory, the Ctrl-C and SIGTERM
handlers or the threads it starts, it is undone (or, for non-daemon threads,
waited for) before the audit goes on.
"""

from __future__ import annotations

import ast
import contextlib
import os
import signal
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

DEFAULT_ENTRY = "opaudit_step"

_RESTORED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ModelLoadError(Exception):
    """The script cannot be loaded: missing, not Python, syntax error, no such entry."""


class UserCodeError(Exception):
    """The user's code raised; ``user_traceback`` holds the traceback trimmed to their frames."""

    def __init__(self, message: str, user_traceback: str) -> None:
        super().__init__(message)
        self.user_traceback = user_traceback


class ScriptExitError(Exception):
    """The script called ``sys.exit`` with a non-zero status."""

    def __init__(self, status: Any) -> None:
        super().__init__(f"the script exited with status {status!r}")
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
        with open(path, "rb") as f:
            raw = f.read()
        source = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path}: not a Python script (not UTF-8 text)") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None
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


def require_functions(target: Target, names: tuple[str, ...], purpose: str) -> None:
    """:class:`ModelLoadError` unless the script defines every one of ``names`` at top level."""
    defined = _top_level_functions(ast.parse(target.source, filename=target.path))
    missing = [n for n in names if n not in defined]
    if missing:
        raise ModelLoadError(f"{target.path}: {purpose} needs the script to define {' and '.join(names)}() "
                             f"(missing: {', '.join(missing)})")


def _top_level_functions(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


@contextlib.contextmanager
def sandboxed(target: Target) -> Iterator[None]:
    """Set argv/path for the script and undo what it changes in the interpreter.

    Every load and run of the user's code happens inside this.
    """
    saved_argv = sys.argv
    saved_path = list(sys.path)
    saved_cwd = os.getcwd()
    saved_main = sys.modules.get("__main__")
    saved_streams = (sys.stdout, sys.stderr)
    saved_handlers = {}
    if threading.current_thread() is threading.main_thread():
        # A training script's own Ctrl-C handler must not swallow the one that
        # turns an interrupted replay into a partial report.
        saved_handlers = {s: signal.getsignal(s) for s in _RESTORED_SIGNALS}
    threads_before = set(threading.enumerate())
    sys.argv = [target.path, *target.argv]
    sys.path.insert(0, target.root)
    try:
        yield
    finally:
        # The interpreter would wait for non-daemon threads at exit; so do we,
        # before replay flips global determinism flags under their feet.
        for t in threading.enumerate():
            if t not in threads_before and not t.daemon and t is not threading.current_thread():
                t.join()
        for signum, handler in saved_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        sys.stdout, sys.stderr = saved_streams
        sys.argv = saved_argv
        sys.path[:] = saved_path
        try:
            os.chdir(saved_cwd)
        except OSError:
            pass
        if saved_main is not None:
            sys.modules["__main__"] = saved_main


def _compile(target: Target) -> types.CodeType:
    return compile(target.source, target.path, "exec", dont_inherit=True)


def _user_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` keeping only the user's own frames."""
    from opaudit.engine.sites import is_internal

    frames = [fs for fs in traceback.extract_tb(exc.__traceback__) if not is_internal(fs.filename)]
    lines = ["Traceback (most recent call last):\n"] + traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def call_user(fn: Callable[[], Any]) -> Any:
    """Call the user's code, turning its failures into :class:`UserCodeError` / :class:`ScriptExitError`.

    ``sys.exit(0)`` and ``sys.exit()`` count as a normal end (returning ``None``).
    """
    try:
        return fn()
    except SystemExit as e:
        if e.code is None or e.code == 0:
            return None
        raise ScriptExitError(e.code) from None
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code can raise anything
        msg = f"{type(e).__name__}: {e}".rstrip(": ")
        raise UserCodeError(f"the script raised {msg}", _user_traceback(e)) from e


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
        return Prepared(lambda: exec(code, module.__dict__), module.__dict__)  # noqa: S102 - running it is the job
    stem = os.path.splitext(target.name)[0]
    module = types.ModuleType(f"_opaudit_target_{stem}")
    module.__dict__.update({"__file__": target.path, "__builtins__": __builtins__})
    sys.modules[module.__name__] = module
    call_user(lambda: exec(code, module.__dict__))  # noqa: S102
    fn = module.__dict__.get(target.entry)
    if not callable(fn):
        raise ModelLoadError(f"{target.name}: {target.entry!r} is not a function")
    return Prepared(fn, module.__dict__)


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


def run(target: Target, recording: Callable[[], contextlib.AbstractContextManager[Any]], seed: int | None = 0) -> None:
    """Load ``target`` and run its recorded part inside ``recording()``.

    Raises :class:`UserCodeError` or :class:`ScriptExitError` when the user's code
    fails; ``sys.exit(0)`` ends the script normally.
    """
    with sandboxed(target):
        prepared = prepare(target, seed)
        require_no_arguments(target, prepared)
        with recording():
            call_user(prepared.call)
