"""The ``batch_invariance`` section of a report, for the table, Markdown and CSV renderers.

YAML and JSON carry it through ``Report.to_dict()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opaudit.cli.formats import common
from opaudit.cli.formats.escape import md_text
from opaudit.data.invariance import BATCH_INVARIANT, OP_ROW_FIELDS, OP_VERDICTS, op_row

if TYPE_CHECKING:
    from opaudit.data.invariance import BatchInvariance, BatchOp, RowCheck

OP_HEADERS = ("verdict", "op", "rows", "max |diff|", "calls", "where", "module")


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def headline(bi: "BatchInvariance") -> str:
    """``Batch invariance, batch of 8 rows along dim 0 (cpu): NOT invariant``."""
    verdict = "invariant at every row count" if bi.invariant else "NOT invariant"
    return f"Batch invariance, batch of {bi.batch_size} rows along dim {bi.dim} ({bi.device}): {verdict}"


def check_lines(c: "RowCheck") -> list[str]:
    """One row count: identical or not, the root cause, where the runs part, what differs."""
    lines = [f"{_rows(c.rows)} vs the first {_rows(c.rows)} of the full batch: "
             + ("bitwise identical" if c.invariant else "DIFFERENT")]
    rc = c.root_cause
    if rc:
        at = f"{rc.get('op')} at {rc.get('where', '?')}" + (f" ({rc['module']})" if rc.get("module") else "")
        if rc.get("reason"):
            lines.append(f"  root cause: op #{rc.get('index')} {at}: {rc['reason']}")
        else:
            lines.append(f"  root cause: op #{rc.get('index')} {at}: its input rows were identical, its output rows "
                         f"were not (max |diff| {float(rc.get('max_abs_diff') or 0):.3g})")
        lines.append(f"    signature: {rc.get('signature')} (full batch) vs {rc.get('row_signature')}")
        if rc.get("reaches_output") is False:
            lines.append("    its result reaches the output through no recorded op (a Python number: .item(), bool()?)")
        if rc.get("downstream"):
            lines.append(f"    {rc['downstream']} later op(s) carried the difference")
    for u in c.unreached[:8]:
        at = f"{u.get('op')} at {u.get('where', '?')}" + (f" ({u['module']})" if u.get("module") else "")
        lines.append(f"  differs but does not reach the output: op #{u.get('index')} {at}"
                     + (f": {u['reason']}" if u.get("reason") else ""))
    if len(c.unreached) > 8:
        lines.append(f"  ... and {len(c.unreached) - 8} more that do not reach the output")
    ps = c.path_split
    if ps:
        where = f" at {ps['where']}" if ps.get("where") else ""
        lines.append(f"  the runs took different paths at op #{ps.get('index')}{where}: {ps.get('full_batch_op')} "
                     f"(full batch) vs {ps.get('row_op')} ({_rows(c.rows)})")
    for m in c.mismatches[:8]:
        lines.append(f"  differs: {m}")
    if len(c.mismatches) > 8:
        lines.append(f"  ... and {len(c.mismatches) - 8} more")
    return lines


def op_table_row(o: "BatchOp") -> list[Any]:
    """One table row for an op verdict."""
    s = o.site
    verdict = o.verdict + (f" ({o.reason})" if o.reason else "")
    return [verdict, o.op, ",".join(map(str, o.variant_rows)) or "-",
            f"{o.max_abs_diff:.3g}" if o.max_abs_diff is not None else "-", o.calls,
            s.location if s else "-", (s.module if s else "") or "-"]


def notable_ops(bi: "BatchInvariance") -> list["BatchOp"]:
    """Op verdicts worth a row: all but ``batch_invariant``."""
    return [o for o in bi.ops if o.verdict != BATCH_INVARIANT]


def remedy_rows(bi: "BatchInvariance") -> list[list[str]]:
    """One row per distinct remedy of the variant ops: the ops it covers, the remedy."""
    by_text: dict[str, dict[str, None]] = {}
    for o in bi.variant_ops():
        if o.remedy:
            by_text.setdefault(o.remedy, {})[o.op] = None
    return [[", ".join(ops), text] for text, ops in by_text.items()]


def counts_line(bi: "BatchInvariance") -> str:
    """``29 op signatures: 5 batch_variant, 24 batch_invariant, 0 not_comparable``."""
    counts = bi.counts()
    return f"{len(bi.ops)} op signatures: " + ", ".join(f"{counts[v]} {v}" for v in OP_VERDICTS)


def table(bi: "BatchInvariance") -> str:
    """The section as plain text for a terminal."""
    from tabulate import tabulate

    out = [headline(bi)]
    for c in bi.checks:
        out += ["  " + line for line in check_lines(c)]
    rows = [op_table_row(o) for o in notable_ops(bi)]
    if rows:
        out += ["", tabulate(rows, headers=OP_HEADERS, tablefmt="simple", maxcolwidths=[40, None, None, None, None,
                                                                                         None, None])]
    remedies = remedy_rows(bi)
    if remedies:
        out += ["", "What to do:", tabulate(remedies, headers=("op", "remedy"), tablefmt="simple",
                                            maxcolwidths=[None, 100])]
    out += ["", counts_line(bi)]
    return "\n".join(out)


def markdown(bi: "BatchInvariance") -> list[str]:
    """The section as Markdown lines (every name escaped: see :mod:`opaudit.cli.formats.escape`)."""
    out = ["## Batch invariance", "", f"**{md_text(headline(bi))}**", ""]
    for c in bi.checks:
        lines = check_lines(c)
        out += [f"- {md_text(lines[0])}"] + [f"  - {md_text(line.strip())}" for line in lines[1:]]
    out.append("")
    rows = [op_table_row(o) for o in notable_ops(bi)]
    if rows:
        out += [common.md_table(OP_HEADERS, rows), ""]
    remedies = remedy_rows(bi)
    if remedies:
        out += ["### What to do", "", common.md_table(("op", "remedy"), remedies), ""]
    out += [md_text(counts_line(bi)), ""]
    return out


def csv_text(bi: "BatchInvariance") -> str:
    """One row per op signature, columns :data:`~opaudit.data.invariance.OP_ROW_FIELDS`."""
    return common.csv_text(OP_ROW_FIELDS, (op_row(o) for o in bi.ops))


# -- the catalog's section (``opaudit catalog --batch-invariance``) ---------------------
CATALOG_HEADERS = ("verdict", "op", "dtype", "rows that differ", "max |diff|", "probes")


def _catalog_rows(entries: Any, all_entries: bool) -> list[list[Any]]:
    order = {v: k for k, v in enumerate(OP_VERDICTS)}
    rows = []
    for e in sorted(entries, key=lambda e: (order[e.verdict], e.op, e.dtype)):
        if all_entries or e.verdict != BATCH_INVARIANT:
            rows.append([e.verdict + (f" ({e.reason})" if e.reason else ""), e.op, e.dtype,
                         ",".join(map(str, e.variant_rows)) or "-",
                         f"{e.max_abs_diff:.3g}" if e.max_abs_diff is not None else "-", ", ".join(e.probes)])
    return rows


def catalog_table(entries: Any) -> str:
    """The non-invariant batch-invariance entries of a catalog, and a count line."""
    from tabulate import tabulate

    rows = _catalog_rows(entries, all_entries=False)
    counts = {v: sum(1 for e in entries if e.verdict == v) for v in OP_VERDICTS}
    out = [tabulate(rows, headers=CATALOG_HEADERS, tablefmt="simple"), ""] if rows else []
    out.append("batch invariance: " + ", ".join(f"{counts[v]} {v}" for v in OP_VERDICTS))
    return "\n".join(out)


def catalog_markdown(entries: Any, settings: Any) -> list[str]:
    """The catalog's batch-invariance section as Markdown lines (names escaped, as in :func:`markdown`)."""
    bi = settings.get("batch_invariance") or {}
    rows_checked = ", ".join(map(str, bi.get("rows", []))) or "?"
    out = ["## Batch invariance", "",
           md_text(f"Each op was run on the first b rows of a {bi.get('batch', '?')}-row input (b = {rows_checked}) "
                   "and on the whole input; ") + "`batch_variant` means some b gave those rows other bits than the "
           "full input did, so a request's result depends on how many others share its batch.", "",
           common.md_table(CATALOG_HEADERS, _catalog_rows(entries, all_entries=True)), ""]
    return out
