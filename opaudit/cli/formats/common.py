"""What the renderers share: tables, ``where`` cells, CSV writing, and the rows of a report.

tabulate is imported inside the functions that need it, so importing this stays light.
``md_table`` and ``csv_text`` escape what they are given (:mod:`opaudit.cli.formats.escape`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opaudit.cli.formats.escape import csv_text, md_table  # noqa: F401 - every renderer takes them from here
from opaudit.data.verdict import Verdict

if TYPE_CHECKING:
    from opaudit.data.findings import Finding
    from opaudit.data.prediction import Predicted, Prediction
    from opaudit.data.report import Report
    from opaudit.data.runcheck import CompiledCode, RunCheck

FINDING_HEADERS = ("verdict", "op", "calls", "phase", "where", "module", "default", "determ.", "max |diff|", "det. cost")


def where(locations: Sequence[str], limit: int = 2, dropped: int = 0) -> str:
    """The first ``limit`` ``file:line`` locations, with ``+N`` for the rest (``dropped`` more were not kept)."""
    more = len(locations) - limit + dropped
    text = ", ".join(locations[:limit])
    return f"{text} +{more}" if more > 0 else text


def fmt_num(x: float | None) -> str:
    """Compact number: ``-`` when missing."""
    if x is None:
        return "-"
    return f"{x:.3g}"


def _per_rank(f: "Finding", field: str) -> str:
    """``k/N`` per rank (``4/5 r0, 0/5 r1``) in a merged distributed report, else the plain value."""
    if len(f.ranks) < 2 or not any(getattr(o, field) for o in f.ranks):
        return getattr(f, field) or "-"
    return ", ".join(f"{getattr(o, field) or '-'} r{o.rank}" for o in f.ranks)


def verdict_text(f: "Finding") -> str:
    """The verdict with what qualifies it: a skip's reason, the outputs that differed or were never written."""
    if f.verdict is Verdict.UNINITIALIZED and f.reason:
        # ``output 1: 839 of 2040 elements never written...``: name the outputs only.
        return f"{f.verdict.value} ({', '.join(part.split(':')[0] for part in f.reason.split('; '))}, partly)"
    if f.reason:
        return f"{f.verdict.value} ({f.reason})"
    if f.outputs and f.outputs != ("output",):
        return f"{f.verdict.value} ({', '.join(f.outputs)})"
    return f.verdict.value


def calls_text(f: "Finding") -> str:
    """For a value-dependent op replayed on several calls: how many diverged, and the first that did."""
    if not f.checked_calls:
        return ""
    n = len(f.checked_calls)
    if not f.diverging_calls:
        text = f"{n} calls checked"
    else:
        text = f"{len(f.diverging_calls)}/{n} calls diverged, first: call {f.diverging_calls[0]}"
    if f.calls_not_checked:
        text += f", {f.calls_not_checked} not checked"
    return text


def finding_row(f: "Finding") -> list[Any]:
    """One table row for a finding."""
    cost = f.det_cost
    verdict = verdict_text(f)
    on = [o.rank for o in f.ranks if o.verdict is f.verdict]
    if f.ranks and len(on) < len(f.ranks):
        verdict += f" on rank {','.join(map(str, on))}"
    if f.cross_rank.startswith("differs"):
        verdict += f"; across ranks {f.cross_rank}"
    calls = calls_text(f)
    if calls:
        verdict += f"; {calls}"
    return [
        verdict,
        f.op, f.calls, "/".join(f.phases), where(f.locations, 2, f.sites_dropped), ", ".join(f.modules[:2]) or "-",
        _per_rank(f, "default_diverged"), _per_rank(f, "deterministic_diverged"),
        fmt_num(f.max_abs_diff) if f.diverges else "-",
        f"{cost:.2f}x" if cost is not None else "-",
    ]


def notable(report: "Report") -> list["Finding"]:
    """Findings worth a row: everything but ``stable``, worst first."""
    return [f for f in report.all_findings if f.verdict is not Verdict.STABLE]


