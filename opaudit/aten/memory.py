"""Whether two tensors hold the same bytes, told by comparing their memory where that is cheap.

A replay compares every run's outputs with the first run's; ``memcmp`` reads each
byte once, where ``torch.equal`` on integer views took about 7x longer on one
thread (0.7 ms against 0.09 ms for 4 MB).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

_memcmp: Any = None


def _libc_memcmp() -> Any:
    """libc's ``memcmp`` through ctypes, or ``False`` where it cannot be had."""
    global _memcmp
    if _memcmp is None:
        try:
            import ctypes

            # The process's own symbols hold libc's (no ctypes.util.find_library: it runs ldconfig).
            libc = ctypes.CDLL("msvcrt" if sys.platform == "win32" else None)
            fn = libc.memcmp
            fn.restype = ctypes.c_int
            fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
            _memcmp = fn
        except (OSError, AttributeError):
            _memcmp = False
    return _memcmp


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape and dtype) hold the same bytes, when that is cheap to tell by
    comparing their memory: both plain, dense, contiguous CPU tensors. ``False`` also means "not known"
    (:func:`~opaudit.aten.bitwise.same_bits` then compares them exactly, NaN payloads included)."""
    if (type(a) not in _PLAIN_TENSORS or type(b) not in _PLAIN_TENSORS or a.device.type != "cpu"
            or b.device.type != "cpu" or a.layout != torch.strided or b.layout != torch.strided or a.is_quantized
            or a.is_conj() or b.is_conj() or a.is_neg() or b.is_neg()
            or not a.is_contiguous() or not b.is_contiguous()):
        return False
    memcmp = _libc_memcmp()
    if not memcmp:
        return False
    n = a.numel() * a.element_size()
    return n == 0 or memcmp(a.data_ptr(), b.data_ptr(), n) == 0
