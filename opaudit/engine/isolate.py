"""Replay in a worker subprocess: an op that crashes or hangs costs one signature, not the audit.

``opaudit SCRIPT --isolate`` replays every signature in a worker process. If the
worker dies (a segfault, ``os._exit``, an abort in a C++ kernel) or poisons its
CUDA context (a device-side assert, an illegal memory access), that signature
is reported ``skipped`` with reason ``crashed: <signal or error>`` and a fresh
worker takes the next one. With ``--op-timeout SECONDS``, a signature whose
replay (all of its runs together) takes longer is reported ``skipped`` with
reason ``timeout`` and its worker is killed. A C++ kernel cannot be stopped
from inside its own process, so ``--op-timeout`` implies ``--isolate``.

How inputs reach the worker depends on where they live:

* **fork** (the default on Linux when every captured input is on the CPU and
  CUDA is not initialised): the worker is forked after recording and inherits
  the recorder's snapshots copy-on-write; the parent only sends an index. Any op
  works, custom ops registered by the user's script included. A worker that
  crashed is forked again from the unchanged parent.
* **spawn** (CUDA initialised, inputs on an accelerator, or not Linux): forking a
  process with a live CUDA context is unsafe, so the worker is a fresh
  interpreter. Each snapshot is sent to it: CPU tensors by value, CUDA tensors
  as IPC handles through ``torch.multiprocessing``'s reductions, and the op is looked up by name, after importing the module that registered
  it when that module is importable (``torchvision`` for ``torchvision::nms``).
  An op the worker cannot find (a custom op registered by the user's script
  itself) is reported ``skipped`` with reason ``replay failed: ...``. Global settings that change results (RNG states,
  thread count, TF32/cuDNN flags, matmul precision) are copied to the worker.
  The worker does not import the parent's ``__main__``, so the user's script is
  never run a second time.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import multiprocessing
import pickle
import signal
import sys
import threading
import time
import types
from collections.abc import Iterable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any

import torch

from opaudit.aten import precision
from opaudit.aten.portable import Reference
from opaudit.aten.tensors import Snapshot
from opaudit.data.errors import OpauditError
from opaudit.data.observation import CRASHED, TIMEOUT, NotReplayed, Observation, error_text
from opaudit.engine.globalstate import set_deterministic
from opaudit.engine.replay import MoreRuns, replay
from opaudit.engine.worker import TIMED_OUT, Worker, WorkerStartError, exit_reason

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from opaudit.engine.record import Recorder

STARTUP_TIMEOUT = 300.0
"""Seconds a fresh worker may take to start (a spawned one imports torch)."""

class IsolationError(OpauditError):
    """The worker process could not be started."""


def default_start_method(snapshots: Iterable[Snapshot] = ()) -> str:
    """``fork`` where it is safe and cheap, else ``spawn`` (see the module docstring)."""
    if not sys.platform.startswith("linux"):
        return "spawn"
    if torch.cuda.is_initialized():
        return "spawn"
    if any(d.type != "cpu" for s in snapshots for d in s.devices):
        return "spawn"
    return "fork"


def _op_ref(func: Any) -> tuple[str, str, tuple[str, ...]]:
    """How a spawned worker finds ``func``: its name, overload and modules to import first.

    aten ops need no import. Ops of other namespaces are registered by importing
    something (``torchvision`` registers ``torchvision::nms``): the defining module
    of a ``torch.library.custom_op``, and a module named like the namespace, when
    the parent has them loaded and they are importable (not ``__main__``).
    """
    qualified = func._schema.name
    namespace = qualified.split("::", 1)[0]
    candidates = []
    try:
        from torch._library.custom_ops import OPDEFS

        opdef = OPDEFS.get(qualified)
        if opdef is not None:
            candidates.append(opdef._init_fn.__module__)
    except Exception:  # private API; the namespace guess below still applies
        pass
    candidates.append(namespace)
    modules = tuple(dict.fromkeys(
        m for m in candidates
        if m in sys.modules and m != "__main__" and getattr(sys.modules[m], "__spec__", None) is not None
    ))
    return qualified, func._overloadname, modules


def _resolve_op(ref: tuple[str, str, tuple[str, ...]]) -> Any:
    qualified, overload, modules = ref
    for m in modules:
        importlib.import_module(m)
    namespace, name = qualified.split("::", 1)
    return getattr(getattr(getattr(torch.ops, namespace), name), overload)


# -- global state the worker must share with the parent ---------------------
def _settings() -> dict[str, Any]:
    """What a spawned worker needs to replay exactly as the parent would."""
    from torch.utils import deterministic as det_utils

    state: dict[str, Any] = {
        "cpu_rng": torch.get_rng_state(),
        "threads": torch.get_num_threads(),
        "cudnn": (torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic,
                  torch.backends.cudnn.benchmark),
        "precision": precision.snapshot(),
        "fill_uninitialized": det_utils.fill_uninitialized_memory,
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
    }
    if torch.cuda.is_initialized():
        state["cuda_rng"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def _apply_settings(state: dict[str, Any]) -> None:
    from torch.utils import deterministic as det_utils

    torch.set_rng_state(state["cpu_rng"])
    if "cuda_rng" in state:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    torch.set_num_threads(state["threads"])
    (torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.benchmark) = state["cudnn"]
    precision.restore(state["precision"])
    det_utils.fill_uninitialized_memory = state["fill_uninitialized"]
    det, warn_only = state["deterministic"]
    set_deterministic(det, warn_only)


def _context_error(snap: Snapshot) -> str | None:
    """The error a poisoned CUDA context raises on the next synchronise, if any."""
    for device in snap.devices:
        if device.type == "cuda":
            try:
                torch.cuda.synchronize(device)
            except Exception as e:  # any failure here means the context is gone
                return error_text(e)
    return None


@contextlib.contextmanager
def _main_hidden(hide: bool) -> Iterator[None]:
    """Hide ``__main__`` from multiprocessing while a spawned worker starts.

    A spawned child re-imports the parent's main module before it runs its target;
    here that module is the user's script (or whatever called opaudit), and the
    worker needs nothing from it: running it again would rerun their training.
    """
    if not hide:
        yield
        return
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


class _RequestPickler(pickle.Pickler):
    """CPU tensors by value, accelerator tensors by IPC handle (``torch.multiprocessing``).

    ``torch.multiprocessing`` would also move every CPU buffer into shared memory,
    which keeps file descriptors open in this process for each buffer for as long
    as the snapshot lives (two per buffer here): thousands of signatures would run
    out of them.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.UntypedStorage):
            # Plain pickling of an untyped storage does not load back (torch 2.13),
            # and a CUDA storage can only travel as a tensor: send a byte view.
            return _storage_of, (torch.empty(0, dtype=torch.uint8, device=obj.device).set_(obj),)
        if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            reduce = ForkingPickler._extra_reducers.get(type(obj))
            if reduce is not None:
                return reduce(obj)
        return NotImplemented


