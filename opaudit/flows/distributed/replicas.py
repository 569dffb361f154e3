"""Replica consistency: what DDP keeps identical on every rank, checked by digest.

While the step runs, :class:`ReplicaTracker` finds every
``DistributedDataParallel`` module (a global forward pre-hook) and logs each
in-place write to its parameters, buffers and gradients: the op, the user's
source line and module, and a digest of the tensor after the write. After the
step, each tensor's final digest is compared across ranks; for one that differs,
the write logs are compared position by position, and the first write whose
result already differed across ranks names the op to blame (a BatchNorm's
running-stat update without SyncBatchNorm, a rank-local nondeterministic op
after the all-reduce...).

The tracker is a ``TorchDispatchMode`` entered *above* the recorder: it hands
each op down to the recorder, then digests with every mode disabled, so its own
work is never recorded and the recorder's own copies are never logged.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from opaudit.aten.bitwise import digest
from opaudit.aten.ops import written_args
from opaudit.aten.signature import signature_text
from opaudit.engine.mode import skip_dynamo
from opaudit.engine.sites import SiteTracker

# Ops that update running statistics in place without saying so in their schema
# (``Tensor? running_mean`` rather than ``Tensor(a!)``): argument positions written.
_UNDECLARED_WRITES = {
    "aten::native_batch_norm": (3, 4), "aten::cudnn_batch_norm": (3, 4), "aten::miopen_batch_norm": (3, 4),
}

_COLLECTIVE_NAMESPACES = frozenset({"c10d", "_c10d_functional"})

_MAX_WRITES = 64
"""Writes logged per tensor: enough to locate the first divergence in a step."""


def _key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        return (t.untyped_storage().data_ptr(), t.storage_offset())
    except Exception:  # tensors without storage are never replicated state
        return None


def _hex(d: tuple) -> str:
    return f"{d[2] & 0xFFFFFFFFFFFFFFFF:016x}{d[3] & 0xFFFFFFFFFFFFFFFF:016x}"


def _log_writes(self: "_WriteLog", func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
    out = func(*args, **(kwargs or {}))
    tr = self.tracker
    tr.calls += 1
    if func.namespace in _COLLECTIVE_NAMESPACES:
        with _disable_current_modes():
            tr.collective_calls.append(f"{func}({signature_text(args, kwargs or {})})")
    if tr.names:
        pos, kw = written_args(func)
        extra = _UNDECLARED_WRITES.get(func._schema.name, ())
        if any(pos) or kw or extra:
            written = [a for i, (a, w) in enumerate(zip(args, pos)) if w or i in extra]
            written += [v for k, v in (kwargs or {}).items() if k in kw]
            with _disable_current_modes():
                tr.on_write(func, written)
    return out


# TorchDispatchMode's own wrapper would import Dynamo (2 s per rank) on the first op: the code is marked instead.
_DYNAMO_SKIPPED = skip_dynamo(_log_writes.__code__)


class _WriteLog(TorchDispatchMode):
    def __init__(self, tracker: "ReplicaTracker") -> None:
        super().__init__()
        self.tracker = tracker

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return not _DYNAMO_SKIPPED

    __torch_dispatch__ = _log_writes


class ReplicaTracker:
    """Finds DDP modules during the step and logs writes to their replicated tensors."""

    def __init__(self, root: str | None = None) -> None:
        self.modules: list[Any] = []
        self.names: dict[tuple[int, int], str] = {}
        """(storage pointer, offset) → tensor name, for every tracked tensor."""
        self.writes: dict[str, list[dict[str, Any]]] = {}
        self.calls = 0
        self.collective_calls: list[str] = []
        """Every collective call, ``op(signature)``, in execution order."""
        self._sites = SiteTracker(root)
        self._handles: list[Any] = []

    @contextlib.contextmanager
    def around(self, inner: contextlib.AbstractContextManager[Any]) -> Iterator[Any]:
        """Track while ``inner`` (the recorder) records; the tracker's mode sits below it."""
        from torch.nn.modules.module import register_module_forward_pre_hook

        self._handles.append(register_module_forward_pre_hook(self._on_forward))
        try:
            with inner as value, _WriteLog(self):
                yield value
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    # -- discovery ----------------------------------------------------------
    def _on_forward(self, module: torch.nn.Module, _inputs: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(module, DistributedDataParallel) and not any(m is module for m in self.modules):
            self.modules.append(module)
            for name, t, _ in self.tensors(module):
                self._track(name, t)
            for name, p in self._params(module):
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))

    def _grad_hook(self, name: str) -> Any:
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                self._track(f"{name}.grad", p.grad)
        return hook

    def _track(self, name: str, t: torch.Tensor) -> None:
        k = _key(t)
        if k is not None:
            self.names[k] = name

    @staticmethod
    def _params(ddp: Any) -> Iterator[tuple[str, torch.Tensor]]:
        ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
        prefix = type(ddp.module).__name__
        for name, p in ddp.module.named_parameters():
            if name not in ignored and p.requires_grad:
                yield f"{prefix}.{name}", p

    def tensors(self, ddp: Any) -> Iterator[tuple[str, torch.Tensor, str]]:
        """``(name, tensor, kind)`` of everything DDP keeps replicated: parameters, gradients, buffers."""
        ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
        prefix = type(ddp.module).__name__
        for name, p in self._params(ddp):
            yield name, p.detach(), "parameter"
            if p.grad is not None:
                yield f"{name}.grad", p.grad, "gradient"
        for name, b in ddp.module.named_buffers():
            if name not in ignored and b is not None:
                yield f"{prefix}.{name}", b, "buffer"

    # -- the write log --------------------------------------------------------
    def on_write(self, func: Any, written: list[Any]) -> None:
        """Log a digest of each tracked tensor ``func`` just wrote."""
        for t in written:
            for x in t if isinstance(t, (list, tuple)) else (t,):
                if not isinstance(x, torch.Tensor):
                    continue
                name = self.names.get(_key(x))
                if name is None:
                    continue
                log = self.writes.setdefault(name, [])
                if len(log) >= _MAX_WRITES:
                    continue
                site = self._sites.frame_site(sys._getframe(1))
                log.append({"op": str(func), "call": self.calls, "where": site.location, "module": site.module,
                            "digest": _hex(digest(x.detach()))})

    # -- after the step -----------------------------------------------------
    def final_digests(self) -> dict[str, dict[str, str]]:
        """``name → {kind, digest}`` for every replicated tensor of every DDP module seen."""
        out: dict[str, dict[str, str]] = {}
        for ddp in self.modules:
            for name, t, kind in self.tensors(ddp):
                out[name] = {"kind": kind, "digest": _hex(digest(t.detach()))}
        return out

    def release(self) -> None:
        """Let go of the user's modules."""
        self.modules.clear()
        self.names.clear()


