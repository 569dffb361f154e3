"""Op-by-op pairing of two runs of one forward at different batch sizes.

A run at ``b`` rows is traced first: every op, its site (the recorder's own
:class:`~opaudit.engine.sites.SiteTracker`, through the recorder's dispatch mode) and
copies of its tensor inputs and outputs. The run at the full batch is then
traced against one or more such references: op ``i`` of the full run is paired
with op ``i`` of each reference, and every tensor pair is compared on its
**leading slice**: the two tensors differ in size along at most one dim (the
batch, or a dim that folds it in, like ``B*T`` rows after a reshape), and the
reference must equal the first rows of the full tensor along it, bit for bit.

Each pair becomes one :class:`Pairing`: inputs identical or not, outputs
identical or not (with the max |diff|), or why the pair cannot be compared.
Copies, comparisons and signatures run with the dispatch mode disabled, so the
tool never records itself.

The tracer also follows the data: every op's inputs are tied to the ops that
last wrote their storages, so :meth:`Tracer.reaching` says which ops' results
flow into a given tensor (the forward's output) and :meth:`Tracer.descendants`
which ops read what one op made. A value that leaves the recorded ops (a
``bool()`` or ``.item()`` used by Python control flow) does not carry data on.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from opaudit.aten.bitwise import difference, nested_leaves, same_bits
from opaudit.aten.ops import OpKind, op_kind, written_args
from opaudit.aten.signature import signature_text
from opaudit.engine.mode import Interception
from opaudit.engine.sites import SiteTracker

# Outcomes of one paired op.
SAME = "same"
"""Input slices identical, output slices identical."""
DIFFERS = "differs"
"""Input slices identical, output slices not: the op itself depends on the row count."""
MIXES = "mixes"
"""Input slices identical, an output without the batch dim differs: the op mixes rows of the batch."""
INPUTS_DIFFER = "inputs_differ"
"""An input slice already differed: whatever the outputs do, it says nothing of the op itself."""
NOT_COMPARED = "not_compared"
"""The pair cannot be compared; ``reason`` says why."""


class _Leaf(NamedTuple):
    """A tensor (copied) or a plain value from an op's arguments or results."""

    value: Any
    uninitialized: bool = False
    """Straight out of ``empty``: its bits say nothing until an op writes it."""


@dataclass(frozen=True)
class TracedOp:
    """One op of a reference run: its overload, site and copied tensors. ``ins``/``outs`` ``None`` for views."""

    func: Any
    where: tuple[int, int] | None
    signature: str
    ins: tuple[_Leaf, ...] | None
    outs: tuple[_Leaf, ...] | None


@dataclass(frozen=True)
class Pairing:
    """Op ``index`` of the full run against the same op of one reference run."""

    index: int
    """0-based position in execution order."""
    outcome: str
    """:data:`SAME`, :data:`DIFFERS`, :data:`MIXES`, :data:`INPUTS_DIFFER` or :data:`NOT_COMPARED`."""
    reason: str = ""
    max_abs_diff: float = 0.0
    reference_signature: str = ""
    carried: bool = False
    """Its output slices differed (whatever the cause)."""
    probe: str = ""
    """For :data:`INPUTS_DIFFER`: the op rerun on the leading slices of the full run's own inputs, compared with
    the full run's output slices (:data:`SAME` or :data:`DIFFERS`); ``""`` when not probed."""
    probe_diff: float = 0.0
    number: str = ""
    """For :data:`INPUTS_DIFFER`: the plain number argument that differed (``-124.1 (full batch) vs 6.7``), when
    every tensor input's rows were identical: a value the forward computed in Python (``.item()``) entered here."""


class Split(NamedTuple):
    """Where two runs' op sequences part: the full run's op position and both ops there."""

    index: int
    """0-based position in the full run (views included)."""
    full_op: str
    reference_op: str




@functools.cache
def _out_kwargs(func: Any) -> frozenset[str]:
    return frozenset(a.name for a in func._schema.arguments if getattr(a, "is_out", False))