def _storage_of(view: torch.Tensor) -> torch.UntypedStorage:
    return view.untyped_storage()


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _RequestPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


# -- the worker -------------------------------------------------------------
def _serve(conn: "Connection", table: list[tuple[Any, Snapshot]] | None, state: dict[str, Any] | None,
           inherited: "Connection | None") -> None:
    """Worker loop: replay what the parent asks for until it sends ``None`` or goes away.

    Acknowledges each request with ``("started", None)``, so that the parent knows
    whether a death belongs to it, then replies ``("ok", Observation)``,
    ``("unavailable", reason)`` when the request cannot be replayed here, or
    ``("crashed", error)`` just before exiting when the process can no longer be
    trusted.
    """
    # Ctrl-C reaches the whole process group; the parent decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if inherited is not None:
        # A forked worker holds a copy of the parent's end: close it, so that the
        # parent's death reads as end-of-file here instead of a hang.
        inherited.close()
    if state is not None:
        _apply_settings(state)
    threads = torch.get_num_threads()

    def loop() -> None:
        torch.set_num_threads(threads)
        _loop(conn, table)

    # GNU OpenMP keeps its thread pool per calling thread. After a fork the pool's
    # threads are gone but the main thread's record of them is not, and its next
    # parallel op waits for them forever; a new thread builds a pool of its own.
    worker = threading.Thread(target=loop, name="opaudit-replay")
    worker.start()
    worker.join()


