"""The batch-invariance result: frozen records and their dict form (the report's ``batch_invariance`` section).

Pure data: built by :mod:`opaudit.flows.batchinv`, embedded in a
:class:`~opaudit.data.report.Report`, rendered by the formats. ``from_dict`` reads
it strictly (:mod:`opaudit.data.fields`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opaudit.data import fields
from opaudit.data.fields import ReportError, need, opt
from opaudit.data.site import Site, parse_site

BATCH_INVARIANT, BATCH_VARIANT, NOT_COMPARABLE = "batch_invariant", "batch_variant", "not_comparable"
OP_VERDICTS = (BATCH_VARIANT, BATCH_INVARIANT, NOT_COMPARABLE)
"""Per-op verdicts, worst first."""

OP_ROW_FIELDS = ("id", "op", "verdict", "variant_rows", "max_abs_diff", "calls", "first_call", "module",
                 "location", "function", "signature", "row_signatures", "reason", "remedy")
"""Column order of the CSV rows of a batch-invariance section."""


@dataclass(frozen=True)
class BatchOp:
    """The batch-invariance verdict on one op signature (its signature at the full batch)."""

    id: str
    op: str
    verdict: str
    """:data:`BATCH_INVARIANT`, :data:`BATCH_VARIANT` or :data:`NOT_COMPARABLE`."""
    signature: str
    """At the full batch."""
    row_signatures: tuple[tuple[int, str], ...] = ()
    """Row count → the signature of the same call at that many rows."""
    calls: int = 1
    sites: tuple[Site, ...] = ()
    first_call: int = 0
    """1-based position of the first call in the full run's execution order."""
    variant_rows: tuple[int, ...] = ()
    """Row counts whose output slices differed from the full batch's."""
    max_abs_diff: float | None = None
    reason: str = ""
    """Why the op is not comparable."""
    remedy: str = ""

    @property
    def site(self) -> Site | None:
        """The first site, or ``None``."""
        return self.sites[0] if self.sites else None


@dataclass(frozen=True)
class RowCheck:
    """The forward at ``rows`` rows against the first ``rows`` rows of the full batch."""

    rows: int
    invariant: bool
    """Every output's leading slice was bitwise identical."""
    ops: int = 0
    """Ops executed at this row count."""
    differing_ops: int = 0
    """Ops whose output slices differed."""
    root_cause: Mapping[str, Any] | None = None
    """First op whose input slices were identical, whose output slices were not, and whose result flows
    into the output (``reaches_output: false`` when none does through the recorded ops: then the first such op)."""
    path_split: Mapping[str, Any] | None = None
    """Where the two runs took different op sequences, if they did."""
    mismatches: tuple[str, ...] = ()
    """Outputs whose leading slice differed."""
    unreached: tuple[Mapping[str, Any], ...] = ()
    """Ops whose own output slices differed but whose results reach no compared output (a check of the
    whole batch that only feeds Python control flow, or nothing): not the root cause, in execution order."""


