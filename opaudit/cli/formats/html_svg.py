"""The pictures of the HTML pages, as plain inline SVG written here (no library, no script).

Each function returns one ``<svg>`` element that reads without JavaScript: marks
carry a ``<title>`` (the browser's tooltip) with their full text, labels are cut to
fit with ``…``, and every text goes through :func:`~opaudit.cli.formats.html_page.esc`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opaudit.cli.formats.html_page import PHASE_COLOURS, colour, esc

WIDTH = 760


def _fit(text: str, chars: int) -> str:
    """``text`` cut to ``chars`` characters with an ellipsis."""
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _svg(width: float, height: float, label: str, body: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{esc(label)}">'
            f"<title>{esc(label)}</title>{body}</svg>")


def _text(x: float, y: float, text: str, anchor: str = "start", cls: str = "", extra: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{c}{extra}>{esc(text)}</text>'


@dataclass(frozen=True)
class Bar:
    """One bar of :func:`log_bars`: its label, value (> 0), verdict (its colour) and tooltip."""

    label: str
    value: float
    verdict: str
    tip: str
    text: str
    """The value as printed at the bar's end (``2.31x``, ``5.5e-12``)."""


def _decades(lo: float, hi: float) -> list[float]:
    return [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            if lo <= 10.0 ** e <= hi]


def log_bars(bars: Sequence[Bar], label: str, ref: float | None = None) -> str:
    """Horizontal bars on a log scale, one per row.

    With ``ref`` (1 for a cost ratio) each bar runs from the ``ref`` line to its value,
    left for less, right for more; without, from the axis's lowest decade.
    """
    if not bars:
        return ""
    left, right, row, top = 330.0, 70.0, 17.0, 22.0
    values = [b.value for b in bars]
    lo, hi = min(values), max(values)
    if ref is not None:
        lo, hi = min(lo, ref / 2), max(hi, ref * 2)
    lo = 10.0 ** math.floor(math.log10(lo)) if ref is None else lo / 1.2
    hi = hi * 1.2 if ref is not None else 10.0 ** math.ceil(math.log10(hi))
    if hi <= lo:
        hi = lo * 10
    span = math.log10(hi) - math.log10(lo)
    plot = WIDTH - left - right

    def x(v: float) -> float:
        return left + plot * (math.log10(max(v, lo)) - math.log10(lo)) / span

    height = top + row * len(bars) + 6
    parts = []
    for t in _decades(lo, hi):
        tx = x(t)
        parts.append(f'<line x1="{tx:.1f}" y1="{top - 4}" x2="{tx:.1f}" y2="{height - 4:.1f}" stroke="#e5e7eb"/>')
        parts.append(_text(tx, top - 8, f"{t:g}x" if ref is not None else f"{t:.0e}", "middle"))
    base = x(ref) if ref is not None else left
    for i, b in enumerate(bars):
        y = top + i * row
        x1, x2 = sorted((base, x(b.value)))
        parts.append(f'<g><title>{esc(b.tip)}</title>'
                     + _text(left - 6, y + 12, _fit(b.label, 47), "end", "mono")
                     + f'<rect x="{x1:.1f}" y="{y + 3:.1f}" width="{max(x2 - x1, 1.5):.1f}" height="{row - 6:.0f}" '
                       f'fill="{colour(b.verdict)}"/>'
                     + _text(x2 + 4, y + 12, b.text) + "</g>")
    if ref is not None:
        parts.append(f'<line x1="{base:.1f}" y1="{top - 4}" x2="{base:.1f}" y2="{height - 4:.1f}" stroke="#111827"/>')
    return _svg(WIDTH, height, label, "".join(parts))


