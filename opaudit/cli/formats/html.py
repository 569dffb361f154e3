"""HTML for the audit report: one self-contained page of findings, and the parts other pages share.

Each page leads with its rows (findings, entries, changes, predictions, ops, events)
in a table sortable by every column, filtered by the verdict chips of the summary bar
and by phase, file and op, each row opening to its detail; pictures (inline SVG) and
the document's other sections follow. :mod:`~opaudit.cli.formats.html_page` holds the
shell, the table and the escaping; :mod:`~opaudit.cli.formats.html_svg` the pictures;
this module the report page and what the other pages reuse of it (a finding's detail,
sites, verdict chips, the environment); :mod:`~opaudit.cli.formats.html_catalog` the
catalog, diff and prediction pages, :mod:`~opaudit.cli.formats.html_replay` and
:mod:`~opaudit.cli.formats.html_compare` a capsule's replay and a trace comparison.

Adding a document kind is one function: build a
:class:`~opaudit.cli.formats.html_page.Page` (title, chips, a
:class:`~opaudit.cli.formats.html_page.Table` of :class:`~opaudit.cli.formats.html_page.Row`\\ s,
sections) from the document's record, return ``page.html()``, and name the function
in :data:`~opaudit.cli.formats.registry.RENDERERS`. Renderers read records only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opaudit.cli.formats import batch_invariance as batch_text
from opaudit.cli.formats import distributed
from opaudit.cli.formats.common import (
    COMPILED_HEAD,
    COMPILED_NOTE,
    calls_text,
    compiled_text,
    not_crashes_line,
    remedy_rows,
    run_check_lines,
    summary_line,
    verdict_text,
    where,
)
from opaudit.cli.formats.html_page import (
    Column,
    Page,
    Row,
    Table,
    badge,
    code,
    esc,
    kv_table,
    num,
    plain_table,
    pre,
    section,
)
from opaudit.cli.formats.html_svg import Bar, call_strip, log_bars, spread
from opaudit.data.invariance import OP_VERDICTS
from opaudit.data.verdict import Verdict

if TYPE_CHECKING:
    from opaudit.data.findings import Finding
    from opaudit.data.invariance import BatchInvariance, BatchOp
    from opaudit.data.report import Report
    from opaudit.data.runcheck import RunCheck
    from opaudit.data.site import Site

CHART_ROWS = 30
"""Bars per chart: the signatures that matter most (furthest from 1x, largest divergence); the table has all."""


# -- report -------------------------------------------------------------------------------
FINDING_COLUMNS = (
    Column("verdict", "verdict", True, "worst first when sorted descending", style="badge"),
    Column("op", "op", style="code"),
    Column("calls", "calls", True, "calls of this signature in the recorded steps"),
    Column("phase", "phase"),
    Column("where", "where", tip="the user's source line (a backward op: the forward line that made it)",
           wrap=True),
    Column("module", "module", wrap=True),
    Column("default", "default", True, "k/N: replays of N, deterministic mode off, whose bits differed"),
    Column("determ.", "determ", True, "k/N with use_deterministic_algorithms(True)"),
    Column("max |diff|", "diff", True),
    Column("det. cost", "cost", True, "deterministic-mode time over default time"),
    Column("#", "first", True, "the signature's first call in the step's order"),
)


def _ratio(k_of_n: str) -> float | None:
    try:
        k, n = k_of_n.split("/", 1)
        return int(k) / max(int(n), 1)
    except (ValueError, AttributeError):
        return None


def _site_parts(s: "Site") -> tuple[str, str]:
    """A site as ``(location, more)``: ``file:line`` (``user.py:3 via generated.py:1``), then whether it is a
    recomputation (checkpointing), the forward line of the node a Python ``backward()`` belongs to, the function
    and the module."""
    here = f"{s.file}:{s.line}"
    location = f"{s.caller.file}:{s.caller.line} via {here}" if s.caller is not None else here
    more = ["recomputed" if s.recomputed else "",
            f"backward of {s.node.file}:{s.node.line}" if s.node is not None else "",
            f"in {s.function}" if s.function else "", s.module]
    return location, ", ".join(x for x in more if x)


def site_detail(sites: Sequence["Site"], dropped: int = 0) -> list[tuple[str, str]]:
    """Sites as a detail's ``sites`` value: ``(location, more)`` each, and how many were not kept."""
    return [_site_parts(s) for s in sites] + ([(f"{dropped} more site(s)", "not kept")] if dropped else [])


