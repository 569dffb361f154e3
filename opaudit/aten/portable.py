"""A snapshot and an op's outputs in a portable form: JSON for arguments, raw bytes for tensors.

What a capsule holds (:mod:`opaudit.data.capsule`): :func:`export_snapshot` turns a
recorder's :class:`~opaudit.aten.tensors.Snapshot` into the JSON form of its
arguments, one tensor record per argument and the bytes of each captured storage
span; :func:`rebuild_snapshot` makes a snapshot from them again, on any device,
keeping sizes, strides, storage offsets (and their alignment) and which arguments
share a buffer, so that a replay there sees the call as it was. Outputs travel as
their contiguous bytes and a digest (:func:`content_digest`), and
:func:`compare_expected` tells how far a run here is from them.

This module is the snapshot's serialization: it reads and builds the snapshot's own
argument template and slots (``opaudit.aten.tensors``' private types), which the
recorder's hot path keeps as plain as it can.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from opaudit.aten.bitwise import bits, difference, differing_mask, same_bits, ulp_distance
from opaudit.aten.tensors import Snapshot, _GeneratorSlot, _Leaf, _OpaqueSlot, _Seq, _ShapeSlot
from opaudit.data.capsule import DTYPE_SIZES, Capture, GeneratorArg, TensorArg
from opaudit.data.errors import OpauditError
from opaudit.data.observation import Crossing

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in DTYPE_SIZES if isinstance(getattr(torch, name, None), torch.dtype)
}
"""Capsule dtype name → this torch's dtype (names this torch lacks are left out)."""
_NAMES = {dt: name for name, dt in DTYPES.items()}

_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
            "channels_last_3d": torch.channels_last_3d, "preserve_format": torch.preserve_format}

_UNSAFE_OPS = frozenset({"aten::save", "aten::from_file"})
"""Ops that touch files: never run from a capsule, whatever it says (a capsule is untrusted input)."""
_OP_PART = re.compile(r"_{0,2}[A-Za-z][A-Za-z0-9_]{0,127}")


class NotPortable(OpauditError):
    """A call or value that a capsule cannot hold, or that this machine cannot rebuild (the message says which)."""


def dtype_name(dtype: torch.dtype) -> str:
    """The capsule's name of ``dtype``; :class:`NotPortable` for one it cannot hold (quantized...)."""
    name = _NAMES.get(dtype)
    if name is None:
        raise NotPortable(f"dtype {str(dtype).replace('torch.', '')} is not portable")
    return name


# -- argument values ----------------------------------------------------------
def _float(x: float) -> Any:
    return x if math.isfinite(x) else {"float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def encode_value(x: Any) -> Any:
    """The JSON form of one (non-tensor) argument value, template markers included."""
    if type(x) is _Leaf:
        return {"tensor": x.index}
    if type(x) is _Seq:
        return {"list" if x.kind is list else "tuple": [encode_value(y) for y in x.items]}
    if x is None or isinstance(x, (bool, int, str)):
        return x if type(x) in (bool, int, str) or x is None else _plain(x)
    if isinstance(x, float):
        return _float(float(x))
    if isinstance(x, complex):
        return {"complex": [_part(x.real), _part(x.imag)]}
    if isinstance(x, (list, tuple)):
        return {"list" if isinstance(x, list) else "tuple": [encode_value(y) for y in x]}
    if isinstance(x, torch.dtype):
        return {"dtype": dtype_name(x)}
    if isinstance(x, torch.device):
        return {"device": str(x)}
    if isinstance(x, torch.layout):
        return {"layout": str(x).replace("torch.", "")}
    if isinstance(x, torch.memory_format):
        return {"memory_format": str(x).replace("torch.", "")}
    raise NotPortable(f"an argument of type {type(x).__name__} is not portable")


def _plain(x: Any) -> Any:
    """An ``int`` or ``str`` subclass (an enum value...) as its plain value."""
    return int(x) if isinstance(x, int) else str(x)


def _part(v: float) -> Any:
    return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))