def _inputs(func: Any, args: tuple, kwargs: dict | None) -> list:
    leaves = nested_leaves(args, [])
    if kwargs:
        outs = _out_kwargs(func)
        nested_leaves([v for k, v in kwargs.items() if k not in outs], leaves)
    return leaves


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    pos, kw = written_args(func)
    found: list[Any] = []
    for i, w in enumerate(pos):
        if w and i < len(args):
            nested_leaves(args[i], found)
    for k in kw:
        if k in kwargs:
            nested_leaves(kwargs[k], found)
    return [t for t in found if isinstance(t, torch.Tensor)]


def _outputs(func: Any, result: Any, args: tuple, kwargs: dict) -> list:
    leaves = nested_leaves(result, [])
    seen = {id(x) for x in leaves}
    return leaves + [t for t in _written(func, args, kwargs) if id(t) not in seen]


class Tracer:
    """Traces one run: ``with Tracer(root) as t: forward(batch)``; then ``t.ops``.

    With ``references`` (earlier traces of the same forward on fewer rows: their
    non-view ops, see :meth:`computed`), it keeps no copies and pairs every op
    with those runs instead: ``pairings[k]`` holds the pairings against
    ``references[k]``, and ``splits[k]`` where the two op sequences part
    (``None`` while they agree). View and metadata ops do no arithmetic and
    differ between batch sizes (an ``expand`` that one row does not need), so
    only the others are paired.
    """

    def __init__(self, root: str | None, references: tuple[tuple[TracedOp, ...], ...] = ()) -> None:
        self.sites = SiteTracker(root)
        self.references = references
        self.ops: list[TracedOp] = []
        """Every op in execution order; reference mode keeps copies of the tensors, comparing mode none."""
        self.pairings: list[list[Pairing]] = [[] for _ in references]
        self.splits: list[Split | None] = [None for _ in references]
        self._computed = 0
        self._uninitialized: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._copies: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.inputs_from: list[tuple[int, ...]] = []
        """Per op (views included): the ops that last wrote the storages its tensor inputs read."""
        self._writers: dict[int, tuple[StorageWeakRef, int]] = {}
        """Storage address → (a weak reference that keeps the address from being reused, last writer)."""
        self._bare_writers: WeakIdKeyDictionary = WeakIdKeyDictionary()
        """The same for tensors without a storage (sparse, nested), by the tensor itself."""
        self._number_writers: dict[float | complex, int] = {}
        """A float an op returned (``.item()``) → that op: the same number passed to a later op is its data."""
        self._interception = Interception(self._on_call, self.sites)

    def __enter__(self) -> Tracer:
        self._interception.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._interception.__exit__(*exc)
        finally:
            for k, ref in enumerate(self.references):
                if self.splits[k] is None and len(ref) > self._computed:
                    self.splits[k] = Split(len(self.ops), "<end of run>", str(ref[self._computed].func))

    def computed(self) -> tuple[TracedOp, ...]:
        """The ops that are not views, in order: what a later run is paired against."""
        return tuple(op for op in self.ops if op.where is not None)

    def site(self, i: int) -> Any:
        """The :class:`~opaudit.data.site.Site` of op ``i`` of this run, or ``None`` for a view op."""
        where = self.ops[i].where
        return None if where is None else self.sites.site(where[1])

    # -- hot path -----------------------------------------------------------
    def _on_call(self, func: Any, args: tuple, kwargs: dict | None) -> Callable[..., Any]:
        kind = op_kind(func)[0]
        if kind is OpKind.VIEW:
            with _disable_current_modes():
                sources = self._sources(_inputs(func, args, kwargs))
            return functools.partial(self._run_view, func, sources)
        where = self.sites.current()
        with _disable_current_modes(), torch.no_grad():
            sources = self._sources(_inputs(func, args, kwargs))
            # Comparing mode holds the full run's inputs as they are, except those the op
            # is about to overwrite.
            written = {id(t) for t in _written(func, args, kwargs or {})} if self.references else ()
            ins = tuple(self._leaf(x, copy=not self.references or id(x) in written)
                        for x in _inputs(func, args, kwargs))
        return functools.partial(self._run, func, kind, where, ins, sources)

    def _run_view(self, func: Any, sources: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        with _disable_current_modes():
            # Most views share their input's storage; those that do not (``resolve_conj`` of a
            # conjugate) still carry its data.
            self._wrote(len(self.ops), nested_leaves(result, []))
            self.ops.append(TracedOp(func, None, "", None, None))
            self.inputs_from.append(sources)
        return result

    def _run(self, func: Any, kind: OpKind, where: tuple[int, int], ins: tuple[_Leaf, ...],
             sources: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
        if kind is OpKind.RANDOM:
            # An op tagged random that draws nothing this call (attention or dropout at p=0)
            # is judged like any other.
            with _disable_current_modes():
                before = _rng_states(args, kwargs)
            result = func(*args, **kwargs)
            with _disable_current_modes():
                if all(torch.equal(a, b) for a, b in zip(before, _rng_states(args, kwargs), strict=True)):
                    kind = OpKind.COMPUTE
        else:
            result = func(*args, **kwargs)
        with _disable_current_modes(), torch.no_grad():
            written = _written(func, args, kwargs)
            for t in written:
                self._uninitialized.pop(t, None)
            outs: tuple[_Leaf, ...] | None = None
            if kind is OpKind.UNINITIALIZED:
                for t in nested_leaves(result, []):
                    if isinstance(t, torch.Tensor):
                        self._uninitialized[t] = True
            else:
                # A tensor the op wrote gets its version bumped only after this returns
                # (autograd's in-place layer sits above the dispatch mode): never reuse its copy.
                wrote = {id(t) for t in written}
                outs = tuple(self._leaf(x, copy=not self.references, fresh=id(x) in wrote)
                             for x in _outputs(func, result, args, kwargs))
            index, n = len(self.ops), self._computed
            self._wrote(index, _outputs(func, result, args, kwargs))
            self.ops.append(TracedOp(func, where, signature_text(args, kwargs), None if self.references else ins,
                                     None if self.references else outs))
            self.inputs_from.append(sources)
            self._computed += 1
            for k, ref in enumerate(self.references):
                if self.splits[k] is not None:
                    continue
                if n >= len(ref) or ref[n].func is not func:
                    self.splits[k] = Split(index, str(func), str(ref[n].func) if n < len(ref) else "<end of run>")
                    continue
                p = _pair(index, kind, ref[n], ins, outs)
                if p.outcome == INPUTS_DIFFER and kind is OpKind.COMPUTE and len(written) == 0:
                    p = _probe(p, func, ref[n], args, kwargs, outs)
                self.pairings[k].append(p)
        return result

    # -- data flow ----------------------------------------------------------
    def _writer(self, t: Any) -> int | None:
        if isinstance(t, (float, complex)):
            return self._number_writers.get(t)
        if not isinstance(t, torch.Tensor):
            return None
        try:
            entry = self._writers.get(t.untyped_storage()._cdata)
        except (RuntimeError, NotImplementedError):
            return self._bare_writers.get(t)
        return None if entry is None else entry[1]

    def _sources(self, leaves: list) -> tuple[int, ...]:
        found = {w for x in leaves if (w := self._writer(x)) is not None}
        return tuple(sorted(found))

    def _wrote(self, index: int, leaves: list) -> None:
        """Op ``index`` is now the last writer of every storage its results and written arguments use."""
        for x in leaves:
            if isinstance(x, (float, complex)):
                if x == x:  # not NaN
                    self._number_writers[x] = index
                continue
            if not isinstance(x, torch.Tensor):
                continue
            try:
                storage = x.untyped_storage()
            except (RuntimeError, NotImplementedError):
                self._bare_writers[x] = index
                continue
            known = self._writers.get(storage._cdata)
            self._writers[storage._cdata] = (known[0] if known is not None else StorageWeakRef(storage), index)

    def reaching(self, tensors: list) -> set[int]:
        """Indices of the ops whose results flow, through the recorded ops, into ``tensors``."""
        found: set[int] = set()
        with _disable_current_modes():
            todo = [w for x in tensors if isinstance(x, torch.Tensor) and (w := self._writer(x)) is not None]
        while todo:
            i = todo.pop()
            if i not in found:
                found.add(i)
                todo.extend(self.inputs_from[i])
        return found

    def descendants(self, index: int) -> set[int]:
        """Indices of the ops after ``index`` that read, directly or not, what op ``index`` made."""
        found = {index}
        for i in range(index + 1, len(self.inputs_from)):
            if any(j in found for j in self.inputs_from[i]):
                found.add(i)
        found.discard(index)
        return found

    def _leaf(self, x: Any, copy: bool, fresh: bool = False) -> _Leaf:
        if not isinstance(x, torch.Tensor):
            return _Leaf(x)
        if len(self._uninitialized) and x in self._uninitialized:
            return _Leaf(None, uninitialized=True)
        if not copy:
            return _Leaf(x)
        # One copy per tensor and version: weights are read by many ops and never change.
        if fresh:
            self._copies.pop(x, None)
            return _Leaf(x.detach().clone())
        if x.is_inference():  # no version counter to key a reuse on
            return _Leaf(x.detach().clone())
        known = self._copies.get(x)
        if known is not None and known[0] == x._version:
            return _Leaf(known[1])
        c = x.detach().clone()
        self._copies[x] = (x._version, c)
        return _Leaf(c)


# -- comparing one pair ----------------------------------------------------------
def _slice(ref: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor | None, int | None, str]:
    """The leading slice of ``full`` to compare with ``ref``, the dim it was cut along, or why none."""
    if ref.dtype != full.dtype:
        return None, None, f"dtypes differ ({ref.dtype} vs {full.dtype})"
    if ref.dim() != full.dim():
        return None, None, f"ranks differ ({ref.dim()} vs {full.dim()})"
    dims = [d for d in range(ref.dim()) if ref.shape[d] != full.shape[d]]
    if not dims:
        return full, None, ""
    if len(dims) > 1:
        return None, None, f"shapes differ in {len(dims)} dims ({list(ref.shape)} vs {list(full.shape)})"
    d = dims[0]
    if ref.shape[d] > full.shape[d]:
        return None, None, f"dim {d} is longer with fewer rows ({ref.shape[d]} vs {full.shape[d]})"
    return full.narrow(d, 0, ref.shape[d]), d, ""


def _pair(index: int, kind: OpKind, ref: TracedOp, ins: tuple[_Leaf, ...], outs: tuple[_Leaf, ...] | None) -> Pairing:
    sig = ref.signature
    if ref.ins is None or len(ref.ins) != len(ins):
        return Pairing(index, NOT_COMPARED, "arguments differ in structure", reference_signature=sig)
    batched_input, inputs_same, number = False, True, ""
    for r, f in zip(ref.ins, ins, strict=True):
        if r.uninitialized or f.uninitialized:
            continue
        rt, ft = isinstance(r.value, torch.Tensor), isinstance(f.value, torch.Tensor)
        if rt != ft:
            return Pairing(index, NOT_COMPARED, "arguments differ in structure", reference_signature=sig)
        if not rt:
            # Integers are sizes and follow the row count by design; a float is data (``x * s.item()``).
            if isinstance(r.value, (float, complex)) and isinstance(f.value, (float, complex)) and not number \
                    and r.value != f.value and r.value == r.value:
                number = f"{f.value!r} (full batch) vs {r.value!r}"
            continue
        part, dim, why = _slice(r.value, f.value)
        if part is None:
            return Pairing(index, NOT_COMPARED, f"input {why}", reference_signature=sig)
        batched_input = batched_input or dim is not None
        if inputs_same and not same_bits(r.value, part):
            inputs_same = False
    if kind is OpKind.UNINITIALIZED:
        return Pairing(index, NOT_COMPARED, "returns uninitialized memory", reference_signature=sig)
    if ref.outs is None or outs is None or len(ref.outs) != len(outs):
        return Pairing(index, NOT_COMPARED, "results differ in structure", reference_signature=sig)
    worst, mixes, differs = 0.0, False, False
    for r, f in zip(ref.outs, outs, strict=True):
        if not isinstance(r.value, torch.Tensor) or not isinstance(f.value, torch.Tensor):
            if not same_bits(r.value, f.value) and batched_input:
                mixes = True  # a plain value computed from the rows (``item()`` of a sum over the batch)
            continue
        part, dim, why = _slice(r.value, f.value)
        if part is None:
            return Pairing(index, NOT_COMPARED, f"output {why}", reference_signature=sig)
        if same_bits(r.value, part):
            continue
        if dim is None and batched_input:
            mixes = True
        else:
            differs = True
            worst = max(worst, difference(r.value, part.contiguous()).max_abs_diff)
    changed = mixes or differs
    if not inputs_same or number:
        return Pairing(index, INPUTS_DIFFER, "its inputs already differed", worst, sig, carried=changed,
                       number=number if inputs_same else "")
    if kind is OpKind.RANDOM:
        return Pairing(index, NOT_COMPARED, "draws from the RNG", worst, sig, carried=changed)
    if kind is OpKind.SIDE_EFFECT:
        return Pairing(index, NOT_COMPARED, "side effects", worst, sig, carried=changed)
    if differs:
        return Pairing(index, DIFFERS, "", worst, sig, carried=True)
    if mixes:
        return Pairing(index, MIXES, "its output has no batch dim: it reduces or mixes the rows of the batch",
                       worst, sig, carried=True)
    return Pairing(index, SAME, reference_signature=sig)


def _rng_states(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The CPU generator's state, and each CUDA device's the op's tensors are on."""
    states = [torch.get_rng_state()]
    cuda = sorted({t.device.index or 0 for t in nested_leaves([args, kwargs], [])
                   if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    states += [torch.cuda.get_rng_state(i) for i in cuda]
    return states


def _substitute(x: Any, values: list, pos: list[int]) -> Any:
    """``x`` with its leaves replaced, in :func:`_leaves` order, by ``values``."""
    if isinstance(x, (list, tuple)):
        return type(x)(_substitute(y, values, pos) for y in x)
    if isinstance(x, dict):
        return {k: _substitute(y, values, pos) for k, y in x.items()}
    v = values[pos[0]]
    pos[0] += 1
    return v


def _probe(p: Pairing, func: Any, ref: TracedOp, args: tuple, kwargs: dict, outs: tuple[_Leaf, ...] | None
           ) -> Pairing:
    """Rerun the op on the leading rows of the full run's own inputs, laid out like the reference's.

    An op downstream of a difference cannot be judged from the two runs; this
    judges it on inputs that are identical by construction.
    """
    if ref.ins is None or ref.outs is None or outs is None or _out_kwargs(func) & set(kwargs):
        return p
    full_leaves = _inputs(func, args, kwargs)
    if len(full_leaves) != len(ref.ins):
        return p
    cut = []
    for r, f in zip(ref.ins, full_leaves, strict=True):
        if isinstance(f, torch.Tensor) and isinstance(r.value, torch.Tensor):
            part, dim, _ = _slice(r.value, f)
            if part is None:
                return p
            if dim is not None:
                part = torch.empty_strided(r.value.shape, r.value.stride(), dtype=f.dtype,
                                           device=f.device).copy_(part)
            cut.append(part)
        else:
            cut.append(f)
    pos = [0]
    new_args = _substitute(args, cut, pos)
    new_kwargs = {k: (_substitute(v, cut, pos) if k not in _out_kwargs(func) else v) for k, v in kwargs.items()}
    try:
        result = func(*new_args, **new_kwargs)
    except Exception:  # a probe that cannot run leaves the op not comparable
        return p
    worst, differs = 0.0, False
    mine = nested_leaves(result, [])
    if len(mine) != len(outs):
        return p
    for a, f in zip(mine, outs, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(f.value, torch.Tensor):
            continue
        part, dim, _ = _slice(a, f.value)
        if part is None or (dim is None and a.shape != f.value.shape):
            return p
        if not same_bits(a, part):
            differs = True
            worst = max(worst, difference(a, part.contiguous()).max_abs_diff)
    return dataclasses.replace(p, probe=DIFFERS if differs else SAME, probe_diff=worst)