def site_files(sites: Sequence["Site"]) -> list[str]:
    """The files of ``sites`` (a generated file's caller's), once each in order: a row's file filter."""
    return list(dict.fromkeys(s.caller.file if s.caller is not None else s.file for s in sites))


def finding_detail(f: "Finding") -> list[tuple[str, str, Any]]:
    """What a finding holds beyond its row: every site, the measurements in full, PyTorch's own words, the remedy.

    (The row above it shows the verdict, op, calls, phases, ``k/N``, max |diff| and cost.)
    """
    diverged = f.diverges or f.diverges_deterministic
    checked = calls_text(f)
    if f.checked_calls:
        checked += f" (checked: {', '.join(map(str, f.checked_calls))}"
        checked += f"; diverged: {', '.join(map(str, f.diverging_calls))})" if f.diverging_calls else ")"
    timing = ""
    if f.time_default_us is not None:
        timing = f"{num(f.time_default_us)} µs default, {num(f.time_deterministic_us)} µs deterministic"
    ranks = [f"rank {o.rank}: {o.verdict.value} {o.default_diverged}"
             + (f" / {o.deterministic_diverged}" if o.deterministic_diverged else "")
             + (f" ({o.reason})" if o.reason else "") for o in f.ranks]
    return [
        ("meaning", "text", f.verdict.meaning if f.verdict is not Verdict.STABLE else ""),
        ("signature", "code", f.signature),
        ("device", "text", f.device if f.device != "cpu" else ""),
        ("sites", "sites", site_detail(f.sites, f.sites_dropped)),
        ("modules", "text", ", ".join(f.modules) if len(f.modules) > 2 else ""),
        ("reason", "text", f.reason),
        ("replays that differed", "text", f"{f.default_diverged} default, {f.deterministic_diverged or '-'} "
                                          "deterministic" if diverged else ""),
        ("max |diff|", "text", f"{num(f.max_abs_diff)} ({f.frac_differing:.3g} of the elements differed)"
         if diverged and f.max_abs_diff is not None and f.frac_differing is not None else ""),
        ("outputs that differed", "text", ", ".join(f.outputs)),
        ("calls checked", "text", checked),
        ("timing", "text", timing),
        ("recorded in", "text", ", ".join(f.recorded_in) if len(f.recorded_in) == 1 else ""),
        ("RNG", "text", "draws from the RNG" if f.rng else ""),
        ("cuDNN", "text", ", ".join(f"{k}: {v}" for k, v in f.cudnn)),
        ("per rank", "lines", ranks),
        ("across ranks", "text", f.cross_rank),
        ("strict-mode alert", "text", f.alert_kind or ""),
        ("PyTorch's error", "pre", f.strict_error or ""),
        ("warnings", "pre", list(f.warnings)),
        ("what to do", "text", f.remedy),
    ]


def finding_row(f: "Finding") -> Row:
    """A finding as a row of the findings table."""
    cost = f.det_cost
    diverged = f.diverges or f.diverges_deterministic
    qualifier = verdict_text(f)[len(f.verdict.value):].strip()
    cells = [
        (f.verdict.value, qualifier, calls_text(f)), f.op, f.calls, "/".join(f.phases),
        where(f.locations, 2, f.sites_dropped), ", ".join(f.modules[:2]) or "-",
        f.default_diverged or "-", f.deterministic_diverged or "-",
        num(f.max_abs_diff) if diverged else "-", f"{cost:.2f}x" if cost is not None else "-", f.first_call,
    ]
    keys = [f.verdict.severity, None, None, None, None, None, _ratio(f.default_diverged),
            _ratio(f.deterministic_diverged), None, cost]
    return Row(cells, keys, f.verdict.value, f.phases, site_files(f.sites), finding_detail(f), f.id)


