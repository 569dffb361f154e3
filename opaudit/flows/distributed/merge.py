"""Merging the ranks' reports into one: pure data, no communication.

Identical signatures (the same op on the same shapes: the same id) merge into one
finding whose verdict is the worst any rank saw, and which lists each rank's
verdict and ``k/N``. The environment keeps rank 0's fingerprint and adds every
rank's host and device; ranks on different hardware or software are a warning.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from opaudit.data.report import Finding, RankOutcome, Report, from_dict, sort_findings
from opaudit.engine.record import MAX_SITES
from opaudit.flows.distributed.runchecks import merge_run_checks

RANK_FIELDS = ("host", "device", "torch", "cuda", "cpu", "gpu", "python", "platform")
"""Fingerprint fields listed per rank; the ones that must agree across a job are in :data:`MUST_AGREE`."""
MUST_AGREE = ("torch", "cuda", "cudnn", "cpu", "gpu", "python", "platform", "compute_capability")


def rank_environment(rank: int, host: str, device: str, env: Mapping[str, Any]) -> dict[str, Any]:
    """One rank's line in the merged environment."""
    out: dict[str, Any] = {"rank": rank, "host": host, "device": device}
    out.update({k: env[k] for k in RANK_FIELDS if k in env and k not in out and env[k] is not None})
    return out


def mixed_environment(envs: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """Warnings for fingerprint fields that differ across ranks (a finding in itself)."""
    out = []
    for key in MUST_AGREE:
        values = {r: e.get(key) for r, e in sorted(envs.items())}
        if len(set(map(str, values.values()))) > 1:
            shown = "; ".join(f"rank {r}: {v}" for r, v in values.items())
            out.append(f"the ranks run on different hardware or software: {key} differs ({shown}); "
                       "results can differ across ranks for that reason alone")
    return out


def _unique(warnings: Any) -> list[str]:
    """Warnings once each; the same warning with other measured numbers (another rank's) counts as the same."""
    seen: dict[str, str] = {}
    for w in warnings:
        seen.setdefault(re.sub(r"[-+]?\d[\d.e+-]*", "#", w), w)
    return list(seen.values())


def merge_findings(reports: Mapping[int, Report]) -> tuple[Finding, ...]:
    """One finding per signature id across ranks: worst verdict, per-rank outcomes, summed calls."""
    by_id: dict[str, list[tuple[int, Finding]]] = {}
    for rank in sorted(reports):
        for f in reports[rank].all_findings:
            by_id.setdefault(f.id, []).append((rank, f))
    merged = []
    for hits in by_id.values():
        worst_rank, worst = max(hits, key=lambda h: (h[1].verdict.severity, -h[0]))
        sites: dict[Any, None] = {}
        dropped = 0
        for _, f in hits:
            for s in f.sites:
                if s in sites or len(sites) < MAX_SITES:
                    sites[s] = None
                else:
                    dropped += 1
            dropped += f.sites_dropped
        diffs = [f.max_abs_diff for _, f in hits if f.max_abs_diff is not None]
        fracs = [f.frac_differing for _, f in hits if f.frac_differing is not None]
        merged.append(dataclasses.replace(
            worst,
            calls=sum(f.calls for _, f in hits),
            phases=tuple(dict.fromkeys(p for _, f in hits for p in f.phases)),
            sites=tuple(sites), sites_dropped=dropped,
            max_abs_diff=max(diffs) if diffs else None,
            frac_differing=max(fracs) if fracs else None,
            ranks=tuple(RankOutcome(r, f.verdict, f.default_diverged, f.deterministic_diverged, f.reason)
                        for r, f in hits),
        ))
    return sort_findings(merged)


def merge(payloads: Mapping[int, Mapping[str, Any]], world_size: int, *, missing: list[int],
          distributed: Mapping[str, Any]) -> Report:
    """The merged :class:`Report` from every rank's payload (see :func:`opaudit.distributed.rank.payload`)."""
    reports = {r: from_dict(p["report"], f"<rank {r} report>") for r, p in payloads.items()}
    first = reports[min(reports)]
    envs = {r: dict(p["report"]["environment"]) for r, p in payloads.items()}
    environment = dict(first.environment)
    environment["ranks"] = [rank_environment(r, p["host"], p["device"], envs[r]) for r, p in sorted(payloads.items())]
    warnings = _unique(w for r in sorted(reports) for w in reports[r].env_warnings)
    warnings += mixed_environment(envs)
    for r in missing:
        warnings.append(f"rank {r} sent no report within the time limit: its ops are missing from this report")
    view_calls: dict[str, int] = {}
    for rep in reports.values():
        for op, n in rep.view_calls.items():
            view_calls[op] = view_calls.get(op, 0) + n
    settings = dict(first.settings)
    settings["world_size"] = world_size
    distributed = dict(distributed)
    run_checks = first.run_checks
    if any(rep.run_checks for rep in reports.values()):
        run_checks, distributed["run_check"] = merge_run_checks({r: rep.run_checks for r, rep in reports.items()})
    return Report(
        environment=environment, settings=settings, all_findings=merge_findings(reports),
        view_calls=dict(sorted(view_calls.items())), total_calls=sum(r.total_calls for r in reports.values()),
        complete=all(r.complete for r in reports.values()) and not missing,
        env_warnings=tuple(warnings), run_checks=run_checks, distributed=distributed,
    )

