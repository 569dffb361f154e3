"""The comparison of two traces (``opaudit compare``) as a terminal table, Markdown and CSV (HTML:
:mod:`~opaudit.cli.formats.html_compare`).

Reads only the record (:class:`~opaudit.data.comparison.TraceComparison`); YAML and
JSON are its dict form. Each process's section says, in this order: the verdict,
the root cause (or the first difference, when a difference came from outside the
ops), how far it spread (later calls that differed, the first loss and parameter
update that differed, the final tensors), then the structural differences.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opaudit.cli.formats.escape import csv_text, md_table, md_text

if TYPE_CHECKING:
    from opaudit.data.comparison import RankComparison, TraceComparison, TracedCall

FINAL_LISTED = 6
"""Final tensors named in the text forms (every one is in the file forms)."""


def _value(v: Any) -> str:
    return "-" if v is None else str(v)


def _place(c: TracedCall) -> str:
    """``train.py:12 in forward (Net.norm), forward phase, step 1``."""
    text = c.where or "<torch>"
    if c.function:
        text += f" in {c.function}"
    if c.module:
        text += f" ({c.module})"
    bits = [f"{c.phase} phase"] if c.phase else []
    bits.append(_step(c))
    return f"{text}, {', '.join(bits)}"


def _step(c: TracedCall) -> str:
    return f"step {c.step}" if c.step else "the import"


def _numbers(c: TracedCall) -> str:
    return f"call #{c.index_a}" if c.index_a == c.index_b else f"call #{c.index_a} in A, #{c.index_b} in B"


def cause_lines(r: RankComparison) -> list[str]:
    """What one process's comparison found, as plain lines (no markup)."""
    out: list[str] = []
    if r.identical:
        out.append(f"identical: {r.calls_a} calls, {r.compared} compared bit for bit, "
                   f"{r.final_compared} final tensors")
        return out
    cause = r.root_cause
    first = r.first_difference
    if first is not None:
        out.append(f"first difference: {_numbers(first)} {first.op} at {_place(first)}: its inputs already differed, "
                   "so the difference came from outside the ops (files, Python or NumPy values, other threads)")
        out += [f"  differs: {d}" for d in first.differs]
    if cause is not None:
        out.append(f"root cause: {_numbers(cause)} {cause.op} at {_place(cause)}: its inputs were identical in "
                   "both traces, its outputs were not")
        out += [f"  differs: {d}" for d in cause.differs]
    if cause is not None or first is not None:
        out.append(f"spread: {r.downstream} later call(s) differed ({r.differing} of {r.compared} compared calls)")
    if r.first_loss is not None:
        loss = r.first_loss
        out.append(f"first differing loss: {_step(loss)}, the loss given to backward() at {loss.where} "
                   f"({_numbers(loss)})")
    if r.first_update is not None:
        up = r.first_update
        out.append(f"first differing parameter update: {_step(up)}, {up.op} at {up.where} ({_numbers(up)})")
    if r.final:
        shown = ", ".join(r.final[:FINAL_LISTED]) + (", ..." if len(r.final) > FINAL_LISTED else "")
        out.append(f"final tensors differing: {len(r.final)} of {r.final_compared} ({shown})")
    if r.structural_blocks:
        out.append(f"structural: {r.structural_blocks} place(s) where one trace made calls the other did not "
                   f"({r.only_a} call(s) only in A, {r.only_b} only in B); realigned after each, so the calls "
                   "after them were compared")
        for s in r.structural:
            out.append(f"  at A #{s.index_a} / B #{s.index_b}:")
            out += [f"    only in A: {c}" for c in s.only_a]
            if s.count_a > len(s.only_a):
                out.append(f"    only in A: ... {s.count_a - len(s.only_a)} more")
            out += [f"    only in B: {c}" for c in s.only_b]
            if s.count_b > len(s.only_b):
                out.append(f"    only in B: ... {s.count_b - len(s.only_b)} more")
        if r.structural_blocks > len(r.structural):
            out.append(f"  ... {r.structural_blocks - len(r.structural)} more place(s)")
    if r.parted is not None:
        p = r.parted
        out.append(f"parted: from A #{p.index_a} / B #{p.index_b} ({p.op}{' at ' + p.where if p.where else ''}) the "
                   "traces take other paths and could not be realigned; the calls after it were not compared")
    if r.calls_a != r.calls_b and not r.structural_blocks and r.parted is None:
        out.append(f"calls: {r.calls_a} in A, {r.calls_b} in B (views and allocations: they compute nothing)")
    return out


