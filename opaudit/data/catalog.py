"""The catalog document: entries, swept ops, batch-invariance entries, their dict form and strict load.

A catalog file carries ``format: opaudit-catalog`` and ``version: 2`` (version 1,
the same without the ``batch_invariance`` section, is read too); loading anything
else is refused. Pure data: the sweep that builds a catalog is
:mod:`opaudit.flows.catalog`; the renderers read these records only.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opaudit.data import fields
from opaudit.data.fields import ReportError, need, opt
from opaudit.data.files import check_environment, check_header, check_settings, read_document
from opaudit.data.invariance import OP_VERDICTS as BATCH_VERDICTS
from opaudit.data.verdict import Verdict, verdict_counts

FORMAT = "opaudit-catalog"


VERSION = 2
"""Version 2 added the optional ``batch_invariance`` section."""
READ_VERSIONS = (1, 2)


OPINFO, STRESS = "opinfo", "stress"


INPUT_KINDS = (OPINFO, STRESS)
"""Input kinds, in the order a tie between them is resolved (OpInfo's own samples first)."""


OK, PARTIAL, FAILED, TIMEOUT, CRASHED = "ok", "partial", "failed", "timeout", "crashed"
"""Status of one swept (OpInfo entry, dtype): every sample ran / the time limit cut it short /
no sample could run / the worker was killed at the hard limit / the worker died."""
STATUSES = (OK, PARTIAL, FAILED, TIMEOUT, CRASHED)


@dataclass(frozen=True)
class CatalogEntry:
    """The worst behaviour seen for one op overload, dtype and variant on this device."""

    op: str
    """Overload, e.g. ``aten.index_put_.default``."""
    dtype: str
    """``float32``...: the first floating tensor argument's dtype (see :func:`signature_dtype`)."""
    variant: str
    """Non-default bool and string arguments, e.g. ``accumulate=True``; empty for the default kernel."""
    verdict: Verdict
    input_kind: str
    """``opinfo`` or ``stress``: the input kind of the sample behind the verdict (OpInfo's if both showed it)."""
    phase: str
    """``forward``, ``backward`` or both, for the sample behind the verdict."""
    source: str
    """OpInfo or module entry whose sample gave the verdict, e.g. ``nn.functional.max_unpool2d``."""
    signature: str
    """Signature of that sample's call."""
    opinfo: Verdict | None = None
    """Worst verdict on OpInfo's samples (``None``: no OpInfo sample reached this op)."""
    stress: Verdict | None = None
    """Worst verdict on stress samples."""
    seen_in: int = 1
    """Swept entries (OpInfo entry or module, per dtype) whose samples ran this op."""
    alert: str | None = None
    """``no_deterministic_impl`` or ``cublas_workspace`` when deterministic mode raised."""
    error: str = ""
    """First line of the deterministic-mode error (``raises``) or why it was skipped."""
    warning: str = ""
    """First determinism warning under ``warn_only=True`` (``warns``)."""

    @property
    def key(self) -> tuple[str, str, str]:
        """``(op, dtype, variant)``: unique within a catalog."""
        return (self.op, self.dtype, self.variant)


@dataclass(frozen=True)
class SweptOp:
    """One OpInfo entry or module swept for one dtype, and how it went."""

    source: str
    dtype: str
    status: str
    """``ok``, ``partial``, ``failed``, ``timeout`` or ``crashed``."""
    samples: int = 0
    """OpInfo samples that ran."""
    stress_samples: int = 0
    """Stress samples that ran."""
    reason: str = ""
    """Why it is not ``ok``; for ``ok``, notes such as ``no stress input``."""

    @property
    def task_id(self) -> str:
        """``source:dtype``."""
        return f"{self.source}:{self.dtype}"


@dataclass(frozen=True)
class BatchEntry:
    """Whether one op gives a row the same bits whatever the number of rows around it (``--batch-invariance``)."""

    op: str
    dtype: str
    verdict: str
    """``batch_invariant``, ``batch_variant`` or ``not_comparable`` (see :mod:`opaudit.data.invariance`)."""
    probes: tuple[str, ...]
    """The probes (``linear``, ``softmax``...) that ran this op."""
    batch: int
    """Rows of the full input."""
    rows: tuple[int, ...]
    """Row counts compared with the full input's leading rows."""
    variant_rows: tuple[int, ...] = ()
    """Row counts that gave other bits (``batch_variant``)."""
    max_abs_diff: float | None = None
    signature: str = ""
    """At the full input, from the first probe that ran it."""
    reason: str = ""
    """Why it is ``not_comparable``."""

    @property
    def key(self) -> tuple[str, str]:
        """``(op, dtype)``: unique within a catalog's ``batch_invariance`` section."""
        return (self.op, self.dtype)


def batch_entry_dict(e: BatchEntry) -> dict[str, Any]:
    """Dict form of a batch-invariance entry; empty optional fields are left out."""
    d: dict[str, Any] = {"op": e.op, "dtype": e.dtype, "verdict": e.verdict, "probes": list(e.probes),
                         "batch": e.batch, "rows": list(e.rows), "variant_rows": list(e.variant_rows),
                         "max_abs_diff": e.max_abs_diff, "signature": e.signature, "reason": e.reason}
    return {k: v for k, v in d.items() if v not in (None, "", [])}


@dataclass(frozen=True)
class Catalog:
    """Every op's verdict on one device and software stack."""

    environment: Mapping[str, Any]
    """The fingerprint of the process that ran the ops (see :func:`opaudit.engine.environment.fingerprint`)."""
    settings: Mapping[str, Any]
    entries: tuple[CatalogEntry, ...]
    """Sorted by op, dtype and variant."""
    swept: tuple[SweptOp, ...] = ()
    """Every OpInfo entry or module swept, per dtype, sorted; a resumed sweep skips these."""
    complete: bool = True
    """False for the partial file of a sweep still running or interrupted."""
    batch_invariance: tuple[BatchEntry, ...] = ()
    """Per-op batch invariance (``opaudit catalog --batch-invariance``), sorted by op and dtype."""
    format: str = FORMAT
    version: int = VERSION

    @property
    def summary(self) -> dict[str, int]:
        """Entries per verdict (every verdict present), plus totals."""
        counts = verdict_counts(e.verdict for e in self.entries)
        counts["entries"] = len(self.entries)
        counts["ops"] = len({e.op for e in self.entries})
        counts["swept"] = len(self.swept)
        counts["not_swept"] = sum(1 for s in self.swept if s.status in (FAILED, TIMEOUT, CRASHED))
        return counts

    @property
    def selection(self) -> str:
        """What the sweep ran, in words, for every export: see :func:`selection`."""
        return selection(self.settings)

    @functools.cached_property
    def _index(self) -> dict[tuple[str, str, str], CatalogEntry]:
        return {e.key: e for e in self.entries}

    def get(self, op: str, dtype: str, variant: str = "") -> CatalogEntry | None:
        """The entry for exactly this key, or ``None``."""
        return self._index.get((op, dtype, variant))

    def variants(self, op: str, dtype: str) -> list[CatalogEntry]:
        """Every entry of ``op`` and ``dtype``, whatever its variant."""
        return [e for e in self.entries if e.op == op and e.dtype == dtype]

    def entries_with(self, *verdicts: Verdict | str) -> list[CatalogEntry]:
        """Entries whose verdict is one of ``verdicts``."""
        want = {Verdict(v) for v in verdicts}
        return [e for e in self.entries if e.verdict in want]

    def to_dict(self) -> dict[str, Any]:
        """Plain, ordered, serialisable form (the file schema)."""
        return {
            "format": self.format,
            "version": self.version,
            "complete": self.complete,
            "environment": dict(sorted(self.environment.items())),
            "settings": dict(sorted(self.settings.items())),
            "summary": self.summary,
            "swept": [swept_dict(s) for s in self.swept],
            "entries": [entry_dict(e) for e in self.entries],
        } | ({"batch_invariance": [batch_entry_dict(e) for e in self.batch_invariance]}
             if self.batch_invariance else {})


ALL_DTYPES = "all"
"""``--dtypes all``: every dtype each op supports on the device (OpInfo's ``supported_dtypes``)."""


def selection(settings: Mapping[str, Any]) -> str:
    """Which ops and dtypes a sweep with these ``settings`` ran, in words.

    ``every op in PyTorch's OpInfo test database (plus the torch.nn modules it
    does not cover), in float32``, or, for a subset, ``only the ops --ops
    index_put,put selects, in float32``: an export must not claim more than was swept.
    """
    ops = [str(o) for o in settings.get("ops") or ["*"]]
    if ops == ["*"]:
        what = "every op in PyTorch's OpInfo test database"
        if settings.get("modules"):
            what += " (plus the torch.nn modules it does not cover)"
    else:
        what = f"only the ops --ops {','.join(ops)} selects"
    dtypes = [str(d) for d in settings.get("dtypes") or []]
    if dtypes == [ALL_DTYPES]:
        return f"{what}, in every dtype each op supports on the device"
    return f"{what}, in {', '.join(dtypes) or 'no dtype'}"


def entry_dict(e: CatalogEntry) -> dict[str, Any]:
    """Dict form of an entry; empty optional fields are left out."""
    d: dict[str, Any] = {
        "op": e.op, "dtype": e.dtype, "variant": e.variant, "verdict": e.verdict.value,
        "input_kind": e.input_kind, "phase": e.phase, "source": e.source, "signature": e.signature,
        "opinfo": e.opinfo.value if e.opinfo else None, "stress": e.stress.value if e.stress else None,
        "seen_in": e.seen_in, "alert": e.alert, "error": e.error, "warning": e.warning,
    }
    return {k: v for k, v in d.items() if v not in (None, "") or k == "variant"}


def swept_dict(s: SweptOp) -> dict[str, Any]:
    """Dict form of a swept op; an empty reason is left out."""
    d: dict[str, Any] = {"source": s.source, "dtype": s.dtype, "status": s.status,
                         "samples": s.samples, "stress_samples": s.stress_samples}
    if s.reason:
        d["reason"] = s.reason
    return d


def parse_entry(d: Any, where: str) -> CatalogEntry:
    """A :class:`CatalogEntry` from its dict form, checking every field."""
    d = fields.mapping(d, where, "an entry")
    opinfo, stress = fields.opt(d, "opinfo", str, where), fields.opt(d, "stress", str, where)
    return CatalogEntry(
        op=need(d, "op", str, where), dtype=need(d, "dtype", str, where), variant=opt(d, "variant", str, where, ""),
        verdict=fields.verdict(need(d, "verdict", str, where), where),
        input_kind=fields.choice(d, "input_kind", INPUT_KINDS, where), phase=opt(d, "phase", str, where, ""),
        source=opt(d, "source", str, where, ""), signature=opt(d, "signature", str, where, ""),
        opinfo=fields.verdict(opinfo, where) if opinfo is not None else None,
        stress=fields.verdict(stress, where) if stress is not None else None,
        seen_in=opt(d, "seen_in", int, where, 1), alert=opt(d, "alert", str, where),
        error=opt(d, "error", str, where, ""), warning=opt(d, "warning", str, where, ""),
    )


def parse_swept(d: Any, where: str) -> SweptOp:
    """A :class:`SweptOp` from its dict form."""
    d = fields.mapping(d, where, "a swept op")
    return SweptOp(source=need(d, "source", str, where), dtype=need(d, "dtype", str, where),
                   status=fields.choice(d, "status", STATUSES, where), samples=opt(d, "samples", int, where, 0),
                   stress_samples=opt(d, "stress_samples", int, where, 0), reason=opt(d, "reason", str, where, ""))


def parse_batch_entry(d: Any, where: str) -> BatchEntry:
    """A :class:`BatchEntry` from its dict form."""
    d = fields.mapping(d, where, "a batch-invariance entry")
    return BatchEntry(op=need(d, "op", str, where), dtype=need(d, "dtype", str, where),
                      verdict=fields.choice(d, "verdict", BATCH_VERDICTS, where),
                      probes=fields.strings(d, "probes", where), batch=need(d, "batch", int, where),
                      rows=fields.ints(d, "rows", where), variant_rows=fields.ints(d, "variant_rows", where),
                      max_abs_diff=fields.number(d, "max_abs_diff", where),
                      signature=opt(d, "signature", str, where, ""), reason=opt(d, "reason", str, where, ""))


def catalog_from_dict(data: Any, path: str = "<catalog>") -> Catalog:
    """A :class:`Catalog` from its dict form; :class:`~opaudit.data.fields.ReportError` on any mismatch."""
    data = check_header(data, FORMAT, READ_VERSIONS, path)
    batch = tuple(parse_batch_entry(e, f"{path}: batch_invariance[{i}]")
                  for i, e in enumerate(opt(data, "batch_invariance", list, path, [])))
    if batch and data["version"] < 2:
        raise ReportError(f"{path}: a version 1 catalog cannot hold a batch_invariance section")
    if len({e.key for e in batch}) != len(batch):
        raise ReportError(f"{path}: an op and dtype appear twice in batch_invariance (hand-edited?)")
    entries = tuple(parse_entry(e, f"{path}: entries[{i}]") for i, e in enumerate(need(data, "entries", list, path)))
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ReportError(f"{path}: entry {'/'.join(x for x in dup if x)} appears twice (hand-edited?)")
    swept = tuple(parse_swept(s, f"{path}: swept[{i}]") for i, s in enumerate(opt(data, "swept", list, path, [])))
    return Catalog(
        environment=check_environment(need(data, "environment", dict, path), path),
        settings=check_settings(need(data, "settings", dict, path), path),
        entries=tuple(sorted(entries, key=lambda e: e.key)), swept=tuple(sorted(swept, key=swept_order)),
        complete=opt(data, "complete", bool, path, True), batch_invariance=tuple(sorted(batch, key=lambda e: e.key)),
    )


def load_catalog(path: str) -> Catalog:
    """Load a catalog file (YAML or JSON); refuses other formats, versions and unsafe YAML."""
    return catalog_from_dict(read_document(path), path)


def swept_order(s: SweptOp) -> tuple[str, str]:
    """Sort key of swept ops: source, then dtype."""
    return (s.source, s.dtype)
