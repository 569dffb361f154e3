"""The capsule replay (``opaudit replay step.opcap --format html``) as one self-contained HTML page.

What differs between the machine that captured the capsule and this one comes first
(it is what explains the rows), then the summary bar per ``across`` value and the
table of every captured signature: ``across`` and the local verdict side by side,
how far the bits moved (max |diff|, max ULP, share of elements), each row opening to
its measurements and the local finding. Pictures follow: how far each op's bits
moved (log scale) and where in the step those ops sit.

A capsule is a file from another machine: every text in it (op names, sites, module
names, error texts, the source's fingerprint, the capsule's own path) is hostile input
and goes through :func:`~opaudit.cli.formats.html_page.esc` or the table's inline JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opaudit.cli.formats.common import verdict_text, where
from opaudit.cli.formats.html import CHART_ROWS, finding_detail
from opaudit.cli.formats.html_page import Column, Page, Row, Table, badge, esc, num, plain_table, section
from opaudit.cli.formats.html_svg import Bar, call_strip, log_bars
from opaudit.cli.formats.replay import frac_text, left_out_lines, machine, summary_line
from opaudit.data.across import Across

if TYPE_CHECKING:
    from opaudit.data.across import CapsuleReplay, Crossed

COLUMNS = (
    Column("across", "across", True, "this machine's bits against the source's, worst first when sorted descending",
           style="badge"),
    Column("verdict here", "verdict", True, "the audit's verdict from run to run, measured on this machine",
           style="badge"),
    Column("op", "op", style="code"),
    Column("where", "where", tip="the user's source line (a backward op: the forward line that made it)", wrap=True),
    Column("phase", "phase"),
    Column("max |diff|", "diff", True, "largest |here - source| over the outputs whose bits moved"),
    Column("max ULP", "ulp", True, "largest distance in units in the last place"),
    Column("differing", "frac", True, "largest share of an output's elements whose bits moved"),
    Column("#", "first", True, "the signature's first call in the step's order"),
)
LOCAL_TERMS = {"meaning": "verdict here", "max |diff|": "max |diff| from run to run"}
"""The local finding's detail terms, renamed where the replay's own measurements would be mistaken for them."""
NOTE_CHARS = 60
"""The ``across`` cell's note (the outputs that moved, why an op was skipped) is cut here; the detail has it all."""


def _cut(text: str, chars: int = NOTE_CHARS) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _label(r: "Crossed") -> str:
    """``aten._softmax.default step.py:32``: the op and its first site's file name and line."""
    f = r.finding
    s = f.sites[0] if f.sites else None
    if s is None:
        return f.op
    s = s.caller or s
    return f"{f.op} {s.file.rsplit('/', 1)[-1]}:{s.line}"


def _note(r: "Crossed") -> str:
    if r.across in (Across.UNSUPPORTED, Across.SKIPPED):
        return r.reason
    return ", ".join(r.outputs) if r.outputs and r.outputs != ("output",) else ""


def _moved(r: "Crossed") -> str:
    """``max |diff| 1.49012e-08, 5 ULP, 0.388021 of the elements``: the row's numbers, to 6 digits."""
    parts = [f"max |diff| {r.max_abs_diff:.6g}" if r.max_abs_diff is not None else "",
             f"{r.max_ulp} ULP" if r.max_ulp is not None else "",
             f"{r.frac_differing:.6g} of the elements" if r.frac_differing is not None else ""]
    return ", ".join(p for p in parts if p)


