"""Recording: every aten op the user's code runs, deduplicated by signature.

The public :class:`Recorder` owns the results; a private ``TorchDispatchMode``
only intercepts calls and forwards them to it (the shape of PyTorch's own
``FlopCounterMode``). Ops are attributed to the user's source line and module; a
backward op is attributed to the forward line that created its autograd node.

What each op overload is, and a call's signature key, come from
:mod:`opaudit.engine.optraits`; the signature table and the captured inputs
(budget, copy on write, further captures of value-dependent ops) are
:mod:`opaudit.engine.captures`; what forked children record comes back
through :mod:`opaudit.engine.children` and :meth:`Recorder.merge`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from opaudit.aten.ops import OpKind
from opaudit.aten.signature import signature_id, signature_text
from opaudit.aten.tensors import Snapshot, unsupported_input
from opaudit.data.errors import OpauditError
from opaudit.data.report import CompiledCode
from opaudit.data.site import Site
from opaudit.engine.captures import Captures, Entry, entry_text
from opaudit.engine.children import ChildProcesses
from opaudit.engine.mode import Interception
from opaudit.engine.optraits import OP_TRAITS, OpTraits, args_key, op_by_name, op_traits
from opaudit.engine.samples import Samples
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
        self.captures_per_signature = captures_per_signature
        self.copy_inputs = copy_inputs
        """Copy every input when it is captured, instead of holding the ones the op
        only reads until something is about to write them (see :mod:`opaudit.engine.captures`).
        Needed only when the recorded code writes tensors other than through aten
        ops (a C++ extension writing through ``data_ptr()``, a NumPy view)."""
        self.capture_collectives = capture_collectives
        """Also capture the inputs of collectives (still ``skipped``, reason ``collective``),
        for :mod:`opaudit.flows.distributed` to replay them in lockstep on every rank."""
        self.sites = SiteTracker(root)
        self._entries: dict[Any, Entry] = {}
        self._captures = Captures(self._entries, capture_budget, copy_inputs=copy_inputs)
        self._held = self._captures.held
        """The captures' held storages (the same dict): the hot path asks whether any is held."""
        self._view_calls: dict[OpTraits, int] = {}
        self.total_calls = 0
        self.strict_refusals: dict[str, int] = {}
        """Op → calls that strict deterministic mode, turned on by the recorded code, refused
        (each then ran with ``warn_only`` so that the run could go on)."""
        self._mark: dict[Any, int] | None = None
        """Calls per signature when :meth:`mark_step` was last called (``None``: never)."""
        self._interception = Interception(self._on_call, self.sites, self._on_alert)
        self._active = False
        self._ship_lock: threading.Lock | None = None
        """In a forked child: held while a call is accounted for, and while another thread ships."""
        self.children = ChildProcesses(self)
        """Child processes (DataLoader workers) forked while recording, and what came back from them."""

    @property
    def capture_budget(self) -> int:
        """Bytes of captured inputs this recording may hold."""
        return self._captures.budget

    @property
    def captured_bytes(self) -> int:
        """Bytes of captured inputs held now."""
        return self._captures.captured_bytes

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
            self._captures.seal()
            for _, shipment in self.children.finish():
                self.merge(shipment)

    # -- hot path -----------------------------------------------------------
    def _on_call(self, func: Any, args: tuple, kwargs: dict | None) -> Callable[..., Any]:
        """Account for one call; return what runs it. Runs before every aten op: keep it lean."""
        self.total_calls += 1
        info = OP_TRAITS.get(id(func))
        if info is None or info.func is not func:
            info = op_traits(func)
        if info.writes and self._held:
            self._captures.before_write(info, args, kwargs)
        if info.view:
            views = self._view_calls
            views[info] = views.get(info, 0) + 1
            return info.call
        phase, site = self.sites.current()
        return self._account(info, args, kwargs, phase, site)

    def _account(self, info: OpTraits, args: tuple, kwargs: dict | None, phase: int, site: int) -> Callable[..., Any]:
        """Count a (non-view) call under its signature, capturing the first call's inputs; what runs it."""
        entries = self._entries
        try:
            key = (info, args_key(args), (tuple(kwargs), args_key(kwargs.values())) if kwargs else None)
            entry = entries.get(key)
        except Exception:  # unhashable values, tensors without strides
            key = (info, signature_text(args, kwargs or {}))
            entry = entries.get(key)
        if entry is None:
            entry = entries[key] = Entry(info.func, info.kind, key, self.total_calls)
            self._first_call(entry, info, args, kwargs or {})
        entry.calls += 1
        if entry.samples is not None and entry.calls > 1:
            self._captures.sample(entry, info, args, kwargs or {})
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

    def _first_call(self, entry: Entry, info: OpTraits, args: tuple, kwargs: dict) -> None:
        unsupported = unsupported_input(args, kwargs) if info.kind is not OpKind.SIDE_EFFECT else None
        if unsupported is not None:
            entry.skip_reason = unsupported
        elif info.kind in (OpKind.COMPUTE, OpKind.RANDOM, OpKind.UNINITIALIZED):
            self._captures.capture(entry, info, args, kwargs)
        elif info.kind is OpKind.SIDE_EFFECT:
            if self.capture_collectives and info.skip_reason == "collective":
                self._captures.capture(entry, info, args, kwargs)
            entry.skip_reason = entry.skip_reason or info.skip_reason
        if entry.snapshot is None:
            # With a snapshot the text waits for ``signatures()`` (see ``entry_text``).
            entry.text = signature_text(args, kwargs)
        elif info.sampled and self.captures_per_signature > 1:
            entry.samples = Samples(self.captures_per_signature)

    # -- child processes (see opaudit.engine.children) --------------------------------
    def forget_for_child(self) -> None:
        """In a forked child: drop what the parent recorded, keep recording the child's own ops.

        The child may ship from another thread while its own goes on (see
        :meth:`shipping`): from now on each call is accounted for under a lock.
        """
        self._entries.clear()
        self._captures.forget()
        self._view_calls = {}
        self.total_calls = 0
        self.strict_refusals = {}
        self._mark = None
        lock = self._ship_lock = threading.Lock()
        on_call = self._on_call

        def locked(func: Any, args: tuple, kwargs: dict | None) -> Callable[..., Any]:
            with lock:
                return on_call(func, args, kwargs)

        self._interception.set_on_call(locked)

    def shipping(self) -> contextlib.AbstractContextManager[Any]:
        """Holds the tables still while :meth:`shipment` reads them from another thread (in a child)."""
        return self._ship_lock if self._ship_lock is not None else contextlib.nullcontext()

    def shipment(self) -> dict[str, Any]:
        """What this (child) recorder recorded, as plain values and snapshots, for :meth:`merge`."""
        items = []
        for e in self._entries_in_order():
            if e.snapshot is not None:
                e.snapshot.own_all()
            sites = [(self.sites.site(i), n) for i, n in e.sites.items()]
            items.append((str(e.func), entry_text(e), e.calls, e.phases, sites, e.sites_dropped, e.first_call,
                          e.snapshot, e.skip_reason))
        views = {info.name: n for info, n in self._view_calls.items()}
        return {"total_calls": self.total_calls, "signatures": items, "view_calls": views}

    def merge(self, shipment: dict[str, Any]) -> None:
        """Add what a child process recorded: its calls count after this process's own.

        A signature the parent also has (same op and signature text) gains the
        child's calls and sites; the others become new signatures, within the
        capture budget.
        """
        by_text = {(str(e.func), entry_text(e)): e for e in self._entries.values()}
        base = self.total_calls
        for op, text, calls, phases, sites, dropped, first, snap, reason in shipment["signatures"]:
            entry = by_text.get((op, text))
            if entry is None:
                func = op_by_name(op)
                if func is None:
                    continue
                info = op_traits(func)
                entry = Entry(func, info.kind, ("child", op, text), base + first)
                entry.text = text
                entry.skip_reason = reason
                if snap is not None and reason is None:
                    if self._captures.admit(snap):
                        entry.snapshot = snap
                    else:
                        entry.skip_reason = "capture budget"
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
            func = op_by_name(name)
            if func is not None:
                info = op_traits(func)
                self._view_calls[info] = self._view_calls.get(info, 0) + n
        self.total_calls += shipment["total_calls"]

    # -- results ------------------------------------------------------------
    def _entries_in_order(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.first_call))

    def _keys_in_order(self) -> list[tuple[Any, Entry]]:
        return sorted(self._entries.items(), key=lambda ke: ke[1].first_call)

    def signatures(self) -> list[RecordedSignature]:
        """Every unique non-view signature, in order of first call."""
        out = []
        for e in self._entries_in_order():
            op = str(e.func)
            # Two ids can name equal sites (e.g. two code objects on one line): merge them.
            sites = dict.fromkeys(self.sites.site(i) for i in e.sites)
            text = entry_text(e)
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
        self._captures.release()


def _checked_calls(e: Entry) -> tuple[int, ...]:
    """The calls captured, first included, for a value-dependent signature called more than once."""
    if e.samples is None or e.snapshot is None or e.calls < 2:
        return ()
    return (1, *e.samples.calls())


def _device_of(e: Entry) -> str:
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
