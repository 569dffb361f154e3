r"""Escaping for exports: text that users or catalog files control never acts as markup, a formula or a
terminal command.

Module and class names, script file names, op error messages and a catalog's
``source``/``error`` fields all end up in terminal tables, CSV cells and Markdown tables.

* Everywhere (:func:`visible`): control characters (C0 but tab and newline, DEL,
  C1) and the bidirectional overrides are written as ``\x1b`` or ``\u202e``, so
  that an ``op`` field holding ``ESC [2J`` or an OSC title sequence in a hostile
  report cannot clear or retitle the terminal that shows it, or reorder its text.
  Terminal tables (:func:`text_table`) escape every cell; JSON keeps the data
  exact with ``\u`` escapes (:func:`json_text`); PyYAML escapes the control
  characters itself (``\e``), not the overrides, which it counts as printable.

* CSV (:func:`csv_text`): a cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a
  carriage return runs as a formula in a spreadsheet. As OWASP recommends, such a
  cell gets a leading ``'``; numbers (``-0.5``, ``-inf``) are left as they are.
* Markdown (:func:`md_text`, :func:`md_code`, :func:`md_table`): HTML, pipes,
  newlines and inline markup are escaped, so that ``<img src=x onerror=...>``
  renders as text and every table keeps its columns (CommonMark + GFM tables).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
"""What a terminal may act on: C0 controls but tab and newline, DEL, C1 controls, bidirectional overrides."""


def _escaped(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    r"""``text`` with every control character written as an escape (``\x1b``); tab and newline kept."""
    return _CONTROL.sub(_escaped, text)


def text_table(rows: Iterable[Sequence[Any]], headers: Sequence[Any], **kwargs: Any) -> str:
    """A terminal table (tabulate, ``simple``): text cells and headers through :func:`visible`."""
    from tabulate import tabulate

    def cell(c: Any) -> Any:
        return visible(c) if isinstance(c, str) else c

    return tabulate([[cell(c) for c in row] for row in rows], headers=[cell(h) for h in headers],
                    tablefmt="simple", **kwargs)


def json_text(text: str) -> str:
    """JSON from ``json.dumps(..., ensure_ascii=False)`` with the characters of :func:`visible` written
    as ``\\uXXXX`` (the same data; ``json.dumps`` itself escapes only C0)."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """``value`` safe for a spreadsheet and a terminal: control characters escaped (:func:`visible`),
    text that would start a formula prefixed with ``'``."""
    if not isinstance(value, str):
        return value
    value = visible(value)
    if not value.startswith(_FORMULA_START):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def csv_text(fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """A CSV document with a header of ``fields`` and every cell passed through :func:`csv_cell`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: csv_cell(v) for k, v in row.items()})
    return buf.getvalue()


class Markdown(str):
    """Text that is already Markdown (escaped, or written by opaudit): tables pass it through."""


_MD_SPECIAL = re.compile(r"([\\`*\[\]|~]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z]))")
"""Inline markup; ``_`` only where it could open or close emphasis (``snake_case`` cannot)."""
_BLOCK_START = re.compile(r"^(?:([#+-])|(\d+)([.)]))")
"""What makes a line a heading or a list item when it starts one (after ``- `` in a list, say)."""
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def md_text(text: Any, line_start: bool = True) -> Markdown:
    """``text`` as literal Markdown text on one line: no HTML, links, emphasis or cell breaks.

    With ``line_start`` (anywhere a line or list item may begin), a leading ``#``,
    ``-``, ``+`` or ``1.`` is escaped too, so that the text cannot become a heading or
    a list; table cells do not need it.
    """
    if isinstance(text, Markdown):
        return text
    s = visible(" ".join(str(text).splitlines()))
    s = "".join(_HTML.get(c, c) for c in s)
    s = _MD_SPECIAL.sub(r"\\\1", s)
    m = _BLOCK_START.match(s) if line_start else None
    if m:
        s = "\\" + s if m.group(1) else f"{m.group(2)}\\{s[len(m.group(2)):]}"
    return Markdown(s)


def md_code(text: Any) -> Markdown:
    """``text`` as an inline code span that no backtick inside it can close; safe in a table cell."""
    s = visible(" ".join(str(text).splitlines())).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", s)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") or not s.strip() else ""
    return Markdown(f"{fence}{pad}{s}{pad}{fence}")


def md_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; text cells and headers are escaped, numbers kept."""
    from tabulate import tabulate

    def cell(c: Any) -> Any:
        return c if isinstance(c, (int, float)) and not isinstance(c, bool) else md_text(c, line_start=False)

    return tabulate([[cell(c) for c in row] for row in rows],
                    headers=[md_text(h, line_start=False) for h in headers], tablefmt="github")