def compare(per_rank: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Replicated tensors whose digests differ across ranks, each with the first write to blame.

    ``per_rank`` maps rank → ``{"final": final_digests(), "writes": writes}``.
    """
    ranks = sorted(per_rank)
    names = sorted({n for r in ranks for n in per_rank[r]["final"]})
    out = []
    for name in names:
        finals = {r: per_rank[r]["final"].get(name) for r in ranks}
        digests = {r: (f or {}).get("digest") for r, f in finals.items()}
        if len(set(digests.values())) == 1:
            continue
        kind = next((f["kind"] for f in finals.values() if f), "")
        groups: dict[Any, list[int]] = {}
        for r, d in digests.items():
            groups.setdefault(d, []).append(r)
        entry: dict[str, Any] = {
            "tensor": name, "kind": kind,
            "ranks": " vs ".join(",".join(map(str, rs)) for rs in groups.values()),
        }
        logs = {r: per_rank[r]["writes"].get(name, []) for r in ranks}
        first = _first_differing_write(logs)
        if first is not None:
            entry["first_op"] = first
        else:
            entry["first_op_note"] = ("no in-place write of it differed across ranks (its value was set out of "
                                      "place, or before DDP wrapped the module)")
        out.append(entry)
    return out


def _first_differing_write(logs: dict[int, list[dict[str, Any]]]) -> dict[str, Any] | None:
    n = max((len(v) for v in logs.values()), default=0)
    for i in range(n):
        at = {r: log[i] if i < len(log) else None for r, log in logs.items()}
        if len({(w or {}).get("digest") for w in at.values()}) > 1:
            w = next(w for w in at.values() if w is not None)
            return {"op": w["op"], "where": w["where"], "module": w["module"], "write": i + 1,
                    "call_on_rank": {str(r): (x or {}).get("call") for r, x in sorted(at.items())}}
    return None
