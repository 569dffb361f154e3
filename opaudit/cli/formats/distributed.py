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
    out += _run_check_lines(d.get("run_check") or [])
    return out


def _run_check_lines(checks: list) -> list[str]:
    """Per mode: which ranks reproduced, which diverged first, the collective the difference spread through."""
    out = []
    for c in checks:
        if not isinstance(c, dict):
            continue
        bad = c.get("not_reproducible_on") or []
        head = (f"  run check, {c.get('mode')} mode: "
                + ("bitwise reproducible on every rank" if not bad else
                   f"NOT reproducible on rank(s) {', '.join(map(str, bad))}"))
        out.append(head)
        first = c.get("diverged_first")
        if isinstance(first, dict):
            at = f"op #{first.get('index')} {first.get('op')} at {first.get('where', '?')}"
            if "collective_call" in first:
                out.append(f"    diverged first: rank {first.get('rank')}, in collective call #{first['collective_call']} "
                           f"itself ({at}): its inputs were identical")
            else:
                out.append(f"    diverged first: rank {first.get('rank')}, {at}, before collective call "
                           f"#{first.get('before_collective_call')}")
            if first.get("also_diverged_on_their_own"):
                out.append("    also diverged on their own: rank(s) "
                           + ", ".join(map(str, first["also_diverged_on_their_own"])))
        spread = c.get("spread_through")
        if isinstance(spread, dict):
            out.append(f"    spread through collective call #{spread.get('call')} {spread.get('op')} at "
                       f"{spread.get('where') or '?'}: its input differed on rank(s) "
                       f"{', '.join(map(str, spread.get('inputs_differed_on') or []))}, its output on every rank")
    return out


def table(report: "Report") -> str:
    """Plain-text block for the terminal table."""
    return "\n".join(lines(report))


def markdown(report: "Report") -> list[str]:
    """Markdown lines: a heading, the job line, then one bullet per point."""
    out = lines(report)
    return ["## Distributed job", "", out[0], ""] + [f"- {line.strip()}" for line in out[1:]] + [""]
