"""Diff two catalogs, or two reports: which ops changed verdict, and why they might have.

A diff lists verdict transitions (``stable->diverges`` on the new GPU,
``raises->stable`` after a torch upgrade), the ops present on one side only, and
the fingerprint and settings fields that differ, which usually explain the rest.
``--fail-on`` takes transition globs (``*->raises,*->diverges*``); an op present
on one side only counts as ``missing`` on the other (``missing->raises``).

A report and a catalog are never diffed against each other: a report holds one
model's signatures, a catalog every op on one machine. ``--against`` is the
tool for that question.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opaudit.data.catalog import Catalog, catalog_from_dict
from opaudit.data.diff import BATCH_FIELD, MISSING, VERDICT, Change, Diff, FieldChange
from opaudit.data.errors import OpauditError
from opaudit.data.fileio import shown_path
from opaudit.data.files import ReportError, read_document
from opaudit.data.findings import Finding
from opaudit.data.invariance import BATCH_INVARIANT, BATCH_VARIANT, NOT_COMPARABLE
from opaudit.data.report import Report, from_dict
from opaudit.data.verdict import Verdict

_BATCH_SEVERITY = {BATCH_INVARIANT: 0, NOT_COMPARABLE: 1, BATCH_VARIANT: 4}

DEFAULT_FAIL_ON = "*->raises,*->diverges,*->diverges_deterministic"
"""Transitions that make ``opaudit diff`` exit 1 unless ``--fail-on`` says otherwise."""

_KNOWN_FORMATS = ("opaudit-report", "opaudit-catalog")


class DiffError(OpauditError):
    """Two documents cannot be diffed (a report against a catalog), or a bad ``--fail-on``."""


# -- --fail-on -----------------------------------------------------------------
_SIDES = tuple(v.value for v in Verdict) + tuple(_BATCH_SEVERITY) + (MISSING,)


def parse_fail_on(text: str) -> tuple[tuple[str, str], ...]:
    """``*->raises,stable->diverges*`` → glob pairs; ``none`` → no rule.

    Each side is a glob over verdict names and ``missing``; a side that matches
    none of them is refused, so a typo cannot silently disable the check, and so is
    an empty list (an unset variable in a CI script).
    """
    if text.strip().lower() == "none":
        return ()
    if not text.replace(",", "").strip():
        raise DiffError("--fail-on is empty: 'none' never fails (an empty list is refused: an unset variable "
                        "would turn the gate off)")
    rules = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "->" not in part:
            raise DiffError(f"--fail-on {part!r}: expected FROM->TO, e.g. '*->raises' or 'stable->diverges*'")
        a, b = (s.strip() for s in part.split("->", 1))
        for side in (a, b):
            if not side or not any(fnmatch.fnmatchcase(v, side) for v in _SIDES):
                raise DiffError(f"--fail-on {part!r}: {side!r} matches no verdict "
                                f"(choose from {', '.join(_SIDES)}; globs allowed)")
        rules.append((a, b))
    return tuple(rules)


# -- loading -----------------------------------------------------------------------
def load_document(path: str) -> tuple[str, Any]:
    """``("report", Report)`` or ``("catalog", Catalog)`` from a file, by its ``format`` field."""
    data = read_document(path)
    fmt = data.get("format") if isinstance(data, Mapping) else None
    if fmt == "opaudit-catalog":
        return "catalog", catalog_from_dict(data, path)
    if fmt == "opaudit-report":
        return "report", from_dict(data, path)
    if not isinstance(data, Mapping):
        raise ReportError(f"{path}: not an opaudit file (expected a mapping at the top level)")
    raise ReportError(f"{path}: format is {fmt!r}, expected one of {', '.join(_KNOWN_FORMATS)}")


# -- diffing -------------------------------------------------------------------------
def _severity(v: str) -> int:
    if v == MISSING:
        return -1
    return _BATCH_SEVERITY[v] if v in _BATCH_SEVERITY else Verdict(v).severity


def _order(c: Change) -> tuple:
    return (-_severity(c.after), -_severity(c.before), c.op, c.detail)


def _fields(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[FieldChange, ...]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(FieldChange(k, a.get(k), b.get(k)))
    return tuple(out)


_DEVICE_SUFFIX = re.compile(r"@(?:cuda|cpu|mps|xpu|hip)(?::\d+)?")


def normalize_signature(signature: str) -> str:
    """A signature without device suffixes, so a CPU run and a CUDA run of one model line up."""
    return _DEVICE_SUFFIX.sub("", signature)


def diff_documents(a: Any, b: Any, a_label: str = "a", b_label: str = "b") -> Diff:
    """Diff two catalogs or two reports; :class:`DiffError` for a report against a catalog."""
    if isinstance(a, Catalog) and isinstance(b, Catalog):
        sides = [(_catalog_entries(a), _catalog_entries(b))]
        if a.batch_invariance and b.batch_invariance:
            # Only when both sweeps checked it: a catalog made without --batch-invariance says nothing about it.
            sides.append((_catalog_batch(a), _catalog_batch(b)))
        return _diff("catalog", a, b, a_label, b_label, sides)
    if isinstance(a, Report) and isinstance(b, Report):
        sides = [(_report_findings(a), _report_findings(b))]
        if a.batch_invariance is not None and b.batch_invariance is not None:
            # Both reports of a --batch-invariance check: their per-op verdicts too.
            sides.append((_report_batch(a), _report_batch(b)))
        return _diff("report", a, b, a_label, b_label, sides)
    kinds = {Catalog: "catalog", Report: "report"}
    ka, kb = kinds.get(type(a), type(a).__name__), kinds.get(type(b), type(b).__name__)
    if "catalog" in (ka, kb) and "report" in (ka, kb):
        raise DiffError(f"cannot diff a {ka} ({a_label}) against a {kb} ({b_label}): a report lists one "
                        "model's ops, a catalog every op on one machine; to predict a model on a catalog's "
                        "hardware run: opaudit MODEL.py --against CATALOG")
    raise DiffError(f"cannot diff {ka} against {kb}")


@dataclass(frozen=True)
class _Side:
    """One op's verdict in one document, keyed for the join: what a :class:`Change` shows of it."""

    op: str
    detail: str
    verdict: str
    where: str
    field: str = VERDICT


