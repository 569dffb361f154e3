"""Batch invariance: does a request's output depend on who else is in its batch?

The forward runs on the first ``b`` rows of a batch, for each requested ``b``,
and on the whole batch; each output's first ``b`` rows must match the small
run's bit for bit. Both runs are traced op by op (:mod:`opaudit.engine.batchtrace`),
so when they do not match the check names the **root cause**: the first op
whose input slices were identical, whose output slices were not, and whose
result flows (through the recorded ops) into the output, with its module, the
user's ``file:line``, the max |diff| and how many ops that read its result
carried the difference. An op that differed but whose result reaches no output
(a "is the mask all ones?" sum over the whole batch, read by Python control
flow) is listed apart, as ``unreached``. Every op signature gets a verdict (``batch_invariant``,
``batch_variant`` with the row counts that broke it, or ``not_comparable`` with
the reason) and, when variant, a remedy from the knowledge base.

Global torch state (determinism flags, grad mode, threads, RNG) is restored
afterwards; each run starts from the same seed. The forward runs under
``torch.no_grad()``, as serving does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from opaudit.aten.bitwise import difference, same_bits
from opaudit.aten.signature import signature_id
from opaudit.data.errors import OpauditError
from opaudit.data.invariance import (
    BATCH_INVARIANT,
    BATCH_VARIANT,
    NOT_COMPARABLE,
    OP_VERDICTS,
    BatchInvariance,
    BatchOp,
    RowCheck,
)
from opaudit.data.site import Site
from opaudit.engine.batchtrace import DIFFERS, INPUTS_DIFFER, MIXES, NOT_COMPARED, SAME, Pairing, Split, Tracer
from opaudit.engine.globalstate import preserved_state
from opaudit.engine.record import MAX_SITES

DEFAULT_ROWS = (1, 2, 3)
"""Row counts checked by default."""

_AFTER_SPLIT = "after the runs' op sequences parted"


class BatchInvarianceError(OpauditError):
    """The check cannot run: bad row counts, batch dim, batch, or an output without the batch dim."""


# -- the batch -------------------------------------------------------------------
def _batch_rows(batch: Any, dim: int) -> int:
    """Rows of the batch along ``dim``; every tensor in it must agree."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
        raise BatchInvarianceError(f"the batch dim must be a non-negative integer, got {dim!r}")
    leaves = tree_flatten(batch)[0]
    tensors = [(i, t) for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise BatchInvarianceError(f"the batch holds no tensor (got {type(batch).__name__})")
    rows = None
    for i, t in tensors:
        name = "the batch" if len(leaves) == 1 else f"batch tensor [{i}]"
        if dim >= t.dim():
            raise BatchInvarianceError(f"batch dim {dim} is past the rank of {name} (shape {list(t.shape)})")
        if rows is None:
            rows = t.shape[dim]
        elif t.shape[dim] != rows:
            raise BatchInvarianceError(f"{name} has {t.shape[dim]} rows along dim {dim}, the first tensor {rows}")
    assert rows is not None
    return rows


def _check_rows(sizes: Iterable[int], batch_rows: int) -> tuple[int, ...]:
    sizes = list(sizes)
    if not sizes:
        raise BatchInvarianceError("no row counts to check")
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, int):
            raise BatchInvarianceError(f"a row count must be an integer, got {b!r}")
        if b < 1:
            raise BatchInvarianceError(f"row count {b} selects no row: row counts start at 1")
        if b >= batch_rows:
            raise BatchInvarianceError(f"row count {b} is not smaller than the batch ({batch_rows} rows): "
                                       "nothing to compare it with")
    return tuple(sorted(set(sizes)))


def _head(batch: Any, dim: int, rows: int) -> Any:
    """The first ``rows`` rows of every tensor of the batch, as fresh contiguous tensors."""
    leaves, spec = tree_flatten(batch)
    cut = [x.narrow(dim, 0, rows).clone(memory_format=torch.contiguous_format) if isinstance(x, torch.Tensor) else x
           for x in leaves]
    return tree_unflatten(cut, spec)