def replay_row(r: "Crossed") -> Row:
    """One captured signature as a row: ``across``, the local verdict, the op, where, how far its bits moved."""
    f = r.finding
    qualifier = verdict_text(f)[len(f.verdict.value):].strip()
    cells = [(r.across.value, "", _cut(_note(r))), (f.verdict.value, qualifier, ""), f.op,
             where(f.locations, 2, f.sites_dropped), "/".join(f.phases), num(r.max_abs_diff),
             "-" if r.max_ulp is None else r.max_ulp, frac_text(r.frac_differing), f.first_call or "-"]
    keys = [r.across.severity, f.verdict.severity, None, None, None, r.max_abs_diff, r.max_ulp, r.frac_differing,
            f.first_call or None]
    detail = [("across", "badge", (r.across.value, r.across.meaning)),
              ("why", "text", r.reason),
              ("bits that moved", "text", _moved(r)),
              ("modes that differed", "text", ", ".join(r.modes)),
              ("outputs that differed", "text", ", ".join(r.outputs)),
              ("modules", "text", ", ".join(f.modules) if len(f.modules) <= 2 else ""),
              *[(LOCAL_TERMS.get(term, term), kind, value) for term, kind, value in finding_detail(f)]]
    files = list(dict.fromkeys(s.caller.file if s.caller is not None else s.file for s in f.sites))
    return Row(cells, keys, r.across.value, f.phases, files, detail, f.id)


def _environment(doc: "CapsuleReplay") -> str:
    diff = doc.environment_difference
    if not diff:
        return ('<p class="good">None: the same fingerprint on both machines. Every op should be '
                "<code>same</code>; one that is not moves with something the fingerprint does not name.</p>")
    rows = [(esc(k), _value(a), _value(b)) for k, a, b in diff]
    return (plain_table(("field", "where captured", "here"), rows)
            + '<p class="cap">The fingerprint fields that differ between the machine that captured the capsule and '
              "this one: what the rows below measure.</p>")


def _value(v: Any) -> str:
    return "-" if v is None else f"<code>{esc(v)}</code>"


def _bars(doc: "CapsuleReplay", value: Callable[["Crossed"], float | None], text: Callable[[float], str],
          title: str) -> tuple[str, int, int]:
    """A log-scale bar per signature whose bits moved (largest first, :data:`CHART_ROWS` of them): the SVG, how
    many are drawn and how many have a value."""
    moved = [r for r in doc.rows if r.across is not Across.SAME and (value(r) or 0) > 0
             and math.isfinite(value(r) or 0)]
    shown = sorted(moved, key=lambda r: (-(value(r) or 0), r.finding.op, r.finding.id))[:CHART_ROWS]
    bars = [Bar(_label(r), value(r) or 0, r.across.value,
                f"{r.finding.op} at {where(r.finding.locations, 1, r.finding.sites_dropped)} ({r.across.value}, "
                f"{r.verdict.value} here): {_moved(r)}", text(value(r) or 0)) for r in shown]
    return log_bars(bars, title), len(shown), len(moved)


def _magnitude(doc: "CapsuleReplay") -> str:
    svg, shown, moved = _bars(doc, lambda r: r.max_abs_diff, num,
                              "How far each op's outputs moved between the two machines: max |diff|, log scale")
    if not svg:
        return '<p class="empty">No op gave other bits here than where captured.</p>'
    ulp, _, _ = _bars(doc, lambda r: None if r.max_ulp is None else float(r.max_ulp), lambda v: f"{v:.0f}",
                      "The same in units in the last place: max ULP, log scale")
    what = f"the {shown} largest of {moved}" if moved > shown else f"all {moved}"
    return (f'<div class="fig">{svg}</div><p class="cap">The largest |here - source| over the outputs whose bits '
            f"moved, per signature (log scale; colour: its across value): {what}. Hover a bar for its ULP and the "
            "share of elements.</p>"
            + (f'<div class="fig">{ulp}</div><p class="cap">The same outputs in units in the last place (how many '
               "representable numbers apart; an integer output: the difference), which does not depend on the "
               "values' scale.</p>" if ulp else ""))


