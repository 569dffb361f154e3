"""Bitwise comparison of tensors (equal bits, where and how far they differ) and
position-aware digests.

Everything here runs with the Python dispatcher disabled by its callers, so none
of it shows up in a recorded trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from opaudit.aten.memory import same_memory

_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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
