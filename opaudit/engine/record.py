"""Recording: every aten op the user's code runs, deduplicated by signature.

The public :class:`Recorder` owns the results; a private ``TorchDispatchMode``
only intercepts calls and forwards them to it (the shape of PyTorch's own
``FlopCounterMode``). Ops are attributed to the user's source line and module; a
backward op is attributed to the forward line that created its autograd node.

Longer than ~500 lines on purpose: the hot path, copy on write and the further
captures of value-dependent ops (:mod:`opaudit.engine.samples` holds their
policy) all read and write the same private tables (entries, held storages,
the captured bytes), and splitting them would turn those into a cross-module
protocol on the recorder's hottest code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from opaudit.aten.ops import OpKind, op_kind, value_dependent, values_matter, written_args
from opaudit.aten.signature import scalar_key, script_object_text, signature_id, signature_text
from opaudit.aten.tensors import CaptureError, Snapshot, copy_span, unsupported_input
from opaudit.data.errors import OpauditError
from opaudit.data.report import CompiledCode
from opaudit.data.site import Site
from opaudit.engine.children import ChildProcesses
from opaudit.engine.mode import Interception
from opaudit.engine.samples import Sample, Samples
from opaudit.engine.sites import SiteTracker

DEFAULT_CAPTURE_BUDGET = 2 * 1024**3
"""Default memory budget for captured inputs, in bytes (2 GiB)."""

DEFAULT_CAPTURES_PER_SIGNATURE = 4
"""Captures kept per signature of a value-dependent op (its first call's and up to 3 more, spread over the
window: see :mod:`opaudit.engine.samples`); every other signature keeps its first call's only."""

MAX_SITES = 8
"""Distinct source sites kept per signature; further sites are only counted."""

class RecordError(OpauditError):
    """Recording could not start or finish (e.g. nested recorders)."""


@dataclass(frozen=True)
class RecordedSignature:
    """One unique op signature seen while recording. Holds no tensors."""

    id: str
    """Stable short hash of op and signature text."""
    op: str
    """Overload name, e.g. ``aten.index_put_.default``."""
    kind: OpKind
    signature: str
    """Arguments by dtype, shape, stride (when not contiguous) and device; other values as the first call gave them."""
    device: str
    calls: int
    phases: tuple[str, ...]
    sites: tuple[Site, ...]
    """Distinct sites in first-seen order, at most :data:`MAX_SITES`."""
    sites_dropped: int
    """Sites seen beyond :data:`MAX_SITES`."""
    first_call: int
    """1-based position of the first call in execution order."""
    skip_reason: str | None
    """Why the op cannot be replayed (capture budget, capture OOM...), else ``None``."""
    capture_needed: int | None = None
    """For ``capture budget``: the budget, in bytes, that would have held this capture too."""
    checked_calls: tuple[int, ...] = ()
    """For a value-dependent op (:data:`~opaudit.aten.ops.VALUE_DEPENDENT_OPS`) recorded with
    ``captures_per_signature`` above 1: the calls of this signature (1-based, in its own order)
    whose inputs were captured, the first call's included. Empty for every other signature, and
    for one called only once."""
    calls_not_held: int = 0
    """Calls of a value-dependent signature that were to be captured too but did not fit in the
    capture budget (or were dropped to make room for another signature's first capture)."""


class _Entry:
    """Mutable accumulator behind a :class:`RecordedSignature`."""

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


class _OpTraits:
    """What the hot path needs to know about one op overload, worked out once per process."""

    __slots__ = ("func", "call", "kind", "skip_reason", "view", "name", "written", "writes", "values",
                 "sampled")

    def __init__(self, func: Any) -> None:
        self.func = func
        # ``OpOverload.__call__`` is a Python frame that only forwards to ``_op``.
        self.call = getattr(func, "_op", func)
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


# Keyed by ``id(func)``: ``OpOverload.__hash__`` is a Python method, and this dict is
# read on every call. Each value holds its ``func``, so no id is ever reused.
_OP_TRAITS: dict[int, _OpTraits] = {}


def _op_traits(func: Any) -> _OpTraits:
    info = _OP_TRAITS.get(id(func))
    if info is None or info.func is not func:
        info = _OP_TRAITS[id(func)] = _OpTraits(func)
    return info


_Tensor = torch.Tensor
_storage_use_count: Callable[[Any], int] | None = getattr(torch._C, "_storage_Use_Count", None)
_ScriptObject = torch.ScriptObject


def _args_key(args: Iterable[Any]) -> tuple:
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
            out.append(_args_key(a))
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


