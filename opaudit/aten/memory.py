"""libc's memory functions where they serve: comparing tensors' bytes, and zeroing new CPU blocks.

A replay compares every run's outputs with the first run's; ``memcmp`` reads each
byte once, where ``torch.equal`` on integer views took about 7x longer on one
thread (0.7 ms against 0.09 ms for 4 MB). :func:`zeroed_allocations` makes glibc
hand out zeroed memory for a while: the one place a replay needs memory whose
contents it knows.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
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


_M_PERTURB = -6
"""glibc's ``mallopt`` parameter: a nonzero byte B makes every block ``malloc`` (and ``posix_memalign``, which
torch's CPU allocator calls) hands out hold ~B, and every freed block B, until it is set to 0 again."""
_mallopt: Any = None


def _libc_mallopt() -> Any:
    global _mallopt
    if _mallopt is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None).mallopt
            fn.restype = ctypes.c_int
            fn.argtypes = (ctypes.c_int, ctypes.c_int)
            _mallopt = fn
        except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
            _mallopt = False
    return _mallopt


@contextlib.contextmanager
def zeroed_allocations() -> Iterator[bool]:
    """While in force, glibc hands out CPU blocks zeroed, whatever the block held before; yields whether it could.

    All but the blocks of up to 1 KiB glibc keeps per thread for reuse (its tcache,
    7 per size): those come back as they were freed, less their first 16 bytes (the
    cache's own pointers). Whoever needs those zeroed too takes that many blocks of
    the size, zeroes and frees them first (:func:`opaudit.engine.replay._scrubbed_run`).
    Blocks freed meanwhile are filled with ``0xFF`` (NaN in every floating dtype):
    they were garbage to whoever gets them next anyway. ``False`` where the C library
    is not glibc's, or an allocator of its own (jemalloc, tcmalloc) is preloaded: the
    caller then cannot rely on it.
    """
    mallopt = _libc_mallopt()
    if not mallopt or not mallopt(_M_PERTURB, 0xFF):
        yield False
        return
    try:
        yield _perturb_reaches_torch()
    finally:
        mallopt(_M_PERTURB, 0)


_perturb_seen: bool | None = None


def _perturb_reaches_torch() -> bool:
    """Whether torch's CPU blocks come from the allocator ``mallopt`` steers (not a preloaded one): a block taken
    and freed, then taken again, comes back zeroed. Asked once."""
    global _perturb_seen
    if _perturb_seen is None:
        t = torch.empty(1 << 12, dtype=torch.uint8)
        t.fill_(0xA5)
        del t
        _perturb_seen = not bool(torch.empty(1 << 12, dtype=torch.uint8).any())
    return _perturb_seen


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
