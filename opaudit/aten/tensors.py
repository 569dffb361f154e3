"""Exact tensor snapshots, bitwise comparison and position-aware digests.

Everything here runs with the Python dispatcher disabled by its callers, so none
of it shows up in a recorded trace.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from opaudit.aten.memory import same_memory
from opaudit.data.errors import OpauditError

_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
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


def bits(t: torch.Tensor) -> torch.Tensor:
    """A same-width integer view of ``t``: equal bits compare equal, NaNs included."""
    if t.is_quantized:
        return t.int_repr()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.is_floating_point() or t.dtype.itemsize == 1:
        return t.view(_BITS_DTYPE[t.element_size()])
    return t


@dataclass(frozen=True)
class Difference:
    """How far two runs' outputs are apart."""

    max_abs_diff: float
    elements_differing: int
    elements: int


def same_bits(a: Any, b: Any) -> bool:
    """True when two outputs (tensors, scalars, or None) are bitwise identical."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if same_memory(a, b):
            return True
        if a.layout != torch.strided:
            a, b = a.to_dense(), b.to_dense()
        if torch.equal(bits(a), bits(b)):
            return True
        if a.is_floating_point() or a.is_complex():
            # Different NaN payloads in the same place still count as equal.
            return int(_diff_mask(a, b).sum()) == 0
        return False
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def differing_mask(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the elements whose bits differ (NaNs in the same place are equal).

    ``a`` and ``b`` must have the same shape and dtype; a complex element differs
    when either of its parts does.
    """
    if a.layout != torch.strided:
        a, b = a.to_dense(), b.to_dense()
    return _diff_mask(a, b)


