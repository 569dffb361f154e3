"""Exact tensor snapshots, bitwise comparison and position-aware digests.

Everything here runs with the Python dispatcher disabled by its callers, so none
of it shows up in a recorded trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils._pytree import tree_flatten

_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Byte alignment for the start of a cloned storage span; a multiple of every
# element size so that each tensor's offset stays a whole number of elements.
_SPAN_ALIGN = 16


class CaptureError(Exception):
    """A tensor could not be snapshotted (unsupported layout, device or memory)."""


@dataclass(frozen=True)
class _TensorSlot:
    """Where one tensor argument lives inside a snapshot's cloned buffers."""

    buffer: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # in elements, relative to the buffer start
    written: bool


@dataclass(frozen=True)
class _OpaqueSlot:
    """A tensor that cannot be rebuilt from storage (sparse, nested...): kept as a clone."""

    index: int
    written: bool


@dataclass(frozen=True)
class _GeneratorSlot:
    """An explicit ``generator=`` argument, kept as its state at capture time."""

    device: torch.device
    state: torch.Tensor


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


def _template(obj: Any, leaves: list[Any]) -> Any:
    """``obj`` with every tensor and generator replaced by a :class:`_Leaf` (appended to ``leaves``)."""
    if isinstance(obj, torch.Tensor) or type(obj) is torch.Generator:
        # ``type() is``: ``isinstance(x, torch.Generator)`` runs a Python metaclass
        # check costing ~1 µs for every non-generator argument.
        leaves.append(obj)
        return _Leaf(len(leaves) - 1)
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


