"""Exact tensor snapshots: what a recorded call's arguments were, to rebuild them for replay.

Comparing tensors bit by bit and digesting them live in :mod:`opaudit.aten.bitwise`.

Everything here runs with the Python dispatcher disabled by its callers, so none
of it shows up in a recorded trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from opaudit.data.errors import OpauditError

# Byte alignment for the start of a cloned storage span; a multiple of every
# element size so that each tensor's offset stays a whole number of elements.
_SPAN_ALIGN = 16


class CaptureError(OpauditError):
    """A tensor could not be snapshotted (unsupported layout, device or memory)."""

    def __init__(self, message: str, nbytes: int | None = None) -> None:
        super().__init__(message)
        self.nbytes = nbytes
        """For ``capture budget``: the bytes the capture needed."""


# A tensor argument captured from a storage is a plain tuple (one is built per
# tensor captured, on the recorder's hot path, and a tuple is the cheapest record):
# (buffer, dtype, size, stride, offset in elements from the start of the original
# storage, written by the op).
_TensorSlot = tuple


@dataclass(frozen=True)
class _OpaqueSlot:
    """A tensor that cannot be rebuilt from storage (sparse, nested...): kept as a clone."""

    index: int
    written: bool


class _ShapeSlot:
    """A tensor kept as its dtype, size, strides and device only (see ``Snapshot(values=False)``)."""

    __slots__ = ("dtype", "size", "stride", "device")

    def __init__(self, dtype: torch.dtype, size: tuple[int, ...], stride: tuple[int, ...],
                 device: torch.device) -> None:
        self.dtype = dtype
        self.size = size
        self.stride = stride
        self.device = device


@dataclass(frozen=True)
class _QuantizedSlot:
    """A quantized tensor: its storage slot, and the quantizer that gives its integers their values.

    A tensor rebuilt on a bare storage would carry no quantizer (ATen's
    ``UnknownQuantizer``, which every quantized op refuses).
    """

    tensor: tuple
    """The storage slot, as for any strided tensor."""
    qscheme: Any
    params: tuple
    """``(scale, zero_point)`` per tensor; ``(scales, zero_points, axis)`` per channel."""

    def empty(self, device: torch.device) -> torch.Tensor:
        """An empty tensor with this quantizer, to ``set_`` on the captured storage."""
        dtype = self.tensor[1]
        if self.qscheme in _PER_TENSOR:
            scale, zero_point = self.params
            return torch._empty_affine_quantized([0], scale=scale, zero_point=zero_point, dtype=dtype, device=device)
        scales, zero_points, axis = self.params
        return torch._empty_per_channel_affine_quantized([0], scales=scales, zero_points=zero_points, axis=axis,
                                                         dtype=dtype, device=device)


_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)


def _quantizer(t: torch.Tensor) -> tuple[Any, tuple]:
    """``(qscheme, params)`` of a quantized tensor, exactly (scales and zero points copied)."""
    qscheme = t.qscheme()
    if qscheme in _PER_TENSOR:
        return qscheme, (t.q_scale(), t.q_zero_point())
    if qscheme in _PER_CHANNEL:
        return qscheme, (t.q_per_channel_scales().clone(), t.q_per_channel_zero_points().clone(),
                         t.q_per_channel_axis())
    raise CaptureError(f"quantized tensor with an unsupported scheme ({qscheme})")


@dataclass(frozen=True)
class _GeneratorSlot:
    """An explicit ``generator=`` argument, kept as its state at capture time."""

    device: torch.device
    state: torch.Tensor


_Parameter = torch.nn.Parameter


class _Leaf:
    """Marks where a tensor or generator sat in the arguments (index into ``Snapshot._slots``)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class _Seq:
    """A list or tuple of arguments that holds tensors somewhere inside."""

    __slots__ = ("kind", "items")

    def __init__(self, kind: type, items: list[Any]) -> None:
        self.kind = kind
        self.items = items


# Markers are immutable: share them rather than build (and garbage-collect) new ones.
_LEAF = tuple(_Leaf(i) for i in range(32))
_NO_KWARGS: dict = {}


def _template(obj: Any, leaves: list[Any]) -> Any:
    """``obj`` with every tensor and generator replaced by a :class:`_Leaf` (appended to ``leaves``)."""
    if isinstance(obj, torch.Tensor) or type(obj) is torch.Generator:
        # ``type() is``: ``isinstance(x, torch.Generator)`` runs a Python metaclass
        # check costing ~1 µs for every non-generator argument.
        leaves.append(obj)
        n = len(leaves) - 1
        return _LEAF[n] if n < len(_LEAF) else _Leaf(n)
    if isinstance(obj, (list, tuple)):
        n = len(leaves)
        items = [_template(x, leaves) for x in obj]
        if len(leaves) == n:
            # No tensors inside: keep a copy, so later changes to the caller's list do not leak in.
            return list(obj) if type(obj) is list else obj
        return _Seq(type(obj) if type(obj) in (list, tuple) else tuple, items)
    if isinstance(obj, dict):
        return {k: _template(v, leaves) for k, v in obj.items()}
    return obj