def fill_mask(t: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the elements holding the value ``fill_uninitialized_memory`` writes:
    NaN for floating and complex dtypes, the largest value for integer and bool dtypes."""
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_floating_point() or t.is_complex():
        return torch.isnan(t)
    if t.dtype == torch.bool:
        return t.clone()
    return t == torch.iinfo(t.dtype).max


def _diff_mask(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mask = bits(a) != bits(b)
    if a.is_complex():
        mask = mask.any(-1)
        nan_both = torch.isnan(a) & torch.isnan(b)
        return mask & ~nan_both
    if a.is_floating_point():
        mask &= ~(torch.isnan(a) & torch.isnan(b))
    return mask


def difference(a: Any, b: Any) -> Difference:
    """Max abs difference and count of differing elements between two outputs."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        same = same_bits(a, b)
        try:
            d = 0.0 if same else abs(float(a) - float(b))
        except (TypeError, ValueError, OverflowError):
            d = math.inf
        return Difference(0.0 if same else (math.inf if math.isnan(d) else d), 0 if same else 1, 1)
    n = a.numel()
    if a.shape != b.shape or a.dtype != b.dtype:
        return Difference(math.inf, max(n, b.numel()), max(n, b.numel()))
    if a.layout != torch.strided:
        a, b = a.to_dense(), b.to_dense()
    mask = _diff_mask(a, b)
    k = int(mask.sum())
    if k == 0:
        return Difference(0.0, 0, n)
    if a.dtype == torch.bool:
        return Difference(1.0, k, n)
    da = a[mask] if not a.is_complex() else a[mask]
    db = b[mask] if not b.is_complex() else b[mask]
    diff = (da.to(torch.complex128 if a.is_complex() else torch.float64) - db.to(torch.complex128 if b.is_complex() else torch.float64)).abs()
    # inf vs -inf, or inf vs a number, is infinitely far apart (nan_to_num would make it the largest double),
    # and so is a NaN against a number.
    diff = torch.nan_to_num(diff, nan=math.inf, posinf=math.inf)
    return Difference(float(diff.max()), k, n)


def ulp_distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> int | None:
    """The largest distance between ``a`` and ``b`` in units in the last place, over ``mask`` (default: the
    elements whose bits differ).

    Floating elements are mapped to integers that count representable values in
    order, so neighbours are 1 apart across zero too (``-0.0`` and ``0.0`` are 0
    apart). Integer tensors give their largest difference, bool 1. ``None`` when a
    NaN faces a number (no distance) or for a dtype it cannot order. ``a`` and ``b``
    have the same shape and dtype.
    """
    if mask is None:
        mask = differing_mask(a, b)
    if a.layout != torch.strided:
        a, b = a.to_dense(), b.to_dense()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
        mask = mask.unsqueeze(-1).expand(a.shape)
    if not bool(mask.any()):
        return 0
    a, b = a[mask], b[mask]
    if a.dtype == torch.bool:
        return 1
    if not a.is_floating_point():
        if a.dtype == torch.uint64:
            return None
        return int((a.to(torch.int64) - b.to(torch.int64)).abs().max())
    if bool((torch.isnan(a) != torch.isnan(b)).any()):
        return None
    width = a.element_size() * 8
    if width not in (8, 16, 32, 64):
        return None
    ordered = []
    for t in (a, b):
        i = bits(t).to(torch.int64)
        if width == 8:
            i = torch.where(i >= 128, i - 256, i)  # bits() gives uint8 for one-byte floats
        ordered.append(torch.where(i < 0, -(1 << (width - 1)) - i, i))
    oa, ob = ordered
    same_side = (oa >= 0) == (ob >= 0)
    near = (oa - ob).abs()[same_side]
    best = int(near.max()) if near.numel() else 0
    far = ~same_side
    if bool(far.any()):
        # Opposite signs: the distance is the sum of both magnitudes, which can pass int64 for float64.
        best = max(best, int((oa[far].abs().double() + ob[far].abs().double()).max()))
    return best


_CHUNK = 1 << 22
"""Elements digested per weighted sum: the weights of one chunk are computed once per device and kept."""
_MASK32 = 0xFFFFFFFF
_WEIGHTS: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 values below 2**32 (products wrap; the low 32 bits are exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def _weights(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two pseudo-random odd int32 weights per position ``0..n-1`` (``n <= _CHUNK``), on ``device``.

    A function of the position alone, so every process and machine gets the same
    ones; built on the CPU once per device and length class, then kept.
    """
    have = _WEIGHTS.get(device)
    if have is not None and have[0].numel() >= n:
        return have[0][:n], have[1][:n]
    size = min(_CHUNK, 1 << max(10, (n - 1).bit_length()))
    pos = torch.arange(size, dtype=torch.int64)
    pair = []
    for salt in (0x7F4A7C15, 0x165667B1):
        w = _mix32((pos * 0x9E3779B1 + salt) & _MASK32) | 1
        pair.append(torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32).to(device))
    _WEIGHTS[device] = (pair[0], pair[1])
    return pair[0][:n], pair[1][:n]


def _dense_order(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` with its dims reordered so that it is contiguous, when its elements fill a block of memory
    with no gaps and no overlap (a transpose, a permute); else ``None``."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    p = t.permute(order)
    return p if p.is_contiguous() else None


def _words(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """``t``'s bits as a flat int32 tensor on its device (a view for 4- and 8-byte elements, widened for 1-
    and 2-byte ones: each element one word), and its strides when they are taken in memory order.

    A transposed or permuted tensor is read in memory order, with no copy (weights
    reach ``mm`` transposed, attention heads permuted): its strides are then part of the
    digest. Anything else that is not contiguous (expanded, sliced) is copied in logical order.
    """
    b = bits(t)
    strides = None
    if not b.is_contiguous():
        dense = _dense_order(b)
        if dense is not None:
            b, strides = dense, tuple(t.stride())
    b = b.reshape(-1)
    if b.element_size() == 4:
        return (b.view(torch.int32) if b.dtype != torch.int32 else b), strides
    if b.element_size() == 8:
        return b.view(torch.int32), strides  # each element two words: both halves weighed by position
    return b.to(torch.int32), strides


def digest(t: torch.Tensor) -> tuple:
    """A position-aware fingerprint of a tensor's bits, computed on its own device.

    Two sums of the bits (as 32-bit words) weighted by pseudo-random odd weights of
    their position, modulo 2**32: changing any one element always changes both, and
    swapping two elements changes them, unlike an XOR-sum or a norm. Integer
    arithmetic that wraps, so it is the same whatever the order of the sums (threads,
    CPU capability, device); only two numbers per tensor leave its device.
    ``(dtype, shape, h1, h2)``, and the strides of a transposed or permuted tensor
    (see :func:`_words`).
    """
    if not isinstance(t, torch.Tensor):
        return ("v", repr(t))
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.numel() == 0:
        return (str(t.dtype), tuple(t.shape), 0, 0)
    v, strides = _words(t)
    n = v.numel()
    h1 = h2 = 0
    for k, lo in enumerate(range(0, n, _CHUNK)):
        part = v[lo:lo + _CHUNK]
        w1, w2 = _weights(v.device, part.numel())
        if part.device.type == "cpu":
            s1, s2 = int(torch.dot(part, w1)), int(torch.dot(part, w2))  # int32 dot: wraps, vectorised
        else:
            s1, s2 = torch.stack(((part * w1).sum(), (part * w2).sum())).tolist()
        # Chunks are weighed apart too, or two chunks' elements at the same offset could swap unseen.
        m = int(_mix32(torch.tensor(k + 1, dtype=torch.int64))) | 1 if k else 1
        h1, h2 = (h1 + (s1 & _MASK32) * m) & _MASK32, (h2 + (s2 & _MASK32) * m) & _MASK32
    out = (str(t.dtype), tuple(t.shape), h1, h2)
    return out if strides is None else (*out, strides)


def nested_leaves(x: Any, out: list) -> list:
    """Append the leaves of the lists, tuples and dicts an op's arguments nest tensors in to ``out``; return it.

    Unlike :func:`flat_tensors` this keeps ``None`` and walks only the containers aten uses (no pytree lookup).
    """
    if isinstance(x, (list, tuple)):
        for y in x:
            nested_leaves(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            nested_leaves(y, out)
    else:
        out.append(x)
    return out


def flat_tensors(obj: Any) -> list[Any]:
    """Leaves of a nested output: tensors and plain scalars, ``None`` dropped."""
    return [x for x in tree_flatten(obj)[0] if x is not None]
