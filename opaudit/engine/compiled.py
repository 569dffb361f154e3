"""``torch.compile``d code the user's step runs: which, how often, and whether it ran compiled.

Dynamo does not compile under a ``TorchDispatchMode``: ``CatchErrorsWrapper``
(``torch/_dynamo/convert_frame.py``) skips every frame while a non-infra dispatch
mode is on the stack ("non-infra torch dispatch mode present"), and code compiled
before the mode was entered is not used under it either, so a recorded step runs
its compiled modules and functions eagerly, op by op. A ``fullgraph=True``
function then raises ("torch.compile with fullgraph=True found no compiled
frames"). :class:`CompiledWatch` makes that explicit and safe:

* every call of a compiled callable goes through Dynamo's ``compile_wrapper``,
  which asks ``torch._dynamo.eval_frame._callback_from_stance`` for the frame
  callback once per call; the watch wraps that function to see the call (the
  original callable is ``fn`` in the wrapper's frame) and hands it on unchanged;
* with ``eager=True`` (while recording) the compiler stance is ``force_eager``,
  PyTorch's own switch for "run compiled code eagerly", so the ops recorded are
  the eager ops, on purpose, and ``fullgraph=True`` does not raise;
* ``torch.compile`` is wrapped too, so that the line calling it is known, and so
  that a script that first compiles while watched gets the hook installed then.

Dynamo is never imported here: a script that does not use it is watched by the
``torch.compile`` wrapper alone, which costs nothing until called.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch

from opaudit.data.report import CompiledCode
from opaudit.engine.sourcefiles import is_internal, relative_path

_EVAL_FRAME = "torch._dynamo.eval_frame"
_WRAPPER = "compile_wrapper"
"""Name of the function Dynamo wraps every compiled callable in (``_TorchDynamoContext.__call__``)."""


def dynamo_loaded() -> bool:
    """Whether the process has imported Dynamo (a script that never compiled has not)."""
    return _EVAL_FRAME in sys.modules


def compiles_so_far() -> int:
    """Graphs Dynamo has compiled in this process (``counters["stats"]["unique_graphs"]``); 0 without Dynamo."""
    utils = sys.modules.get("torch._dynamo.utils")
    counters = getattr(utils, "counters", None)
    if counters is None:
        return 0
    try:
        return int(counters["stats"]["unique_graphs"])
    except Exception:  # another torch's counters: no count rather than a failed audit
        return 0


def _subject(x: Any) -> Any:
    """What was compiled: the module for ``module.__call__``/``_call_impl``/``forward``, else the function."""
    for _ in range(8):
        owner = getattr(x, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            return owner
        wrapped = getattr(x, "__wrapped__", None)
        if wrapped is None or wrapped is x:
            break
        x = wrapped
    orig = getattr(x, "_orig_mod", None)  # an OptimizedModule compiled again
    return orig if isinstance(orig, torch.nn.Module) else x


class _Seen:
    __slots__ = ("subject", "calls", "order")

    def __init__(self, subject: Any, order: int) -> None:
        self.subject = subject
        self.calls = 0
        self.order = order


class CompiledWatch:
    """Sees the calls of ``torch.compile``d callables while entered (see the module docstring).

    ``eager=True`` runs them eagerly (compiler stance ``force_eager``), as they
    must run under a recording dispatch mode; ``eager=False`` leaves compilation
    in force and only counts. Only calls on the entering thread are counted.
    Everything it changed is put back on exit.
    """

    def __init__(self, *, eager: bool, root: str | None = None) -> None:
        self.eager = eager
        self.root = root
        self._seen: dict[int, _Seen] = {}
        self._compile_sites: dict[int, tuple[Any, str]] = {}
        """``id(subject)`` → (subject, ``file:line`` of the ``torch.compile`` call)."""
        self._thread: int | None = None
        self._saved_compile: Any = None
        self._saved_callback: Any = None
        self._saved_stance: Any = None
        self._eval_frame: Any = None
        self._compiles_at_start = 0
        self.compiles = 0
        """Graphs Dynamo compiled while entered (added up on each exit)."""
        self._released: tuple[CompiledCode, ...] = ()
        self._observer = self._observe  # one bound method, so that exit can tell it is still installed

    # -- entering and leaving ---------------------------------------------------
    def __enter__(self) -> CompiledWatch:
        self._thread = threading.get_ident()
        self._compiles_at_start = compiles_so_far()
        original = torch.compile
        if getattr(original, "_opaudit_watch", None) is None:
            self._saved_compile = original
            torch.compile = self._wrap_compile(original)  # type: ignore[assignment]
        if dynamo_loaded():
            self._hook_dynamo()
        return self

    def __exit__(self, *exc: Any) -> None:
        ef = self._eval_frame
        try:
            if ef is not None:
                if ef.__dict__.get("_callback_from_stance") is self._observer:
                    ef._callback_from_stance = self._saved_callback
                if self._saved_stance is not None:
                    ef._set_stance(self._saved_stance)
        finally:
            if self._saved_compile is not None:
                torch.compile = self._saved_compile  # type: ignore[assignment]
            self._saved_compile = self._saved_callback = self._saved_stance = self._eval_frame = None
            self.compiles += max(0, compiles_so_far() - self._compiles_at_start)

    def _wrap_compile(self, original: Any) -> Any:
        watch = self

        def compile(model: Any = None, *args: Any, **kwargs: Any) -> Any:  # torch.compile's name
            result = original(model, *args, **kwargs)
            if model is not None:
                watch._note_compile(model)
            return result

        compile.__doc__ = original.__doc__
        compile.__wrapped__ = original  # type: ignore[attr-defined]
        compile._opaudit_watch = self  # type: ignore[attr-defined]
        return compile

    def _note_compile(self, model: Any) -> None:
        # A script may have kept the wrapper (``from torch import compile``): once the watch is
        # left, it only compiles.
        if threading.get_ident() != self._thread or self._saved_compile is None:
            return
        f = sys._getframe(2)
        while f is not None and is_internal(f.f_code.co_filename):
            f = f.f_back
        where = f"{relative_path(f.f_code.co_filename, self.root)}:{f.f_lineno}" if f is not None else ""
        subject = _subject(model)
        self._compile_sites.setdefault(id(subject), (subject, where))
        if self._eval_frame is None and dynamo_loaded():
            self._hook_dynamo()

    def _hook_dynamo(self) -> None:
        ef = sys.modules.get(_EVAL_FRAME)
        original = getattr(ef, "_callback_from_stance", None)
        if ef is None or original is None or original is self._observer:
            return
        if self.eager:
            try:
                prior = ef._set_stance(ef.DynamoStance("force_eager"))
            except Exception:  # inside a compiled region, or another torch: leave the stance be
                prior = None
            self._saved_stance = prior
        self._eval_frame = ef
        self._saved_callback = original
        ef._callback_from_stance = self._observer

    def _observe(self, callback: Any) -> Any:
        f = sys._getframe(1)
        if f.f_code.co_name == _WRAPPER and threading.get_ident() == self._thread:
            fn = f.f_locals.get("fn")
            if fn is not None:
                subject = _subject(fn)
                seen = self._seen.get(id(subject))
                if seen is None or seen.subject is not subject:
                    seen = self._seen[id(subject)] = _Seen(subject, len(self._seen))
                seen.calls += 1
        return self._saved_callback(callback)

    # -- results ------------------------------------------------------------------
    def ran(self) -> tuple[CompiledCode, ...]:
        """The compiled modules and functions called while entered, in first-call order."""
        if not self._seen:
            return self._released
        out = []
        for seen in sorted(self._seen.values(), key=lambda s: s.order):
            subject = seen.subject
            site = self._compile_sites.get(id(subject))
            compiled_at = site[1] if site is not None and site[0] is subject else ""
            if isinstance(subject, torch.nn.Module):
                out.append(CompiledCode("module", type(subject).__name__, seen.calls, compiled_at))
                continue
            code = getattr(subject, "__code__", None)
            defined_at = f"{relative_path(code.co_filename, self.root)}:{code.co_firstlineno}" if code else ""
            name = getattr(subject, "__qualname__", None) or type(subject).__name__
            out.append(CompiledCode("function", name, seen.calls, compiled_at, defined_at))
        return tuple(out)

    def subjects(self) -> list[Any]:
        """The compiled modules and functions called while entered (held until :meth:`release`)."""
        return [s.subject for s in sorted(self._seen.values(), key=lambda s: s.order)]

    def release(self) -> None:
        """Let go of the user's modules and functions (:meth:`ran` still answers)."""
        self._released = self.ran()
        self._seen.clear()
        self._compile_sites.clear()