class Recorder:
    """Records every aten op run inside ``with Recorder() as rec:``.

    >>> with Recorder() as rec:
    ...     loss = model(x).sum(); loss.backward()
    >>> report = opaudit.build_report(rec, reps=5)

    Each unique signature keeps its call count, phases, sites and a snapshot of
    the inputs of its first call, within ``capture_budget`` bytes. A signature of
    a value-dependent op (``index_put_``, ``scatter_add_``...: see
    :data:`~opaudit.aten.ops.VALUE_DEPENDENT_OPS`) keeps up to
    ``captures_per_signature`` snapshots, of calls spread over the recording
    (:mod:`opaudit.engine.samples`), all within the same budget: a first capture
    of any signature takes precedence, and once the budget had to drop one of these
    further captures to make room, no more are taken.

    Snapshots are copy on write: an input the op only reads is held as it is,
    and copied only when a later op is about to write it (its schema says so) or,
    when recording ends, if anything besides the recorder still references it.
    This relies on every write going through an aten op, as every
    ``TorchDispatchMode`` does; for code that writes tensors some other way (a
    C++ extension writing through ``data_ptr()``, a NumPy view) pass
    ``copy_inputs=True`` to copy every input when it is captured. See
    ``docs/performance.md``.
    """

    def __init__(self, capture_budget: int = DEFAULT_CAPTURE_BUDGET, root: str | None = None, *,
                 copy_inputs: bool = False, capture_collectives: bool = False,
                 captures_per_signature: int = DEFAULT_CAPTURES_PER_SIGNATURE) -> None:
        if captures_per_signature < 1:
            raise ValueError("captures_per_signature must be at least 1")
        self.capture_budget = capture_budget
        self.captures_per_signature = captures_per_signature
        self._samples_closed = False
        """Set once a further capture was dropped to make room for a first one: no more are taken."""
        self.copy_inputs = copy_inputs
        self.capture_collectives = capture_collectives
        """Also capture the inputs of collectives (still ``skipped``, reason ``collective``),
        for :mod:`opaudit.flows.distributed` to replay them in lockstep on every rank."""
        """Copy every input when it is captured, instead of holding the ones the op
        only reads until something is about to write them (see :meth:`_before_write`).
        Needed only when the recorded code writes tensors other than through aten
        ops (a C++ extension writing through ``data_ptr()``, a NumPy view)."""
        self.sites = SiteTracker(root)
        self._entries: dict[Any, _Entry] = {}
        self._held: dict[int, list[Any]] = {}
        """Storage data pointer → ``[storage, [(entry, buffer), ...]]``: the snapshots holding it uncopied."""
        self._view_calls: dict[_OpTraits, int] = {}
        self.total_calls = 0
        self.captured_bytes = 0
        self.strict_refusals: dict[str, int] = {}
        """Op → calls that strict deterministic mode, turned on by the recorded code, refused
        (each then ran with ``warn_only`` so that the run could go on)."""
        self._mark: dict[Any, int] | None = None
        """Calls per signature when :meth:`mark_step` was last called (``None``: never)."""
        self._interception = Interception(self._on_call, self.sites, self._on_alert)
        self._active = False
        self.children = ChildProcesses(self)
        """Child processes (DataLoader workers) forked while recording, and what came back from them."""

    # -- context ------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        if self._active:
            raise RecordError("this Recorder is already recording")
        self._active = True
        self.children.start()
        self._interception.__enter__()
        return self

    def _on_alert(self, func: Any) -> None:
        name = str(func)
        self.strict_refusals[name] = self.strict_refusals.get(name, 0) + 1

    def __exit__(self, *exc: Any) -> None:
        try:
            self._interception.__exit__(*exc)
        finally:
            self._active = False
            self._seal()
            for _, shipment in self.children.finish():
                self.merge(shipment)

    # -- hot path -----------------------------------------------------------
    def _on_call(self, func: Any, args: tuple, kwargs: dict | None) -> Callable[..., Any]:
        """Account for one call; return what runs it. Runs before every aten op: keep it lean."""
        self.total_calls += 1
        info = _OP_TRAITS.get(id(func))
        if info is None or info.func is not func:
            info = _op_traits(func)
        if info.writes and self._held:
            self._before_write(info, args, kwargs)
        if info.view:
            views = self._view_calls
            views[info] = views.get(info, 0) + 1
            return info.call
        phase, site = self.sites.current()
        return self._account(info, args, kwargs, phase, site)

    def _account(self, info: _OpTraits, args: tuple, kwargs: dict | None, phase: int, site: int) -> Callable[..., Any]:
        """Count a (non-view) call under its signature, capturing the first call's inputs; what runs it."""
        entries = self._entries
        try:
            key = (info, _args_key(args), (tuple(kwargs), _args_key(kwargs.values())) if kwargs else None)
            entry = entries.get(key)
        except Exception:  # unhashable values, tensors without strides
            key = (info, signature_text(args, kwargs or {}))
            entry = entries.get(key)
        if entry is None:
            entry = entries[key] = _Entry(info.func, info.kind, key, self.total_calls)
            self._first_call(entry, info, args, kwargs or {})
        entry.calls += 1
        if entry.samples is not None and entry.calls > 1:
            self._sample(entry, info, args, kwargs or {})
        entry.phases |= phase
        sites = entry.sites
        n = sites.get(site)
        if n is not None:
            sites[site] = n + 1
        elif len(sites) < MAX_SITES:
            sites[site] = 1
        else:
            entry.sites_dropped += 1
        return info.call

    def _first_call(self, entry: _Entry, info: _OpTraits, args: tuple, kwargs: dict) -> None:
        unsupported = unsupported_input(args, kwargs) if info.kind is not OpKind.SIDE_EFFECT else None
        if unsupported is not None:
            entry.skip_reason = unsupported
        elif info.kind in (OpKind.COMPUTE, OpKind.RANDOM, OpKind.UNINITIALIZED):
            self._capture(entry, info, args, kwargs)
        elif info.kind is OpKind.SIDE_EFFECT:
            if self.capture_collectives and info.skip_reason == "collective":
                self._capture(entry, info, args, kwargs)
            entry.skip_reason = entry.skip_reason or info.skip_reason
        if entry.snapshot is None:
            # With a snapshot the text waits for ``signatures()`` (see ``_text``).
            entry.text = signature_text(args, kwargs)
        elif info.sampled and self.captures_per_signature > 1:
            entry.samples = Samples(self.captures_per_signature)

    def _snapshot(self, info: _OpTraits, args: tuple, kwargs: dict) -> Snapshot:
        """A snapshot of one call's inputs within what is left of the budget; :class:`CaptureError` if not."""
        written = None
        if info.writes:
            pos_w, kw_w = info.written
            written = [pos_w[i] if i < len(pos_w) else False for i in range(len(args))]
            written += [k in kw_w for k in kwargs]
        # An op returning uninitialized memory is only ever timed: its inputs'
        # values do not matter, so none are held.
        snap = Snapshot(args, kwargs, written, share=not self.copy_inputs,
                        budget=self.capture_budget - self.captured_bytes, values=info.values)
        if self.captured_bytes + snap.nbytes > self.capture_budget:
            raise CaptureError("capture budget", snap.nbytes)
        return snap

    def _capture(self, entry: _Entry, info: _OpTraits, args: tuple, kwargs: dict) -> None:
        for attempt in range(2):
            try:
                snap = self._snapshot(info, args, kwargs)
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

    def _hold(self, holder: "_Entry | Sample", snap: Snapshot) -> None:
        """Register the storages ``snap`` holds uncopied, for copy on write."""
        held = self._held
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
    def _sample(self, entry: _Entry, info: _OpTraits, args: tuple, kwargs: dict) -> None:
        samples = entry.samples
        take, dropped = samples.wants(entry.calls)
        for s in dropped:
            self._release_sample(s)
        if not take or entry.snapshot is None:
            return
        if self._samples_closed:
            samples.missed += 1
            return
        try:
            snap = self._snapshot(info, args, kwargs)
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
            slot = self._held.get(ptr)
            if slot is not None:
                slot[1] = [(h, b) for h, b in slot[1] if h is not s]
                if not slot[1]:
                    del self._held[ptr]

    def _make_room(self, nbytes: int) -> bool:
        """Drop further captures, latest signature first, until ``nbytes`` more fit; stop taking them.

        A signature's first capture matters more than another call of a signature
        already captured: without it the signature is not replayed at all.
        """
        if not any(e.samples is not None and e.samples.kept for e in self._entries.values()):
            return False
        self._samples_closed = True
        for e in sorted(self._entries.values(), key=lambda e: -e.first_call):
            if e.samples is None:
                continue
            while e.samples.kept and self.captured_bytes + nbytes > self.capture_budget:
                self._release_sample(e.samples.kept.pop())
                e.samples.missed += 1
        return self.captured_bytes + nbytes <= self.capture_budget

    # -- copy on write ------------------------------------------------------
    # A snapshot copies at once only the storages its op writes; the storages it
    # only reads are held as they are. Before any later op writes one of those
    # (the op schema says which arguments it writes: ``Tensor(a!)``),
    # ``_before_write`` copies it; when recording ends, ``_seal`` copies those that
    # something outside the recorder still references. Activations, most of what
    # a step captures, are never copied at all.
    def _before_write(self, info: _OpTraits, args: tuple, kwargs: dict | None) -> None:
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
            slot = self._held.pop(ptr, None)
            if slot is not None:
                self._own(slot[1])
        elif isinstance(a, (list, tuple)):
            for x in a:
                self._unhold(x)

    def _own(self, waiting: list[tuple["_Entry | Sample", int]]) -> None:
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

    def _drop(self, holder: "_Entry | Sample", reason: str) -> None:
        if isinstance(holder, Sample):
            if holder.snapshot is not None and holder.owner.samples is not None:
                holder.owner.samples.missed += 1
            self._release_sample(holder)
            return
        entry = holder
        self._text(entry)
        if entry.snapshot is not None:
            self.captured_bytes -= entry.snapshot.nbytes
        entry.snapshot = None
        entry.skip_reason = reason
        if entry.samples is not None:
            for s in entry.samples.kept:
                self._release_sample(s)
            entry.samples = None

    def _seal(self) -> None:
        """Copy the held storages that anything besides the snapshots still references."""
        held, self._held = self._held, {}
        count = _storage_use_count
        for storage, waiting in held.values():
            # One reference is the snapshots' own Python storage object (torch
            # keeps one per storage): any other means something else can still write it.
            if storage is None or count is None or count(storage._cdata) > 1:
                self._own(waiting)

    # -- child processes (see opaudit.engine.children) --------------------------------
    def forget_for_child(self) -> None:
        """In a forked child: drop what the parent recorded, keep recording the child's own ops."""
        self._entries = {}
        self._held = {}
        self._view_calls = {}
        self.total_calls = 0
        self.captured_bytes = 0
        self.strict_refusals = {}
        self._samples_closed = False
        self._mark = None

    def shipment(self) -> dict[str, Any]:
        """What this (child) recorder recorded, as plain values and snapshots, for :meth:`merge`."""
        items = []
        for e in self._entries_in_order():
            if e.snapshot is not None:
                e.snapshot.own_all()
            sites = [(self.sites.site(i), n) for i, n in e.sites.items()]
            items.append((str(e.func), self._text(e), e.calls, e.phases, sites, e.sites_dropped, e.first_call,
                          e.snapshot, e.skip_reason))
        views = {info.name: n for info, n in self._view_calls.items()}
        return {"total_calls": self.total_calls, "signatures": items, "view_calls": views}

    def merge(self, shipment: dict[str, Any]) -> None:
        """Add what a child process recorded: its calls count after this process's own.

        A signature the parent also has (same op and signature text) gains the
        child's calls and sites; the others become new signatures, within the
        capture budget.
        """
        by_text = {(str(e.func), self._text(e)): e for e in self._entries.values()}
        base = self.total_calls
        for op, text, calls, phases, sites, dropped, first, snap, reason in shipment["signatures"]:
            entry = by_text.get((op, text))
            if entry is None:
                func = _op_by_name(op)
                if func is None:
                    continue
                info = _op_traits(func)
                entry = _Entry(func, info.kind, ("child", op, text), base + first)
                entry.text = text
                entry.skip_reason = reason
                if snap is not None and reason is None:
                    if self.captured_bytes + snap.nbytes > self.capture_budget:
                        entry.skip_reason = "capture budget"
                    else:
                        self.captured_bytes += snap.nbytes
                        entry.snapshot = snap
                self._entries[entry.key] = by_text[(op, text)] = entry
            entry.calls += calls
            entry.phases |= phases
            entry.sites_dropped += dropped
            for site, n in sites:
                sid = self.sites.add_site(site)
                if sid in entry.sites:
                    entry.sites[sid] += n
                elif len(entry.sites) < MAX_SITES:
                    entry.sites[sid] = n
                else:
                    entry.sites_dropped += 1
        for name, n in shipment["view_calls"].items():
            func = _op_by_name(name)
            if func is not None:
                info = _op_traits(func)
                self._view_calls[info] = self._view_calls.get(info, 0) + n
        self.total_calls += shipment["total_calls"]

    # -- results ------------------------------------------------------------
    def _entries_in_order(self) -> Iterator[_Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.first_call))

    def _keys_in_order(self) -> list[tuple[Any, _Entry]]:
        return sorted(self._entries.items(), key=lambda ke: ke[1].first_call)

    def signatures(self) -> list[RecordedSignature]:
        """Every unique non-view signature, in order of first call."""
        out = []
        for e in self._entries_in_order():
            op = str(e.func)
            # Two ids can name equal sites (e.g. two code objects on one line): merge them.
            sites = dict.fromkeys(self.sites.site(i) for i in e.sites)
            text = self._text(e)
            out.append(RecordedSignature(
                id=signature_id(op, text),
                op=op,
                kind=e.kind,
                signature=text,
                device=_device_of(e),
                calls=e.calls,
                phases=self.sites.phase_names(e.phases),
                sites=tuple(sites),
                sites_dropped=e.sites_dropped,
                first_call=e.first_call,
                skip_reason=e.skip_reason,
                capture_needed=e.capture_needed,
                checked_calls=_checked_calls(e),
                calls_not_held=e.samples.missed if e.samples is not None else 0,
            ))
        return out

    def items(self) -> list[tuple[RecordedSignature, Any, Snapshot | None]]:
        """``(signature, op overload, snapshot)`` triples in order of first call."""
        sigs = self.signatures()
        return [(s, e.func, e.snapshot) for s, e in zip(sigs, self._entries_in_order())]

    def further_captures(self) -> dict[str, tuple[tuple[int, Snapshot], ...]]:
        """Signature id → ``(call, snapshot)`` of each capture besides the first, for value-dependent ops.

        ``call`` is 1-based in the signature's own order of calls (see
        :attr:`RecordedSignature.checked_calls`). Signatures without any are left out.
        """
        out = {}
        for sig, e in zip(self.signatures(), self._entries_in_order()):
            if e.samples is not None and e.snapshot is not None:
                held = tuple((s.call, s.snapshot) for s in e.samples.kept if s.snapshot is not None)
                if held:
                    out[sig.id] = held
        return out

    def mark_step(self) -> None:
        """A step of the recorded window ended: :meth:`since_mark` will name the signatures called after it."""
        self._mark = {key: e.calls for key, e in self._entries.items()}

    def since_mark(self) -> set[str]:
        """Ids of the signatures called since the last :meth:`mark_step` (all of them if it never was)."""
        mark = self._mark or {}
        return {sig.id for sig, (key, e) in zip(self.signatures(), self._keys_in_order())
                if e.calls > mark.get(key, 0)}

    def op_sites(self) -> set[tuple[str, Site | None]]:
        """Every ``(op, site)`` this recording called; ``(op, None)`` for an op that called from more sites
        than a signature keeps (:data:`MAX_SITES`)."""
        out: set[tuple[str, Site | None]] = set()
        for e in self._entries.values():
            name = str(e.func)
            out.update((name, self.sites.site(i)) for i in e.sites)
            if e.sites_dropped:
                out.add((name, None))
        return out

    @property
    def view_calls(self) -> dict[str, int]:
        """Calls of view and metadata ops, by op name (not replayed)."""
        return dict(sorted((info.name, n) for info, n in self._view_calls.items()))

    def compiled(self) -> tuple[CompiledCode, ...]:
        """``torch.compile``d modules and functions called while recording (they ran eagerly)."""
        return self._interception.compiled.ran()

    def release(self) -> None:
        """Drop every captured input (the signatures stay), and the compiled callables seen."""
        self._interception.compiled.release()
        for e in self._entries.values():
            self._text(e)
            e.snapshot = None
            if e.samples is not None:
                for s in e.samples.kept:
                    s.snapshot = None
        self._held.clear()
        self.captured_bytes = 0

    @staticmethod
    def _text(e: _Entry) -> str:
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


def _checked_calls(e: _Entry) -> tuple[int, ...]:
    """The calls captured, first included, for a value-dependent signature called more than once."""
    if e.samples is None or e.snapshot is None or e.calls < 2:
        return ()
    return (1, *e.samples.calls())


def _op_by_name(name: str) -> Any:
    """``torch.ops.aten.index_put_.default`` from ``"aten.index_put_.default"``; ``None`` if unknown here."""
    try:
        namespace, packet, overload = name.rsplit(".", 2)
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except (AttributeError, ValueError, RuntimeError):
        return None


def _device_of(e: _Entry) -> str:
    if e.snapshot is not None:
        devices = [str(d) for d in e.snapshot.devices]
    else:
        devices = [str(p) for p in _walk_key(e.key) if isinstance(p, torch.device)]
    accelerators = sorted(d for d in devices if d != "cpu")
    return accelerators[0] if accelerators else "cpu"


def _walk_key(k: Any) -> Iterator[Any]:
    if isinstance(k, tuple) and not isinstance(k, torch.Size):
        for x in k:
            yield from _walk_key(x)
    else:
        yield k
