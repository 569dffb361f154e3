"""The distributed section of a merged torchrun report, for the table and Markdown renderers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opaudit.data.report import Report


def lines(report: "Report") -> list[str]:
    """Ranks, collectives, sequence mismatch and replica consistency; empty for a single-process report."""
    d = report.distributed
    if not d:
        return []
    ranks = report.environment.get("ranks") or []
    where = ", ".join(f"rank {r.get('rank')} {r.get('host')} {r.get('device')}" for r in ranks if isinstance(r, dict))
    out = [f"Distributed job: {d.get('world_size')} ranks ({where}); process group {d.get('process_group')}"]
    if d.get("missing_ranks"):
        out.append(f"  no report from rank(s) {', '.join(map(str, d['missing_ranks']))} within the time limit")
    out.append(f"  collectives replayed in lockstep on every rank: {d.get('collectives_replayed', 0)}")
    mismatch = d.get("collective_sequence_mismatch")
    if mismatch:
        at = "; ".join(f"rank {r}: {v}" for r, v in (mismatch.get("ranks") or {}).items())
        out.append(f"  the ranks' collective sequences part at collective call #{mismatch.get('call')}: {at}")
    rep = d.get("replicas") or {}
    differing = rep.get("differing") or []
    out.append(f"  replicas: {rep.get('tensors_checked', 0)} DDP-replicated tensors compared across ranks"
               f" ({rep.get('ddp_modules', 0)} DDP module(s)): "
               + (f"{len(differing)} differ" if differing else "all identical"))
    for x in differing:
        first = x.get("first_op")
        blame = (f"first differed after {first.get('op')} at {first.get('where')} ({first.get('module') or '-'})"
                 if first else x.get("first_op_note", ""))
        out.append(f"  differs across ranks {x.get('ranks')}: {x.get('tensor')} ({x.get('kind')}): {blame}")
    return out


def table(report: "Report") -> str:
    """Plain-text block for the terminal table."""
    return "\n".join(lines(report))


def markdown(report: "Report") -> list[str]:
    """Markdown lines: a heading, the job line, then one bullet per point."""
    out = lines(report)
    return ["## Distributed job", "", out[0], ""] + [f"- {line.strip()}" for line in out[1:]] + [""]
