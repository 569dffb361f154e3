"""A capsule replay (``opaudit replay``) as a terminal table, Markdown and CSV (YAML and JSON: its dict form; HTML:
:mod:`~opaudit.cli.formats.html_replay`).

Each opens with what differs between the two machines, then lists the ops whose
bits here are not the source's (every op with ``show_all``), then the summary per
``across`` value and per local verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opaudit.cli.formats.common import csv_text, fmt_num, md_table, verdict_text, where
from opaudit.cli.formats.escape import Markdown, md_code, md_text

if TYPE_CHECKING:
    from opaudit.data.across import CapsuleReplay, Crossed

HEADERS = ("across", "verdict here", "op", "calls", "phase", "where", "module", "max |diff|", "max ULP", "differing")
MAX_ROWS = 40


def machine(env: Any) -> str:
    """A fingerprint in a few words: ``AMD EPYC, torch 2.13.0, ATen CPU capability AVX2, 2 threads``."""
    device = env.get("gpu") or env.get("cpu") or "?"
    parts = [str(device), f"torch {env.get('torch')}"]
    if not env.get("gpu") and env.get("cpu_capability"):
        parts.append(f"ATen CPU capability {env.get('cpu_capability')}")
    if env.get("threads") is not None:
        parts.append(f"{env.get('threads')} thread{'' if env.get('threads') == 1 else 's'}")
    return ", ".join(parts)


def _value(v: Any) -> str:
    return "-" if v is None else str(v)


def difference_lines(doc: "CapsuleReplay") -> list[str]:
    """``field: source -> here`` for each fingerprint field that differs."""
    return [f"{k}: {_value(a)} -> {_value(b)}" for k, a, b in doc.environment_difference]


def frac_text(x: float | None) -> str:
    """A fraction of elements: ``38.8%``, ``2.1e-05`` below 0.1%, ``-`` when missing."""
    if x is None:
        return "-"
    return f"{x:.1%}" if x >= 0.001 else f"{x:.2g}"


def _across_text(r: "Crossed") -> str:
    if r.across.value in ("unsupported", "skipped") and r.reason:
        return f"{r.across.value} ({r.reason})"
    if r.outputs and r.outputs != ("output",):
        return f"{r.across.value} ({', '.join(r.outputs)})"
    return r.across.value


def row(r: "Crossed") -> list[Any]:
    """One table row."""
    f = r.finding
    return [_across_text(r), verdict_text(f), f.op, f.calls, "/".join(f.phases), where(f.locations, 2, f.sites_dropped),
            ", ".join(f.modules[:2]) or "-", fmt_num(r.max_abs_diff),
            "-" if r.max_ulp is None else str(r.max_ulp), frac_text(r.frac_differing)]


def _listed(doc: "CapsuleReplay", show_all: bool) -> list["Crossed"]:
    return list(doc.rows) if show_all else [r for r in doc.rows if r.across.value != "same"]


def summary_line(doc: "CapsuleReplay") -> str:
    """``Across: 5 differs, 30 same (36 signatures); verdict here: 34 stable, 2 random``."""
    s = doc.summary
    across = ", ".join(f"{n} {k}" for k, n in s["across"].items() if n) or "nothing captured"
    local = ", ".join(f"{n} {k}" for k, n in s["verdict"].items() if n) or "-"
    return f"Across: {across} ({s['signatures']} signatures); verdict here: {local}"


def left_out_lines(doc: "CapsuleReplay") -> list[str]:
    """A line per tensor the capture's byte budget kept out of the capsule."""
    lines = []
    for x in doc.left_out:
        mib = -(-int(x.get("nbytes", 0)) // 2**20)
        what = "inputs (not replayed)" if x.get("what") == "inputs" else "outputs (compared by digest only)"
        lines.append(f"{x.get('op')} {x.get('id')}: its {what}; a --capture-budget of {mib} MiB would have held them")
    return lines


def _meanings(rows: Sequence["Crossed"]) -> list[str]:
    seen = dict.fromkeys(r.across for r in rows if r.across.value != "same")
    return [f"{a.value}: {a.meaning}" for a in seen]


def table(doc: "CapsuleReplay", show_all: bool = False) -> str:
    """Plain-text tables (tabulate) for a terminal."""
    from tabulate import tabulate

    out = [f"Capsule {doc.capsule}: captured on {machine(doc.source)}; replayed on {machine(doc.here)}"]
    if not doc.complete:
        out.append("INCOMPLETE: the replay was interrupted; the ops below are those replayed so far.")
    diff = difference_lines(doc)
    out.append("Environment difference (where captured -> here):" if diff else
               "Environment difference: none (same fingerprint: expect every op to be 'same')")
    out += [f"  {line}" for line in diff]
    listed = _listed(doc, show_all)
    if listed:
        out.append("")
        out.append(tabulate([row(r) for r in listed[:MAX_ROWS if not show_all else None]], headers=HEADERS,
                            tablefmt="simple", maxcolwidths=[50, 30, None, None, None, None, None, None, None, None]))
        if not show_all and len(listed) > MAX_ROWS:
            out.append(f"... {len(listed) - MAX_ROWS} more (--show-all, or -o replay.yaml / --format csv for all)")
    same = sum(1 for r in doc.rows if r.across.value == "same")
    if same and not show_all:
        out.append(f"{'+ ' if listed else ''}{same} same: not listed (--show-all lists them)")
    meanings = _meanings(listed)
    if meanings:
        out.append("")
        out += meanings
    left = left_out_lines(doc)
    if left:
        out.append("\nLeft out of the capsule by its byte budget:")
        out += [f"  {line}" for line in left]
    out.append("\n" + summary_line(doc))
    return "\n".join(out) + "\n"


def markdown(doc: "CapsuleReplay") -> str:
    """GitHub-flavoured Markdown."""
    out = ["# opaudit replay", "",
           md_text(f"Capsule {doc.capsule}, captured on {machine(doc.source)}; replayed on {machine(doc.here)}."), ""]
    if not doc.complete:
        out += ["> **Incomplete**: the replay was interrupted; this lists what was replayed so far.", ""]
    out += ["## Environment difference", ""]
    diff = doc.environment_difference
    out += [md_table(("field", "where captured", "here"), [[k, _value(a), _value(b)] for k, a, b in diff]) if diff
            else "None: same fingerprint; every op should be `same`.", ""]
    s = doc.summary
    out += ["## Summary", "", md_text(summary_line(doc)), "",
            md_table(("across", "signatures", "meaning"),
                     [[k, n, Markdown(md_text(_meaning(k), line_start=False))] for k, n in s["across"].items()]), ""]
    listed = _listed(doc, False)
    out += ["## Ops whose bits are not the source's", ""]
    rows = [[*r[:2], Markdown(md_code(r[2])), *r[3:]] for r in (row(x) for x in listed)]
    out += [md_table(HEADERS, rows) if rows else "None: every replayed op gave the source's bits.", ""]
    left = left_out_lines(doc)
    if left:
        out += ["## Left out of the capsule by its byte budget", ""] + [f"- {md_text(line)}" for line in left] + [""]
    return "\n".join(out)


def _meaning(value: str) -> str:
    from opaudit.data.across import Across

    return Across(value).meaning


def csv(doc: "CapsuleReplay") -> str:
    """One row per signature, worst ``across`` first, columns :data:`~opaudit.data.across.ROW_FIELDS` and
    ``complete`` (``False`` on every row of an interrupted replay)."""
    from opaudit.data.across import ROW_FIELDS, flat_row

    return csv_text((*ROW_FIELDS, "complete"), ({**flat_row(r), "complete": doc.complete} for r in doc.rows))
