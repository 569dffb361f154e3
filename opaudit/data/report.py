"""The report: one audit's environment, settings and findings, its stable dict form, and strict load.

The records it holds live beside it, one module per job: :mod:`opaudit.data.findings`
(one per op signature), :mod:`opaudit.data.runcheck` (whole-step checks, compiled code),
:mod:`opaudit.data.invariance` (the batch-invariance section). Their names are
importable from here too.

A report file carries ``format: opaudit-report`` and ``version: 2`` (version 1
files are read too); loading anything else is refused. Files are read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opaudit.data import fields, invariance
from opaudit.data.fields import ReportError, need, opt
from opaudit.data.files import check_environment, check_header, check_settings, read_document
from opaudit.data.findings import (
    ROW_FIELDS,
    Finding,
    RankOutcome,
    finding_dict,
    flat_row,
    parse_finding,
    sort_findings,
)
from opaudit.data.invariance import BatchInvariance
from opaudit.data.runcheck import CompiledCode, RunCheck, compiled_dict, parse_compiled, parse_run_check, run_check_dict
from opaudit.data.site import Site, parse_site
from opaudit.data.verdict import Verdict, verdict_counts

if TYPE_CHECKING:
    import pandas

FORMAT = "opaudit-report"
VERSION = 2
"""Version 2 added the optional ``batch_invariance`` section."""
READ_VERSIONS = (1, 2)
"""Versions :func:`load` reads: a version 1 file is a version 2 file without that section."""

__all__ = [
    "FORMAT", "READ_VERSIONS", "ROW_FIELDS", "VERSION", "CompiledCode", "Finding", "RankOutcome", "Report",
    "ReportError", "RunCheck", "Site", "Verdict", "finding_dict", "flat_row", "from_dict", "load", "parse_finding",
    "parse_site", "sort_findings",
]


@dataclass(frozen=True)
class Report:
    """A full audit: environment, settings, summary and one finding per signature."""

    environment: Mapping[str, Any]
    settings: Mapping[str, Any]
    all_findings: tuple[Finding, ...]
    """One finding per signature, worst first (see :func:`sort_findings`); :meth:`findings` filters them."""
    view_calls: Mapping[str, int] = field(default_factory=dict)
    """Calls of view/metadata ops by op name: counted, not replayed."""
    total_calls: int = 0
    complete: bool = True
    """False when the audit was interrupted; ``all_findings`` then holds what was classified."""
    env_warnings: tuple[str, ...] = ()
    run_checks: tuple[RunCheck, ...] = ()
    batch_invariance: BatchInvariance | None = None
    """The ``--batch-invariance`` check, when it ran (see :mod:`opaudit.flows.batchinv`)."""
    distributed: Mapping[str, Any] = field(default_factory=dict)
    """For a merged torchrun job: world size, ranks, collective plan, replica consistency (empty otherwise)."""
    compiled: tuple[CompiledCode, ...] = ()
    """``torch.compile``d modules and functions the recorded step called: recorded and audited eagerly."""
    format: str = FORMAT
    version: int = VERSION

    # -- queries ------------------------------------------------------------
    @property
    def summary(self) -> dict[str, int]:
        """Count of signatures per verdict (every verdict present), plus view-op counts."""
        counts = verdict_counts(f.verdict for f in self.all_findings)
        counts["signatures"] = len(self.all_findings)
        counts["view_ops"] = len(self.view_calls)
        counts["view_calls"] = sum(self.view_calls.values())
        counts["total_calls"] = self.total_calls
        return counts

    def findings(self, at_least: Verdict | str | None = None, *, verdicts: Iterable[Verdict | str] = ()) -> list[Finding]:
        """Findings at or above the severity ``at_least`` and/or with one of ``verdicts``.

        With neither, every finding. ``report.findings(at_least="diverges")`` is the
        usual assertion in a test.
        """
        out = list(self.all_findings)
        if at_least is not None:
            floor = Verdict(at_least).severity
            out = [f for f in out if f.verdict.severity >= floor]
        want = {Verdict(v) for v in verdicts}
        if want:
            out = [f for f in out if f.verdict in want]
        return out

    def raising(self) -> list[Finding]:
        """The ``raises`` findings (ops that raise under deterministic mode), in execution order."""
        return sorted(self.findings(verdicts=[Verdict.RAISES]), key=lambda f: f.first_call)

    def crashes(self) -> list[Finding]:
        """Ops that raise under deterministic mode, in execution order.

        An op that only the default-mode path calls (its Python code branches on
        ``torch.are_deterministic_algorithms_enabled()``) is not a crash: deterministic
        mode never calls it.
        """
        return [f for f in self.raising() if f.deterministic_path]

    def finding(self, op: str) -> Finding:
        """The worst finding of ``op`` (``KeyError`` if the op was not recorded)."""
        for f in self.all_findings:
            if f.op == op:
                return f
        raise KeyError(op)

    def to_dict(self) -> dict[str, Any]:
        """Plain, ordered, serialisable form (the file schema)."""
        d = {
            "format": self.format,
            "version": self.version,
            "complete": self.complete,
            "environment": dict(sorted(self.environment.items())),
            "settings": dict(sorted(self.settings.items())),
            "summary": self.summary,
            "env_warnings": list(self.env_warnings),
            "run_checks": [run_check_dict(r) for r in self.run_checks],
        }
        if self.batch_invariance is not None:
            d["batch_invariance"] = self.batch_invariance.to_dict()
        if self.distributed:
            d["distributed"] = dict(self.distributed)
        if self.compiled:
            d["compiled"] = [compiled_dict(c) for c in self.compiled]
        d["view_calls"] = dict(sorted(self.view_calls.items()))
        d["findings"] = [finding_dict(f) for f in self.all_findings]
        return d

    def to_dataframe(self) -> "pandas.DataFrame":
        """One row per signature (pandas imported on first use)."""
        import pandas as pd

        return pd.DataFrame([flat_row(f) for f in self.all_findings], columns=list(ROW_FIELDS))


def from_dict(data: Any, path: str = "<report>") -> Report:
    """A :class:`Report` from its dict form; :class:`ReportError` on any mismatch."""
    data = check_header(data, FORMAT, READ_VERSIONS, path)
    findings = need(data, "findings", list, path)
    batch = None
    if data.get("batch_invariance") is not None:
        if data["version"] < 2:
            raise ReportError(f"{path}: a version 1 report cannot hold a batch_invariance section")
        batch = invariance.from_dict(data["batch_invariance"], f"{path}: batch_invariance")
    runs = tuple(parse_run_check(r, f"{path}: run_checks[{i}]")
                 for i, r in enumerate(opt(data, "run_checks", list, path, [])))
    compiled = tuple(parse_compiled(c, f"{path}: compiled[{i}]")
                     for i, c in enumerate(opt(data, "compiled", list, path, [])))
    view_calls = opt(data, "view_calls", dict, path, {})
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in view_calls.items()):
        raise ReportError(f"{path}: view_calls must map op names to counts")
    summary = opt(data, "summary", dict, path, {})
    report = Report(
        environment=check_environment(need(data, "environment", dict, path), path),
        settings=check_settings(need(data, "settings", dict, path), path),
        all_findings=tuple(parse_finding(f, f"{path}: findings[{i}]") for i, f in enumerate(findings)),
        view_calls=view_calls,
        total_calls=int(summary.get("total_calls", 0)) if isinstance(summary.get("total_calls", 0), int) else 0,
        complete=bool(opt(data, "complete", bool, path, True)),
        env_warnings=fields.strings(data, "env_warnings", path),
        run_checks=runs,
        batch_invariance=batch,
        distributed=opt(data, "distributed", dict, path, {}),
        compiled=compiled,
    )
    _check_summary(summary, report, path)
    return report


def _check_summary(summary: Mapping[str, Any], report: Report, path: str) -> None:
    """Refuse a summary that does not add up: a file cut after a whole finding still parses."""
    held = report.summary
    for key in ("signatures", *held):
        if key in summary and summary[key] != held[key]:
            raise ReportError(f"{path}: summary gives {key}: {summary[key]!r} but the file holds {held[key]} "
                              "(truncated or hand-edited?)")


def load(path: str) -> Report:
    """Load a report file written by ``opaudit -o`` (YAML or JSON)."""
    return from_dict(read_document(path), path)
