"""The global state a replay runs in: ATen's determinism flag set and every flag put back, an op's own
failures told from opaudit's, and the determinism warnings an op writes.

Everything here is process-wide (flags, ``os._exit``, file descriptor 2); :mod:`opaudit.engine.replay`
runs an op's series inside it, and the whole-step flows set the flag and restore the state with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from opaudit.aten import precision
from opaudit.aten.ops import ALERT_TEXT, CUBLAS_TEXT
from opaudit.data.observation import CUBLAS_WORKSPACE, NO_DETERMINISTIC_IMPL, OTHER_ERROR, error_text
from opaudit.engine.exits import exit_for


class _ExitCalled(SystemExit):
    """``os._exit(status)`` called by a replayed op's Python code (a ``torch.library`` op), raised in its place."""


@contextlib.contextmanager
def exits_fail_the_op() -> Iterator[None]:
    """While ops replay, ``os._exit`` in this process raises :class:`_ExitCalled` instead of ending it.

    With ``sys.exit`` (:class:`SystemExit`) it is then the op's failure (``replay
    failed: the op called ...``), not the end of opaudit with that status and no
    report. An op that ends the process from C (``abort``, ``_exit`` in C++)
    cannot be stopped here: ``--isolate`` replays it in a worker, and reports it
    ``crashed``.
    """
    real = os._exit
    os._exit = exit_for(os.getpid(), _ExitCalled)  # type: ignore[assignment]
    try:
        yield
    finally:
        os._exit = real  # type: ignore[assignment]


OP_FAILURES = (Exception, SystemExit)
"""What an op's call can raise that is its own failure, an observation; Ctrl-C (``KeyboardInterrupt``) is not."""


def failure_text(e: BaseException) -> str:
    """How a report says what an op's call raised (a call of ``os._exit`` or ``sys.exit`` by name)."""
    if isinstance(e, _ExitCalled):
        return f"the op called os._exit({e.code!r})"
    if isinstance(e, SystemExit):
        return f"the op called sys.exit({'' if e.code is None else repr(e.code)})"
    return error_text(e)


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _cudnn_mutation_allowed() -> contextlib.AbstractContextManager[Any]:
    allow = getattr(torch.backends, "__allow_nonbracketed_mutation", None)
    return allow() if allow is not None else contextlib.nullcontext()


_INDUCTOR_CONFIG = "torch._inductor.config"


def set_deterministic(mode: bool, warn_only: bool = False) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=...)`` for eager ops.

    The public function also sets ``torch._inductor.config.deterministic``, and
    the first call imports that module, which imports Dynamo: about 1.7 s of a
    CLI run on 2 cores, for a flag eager replay never reads. This sets ATen's
    flag only, and Inductor's too when its config is already imported (so the
    two never disagree while it is loaded). :func:`preserved_state` restores both.
    """
    torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)
    inductor = sys.modules.get(_INDUCTOR_CONFIG)
    if inductor is not None:
        inductor.deterministic = mode


@contextlib.contextmanager
def preserved_state() -> Iterator[None]:
    """Restore every global flag a replay can touch, whatever happens inside."""
    from torch.utils import deterministic as det_utils

    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    inductor = sys.modules.get(_INDUCTOR_CONFIG)
    inductor_det = inductor.deterministic if inductor is not None else None
    fill = det_utils.fill_uninitialized_memory
    grad = torch.is_grad_enabled()
    threads = torch.get_num_threads()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if _cuda_ready() else None
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    tf32 = precision.snapshot()
    warn_always = torch.is_warn_always_enabled()
    try:
        yield
    finally:
        torch.set_warn_always(warn_always)
        set_deterministic(det, warn_only)
        if inductor is not None:
            # Inductor's flag may differ from ATen's (set on its own): put back its own value.
            inductor.deterministic = inductor_det
        det_utils.fill_uninitialized_memory = fill
        torch.set_grad_enabled(grad)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        # torch.testing's common_utils (imported by catalog sweeps) forbids setting
        # the cuDNN flags outside a ``with`` block; restoring them is always allowed.
        with _cudnn_mutation_allowed():
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        precision.restore(tf32)


def alert_kind(message: str) -> str:
    """Which refusal a strict deterministic-mode error is: no deterministic implementation, cuBLAS's workspace, other."""
    if ALERT_TEXT in message:
        return NO_DETERMINISTIC_IMPL
    if CUBLAS_TEXT in message:
        return CUBLAS_WORKSPACE
    return OTHER_ERROR


def is_determinism_warning(message: str) -> bool:
    """Whether a warning an op raised is about determinism (``warn_only``'s alert, cuBLAS's workspace)."""
    m = message.lower()
    return "determinis" in m or CUBLAS_TEXT.lower() in m


_CPP_WARNING = re.compile(r"Warning: (.*?)(?: \(function [\w:~<>]+\))?$")


@contextlib.contextmanager
def stderr_captured(sink: list[str]) -> Iterator[None]:
    """Collect C++ ``TORCH_WARN`` lines written to fd 2.

    Ops called through ``torch.ops`` overloads report warnings through c10's default
    handler, which writes to the process's stderr rather than Python's
    ``warnings``; the ``warn_only`` alert is one of them.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode("utf-8", "replace").splitlines():
                m = _CPP_WARNING.search(line)
                if m is None:
                    continue
                msg = m.group(1).strip()
                if is_determinism_warning(msg) and msg not in sink:
                    sink.append(msg)