def decode_value(v: Any, device: Callable[[str], torch.device]) -> Any:
    """An argument value (template markers included) from its JSON form, checked by
    :func:`opaudit.data.capsule.check_value`; ``device`` maps the source's device names to this machine's."""
    if isinstance(v, dict):
        (tag, x), = v.items()
        if tag == "tensor":
            return _Leaf(x)
        if tag in ("list", "tuple"):
            items = [decode_value(y, device) for y in x]
            if any(type(y) in (_Leaf, _Seq) for y in items):
                return _Seq(list if tag == "list" else tuple, items)
            return items if tag == "list" else tuple(items)
        if tag == "float":
            return float(x)
        if tag == "complex":
            return complex(float(x[0]), float(x[1]))
        if tag == "dtype":
            if x not in DTYPES:
                raise NotPortable(f"dtype {x} does not exist in this torch")
            return DTYPES[x]
        if tag == "device":
            return device(x)
        if tag == "layout":
            if x not in _LAYOUTS:
                raise NotPortable(f"layout {x} is not supported")
            return _LAYOUTS[x]
        if tag == "memory_format":
            if x not in _FORMATS:
                raise NotPortable(f"memory format {x} is not supported")
            return _FORMATS[x]
    return v


# -- snapshots ----------------------------------------------------------------
@dataclass(frozen=True)
class PortableCapture:
    """A snapshot in portable form, before its byte arrays are named (see :mod:`opaudit.flows.capsule`)."""

    args: list[Any]
    kwargs: dict[str, Any]
    tensors: tuple[TensorArg | int, ...]
    """Per tensor argument: its record, or for a ``generator=`` argument the index into ``states``."""
    buffers: tuple[tuple[torch.Tensor, int, str], ...]
    """Per buffer: its bytes (a CPU ``uint8`` tensor), the byte offset where they start, the device."""
    states: tuple[tuple[str, torch.Tensor], ...]
    """Per ``generator=`` argument: its device and state."""


def export_snapshot(snap: Snapshot) -> PortableCapture:
    """The portable form of ``snap``; :class:`NotPortable` when it holds what a capsule cannot (a sparse tensor,
    a quantized dtype, a ``ScriptObject`` argument)."""
    args_t = snap._args
    args = [encode_value(a) for a in (args_t.items if type(args_t) is _Seq else args_t)]
    kwargs = {str(k): encode_value(v) for k, v in snap._kwargs.items()}
    tensors: list[TensorArg | int] = []
    states: list[tuple[str, torch.Tensor]] = []
    for slot in snap._slots:
        if type(slot) is tuple:
            b, dtype, size, stride, offset, w = slot
            device = str(snap._storages[b].device)
            tensors.append(TensorArg(dtype_name(dtype), tuple(size), tuple(stride), device, b, offset, w))
        elif type(slot) is _ShapeSlot:
            tensors.append(TensorArg(dtype_name(slot.dtype), tuple(slot.size), tuple(slot.stride), str(slot.device)))
        elif type(slot) is _GeneratorSlot:
            tensors.append(len(states))
            states.append((str(slot.device), slot.state.detach().cpu().contiguous()))
        elif type(slot) is _OpaqueSlot:
            t = snap._opaque[slot.index]
            raise NotPortable(f"a {str(t.layout).replace('torch.', '')} {type(t).__name__} argument is not portable")
        else:
            raise NotPortable(f"an argument slot of type {type(slot).__name__} is not portable")
    buffers = []
    for b, storage in enumerate(snap._storages):
        if b in snap._shared:
            lo, hi = snap.span(b)
            base = (lo // 16) * 16
        else:
            base, hi = snap._bases[b], snap._bases[b] + storage.nbytes()
        raw = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, base - snap._bases[b],
                                                                             (hi - base,), (1,))
        buffers.append((raw.cpu(), base, str(storage.device)))
    return PortableCapture(args, kwargs, tuple(tensors), tuple(buffers), tuple(states))


