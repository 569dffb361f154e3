"""The tracer: the digest of every op's inputs and outputs, in execution order.

Runs inside the recorder's dispatch mode (:class:`~opaudit.engine.mode.Interception`).
Two users: the whole-step run check (:mod:`opaudit.flows.runcheck`) keeps the steps of
each run in memory and compares them op by op; ``opaudit trace``
(:mod:`opaudit.flows.trace`) hands each step to a sink that streams it to a trace file,
so that memory does not grow with the run.

Collectives finish in the background: :func:`settle` waits for one before its
outputs are digested, or the digest would be a race, not the run's bits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from opaudit.aten.bitwise import digest, nested_leaves
from opaudit.aten.ops import OpKind, is_collective, op_kind, written_args
from opaudit.engine.mode import Interception
from opaudit.engine.sites import SiteTracker

_UNINITIALIZED = ("uninitialized",)
"""Input digest of a tensor straight out of ``empty``: its garbage bits say nothing about the run."""

_SET_DATA = frozenset(getattr(torch.ops.aten.set_, name) for name in
                      ("source_Storage", "source_Storage_storage_offset", "source_Tensor"))
"""``set_`` onto existing data: the target's bits are no longer uninitialized."""


class Step(NamedTuple):
    """One dispatched op of one run; ``ins``/``outs`` are ``None`` where not compared."""

    func: Any
    where: tuple[int, int] | None
    """``SiteTracker.current()``: phase bit and site id; ``None`` for view ops."""
    ins: tuple | None
    outs: tuple | None
    written: int = 0
    """How many of ``outs``, at its end, are inputs the op wrote and did not return (``out=``, foreach lists)."""


def settle(func: Any, result: Any) -> None:
    """Wait for collective ``func`` (already called, giving ``result``) to finish.

    c10d collectives return a ``Work`` and write their outputs from another thread;
    a functional collective's tensor is complete only after ``wait_tensor``.
    Waiting early changes no result: the caller waits for the same work later.
    """
    import torch.distributed as dist

    with _disable_current_modes():
        if func.namespace == "_c10d_functional":
            if func._schema.name != "_c10d_functional::wait_tensor":
                for t in nested_leaves(result, []):
                    if isinstance(t, torch.Tensor):
                        torch.ops._c10d_functional.wait_tensor(t)
            return
        for x in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(x, torch.ScriptObject):
                try:
                    work = dist.Work.unbox(x)
                except Exception:  # not a Work (a process group, an options object)
                    continue
                work.wait()

