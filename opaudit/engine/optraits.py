"""What a recording needs to know about each op overload and each call's arguments, worked out fast.

Read before every aten call a recording sees (:meth:`opaudit.engine.record.Recorder._on_call`):
the facts about an op overload (:class:`OpTraits`) are worked out once per process and
looked up by ``id(func)``; a call's signature key (:func:`args_key`) is a flat tuple
built in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from opaudit.aten.ops import OpKind, op_kind, value_dependent, values_matter, written_args
from opaudit.aten.signature import scalar_key, script_object_text


class OpTraits:
    """What the hot path needs to know about one op overload, worked out once per process."""

    __slots__ = ("func", "call", "kind", "skip_reason", "view", "name", "written", "writes", "values",
                 "sampled")

    def __init__(self, func: Any) -> None:
        self.func = func
        # ``OpOverload.__call__`` is a Python frame that only forwards to ``_op``.
        self.call: Callable[..., Any] = getattr(func, "_op", func)
        self.kind, self.skip_reason = op_kind(func)
        self.view = self.kind is OpKind.VIEW
        self.name = str(func)
        self.written: tuple[tuple[bool, ...], frozenset[str]] = written_args(func)
        """Positional arguments and keyword names the op writes (schema ``Tensor(a!)``)."""
        self.writes = any(self.written[0]) or bool(self.written[1])
        self.values = values_matter(func)
        """Whether the result depends on the input values (``new_zeros``' does not): else none are held."""
        self.sampled = self.kind is OpKind.COMPUTE and value_dependent(func)
        """Whether its nondeterminism depends on index collisions: several calls are captured."""


OP_TRAITS: dict[int, OpTraits] = {}
"""``id(func)`` → its :class:`OpTraits`. Keyed by id: ``OpOverload.__hash__`` is a Python
method, and this dict is read on every call. Each value holds its ``func``, so no id is
ever reused; the hot path reads it directly and checks ``info.func is func``."""


def op_traits(func: Any) -> OpTraits:
    """The :class:`OpTraits` of ``func``, worked out on first use."""
    info = OP_TRAITS.get(id(func))
    if info is None or info.func is not func:
        info = OP_TRAITS[id(func)] = OpTraits(func)
    return info


_Tensor = torch.Tensor
_ScriptObject = torch.ScriptObject


def args_key(args: Iterable[Any]) -> tuple:
    """Signature key of a sequence of arguments, built for what aten passes.

    Aten arguments are tensors, scalars, and lists or tuples of those; a tensor
    stands for its dtype, shape, strides and device, a scalar for what
    :func:`~opaudit.aten.signature.scalar_key` says. Hashability is left to the
    dict lookup that uses the key; the caller falls back to the signature text
    when it fails.
    """
    out = []
    for a in args:
        if isinstance(a, _Tensor):
            out.append((a.dtype, a.shape, a.stride(), a.device))
        elif isinstance(a, (list, tuple)):
            out.append(args_key(a))
        elif a.__class__ is _ScriptObject:
            # Boxed afresh on each call: equal objects must give equal keys.
            out.append(script_object_text(a))
        elif a.__class__ is torch.Generator:
            # By device, never by object: its address differs run to run (and the
            # snapshot keeps the state the first call saw).
            out.append(("generator", a.device))
        else:
            out.append(scalar_key(a))
    return tuple(out)


def op_by_name(name: str) -> Any:
    """``torch.ops.aten.index_put_.default`` from ``"aten.index_put_.default"``; ``None`` if unknown here."""
    try:
        namespace, packet, overload = name.rsplit(".", 2)
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except (AttributeError, ValueError, RuntimeError):
        return None


_OpOverload = torch._ops.OpOverload
_TORCH_NAMESPACES = frozenset({"aten", "prims", "quantized", "_c10d_functional", "c10d"})
"""Namespaces only torch registers, once: :func:`live_op` takes them as they are (a fast path)."""


def live_op(func: Any) -> Any:
    """``func`` as torch registers it now, the overload to call at replay; ``None`` if it is no longer registered.

    A script's own ops can be registered again after they were recorded: a
    step-less script runs a second time for the deterministic-mode recording,
    and ``torch.library.custom_op`` then destroys the first registration, which
    leaves the recorded overload pointing at a freed schema. A library the
    script let go of (one made inside a function) took its ops with it. So such
    an op is looked up again by name, and never called through what was recorded.
    """
    if not isinstance(func, _OpOverload) or func.namespace in _TORCH_NAMESPACES:
        return func  # a higher-order operator, or another callable: not a dispatcher registration
    return op_by_name(str(func))