QUIET = (Verdict.RANDOM, Verdict.UNINITIALIZED)
"""Verdicts a terminal summarises instead of listing: seeded draws and uninitialized
memory, mostly model initialisation, would otherwise bury what needs doing."""


def split_quiet(findings: Sequence["Finding"]) -> tuple[list["Finding"], list["Finding"]]:
    """``(listed, summarised)``: ``findings`` without the :data:`QUIET` verdicts, and those, in order."""
    return [f for f in findings if f.verdict not in QUIET], [f for f in findings if f.verdict in QUIET]


def quiet_summary(findings: Sequence["Finding"]) -> str:
    """``8 random (setup 5, data 3), 6 uninitialized (setup 6)``: each quiet verdict by phase."""
    parts = []
    for v in QUIET:
        phases: dict[str, int] = {}
        for f in findings:
            if f.verdict is v:
                key = "/".join(f.phases) or "-"
                phases[key] = phases.get(key, 0) + 1
        if phases:
            by = ", ".join(f"{p} {n}" for p, n in sorted(phases.items(), key=lambda kv: (-kv[1], kv[0])))
            parts.append(f"{sum(phases.values())} {v.value} ({by})")
    return ", ".join(parts)


def summary_line(report: "Report") -> str:
    """``N ops (M unique signatures): 1 raises, 2 diverges, ...``."""
    s = report.summary
    parts = [f"{s[v.value]} {v.value}" for v in Verdict if s[v.value]]
    return (f"{s['total_calls']} op calls, {s['signatures']} unique signatures "
            f"(+{s['view_calls']} view/metadata calls not replayed): " + (", ".join(parts) or "nothing recorded"))


def crash_rows(report: "Report") -> list[list[str]]:
    """Ops that raise under deterministic mode, in execution order, with their error."""
    rows = []
    for f in report.crashes():
        err = (f.strict_error or "").splitlines()[0] if f.strict_error else ""
        rows.append([str(f.first_call), f.op, where(f.locations, 1, f.sites_dropped), "/".join(f.phases), err])
    return rows


def not_crashes_line(report: "Report") -> str | None:
    """A note on ops that raise under strict mode but that deterministic mode never calls, if any."""
    ops = sorted({f.op for f in report.findings(verdicts=[Verdict.RAISES]) if not f.deterministic_path})
    if not ops:
        return None
    return (f"Not crashes: {', '.join(ops)} raise(s) under strict mode, but only the default-mode path calls "
            "them; the run recorded in deterministic mode took another path (recorded_in: default).")


COMPILED_HEAD = "Compiled code (torch.compile): recorded and audited eagerly, op by op"
COMPILED_NOTE = ("while recorded they ran as eager aten ops (Dynamo does not compile under a dispatch mode; "
                 "opaudit sets the compiler stance to force_eager), so the findings are for those ops, not for "
                 "the kernels Inductor generates; --run-check checks the step as it runs compiled")


def compiled_text(c: "CompiledCode") -> str:
    """``module MLP (compiled at train.py:12): 3 calls``."""
    where = ", ".join(x for x in (c.defined_at, f"compiled at {c.compiled_at}" if c.compiled_at else "") if x)
    return f"{c.kind} {c.name}" + (f" ({where})" if where else "") + f": {c.calls} call{'s' if c.calls != 1 else ''}"


