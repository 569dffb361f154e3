"""Which calls of a value-dependent signature keep a capture, besides its first.

Ops like ``index_put_(accumulate=True)`` race only when their indices collide,
so the first call's inputs can say ``stable`` while a later call's diverge
(:data:`opaudit.aten.ops.VALUE_DEPENDENT_OPS`). The recorder keeps up to
``limit - 1`` further captures of such a signature, spread over the recorded
window without knowing its length in advance, and deterministically (the same
script gives the same calls, so the same report):

calls ``n`` (1-based, in the signature's own order) with ``(n - 1) % stride == 0``
are kept, ``stride`` starting at 1; when a kept call would not fit, ``stride``
doubles and the kept calls off the new stride are dropped. With ``limit`` 4 and
20 calls, the first capture plus calls 9 and 17 are kept; with 3 calls, all three.
"""

from __future__ import annotations

from typing import Any


class Sample:
    """One further capture of a signature: the call it is and its snapshot (``None`` once dropped)."""

    __slots__ = ("owner", "call", "snapshot")

    def __init__(self, owner: Any, call: int, snapshot: Any) -> None:
        self.owner = owner
        """The recorder's entry of the signature."""
        self.call = call
        """1-based call of the signature this capture is of."""
        self.snapshot = snapshot


class Samples:
    """The further captures one signature keeps (at most ``limit - 1``), and how many could not be held."""

    __slots__ = ("limit", "stride", "kept", "missed")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.stride = 1
        self.kept: list[Sample] = []
        self.missed = 0
        """Calls that were to be captured but did not fit in the capture budget (or failed to)."""

    def wants(self, call: int) -> tuple[bool, list[Sample]]:
        """Whether call ``call`` (the 2nd or later) is to be captured, and the captures to drop first.

        The dropped ones leave :attr:`kept` here; the caller releases their memory.
        """
        if (call - 1) % self.stride:
            return False, []
        dropped: list[Sample] = []
        while len(self.kept) >= self.limit - 1:
            self.stride *= 2
            keep = [s for s in self.kept if (s.call - 1) % self.stride == 0]
            dropped += [s for s in self.kept if (s.call - 1) % self.stride]
            self.kept = keep
            if (call - 1) % self.stride:
                return False, dropped
        return True, dropped

    def calls(self) -> tuple[int, ...]:
        """The calls held, in order (the first call not included)."""
        return tuple(s.call for s in self.kept if s.snapshot is not None)