def verdict_chips(counts: dict[str, int], names: Sequence[str]) -> list[tuple[str, str, int]]:
    """The summary bar's chips: one per verdict in ``names``, with its count."""
    return [(v, v, counts.get(v, 0)) for v in names]


def _step_strip(report: "Report") -> str:
    total = report.total_calls or max((f.first_call for f in report.all_findings), default=0)
    found = [f for f in report.all_findings if f.first_call > 0]
    if not found or total < 1:
        return ""
    marks = [(f.first_call, f.verdict.value, f"#{f.first_call} {f.op} at {where(f.locations, 1, f.sites_dropped)}")
             for f in found]
    phases = [(f.first_call, f.phases[0]) for f in found if len(f.phases) == 1]
    svg = call_strip(marks, total, phases, "Where in the step each signature is first called, coloured by verdict",
                     {v.value: v.severity for v in Verdict})
    return (f'<div class="fig">{svg}</div><p class="cap">Each mark is a signature at its first call, in the order '
            f"of the step's {total} recorded op calls (view and metadata calls not counted), coloured by verdict; "
            "stable ones are the low light marks (hover a mark: how many, and which). Bands: the phase of most of "
            "the signatures first called there.</p>")


def _bar_label(f: "Finding") -> str:
    """``aten.mm.default model.py:33``: the op and the file name and line of its first site."""
    s = f.sites[0] if f.sites else None
    return f"{f.op} {s.file.rsplit('/', 1)[-1]}:{s.line}" if s else f.op


def _cost_chart(report: "Report") -> str:
    timed = [f for f in report.all_findings if f.det_cost is not None and f.det_cost > 0]
    if not timed:
        return ('<p class="empty">No timings in this report (audited with --no-timing, or nothing was '
                "replayed).</p>")
    shown = sorted(timed, key=lambda f: (-abs(math.log(f.det_cost or 1)), f.op, f.id))[:CHART_ROWS]
    shown.sort(key=lambda f: (-(f.det_cost or 0), f.op, f.id))
    bars = [Bar(_bar_label(f), f.det_cost or 1, f.verdict.value,
                f"{f.op} at {where(f.locations, 1, f.sites_dropped)} ({f.verdict.value}): {f.det_cost:.3g}x "
                f"({num(f.time_default_us)} µs default, {num(f.time_deterministic_us)} µs deterministic)",
                f"{f.det_cost:.3g}x") for f in shown]
    svg = log_bars(bars, "Deterministic-mode cost per op signature, log scale", ref=1.0)
    what = f"the {len(shown)} furthest from 1x of {len(timed)} timed signatures" if len(timed) > len(shown) else (
        f"all {len(timed)} timed signatures")
    return (f'<div class="fig">{svg}</div><p class="cap">Time with use_deterministic_algorithms(True) over the '
            f"default time, per signature (log scale; right of the line: deterministic mode is slower): {what}. "
            "Colour: the verdict.</p>")