def _outputs(out: Any, dim: int, rows: int) -> list[Any]:
    """The output's leaves, copied; each tensor must carry the batch dim with ``rows`` rows."""
    leaves = tree_flatten(out)[0]
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if not tensors:
        raise BatchInvarianceError(f"the forward's output holds no tensor (got {type(out).__name__})")
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor) and (x.dim() <= dim or x.shape[dim] != rows):
            name = "the forward's output" if len(leaves) == 1 else f"the forward's output [{i}]"
            raise BatchInvarianceError(f"{name} has no batch dim: shape {list(x.shape)} from a batch of {rows} "
                                       f"rows (expected {rows} along dim {dim})")
    return [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves]


def _mismatches(small: list[Any], full: list[Any], dim: int, rows: int) -> tuple[tuple[int, str], ...]:
    """``(leaf index, description)`` of each output leaf whose leading rows differ; index ``-1`` for the whole."""
    if len(small) != len(full):
        return ((-1, f"the output has {len(small)} leaves at {rows} rows and {len(full)} at the full batch"),)
    out = []
    for i, (a, b) in enumerate(zip(small, full, strict=True)):
        name = "output" if len(full) == 1 else f"output [{i}]"
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            part = b.narrow(dim, 0, rows)
            if not same_bits(a, part):
                d = difference(a, part.contiguous())
                out.append((i, f"{name} ({d.elements_differing} of {d.elements} elements, "
                               f"max |diff| {d.max_abs_diff:.3g})"))
        elif not same_bits(a, b):
            out.append((i, f"{name} ({a!r} vs {b!r})"))
    return tuple(out)


# -- one row count ----------------------------------------------------------------
def _op_fields(full: Tracer, i: int) -> dict[str, Any]:
    op = full.ops[i]
    fields: dict[str, Any] = {"index": i + 1, "op": str(op.func)}
    site = full.site(i)
    if site is not None:
        fields.update(where=site.location, function=site.function, module=site.module)
    return fields


def _row_check(rows: int, full: Tracer, ref_len: int, pairings: list[Pairing], split: Split | None,
               mismatches: tuple[tuple[int, str], ...], reaching: list[set[int]]) -> RowCheck:
    """One row count's result. ``reaching[i]``: the ops whose results flow into output leaf ``i``.

    The root cause is the first op that changed the rows itself and whose result
    flows into an output that differed (into any output when none did); the ops
    that changed the rows but whose results reach no output (a mask check feeding
    Python control flow) are listed apart.
    """
    carried = [p for p in pairings if p.carried]
    # Where a difference starts: an op that changed the rows itself, or the first op a number computed
    # in Python from the batch entered (``x * s.item()``, ``x * (1.0 / len(x))``).
    changed = [p for p in pairings if p.outcome in (DIFFERS, MIXES) or p.number]
    leaves = {i for i, _ in mismatches}
    targets = set().union(*(r for i, r in enumerate(reaching) if i in leaves or -1 in leaves or not leaves))
    root = next((p for p in changed if p.index in targets), None)
    fallback = root is None and bool(mismatches) and bool(changed)
    if fallback:
        root = changed[0]  # its result reaches the output only through a Python value (``.item()``)
    root_cause = None
    if root is not None:
        after = full.descendants(root.index)
        root_cause = {**_op_fields(full, root.index), "signature": full.ops[root.index].signature,
                      "row_signature": root.reference_signature, "inputs_identical": not root.number,
                      "max_abs_diff": float(f"{root.max_abs_diff:.6g}"),
                      "downstream": sum(1 for p in carried if p.index in after)}
        if root.outcome == MIXES:
            root_cause["reason"] = root.reason
        elif root.number:
            root_cause["reason"] = f"its tensor inputs' rows were identical, a number passed to it was not: {root.number}"
        if fallback:
            root_cause["reaches_output"] = False
    unreached = []
    for p in changed:
        if p is not root and p.index not in targets:
            entry = {**_op_fields(full, p.index), "max_abs_diff": float(f"{p.max_abs_diff:.6g}")}
            if p.outcome == MIXES:
                entry["reason"] = p.reason
            elif p.number:
                entry["reason"] = f"a number passed to it differed: {p.number}"
            unreached.append(entry)
    path_split = None
    if split is not None:
        path_split = {"index": split.index + 1, "full_batch_op": split.full_op, "row_op": split.reference_op}
        if split.index < len(full.ops) and full.site(split.index) is not None:
            path_split["where"] = full.site(split.index).location
    return RowCheck(rows=rows, invariant=not mismatches, ops=ref_len,
                    differing_ops=len(carried), root_cause=root_cause, path_split=path_split,
                    mismatches=tuple(m for _, m in mismatches), unreached=tuple(unreached))


