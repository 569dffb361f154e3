"""A recording's tables: one :class:`Entry` per signature, and the inputs captured for replay.

:class:`Captures` keeps the snapshots within the capture budget, copy on write:
a snapshot copies at once only the storages its op writes; the storages it only
reads are held as they are. Before any later op writes one of those (the op
schema says which arguments it writes: ``Tensor(a!)``), :meth:`Captures.before_write`
copies it; when recording ends, :meth:`Captures.seal` copies those that something
outside the recorder still references. Activations, most of what a step captures,
are never copied at all. Value-dependent ops keep further captures
(:mod:`opaudit.engine.samples` holds their policy), which give way to any
signature's first capture when the budget is short.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from opaudit.aten.ops import OpKind
from opaudit.aten.signature import signature_text
from opaudit.aten.tensors import CaptureError, Snapshot, copy_span
from opaudit.engine.optraits import OpTraits
from opaudit.engine.samples import Sample, Samples

_storage_use_count: Callable[[Any], int] | None = getattr(torch._C, "_storage_Use_Count", None)


class Entry:
    """Mutable accumulator behind a :class:`~opaudit.engine.record.RecordedSignature`."""

    __slots__ = ("func", "kind", "key", "first_call", "calls", "phases", "sites", "sites_dropped",
                 "snapshot", "skip_reason", "text", "capture_needed", "samples")

    def __init__(self, func: Any, kind: OpKind, key: Any, first_call: int) -> None:
        self.func = func
        self.kind = kind
        self.key = key
        self.first_call = first_call
        self.calls = 0
        self.phases = 0
        """Bits of ``PHASE_BITS``."""
        self.sites: dict[int, int] = {}
        """Site id (see :meth:`SiteTracker.site`) → calls from there."""
        self.sites_dropped = 0
        self.snapshot: Snapshot | None = None
        self.skip_reason: str | None = None
        self.text: str | None = None
        self.capture_needed: int | None = None
        self.samples: Samples | None = None
        """Further captures, for a value-dependent op (see :mod:`opaudit.engine.samples`)."""


def entry_text(e: Entry) -> str:
    """The signature text, worked out from the snapshot the first time it is asked for.

    The snapshot rebuilds the first call's arguments with the same dtypes,
    shapes, strides, layouts and devices, so the text is the one the call
    itself would give; the hot path is spared ``describe()``.
    """
    if e.text is None:
        if e.snapshot is not None:
            args, kwargs = e.snapshot.arguments()
            e.text = signature_text(args, kwargs)
        else:
            e.text = ""
    return e.text


class Captures:
    """The inputs one recording captured, within ``budget`` bytes, held copy on write.

    ``entries`` is the recording's signature table (read when the budget must
    make room). ``copy_inputs`` copies every input when it is captured instead of
    holding the ones the op only reads (see :class:`~opaudit.engine.record.Recorder`).
    """

    def __init__(self, entries: dict[Any, Entry], budget: int, *, copy_inputs: bool = False) -> None:
        self.entries = entries
        self.budget = budget
        self.copy_inputs = copy_inputs
        self.captured_bytes = 0
        self.held: dict[int, list[Any]] = {}
        """Storage data pointer → ``[storage, [(holder, buffer), ...]]``: the snapshots holding it uncopied.
        Cleared in place, never replaced: the recorder's hot path keeps a reference to it."""
        self.samples_closed = False
        """Set once a further capture was dropped to make room for a first one: no more are taken."""

    # -- first captures ---------------------------------------------------------
    def snapshot(self, info: OpTraits, args: tuple, kwargs: dict) -> Snapshot:
        """A snapshot of one call's inputs within what is left of the budget; :class:`CaptureError` if not."""
        written = None
        if info.writes:
            pos_w, kw_w = info.written
            written = [pos_w[i] if i < len(pos_w) else False for i in range(len(args))]
            written += [k in kw_w for k in kwargs]
        # An op returning uninitialized memory is only ever timed: its inputs'
        # values do not matter, so none are held.
        snap = Snapshot(args, kwargs, written, share=not self.copy_inputs,
                        budget=self.budget - self.captured_bytes, values=info.values)
        if self.captured_bytes + snap.nbytes > self.budget:
            raise CaptureError("capture budget", snap.nbytes)
        return snap

    def capture(self, entry: Entry, info: OpTraits, args: tuple, kwargs: dict) -> None:
        """Capture the first call of ``entry``'s signature, or say in ``entry.skip_reason`` why not."""
        for attempt in range(2):
            try:
                snap = self.snapshot(info, args, kwargs)
            except CaptureError as e:
                if (attempt == 0 and str(e) == "capture budget" and e.nbytes is not None
                        and self._make_room(e.nbytes)):
                    continue
                entry.skip_reason = str(e) if str(e) in ("capture OOM", "capture budget") else f"capture failed: {e}"
                if e.nbytes is not None:
                    entry.capture_needed = self.captured_bytes + e.nbytes
                return
            except Exception as e:  # the user's run must carry on
                entry.skip_reason = f"capture failed: {type(e).__name__}: {e}"
                return
            break
        self.captured_bytes += snap.nbytes
        entry.snapshot = snap
        self._hold(entry, snap)

    def admit(self, snap: Snapshot) -> bool:
        """Count a snapshot made elsewhere (a child process's) if it fits in the budget."""
        if self.captured_bytes + snap.nbytes > self.budget:
            return False
        self.captured_bytes += snap.nbytes
        return True

    def _hold(self, holder: Entry | Sample, snap: Snapshot) -> None:
        """Register the storages ``snap`` holds uncopied, for copy on write."""
        held = self.held
        for b, storage in snap.shared():
            ptr = storage.data_ptr()
            slot = held.get(ptr)
            if slot is None:
                held[ptr] = [storage, [(holder, b)]]
            else:
                slot[1].append((holder, b))
                if slot[0] is not storage:
                    # Two storages share this memory (``from_numpy`` twice, DLPack...):
                    # their reference counts say nothing about each other, so seal copies it.
                    slot[0] = None

    # -- further captures of value-dependent ops (see opaudit.engine.samples) --
    def sample(self, entry: Entry, info: OpTraits, args: tuple, kwargs: dict) -> None:
        """Capture this call of a value-dependent signature too, if its policy asks for it."""
        samples = entry.samples
        assert samples is not None
        take, dropped = samples.wants(entry.calls)
        for s in dropped:
            self._release_sample(s)
        if not take or entry.snapshot is None:
            return
        if self.samples_closed:
            samples.missed += 1
            return
        try:
            snap = self.snapshot(info, args, kwargs)
        except Exception:  # a further capture is best effort; the first one stands
            samples.missed += 1
            return
        sample = Sample(entry, entry.calls, snap)
        samples.kept.append(sample)
        self.captured_bytes += snap.nbytes
        self._hold(sample, snap)

    def _release_sample(self, s: Sample) -> None:
        """Forget one further capture: its bytes leave the budget, its held storages are let go."""
        snap, s.snapshot = s.snapshot, None
        if snap is None:
            return
        self.captured_bytes -= snap.nbytes
        for _, storage in snap.shared():
            ptr = storage.data_ptr()
            slot = self.held.get(ptr)
            if slot is not None:
                slot[1] = [(h, b) for h, b in slot[1] if h is not s]
                if not slot[1]:
                    del self.held[ptr]

    def _make_room(self, nbytes: int) -> bool:
        """Drop further captures, latest signature first, until ``nbytes`` more fit; stop taking them.

        A signature's first capture matters more than another call of a signature
        already captured: without it the signature is not replayed at all.
        """
        if not any(e.samples is not None and e.samples.kept for e in self.entries.values()):
            return False
        self.samples_closed = True
        for e in sorted(self.entries.values(), key=lambda e: -e.first_call):
            if e.samples is None:
                continue
            while e.samples.kept and self.captured_bytes + nbytes > self.budget:
                self._release_sample(e.samples.kept.pop())
                e.samples.missed += 1
        return self.captured_bytes + nbytes <= self.budget

    # -- copy on write --------------------------------------------------------------
    def before_write(self, info: OpTraits, args: tuple, kwargs: dict | None) -> None:
        """An op is about to write its ``Tensor(a!)`` arguments: copy what the snapshots hold of them."""
        pos, kw = info.written
        for i, w in enumerate(pos):
            if w and i < len(args):
                self._unhold(args[i])
        if kw and kwargs:
            for name in kw:
                if name in kwargs:
                    self._unhold(kwargs[name])

    def _unhold(self, a: Any) -> None:
        if isinstance(a, torch.Tensor):
            try:
                ptr = a.untyped_storage().data_ptr()
            except Exception:  # no storage (sparse, nested...): nothing held
                return
            slot = self.held.pop(ptr, None)
            if slot is not None:
                self._own(slot[1])
        elif isinstance(a, (list, tuple)):
            for x in a:
                self._unhold(x)

    def _own(self, waiting: list[tuple[Entry | Sample, int]]) -> None:
        """Copy one held storage, once, over the union of the spans its holders need."""
        live = []
        lo = hi = -1
        for e, b in waiting:
            snap = e.snapshot
            if snap is not None:
                live.append((e, b))
                s_lo, s_hi = snap.span(b)
                if lo < 0 or s_lo < lo:
                    lo = s_lo
                if s_hi > hi:
                    hi = s_hi
        if not live:
            return
        storage = live[0][0].snapshot.shared_storage(live[0][1])
        try:
            copy = copy_span(storage, lo, hi, storage.device)
        except CaptureError as e:
            for entry, _ in live:
                self._drop(entry, str(e))
            return
        except Exception as e:  # the user's run must carry on
            for entry, _ in live:
                self._drop(entry, f"capture failed: {type(e).__name__}: {e}")
            return
        for entry, b in live:
            entry.snapshot.own(b, copy)

    def _drop(self, holder: Entry | Sample, reason: str) -> None:
        if isinstance(holder, Sample):
            if holder.snapshot is not None and holder.owner.samples is not None:
                holder.owner.samples.missed += 1
            self._release_sample(holder)
            return
        entry = holder
        entry_text(entry)
        if entry.snapshot is not None:
            self.captured_bytes -= entry.snapshot.nbytes
        entry.snapshot = None
        entry.skip_reason = reason
        if entry.samples is not None:
            for s in entry.samples.kept:
                self._release_sample(s)
            entry.samples = None

    def seal(self) -> None:
        """Recording ended: copy the held storages that anything besides the snapshots still references."""
        held = list(self.held.values())
        self.held.clear()
        count = _storage_use_count
        for storage, waiting in held:
            # One reference is the snapshots' own Python storage object (torch
            # keeps one per storage): any other means something else can still write it.
            if storage is None or count is None or count(storage._cdata) > 1:
                self._own(waiting)

    def release(self) -> None:
        """Drop every captured input (the signatures' texts are worked out first, from them)."""
        for e in self.entries.values():
            entry_text(e)
            e.snapshot = None
            if e.samples is not None:
                for s in e.samples.kept:
                    s.snapshot = None
        self.held.clear()
        self.captured_bytes = 0

    def forget(self) -> None:
        """In a forked child: nothing of the parent's is held or counted any more."""
        self.held.clear()
        self.captured_bytes = 0
        self.samples_closed = False