def _template_args(args: Sequence[Any], leaves: list[Any]) -> Any:
    """:func:`_template` of the positional arguments, one call level saved for the usual flat case."""
    items = []
    for a in args:
        if isinstance(a, torch.Tensor) or type(a) is torch.Generator:
            leaves.append(a)
            n = len(leaves) - 1
            items.append(_LEAF[n] if n < len(_LEAF) else _Leaf(n))
        elif isinstance(a, (list, tuple, dict)):
            items.append(_template(a, leaves))
        else:
            items.append(a)
    return _Seq(tuple, items) if leaves else tuple(args)


def _rebuild(obj: Any, values: list[Any]) -> Any:
    if type(obj) is _Leaf:
        return values[obj.index]
    if type(obj) is _Seq:
        return obj.kind([_rebuild(x, values) for x in obj.items])
    if type(obj) is list:
        return list(obj)
    if type(obj) is dict:
        return {k: _rebuild(v, values) for k, v in obj.items()}
    return obj


def _tensor_ids(obj: Any, out: set[int]) -> None:
    if isinstance(obj, torch.Tensor):
        out.add(id(obj))
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _tensor_ids(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _tensor_ids(x, out)


def unsupported_input(args: Sequence[Any], kwargs: dict) -> str | None:
    """Why a call's inputs cannot be captured and replayed exactly, or ``None``.

    Nested tensors (jagged or strided) have no single size and stride to copy and
    compare; an op on them is reported ``skipped`` with this reason instead.
    """
    leaves, _ = tree_flatten((tuple(args), kwargs))
    for x in leaves:
        if isinstance(x, torch.Tensor) and x.is_nested:
            return f"unsupported input: nested tensor ({str(x.layout).replace('torch.', '')})"
    return None


class Snapshot:
    """The inputs of one op call, as they were before the op ran.

    Each distinct storage is kept once, over the span its tensors touch, so that
    sizes, strides, storage offsets and aliasing between arguments (an in-place op
    whose ``out`` is also an input) all survive. ``materialize()`` rebuilds fresh
    arguments, cloning again only the buffers the op writes to.

    By default every storage is cloned at once. With ``share=True`` (what the
    recorder uses) only the storages this op writes are cloned; the others are
    *held*, not copied, and :meth:`shared` lists them: whoever holds the snapshot
    must call :meth:`own` on a held buffer before anything writes to that
    storage. Most inputs are activations that nothing writes again, so most
    captures then cost no copy at all.

    With ``values=False`` tensors keep only their dtype, size, strides and device,
    and are rebuilt uninitialized: for ops whose result does not depend on the
    values of their inputs (``empty_like``).

    Capture sits on the recorder's hot path (once per unique signature), and
    ``materialize()`` on the replay's (once per run): both walk the arguments with
    a small hand-written template instead of ``torch.utils._pytree``, and keep few
    Python objects alive (each one is work for the garbage collector).
    """

    __slots__ = ("_args", "_kwargs", "_slots", "_storages", "_bases", "_lo", "_hi", "_opaque",
                 "_written_buffers", "_shared", "nbytes")

    def __init__(self, args: Sequence[Any], kwargs: dict, written: Sequence[bool] | None = None, *,
                 share: bool = False, budget: int | None = None, values: bool = True):
        leaves: list[Any] = []
        self._args = _template_args(args, leaves)
        self._kwargs = _template(dict(kwargs), leaves) if kwargs else _NO_KWARGS
        written_ids: set[int] = set()
        if written is not None:
            # ``written`` is per top-level positional/keyword argument; map it to
            # the tensors inside each one.
            for arg, w in zip(list(args) + list(kwargs.values()), written, strict=False):
                if w:
                    _tensor_ids(arg, written_ids)
        # Per buffer: the storage (held, or a copy of the span [lo, hi)), the byte
        # offset in the original storage at which it starts (0 while held), and the span.
        storages: list[Any] = []
        lo: list[int] = []
        hi: list[int] = []
        buffer_of: dict[Any, int] = {}
        written_buffers: set[int] = set()
        opaque: list[torch.Tensor] = []
        slots: list[Any] = []
        for leaf in leaves:
            if type(leaf) is torch.Generator:
                # Replays must each start from the state the op saw, and must not
                # advance the user's own generator.
                slots.append(_GeneratorSlot(leaf.device, leaf.get_state()))
                continue
            if (leaf.layout != torch.strided or leaf.is_nested
                    or type(leaf) is not torch.Tensor and type(leaf) is not _Parameter and not isinstance(leaf, _Parameter)):
                try:
                    slots.append(_OpaqueSlot(len(opaque), id(leaf) in written_ids))
                    opaque.append(leaf.detach().clone())
                except Exception as e:  # any failure means "cannot capture"
                    raise CaptureError(f"cannot clone {type(leaf).__name__} ({leaf.layout}): {e}") from e
                continue
            if not values and leaf.layout == torch.strided and not leaf.is_quantized:
                # Only the tensor's form matters (``empty_like``): hold no storage.
                slots.append(_ShapeSlot(leaf.dtype, leaf.shape, leaf.stride(), leaf.device))
                continue
            if leaf.is_meta:
                raise CaptureError("meta tensors have no values to replay")
            try:
                storage = leaf.untyped_storage()
                key = (leaf.device, storage.data_ptr())
            except Exception as e:
                raise CaptureError(f"tensor has no accessible storage: {e}") from e
            es = leaf.element_size()
            offset = leaf.storage_offset()
            shape = leaf.shape
            stride = leaf.stride()
            start = end = offset * es
            n = leaf.numel()
            if n:
                if leaf.is_contiguous():
                    end = start + es * n
                else:
                    end = start + es * (1 + sum([(s - 1) * abs(st) for s, st in zip(shape, stride, strict=True)]))
                if leaf.is_quantized:
                    # quint4x2 and quint2x4 pack several elements per byte (element_size() says 1).
                    end = min(end, storage.nbytes())
            b = buffer_of.get(key)
            if b is None:
                b = buffer_of[key] = len(storages)
                storages.append(storage)
                lo.append(start if n else -1)
                hi.append(end if n else 0)
            elif n:
                if lo[b] < 0 or start < lo[b]:
                    lo[b] = start
                if end > hi[b]:
                    hi[b] = end
            w = id(leaf) in written_ids
            if w:
                written_buffers.add(b)
            # ``shape`` is an immutable ``torch.Size`` and ``stride()`` a fresh tuple: kept as they are.
            if leaf.is_quantized:
                slots.append(_QuantizedSlot((b, leaf.dtype, shape, stride, offset, w), *_quantizer(leaf)))
            else:
                slots.append((b, leaf.dtype, shape, stride, offset, w))
        nbytes = sum([t.numel() * t.element_size() for t in opaque]) if opaque else 0
        for b in range(len(storages)):
            if lo[b] < 0:
                lo[b] = 0
            nbytes += hi[b] - lo[b]
        if budget is not None and nbytes > budget:
            raise CaptureError("capture budget", nbytes)
        bases = [0] * len(storages)
        shared: list[int] = []
        for b, storage in enumerate(storages):
            if share and hi[b] > lo[b] and b not in written_buffers:
                shared.append(b)
            else:
                storages[b], bases[b] = copy_span(storage, lo[b], hi[b], storage.device)
        self._slots = tuple(slots)
        self._storages = storages
        self._bases = bases
        self._lo = lo
        self._hi = hi
        self._opaque = tuple(opaque) if opaque else ()
        self._written_buffers = written_buffers
        self._shared = shared
        self.nbytes = nbytes

    def __getstate__(self) -> dict[str, Any]:
        """Picklable form (``torch.save``, to ship a child process's recording): storages
        travel as byte tensors, since a bare storage comes back typed. Call :meth:`own_all` first."""
        state = {name: getattr(self, name) for name in self.__slots__}
        state["_storages"] = [torch.empty(0, dtype=torch.uint8, device=st.device).set_(st, 0, (st.nbytes(),), (1,))
                              for st in self._storages]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self._storages = [t.untyped_storage() for t in self._storages]

    def shared(self) -> list[tuple[int, Any]]:
        """``(buffer, storage)`` for every storage held rather than copied."""
        return [(b, self._storages[b]) for b in self._shared]

    def shared_storage(self, b: int) -> Any:
        """The storage held (uncopied) as buffer ``b``."""
        return self._storages[b]

    def span(self, b: int) -> tuple[int, int]:
        """Byte range ``[lo, hi)`` of the original storage that buffer ``b`` covers."""
        return self._lo[b], self._hi[b]

    def own(self, b: int, copy: tuple[Any, int] | None = None) -> None:
        """Copy held buffer ``b`` now: call before anything writes to its storage.

        ``copy`` is a ready ``copy_span()`` of that storage covering :meth:`span`,
        to share one copy between the snapshots holding the same storage. Raises
        :class:`CaptureError` ``"capture OOM"`` when the copy does not fit.
        """
        if b not in self._shared:
            return
        if copy is None:
            storage = self._storages[b]
            copy = copy_span(storage, self._lo[b], self._hi[b], storage.device)
        self._storages[b], self._bases[b] = copy
        self._shared.remove(b)

    def own_all(self) -> None:
        """Copy every held buffer (see :meth:`own`): before the snapshot leaves this process."""
        for b in list(self._shared):
            self.own(b)

    def writes_zeroed(self) -> Snapshot | None:
        """A copy of this snapshot whose buffers the op writes hold zeros (the other buffers shared with this
        one); ``None`` when the op writes none."""
        if not self._written_buffers:
            return None
        other = Snapshot.__new__(Snapshot)
        for name in self.__slots__:
            setattr(other, name, getattr(self, name))
        other._storages, other._bases, other._shared = list(self._storages), list(self._bases), list(self._shared)
        for b in self._written_buffers:  # written buffers are always copies, never held: their base stands
            st = self._storages[b]
            other._storages[b] = torch.zeros(st.nbytes(), dtype=torch.uint8, device=st.device).untyped_storage()
        return other

    def _values(self, fresh: set[int] | None, fresh_opaque: bool) -> tuple[list[Any], list[torch.Tensor]]:
        storages = self._storages
        if fresh:
            storages = [s.clone() if i in fresh else s for i, s in enumerate(storages)]
        bases = self._bases
        values: list[Any] = []
        written: list[torch.Tensor] = []
        for slot in self._slots:
            if type(slot) is _TensorSlot:
                b, dtype, size, stride, offset, w = slot
                storage = storages[b]
                t = torch.empty(0, dtype=dtype, device=storage.device)
                t.set_(storage, offset - bases[b] // t.element_size(), size, stride)
                values.append(t)
                if w:
                    written.append(t)
                continue
            if type(slot) is _QuantizedSlot:
                b, _, size, stride, offset, w = slot.tensor
                storage = storages[b]
                t = slot.empty(storage.device)
                t.set_(storage, offset - bases[b] // t.element_size(), size, stride)
                values.append(t)
                if w:
                    written.append(t)
                continue
            if type(slot) is _OpaqueSlot:
                src = self._opaque[slot.index]
                t = src.clone() if (fresh_opaque or slot.written) else src
            elif type(slot) is _ShapeSlot:
                values.append(torch.empty_strided(slot.size, slot.stride, dtype=slot.dtype, device=slot.device))
                continue
            else:
                gen = torch.Generator(device=slot.device)
                gen.set_state(slot.state)
                values.append(gen)
                continue
            values.append(t)
            if slot.written:
                written.append(t)
        return values, written

    def materialize(self, fresh_all: bool = False) -> tuple[tuple, dict, list[torch.Tensor]]:
        """Rebuild ``(args, kwargs, written)``; written buffers are always fresh clones.

        ``written`` lists the rebuilt tensors the op writes to, so that a replay can
        compare them as outputs.
        """
        fresh = set(range(len(self._storages))) if fresh_all else self._written_buffers
        values, written = self._values(fresh, fresh_all)
        return _rebuild(self._args, values), _rebuild(self._kwargs, values), written

    def arguments(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` as views of the captured buffers: to describe, never to run."""
        values, _ = self._values(None, False)
        return _rebuild(self._args, values), _rebuild(self._kwargs, values)

    @property
    def devices(self) -> set[torch.device]:
        """Devices of the captured tensors."""
        shapes = {s.device for s in self._slots if type(s) is _ShapeSlot}
        return {s.device for s in self._storages} | {t.device for t in self._opaque} | shapes


def copy_span(storage: Any, lo: int, hi: int, device: torch.device) -> tuple[Any, int]:
    """``(copy of storage bytes [lo', hi), lo')``, ``lo'`` being ``lo`` rounded down to :data:`_SPAN_ALIGN`."""
    lo = (lo // _SPAN_ALIGN) * _SPAN_ALIGN
    try:
        if lo == 0 and hi == storage.nbytes():
            return storage.clone(), 0
        if hi > lo:
            src = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, lo, (hi - lo,), (1,))
            return src.clone().untyped_storage(), lo
        return torch.empty(0, dtype=torch.uint8, device=device).untyped_storage(), lo
    except torch.OutOfMemoryError as e:
        raise CaptureError("capture OOM") from e
    except RuntimeError as e:
        # CUDA says "out of memory"; the CPU allocator "can't allocate memory".
        if any(m in str(e).lower() for m in ("out of memory", "can't allocate memory")):
            raise CaptureError("capture OOM") from e
        raise