_PLAIN = (bool, int, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _value_key(x: Any) -> Any:
    """A non-tensor argument as something that compares equal across runs."""
    if isinstance(x, _PLAIN):
        return x
    if isinstance(x, (float, complex)):
        return repr(x)  # NaN != NaN, but its repr is stable
    # Generators, script objects...: their repr holds an address, which differs run to run.
    return type(x).__name__


@dataclass(frozen=True)
class _ArgRoles:
    """Which arguments of an overload are write-only (``out=``) and which it writes."""

    out_kwargs: frozenset[str]
    written_pos: tuple[bool, ...]
    written_kw: frozenset[str]


_ROLES: dict[Any, _ArgRoles] = {}


def _roles(func: Any) -> _ArgRoles:
    roles = _ROLES.get(func)
    if roles is None:
        pos, kw = written_args(func)
        outs = frozenset(a.name for a in func._schema.arguments if getattr(a, "is_out", False))
        roles = _ROLES[func] = _ArgRoles(outs, pos, kw)
    return roles


class Tracer:
    """Digests the inputs and outputs of every op run inside ``with Tracer(root):``.

    The dispatch mode is the recorder's: it only intercepts, and this tracer's
    ``_on_call`` hands back the callable that runs the op and digests its outputs.
    Each :class:`Step` goes to ``steps``, or to ``sink`` when one is given (called
    inside the dispatch, right after the op ran).
    """

    def __init__(self, root: str | None, sink: Callable[[Step], None] | None = None) -> None:
        self.sites = SiteTracker(root)
        self.steps: list[Step] = []
        """Every step, in order; empty when a ``sink`` takes them instead."""
        self._record = self.steps.append if sink is None else sink
        # Storages straight out of ``empty``: their garbage bits differ run to run and
        # say nothing, until an op writes them. Kept by storage, not by tensor: a
        # parameter made from ``torch.empty`` is another tensor over the same memory.
        self._uninitialized: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # Most inputs are an earlier op's outputs: their digest is reused while the
        # tensor's version counter and its storage's write count are unchanged. The
        # write count catches writes through another alias (``p.data``), which has a
        # version counter of its own.
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._writes: dict[int, int] = {}
        self.leaves: dict[int, torch.Tensor] = {}
        """Parameters and other leaf tensors that require grad, as ops first used them."""
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        """Optimizers whose ``step`` ran, in order."""
        self.modules: list[tuple[str, torch.nn.Module]] = []
        """Modules called during the step, with their qualified names (set on exit)."""
        self._hook: Any = None
        # A script that turns strict mode on itself still runs to the end: the refused op runs with warn_only.
        self._interception = Interception(self._on_call, self.sites, on_alert=lambda func: None)

    def __enter__(self) -> Tracer:
        from torch.optim import optimizer as optim_module

        self._hook = optim_module.register_optimizer_step_post_hook(self._optimizer_stepped)
        self._interception.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.modules = self.sites.modules()
            self._interception.__exit__(*exc)
        finally:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None

    @property
    def compiled(self) -> Any:
        """The :class:`~opaudit.engine.compiled.CompiledWatch` of the interception: compiled code the run called."""
        return self._interception.compiled

    def _optimizer_stepped(self, opt: Any, *_: Any) -> None:
        self.optimizers.setdefault(id(opt), opt)

    def _on_call(self, func: Any, args: tuple, kwargs: dict | None) -> Callable[..., Any]:
        kind = op_kind(func)[0]
        if kind is OpKind.VIEW:
            # No arithmetic, nothing to digest; kept so that the op sequence and its
            # numbering match the audit's.
            self._record(Step(func, None, None, None))
            if func in _SET_DATA and args and isinstance(args[0], torch.Tensor):
                # ``empty`` then ``set_`` onto real data: how a DataLoader batch
                # arrives from a worker's shared memory. Its bits mean something now.
                self._initialized(args[0])
            return func
        where = self.sites.current()
        roles = _roles(func)
        leaves = nested_leaves(args, [])
        if kwargs:
            nested_leaves([v for k, v in kwargs.items() if k not in roles.out_kwargs], leaves)
        for x in leaves:
            if isinstance(x, torch.Tensor) and (type(x) is torch.nn.Parameter or x.requires_grad and x.is_leaf):
                self.leaves.setdefault(id(x), x)
        with _disable_current_modes(), torch.no_grad():
            ins = self._digests(leaves)
        return functools.partial(self._run_op, func, kind, roles, where, ins)

    def _run_op(self, func: Any, kind: OpKind, roles: _ArgRoles, where: tuple[int, int], ins: tuple,
                *args: Any, **kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        if kind is OpKind.SIDE_EFFECT and is_collective(func):
            settle(func, result)
        with _disable_current_modes(), torch.no_grad():
            written = _written(roles, args, kwargs)
            if kind is OpKind.UNINITIALIZED:
                for t in nested_leaves(result, []):
                    if isinstance(t, torch.Tensor):
                        st = _storage(t)
                        if st is not None:
                            self._uninitialized[st] = True
                self._record(Step(func, where, ins, None))
            else:
                writes = self._writes
                for t in written:
                    # Written, through this tensor or a view of it (DDP fills its gradient buckets so):
                    # the storage's bits mean something now.
                    self._initialized(t)
                    ptr = storage_ptr(t)
                    if ptr is not None:
                        writes[ptr] = writes.get(ptr, 0) + 1
                leaves = nested_leaves(result, [])
                if len(self._uninitialized):
                    for t in leaves:
                        if isinstance(t, torch.Tensor):
                            self._initialized(t)
                seen = {id(x) for x in leaves}
                extra = [t for t in written if id(t) not in seen]
                self._record(Step(func, where, ins, self._digests(leaves + extra), len(extra)))
        return result

    def _digests(self, leaves: list) -> tuple:
        """One digest per leaf; a tensor that appears twice is digested once."""
        out = []
        seen: dict[int, tuple] = {}
        for x in leaves:
            if not isinstance(x, torch.Tensor):
                out.append(_value_key(x))
                continue
            d = seen.get(id(x))
            if d is None:
                d = seen[id(x)] = self._digest(x)
            out.append(d)
        return tuple(out)

    def _initialized(self, t: torch.Tensor) -> None:
        if len(self._uninitialized):
            st = _storage(t)
            if st is not None:
                self._uninitialized.pop(st, None)

    def _digest(self, t: torch.Tensor) -> tuple:
        if len(self._uninitialized):
            st = _storage(t)
            if st is not None and st in self._uninitialized:
                return _UNINITIALIZED
        ptr = storage_ptr(t)
        if ptr is None or t.is_inference():
            return safe_digest(t)  # no storage or no version counter: nothing to key a reuse on
        stamp = (t._version, ptr, self._writes.get(ptr, 0))
        known = self._known.get(t)
        if known is not None and known[0] == stamp:
            return known[1]
        d = safe_digest(t)
        self._known[t] = (stamp, d)
        return d


def _written(roles: _ArgRoles, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Tensors an op wrote to: in-place ``self``, ``out=``, foreach lists."""
    found: list[Any] = []
    for i, w in enumerate(roles.written_pos):
        if w and i < len(args):
            nested_leaves(args[i], found)
    for k in roles.written_kw:
        if k in kwargs:
            nested_leaves(kwargs[k], found)
    return [t for t in found if isinstance(t, torch.Tensor)]


def _storage(t: torch.Tensor) -> Any:
    """``t``'s storage object (one Python object per storage, weakly referable), or ``None``."""
    try:
        return t.untyped_storage()
    except Exception:  # sparse, nested, functional or fake tensors have none
        return None


def storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # sparse, nested, functional or fake tensors have none
        return None


def safe_digest(t: torch.Tensor) -> tuple:
    """:func:`~opaudit.aten.bitwise.digest`, or what can be said of a tensor it cannot digest (meta, fake)."""
    try:
        return digest(t)
    except Exception as e:  # meta, fake or exotic tensors: compare what can be compared
        return ("undigestable", type(t).__name__, str(t.dtype), tuple(t.shape), type(e).__name__)
