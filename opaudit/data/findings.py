"""A report's findings: one frozen record per op signature, its dict and row forms, and its strict parse.

:class:`Finding` is what every layer that classifies, merges or renders an op's
verdict shares; the report (:mod:`opaudit.data.report`) holds a tuple of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opaudit.data import fields
from opaudit.data.fields import ReportError, need, opt
from opaudit.data.site import Site, locations_of, modules_of, parse_site
from opaudit.data.verdict import Verdict


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
    def runs_per_mode(self) -> int:
        """Runs the replay made in each mode (the fewer of the two; 0 if it was not replayed)."""
        runs = [_n(r) for r in (self.default_diverged, self.deterministic_diverged) if r]
        return min(runs) if runs else 0

    @property
    def rate_caught_95(self) -> float | None:
        """For a ``stable`` verdict: how strong it is (see :func:`rate_caught`); ``None`` for any other."""
        if self.verdict is not Verdict.STABLE or not self.runs_per_mode:
            return None
        return rate_caught(self.runs_per_mode)

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


CONFIDENCE = 0.95
"""How sure the evidence of a ``stable`` verdict is stated (:func:`rate_caught`)."""


def rate_caught(runs: int, confidence: float = CONFIDENCE) -> float:
    """The smallest per-run divergence probability that ``runs`` runs would have caught with ``confidence``.

    Each run after the first is compared with the first: if each differs with
    probability ``p``, all ``runs - 1`` agree with probability ``(1 - p) ** (runs - 1)``,
    which is at most ``1 - confidence`` once ``p`` reaches the value returned. So a
    ``stable`` verdict from 5 runs rules out (at 95 %) an op that differs in 53 % of
    its runs or more, one from 60 runs an op that differs in 5 % or more; a rarer
    race can still hide. 1.0 for a single run (nothing was compared).
    """
    if runs < 2:
        return 1.0
    return 1.0 - (1.0 - confidence) ** (1.0 / (runs - 1))


def _n(ratio: str) -> int:
    try:
        return int(ratio.split("/", 1)[1])
    except (ValueError, IndexError, AttributeError):
        return 0


def _k(ratio: str) -> int:
    try:
        return int(ratio.split("/", 1)[0])
    except (ValueError, AttributeError):
        return 0


def sort_findings(findings: Iterable[Finding]) -> tuple[Finding, ...]:
    """Worst first, then by op and signature id: a total, stable order."""
    return tuple(sorted(findings, key=lambda f: (-f.verdict.severity, f.op, f.id)))


# -- dict / row forms -------------------------------------------------------
ROW_FIELDS = (
    "id", "op", "verdict", "reason", "calls", "phases", "modules", "locations", "signature", "device",
    "alert_kind", "strict_error", "warnings", "default_diverged", "deterministic_diverged",
    "max_abs_diff", "frac_differing", "outputs", "time_default_us", "time_deterministic_us", "det_cost",
    "rng", "cudnn", "remedy", "first_call", "ranks", "cross_rank", "recorded_in",
    "calls_checked", "calls_diverged", "diverging_calls", "calls_not_checked", "runs_per_mode", "rate_caught_95",
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
        "runs_per_mode": f.runs_per_mode if f.rate_caught_95 is not None else "",
        "rate_caught_95": _num(f.rate_caught_95, 3) if f.rate_caught_95 is not None else "",
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
    if f.rate_caught_95 is not None:
        d["evidence"] = {"runs_per_mode": f.runs_per_mode, "rate_caught_95": _num(f.rate_caught_95, 3)}
    return d


def _rank_dict(o: RankOutcome) -> dict[str, Any]:
    d: dict[str, Any] = {"rank": o.rank, "verdict": o.verdict.value}
    if o.default_diverged:
        d["default_diverged"] = o.default_diverged
        d["deterministic_diverged"] = o.deterministic_diverged
    if o.reason:
        d["reason"] = o.reason
    return d


# -- parsing (strict: every field read with opaudit.data.fields) -----------------
def _parse_rank(d: Any, where: str) -> RankOutcome:
    d = fields.mapping(d, where, "a rank entry")
    verdict = fields.verdict(need(d, "verdict", str, where), where)
    return RankOutcome(need(d, "rank", int, where), verdict, opt(d, "default_diverged", str, where, ""),
                       opt(d, "deterministic_diverged", str, where, ""), opt(d, "reason", str, where, ""))


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
    _check_evidence(d, f, where)
    return f


def _check_evidence(d: Mapping, f: Finding, where: str) -> None:
    """A ``stable`` finding's evidence, when written, must be what its ``k/N`` ratios say."""
    if "evidence" not in d:
        return
    e = fields.mapping(d["evidence"], f"{where}.evidence", "the evidence")
    runs = need(e, "runs_per_mode", int, f"{where}.evidence")
    fields.number(e, "rate_caught_95", f"{where}.evidence")
    if f.rate_caught_95 is None:
        raise ReportError(f"{where}: evidence belongs to a stable verdict with k/N ratios, not to {f.verdict.value}")
    if runs != f.runs_per_mode:
        raise ReportError(f"{where}: evidence says {runs} runs per mode but its ratios say {f.runs_per_mode}")


def _check_calls(d: Mapping, f: Finding, where: str) -> None:
    """The counts written beside the call lists must match them, and diverging calls be checked ones."""
    for key, n in (("calls_checked", len(f.checked_calls)), ("calls_diverged", len(f.diverging_calls))):
        if key in d and d[key] != n:
            raise ReportError(f"{where}: {key} is {d[key]!r} but its list holds {n} call(s)")
    if not set(f.diverging_calls) <= set(f.checked_calls):
        raise ReportError(f"{where}: diverging_calls must be among checked_calls")
