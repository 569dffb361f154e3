"""The parts every HTML page is made of: escaping, the page shell (inline CSS and script), the
filterable table, the verdict summary bar and detail lists.

A page is one self-contained file: no request of any kind leaves it when it is opened
(no font, stylesheet, script, image or favicon is fetched; a Content-Security-Policy
``default-src 'none'`` says so to the browser too). A table's rows travel as inline JSON
that the page's script draws (:class:`Table`), sorts, filters and opens, keeping that state
in the URL fragment (``#sort=calls&dir=desc&verdict=diverges&phase=backward&file=train.py&op=index&open=ID``)
so that a link reproduces the view; without JavaScript the page shows a static copy of each
table's first rows with their details, and every picture (inline SVG).

Every text that came from outside opaudit (script paths, module and op names, error
messages, a hand-made catalog) goes through :func:`esc` (text and attribute values) or
:func:`json_script` (inline JSON): markup in it shows as text and creates no element.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
"""Characters HTML does not allow in text (C0 and C1 controls but tab and newline, DEL, lone surrogates)."""


def _visible(m: re.Match) -> str:
    n = ord(m.group())
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def esc(text: Any) -> str:
    """``text`` as HTML text or a double-quoted attribute value: ``<&>"'`` escaped, control characters
    shown as ``\\xNN`` (so that nothing in it can open a tag, end an attribute or hide itself)."""
    s = str(text).replace("\r\n", "\n")
    return html.escape(_CONTROL.sub(_visible, s), quote=True)


def json_script(data: Any) -> str:
    """``data`` as JSON that is safe inside ``<script type="application/json">``.

    ``<``, ``>`` and ``&`` are written as ``\\u003c``... so that no ``</script>`` or
    ``<!--`` in a name can end the element or change how the browser reads it, and
    everything outside ASCII is escaped (the line separators U+2028/2029 included).
    """
    text = json.dumps(data, ensure_ascii=True, sort_keys=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def code(text: Any) -> str:
    """``text`` as inline code."""
    return f"<code>{esc(text)}</code>"


def pre(text: Any) -> str:
    """``text`` as a preformatted block (error messages keep their lines)."""
    return f"<pre>{esc(text)}</pre>"


def num(x: float | None, digits: int = 3) -> str:
    """Compact number, ``-`` when missing."""
    return "-" if x is None else f"{x:.{digits}g}"


# -- verdict colours ----------------------------------------------------------------------
COLOURS = {
    "raises": "#b91c1c", "diverges_deterministic": "#7e22ce", "diverges": "#ea580c", "warns": "#b58105",
    "random": "#2563eb", "uninitialized": "#0e7490", "skipped": "#6b7280", "stable": "#15803d",
    "batch_variant": "#ea580c", "batch_invariant": "#15803d", "not_comparable": "#6b7280",
    "unknown": "#64748b", "missing": "#cbd5e1",
    "same": "#15803d", "differs": "#7e22ce", "differs_default": "#ea580c", "unsupported": "#b91c1c",
    "identical": "#15803d", "diverged": "#b91c1c", "root_cause": "#b91c1c", "first_difference": "#ea580c",
    "first_loss": "#7e22ce", "first_update": "#2563eb", "structural": "#b58105", "parted": "#6b7280",
    "final": "#0e7490",
}
"""The colour of every verdict a page shows (determinism, batch invariance, predicted ``unknown``, a diff's
``missing``, a capsule replay's ``across``, a trace comparison's verdict and events); each also has a CSS class
``v-<name>``. Text always says the verdict too."""

PHASE_COLOURS = {"setup": "#e5e7eb", "data": "#dbeafe", "forward": "#fef3c7", "backward": "#fce7f3",
                 "optimizer": "#dcfce7"}


def colour(verdict: str) -> str:
    """The colour of a verdict (grey for anything unknown, such as a hostile file's verdict)."""
    return COLOURS.get(verdict, "#9ca3af")


def badge(verdict: str, text: str | None = None) -> str:
    """A verdict as a coloured label (``text`` shown instead of the verdict's name when given)."""
    cls = f" v-{verdict}" if verdict in COLOURS else ""
    return f'<span class="v{cls}">{esc(verdict if text is None else text)}</span>'


# -- the filterable table -----------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One column of a :class:`Table`: its heading, the key it is sorted by in the fragment, how it shows."""

    title: str
    key: str
    numeric: bool = False
    """Sorted as numbers: the row's sort value for it, else its text read as a number."""
    tip: str = ""
    """What the heading means, shown on hover."""
    wrap: bool = False
    """Long values (paths, module names) may break anywhere, so that the column can be narrow."""
    style: str = "text"
    """``text``; ``code`` (an op name); ``badge``: a verdict as a coloured label, then an optional qualifier
    and note (the cell is ``(verdict, qualifier, note)``)."""


Detail = tuple
"""``(term, kind, value)``, one line of a row's detail: ``text``, ``code`` and ``pre`` take a string (``pre``
also a list of them), ``badge`` a ``(verdict, text)`` pair, ``sites`` a list of ``(location, more)`` pairs,
``lines`` a list of strings. Entries whose value is empty are left out."""

_KINDS = {"text": "t", "code": "c", "pre": "p", "badge": "b", "sites": "s", "lines": "l"}


@dataclass(frozen=True)
class Row:
    """One row of a :class:`Table`: its cells, sort values, what the filters match it by, and its detail."""

    cells: Sequence[Any]
    """Per column: a text (or number), or for a ``badge`` column ``(verdict, qualifier, note)``."""
    keys: Sequence[float | None] = ()
    """Per column, a sort value where the cell's text would not do (the verdict's severity); empty: none."""
    verdict: str = ""
    """The value the summary bar's chips filter on (a verdict, or a diff's transition)."""
    phases: Sequence[str] = ()
    files: Sequence[str] = ()
    detail: Sequence[Detail] = ()
    id: str = ""
    """Stable id of the row (kept in the fragment when the row is open)."""


NOSCRIPT_ROWS = 200
"""Rows of the copy of a table a browser without JavaScript shows (the table's own order: worst first)."""


@dataclass
class Table:
    """A sortable table whose rows open to their detail; ``filterable`` makes it the page's main table.

    The rows travel as inline JSON (strings stored once, every row's cells as indexes
    into them) and the page's script draws the rows a view shows: a 5,000-finding
    report stays a few MB and opens at once. A browser without JavaScript shows a
    static copy of the first :data:`NOSCRIPT_ROWS` rows, details open, instead.
    """

    id: str
    columns: Sequence[Column]
    rows: Sequence[Row]
    filterable: bool = False
    caption: str = ""
    empty: str = "Nothing to show."

    def html(self) -> str:
        """The table's head, its rows as inline JSON, and the static copy for a browser without JavaScript."""
        if not self.rows:
            return f'<p class="empty">{esc(self.empty)}</p>'
        heads = "".join(
            f'<th data-key="{esc(c.key)}"{" data-type=num" if c.numeric else ""} data-style="{esc(c.style)}" '
            f'aria-sort="none"{f" title={_q(c.tip)}" if c.tip else ""}><button type="button">{esc(c.title)}'
            "</button></th>" for c in self.columns)
        wrapped = ",".join(f"table.data.t-{self.id} td:nth-child({i + 1})"
                           for i, c in enumerate(self.columns) if c.wrap)
        out = [f"<style>{wrapped}{{overflow-wrap:anywhere;min-width:11em}}</style>" if wrapped else "",
               f'<table class="data t-{esc(self.id)} js{" main" if self.filterable else ""}" id="{esc(self.id)}">',
               f"<caption>{esc(self.caption)}</caption>" if self.caption else "",
               f"<thead><tr>{heads}</tr></thead></table>",
               f'<script type="application/json" id="{esc(self.id)}-data">{json_script(self.data())}</script>',
               f"<noscript>{self.static(NOSCRIPT_ROWS)}</noscript>"]
        return "".join(out)

    def data(self) -> dict[str, Any]:
        """The rows as the page's script reads them: ``s`` the strings, once each; per row ``c`` its cells,
        ``k`` its numeric columns' sort values, ``v`` its chip value, ``p`` phases, ``f`` files, ``i`` id,
        ``d`` detail (every text an index into ``s``)."""
        strings: dict[str, int] = {}

        def s(text: Any) -> int:
            text = "" if text is None else str(text)
            return strings.setdefault(text, len(strings))

        numeric = [i for i, c in enumerate(self.columns) if c.numeric]
        cells, keys, details = [], [], []
        for r in self.rows:
            cells.append([[s(x) for x in v] if c.style == "badge" and isinstance(v, tuple) else s(v)
                          for c, v in zip(self.columns, r.cells)])
            keys.append([_key(r, i) for i in numeric])
            details.append([[s(term), _KINDS[kind], _encode(kind, value, s)]
                            for term, kind, value in r.detail if value not in ("", None, (), [])])
        return {"c": cells, "k": keys, "v": [s(r.verdict) for r in self.rows],
                "p": [[s(p) for p in r.phases] for r in self.rows], "f": [[s(f) for f in r.files] for r in self.rows],
                "i": [s(r.id) for r in self.rows], "d": details, "s": list(strings)}

    def static(self, limit: int) -> str:
        """The first ``limit`` rows as plain HTML, each with its detail (what a browser without JavaScript shows)."""
        n = len(self.columns)
        heads = "".join(f"<th>{esc(c.title)}</th>" for c in self.columns)
        out = [f'<table class="data static t-{esc(self.id)}"><thead><tr>{heads}</tr></thead>']
        for r in self.rows[:limit]:
            cells = "".join(f"<td>{_cell_html(c, v)}</td>" for c, v in zip(self.columns, r.cells))
            out.append(f"<tbody><tr>{cells}</tr><tr><td colspan=\"{n}\">{detail_html(r.detail)}</td></tr></tbody>")
        out.append("</table>")
        if len(self.rows) > limit:
            out.append(f'<p class="empty">The first {limit} of {len(self.rows)} rows; the whole table, its sorting and '
                       "filters need JavaScript.</p>")
        return "".join(out)


def _key(r: Row, i: int) -> float | None:
    """Row ``r``'s sort value for column ``i``: its own, else its cell read as a number (``2.5x``, ``3``), else
    none (sorted below every number)."""
    if i < len(r.keys) and r.keys[i] is not None:
        return r.keys[i]
    m = re.match(r"\s*(-?[0-9.]+(?:e[-+]?[0-9]+)?)", str(r.cells[i]))
    try:
        return float(m.group(1)) if m else None
    except ValueError:
        return None


def _encode(kind: str, value: Any, s: Any) -> Any:
    if kind == "badge":
        return [s(value[0]), s(value[1])]
    if kind == "sites":
        return [[s(a), s(b)] for a, b in value]
    if kind == "lines" or (kind == "pre" and not isinstance(value, str)):
        return [s(x) for x in value]
    return s(value)


def _cell_html(column: Column, value: Any) -> str:
    if column.style == "badge":
        verdict, qualifier, note = (tuple(value) + ("", ""))[:3] if isinstance(value, tuple) else (value, "", "")
        return (badge(verdict) + (f" {esc(qualifier)}" if qualifier else "")
                + (f"<br><small>{esc(note)}</small>" if note else ""))
    if column.style == "code":
        return code(value)
    return esc(value)


def detail_html(detail: Sequence[Detail]) -> str:
    """A row's detail as a definition list (the static copy; the page's script draws the same)."""
    items = []
    for term, kind, value in detail:
        if value in ("", None, (), []):
            continue
        if kind == "code":
            html_ = code(value)
        elif kind == "pre":
            html_ = "".join(pre(v) for v in ([value] if isinstance(value, str) else value))
        elif kind == "badge":
            html_ = badge(value[0]) + (f" {esc(value[1])}" if value[1] else "")
        elif kind == "sites":
            html_ = '<ul class="sites">' + "".join(f"<li>{code(a)}{f' {esc(b)}' if b else ''}</li>"
                                                   for a, b in value) + "</ul>"
        elif kind == "lines":
            html_ = "<ul>" + "".join(f"<li>{esc(v)}</li>" for v in value) + "</ul>"
        else:
            html_ = esc(value)
        items.append(f"<dt>{esc(term)}</dt><dd>{html_}</dd>")
    return f'<dl class="kv">{"".join(items)}</dl>'


def _q(text: str) -> str:
    return f'"{esc(text)}"'


Chip = tuple
"""``(value, label, count)`` or ``(value, label, count, verdict)``: a chip of the summary bar filters the main
table's rows whose ``verdict`` is ``value``, and takes the colour of ``verdict`` (default: ``value``)."""


def filters(rows: Sequence[Row], chips: Sequence[Chip], chip_title: str = "verdict", file_label: str = "file") -> str:
    """The summary bar (a chip per value with its count: pressing one shows only those rows, pressing more
    adds them) and the phase, file and op filters of the main table."""
    total = sum(c[2] for c in chips) or 1
    bar = []
    x = 0.0
    for value, label, n, *rest in chips:
        if n:
            w = 100.0 * n / total
            bar.append(f'<rect x="{x:.3f}%" width="{w:.3f}%" height="10" fill="{colour(rest[0] if rest else value)}">'
                       f"<title>{esc(label)}: {n}</title></rect>")
            x += w
    out = [f'<div class="summary" role="group" aria-label="{esc(chip_title)} counts">',
           f'<svg class="stack" width="100%" height="10" role="img" aria-label="{esc(chip_title)} counts">'
           f'{"".join(bar)}</svg><div class="chips">']
    for value, label, n, *rest in chips:
        key = rest[0] if rest else value
        cls = f" v-{key}" if key in COLOURS else ""
        out.append(f'<button type="button" class="chip{cls}" data-verdict="{esc(value)}" aria-pressed="false"'
                   f'{" disabled" if not n else ""}><b>{n}</b> {esc(label)}</button>')
    out.append("</div></div>")
    phases = sorted({p for r in rows for p in r.phases}, key=_phase_order)
    files = sorted({f for r in rows for f in r.files})
    ctl = ['<div class="filters js">']
    if phases:
        ctl.append('<label>phase <select id="f-phase"><option value="">any</option>'
                   + "".join(f'<option value="{esc(p)}">{esc(p)}</option>' for p in phases) + "</select></label>")
    if files:
        ctl.append(f'<label>{esc(file_label)} <select id="f-file"><option value="">any</option>'
                   + "".join(f'<option value="{esc(f)}">{esc(f)}</option>' for f in files) + "</select></label>")
    ctl.append('<label>op <input id="f-op" type="search" placeholder="part of an op name"></label>'
               '<button type="button" id="f-reset">clear filters</button><span id="f-count" aria-live="polite"></span>'
               '<button type="button" id="f-more" hidden></button></div>')
    return "".join(out + ctl)


_PHASES = ("setup", "data", "forward", "backward", "optimizer")


def _phase_order(p: str) -> tuple[int, str]:
    return (_PHASES.index(p) if p in _PHASES else len(_PHASES), p)


def kv_table(rows: Iterable[tuple[str, Any]], headers: Sequence[str] = ("", "value")) -> str:
    """A small two-column table of plain values (an environment, settings)."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f'<table class="kv"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def plain_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A small table of cells that are already HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="kv"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def section(title: str, body: str, id: str = "", open_: bool = True) -> str:
    """A titled part of the page (collapsible: ``open_`` False starts it closed)."""
    ident = f' id="{esc(id)}"' if id else ""
    return (f'<details class="sec"{ident}{" open" if open_ else ""}><summary><h2>{esc(title)}</h2></summary>'
            f"{body}</details>")


@dataclass
class Page:
    """A whole page: its title, a subtitle, its notes and lead sections, the main table's filters and table, then
    its sections."""

    kind: str
    title: str
    subtitle: str = ""
    notes: list[str] = field(default_factory=list)
    """Short HTML paragraphs under the title: the outcome a reviewer reads first."""
    chips: Sequence[Chip] = ()
    main: Table | None = None
    sections: list[str] = field(default_factory=list)
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Machine-readable facts about the document (kind, title, counts), embedded as inline JSON."""
    file_label: str = "file"
    """What the main table's file filter is called (a catalog's rows have an OpInfo entry instead)."""
    lead: list[str] = field(default_factory=list)
    """Sections shown above the main table (a replay's environment difference: what explains its rows)."""

    def html(self) -> str:
        """The page as one self-contained HTML document."""
        body = [f"<header><h1>{esc(self.title)}</h1>"]
        if self.subtitle:
            body.append(f'<p class="sub">{esc(self.subtitle)}</p>')
        body.append("</header><main>")
        body += [f'<p class="note">{n}</p>' for n in self.notes]
        body += self.lead
        if self.main is not None:
            body.append(filters(self.main.rows, self.chips, file_label=self.file_label))
            body.append(self.main.html())
        body += self.sections
        body.append("</main><footer>Written by opaudit. This page makes no network request and works offline; "
                    "without JavaScript it lists the first rows with their details, and every picture.</footer>")
        meta = {"kind": self.kind, "title": self.title, **self.meta}
        return "".join([
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="generator" content="opaudit">',
            f"<title>{esc(self.title)}</title>",
            '<link rel="icon" href="data:,">',
            f"<style>{CSS}</style>",
            "<noscript><style>table.data>tbody>tr+tr{display:table-row}.js{display:none}"
            "table.data>tbody>tr:first-child>td:first-child::before{content:none}</style></noscript>",
            f'</head><body data-kind="{esc(self.kind)}">',
            "".join(body),
            f'<script type="application/json" id="opaudit-meta">{json_script(meta)}</script>',
            f"<script>{SCRIPT}</script>",
            "</body></html>\n",
        ])


def _verdict_css() -> str:
    return "".join(f".v-{k}{{--c:{v}}}" for k, v in COLOURS.items())


CSS = (
    "*{box-sizing:border-box}"
    "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#111827;background:#fff}"
    "header{padding:14px 24px 6px;border-bottom:1px solid #e5e7eb}h1{font-size:20px;margin:0}"
    ".sub{margin:2px 0 0;color:#4b5563}main{padding:8px 24px 24px}footer{padding:8px 24px;color:#6b7280;"
    "font-size:12px;border-top:1px solid #e5e7eb}"
    ".note{margin:6px 0}h2{font-size:16px;display:inline;margin:0}h3{font-size:14px;margin:12px 0 4px}"
    "details.sec{margin:18px 0 0}details.sec>summary{cursor:pointer;padding:4px 0;border-bottom:1px solid #e5e7eb}"
    "code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}"
    "pre{white-space:pre-wrap;word-break:break-word;background:#f9fafb;border:1px solid #e5e7eb;padding:6px;"
    "margin:2px 0;max-height:16em;overflow:auto}"
    ".v{--c:#9ca3af;display:inline-block;padding:0 6px;border-radius:9px;color:#fff;background:var(--c);"
    "font-size:12px;white-space:nowrap}"
    + _verdict_css() + ".v.v-missing{color:#1f2937}"
    ".summary{margin:10px 0 6px}.stack{display:block;border-radius:3px;background:#f3f4f6}"
    ".chips{display:flex;flex-wrap:wrap;gap:6px;margin-top:6px}"
    ".chip{border:1px solid var(--c,#9ca3af);background:#fff;border-radius:14px;padding:2px 10px;"
    "cursor:pointer;font:inherit;color:#111827}.chip b{color:var(--c,#9ca3af)}"
    ".chip[aria-pressed=true]{background:var(--c,#9ca3af);color:#fff}.chip[aria-pressed=true] b{color:#fff}"
    ".chip:disabled{opacity:.45;cursor:default}"
    ".filters{display:flex;flex-wrap:wrap;gap:12px;align-items:center;margin:6px 0 8px}"
    ".filters select,.filters input{font:inherit;max-width:24em}#f-count{color:#4b5563}"
    "table.data{border-collapse:collapse;width:100%}"
    "table.data th{position:sticky;top:0;background:#f3f4f6;text-align:left;border-bottom:1px solid #d1d5db;"
    "white-space:nowrap;padding:0}"
    "table.data th button{font:inherit;font-weight:600;background:none;border:0;padding:4px 6px;cursor:pointer;"
    "width:100%;text-align:left}"
    "th[aria-sort=ascending] button::after{content:' \\25B2'}th[aria-sort=descending] button::after{content:' \\25BC'}"
    "table.data td{padding:3px 6px;border-bottom:1px solid #f3f4f6;vertical-align:top}"
    "table.data>tbody>tr:first-child>td:first-child{white-space:nowrap}"
    "table.data>tbody>tr:first-child{cursor:pointer}table.data>tbody>tr:first-child:hover{background:#f9fafb}"
    "table.data>tbody>tr:first-child>td:first-child::before{content:'\\25B8 ';color:#6b7280}"
    "table.data>tbody.open>tr:first-child>td:first-child::before{content:'\\25BE '}"
    "table.data>tbody>tr+tr{display:none}table.data>tbody.open>tr+tr{display:table-row}"
    "table.data>tbody.open>tr:first-child{background:#eef2ff}"
    "table.data>tbody>tr+tr>td{background:#fafafa;padding:6px 12px 10px 24px}"
    ".w{word-break:break-all}"
    "dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}dl.kv dt{color:#4b5563}"
    "dl.kv dd{margin:0;min-width:0}ul.sites{margin:0;padding-left:18px}"
    "table.kv{border-collapse:collapse;margin:4px 0}table.kv th,table.kv td{border:1px solid #e5e7eb;"
    "padding:2px 8px;text-align:left;vertical-align:top}table.kv thead th{background:#f3f4f6}"
    ".fig{margin:8px 0;overflow-x:auto}.fig svg{display:block;max-width:100%;height:auto}"
    ".cap{color:#4b5563;font-size:12px;margin:2px 0 10px}.empty{color:#6b7280}"
    "svg text{font:11px system-ui,sans-serif;fill:#111827}svg .mono{font-family:ui-monospace,monospace}"
    ".bad{color:#b91c1c;font-weight:600}.good{color:#15803d;font-weight:600}"
)

SCRIPT = r"""(function(){'use strict';
var LIMIT=200,each=function(xs,f){Array.prototype.forEach.call(xs,f);};
function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;if(text!=null)e.textContent=text;return e;}
function badge(v){return el('span','v v-'+v.replace(/[^a-z_]/g,''),v);}
function Grid(t){var g=this,d=JSON.parse(document.getElementById(t.id+'-data').textContent),ki=0;
g.t=t;g.d=d;g.S=d.s;g.n=d.c.length;g.rows=[];g.open={};g.limit=LIMIT;g.order=g.identity();g.shown=0;g.matched=g.n;
g.heads=Array.prototype.slice.call(t.tHead.rows[0].cells);
g.cols=g.heads.map(function(h){var num=h.getAttribute('data-type')==='num';
return {key:h.getAttribute('data-key'),num:num,style:h.getAttribute('data-style'),ki:num?ki++:-1};});
g.opCol=g.col('op');
function hit(ev){var tr=ev.target.closest('tr'),b=tr&&tr.parentNode;
return b&&b.tagName==='TBODY'&&b.parentNode===t&&b.rows[0]===tr?b:null;}
t.addEventListener('click',function(ev){var b=hit(ev);if(b)g.toggle(b,!b.classList.contains('open'));});
t.addEventListener('keydown',function(ev){var b=hit(ev);if(b&&(ev.key==='Enter'||ev.key===' ')){ev.preventDefault();
g.toggle(b,!b.classList.contains('open'));}});}
Grid.prototype.identity=function(){var o=[];for(var i=0;i<this.n;i++)o.push(i);return o;};
Grid.prototype.col=function(k){for(var i=0;i<this.cols.length;i++)if(this.cols[i].key===k)return i;return -1;};
Grid.prototype.text=function(r,i){var c=this.d.c[r][i],S=this.S;return Array.isArray(c)?c.map(function(x){return S[x];}).join(' '):S[c];};
Grid.prototype.sort=function(i,desc){var g=this,c=g.cols[i],K=g.d.k,ks=[],r;
for(r=0;r<g.n;r++){if(c.num){var v=K[r][c.ki];ks.push(v==null?-Infinity:v);}else ks.push(g.text(r,i).toLowerCase());}
g.order=g.identity().sort(function(a,b){var x=ks[a],y=ks[b],o=x<y?-1:(x>y?1:0);return (desc?-o:o)||a-b;});
g.heads.forEach(function(h,j){h.setAttribute('aria-sort',i===j?(desc?'descending':'ascending'):'none');});};
Grid.prototype.unsort=function(){this.order=this.identity();this.heads.forEach(function(h){h.setAttribute('aria-sort','none');});};
Grid.prototype.matches=function(r,f){var d=this.d,S=this.S;if(!f)return true;
if(f.verdict.length&&f.verdict.indexOf(S[d.v[r]])<0)return false;
if(f.phase&&!d.p[r].some(function(x){return S[x]===f.phase;}))return false;
if(f.file&&!d.f[r].some(function(x){return S[x]===f.file;}))return false;
return !f.op||(this.opCol>=0&&this.text(r,this.opCol).toLowerCase().indexOf(f.op.toLowerCase())>=0);};
Grid.prototype.render=function(f){var g=this,show=[],frag=document.createDocumentFragment();g.matched=0;
g.order.forEach(function(r){if(g.matches(r,f)){g.matched++;if(show.length<g.limit)show.push(r);}});
each(Array.prototype.slice.call(g.t.tBodies),function(b){g.t.removeChild(b);});
show.forEach(function(r){frag.appendChild(g.row(r));});g.t.appendChild(frag);g.shown=show.length;};
Grid.prototype.row=function(r){var g=this,S=g.S,b=g.rows[r];if(b)return b;
b=el('tbody');b._r=r;b.setAttribute('data-id',S[g.d.i[r]]);b.setAttribute('data-verdict',S[g.d.v[r]]);
var tr=el('tr');tr.tabIndex=0;g.cols.forEach(function(c,i){var td=el('td'),v=g.d.c[r][i];
if(c.style==='badge'){var a=Array.isArray(v)?v:[v];td.appendChild(badge(S[a[0]]));
if(a.length>1&&S[a[1]])td.appendChild(document.createTextNode(' '+S[a[1]]));
if(a.length>2&&S[a[2]]){td.appendChild(el('br'));td.appendChild(el('small',null,S[a[2]]));}}
else if(c.style==='code')td.appendChild(el('code',null,S[v]));else td.textContent=S[v];tr.appendChild(td);});
b.appendChild(tr);g.rows[r]=b;if(g.open[S[g.d.i[r]]])g.toggle(b,true,true);return b;};
Grid.prototype.detail=function(r){var g=this,S=g.S,dl=el('dl','kv');g.d.d[r].forEach(function(e){var k=e[1],v=e[2],dd=el('dd');
dl.appendChild(el('dt',null,S[e[0]]));
if(k==='c')dd.appendChild(el('code',null,S[v]));
else if(k==='p')(Array.isArray(v)?v:[v]).forEach(function(x){dd.appendChild(el('pre',null,S[x]));});
else if(k==='b'){dd.appendChild(badge(S[v[0]]));if(S[v[1]])dd.appendChild(document.createTextNode(' '+S[v[1]]));}
else if(k==='s'){var ul=el('ul','sites');v.forEach(function(x){var li=el('li');li.appendChild(el('code',null,S[x[0]]));
if(S[x[1]])li.appendChild(document.createTextNode(' '+S[x[1]]));ul.appendChild(li);});dd.appendChild(ul);}
else if(k==='l'){var u=el('ul');v.forEach(function(x){u.appendChild(el('li',null,S[x]));});dd.appendChild(u);}
else dd.textContent=S[v];dl.appendChild(dd);});
var tr=el('tr'),td=el('td');td.colSpan=g.cols.length;td.appendChild(dl);tr.appendChild(td);return tr;};
Grid.prototype.toggle=function(b,on,quiet){var id=this.S[this.d.i[b._r]];
if(on&&b.rows.length<2)b.appendChild(this.detail(b._r));b.classList.toggle('open',on);
b.rows[0].setAttribute('aria-expanded',on?'true':'false');if(on)this.open[id]=1;else delete this.open[id];
if(!quiet&&this.onchange)this.onchange();};
var grids=[],main=null;
each(document.querySelectorAll('table.data.js'),function(t){var g=new Grid(t);grids.push(g);
if(t.classList.contains('main'))main=g;
g.heads.forEach(function(h,i){h.querySelector('button').addEventListener('click',function(){
var cur=h.getAttribute('aria-sort'),desc=cur==='none'?g.cols[i].num:cur==='ascending';g.sort(i,desc);
if(g===main){st.sort=g.cols[i].key;st.dir=desc?'desc':'';apply();save();}else g.render(null);});});});
var st={sort:'',dir:'',verdict:[],phase:'',file:'',op:'',open:[],show:''};
function apply(){if(!main)return;main.limit=st.show==='all'?Infinity:LIMIT;main.render(st);
var c=document.getElementById('f-count'),m=document.getElementById('f-more');
if(c)c.textContent=main.matched===main.n?main.n+' rows':main.matched+' of '+main.n+' rows shown';
if(m){m.hidden=main.shown>=main.matched;m.textContent='list all '+main.matched+' (the first '+main.shown+' are listed)';}
each(document.querySelectorAll('.chip'),function(ch){
ch.setAttribute('aria-pressed',st.verdict.indexOf(ch.getAttribute('data-verdict'))>=0?'true':'false');});}
function save(){if(!main)return;st.open=Object.keys(main.open);var p=[];function add(k,v){if(v)p.push(k+'='+encodeURIComponent(v));}
add('sort',st.sort);add('dir',st.dir);add('verdict',st.verdict.join(','));add('phase',st.phase);add('file',st.file);
add('op',st.op);add('show',st.show);add('open',st.open.join(','));var h=p.length?'#'+p.join('&'):'';
if(h!==location.hash){try{history.replaceState(null,'',h||location.pathname+location.search);}catch(e){location.hash=h;}}}
function load(){var p={};location.hash.replace(/^#/,'').split('&').forEach(function(kv){if(!kv)return;var i=kv.indexOf('=');
try{p[i<0?kv:kv.slice(0,i)]=i<0?'':decodeURIComponent(kv.slice(i+1));}catch(e){}});
st.sort=p.sort||'';st.dir=p.dir==='desc'?'desc':'';st.verdict=p.verdict?p.verdict.split(','):[];st.phase=p.phase||'';
st.file=p.file||'';st.op=p.op||'';st.show=p.show==='all'?'all':'';st.open=p.open?p.open.split(','):[];
if(!main)return;var i=main.col(st.sort);if(i>=0)main.sort(i,st.dir==='desc');else main.unsort();
main.open={};st.open.forEach(function(id){main.open[id]=1;});
main.rows.forEach(function(b){if(b)main.toggle(b,!!main.open[main.S[main.d.i[b._r]]],true);});
['phase','file','op'].forEach(function(k){var e=document.getElementById('f-'+k);if(e)e.value=st[k];});apply();}
grids.forEach(function(g){if(g!==main){g.limit=Infinity;g.render(null);}});
if(main)main.onchange=save;
each(document.querySelectorAll('.chip'),function(ch){ch.addEventListener('click',function(){
var v=ch.getAttribute('data-verdict'),i=st.verdict.indexOf(v);if(i>=0)st.verdict.splice(i,1);else st.verdict.push(v);
apply();save();});});
['phase','file','op'].forEach(function(k){var e=document.getElementById('f-'+k);if(e)['input','change'].forEach(function(ev){
e.addEventListener(ev,function(){if(st[k]!==e.value){st[k]=e.value;apply();save();}});});});
var r=document.getElementById('f-reset');if(r)r.addEventListener('click',function(){st.verdict=[];st.phase='';st.file='';st.op='';
['phase','file','op'].forEach(function(k){var e=document.getElementById('f-'+k);if(e)e.value='';});apply();save();});
var m=document.getElementById('f-more');if(m)m.addEventListener('click',function(){st.show='all';apply();save();});
window.addEventListener('hashchange',load);load();})();"""
"""Draws the tables from their inline JSON (the rows a view shows: the first 200 until asked for all),
sorting, filtering, opening rows, and the URL fragment that holds that state (no library, no request). Every
text goes into the page as a text node (``textContent``), never as markup."""
