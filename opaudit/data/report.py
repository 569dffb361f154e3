"""The report model: frozen records (findings, sites, run-checks), a stable dict form, and strict load.

A report file carries ``format: opaudit-report`` and ``version: 2`` (version 1
files are read too); loading anything else is refused. Files are read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opaudit.data import fields, invariance
from opaudit.data.fields import ReportError, need, opt
from opaudit.data.files import check_environment, check_header, check_settings, read_document
from opaudit.data.invariance import BatchInvariance
from opaudit.data.site import Site, locations_of, modules_of, parse_site
from opaudit.data.verdict import Verdict, verdict_counts

if TYPE_CHECKING:
    import pandas

FORMAT = "opaudit-report"
VERSION = 2
"""Version 2 added the optional ``batch_invariance`` section."""
READ_VERSIONS = (1, 2)
"""Versions :func:`load` reads: a version 1 file is a version 2 file without that section."""


@dataclass(frozen=True)
class RankOutcome:
    """What one rank of a distributed job found for a signature (merged reports only)."""

    rank: int
    verdict: Verdict
    default_diverged: str = ""
    deterministic_diverged: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Finding:
    """The verdict on one unique op signature, with the measurements behind it."""

    id: str
    op: str
    verdict: Verdict
    calls: int
    signature: str
    device: str = "cpu"
    reason: str = ""
    """Why a ``skipped`` op was not replayed; for an op whose output is only partly
    uninitialized (``uninitialized`` after replay), which output and how much of it."""
    phases: tuple[str, ...] = ()
    sites: tuple[Site, ...] = ()
    sites_dropped: int = 0
    first_call: int = 0
    alert_kind: str | None = None
    """``no_deterministic_impl`` or ``cublas_workspace`` when strict mode raised."""
    strict_error: str | None = None
    warnings: tuple[str, ...] = ()
    default_diverged: str = ""
    """``k/N``: runs of N, with the setting off, whose bits differed from the first."""
    deterministic_diverged: str = ""
    max_abs_diff: float | None = None
    frac_differing: float | None = None
    outputs: tuple[str, ...] = ()
    """The outputs whose bits differed between runs (``output 1``, ``input self``)."""
    time_default_us: float | None = None
    time_deterministic_us: float | None = None
    rng: bool = False
    """The op drew from the RNG."""
    cudnn: tuple[tuple[str, str], ...] = ()
    """cuDNN setting → ``k/N`` divergence, for cuDNN-backed ops on CUDA."""
    remedy: str = ""
    ranks: tuple[RankOutcome, ...] = ()
    """Per rank, in a merged distributed report: verdict and ``k/N`` on each rank that ran the op."""
    cross_rank: str = ""
    """For a replayed collective whose result must match on every rank: ``identical`` or ``differs: ...``."""
    recorded_in: tuple[str, ...] = ()
    """Which recordings of the step called this signature: ``default`` (determinism off),
    ``deterministic`` (``use_deterministic_algorithms(True, warn_only=True)``), or both;
    empty when only the default-mode run was recorded."""
    checked_calls: tuple[int, ...] = ()
    """For a value-dependent op (``index_put_``, ``scatter_add_``...) replayed on several of its
    calls: which calls of this signature (1-based, in its own order of calls) were replayed, the
    first included. The verdict and ``k/N`` are the worst call's. Empty for every other op
    (replayed on its first call only)."""
    diverging_calls: tuple[int, ...] = ()
    """Of :attr:`checked_calls`, those whose replays diverged at least once (in either mode)."""
    calls_not_checked: int = 0
    """Calls that were to be replayed too but were not: the capture budget could not hold
    their inputs, or their replay failed."""

    @property
    def calls_checked(self) -> int:
        """How many of this signature's calls were replayed (1 unless it is a value-dependent op)."""
        return len(self.checked_calls) or 1

    @property
    def calls_diverged(self) -> int:
        """How many of the calls replayed diverged at least once (see :attr:`diverging_calls`)."""
        if self.checked_calls:
            return len(self.diverging_calls)
        return int(self.diverges or self.diverges_deterministic)

    @property
    def deterministic_path(self) -> bool:
        """Deterministic mode would call this op (or it is not known to skip it)."""
        return not self.recorded_in or "deterministic" in self.recorded_in

    @property
    def modules(self) -> tuple[str, ...]:
        """Distinct module paths, in first-seen order."""
        return modules_of(self.sites)

    @property
    def locations(self) -> tuple[str, ...]:
        """Distinct ``file:line`` locations, in first-seen order."""
        return locations_of(self.sites)

    @property
    def det_cost(self) -> float | None:
        """Deterministic time over default time (``None`` when either is missing)."""
        if not self.time_default_us or self.time_deterministic_us is None:
            return None
        return self.time_deterministic_us / self.time_default_us

    @property
    def diverges(self) -> bool:
        """Default-mode runs differed."""
        return _k(self.default_diverged) > 0

    @property
    def diverges_deterministic(self) -> bool:
        """Deterministic-mode runs differed."""
        return _k(self.deterministic_diverged) > 0