def _step(doc: "CapsuleReplay") -> str:
    found = [r for r in doc.rows if r.finding.first_call > 0]
    if not found:
        return '<p class="empty">The capsule holds no call numbers.</p>'
    last = max(r.finding.first_call for r in found)
    marks = [(r.finding.first_call, r.across.value,
              f"#{r.finding.first_call} {r.finding.op} at {where(r.finding.locations, 1, r.finding.sites_dropped)}")
             for r in found]
    phases = [(r.finding.first_call, r.finding.phases[0]) for r in found if len(r.finding.phases) == 1]
    svg = call_strip(marks, last, phases, "Where in the step each captured signature is first called, coloured by "
                     "across", {a.value: a.severity for a in Across}, quiet=Across.SAME.value)
    return (f'<div class="fig">{svg}</div><p class="cap">Each mark is a captured signature at its first call, in the '
            f"step's order (up to call {last}), coloured by its across value; <code>same</code> ones are the low light "
            "marks (hover a mark: how many, and which). Bands: the phase of most of the signatures first called "
            "there.</p>")


def _meanings(doc: "CapsuleReplay") -> str:
    counts = doc.summary["across"]
    return plain_table(("across", "signatures", "meaning"),
                       [(badge(a.value), str(counts[a.value]), esc(a.meaning))
                        for a in sorted(Across, key=lambda a: -a.severity)])


def _fingerprints(doc: "CapsuleReplay") -> str:
    keys = sorted(set(doc.source) | set(doc.here), key=str)
    rows = [(f"<b>{esc(k)}</b>" if doc.source.get(k) != doc.here.get(k) else esc(k), _value(doc.source.get(k)),
             _value(doc.here.get(k))) for k in keys]
    settings = plain_table(("setting", "value"), [(esc(k), _value(v)) for k, v in sorted(doc.settings.items(),
                                                                                        key=lambda kv: str(kv[0]))])
    return (plain_table(("field", "where captured", "here"), rows) + "<h3>Replay settings</h3>" + settings
            if doc.settings else plain_table(("field", "where captured", "here"), rows))


def page(doc: "CapsuleReplay") -> str:
    """The replay as one HTML page: the environment difference, the summary bar per ``across`` value, every
    captured signature in a sortable, filterable table, the pictures, what was left out, both fingerprints."""
    s = doc.summary
    moved = sum(n for k, n in s["across"].items() if k in (Across.DIFFERS.value, Across.DIFFERS_DEFAULT.value))
    notes = []
    if not doc.complete:
        notes.append('<span class="bad">Incomplete</span>: the replay was interrupted; the table holds the ops '
                     "replayed so far.")
    if moved:
        notes.append(f'<span class="bad">{moved} of {s["signatures"]} signatures give other bits here</span> than on '
                     "the machine that captured the capsule.")
    elif s["across"][Across.UNSUPPORTED.value]:
        notes.append(f'<span class="bad">{s["across"][Across.UNSUPPORTED.value]} signatures do not run here</span>.')
    elif s["signatures"]:
        notes.append('<span class="good">Every op that was compared gave the source\'s bits.</span>')
    notes.append(esc(summary_line(doc)))
    chips = [(a.value, a.value, s["across"][a.value]) for a in sorted(Across, key=lambda a: -a.severity)]
    lead = [section("Environment difference (where captured → here)", _environment(doc), "environment")]
    sections = [section("How far the bits moved, per op", _magnitude(doc), "magnitude"),
                section("Where in the step", _step(doc), "step"),
                section("What the across values mean", _meanings(doc), "meanings", open_=False)]
    left = left_out_lines(doc)
    if left:
        sections.append(section("Left out of the capsule by its byte budget",
                                "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in left) + "</ul>", "left-out"))
    sections.append(section("Where captured and here", _fingerprints(doc), "fingerprints", open_=False))
    return Page("replay", f"opaudit replay: {doc.capsule}",
                f"Captured on {machine(doc.source)}; replayed on {machine(doc.here)}.", notes, chips,
                Table("ops", COLUMNS, [replay_row(r) for r in doc.rows], filterable=True,
                      empty="The capsule holds no op."), sections,
                {"summary": s, "capsule": doc.capsule, "complete": doc.complete}, lead=lead).html()