@dataclass(frozen=True)
class BatchInvariance:
    """Result of a batch-invariance check: one :class:`RowCheck` per row count, one :class:`BatchOp` per op."""

    batch_size: int
    """Rows in the full batch."""
    dim: int
    """The batch dim the batch was sliced along."""
    checks: tuple[RowCheck, ...]
    ops: tuple[BatchOp, ...] = ()
    """Worst first, then in execution order."""
    device: str = "cpu"

    @property
    def invariant(self) -> bool:
        """Every row count gave bitwise the leading rows of the full batch's outputs."""
        return all(c.invariant for c in self.checks)

    @property
    def rows(self) -> tuple[int, ...]:
        """The row counts checked."""
        return tuple(c.rows for c in self.checks)

    @property
    def root_cause(self) -> Mapping[str, Any] | None:
        """The root cause at the smallest row count that has one."""
        return next((c.root_cause for c in self.checks if c.root_cause), None)

    def variant_ops(self) -> list[BatchOp]:
        """Ops reported :data:`BATCH_VARIANT`."""
        return [o for o in self.ops if o.verdict == BATCH_VARIANT]

    def counts(self) -> dict[str, int]:
        """Op signatures per verdict (every verdict present)."""
        out = dict.fromkeys(OP_VERDICTS, 0)
        for o in self.ops:
            out[o.verdict] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain, ordered form (the report's ``batch_invariance`` section)."""
        return {
            "batch_size": self.batch_size,
            "dim": self.dim,
            "device": self.device,
            "invariant": self.invariant,
            "counts": self.counts(),
            "checks": [_check_dict(c) for c in self.checks],
            "ops": [op_dict(o) for o in self.ops],
        }


def _num(x: float | None) -> float | str | None:
    if x is None:
        return None
    if math.isinf(x):
        return "inf"
    return float(f"{x:.6g}")


def _check_dict(c: RowCheck) -> dict[str, Any]:
    d: dict[str, Any] = {"rows": c.rows, "invariant": c.invariant, "ops": c.ops, "differing_ops": c.differing_ops}
    if c.root_cause:
        d["root_cause"] = dict(c.root_cause)
    if c.path_split:
        d["path_split"] = dict(c.path_split)
    if c.mismatches:
        d["mismatches"] = list(c.mismatches)
    if c.unreached:
        d["unreached"] = [dict(u) for u in c.unreached]
    return d


def op_dict(o: BatchOp) -> dict[str, Any]:
    """Nested form of one op verdict."""
    d: dict[str, Any] = {
        "id": o.id, "op": o.op, "verdict": o.verdict, "calls": o.calls, "first_call": o.first_call,
        "signature": o.signature,
        "row_signatures": [{"rows": rows, "signature": sig} for rows, sig in o.row_signatures],
        "sites": [{"file": s.file, "line": s.line, "function": s.function, "module": s.module} for s in o.sites],
    }
    if o.variant_rows:
        d["variant_rows"] = list(o.variant_rows)
        d["max_abs_diff"] = _num(o.max_abs_diff)
    if o.reason:
        d["reason"] = o.reason
    if o.remedy:
        d["remedy"] = o.remedy
    return d


def op_row(o: BatchOp) -> dict[str, Any]:
    """A flat row (lists joined with ``;``) for CSV, columns :data:`OP_ROW_FIELDS`."""
    s = o.site
    return {
        "id": o.id, "op": o.op, "verdict": o.verdict, "variant_rows": ";".join(map(str, o.variant_rows)),
        "max_abs_diff": _num(o.max_abs_diff) if o.variant_rows else None, "calls": o.calls,
        "first_call": o.first_call, "module": s.module if s else "", "location": s.location if s else "",
        "function": s.function if s else "", "signature": o.signature,
        "row_signatures": ";".join(f"{rows}:{sig}" for rows, sig in o.row_signatures),
        "reason": o.reason, "remedy": o.remedy,
    }


# -- parsing (strict) -------------------------------------------------------------
def _op(d: Any, where: str) -> BatchOp:
    d = fields.mapping(d, where)
    sigs = []
    for i, r in enumerate(opt(d, "row_signatures", list, where, [])):
        w = f"{where}.row_signatures[{i}]"
        r = fields.mapping(r, w)
        sigs.append((need(r, "rows", int, w), need(r, "signature", str, w)))
    return BatchOp(
        id=need(d, "id", str, where), op=need(d, "op", str, where),
        verdict=fields.choice(d, "verdict", OP_VERDICTS, where),
        signature=need(d, "signature", str, where), row_signatures=tuple(sigs),
        calls=opt(d, "calls", int, where, 1), first_call=opt(d, "first_call", int, where, 0),
        sites=tuple(parse_site(s, f"{where}.sites") for s in opt(d, "sites", list, where, [])),
        variant_rows=fields.ints(d, "variant_rows", where), max_abs_diff=fields.number(d, "max_abs_diff", where),
        reason=opt(d, "reason", str, where, ""), remedy=opt(d, "remedy", str, where, ""),
    )


def _check(d: Any, where: str) -> RowCheck:
    d = fields.mapping(d, where)
    unreached = opt(d, "unreached", list, where, [])
    if not all(isinstance(x, Mapping) for x in unreached):
        raise ReportError(f"{where}: unreached must be a list of mappings")
    return RowCheck(
        rows=need(d, "rows", int, where), invariant=need(d, "invariant", bool, where),
        ops=opt(d, "ops", int, where, 0), differing_ops=opt(d, "differing_ops", int, where, 0),
        root_cause=opt(d, "root_cause", dict, where), path_split=opt(d, "path_split", dict, where),
        mismatches=fields.strings(d, "mismatches", where), unreached=tuple(dict(x) for x in unreached),
    )


def from_dict(d: Any, where: str = "batch_invariance") -> BatchInvariance:
    """A :class:`BatchInvariance` from its dict form; :class:`~opaudit.data.fields.ReportError` on any mismatch."""
    d = fields.mapping(d, where)
    result = BatchInvariance(
        batch_size=need(d, "batch_size", int, where), dim=need(d, "dim", int, where),
        device=opt(d, "device", str, where, "cpu"),
        checks=tuple(_check(c, f"{where}.checks[{i}]") for i, c in enumerate(need(d, "checks", list, where))),
        ops=tuple(_op(o, f"{where}.ops[{i}]") for i, o in enumerate(opt(d, "ops", list, where, []))),
    )
    if "invariant" in d and d["invariant"] != result.invariant:
        raise ReportError(f"{where}: 'invariant: {d['invariant']}' contradicts its checks (truncated or hand-edited?)")
    return result