def call_strip(marks: Sequence[tuple[int, str, str]], total: int, phases: Sequence[tuple[int, str]],
               label: str, severity: Mapping[str, int], quiet: str = "stable") -> str:
    """The step's op calls in order, left to right: ``marks`` ``(call number, verdict, tooltip)`` coloured by
    verdict over bands of the ``phases`` ``(call number, phase)`` of the calls around them.

    Drawn per pixel column, so that the picture stays small however many calls the step made: a column holds
    one mark per verdict (its tooltip counts them and names the first few), the ``quiet`` verdict's (``stable``;
    a replay's ``same``) light and low, the worst verdict drawn last; a band is a run of columns whose calls are
    mostly of one phase.
    """
    if total < 1:
        return ""
    left, right, band_h, top = 8.0, 8.0, 16.0, 4.0
    plot = WIDTH - left - right
    tick_y, tick_h = top + band_h + 4, 30.0
    height = tick_y + tick_h + 22

    def column(call: int) -> int:
        return int(plot * (min(max(call, 1), total) - 1) / total)

    w = max(plot / total, 1.0)
    votes: dict[int, dict[str, int]] = {}
    for call, phase in phases:
        c = votes.setdefault(column(call), {})
        c[phase] = c.get(phase, 0) + 1
    runs: list[list[Any]] = []
    for col in sorted(votes):
        phase = max(sorted(votes[col]), key=lambda p: votes[col][p])
        if runs and runs[-1][2] == phase:
            runs[-1][1] = col
        else:
            if runs:
                runs[-1][1] = col - 1
            runs.append([col, col, phase])
    if runs:
        runs[0][0], runs[-1][1] = 0, int(plot) - 1
    parts = []
    for c1, c2, phase in runs:
        x1, x2 = left + c1, left + c2 + 1
        fill = PHASE_COLOURS.get(phase, "#f3f4f6")
        parts.append(f'<g><title>{esc(phase)}</title>'
                     f'<rect x="{x1:.0f}" y="{top}" width="{max(x2 - x1, 1):.0f}" height="{tick_y + tick_h - top:.0f}" '
                     f'fill="{fill}"/>'
                     + (_text(x1 + 3, top + 12, _fit(phase, int((x2 - x1) / 6.5))) if x2 - x1 > 30 else "")
                     + "</g>")
    cells: dict[tuple[int, str], list[str]] = {}
    for call, verdict, tip in marks:
        cells.setdefault((column(call), verdict), []).append(tip)
    for (col, verdict), tips in sorted(cells.items(), key=lambda kv: (severity.get(kv[0][1], 0), kv[0][0])):
        low = verdict == quiet
        text = f"{len(tips)} {verdict}: " + "; ".join(tips[:3]) + (" …" if len(tips) > 3 else "")
        parts.append(f'<rect x="{left + col:.0f}" y="{tick_y + (tick_h / 2 if low else 0):.0f}" width="{max(w, 2.0):.1f}" '
                     f'height="{tick_h / 2 if low else tick_h:.0f}" fill="{colour(verdict)}"'
                     f'{" opacity=.45" if low else ""}><title>{esc(text)}</title></rect>')
    parts.append(_text(left, height - 6, "call 1"))
    parts.append(_text(WIDTH - right, height - 6, f"call {total}", "end"))
    return _svg(WIDTH, height, label, "".join(parts))


def grid(rows: Sequence[str], columns: Sequence[str], cells: Mapping[tuple[str, str], tuple[str, str]],
         label: str) -> str:
    """A grid of ``rows`` x ``columns`` (ops x dtypes), each cell ``(verdict, tooltip)`` coloured by its verdict;
    a missing cell is blank."""
    if not rows or not columns:
        return ""
    left, cw, ch, top = 340.0, 66.0, 15.0, 20.0
    width = left + cw * len(columns) + 4
    height = top + ch * len(rows) + 4
    parts = [_text(left + cw * j + cw / 2, top - 6, _fit(c, 10), "middle") for j, c in enumerate(columns)]
    for i, r in enumerate(rows):
        y = top + ch * i
        parts.append(f"<g><title>{esc(r)}</title>" + _text(left - 6, y + 11, _fit(r, 50), "end", "mono") + "</g>")
        for j, c in enumerate(columns):
            cell = cells.get((r, c))
            if cell:
                parts.append(f'<rect x="{left + cw * j + 1:.0f}" y="{y + 1:.0f}" width="{cw - 2:.0f}" height="{ch - 2:.0f}" '
                             f'fill="{colour(cell[0])}"><title>{esc(cell[1])}</title></rect>')
    return _svg(width, height, label, "".join(parts))


def transitions(counts: Mapping[tuple[str, str], int], left_title: str, right_title: str, label: str) -> str:
    """Before → after: a node per verdict on each side and a band per transition, as wide as its count."""
    if not counts:
        return ""
    befores = list(dict.fromkeys(b for b, _ in counts))
    afters = list(dict.fromkeys(a for _, a in counts))
    row, top, node_w = 26.0, 26.0, 150.0
    height = top + row * max(len(befores), len(afters)) + 8
    lx, rx = 10.0, WIDTH - 10 - node_w
    biggest = max(counts.values())

    def y(i: int) -> float:
        return top + row * i + row / 2

    parts = [_text(lx, 14, left_title), _text(rx + node_w, 14, right_title, "end")]
    for (b, a), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        y1, y2 = y(befores.index(b)), y(afters.index(a))
        x1, x2 = lx + node_w, rx
        mid = (x1 + x2) / 2
        width = 2 + 12 * math.sqrt(n / biggest)
        parts.append(f'<g><title>{esc(b)} → {esc(a)}: {n}</title>'
                     f'<path d="M{x1:.0f},{y1:.1f} C{mid:.0f},{y1:.1f} {mid:.0f},{y2:.1f} {x2:.0f},{y2:.1f}" '
                     f'fill="none" stroke="{colour(a)}" stroke-opacity=".55" stroke-width="{width:.1f}"/>'
                     + _text(x2 - 8, y2 - 4 - width / 2, str(n), "end") + "</g>")
    for names, x0 in ((befores, lx), (afters, rx)):
        for i, v in enumerate(names):
            parts.append(f'<rect x="{x0:.0f}" y="{y(i) - 9:.1f}" width="{node_w:.0f}" height="18" rx="4" '
                         f'fill="{colour(v)}"/>'
                         + _text(x0 + node_w / 2, y(i) + 4, _fit(v, 24), "middle", extra=' style="fill:#fff"'))
    return _svg(WIDTH, height, label, "".join(parts))