def _k(ratio: str) -> int:
    try:
        return int(ratio.split("/", 1)[0])
    except (ValueError, AttributeError):
        return 0


@dataclass(frozen=True)
class CompiledCode:
    """A ``torch.compile``d module or function that the recorded step called.

    Under the recorder it ran eagerly (Dynamo does not compile under a dispatch
    mode; opaudit sets the compiler stance ``force_eager`` while recording), so
    the findings for its ops are for the eager aten kernels, not for the kernels
    Inductor generated. ``--run-check`` checks the compiled step itself.
    """

    kind: str
    """``module`` (an ``nn.Module`` compiled with ``torch.compile(model)`` or ``model.compile()``) or ``function``."""
    name: str
    """The module's class name, or the function's qualified name."""
    calls: int
    """Calls while recording."""
    compiled_at: str = ""
    """``file:line`` of the ``torch.compile`` call, when opaudit saw it (empty otherwise)."""
    defined_at: str = ""
    """For a function, ``file:line`` of its definition."""


@dataclass(frozen=True)
class RunCheck:
    """Outcome of re-running the whole step ``runs`` times from identical state in one mode."""

    mode: str
    """``default`` or ``deterministic``."""
    runs: int
    reproducible: bool
    ops: int
    """Ops executed per run (of the first run)."""
    differing_ops: int = 0
    """Ops whose outputs differed between runs."""
    root_cause: Mapping[str, Any] | None = None
    """First op whose outputs differ while its inputs were identical: op, index, site."""
    path_split: Mapping[str, Any] | None = None
    """Where the runs took different op sequences, if they did."""
    mismatches: tuple[str, ...] = ()
    """Outputs, loss, gradients or parameters that differed."""
    error: str | None = None
    compared: int | None = None
    """Final tensors compared after the step (return value, parameters, gradients,
    buffers, optimizer state); ``0`` says none could be found."""
    collectives: Mapping[str, Any] | None = None
    """When the step made collective calls: how many, the first that differed (inputs,
    outputs), and how many came before the root cause (see :mod:`opaudit.flows.runcheck`)."""
    rank: int | None = None
    """The rank that ran this check, in a merged torchrun report."""
    compiled: tuple[str, ...] = ()
    """When the step calls ``torch.compile``d code: the compiled modules and functions
    (``module MLP``, ``function step``). The runs then ran with compilation in force and
    no dispatch mode, so ``ops`` is 0 and only the final tensors were compared."""
    compiles: int | None = None
    """Graphs Dynamo compiled over all the runs of a compiled step (a fresh load of the
    script compiles anew; Inductor's caches make the later compiles cheaper)."""
    inductor_deterministic: bool | None = None
    """For a compiled step: whether ``torch._inductor.config.deterministic`` was on."""


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
            "run_checks": [_run_check_dict(r) for r in self.run_checks],
        }
        if self.batch_invariance is not None:
            d["batch_invariance"] = self.batch_invariance.to_dict()
        if self.distributed:
            d["distributed"] = dict(self.distributed)
        if self.compiled:
            d["compiled"] = [{k: v for k, v in dataclasses.asdict(c).items() if v != ""} for c in self.compiled]
        d["view_calls"] = dict(sorted(self.view_calls.items()))
        d["findings"] = [finding_dict(f) for f in self.all_findings]
        return d

    def to_dataframe(self) -> "pandas.DataFrame":
        """One row per signature (pandas imported on first use)."""
        import pandas as pd

        return pd.DataFrame([flat_row(f) for f in self.all_findings], columns=list(ROW_FIELDS))


