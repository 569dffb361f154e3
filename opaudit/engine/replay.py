"""Replay: run one captured op under each determinism mode and compare the bits.

For one signature, on fresh clones of its captured inputs every time and with
the same RNG state restored before every run:

* **strict**: once under ``use_deterministic_algorithms(True)``: does it raise?
* **default**: ``reps`` times with the setting off: do the bits differ run to run?
* **deterministic**: ``reps`` times with the setting on and ``warn_only=True`` (so ops
  without a deterministic implementation still run): the warnings these runs raise
  are the **warn_only** observation, and the bits are compared the same way.
* on CUDA, cuDNN-backed ops also run under each ``cudnn.deterministic`` /
  ``cudnn.benchmark`` setting.

Global state (determinism flags, ``fill_uninitialized_memory``, RNG states, grad
mode, threads, cuDNN and TF32 flags) is restored after every replay.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from opaudit.aten.tensors import Snapshot, difference, flat_tensors, same_bits
from opaudit.data.observation import (
    CUBLAS_WORKSPACE,
    NO_DETERMINISTIC_IMPL,
    OTHER_ERROR,
    Observation,
    RunStats,
    error_text,
)

_ALERT_TEXT = "does not have a deterministic implementation"
_CUBLAS_TEXT = "CUBLAS_WORKSPACE_CONFIG"


class ReplayError(Exception):
    """A replay could not be set up (not raised for ops that fail: those are observations)."""


# -- global state -----------------------------------------------------------
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
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        yield
    finally:
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
            (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = cudnn


class _Rng:
    """Saved RNG states for the CPU and the CUDA devices an op touches."""

    def __init__(self, devices: set[torch.device]) -> None:
        self.cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"}) if torch.cuda.is_available() else []
        self.cpu = torch.get_rng_state()
        self.gpu = [torch.cuda.get_rng_state(i) for i in self.cuda]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for i, s in zip(self.cuda, self.gpu):
            torch.cuda.set_rng_state(s, i)

    def advanced(self) -> bool:
        if not torch.equal(torch.get_rng_state(), self.cpu):
            return True
        return any(not torch.equal(torch.cuda.get_rng_state(i), s) for i, s in zip(self.cuda, self.gpu))


class _Timer:
    """Times one call; synchronises on CUDA so that kernel time is counted."""

    def __init__(self, devices: set[torch.device]) -> None:
        self.cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"}) if torch.cuda.is_available() else []

    def sync(self) -> None:
        for i in self.cuda:
            torch.cuda.synchronize(i)


def _alert_kind(message: str) -> str:
    if _ALERT_TEXT in message:
        return NO_DETERMINISTIC_IMPL
    if _CUBLAS_TEXT in message:
        return CUBLAS_WORKSPACE
    return OTHER_ERROR


def _is_determinism_warning(message: str) -> bool:
    m = message.lower()
    return "determinis" in m or _CUBLAS_TEXT.lower() in m


_CPP_WARNING = re.compile(r"Warning: (.*?)(?: \(function [\w:~<>]+\))?$")


@contextlib.contextmanager
def _stderr_captured(sink: list[str]) -> Iterator[None]:
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
                if _is_determinism_warning(msg) and msg not in sink:
                    sink.append(msg)


def _outputs(result: Any, written: list[torch.Tensor]) -> list[Any]:
    leaves = flat_tensors(result)
    seen = {id(x) for x in leaves if isinstance(x, torch.Tensor)}
    return leaves + [t for t in written if id(t) not in seen]


def _runs(func: Any, snap: Snapshot, reps: int, rng: _Rng, timer: _Timer) -> tuple[RunStats, bool]:
    """``reps`` runs compared bitwise with the first; returns stats and whether the RNG moved."""
    first: list[Any] | None = None
    differing, max_diff, max_frac = 0, 0.0, 0.0
    times: list[float] = []
    rng_used = False
    for _ in range(reps):
        args, kwargs, written = snap.materialize()
        rng.restore()
        timer.sync()
        t0 = time.perf_counter()
        result = func(*args, **kwargs)
        timer.sync()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if not rng_used and rng.advanced():
            rng_used = True
        outs = _outputs(result, written)
        if first is None:
            first = outs
            continue
        if len(outs) != len(first):
            differing += 1
            max_diff, max_frac = float("inf"), 1.0
            continue
        run_differs, changed, total = False, 0, 0
        for a, b in zip(first, outs):
            n = a.numel() if isinstance(a, torch.Tensor) else 1
            total += n
            if same_bits(a, b):
                continue
            run_differs = True
            d = difference(a, b)
            changed += d.elements_differing
            max_diff = max(max_diff, d.max_abs_diff)
        if run_differs:
            differing += 1
            max_frac = max(max_frac, changed / total if total else 1.0)
    median = statistics.median(times) if times else None
    return RunStats(reps, differing, max_diff, max_frac, median), rng_used


def replay(func: Any, snap: Snapshot, reps: int = 5, *, cudnn_variants: bool = False) -> Observation:
    """Replay ``func`` on fresh copies of ``snap`` under every mode. Never raises for op failures."""
    if reps < 1:
        raise ReplayError("reps must be at least 1")
    devices = snap.devices
    with preserved_state(), _disable_current_modes(), torch.no_grad():
        rng = _Rng(devices)
        timer = _Timer(devices)
        strict_kind = strict_error = None
        set_deterministic(True)
        try:
            args, kwargs, _ = snap.materialize()
            rng.restore()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                func(*args, **kwargs)
            timer.sync()
        except Exception as e:  # noqa: BLE001 - an op's own failure is an observation
            strict_kind, strict_error = _alert_kind(str(e)), str(e).strip()
        sink: list[str] = []
        try:
            set_deterministic(True, warn_only=True)
            with _stderr_captured(sink), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                det, rng_det = _runs(func, snap, reps, rng, timer)
            for w in caught:
                msg = str(w.message)
                if _is_determinism_warning(msg) and msg not in sink:
                    sink.append(msg)
            set_deterministic(False)
            default, rng_def = _runs(func, snap, reps, rng, timer)
            variants: list[tuple[str, RunStats]] = []
            if cudnn_variants:
                for d in (False, True):
                    for b in (False, True):
                        with torch.backends.cudnn.flags(enabled=True, deterministic=d, benchmark=b):
                            stats, _ = _runs(func, snap, reps, rng, timer)
                        variants.append((f"cudnn.deterministic={d},benchmark={b}", stats))
        except Exception as e:  # noqa: BLE001
            return Observation(strict_kind, strict_error, tuple(sink), None, None, False, error=error_text(e))
        return Observation(strict_kind, strict_error, tuple(sink), default, det,
                           rng_def or rng_det, variants=tuple(variants))


def time_fill(func: Any, snap: Snapshot, reps: int = 5) -> tuple[float, float] | None:
    """Median seconds per call of an op returning uninitialized memory, with the
    determinism setting off and on (where ``fill_uninitialized_memory`` fills it).

    Only timed: the bits of uninitialized memory mean nothing. ``None`` if it fails.
    """
    from torch.utils import deterministic as det_utils

    out = []
    with preserved_state(), _disable_current_modes(), torch.no_grad():
        timer = _Timer(snap.devices)
        det_utils.fill_uninitialized_memory = True
        for mode in (False, True):
            set_deterministic(mode, warn_only=True)
            times = []
            for _ in range(reps):
                args, kwargs, _ = snap.materialize()
                timer.sync()
                t0 = time.perf_counter()
                try:
                    func(*args, **kwargs)
                except Exception:  # noqa: BLE001 - timing is best effort
                    return None
                timer.sync()
                times.append(time.perf_counter() - t0)
            out.append(statistics.median(times))
    return out[0], out[1]