def _divergence_chart(report: "Report") -> str:
    diverged = [f for f in report.all_findings
                if (f.diverges or f.diverges_deterministic) and f.max_abs_diff and f.max_abs_diff > 0
                and math.isfinite(f.max_abs_diff)]
    if not diverged:
        return '<p class="empty">No signature gave different bits from run to run.</p>'
    shown = sorted(diverged, key=lambda f: (-(f.max_abs_diff or 0), f.op, f.id))[:CHART_ROWS]
    bars = [Bar(_bar_label(f), f.max_abs_diff or 0, f.verdict.value,
                f"{f.op} at {where(f.locations, 1, f.sites_dropped)} ({f.verdict.value}): max |diff| "
                f"{num(f.max_abs_diff)}, {f.default_diverged or '-'} default, {f.deterministic_diverged or '-'} "
                f"deterministic"
                + (f", {f.frac_differing:.3g} of the elements" if f.frac_differing is not None else ""),
                num(f.max_abs_diff)) for f in shown]
    svg = log_bars(bars, "Divergence magnitude per op signature: max |diff| between runs, log scale")
    what = f"the {len(shown)} largest of {len(diverged)}" if len(diverged) > len(shown) else f"all {len(diverged)}"
    return (f'<div class="fig">{svg}</div><p class="cap">The largest absolute difference between two replays\' '
            f"outputs, per signature that diverged (log scale): {what}.</p>")


def _cause_lines(rc: Any) -> list[str]:
    where_ = rc.get("where", "?")
    ctx = " · ".join(str(x) for x in (rc.get("module"), rc.get("phase")) if x)
    return [f"op #{rc.get('index')} {rc.get('op')}", f"at {where_}"] + ([ctx] if ctx else [])


def _short(mismatch: str) -> str:
    """``grad of model.users (31715 of 64000 ...)`` -> ``grad of model.users``: the box; the rest is its tooltip."""
    return mismatch.split(" (", 1)[0]


def _spread_picture(rc: Any, downstream_lines: list[str], mismatches: Sequence[str], label: str) -> str:
    ends = [_short(m) for m in mismatches[:8]]
    svg = spread(_cause_lines(rc), downstream_lines, ends, label, more=max(len(mismatches) - 8, 0))
    return f'<div class="fig">{svg}</div>'


def run_check_html(r: "RunCheck") -> str:
    """One whole-step check: its outcome, what differed, and the path from the root cause to the outputs."""
    lines = run_check_lines(r)
    cls = "good" if r.reproducible else "bad"
    out = [f'<h3 class="{cls}">{esc(lines[0])}</h3>']
    if len(lines) > 1:
        out.append("<ul>" + "".join(f"<li>{esc(line.strip())}</li>" for line in lines[1:]) + "</ul>")
    rc = r.root_cause
    if rc and not r.reproducible:
        downstream = rc.get("downstream")
        middle = [f"{downstream} op(s) downstream" if downstream is not None else "later ops",
                  f"{r.differing_ops} of {r.ops} ops differed"]
        out.append(_spread_picture(rc, middle, r.mismatches,
                                   f"{r.mode} mode: from the root cause to the outputs that differed"))
        out.append('<p class="cap">From the root cause (the first op whose inputs were identical and whose outputs '
                   "were not) through the ops its difference reached, to the tensors that differed after the step "
                   "(hover a box for its full text).</p>")
    if r.collectives:
        out.append("<h3>Collective calls</h3>" + pre(_yamlish(r.collectives)))
    return "".join(out)


def _yamlish(value: Any, indent: int = 0) -> str:
    """A nested mapping as indented ``key: value`` lines (for the few free-form sections of a report)."""
    pad = "  " * indent
    if isinstance(value, dict):
        return "\n".join(f"{pad}{k}:" + (("\n" + _yamlish(v, indent + 1)) if isinstance(v, (dict, list)) and v
                                          else f" {v}") for k, v in value.items())
    if isinstance(value, list):
        return "\n".join(f"{pad}-" + (("\n" + _yamlish(v, indent + 1)) if isinstance(v, (dict, list)) and v
                                      else f" {v}") for v in value)
    return f"{pad}{value}"


BATCH_COLUMNS = (
    Column("verdict", "verdict", True, style="badge"), Column("op", "op", style="code"), Column("rows that differ", "rows"),
    Column("max |diff|", "diff", True), Column("calls", "calls", True), Column("where", "where", wrap=True),
    Column("module", "module", wrap=True), Column("#", "first", True),
)