def sort_findings(findings: Iterable[Finding]) -> tuple[Finding, ...]:
    """Worst first, then by op and signature id: a total, stable order."""
    return tuple(sorted(findings, key=lambda f: (-f.verdict.severity, f.op, f.id)))


# -- dict / row forms -------------------------------------------------------
ROW_FIELDS = (
    "id", "op", "verdict", "reason", "calls", "phases", "modules", "locations", "signature", "device",
    "alert_kind", "strict_error", "warnings", "default_diverged", "deterministic_diverged",
    "max_abs_diff", "frac_differing", "outputs", "time_default_us", "time_deterministic_us", "det_cost",
    "rng", "cudnn", "remedy", "first_call", "ranks", "cross_rank", "recorded_in",
    "calls_checked", "calls_diverged", "diverging_calls", "calls_not_checked",
)
"""Column order of CSV and DataFrame rows."""


def _num(x: float | None, digits: int = 6) -> float | str | None:
    if x is None:
        return None
    if math.isinf(x):
        return "inf"
    if math.isnan(x):
        return "nan"
    return float(f"{x:.{digits}g}")


def flat_row(f: Finding) -> dict[str, Any]:
    """A flat row (lists joined with ``;``) for CSV and DataFrames."""
    cost = f.det_cost
    return {
        "id": f.id, "op": f.op, "verdict": f.verdict.value, "reason": f.reason, "calls": f.calls,
        "phases": ";".join(f.phases), "modules": ";".join(f.modules), "locations": ";".join(f.locations),
        "signature": f.signature, "device": f.device, "alert_kind": f.alert_kind or "",
        "strict_error": f.strict_error or "", "warnings": " | ".join(f.warnings),
        "default_diverged": f.default_diverged, "deterministic_diverged": f.deterministic_diverged,
        "max_abs_diff": _num(f.max_abs_diff), "frac_differing": _num(f.frac_differing),
        "outputs": ";".join(f.outputs), "time_default_us": _num(f.time_default_us, 4), "time_deterministic_us": _num(f.time_deterministic_us, 4),
        "det_cost": _num(cost, 3), "rng": f.rng, "cudnn": ";".join(f"{k}:{v}" for k, v in f.cudnn),
        "remedy": f.remedy, "first_call": f.first_call,
        "ranks": ";".join(f"{o.rank}:{o.verdict.value} {o.default_diverged}".rstrip() for o in f.ranks),
        "cross_rank": f.cross_rank,
        "recorded_in": ";".join(f.recorded_in),
        "calls_checked": len(f.checked_calls) if f.checked_calls else "",
        "calls_diverged": len(f.diverging_calls) if f.checked_calls else "",
        "diverging_calls": ";".join(str(c) for c in f.diverging_calls),
        "calls_not_checked": f.calls_not_checked or "",
    }