def rebuild_snapshot(capture: Capture, blob: Callable[[Any], torch.Tensor],
                     device: Callable[[str], torch.device]) -> Snapshot:
    """A :class:`Snapshot` of ``capture`` on this machine.

    ``blob(b)`` gives the CPU ``uint8`` tensor holding a :class:`~opaudit.data.capsule.Blob`'s
    bytes (already checked against the manifest); ``device`` maps the source's device names to
    this machine's. :class:`NotPortable` when this torch cannot rebuild it (a dtype it lacks, a
    generator state for another kind of device).
    """
    storages, bases, lo, hi = [], [], [], []
    for buf in capture.buffers:
        data = blob(buf.blob)
        target = device(buf.device)
        storages.append((data if target.type == "cpu" else data.to(target)).untyped_storage())
        bases.append(buf.base)
        lo.append(buf.base)
        hi.append(buf.base + buf.blob.nbytes)
    slots: list[Any] = []
    written = set()
    for t in capture.tensors:
        if isinstance(t, GeneratorArg):
            target = device(t.device)
            if target.type != torch.device(t.device).type:
                raise NotPortable(f"its generator= argument holds a {t.device} state, which a "
                                  f"{target.type} generator cannot take")
            slots.append(_GeneratorSlot(target, blob(t.state)))
            continue
        if t.dtype not in DTYPES:
            raise NotPortable(f"dtype {t.dtype} does not exist in this torch")
        dtype = DTYPES[t.dtype]
        if t.buffer is None:
            slots.append(_ShapeSlot(dtype, torch.Size(t.shape), t.stride, device(t.device)))
            continue
        if t.written:
            written.add(t.buffer)
        slots.append((t.buffer, dtype, torch.Size(t.shape), t.stride, t.offset, t.written))
    snap = Snapshot.__new__(Snapshot)
    args = [decode_value(a, device) for a in capture.args]
    snap._args = _Seq(tuple, args) if any(type(a) in (_Leaf, _Seq) for a in args) else tuple(args)
    snap._kwargs = {k: decode_value(v, device) for k, v in capture.kwargs.items()}
    snap._slots = tuple(slots)
    snap._storages = storages
    snap._bases = bases
    snap._lo = lo
    snap._hi = hi
    snap._opaque = ()
    snap._written_buffers = written
    snap._shared = []
    snap.nbytes = sum(h - low for low, h in zip(lo, hi))
    return snap


