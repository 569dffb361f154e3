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

import dataclasses
import fnmatch
import re
from collections.abc import Mapping
from typing import Any

from opaudit.data.catalog import Catalog, catalog_from_dict
from opaudit.data.diff import BATCH_FIELD, MISSING, Change, Diff, FieldChange
from opaudit.data.errors import OpauditError
from opaudit.data.files import ReportError, read_document
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
    """``*->raises,stable->diverges*`` → glob pairs; ``none`` or empty → no rule.

    Each side is a glob over verdict names and ``missing``; a side that matches
    none of them is refused, so a typo cannot silently disable the check.
    """
    if text.strip().lower() in ("", "none"):
        return ()
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
        return _diff_catalogs(a, b, a_label, b_label)
    if isinstance(a, Report) and isinstance(b, Report):
        return _diff_reports(a, b, a_label, b_label)
    kinds = {Catalog: "catalog", Report: "report"}
    ka, kb = kinds.get(type(a), type(a).__name__), kinds.get(type(b), type(b).__name__)
    if "catalog" in (ka, kb) and "report" in (ka, kb):
        raise DiffError(f"cannot diff a {ka} ({a_label}) against a {kb} ({b_label}): a report lists one "
                        "model's ops, a catalog every op on one machine; to predict a model on a catalog's "
                        "hardware run: opaudit MODEL.py --against CATALOG")
    raise DiffError(f"cannot diff {ka} against {kb}")


def _diff_catalogs(a: Any, b: Any, a_label: str, b_label: str) -> Diff:
    def detail(e: Any) -> str:
        return f"{e.dtype} {e.variant}".strip()

    ia, ib = {e.key: e for e in a.entries}, {e.key: e for e in b.entries}
    changes, only_a, only_b, same = [], [], [], 0
    for k in sorted(set(ia) | set(ib)):
        ea, eb = ia.get(k), ib.get(k)
        if ea is not None and eb is not None:
            if ea.verdict is eb.verdict:
                same += 1
            else:
                changes.append(Change(ea.op, detail(ea), ea.verdict.value, eb.verdict.value, eb.source))
        elif ea is not None:
            only_a.append(Change(ea.op, detail(ea), ea.verdict.value, MISSING, ea.source))
        elif eb is not None:
            only_b.append(Change(eb.op, detail(eb), MISSING, eb.verdict.value, eb.source))
    if a.batch_invariance and b.batch_invariance:
        # Only when both sweeps checked it: a catalog made without --batch-invariance says nothing about it.
        same += _diff_batch(_catalog_batch(a), _catalog_batch(b), changes, only_a, only_b)
    return Diff("catalog", a_label, b_label, tuple(sorted(changes, key=_order)), tuple(sorted(only_a, key=_order)),
                tuple(sorted(only_b, key=_order)), _fields(a.environment, b.environment),
                _fields(a.settings, b.settings), same)


@dataclasses.dataclass(frozen=True)
class _BatchVerdict:
    """One op's batch-invariance verdict, from a catalog entry or a report's op, ready to diff."""

    key: tuple[str, str]
    op: str
    verdict: str
    detail: str
    where: str


def _catalog_batch(catalog: Any) -> list[_BatchVerdict]:
    return [_BatchVerdict(e.key, e.op, e.verdict, f"{e.dtype} batch invariance", ", ".join(e.probes))
            for e in catalog.batch_invariance]


def _report_batch(report: Any) -> list[_BatchVerdict]:
    out = []
    for o in report.batch_invariance.ops:
        sig = normalize_signature(o.signature)
        out.append(_BatchVerdict((o.op, sig), o.op, o.verdict, f"{sig} (batch invariance)",
                                 o.site.location if o.site else ""))
    return out


def _diff_batch(a: list[_BatchVerdict], b: list[_BatchVerdict], changes: list[Change], only_a: list[Change],
                only_b: list[Change]) -> int:
    """Batch-invariance transitions between two documents' sections; returns how many stayed the same."""
    ia, ib = {e.key: e for e in a}, {e.key: e for e in b}
    same = 0
    for k in sorted(set(ia) | set(ib)):
        ea, eb = ia.get(k), ib.get(k)
        if ea is not None and eb is not None:
            if ea.verdict == eb.verdict:
                same += 1
            else:
                changes.append(Change(eb.op, eb.detail, ea.verdict, eb.verdict, eb.where, BATCH_FIELD))
        elif ea is not None:
            only_a.append(Change(ea.op, ea.detail, ea.verdict, MISSING, ea.where, BATCH_FIELD))
        elif eb is not None:
            only_b.append(Change(eb.op, eb.detail, MISSING, eb.verdict, eb.where, BATCH_FIELD))
    return same


def _diff_reports(a: Any, b: Any, a_label: str, b_label: str) -> Diff:
    def index(report: Any) -> dict[tuple[str, str], Any]:
        out: dict[tuple[str, str], Any] = {}
        for f in report.all_findings:
            key = (f.op, normalize_signature(f.signature))
            prev = out.get(key)
            if prev is None or f.verdict.severity > prev.verdict.severity:
                out[key] = f
        return out

    def where(f: Any) -> str:
        return f.locations[0] if f.locations else ""

    ia, ib = index(a), index(b)
    changes, only_a, only_b, same = [], [], [], 0
    for k in sorted(set(ia) | set(ib)):
        fa, fb = ia.get(k), ib.get(k)
        if fa is not None and fb is not None:
            if fa.verdict is fb.verdict:
                same += 1
            else:
                changes.append(Change(k[0], k[1], fa.verdict.value, fb.verdict.value, where(fb) or where(fa)))
        elif fa is not None:
            only_a.append(Change(k[0], k[1], fa.verdict.value, MISSING, where(fa)))
        elif fb is not None:
            only_b.append(Change(k[0], k[1], MISSING, fb.verdict.value, where(fb)))
    if a.batch_invariance is not None and b.batch_invariance is not None:
        # Both reports of a --batch-invariance check: their per-op verdicts too.
        same += _diff_batch(_report_batch(a), _report_batch(b), changes, only_a, only_b)
    return Diff("report", a_label, b_label, tuple(sorted(changes, key=_order)), tuple(sorted(only_a, key=_order)),
                tuple(sorted(only_b, key=_order)), _fields(a.environment, b.environment),
                _fields(a.settings, b.settings), same)


def diff_files(path_a: str, path_b: str) -> Diff:
    """Load and diff two files (catalogs or reports); refuses mismatched kinds before anything else."""
    ka, da = load_document(path_a)
    kb, db = load_document(path_b)
    return diff_documents(da, db, path_a, path_b)