def finding_dict(f: Finding) -> dict[str, Any]:
    """Nested form of one finding, as written to YAML and JSON."""
    d: dict[str, Any] = {
        "id": f.id, "op": f.op, "verdict": f.verdict.value, "calls": f.calls, "signature": f.signature,
        "device": f.device, "phases": list(f.phases),
        "sites": [s.to_dict() for s in f.sites],
        "first_call": f.first_call,
    }
    if f.sites_dropped:
        d["sites_dropped"] = f.sites_dropped
    if f.reason:
        d["reason"] = f.reason
    for name in ("alert_kind", "strict_error"):
        if getattr(f, name):
            d[name] = getattr(f, name)
    if f.warnings:
        d["warnings"] = list(f.warnings)
    if f.default_diverged:
        d["default_diverged"] = f.default_diverged
        d["deterministic_diverged"] = f.deterministic_diverged
        d["max_abs_diff"] = _num(f.max_abs_diff)
        d["frac_differing"] = _num(f.frac_differing)
    if f.outputs:
        d["outputs"] = list(f.outputs)
    if f.time_default_us is not None:
        d["time_default_us"] = _num(f.time_default_us, 4)
        d["time_deterministic_us"] = _num(f.time_deterministic_us, 4)
        d["det_cost"] = _num(f.det_cost, 3)
    if f.rng:
        d["rng"] = True
    if f.cudnn:
        d["cudnn"] = {k: v for k, v in f.cudnn}
    if f.remedy:
        d["remedy"] = f.remedy
    if f.ranks:
        d["ranks"] = [_rank_dict(o) for o in f.ranks]
    if f.cross_rank:
        d["cross_rank"] = f.cross_rank
    if f.recorded_in:
        d["recorded_in"] = list(f.recorded_in)
    if f.checked_calls:
        d["calls_checked"] = len(f.checked_calls)
        d["calls_diverged"] = len(f.diverging_calls)
        d["checked_calls"] = list(f.checked_calls)
        d["diverging_calls"] = list(f.diverging_calls)
    if f.calls_not_checked:
        d["calls_not_checked"] = f.calls_not_checked
    return d


def _rank_dict(o: RankOutcome) -> dict[str, Any]:
    d: dict[str, Any] = {"rank": o.rank, "verdict": o.verdict.value}
    if o.default_diverged:
        d["default_diverged"] = o.default_diverged
        d["deterministic_diverged"] = o.deterministic_diverged
    if o.reason:
        d["reason"] = o.reason
    return d


def _parse_rank(d: Any, where: str) -> RankOutcome:
    d = fields.mapping(d, where, "a rank entry")
    verdict = fields.verdict(need(d, "verdict", str, where), where)
    return RankOutcome(need(d, "rank", int, where), verdict, opt(d, "default_diverged", str, where, ""),
                       opt(d, "deterministic_diverged", str, where, ""), opt(d, "reason", str, where, ""))


def _run_check_dict(r: RunCheck) -> dict[str, Any]:
    d = dataclasses.asdict(r)
    d["mismatches"] = list(r.mismatches)
    if r.compiled:
        d["compiled"] = list(r.compiled)
    else:
        del d["compiled"]  # an eager step's check reads as it always did
    return {k: v for k, v in d.items() if v is not None}