Keyed = dict[tuple[str, ...], _Side]


def _catalog_entries(catalog: Catalog) -> Keyed:
    return {e.key: _Side(e.op, f"{e.dtype} {e.variant}".strip(), e.verdict.value, e.source) for e in catalog.entries}


def _catalog_batch(catalog: Catalog) -> Keyed:
    return {e.key: _Side(e.op, f"{e.dtype} batch invariance", e.verdict, ", ".join(e.probes), BATCH_FIELD)
            for e in catalog.batch_invariance}


def _report_findings(report: Report) -> Keyed:
    """The worst finding per op and signature (device suffixes dropped: a CPU and a CUDA run line up)."""
    worst: dict[tuple[str, str], Finding] = {}
    for f in report.all_findings:
        key = (f.op, normalize_signature(f.signature))
        if key not in worst or f.verdict.severity > worst[key].verdict.severity:
            worst[key] = f
    return {k: _Side(k[0], k[1], f.verdict.value, f.locations[0] if f.locations else "") for k, f in worst.items()}


def _report_batch(report: Report) -> Keyed:
    out: Keyed = {}
    for o in report.batch_invariance.ops if report.batch_invariance is not None else ():
        sig = normalize_signature(o.signature)
        out[(o.op, sig)] = _Side(o.op, f"{sig} (batch invariance)", o.verdict, o.site.location if o.site else "",
                                 BATCH_FIELD)
    return out


@dataclass(frozen=True)
class _Joined:
    """One :func:`_join`'s result."""

    changes: tuple[Change, ...] = ()
    only_a: tuple[Change, ...] = ()
    only_b: tuple[Change, ...] = ()
    same: int = 0


def _join(a: Keyed, b: Keyed) -> _Joined:
    """The keyed outer join of two documents' verdicts: what changed, what one side lacks, how many stayed."""
    changes, only_a, only_b, same = [], [], [], 0
    for k in sorted(set(a) | set(b)):
        ea, eb = a.get(k), b.get(k)
        if ea is not None and eb is not None:
            if ea.verdict == eb.verdict:
                same += 1
            else:
                changes.append(Change(eb.op, eb.detail, ea.verdict, eb.verdict, eb.where or ea.where, eb.field))
        elif ea is not None:
            only_a.append(Change(ea.op, ea.detail, ea.verdict, MISSING, ea.where, ea.field))
        elif eb is not None:
            only_b.append(Change(eb.op, eb.detail, MISSING, eb.verdict, eb.where, eb.field))
    return _Joined(tuple(changes), tuple(only_a), tuple(only_b), same)


def _diff(kind: str, a: Catalog | Report, b: Catalog | Report, a_label: str, b_label: str,
          sides: list[tuple[Keyed, Keyed]]) -> Diff:
    joined = [_join(ia, ib) for ia, ib in sides]
    return Diff(kind, a_label, b_label, _sorted(c for j in joined for c in j.changes),
                _sorted(c for j in joined for c in j.only_a), _sorted(c for j in joined for c in j.only_b),
                _fields(a.environment, b.environment), _fields(a.settings, b.settings), sum(j.same for j in joined))


def _sorted(changes: Iterable[Change]) -> tuple[Change, ...]:
    return tuple(sorted(changes, key=_order))


def diff_files(path_a: str, path_b: str) -> Diff:
    """Load and diff two files (catalogs or reports); refuses mismatched kinds before anything else."""
    ka, da = load_document(path_a)
    kb, db = load_document(path_b)
    return diff_documents(da, db, shown_path(path_a), shown_path(path_b))
