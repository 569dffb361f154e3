"""HTML for every document: one self-contained page per report, catalog, diff and prediction.

Each page leads with its rows (findings, entries, changes, predictions) in a table
sortable by every column, filtered by the verdict chips of the summary bar and by
phase, file and op, each row opening to its detail; pictures (inline SVG) and the
document's other sections follow. :mod:`~opaudit.cli.formats.html_page` holds the
shell, the table and the escaping; :mod:`~opaudit.cli.formats.html_svg` the pictures.

Adding a document kind is one function here: build a
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
    target_name,
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
from opaudit.cli.formats.html_svg import Bar, call_strip, grid, log_bars, spread, transitions
from opaudit.data.invariance import OP_VERDICTS
from opaudit.data.prediction import UNKNOWN, predicted_rank
from opaudit.data.verdict import Verdict

if TYPE_CHECKING:
    from opaudit.data.catalog import Catalog, CatalogEntry
    from opaudit.data.diff import Diff
    from opaudit.data.findings import Finding
    from opaudit.data.invariance import BatchInvariance, BatchOp
    from opaudit.data.prediction import Prediction
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


def _sites(sites: Sequence["Site"], dropped: int = 0) -> list[tuple[str, str]]:
    return [_site_parts(s) for s in sites] + ([(f"{dropped} more site(s)", "not kept")] if dropped else [])


def _files(sites: Sequence["Site"]) -> list[str]:
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
        ("sites", "sites", _sites(f.sites, f.sites_dropped)),
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
    return Row(cells, keys, f.verdict.value, f.phases, _files(f.sites), finding_detail(f), f.id)


def _verdict_chips(counts: dict[str, int], names: Sequence[str]) -> list[tuple[str, str, int]]:
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
        ("sites", "sites", _sites(o.sites)),
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


def _environment(env: Any, settings: Any, warnings: Sequence[str] = ()) -> str:
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
                            _environment(report.environment, report.settings, report.env_warnings), "environment",
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
                    _verdict_chips(counts, OP_VERDICTS), table,
                    [section("Batch invariance", body),
                     section("Environment", _environment(env, st, report.env_warnings), open_=False)],
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
                notes, _verdict_chips(report.summary, [v.value for v in Verdict]), table, _report_sections(report),
                meta).html()


# -- catalog --------------------------------------------------------------------------------
CATALOG_COLUMNS = (
    Column("verdict", "verdict", True, style="badge"), Column("op", "op", wrap=True, style="code"),
    Column("dtype", "dtype"),
    Column("variant", "variant", wrap=True), Column("phase", "phase"), Column("shown by", "kind", tip="the input kind behind the verdict: OpInfo's samples "
                                                            "or opaudit's stress inputs"),
    Column("OpInfo entry", "source", wrap=True),
    Column("seen in", "seen", True, "swept entries whose samples ran this op"),
    Column("message", "message", tip="the deterministic-mode error, warning, or why it was skipped"),
)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else ""


def catalog_row(e: "CatalogEntry") -> Row:
    """A catalog entry as a table row."""
    message = e.error or e.warning
    kind = e.input_kind
    if e.input_kind == "stress" and e.opinfo is not None and e.opinfo is not e.verdict:
        kind = f"stress only (OpInfo samples: {e.opinfo.value})"
    cells = [(e.verdict.value, "", ""), e.op, e.dtype, e.variant, e.phase, kind, e.source, e.seen_in,
             _first_line(message)[:120]]
    detail = [
        ("signature", "code", e.signature),
        ("OpInfo samples", "badge", (e.opinfo.value, "") if e.opinfo is not None else ("none", "no sample reached it")),
        ("stress samples", "badge", (e.stress.value, "") if e.stress is not None else ("none", "no sample reached it")),
        ("alert", "text", e.alert or ""),
        ("error" if e.verdict is not Verdict.SKIPPED else "reason", "pre", e.error),
        ("warning", "pre", e.warning),
    ]
    return Row(cells, [e.verdict.severity], e.verdict.value, e.phase.split("/") if e.phase else (),
               [e.source] if e.source else (), detail, "/".join((e.op, e.dtype, e.variant)))


def _catalog_grid(catalog: "Catalog") -> str:
    by_cell: dict[tuple[str, str], list[CatalogEntry]] = {}
    for e in catalog.entries:
        by_cell.setdefault((e.op, e.dtype), []).append(e)
    ops_all = sorted({e.op for e in catalog.entries})
    ops = [op for op in ops_all if any(e.verdict is not Verdict.STABLE
                                       for (o, _), es in by_cell.items() if o == op for e in es)]
    dtypes = sorted({e.dtype for e in catalog.entries})
    cells = {}
    for key, es in by_cell.items():
        worst = max(es, key=lambda e: e.verdict.severity)
        tip = f"{key[0]} {key[1]}: " + "; ".join(f"{e.verdict.value}" + (f" ({e.variant})" if e.variant else "")
                                                  for e in es)
        cells[key] = (worst.verdict.value, tip)
    if not ops:
        return f'<p class="empty">All {len(ops_all)} ops are stable in every dtype.</p>'
    svg = grid(ops, dtypes, cells, "Ops by dtype, coloured by verdict")
    return (f'<div class="fig">{svg}</div><p class="cap">{len(ops)} ops that are not stable in every dtype (of '
            f"{len(ops_all)}; the {len(ops_all) - len(ops)} others are stable wherever measured), by dtype; a cell "
            "is the worst verdict over the op's argument variants, blank where the dtype was not measured.</p>")


def catalog(catalog: "Catalog") -> str:
    """A catalog as one HTML page: entries table, op x dtype grid, what was not swept."""
    env, st = catalog.environment, catalog.settings
    device = env.get("gpu") or env.get("cpu") or st.get("device")
    counts = catalog.summary
    notes = []
    if not catalog.complete:
        notes.append('<span class="bad">Incomplete</span>: this sweep was interrupted; resume it with --resume.')
    notes.append(esc(f"Swept: {catalog.selection}, on {st.get('device')}."))
    notes.append(esc(f"{counts['entries']} entries ({counts['ops']} distinct ops; an entry is one op, dtype and "
                     f"argument variant) from {counts['swept']} swept OpInfo entries and modules; each replayed "
                     f"{st.get('reps')} times with and without use_deterministic_algorithms(True)."))
    worst_first = sorted(catalog.entries, key=lambda e: -e.verdict.severity)  # stable: by op within a verdict
    table = Table("entries", CATALOG_COLUMNS, [catalog_row(e) for e in worst_first], filterable=True,
                  empty="The catalog holds no entry.")
    sections = [section("Ops by dtype", _catalog_grid(catalog), "grid")]
    not_swept = [s for s in catalog.swept if s.status not in ("ok", "partial")]
    sections.append(section(f"Not swept ({len(not_swept)})", plain_table(
        ("entry", "dtype", "status", "reason"),
        [(esc(s.source), esc(s.dtype), esc(s.status), esc(s.reason)) for s in not_swept])
        if not_swept else "<p>Every OpInfo entry and module ran.</p>", open_=bool(not_swept)))
    if catalog.batch_invariance:
        sections.append(section("Batch invariance", plain_table(
            ("verdict", "op", "dtype", "rows that differ", "max |diff|", "probes"),
            [(badge(e.verdict) + (f" {esc(e.reason)}" if e.reason else ""), code(e.op), esc(e.dtype),
              esc(",".join(map(str, e.variant_rows)) or "-"), esc(num(e.max_abs_diff)), esc(", ".join(e.probes)))
             for e in catalog.batch_invariance])))
    sections.append(section("Environment and settings", _environment(env, st), open_=False))
    page = Page("catalog", f"Determinism catalog: {device}, torch {env.get('torch')}", "", notes,
                _verdict_chips(counts, [v.value for v in Verdict]), table, sections,
                {"summary": counts, "complete": catalog.complete}, file_label="OpInfo entry")
    return page.html()


# -- diff -----------------------------------------------------------------------------------
def _where_file(text: str) -> str:
    """``train.py:12`` -> ``train.py``; an OpInfo entry stays as it is."""
    head, sep, tail = text.rpartition(":")
    return head if sep and tail.isdigit() else text


def diff(diff: "Diff") -> str:
    """A diff as one HTML page: the changes, the transitions, the setup fields that differ."""
    s = diff.summary
    detail = "dtype / variant" if diff.kind == "catalog" else "signature"
    where_title = "OpInfo entry" if diff.kind == "catalog" else "where"
    columns = (Column("A → B", "change"), Column("op", "op", style="code"), Column(detail, "detail", wrap=True),
               Column(where_title, "where", wrap=True),
               Column("what", "field", tip="the op's determinism verdict, or its batch-invariance verdict"),
               Column("part", "part"))
    rows = []
    for part, changes in (("changed", diff.changes), ("only in A", diff.only_a), ("only in B", diff.only_b)):
        for c in changes:
            cells = [f"{c.before} → {c.after}", c.op, c.detail, c.where, c.field, part]
            info = [("op", "code", c.op), (detail, "text", c.detail), ("A", "badge", (c.before, "")),
                    ("B", "badge", (c.after, "")), (where_title, "text", c.where), ("what changed", "text", c.field)]
            rows.append(Row(cells, (), c.transition, (), [_where_file(c.where)] if c.where else (), info,
                            f"{c.field}/{c.op}/{c.detail}"))
    transitions_ = diff.transitions()
    chips = [(t, t.replace("->", " → "), n, t.split("->")[-1]) for t, n in transitions_.items()]
    counts: dict[tuple[str, str], int] = {}
    for c in diff.all_changes:
        counts[(c.before, c.after)] = counts.get((c.before, c.after), 0) + 1
    picture = transitions(counts, "A", "B", "Verdict transitions from A to B")
    sections = [section("Transitions", (f'<div class="fig">{picture}</div><p class="cap">Each band is one '
                                        "transition, as wide as the number of ops that made it (hover for the "
                                        "count); missing: the op is in one document only.</p>")
                        if picture else "<p>No op changed verdict.</p>", "transitions")]
    fields = [("environment", f) for f in diff.environment] + [("settings", f) for f in diff.settings]
    sections.append(section("What differs between the two setups", plain_table(
        ("", "field", "A", "B"),
        [(esc(k), esc(f.name), "-" if f.before is None else code(f.before), "-" if f.after is None else code(f.after))
         for k, f in fields]) if fields else "<p>Nothing: same environment fingerprint and settings.</p>"))
    page = Page("diff", f"opaudit {diff.kind} diff", f"A: {diff.a}  B: {diff.b}",
                [esc(f"{s['changed']} ops changed verdict, {s['only_a']} are only in A, {s['only_b']} only in B, "
                     f"{s['unchanged']} are unchanged.")],
                chips, Table("changes", columns, rows, filterable=True, empty="No op changed verdict."), sections,
                {"summary": s, "a": diff.a, "b": diff.b})
    return page.html()


# -- prediction -----------------------------------------------------------------------------
PREDICTION_ORDER = tuple(sorted((*(v.value for v in Verdict), UNKNOWN), key=predicted_rank))
"""Predicted verdicts, worst first (``unknown`` after those that fail by default)."""


def prediction(prediction: "Prediction") -> str:
    """A prediction as one HTML page: each recorded signature's verdict here and the
    catalog's verdict on the target."""
    s = prediction.summary
    columns = (Column("predicted", "predicted", True, style="badge"), Column("here", "here", True, style="badge"),
               Column("op", "op", style="code"), Column("dtype", "dtype"), Column("variant", "variant", wrap=True),
               Column("match", "match"), Column("calls", "calls", True), Column("phase", "phase"),
               Column("where", "where", wrap=True), Column("note", "note"))
    rank = {v: len(PREDICTION_ORDER) - i for i, v in enumerate(PREDICTION_ORDER)}
    rows = []
    for i, r in enumerate(prediction.rows):
        cells = [(r.predicted, "", ""), (r.here.value, "", ""), r.op, r.dtype, r.variant, r.match, r.calls,
                 "/".join(r.phases), where(r.locations, 2), r.note]
        info = [("signature", "code", r.signature), ("sites", "sites", _sites(r.sites)),
                ("catalog entry", "text", r.source), ("input kind", "text", r.input_kind), ("note", "text", r.note)]
        rows.append(Row(cells, [rank.get(r.predicted, 0), r.here.severity], r.predicted, r.phases, _files(r.sites),
                        info, str(i)))
    counts: dict[tuple[str, str], int] = {}
    for r in prediction.rows:
        counts[(r.here.value, r.predicted)] = counts.get((r.here.value, r.predicted), 0) + 1
    picture = transitions(counts, "here", "predicted", "Verdicts here and predicted on the target")
    here = prediction.here
    notes = [esc(f"Recorded here on {here.get('gpu') or here.get('cpu')} (torch {here.get('torch')}); verdicts "
                 f"looked up in {prediction.catalog}. ") + "<code>unknown</code> means the catalog did not measure "
             "that op, dtype and variant: it is not a promise of stability."]
    if not prediction.complete:
        notes.insert(0, '<span class="bad">Incomplete</span>: the audit was interrupted.')
    sections = [section("Here and predicted", f'<div class="fig">{picture}</div><p class="cap">Each band joins the '
                        "verdict measured here to the one the catalog predicts on the target, as wide as the number "
                        "of signatures.</p>" if picture else "<p>Nothing was recorded.</p>", "transitions"),
                section("Target and here", "<h3>Target (the catalog's machine)</h3>"
                        + kv_table(sorted((str(k), v) for k, v in prediction.target.items()))
                        + "<h3>Here</h3>" + kv_table(sorted((str(k), v) for k, v in here.items())), open_=False)]
    page = Page("prediction", f"opaudit prediction: {target_name(prediction)}", "", notes,
                [(v, v, s.get(v, 0)) for v in PREDICTION_ORDER],
                Table("predictions", columns, rows, filterable=True, empty="Nothing was recorded."), sections,
                {"summary": s, "catalog": prediction.catalog, "complete": prediction.complete})
    return page.html()