# -- parsing (strict: every field checked) ----------------------------------
def parse_finding(d: Any, where: str) -> Finding:
    """A :class:`Finding` from its dict form, checking every field's type."""
    d = fields.mapping(d, where, "a finding")
    verdict = fields.verdict(need(d, "verdict", str, where), where)
    sites = tuple(parse_site(s, f"{where}.sites") for s in opt(d, "sites", list, where, []))
    warnings_ = fields.strings(d, "warnings", where)
    cudnn = opt(d, "cudnn", dict, where, {})
    f = Finding(
        id=need(d, "id", str, where), op=need(d, "op", str, where), verdict=verdict,
        calls=need(d, "calls", int, where), signature=need(d, "signature", str, where),
        device=opt(d, "device", str, where, "cpu"), reason=opt(d, "reason", str, where, ""),
        phases=fields.strings(d, "phases", where), sites=sites,
        sites_dropped=opt(d, "sites_dropped", int, where, 0), first_call=opt(d, "first_call", int, where, 0),
        alert_kind=opt(d, "alert_kind", str, where), strict_error=opt(d, "strict_error", str, where),
        warnings=tuple(warnings_), default_diverged=opt(d, "default_diverged", str, where, ""),
        deterministic_diverged=opt(d, "deterministic_diverged", str, where, ""),
        max_abs_diff=fields.number(d, "max_abs_diff", where),
        frac_differing=fields.number(d, "frac_differing", where),
        outputs=fields.strings(d, "outputs", where),
        time_default_us=fields.number(d, "time_default_us", where),
        time_deterministic_us=fields.number(d, "time_deterministic_us", where),
        rng=bool(opt(d, "rng", bool, where, False)),
        cudnn=tuple((str(k), str(v)) for k, v in sorted(cudnn.items())),
        remedy=opt(d, "remedy", str, where, ""),
        ranks=tuple(_parse_rank(r, f"{where}.ranks") for r in opt(d, "ranks", list, where, [])),
        cross_rank=opt(d, "cross_rank", str, where, ""),
        recorded_in=fields.strings(d, "recorded_in", where),
        checked_calls=fields.ints(d, "checked_calls", where, minimum=1),
        diverging_calls=fields.ints(d, "diverging_calls", where, minimum=1),
        calls_not_checked=opt(d, "calls_not_checked", int, where, 0),
    )
    _check_calls(d, f, where)
    return f


def _check_calls(d: Mapping, f: Finding, where: str) -> None:
    """The counts written beside the call lists must match them, and diverging calls be checked ones."""
    for key, n in (("calls_checked", len(f.checked_calls)), ("calls_diverged", len(f.diverging_calls))):
        if key in d and d[key] != n:
            raise ReportError(f"{where}: {key} is {d[key]!r} but its list holds {n} call(s)")
    if not set(f.diverging_calls) <= set(f.checked_calls):
        raise ReportError(f"{where}: diverging_calls must be among checked_calls")


def from_dict(data: Any, path: str = "<report>") -> Report:
    """A :class:`Report` from its dict form; :class:`ReportError` on any mismatch."""
    data = check_header(data, FORMAT, READ_VERSIONS, path)
    findings = need(data, "findings", list, path)
    batch = None
    if data.get("batch_invariance") is not None:
        if data["version"] < 2:
            raise ReportError(f"{path}: a version 1 report cannot hold a batch_invariance section")
        batch = invariance.from_dict(data["batch_invariance"], f"{path}: batch_invariance")
    runs = []
    for i, r in enumerate(opt(data, "run_checks", list, path, [])):
        w = f"{path}: run_checks[{i}]"
        r = fields.mapping(r, w)
        runs.append(RunCheck(
            mode=need(r, "mode", str, w), runs=need(r, "runs", int, w),
            reproducible=need(r, "reproducible", bool, w), ops=need(r, "ops", int, w),
            differing_ops=opt(r, "differing_ops", int, w, 0), root_cause=opt(r, "root_cause", dict, w),
            path_split=opt(r, "path_split", dict, w), mismatches=fields.strings(r, "mismatches", w),
            error=opt(r, "error", str, w), compared=opt(r, "compared", int, w),
            collectives=opt(r, "collectives", dict, w), rank=opt(r, "rank", int, w),
            compiled=fields.strings(r, "compiled", w), compiles=opt(r, "compiles", int, w),
            inductor_deterministic=opt(r, "inductor_deterministic", bool, w)))
    compiled = []
    for i, c in enumerate(opt(data, "compiled", list, path, [])):
        w = f"{path}: compiled[{i}]"
        c = fields.mapping(c, w)
        compiled.append(CompiledCode(
            kind=need(c, "kind", str, w), name=need(c, "name", str, w), calls=need(c, "calls", int, w),
            compiled_at=opt(c, "compiled_at", str, w, ""), defined_at=opt(c, "defined_at", str, w, "")))
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
        run_checks=tuple(runs),
        batch_invariance=batch,
        distributed=opt(data, "distributed", dict, path, {}),
        compiled=tuple(compiled),
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