def resolve_op(name: str) -> Any:
    """The op overload named ``aten.add.Tensor`` here, looked up without importing anything.

    A capsule is untrusted: the name must be three plain identifiers, ops that touch files are
    refused, and only operators already registered in this process are found (no module is
    imported to find one). :class:`NotPortable` says why it cannot be run here.
    """
    parts = name.split(".")
    if len(parts) != 3 or not all(_OP_PART.fullmatch(p) and not p.startswith("__") for p in parts):
        raise NotPortable(f"{name!r} is not an op name")
    namespace, packet, overload = parts
    if f"{namespace}::{packet}" in _UNSAFE_OPS:
        raise NotPortable(f"{name} touches files: never run from a capsule")
    try:
        op = getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except (AttributeError, RuntimeError) as e:
        raise NotPortable(f"{name} does not exist in this torch ({torch.__version__}): "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if not isinstance(op, torch._ops.OpOverload):
        raise NotPortable(f"{name!r} is not an op overload")
    return op


# -- outputs ------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements in order, as the CPU ``uint8`` tensor of their raw bits (NaN payloads kept)."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.cpu().contiguous().reshape(-1).view(torch.uint8)


def tensor_from_bytes(raw: torch.Tensor, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """The tensor whose :func:`tensor_bytes` are ``raw``; sizes were checked with the manifest."""
    if dtype not in DTYPES:
        raise NotPortable(f"dtype {dtype} does not exist in this torch")
    return raw.view(DTYPES[dtype]).reshape(tuple(shape))


def content_digest(x: Any) -> str:
    """32 hex digits naming an output's dtype, shape and bits, NaNs counted equal wherever they sit
    (as :func:`~opaudit.aten.bitwise.same_bits` counts them); a non-tensor output by its value."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        h.update(f"{_NAMES.get(t.dtype, str(t.dtype))}{list(t.shape)}|".encode())
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum())) \
                and bool(torch.isnan(t).any()):
            # Only when a NaN is there at all (a sum is one cheap pass; an inf also lands here).
            t = torch.where(torch.isnan(t), torch.full((), float("nan"), dtype=t.dtype), t)
        h.update(memoryview(bits(t).reshape(-1).contiguous().view(torch.uint8).numpy()))
    else:
        h.update(f"{type(x).__name__}|{_scalar_text(x)}".encode())
    return h.hexdigest()


def _scalar_text(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else float.hex(x)
    if isinstance(x, complex):
        return f"{_scalar_text(x.real)},{_scalar_text(x.imag)}"
    return repr(x)


def scalar_json(x: Any) -> Any:
    """A non-tensor output's JSON form."""
    try:
        return encode_value(x)
    except NotPortable:
        return repr(x)


@dataclass(frozen=True)
class Expected:
    """The outputs one mode gave where a capsule was captured."""

    names: tuple[str, ...] = ()
    digests: tuple[str | None, ...] = ()
    """Per output: its digest, where its bytes were not kept (``None`` where they were)."""
    values: tuple[Any, ...] = ()
    """Per output: its bytes as a CPU tensor, or ``None`` where only its digest was kept (numbers too)."""
    error: str = ""
    """Why the source could not run the op in this mode (nothing to compare)."""


@dataclass(frozen=True)
class Reference:
    """What a capsule's source computed for one call: per mode, its outputs."""

    modes: Mapping[str, Expected]


def compare_expected(expected: Expected, outputs: Sequence[Any], names: Sequence[str]) -> Crossing:
    """How far ``outputs`` (one run here, named ``names``) are from what the source computed."""
    if expected.error:
        return Crossing(False, error=f"the source could not run it: {expected.error}")
    if len(outputs) != len(expected.names):
        return Crossing(True, math.inf, None, 1.0, tuple(names) or expected.names)
    differing: list[str] = []
    changed = total = 0
    max_diff: float | None = 0.0
    max_ulp: int | None = 0
    digests_only = False
    for i, out in enumerate(outputs):
        here = out.detach().cpu() if isinstance(out, torch.Tensor) else out
        ref = expected.values[i] if i < len(expected.values) else None
        n = here.numel() if isinstance(here, torch.Tensor) else 1
        total += n
        if ref is None:
            digests_only = True
            if content_digest(here) != expected.digests[i]:
                differing.append(names[i] if i < len(names) else expected.names[i])
                changed += n
            continue
        if same_bits(ref, here):
            continue
        differing.append(names[i] if i < len(names) else expected.names[i])
        d = difference(ref, here)
        changed += d.elements_differing
        if max_diff is not None:
            max_diff = max(max_diff, d.max_abs_diff)
        comparable = (isinstance(ref, torch.Tensor) and isinstance(here, torch.Tensor)
                      and ref.shape == here.shape and ref.dtype == here.dtype)
        u = ulp_distance(ref, here, differing_mask(ref, here)) if comparable else None
        max_ulp = None if u is None or max_ulp is None else max(max_ulp, u)
    if not differing:
        return Crossing(False)
    if digests_only:
        # A digest says whether, not how far.
        max_diff = max_ulp = None
    return Crossing(True, max_diff, max_ulp, changed / total if total else 1.0, tuple(differing))