# -- per-op verdicts --------------------------------------------------------------
class _OpTally:
    """Observations of one op signature (at the full batch) over every call and row count."""

    def __init__(self, op: str, signature: str, first_call: int) -> None:
        self.op, self.signature, self.first_call = op, signature, first_call
        self.calls = 0
        self.sites: dict[Site, None] = {}
        self.row_signatures: dict[int, str] = {}
        self.variant_rows: set[int] = set()
        self.max_abs_diff = 0.0
        self.invariant = False
        self.reasons: dict[str, None] = {}

    def observe(self, rows: int, p: Pairing) -> None:
        if p.reference_signature:
            self.row_signatures.setdefault(rows, p.reference_signature)
        if p.outcome == DIFFERS:
            self.variant_rows.add(rows)
            self.max_abs_diff = max(self.max_abs_diff, p.max_abs_diff)
        elif p.outcome == SAME:
            self.invariant = True
        elif p.probe == DIFFERS:
            self.variant_rows.add(rows)
            self.max_abs_diff = max(self.max_abs_diff, p.probe_diff)
        elif p.probe == SAME:
            self.invariant = True
        elif p.outcome in (MIXES, INPUTS_DIFFER, NOT_COMPARED):
            self.reasons.setdefault(p.reason or p.outcome, None)

    def result(self, remedy: Callable[[str], str]) -> BatchOp:
        if self.variant_rows:
            verdict, reason = BATCH_VARIANT, ""
        elif self.invariant:
            verdict, reason = BATCH_INVARIANT, ""
        else:
            verdict, reason = NOT_COMPARABLE, "; ".join(self.reasons) or _AFTER_SPLIT
        return BatchOp(
            id=signature_id(self.op, self.signature), op=self.op, verdict=verdict, signature=self.signature,
            row_signatures=tuple(sorted(self.row_signatures.items())), calls=self.calls,
            sites=tuple(self.sites), first_call=self.first_call, variant_rows=tuple(sorted(self.variant_rows)),
            max_abs_diff=float(f"{self.max_abs_diff:.6g}") if self.variant_rows else None, reason=reason,
            remedy=remedy(self.op) if verdict == BATCH_VARIANT else "",
        )


def _op_verdicts(full: Tracer, per_rows: list[tuple[int, list[Pairing]]], remedy: Callable[[str], str]
                 ) -> tuple[BatchOp, ...]:
    tallies: dict[tuple[str, str], _OpTally] = {}
    by_index: dict[int, _OpTally] = {}
    for i, op in enumerate(full.ops):
        if op.where is None:
            continue  # view and metadata ops: no arithmetic, nothing to judge
        key = (str(op.func), op.signature)
        t = tallies.get(key)
        if t is None:
            t = tallies[key] = _OpTally(key[0], op.signature, i + 1)
        t.calls += 1
        site = full.site(i)
        if site is not None and (site in t.sites or len(t.sites) < MAX_SITES):
            t.sites[site] = None
        by_index[i] = t
    for rows, pairings in per_rows:
        for p in pairings:
            if p.index in by_index:
                by_index[p.index].observe(rows, p)
    order = {v: k for k, v in enumerate(OP_VERDICTS)}
    ops = [t.result(remedy) for t in tallies.values()]
    return tuple(sorted(ops, key=lambda o: (order[o.verdict], o.first_call)))