def spread(cause: Sequence[str], middle: Sequence[str], ends: Sequence[str], label: str, more: int = 0) -> str:
    """Root cause → the ops it reached → the outputs that differed: three columns of boxes with arrows.

    ``cause`` and ``middle`` are a box's lines; each of ``ends`` is a box of its own (``more`` not drawn).
    """
    col = (0.0, 266.0, 476.0)
    widths = (240.0, 180.0, WIDTH - 476.0 - 2)
    line_h, pad = 14.0, 6.0
    end_h = line_h + 2 * pad
    n_ends = len(ends) + (1 if more else 0)
    height = max(len(cause) * line_h + 2 * pad, n_ends * (end_h + 6)) + 8
    parts = []

    def box(x: float, y: float, w: float, lines: Sequence[str], fill: str, stroke: str) -> str:
        h = len(lines) * line_h + 2 * pad
        chars = int(w / 6.4)
        body = "".join(_text(x + 6, y + pad + 11 + k * line_h, _fit(t, chars), cls="mono" if k == 0 else "")
                       for k, t in enumerate(lines))
        return (f'<g><title>{esc(" / ".join(lines))}</title><rect x="{x:.0f}" y="{y:.1f}" width="{w:.0f}" '
                f'height="{h:.0f}" rx="4" fill="{fill}" stroke="{stroke}"/>{body}</g>')

    def arrow(x1: float, y1: float, x2: float, y2: float) -> str:
        return (f'<path d="M{x1:.0f},{y1:.1f} C{(x1 + x2) / 2:.0f},{y1:.1f} {(x1 + x2) / 2:.0f},{y2:.1f} '
                f'{x2 - 6:.0f},{y2:.1f}" fill="none" stroke="#6b7280"/>'
                f'<polygon points="{x2:.0f},{y2:.1f} {x2 - 7:.0f},{y2 - 4:.1f} {x2 - 7:.0f},{y2 + 4:.1f}" fill="#6b7280"/>')

    cy = height / 2
    cause_h = len(cause) * line_h + 2 * pad
    parts.append(box(col[0], cy - cause_h / 2, widths[0], cause, "#fef2f2", "#b91c1c"))
    mid_h = len(middle) * line_h + 2 * pad
    if middle:
        parts.append(arrow(col[0] + widths[0], cy, col[1], cy))
        parts.append(box(col[1], cy - mid_h / 2, widths[1], middle, "#fff7ed", "#ea580c"))
    src = col[1] + widths[1] if middle else col[0] + widths[0]
    labels = list(ends) + ([f"... and {more} more"] if more else [])
    y0 = cy - n_ends * (end_h + 6) / 2 + 3
    for k, text in enumerate(labels):
        ey = y0 + k * (end_h + 6)
        parts.append(arrow(src, cy, col[2], ey + end_h / 2))
        parts.append(box(col[2], ey, widths[2], [text], "#f9fafb", "#9ca3af"))
    return _svg(WIDTH, height, label, "".join(parts))


def timeline(rows: Sequence[tuple[str, int, Sequence[tuple[int, str, str]]]], label: str) -> str:
    """One line per process, as long as its calls: ``rows`` ``(name, calls, marks)``, each mark ``(call number,
    kind, tooltip)`` drawn at its call and coloured by its kind (a verdict name), the later kinds over the
    earlier ones."""
    if not rows:
        return ""
    left, right, row, top = 90.0, 60.0, 26.0, 6.0
    longest = max(max(n for _, n, _ in rows), 1)
    plot = WIDTH - left - right
    height = top + row * len(rows) + 16

    def x(call: int) -> float:
        return left + plot * (min(max(call, 1), longest) - 1) / max(longest - 1, 1)

    parts = []
    for i, (name, calls, marks) in enumerate(rows):
        y = top + i * row + row / 2
        parts.append(_text(left - 8, y + 4, _fit(name, 13), "end"))
        parts.append(f'<g><title>{esc(name)}: {calls} calls</title><rect x="{left:.1f}" y="{y - 2:.1f}" '
                     f'width="{max(x(calls) - left, 1.0):.1f}" height="4" fill="#d1d5db"/></g>')
        parts.append(_text(x(calls) + 6, y + 4, f"{calls} calls"))
        for call, kind, tip in marks:
            parts.append(f'<rect x="{x(call) - 2:.1f}" y="{y - 9:.1f}" width="4" height="18" '
                         f'fill="{colour(kind)}"><title>{esc(tip)}</title></rect>')
    parts.append(_text(left, height - 4, "call 1"))
    parts.append(_text(left + plot, height - 4, f"call {longest}", "end"))
    return _svg(WIDTH, height, label, "".join(parts))
