"""``opaudit trace``: run a script once and stream every op call it makes to a trace file.

The run is the audit's (the sandbox, the step window, the seed), traced from the
script's first line by default, so that setup (a model's initialisation draws) is in
the trace; the tracer is the run check's (:class:`~opaudit.engine.tracer.Tracer`),
with a sink that writes each call as it happens. The header holds what makes two
traces comparable (the script's content hash, the entry, the window) and what may
explain a difference (the environment fingerprint, the variables that pick kernels
and threads, the seed and mode); the end record holds the digests of the run's
final tensors (parameters, gradients, buffers, optimizer state, the return value).

Under torchrun every rank writes its own trace into a folder (``-o run.optrace``
becomes ``run.optrace/rank0.optrace``, ``rank1.optrace``...), which
``opaudit compare`` takes whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from opaudit.aten.ops import is_collective
from opaudit.data.errors import OpauditError
from opaudit.engine import loader
from opaudit.engine.environment import fingerprint, variables
from opaudit.engine.globalstate import preserved_state, set_deterministic
from opaudit.engine.phases import BACKWARD_BIT
from opaudit.engine.sourcefiles import relative_path
from opaudit.engine.tracefile import FLAG_COLLECTIVE, FLAG_LOSS, SUFFIX, TraceWriter
from opaudit.engine.tracer import Step, Tracer, safe_digest
from opaudit.engine.window import DEFAULT_ENTRY_CALLS, Recorded, Window, finalize, run_window
from opaudit.flows.runcheck.state import final_state


class TraceRunError(OpauditError):
    """A trace cannot be written where asked (under torchrun, ``-o`` names a folder of rank traces)."""


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    run_id: str


def rank_from_env(env: dict[str, str] | None = None) -> Rank | None:
    """The torchrun rank of this process (``RANK``, ``WORLD_SIZE``, ``TORCHELASTIC_RUN_ID``), or ``None``."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env and "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    return Rank(rank, world, env.get("TORCHELASTIC_RUN_ID", "")) if world > 1 else None


def output_path(output: str, rank: Rank | None) -> str:
    """Where this process writes: ``output`` itself, or ``output/rank{N}.optrace`` under torchrun."""
    if rank is None:
        return output
    if os.path.exists(output) and not os.path.isdir(output):
        raise TraceRunError(f"{output}: under torchrun each rank writes its own trace into a folder of that name, "
                            "and a file is there")
    os.makedirs(output, exist_ok=True)
    return os.path.join(output, f"rank{rank.rank}{SUFFIX}")


def default_window(target: loader.Target) -> Window:
    """What a trace covers unless told: the whole script from its first line, or one call of the entry
    (with the import that builds its model)."""
    return Window(steps=DEFAULT_ENTRY_CALLS if target.entry is not None else None)


def identity(target: loader.Target) -> dict[str, Any]:
    """What names the traced code: the script (as shown), its content hash, the entry and its arguments."""
    return {"script": relative_path(target.path, target.root), "sha256": hashlib.sha256(target.source.encode()).hexdigest(),
            "entry": target.entry, "argv": list(target.argv)}


def window_dict(window: Window) -> dict[str, Any]:
    """The window as the header holds it (traces of other windows are not compared)."""
    return {"steps": window.steps, "start": window.start, "max_seconds": window.max_seconds}


class _Steps:
    """The step each call belongs to: optimizer steps of the first optimizer that steps (a script), or calls of
    the entry (0 while its module is imported)."""

    def __init__(self, start: int, entry: bool) -> None:
        self.current = 0 if entry else start + 1
        self._entry = entry
        self._optimizer: Any = None
        self._handle: Any = None

    def __enter__(self) -> _Steps:
        if not self._entry:
            from torch.optim import optimizer as optim_module

            self._handle = optim_module.register_optimizer_step_post_hook(self._stepped)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _stepped(self, optimizer: Any, *_: Any) -> None:
        if self._optimizer is None:
            self._optimizer = optimizer
        if optimizer is self._optimizer:
            self.current += 1

    def counting(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` (the entry), numbering its calls."""
        def call() -> Any:
            self.current += 1
            return fn()
        return call


class _Sink:
    """Hands each of the tracer's steps to the writer, with its site, step number and flags."""

    def __init__(self, writer: TraceWriter, steps: _Steps) -> None:
        self.writer = writer
        self.steps = steps
        self.tracer: Tracer | None = None
        self._sites: dict[int, int] = {}

    def __call__(self, step: Step) -> None:
        w = self.writer
        if step.where is None:
            w.view(step.func)
            return
        phase, sid = step.where
        site = self._sites.get(sid)
        if site is None:
            site = self._sites[sid] = w.site_id(sid, self.tracer.sites.site(sid))  # type: ignore[union-attr]
        flags = 0
        if phase & BACKWARD_BIT and torch._C._current_graph_task_id() == -1:
            flags = FLAG_LOSS  # backward()'s gradient seed, made outside the engine: its input is the loss
        if is_collective(step.func):
            flags |= FLAG_COLLECTIVE
        w.call(step.func, site, phase, flags, self.steps.current, step.ins, step.outs, step.written)


def _final_digest(writer: TraceWriter) -> Callable[[Any], Any]:
    def keep(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return writer.encode(safe_digest(x.detach()))
        return None if x is None else repr(x)
    return keep


def trace_target(target: loader.Target, output: str, window: Window | None = None, *, seed: int | None = 0,
                 deterministic: bool = False, rank: Rank | None = None) -> tuple[Recorded, int, str]:
    """Run ``target`` once, from a fresh load, and write its trace to ``output``.

    ``deterministic`` runs it under ``torch.use_deterministic_algorithms(True,
    warn_only=True)``. Returns what was recorded, the number of calls written and
    the path written (under torchrun: this rank's file in the ``output`` folder).
    The user's code failing raises the loader's errors and leaves no file.
    """
    window = window or default_window(target)
    path = output_path(output, rank)
    with preserved_state():
        set_deterministic(deterministic, warn_only=True)
        header = {
            "target": identity(target), "window": window_dict(window),
            "settings": {"seed": seed, "deterministic": deterministic},
            "environment": fingerprint(), "variables": variables(),
            "rank": dataclasses.asdict(rank) if rank is not None else None,
        }
        with TraceWriter(path, header) as writer:
            steps = _Steps(window.start, target.entry is not None)
            sink = _Sink(writer, steps)
            tracer = Tracer(target.root, sink=sink)
            sink.tracer = tracer
            result: Any = None
            with steps, loader.sandboxed(target) as box:
                if target.entry is not None:
                    with tracer:  # the import runs the module's code: the model is built there
                        prepared = loader.prepare(target, seed)
                    loader.require_no_arguments(target, prepared)
                    prepared = dataclasses.replace(prepared, call=steps.counting(prepared.call))
                else:
                    prepared = loader.prepare(target, seed)
                recorded, result = run_window(prepared, lambda: tracer, window, target.entry)
                with _disable_current_modes(), torch.no_grad():
                    final = final_state(result if target.entry is not None else None, prepared.namespace, tracer,
                                        keep=_final_digest(writer))
                settled = fingerprint()  # before the sandbox puts back what the script changed (threads...)
            recorded = dataclasses.replace(recorded, sandbox=box)
            end = {"recorded": recorded.span, "stopped": recorded.stopped, "steps": steps.current,
                   "forward_seen": tracer.sites.forward_seen, "final": final, "environment_end": settled}
            writer.close(end)
            calls = writer.calls
        if recorded.stopped is not None and target.entry is None:
            finalize(prepared.namespace)
    return recorded, calls, path