def batch_op_row(o: "BatchOp") -> Row:
    """A batch-invariance op verdict as a table row."""
    s = o.site
    severity = {v: len(OP_VERDICTS) - i for i, v in enumerate(OP_VERDICTS)}.get(o.verdict, 0)
    cells = [(o.verdict, o.reason, ""), o.op, ",".join(map(str, o.variant_rows)) or "-", num(o.max_abs_diff),
             o.calls, s.location if s else "-", (s.module if s else "") or "-", o.first_call]
    detail = [
        ("signature", "code", o.signature),
        ("at fewer rows", "lines", [f"{r} row(s): {sig}" for r, sig in o.row_signatures]),
        ("sites", "sites", site_detail(o.sites)),
        ("reason", "text", o.reason),
        ("what to do", "text", o.remedy),
    ]
    return Row(cells, [severity], o.verdict, (), [s.file for s in o.sites], detail, o.id)


def batch_section(bi: "BatchInvariance", as_main: bool = False) -> tuple[str, Table]:
    """The batch-invariance check: each row count's outcome and root-cause path, and its op table."""
    out = [f'<h3 class="{"good" if bi.invariant else "bad"}">{esc(batch_text.headline(bi))}</h3>']
    for c in bi.checks:
        lines = batch_text.check_lines(c)
        out.append(f"<p>{esc(lines[0])}</p>")
        if len(lines) > 1:
            out.append("<ul>" + "".join(f"<li>{esc(line.strip())}</li>" for line in lines[1:]) + "</ul>")
        if c.root_cause and not c.invariant:
            middle = [f"{c.root_cause.get('downstream', 0)} later op(s)", f"{c.differing_ops} of {c.ops} ops differed"]
            out.append(_spread_picture(c.root_cause, middle, c.mismatches,
                                       f"{c.rows} rows: from the root cause to the outputs that differed"))
    out.append(f"<p>{esc(batch_text.counts_line(bi))}</p>")
    table = Table("batch-ops", BATCH_COLUMNS, [batch_op_row(o) for o in bi.ops], filterable=as_main,
                  empty="No op was recorded.")
    return "".join(out), table


