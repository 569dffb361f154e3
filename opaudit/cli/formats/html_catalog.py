"""HTML for the hardware-wide documents: a catalog, a diff of two catalogs or reports, a prediction.

Each page is built as :mod:`~opaudit.cli.formats.html` describes: a
:class:`~opaudit.cli.formats.html_page.Page` of one table of rows, with the pictures and
sections that follow it; a finding's sites, the verdict chips and the environment are
drawn as on the report page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opaudit.cli.formats.common import target_name, where
from opaudit.cli.formats.html import environment_html, site_detail, site_files, verdict_chips
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
    section,
)
from opaudit.cli.formats.html_svg import grid, transitions
from opaudit.data.prediction import UNKNOWN, predicted_rank
from opaudit.data.verdict import Verdict

if TYPE_CHECKING:
    from opaudit.data.catalog import Catalog, CatalogEntry
    from opaudit.data.diff import Diff
    from opaudit.data.prediction import Prediction


# -- catalog --------------------------------------------------------------------------------
CATALOG_COLUMNS = (
    Column("verdict", "verdict", True, style="badge"), Column("op", "op", wrap=True, style="code"),
    Column("dtype", "dtype"),
    Column("variant", "variant", wrap=True), Column("phase", "phase"),
    Column("shown by", "kind", tip="the input kind behind the verdict: OpInfo's samples or opaudit's stress inputs"),
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
    sections.append(section("Environment and settings", environment_html(env, st), open_=False))
    page = Page("catalog", f"Determinism catalog: {device}, torch {env.get('torch')}", "", notes,
                verdict_chips(counts, [v.value for v in Verdict]), table, sections,
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
        info = [("signature", "code", r.signature), ("sites", "sites", site_detail(r.sites)),
                ("catalog entry", "text", r.source), ("input kind", "text", r.input_kind), ("note", "text", r.note)]
        rows.append(Row(cells, [rank.get(r.predicted, 0), r.here.severity], r.predicted, r.phases, site_files(r.sites),
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