class Snapshot:
    """The inputs of one op call, cloned before the op ran.

    Each distinct storage is cloned once over the span its tensors touch, so that
    sizes, strides, storage offsets and aliasing between arguments (an in-place op
    whose ``out`` is also an input) all survive. ``materialize()`` rebuilds fresh
    arguments, cloning again only the buffers the op writes to.

    Capture sits on the recorder's hot path (once per unique signature), and
    ``materialize()`` on the replay's (once per run), so both walk the arguments
    with a small hand-written template instead of ``torch.utils._pytree``.
    """

    __slots__ = ("_args", "_kwargs", "_slots", "_buffers", "_opaque", "_written_buffers", "nbytes")

    def __init__(self, args: Sequence[Any], kwargs: dict, written: Sequence[bool] | None = None):
        flat: list[Any] = []
        self._args = _template(tuple(args), flat)
        self._kwargs = _template(dict(kwargs), flat)
        written_ids: set[int] = set()
        if written is not None:
            # ``written`` is per top-level positional/keyword argument; map it to
            # the tensors inside each one.
            for arg, w in zip(list(args) + list(kwargs.values()), written):
                if w:
                    _tensor_ids(arg, written_ids)
        groups: dict[Any, list[int]] = {}
        self._opaque: list[torch.Tensor] = []
        slots: list[Any] = [None] * len(flat)
        for i, leaf in enumerate(flat):
            if type(leaf) is torch.Generator:
                # Replays must each start from the state the op saw, and must not
                # advance the user's own generator.
                slots[i] = _GeneratorSlot(leaf.device, leaf.get_state())
                continue
            if leaf.layout != torch.strided or leaf.is_nested or type(leaf) is not torch.Tensor and not isinstance(leaf, torch.nn.Parameter):
                try:
                    slots[i] = _OpaqueSlot(len(self._opaque), id(leaf) in written_ids)
                    self._opaque.append(leaf.detach().clone())
                except Exception as e:  # noqa: BLE001 - any failure means "cannot capture"
                    raise CaptureError(f"cannot clone {type(leaf).__name__} ({leaf.layout}): {e}") from e
                continue
            device = leaf.device
            if device.type == "meta":
                raise CaptureError("meta tensors have no values to replay")
            try:
                key = (device, leaf.untyped_storage().data_ptr())
            except Exception as e:  # noqa: BLE001
                raise CaptureError(f"tensor has no accessible storage: {e}") from e
            group = groups.get(key)
            if group is None:
                groups[key] = [i]
            else:
                group.append(i)
        self._buffers: list[torch.Tensor] = []
        self._written_buffers: set[int] = set()
        nbytes = sum(t.numel() * t.element_size() for t in self._opaque)
        for (device, _), idxs in groups.items():
            lo, hi = -1, 0
            spans = []
            for i in idxs:
                t = flat[i]
                es = t.element_size()
                start = t.storage_offset() * es
                end = start
                if t.numel():
                    end = start + es * (1 + sum([(s - 1) * abs(st) for s, st in zip(t.shape, t.stride())]))
                    lo = start if lo < 0 or start < lo else lo
                    hi = end if end > hi else hi
                spans.append(start)
            lo = 0 if lo < 0 else (lo // _SPAN_ALIGN) * _SPAN_ALIGN
            try:
                if hi > lo:
                    storage = flat[idxs[0]].untyped_storage()
                    src = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, lo, (hi - lo,), (1,))
                    buf = src.clone()
                else:
                    buf = torch.empty(0, dtype=torch.uint8, device=device)
            except torch.OutOfMemoryError as e:
                raise CaptureError("capture OOM") from e
            except RuntimeError as e:
                # CUDA says "out of memory"; the CPU allocator "can't allocate memory".
                if any(m in str(e).lower() for m in ("out of memory", "can't allocate memory")):
                    raise CaptureError("capture OOM") from e
                raise
            b = len(self._buffers)
            self._buffers.append(buf)
            nbytes += buf.numel()
            for i, start in zip(idxs, spans):
                t = flat[i]
                w = id(t) in written_ids
                if w:
                    self._written_buffers.add(b)
                byte_off = start - lo
                slots[i] = _TensorSlot(b, t.dtype, tuple(t.shape), tuple(t.stride()), byte_off // t.element_size() if byte_off >= 0 else 0, w)
        self._slots = slots
        self.nbytes = nbytes

    def materialize(self, fresh_all: bool = False) -> tuple[tuple, dict, list[torch.Tensor]]:
        """Rebuild ``(args, kwargs, written)``; written buffers are always fresh clones.

        ``written`` lists the rebuilt tensors the op writes to, so that a replay can
        compare them as outputs.
        """
        bufs = [
            b.clone() if (fresh_all or i in self._written_buffers) else b
            for i, b in enumerate(self._buffers)
        ]
        values: list[Any] = []
        written: list[torch.Tensor] = []
        for slot in self._slots:
            if type(slot) is _TensorSlot:
                buf = bufs[slot.buffer]
                t = torch.empty(0, dtype=slot.dtype, device=buf.device)
                t.set_(buf.untyped_storage(), slot.offset, slot.size, slot.stride)
            elif type(slot) is _OpaqueSlot:
                src = self._opaque[slot.index]
                t = src.clone() if (fresh_all or slot.written) else src
            else:
                gen = torch.Generator(device=slot.device)
                gen.set_state(slot.state)
                values.append(gen)
                continue
            values.append(t)
            if slot.written:
                written.append(t)
        return _rebuild(self._args, values), _rebuild(self._kwargs, values), written

    @property
    def devices(self) -> set[torch.device]:
        """Devices of the captured tensors."""
        return {b.device for b in self._buffers} | {t.device for t in self._opaque}


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
        except (TypeError, ValueError):
            d = 0.0 if same else math.inf
        return Difference(d, 0 if same else 1, 1)
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
    diff = torch.nan_to_num(diff, nan=math.inf)
    return Difference(float(diff.max()), k, n)


_DIGEST_PRIME = 1_000_003


def digest(t: torch.Tensor) -> tuple:
    """A position-aware fingerprint of a tensor's bits, computed on its own device.

    Two weighted sums of the bit patterns with different position weights: swapping
    two elements changes them, unlike an XOR-sum or a norm.
    """
    if not isinstance(t, torch.Tensor):
        return ("v", repr(t))
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.numel() == 0:
        return (str(t.dtype), tuple(t.shape), 0, 0)
    v = bits(t).reshape(-1).to(torch.int64)
    pos = torch.arange(1, v.numel() + 1, device=v.device, dtype=torch.int64)
    h1 = int((v * (pos * _DIGEST_PRIME + 7)).sum())
    h2 = int(((v ^ (pos * 0x9E3779B1)) * (pos | 1)).sum())
    return (str(t.dtype), tuple(t.shape), h1, h2)


def flat_tensors(obj: Any) -> list[Any]:
    """Leaves of a nested output: tensors and plain scalars, ``None`` dropped."""
    return [x for x in tree_flatten(obj)[0] if x is not None]
