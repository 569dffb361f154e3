"""The dispatch mode that intercepts every aten call and hands it to an ``on_call`` callback.

It only intercepts (the shape of PyTorch's ``FlopCounterMode``): the recorder, the
run-check's tracer and the batch-invariance trace own what happens to each call, and
enter the mode together with their site tracker through :class:`Interception`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opaudit.aten.ops import is_determinism_alert
from opaudit.engine.compiled import CompiledWatch

if TYPE_CHECKING:
    from opaudit.engine.sites import SiteTracker


def _dispatch(self: "RecordingMode", func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
    call = self.on_call(func, args, kwargs)
    try:
        return call(*args, **kwargs) if kwargs else call(*args)
    except RuntimeError as e:
        if self.on_alert is None or not _strict_alert(e):
            raise
    # Strict deterministic mode is on: the user's code turned it on itself
    # (Lightning's ``Trainer(deterministic=True)`` does), or this is opaudit's own
    # deterministic-mode recording. The op's refusal is a finding (the replay
    # classifies it ``raises``), not the end of the run. The setting stays
    # on; only this call runs as ``warn_only`` would run it (its nondeterministic
    # kernel), but with the setting off: under ``warn_only`` the alert is a C++
    # warning, which reaches Python only at the boundary of the user's call,
    # outside anything this frame could catch, and would print once per call.
    # ATen's flag only: Inductor's copy of it is for compiled code, not this eager call.
    self.on_alert(func)
    torch._C._set_deterministic_algorithms(False)
    try:
        return call(*args, **kwargs) if kwargs else call(*args)
    finally:
        torch._C._set_deterministic_algorithms(True, warn_only=False)


def _strict_alert(e: RuntimeError) -> bool:
    return (torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
            and is_determinism_alert(str(e)))


def skip_dynamo(code: Any) -> bool:
    """Tell Dynamo never to trace ``code`` nor anything it calls; ``False`` if this torch cannot.

    ``TorchDispatchMode`` otherwise wraps every ``__torch_dispatch__`` in
    ``torch._dynamo.disable``, which imports Dynamo on first use (about 1.5 s)
    and adds two Python frames to every op. Marking the code object gives the
    same protection (a ``torch.compile``'d function run while recording never
    traces into the recorder) at no cost per call.
    """
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy

        set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))
    except Exception:  # older or newer torch: keep TorchDispatchMode's own wrapper
        return False
    return True


DYNAMO_SKIPPED = skip_dynamo(_dispatch.__code__)


class RecordingMode(TorchDispatchMode):
    """Intercepts every aten call, lets the recorder see it, then runs it.

    ``on_call(func, args, kwargs)`` records the call and returns the callable
    that runs it; ``on_alert(func)`` hears of ops that strict deterministic mode
    refused (see :func:`_dispatch`).
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return not DYNAMO_SKIPPED

    __torch_dispatch__ = _dispatch

    def __enter__(self) -> "RecordingMode":
        if DYNAMO_SKIPPED:
            skip_dynamo(_dispatch.__code__)  # again: ``torch._dynamo.reset()`` may have cleared it
        return super().__enter__()

    def __init__(self, on_call: Callable[[Any, tuple, dict | None], Callable[..., Any]],
                 on_alert: Callable[[Any], None] | None = None) -> None:
        super().__init__()
        self.on_call = on_call
        self.on_alert = on_alert
        """Called with the op when strict deterministic mode, turned on by the recorded
        code itself, refuses it; the op then runs with ``warn_only``. ``None``: the error propagates."""


class Interception:
    """A :class:`RecordingMode` and a site tracker, entered and left together around the watched code.

    On the way out the mode is left first, then the tracker's hooks are removed,
    whatever the watched code raised. ``on_alert`` goes to the mode (see :func:`_dispatch`).
    ``torch.compile``d code called inside runs eagerly, and is named in
    ``compiled`` (see :mod:`opaudit.engine.compiled`): Dynamo would not compile it
    under the mode anyway.
    """

    def __init__(self, on_call: Callable[[Any, tuple, dict | None], Callable[..., Any]], sites: "SiteTracker",
                 on_alert: Callable[[Any], None] | None = None) -> None:
        self.on_call = on_call
        self.on_alert = on_alert
        self.sites = sites
        self.compiled = CompiledWatch(eager=True, root=sites.root)
        """The compiled modules and functions called while intercepting, over every entry."""
        self._mode: RecordingMode | None = None

    def set_on_call(self, on_call: Callable[[Any, tuple, dict | None], Callable[..., Any]]) -> None:
        """Hand the calls to ``on_call`` from now on, in the mode already entered too."""
        self.on_call = on_call
        if self._mode is not None:
            self._mode.on_call = on_call

    def __enter__(self) -> "Interception":
        self.sites.start()
        self.compiled.__enter__()
        self._mode = RecordingMode(self.on_call, self.on_alert)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
        finally:
            self._mode = None
            try:
                self.compiled.__exit__(*exc)
            finally:
                self.sites.stop()