def _headline(c: TraceComparison) -> str:
    verdict = "IDENTICAL" if c.identical else "DIVERGED"
    return f"Trace comparison of {c.script} ({c.window}): {verdict}"


def _rank_title(r: RankComparison, c: TraceComparison) -> str:
    first = " (diverged first)" if c.first_rank is not None and r.rank == c.first_rank else ""
    return f"rank {r.rank}{first}:"


def table(c: TraceComparison) -> str:
    """The comparison for a terminal."""
    from tabulate import tabulate

    lines = [_headline(c), f"  A: {c.a}", f"  B: {c.b}", ""]
    fields = [("environment", f) for f in c.environment] + [("setting", f) for f in c.settings]
    if fields:
        lines.append("What differs between the two runs:")
        lines.append(tabulate([[f.name, _value(f.before), _value(f.after)] for _, f in fields],
                              headers=["", "A", "B"], disable_numparse=True))
    else:
        lines.append("Same environment fingerprint, variables and settings.")
    lines.append("")
    if c.first_rank is not None:
        lines.append(f"Diverged first: rank {c.first_rank} (its root cause comes first among the collective calls "
                     "every rank makes)")
    for r in c.ranks:
        body = cause_lines(r)
        if r.rank is None:
            lines += body
        else:
            lines.append(_rank_title(r, c))
            lines += ["  " + line for line in body]
    return "\n".join(lines) + "\n"


def markdown(c: TraceComparison) -> str:
    """The comparison as Markdown."""
    out = [f"# {md_text(_headline(c))}", "", f"- A: {md_text(c.a)}", f"- B: {md_text(c.b)}", ""]
    fields = list(c.environment) + list(c.settings)
    if fields:
        out += ["## What differs between the two runs", "",
                md_table(("field", "A", "B"), [(f.name, _value(f.before), _value(f.after)) for f in fields]), ""]
    if c.first_rank is not None:
        out += [f"Diverged first: **rank {c.first_rank}**.", ""]
    for r in c.ranks:
        out += [f"## {'rank ' + str(r.rank) if r.rank is not None else 'The run'}: "
                f"{'identical' if r.identical else 'diverged'}", ""]
        for line in cause_lines(r):
            indent = len(line) - len(line.lstrip(" "))
            out.append("  " * (indent // 2) + "- " + md_text(line.strip()))
        out.append("")
    return "\n".join(out)


CSV_FIELDS = ("rank", "event", "index_a", "index_b", "op", "where", "function", "module", "phase", "step",
              "inputs_identical", "detail")
"""Columns of the CSV form: one row per event of each process."""


def _row(rank: int | None, event: str, call: TracedCall | None, detail: str = "") -> dict[str, Any]:
    d: dict[str, Any] = dict.fromkeys(CSV_FIELDS, "")
    d.update(rank="" if rank is None else rank, event=event, detail=detail)
    if call is not None:
        d.update(index_a=call.index_a, index_b=call.index_b, op=call.op, where=call.where, function=call.function,
                 module=call.module, phase=call.phase, step=call.step, inputs_identical=call.inputs_identical)
        if not detail:
            d["detail"] = ";".join(call.differs)
    return d


def rows(c: TraceComparison) -> list[dict[str, Any]]:
    """One flat row per event: verdict, root cause, first difference, loss, update, structural blocks, final
    tensors."""
    out = []
    for r in c.ranks:
        out.append(_row(r.rank, "verdict", None, ("identical" if r.identical else "diverged")
                        + f": {r.differing} of {r.compared} compared calls differed, downstream {r.downstream}"))
        for event, call in (("first_difference", r.first_difference), ("root_cause", r.root_cause),
                            ("first_loss", r.first_loss), ("first_update", r.first_update), ("parted", r.parted)):
            if call is not None:
                out.append(_row(r.rank, event, call))
        for s in r.structural:
            out.append(_row(r.rank, "structural", None,
                            f"A #{s.index_a} / B #{s.index_b}: {s.count_a} only in A, {s.count_b} only in B: "
                            + "; ".join([*s.only_a, *s.only_b])))
        out += [_row(r.rank, "final", None, name) for name in r.final]
    return out


def csv_form(c: TraceComparison) -> str:
    """The comparison as CSV (formula-looking cells neutralised)."""
    return csv_text(CSV_FIELDS, rows(c))