def _loop(conn: "Connection", table: list[tuple[Any, Snapshot]] | None) -> None:
    conn.send(("ready", None))
    while True:
        try:
            request = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        except Exception as e:  # inputs that cannot be rebuilt here (a CUDA IPC failure...)
            conn.send(("started", None))
            conn.send(("unavailable", f"inputs cannot be received by the worker: {error_text(e)}"))
            continue
        if request is None:
            return
        conn.send(("started", None))
        target, reps, cudnn, reference, more = request
        try:
            if table is not None:
                func, snap = table[target]
            else:
                ref, snap = target
                func = _resolve_op(ref)
        except Exception as e:  # e.g. a custom op unknown to a spawned worker
            conn.send(("unavailable", f"not available in the worker process: {error_text(e)}"))
            continue
        try:
            obs = replay(func, snap, reps, cudnn_variants=cudnn, reference=reference, more=more)
        except Exception as e:  # not an op failure: this process is suspect now
            conn.send(("crashed", error_text(e)))
            return
        broken = _context_error(snap)
        if broken is not None:
            conn.send(("crashed", broken))
            return
        conn.send(("ok", obs))


class Isolator:
    """A ``replay_fn`` for :func:`opaudit.flows.pipeline.build_report` that replays in a worker process.

    >>> with Isolator(rec, timeout=60) as iso:
    ...     report = build_report(rec, replay_fn=iso)

    ``rec`` registers the recorder's snapshots up front, so that a forked worker
    inherits all of them (``snapshots``, ``(op, snapshot)`` pairs, adds others: a capsule's); snapshots not registered are added on first use (a
    fork-mode worker is then forked again). ``timeout`` is the wall-clock limit,
    in seconds, on replaying one signature, all runs together; ``None`` waits for
    as long as the op runs. ``start_method`` is ``fork`` or ``spawn``; by default
    :func:`default_start_method` picks. The worker starts on the first replay,
    after recording has finished.
    """

    def __init__(self, rec: "Recorder | None" = None, *, timeout: float | None = None,
                 start_method: str | None = None, snapshots: Iterable[tuple[Any, Snapshot]] = ()) -> None:
        if timeout is not None and not 0 < timeout < float("inf"):
            raise ValueError("timeout must be a positive, finite number of seconds")
        self.timeout = timeout
        self._table: list[tuple[Any, Snapshot]] = []
        self._index: dict[tuple[Any, int], int] = {}
        if rec is not None:
            further = rec.further_captures()
            for sig, func, snap in rec.items():
                if snap is not None:
                    self._register(func, snap)
                    for _, more in further.get(sig.id, ()):
                        self._register(func, more)
        for func, snap in snapshots:
            self._register(func, snap)
        if start_method is None:
            start_method = default_start_method([s for _, s in self._table])
        if start_method not in ("fork", "spawn"):
            raise ValueError(f"start_method must be 'fork' or 'spawn', not {start_method!r}")
        self.start_method = start_method
        self._worker: Worker | None = None
        self._worker_table = 0
        """Snapshots registered when the running worker was forked (all it can see)."""
        self.starts = 0
        """Workers started so far: 1 + one per crash or timeout that needed a new one."""

    @property
    def pid(self) -> int | None:
        """Process id of the running worker, or ``None`` when none runs."""
        return self._worker.pid if self._worker is not None else None

    # -- context --------------------------------------------------------------
    def __enter__(self) -> "Isolator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker, if one is running."""
        w, self._worker = self._worker, None
        if w is not None:
            w.stop(lambda: w.conn.send_bytes(_dumps(None)))

    # -- replay ---------------------------------------------------------------
    def __call__(self, func: Any, snap: Snapshot, reps: int, cudnn: bool,
                 reference: Reference | None = None, more: MoreRuns | None = None) -> Observation:
        """Replay ``func`` on ``snap`` in the worker; never raises for what the op does.

        ``reference``: a capsule's source outputs, compared there; ``more``: further runs of a
        race-prone op (see :func:`~opaudit.engine.replay.replay`).
        """
        try:
            return self._replay(func, snap, reps, cudnn, reference, more)
        except BaseException:
            # Ctrl-C (or anything unexpected) while the worker runs: do not leave it behind.
            self._discard()
            raise

    def _replay(self, func: Any, snap: Snapshot, reps: int, cudnn: bool, reference: Reference | None,
                more: MoreRuns | None) -> Observation:
        # A worker that dies before it takes the request was killed by something
        # earlier (a late crash, the OOM killer): not this op's fault, so one retry.
        for attempt in range(2):
            if self.start_method == "fork":
                i = self._register(func, snap)
                worker = self._ensure_worker(need=i + 1)
                request: Any = (i, reps, cudnn, reference, more)
            else:
                worker = self._ensure_worker()
                request = ((_op_ref(func), snap), reps, cudnn, reference, more)
            try:
                message = _dumps(request)
            except Exception as e:  # an argument that does not pickle
                return Observation(None, None, (), None, None, False,
                                   error=f"inputs cannot be sent to the worker: {error_text(e)}")
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            try:
                worker.conn.send_bytes(message)
            except (OSError, EOFError):
                taken = None
            else:
                taken = worker.receive(deadline)
            if taken is TIMED_OUT:
                self._discard()
                return NotReplayed.because(TIMEOUT)
            if taken is None:
                reason = self._reap()
                if attempt == 0:
                    continue
                return NotReplayed.because(f"{CRASHED}: {reason}")
            break
        reply = worker.receive(deadline)
        if reply is TIMED_OUT:
            self._discard()
            return NotReplayed.because(TIMEOUT)
        if reply is None:
            return NotReplayed.because(f"{CRASHED}: {self._reap()}")
        status, payload = reply
        if status == "ok":
            return payload
        if status == "unavailable":
            return Observation(None, None, (), None, None, False, error=payload)
        self._reap()
        return NotReplayed.because(f"{CRASHED}: {payload}")

    def _register(self, func: Any, snap: Snapshot) -> int:
        key = (func, id(snap))
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self._table)
            self._table.append((func, snap))
        return i

    def _ensure_worker(self, need: int = 0) -> Worker:
        w = self._worker
        if w is not None and self._worker_table < need:
            # A snapshot registered after this worker was forked: it cannot see it.
            self.close()
            w = None
        if w is None:
            w = self._worker = self._start()
        return w

    def _start(self) -> Worker:
        ctx = multiprocessing.get_context(self.start_method)
        parent_end, child_end = ctx.Pipe(duplex=True)
        if self.start_method == "fork":
            args: tuple = (child_end, list(self._table), None, parent_end)
        else:
            args = (child_end, None, _settings(), None)
        process = ctx.Process(target=_serve, args=args, name="opaudit-replay", daemon=True)
        with _main_hidden(self.start_method == "spawn"):
            process.start()
        child_end.close()
        self.starts += 1
        worker = Worker(process, parent_end)
        try:
            worker.await_ready(STARTUP_TIMEOUT)
        except WorkerStartError as e:
            raise IsolationError(f"the replay worker ({self.start_method}) did not start: {e}") from None
        self._worker_table = len(self._table)
        return worker

    def _reap(self) -> str:
        """Collect a worker that went away; the reason, e.g. ``SIGSEGV`` or ``exit status 1``."""
        w, self._worker = self._worker, None
        return w.exit_reason() if w is not None else exit_reason(None)

    def _discard(self) -> None:
        w, self._worker = self._worker, None
        if w is not None:
            w.kill()