def environment_html(env: Any, settings: Any, warnings: Sequence[str] = ()) -> str:
    """The environment fingerprint and the settings as tables, under the warnings about them."""
    parts = []
    if warnings:
        parts.append("<ul>" + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul>")
    parts.append("<h3>Environment</h3>" + kv_table(sorted((str(k), v) for k, v in env.items())))
    if settings:
        parts.append("<h3>Settings</h3>" + kv_table(sorted((str(k), v) for k, v in settings.items())))
    return "".join(parts)


def _crash_section(report: "Report") -> str:
    """Will deterministic mode crash this run? One row per op and PyTorch error, in execution order (a model with
    many signatures of one raising op would otherwise repeat PyTorch's paragraph for each)."""
    crashes = report.crashes()
    if not crashes:
        body = "<p>No op raises under torch.use_deterministic_algorithms(True).</p>"
    else:
        groups: dict[tuple[str, str], list[Finding]] = {}
        for f in crashes:
            groups.setdefault((f.op, f.strict_error or ""), []).append(f)
        body = plain_table(
            ("first call", "op", "signatures", "where", "phase", "PyTorch's error"),
            [(", ".join(f"#{f.first_call}" for f in fs[:5]) + (f" +{len(fs) - 5}" if len(fs) > 5 else ""), code(op),
              str(len(fs)), esc(where(list(dict.fromkeys(loc for f in fs for loc in f.locations)), 3)),
              esc("/".join(dict.fromkeys(p for f in fs for p in f.phases))), pre(error))
             for (op, error), fs in groups.items()])
    note = not_crashes_line(report)
    return body + (f"<p>{esc(note)}</p>" if note else "")


def _report_sections(report: "Report") -> list[str]:
    """Everything after the findings table: pictures, crash list, run checks, distributed job, batch invariance,
    compiled code, remedies, environment."""
    sections = [
        section("Where in the step", _step_strip(report) or '<p class="empty">No calls recorded.</p>', "step"),
        section("Deterministic-mode cost per op", _cost_chart(report), "cost"),
        section("Divergence magnitude per op", _divergence_chart(report), "divergence"),
        section("Will deterministic mode crash this run?", _crash_section(report), "crashes"),
    ]
    if report.run_checks:
        sections.append(section("Whole-step reproducibility", "".join(run_check_html(r) for r in report.run_checks),
                                "run-check"))
    if report.distributed:
        lines = distributed.lines(report)
        sections.append(section("Distributed job", f"<p>{esc(lines[0])}</p><ul>"
                                + "".join(f"<li>{esc(line.strip())}</li>" for line in lines[1:]) + "</ul>",
                                "distributed"))
    if report.batch_invariance is not None:
        body, batch_table = batch_section(report.batch_invariance)
        sections.append(section("Batch invariance", body + batch_table.html(), "batch-invariance"))
    if report.compiled:
        sections.append(section(COMPILED_HEAD, "<ul>" + "".join(f"<li>{esc(compiled_text(c))}</li>"
                                                                for c in report.compiled)
                                + f"</ul><p>{esc(COMPILED_NOTE[0].upper() + COMPILED_NOTE[1:])}.</p>", "compiled"))
    remedies = remedy_rows(report)
    if remedies:
        sections.append(section("What to do", plain_table(("op", "verdict", "remedy"),
                                                          [(code(op), badge(v), esc(text)) for op, v, text in remedies]),
                                "remedies"))
    sections.append(section("Environment and settings",
                            environment_html(report.environment, report.settings, report.env_warnings), "environment",
                            open_=bool(report.env_warnings)))
    return sections


def report(report: "Report") -> str:
    """The audit report as one HTML page: the findings table first, the outcome above it, then
    :func:`_report_sections`. A batch-invariance check's report (it replays nothing) is its op table."""
    env, st = report.environment, report.settings
    device = env.get("gpu") or env.get("cpu")
    script = st.get("script") or "script"
    notes = []
    if not report.complete:
        notes.append('<span class="bad">Incomplete</span>: the audit was interrupted; this lists what was '
                     "classified so far.")
    meta: dict[str, Any] = {"summary": report.summary, "complete": report.complete}
    if report.batch_invariance is not None and not report.all_findings:
        body, table = batch_section(report.batch_invariance, as_main=True)
        counts = report.batch_invariance.counts()
        return Page("report", f"opaudit batch invariance: {script}",
                    f"torch {env.get('torch')} on {device}, {env.get('threads')} threads",
                    notes + [esc(batch_text.headline(report.batch_invariance))],
                    verdict_chips(counts, OP_VERDICTS), table,
                    [section("Batch invariance", body),
                     section("Environment", environment_html(env, st, report.env_warnings), open_=False)],
                    {**meta, "batch_invariance": counts}).html()
    crashes = report.crashes()
    notes.append(f'<span class="bad">Deterministic mode would crash this run</span> at {len(crashes)} op(s): '
                 'see <a href="#crashes">the list</a>.' if crashes
                 else "No op raises under torch.use_deterministic_algorithms(True).")
    notes += [f'<a href="#run-check">Whole step</a>, {esc(run_check_lines(r)[0])}' for r in report.run_checks]
    if report.batch_invariance is not None:
        notes.append(esc(batch_text.headline(report.batch_invariance)))
    table = Table("findings", FINDING_COLUMNS, [finding_row(f) for f in report.all_findings], filterable=True,
                  empty="Nothing was recorded.")
    return Page("report", f"opaudit report: {script}",
                f"torch {env.get('torch')} on {device}, {env.get('threads')} threads; "
                f"{st.get('reps')} replays per mode. {summary_line(report)}",
                notes, verdict_chips(report.summary, [v.value for v in Verdict]), table, _report_sections(report),
                meta).html()
