"""The parts every HTML page is made of: escaping, the page shell (inline CSS and script), the
filterable table, the verdict summary bar and detail lists.

A page is one self-contained file: no request of any kind leaves it when it is opened
(no font, stylesheet, script, image or favicon is fetched; a Content-Security-Policy
``default-src 'none'`` says so to the browser too). Everything readable is in the HTML
itself: without JavaScript every row and its detail is shown, in the document's order;
the script adds sorting, filtering and opening rows, and keeps that state in the URL
fragment (``#sort=calls&dir=desc&verdict=diverges&phase=backward&file=train.py&op=index&open=ID``),
so that a link reproduces the view.

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
}
"""The colour of every verdict a page shows (determinism, batch invariance, predicted ``unknown``, a diff's
``missing``); each also has a CSS class ``v-<name>``. Text always says the verdict too."""

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
    """One column of a :class:`Table`: its heading, the key it is sorted by in the fragment, its kind."""

    title: str
    key: str
    numeric: bool = False
    """Sorted as numbers (a cell's sort value, ``data-v``, when it has one)."""
    tip: str = ""
    """What the heading means, shown on hover."""
    wrap: bool = False
    """Long values (paths, module names) may break anywhere, so that the column can be narrow."""


@dataclass(frozen=True)
class Row:
    """One row of a :class:`Table`: its cells (HTML, sort value) and what the filters match it by."""

    cells: Sequence[tuple[str, Any]]
    """``(html, sort value)`` per column; a sort value of ``None`` sorts by the cell's text."""
    verdict: str = ""
    """The value the summary bar's chips filter on (a verdict, or a diff's transition)."""
    phases: Sequence[str] = ()
    """The phases the phase filter offers for it (the filter matches the ``phase`` column's ``/``-separated text)."""
    files: Sequence[str] = ()
    detail: str = ""
    """HTML shown when the row is opened."""
    id: str = ""
    """Stable id of the row (kept in the fragment when the row is open)."""


@dataclass
class Table:
    """A sortable table whose rows open to their detail; ``filterable`` makes it the page's main table."""

    id: str
    columns: Sequence[Column]
    rows: Sequence[Row]
    filterable: bool = False
    caption: str = ""
    empty: str = "Nothing to show."

    def html(self) -> str:
        """The table: a ``<tbody>`` per row holding the row and, after it, its detail row.

        Kept small (a 5,000-finding report is one file of a few MB): a cell carries a sort
        value (``data-v``) only where its text does not sort right by itself, and the op
        and phase filters read the ``op`` and ``phase`` columns' text.
        """
        if not self.rows:
            return f'<p class="empty">{esc(self.empty)}</p>'
        n = len(self.columns)
        heads = "".join(
            f'<th data-key="{esc(c.key)}"{" data-type=num" if c.numeric else ""} aria-sort="none"'
            f'{f" title={_q(c.tip)}" if c.tip else ""}><button type="button">{esc(c.title)}</button></th>'
            for c in self.columns)
        out = [f'<table class="data{" main" if self.filterable else ""}" id="{esc(self.id)}">']
        wrapped = ",".join(f"#{self.id} td:nth-child({i + 1})" for i, c in enumerate(self.columns) if c.wrap)
        if wrapped:
            out.append(f"<style>{wrapped}{{overflow-wrap:anywhere;min-width:8em}}</style>")
        if self.caption:
            out.append(f"<caption>{esc(self.caption)}</caption>")
        out.append(f"<thead><tr>{heads}</tr></thead>")
        for r in self.rows:
            attrs = [f'data-id="{esc(r.id)}"'] if r.id else []
            if self.filterable:
                attrs.append(f'data-verdict="{esc(r.verdict)}"')
                if r.files:
                    attrs.append(f'data-file="{esc(_joined(r.files))}"')
            cells = "".join(f"<td>{h}</td>" if v is None else f'<td data-v="{esc(v)}">{h}</td>' for h, v in r.cells)
            out.append(f'<tbody {" ".join(attrs)}><tr>{cells}</tr><tr><td colspan="{n}">{r.detail}</td></tr></tbody>'
                       if attrs else f"<tbody><tr>{cells}</tr><tr><td colspan=\"{n}\">{r.detail}</td></tr></tbody>")
        out.append("</table>")
        return "".join(out)


def _q(text: str) -> str:
    return f'"{esc(text)}"'


def _name(value: str) -> str:
    """A file name as the filter holds it: a newline (the separator of :func:`_joined`) becomes a space."""
    return value.replace("\n", " ")


def _joined(values: Iterable[str]) -> str:
    """A row's files in one data attribute, one per line."""
    return "\n".join(_name(v) for v in values)


Chip = tuple
"""``(value, label, count)`` or ``(value, label, count, verdict)``: a chip of the summary bar filters the main
table's rows whose ``verdict`` is ``value``, and takes the colour of ``verdict`` (default: ``value``)."""


def filters(rows: Sequence[Row], chips: Sequence[Chip], chip_title: str = "verdict") -> str:
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
    files = sorted({_name(f) for r in rows for f in r.files})
    ctl = ['<div class="filters js">']
    if phases:
        ctl.append('<label>phase <select id="f-phase"><option value="">any</option>'
                   + "".join(f'<option value="{esc(p)}">{esc(p)}</option>' for p in phases) + "</select></label>")
    if files:
        ctl.append('<label>file <select id="f-file"><option value="">any</option>'
                   + "".join(f'<option value="{esc(f)}">{esc(f)}</option>' for f in files) + "</select></label>")
    ctl.append('<label>op <input id="f-op" type="search" placeholder="part of an op name"></label>'
               '<button type="button" id="f-reset">show all</button><span id="f-count" aria-live="polite"></span>'
               "</div>")
    return "".join(out + ctl)


_PHASES = ("setup", "data", "forward", "backward", "optimizer")


def _phase_order(p: str) -> tuple[int, str]:
    return (_PHASES.index(p) if p in _PHASES else len(_PHASES), p)


def definitions(items: Iterable[tuple[str, str]]) -> str:
    """A detail list: ``(term, html)`` pairs, those with an empty value left out."""
    body = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items if v not in ("", None))
    return f'<dl class="kv">{body}</dl>'


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
    """A whole page: its title, a subtitle, the main table's filters and table, then its sections."""

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

    def html(self) -> str:
        """The page as one self-contained HTML document."""
        body = [f"<header><h1>{esc(self.title)}</h1>"]
        if self.subtitle:
            body.append(f'<p class="sub">{esc(self.subtitle)}</p>')
        body.append("</header><main>")
        body += [f'<p class="note">{n}</p>' for n in self.notes]
        if self.main is not None:
            body.append(filters(self.main.rows, self.chips))
            body.append(self.main.html())
        body += self.sections
        body.append("</main><footer>Written by opaudit. This page makes no network request; "
                    "it works offline and without JavaScript (then unsorted, with every detail open).</footer>")
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
    ".chip{--c:#9ca3af;border:1px solid var(--c);background:#fff;border-radius:14px;padding:2px 10px;"
    "cursor:pointer;font:inherit;color:#111827}.chip b{color:var(--c)}"
    ".chip[aria-pressed=true]{background:var(--c);color:#fff}.chip[aria-pressed=true] b{color:#fff}"
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
var main=document.querySelector('table.data.main'),st={sort:'',dir:'',verdict:[],phase:'',file:'',op:'',open:[]};
var each=function(xs,f){Array.prototype.forEach.call(xs,f);};
function bodies(t){return Array.prototype.slice.call(t.tBodies);}
function heads(t){return Array.prototype.slice.call(t.tHead.rows[0].cells);}
function col(t,k){var i=-1;heads(t).forEach(function(h,j){if(h.getAttribute('data-key')===k)i=j;});return i;}
function keyOf(b,i,numeric){var c=b.rows[0].cells[i],v=c.getAttribute('data-v');if(v===null)v=c.textContent;
if(numeric){var x=parseFloat(v);return isNaN(x)?-Infinity:x;}return v.toLowerCase();}
function order(t,bs){var f=document.createDocumentFragment();bs.forEach(function(b){f.appendChild(b);});t.appendChild(f);}
function sortBy(t,i,desc){var hs=heads(t),numeric=hs[i].getAttribute('data-type')==='num';
var ks=bodies(t).map(function(b){return [keyOf(b,i,numeric),b._i,b];});
ks.sort(function(a,b){var r=a[0]<b[0]?-1:(a[0]>b[0]?1:0);if(desc)r=-r;return r||a[1]-b[1];});
order(t,ks.map(function(k){return k[2];}));
hs.forEach(function(h,j){h.setAttribute('aria-sort',j===i?(desc?'descending':'ascending'):'none');});}
function unsort(t){order(t,bodies(t).sort(function(a,b){return a._i-b._i;}));
heads(t).forEach(function(h){h.setAttribute('aria-sort','none');});}
function filter(){if(!main)return;var op=st.op.toLowerCase(),shown=0,all=0,oc=col(main,'op'),pc=col(main,'phase');
bodies(main).forEach(function(b){all++;var cs=b.rows[0].cells;
var ok=(!st.verdict.length||st.verdict.indexOf(b.getAttribute('data-verdict'))>=0)
&&(!st.phase||(pc>=0&&cs[pc].textContent.split('/').indexOf(st.phase)>=0))
&&(!st.file||(b.getAttribute('data-file')||'').split('\n').indexOf(st.file)>=0)
&&(!op||(oc>=0&&cs[oc].textContent.toLowerCase().indexOf(op)>=0));
if(b.hidden===ok)b.hidden=!ok;if(ok)shown++;});
var c=document.getElementById('f-count');if(c)c.textContent=shown===all?all+' rows':shown+' of '+all+' rows shown';
each(document.querySelectorAll('.chip'),function(ch){
ch.setAttribute('aria-pressed',st.verdict.indexOf(ch.getAttribute('data-verdict'))>=0?'true':'false');});}
function setOpen(b,on){b.classList.toggle('open',on);b.rows[0].setAttribute('aria-expanded',on?'true':'false');}
function save(){if(!main)return;var p=[];function add(k,v){if(v)p.push(k+'='+encodeURIComponent(v));}
add('sort',st.sort);add('dir',st.dir);add('verdict',st.verdict.join(','));add('phase',st.phase);add('file',st.file);
add('op',st.op);add('open',st.open.join(','));var h=p.length?'#'+p.join('&'):'';
if(h!==location.hash){try{history.replaceState(null,'',h||location.pathname+location.search);}catch(e){location.hash=h;}}}
function load(){var p={};location.hash.replace(/^#/,'').split('&').forEach(function(kv){if(!kv)return;var i=kv.indexOf('=');
try{p[i<0?kv:kv.slice(0,i)]=i<0?'':decodeURIComponent(kv.slice(i+1));}catch(e){}});
st.sort=p.sort||'';st.dir=p.dir==='desc'?'desc':'';st.verdict=p.verdict?p.verdict.split(','):[];
st.phase=p.phase||'';st.file=p.file||'';st.op=p.op||'';st.open=p.open?p.open.split(','):[];
if(!main)return;var i=col(main,st.sort);
if(i>=0)sortBy(main,i,st.dir==='desc');else if(main.querySelector('th[aria-sort$=ending]'))unsort(main);
['phase','file','op'].forEach(function(k){var e=document.getElementById('f-'+k);if(e)e.value=st[k];});
bodies(main).forEach(function(b){var on=st.open.indexOf(b.getAttribute('data-id'))>=0;
if(on||b.classList.contains('open'))setOpen(b,on);});filter();}
each(document.querySelectorAll('table.data'),function(t){bodies(t).forEach(function(b,i){b._i=i;});
heads(t).forEach(function(h,i){h.querySelector('button').addEventListener('click',function(){
var cur=h.getAttribute('aria-sort'),numeric=h.getAttribute('data-type')==='num';
var desc=cur==='none'?numeric:cur==='ascending';sortBy(t,i,desc);
if(t===main){st.sort=h.getAttribute('data-key');st.dir=desc?'desc':'';save();}});});
t.addEventListener('click',function(ev){var tr=ev.target.closest('tr'),b=tr&&tr.parentNode;
if(!b||b.parentNode!==t||b.rows[0]!==tr||b.tagName!=='TBODY')return;var on=!b.classList.contains('open');setOpen(b,on);
if(t===main){var id=b.getAttribute('data-id');if(id){st.open=st.open.filter(function(x){return x!==id;});if(on)st.open.push(id);}save();}});});
each(document.querySelectorAll('.chip'),function(ch){ch.addEventListener('click',function(){
var v=ch.getAttribute('data-verdict'),i=st.verdict.indexOf(v);if(i>=0)st.verdict.splice(i,1);else st.verdict.push(v);
filter();save();});});
['phase','file','op'].forEach(function(k){var e=document.getElementById('f-'+k);if(e)['input','change'].forEach(function(ev){
e.addEventListener(ev,function(){if(st[k]!==e.value){st[k]=e.value;filter();save();}});});});
var r=document.getElementById('f-reset');if(r)r.addEventListener('click',function(){st.verdict=[];st.phase='';st.file='';st.op='';
['phase','file','op'].forEach(function(k){var e=document.getElementById('f-'+k);if(e)e.value='';});filter();save();});
window.addEventListener('hashchange',load);load();})();"""
"""Sorting, filtering, opening rows, and the URL fragment that holds that state (no library, no request)."""