# -- public -----------------------------------------------------------------------
def batch_invariance(
    forward: Callable[[Any], Any],
    batch: Any,
    sizes: Iterable[int] = DEFAULT_ROWS,
    dim: int = 0,
    *,
    seed: int | None = 0,
    root: str | None = None,
    remedies: bool = True,
) -> BatchInvariance:
    """Run ``forward`` on the first ``b`` rows of ``batch`` for each ``b`` in ``sizes`` and on the whole batch.

    ``batch`` is a tensor or a tuple/list/dict of tensors, sliced along ``dim``;
    every tensor of the forward's output must carry that dim. Returns a
    :class:`~opaudit.data.invariance.BatchInvariance`: per row count, whether every
    output's leading rows were bitwise identical and the root-cause op if not,
    plus a verdict per op signature. ``root`` is the folder source sites are
    reported relative to. Raises :class:`BatchInvarianceError` on bad input;
    whatever ``forward`` raises propagates.
    """
    full_rows = _batch_rows(batch, dim)
    if full_rows < 2:
        raise BatchInvarianceError(f"the batch has {full_rows} row(s) along dim {dim}: nothing to compare")
    rows_list = _check_rows(sizes, full_rows)
    device = str(next(x for x in tree_flatten(batch)[0] if isinstance(x, torch.Tensor)).device)
    remedy = _remedy_lookup(device) if remedies else (lambda op: "")
    with preserved_state(), torch.no_grad():
        refs, small_outputs, small_ops = [], [], []
        for rows in rows_list:
            head = _head(batch, dim, rows)
            if seed is not None:
                torch.manual_seed(seed)
            with Tracer(root) as tracer:
                out = forward(head)
            small_outputs.append(_outputs(out, dim, rows))
            refs.append(tracer.computed())
            small_ops.append(len(tracer.ops))
            del out, head, tracer
        if seed is not None:
            torch.manual_seed(seed)
        with Tracer(root, tuple(refs)) as full:
            out = forward(batch)
        full_outputs = _outputs(out, dim, full_rows)
        reaching = [full.reaching([x]) for x in tree_flatten(out)[0]]
        del out
    checks, per_rows = [], []
    for k, rows in enumerate(rows_list):
        mismatches = _mismatches(small_outputs[k], full_outputs, dim, rows)
        checks.append(_row_check(rows, full, small_ops[k], full.pairings[k], full.splits[k], mismatches, reaching))
        per_rows.append((rows, full.pairings[k]))
    return BatchInvariance(batch_size=full_rows, dim=dim, checks=tuple(checks),
                           ops=_op_verdicts(full, per_rows, remedy), device=device)


BATCH_FUNCTION, FORWARD_FUNCTION = "opaudit_batch", "opaudit_forward"
"""What a script checked with ``--batch-invariance`` defines: the example batch, and the forward on a batch."""


def check_script(target: Any, sizes: Iterable[int] = DEFAULT_ROWS, dim: int = 0, *, seed: int | None = 0
                 ) -> BatchInvariance:
    """:func:`batch_invariance` of a script's ``opaudit_forward(opaudit_batch())``.

    ``target`` is a :class:`~opaudit.engine.loader.Target`; the script is imported (not
    run as ``__main__``). Its failures raise the loader's errors.
    """
    from opaudit.engine import loader

    loader.require_functions(target, (BATCH_FUNCTION, FORWARD_FUNCTION), "--batch-invariance")
    target = dataclasses.replace(target, entry=FORWARD_FUNCTION)
    with loader.sandboxed(target):
        prepared = loader.prepare(target, seed)
        make_batch = prepared.namespace.get(BATCH_FUNCTION)
        if not callable(make_batch):
            raise loader.ModelLoadError(f"{target.name}: {BATCH_FUNCTION!r} is not a function")
        forward = prepared.call
        batch = loader.call_user(make_batch)
        return batch_invariance(lambda b: loader.call_user(lambda: forward(b)), batch, sizes, dim, seed=seed,
                                root=target.root)


def batch_report(result: BatchInvariance, settings: dict[str, Any] | None = None) -> Any:
    """A :class:`~opaudit.data.report.Report` holding ``result`` as its ``batch_invariance`` section."""
    from opaudit.data.report import Report
    from opaudit.engine.environment import environment_warnings, fingerprint

    all_settings = {"batch_invariance": True, "batch_rows": list(result.rows), "batch_dim": result.dim}
    all_settings.update(settings or {})
    return Report(environment=fingerprint(result.device), settings=all_settings, all_findings=(),
                  env_warnings=tuple(environment_warnings({result.device}, 0, None)), batch_invariance=result)


def _remedy_lookup(device: str) -> Callable[[str], str]:
    from opaudit.engine.remedies import KnowledgeBase

    kb = KnowledgeBase.load_default()
    cache: dict[str, str] = {}

    def remedy(op: str) -> str:
        if op not in cache:
            cache[op] = kb.batch_remedy(op, device)
        return cache[op]

    return remedy