def run_check_lines(r: "RunCheck") -> list[str]:
    """Human summary of one whole-step check."""
    on = f" on rank {r.rank}" if r.rank is not None else ""
    fresh = ", each in a fresh process" if r.fresh_processes else ""
    head = (f"{r.mode} mode{on}, {r.runs} runs{fresh}: "
            + ("bitwise reproducible" if r.reproducible else "NOT reproducible"))
    lines = [head]
    if r.compiled:
        compiles = f"; {r.compiles} graph(s) compiled over the {r.runs} runs" if r.compiles is not None else ""
        setting = ""
        if r.inductor_deterministic is not None:
            setting = f", torch._inductor.config.deterministic={r.inductor_deterministic}"
        lines.append(f"  checked the compiled step ({', '.join(r.compiled)} ran compiled{setting}; "
                     f"no dispatch mode, so final tensors only{compiles})")
    if r.error:
        lines.append(f"  could not run: {r.error}")
    if r.path_split:
        ps = r.path_split
        ops, runs, where_ = ps.get("ops"), ps.get("runs") or [1, 2], ps.get("where") or ["", ""]
        if isinstance(ops, list) and len(ops) == len(runs) == len(where_):
            ops = " vs ".join(f"{op} (run {run}{', ' + loc if loc else ''})"
                              for op, run, loc in zip(ops, runs, where_, strict=True))
        lines.append(f"  runs took different paths at op #{ps.get('index')}: {ops}")
    if r.root_cause:
        rc = r.root_cause
        at = f"{rc.get('op')} at {rc.get('where', '?')} ({', '.join(x for x in (rc.get('module'), rc.get('phase')) if x)})"
        if rc.get("inputs_identical", True):
            lines.append(f"  root cause: op #{rc.get('index')} {at}: its inputs were identical, its outputs were not")
            fd = rc.get("first_difference")
            if isinstance(fd, dict):
                lines.append(f"  before it, op #{fd.get('index')} {fd.get('op')} at {fd.get('where', '?')} already got "
                             "different inputs from outside the ops (Python or NumPy values, files, other threads)")
        else:
            lines.append(f"  first difference: op #{rc.get('index')} {at}: its inputs already differed, so the "
                         "difference came from outside the ops (Python or NumPy values, files, other threads)")
    if not r.reproducible and r.differing_ops:
        downstream = (r.root_cause or {}).get("downstream")
        more = f" ({downstream} downstream of op #{r.root_cause.get('index')})" if downstream and r.root_cause else ""
        lines.append(f"  {r.differing_ops} of {r.ops} ops differed{more}")
    if r.compared == 0:
        lines.append("  nothing to compare after the step: no return value, parameter, gradient, buffer or "
                     "optimizer state was found (only the ops were compared)")
    for m in r.mismatches[:8]:
        lines.append(f"  differs: {m}")
    if len(r.mismatches) > 8:
        lines.append(f"  ... and {len(r.mismatches) - 8} more")
    return lines


def remedy_rows(report: "Report", findings: Sequence["Finding"] | None = None) -> list[list[str]]:
    """Distinct remedies for failing findings (of ``findings``, default: every notable one): op, verdict, remedy."""
    rows, seen = [], set()
    for f in notable(report) if findings is None else findings:
        if not f.remedy or f.verdict in (Verdict.STABLE, Verdict.UNINITIALIZED, Verdict.SKIPPED):
            continue
        key = (f.op, f.verdict)  # one row per op and verdict: the worst-first finding's remedy
        if key in seen:
            continue
        seen.add(key)
        rows.append([f.op, f.verdict.value, f.remedy])
    return rows


def grouped_predictions(prediction: "Prediction", limit: int = 2) -> list[tuple["Predicted", str, int]]:
    """Rows that differ only in signature merged: ``(first row, where, signatures)``, in order."""
    groups: dict[tuple, list["Predicted"]] = {}
    for r in prediction.rows:
        groups.setdefault((r.predicted, r.here, r.op, r.dtype, r.variant, r.note), []).append(r)
    out = []
    for rows in groups.values():
        locs = list(dict.fromkeys(loc for r in rows for loc in r.locations))
        out.append((rows[0], where(locs, limit), len(rows)))
    return out


def target_name(prediction: "Prediction") -> str:
    """``NVIDIA H100 80GB HBM3, torch 2.x`` style label of the catalog's machine."""
    t = prediction.target
    return f"{t.get('gpu') or t.get('cpu') or '?'}, torch {t.get('torch')}"
