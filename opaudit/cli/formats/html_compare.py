"""The trace comparison (``opaudit compare A.optrace B.optrace -o compare.html``) as one self-contained HTML page.

What differs between the two runs comes first (the environment fingerprint, the
numerics variables and the trace settings: what explains the rest), then the outcome:
the root cause (the first call whose inputs were bitwise equal in both runs and whose
outputs were not) with its op, line, module, phase, step and call numbers. The table
lists every event of every process (first difference, root cause, first differing
loss and parameter update, each structural difference, where the traces parted, the
final tensors), sortable and filtered by event, phase, file and op. Pictures follow:
from the root cause to what it reached, and where in each process's calls the events
sit; then the structural differences, realigned, and for a torchrun job each rank's
first divergence.

Trace files come from other machines: every text in them (ops, paths, modules, tensor
names, labels) goes through :func:`~opaudit.cli.formats.html_page.esc` or the table's
inline JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opaudit.cli.formats.html_page import Column, Page, Row, Table, badge, code, esc, plain_table, section
from opaudit.cli.formats.html_svg import spread, timeline

if TYPE_CHECKING:
    from opaudit.data.comparison import RankComparison, Structural, TraceComparison, TracedCall

EVENTS = ("root_cause", "first_difference", "parted", "structural", "first_loss", "first_update", "final")
"""The events of a process, in the order of the summary bar (the root cause first)."""
MEANING = {
    "root_cause": "the first call whose inputs were bitwise equal in both runs and whose outputs were not",
    "first_difference": "the first call whose outputs differed when its inputs already did: the difference came "
                        "from outside the ops (files, Python or NumPy values, other threads)",
    "first_loss": "the first backward() whose loss differed",
    "first_update": "the first optimizer-phase call whose outputs differed: the first parameter update that differed",
    "structural": "calls one run made and the other did not; the traces were realigned after them, so the calls "
                  "after them were compared",
    "parted": "where the traces take other paths for good: the calls after it were counted, not compared",
    "final": "the final tensors (parameters, gradients) whose bits differ, or that one run lacks",
}
ENDS = 8
"""Final tensors drawn at the end of the spread picture (the table and its detail have all)."""


def _file(where: str) -> str:
    head, sep, tail = where.rpartition(":")
    return head if sep and tail.isdigit() else where


def _rank(r: "RankComparison") -> str:
    return "the run" if r.rank is None else f"rank {r.rank}"


def _numbers(c: "TracedCall") -> str:
    if not c.index_a:
        return f"call #{c.index_b} of B"
    if not c.index_b:
        return f"call #{c.index_a} of A"
    return f"call #{c.index_a}" if c.index_a == c.index_b else f"call #{c.index_a} in A, #{c.index_b} in B"


def _step(c: "TracedCall") -> str:
    return f"step {c.step}" if c.step else "the import"


def _call_detail(event: str, c: "TracedCall") -> list[tuple[str, str, Any]]:
    return [("event", "badge", (event, MEANING[event])), ("op", "code", c.op), ("where", "code", c.where),
            ("function", "text", c.function), ("module", "text", c.module), ("phase", "text", c.phase),
            ("step", "text", _step(c)), ("call", "text", _numbers(c)),
            ("inputs", "text", "identical in both runs" if c.inputs_identical else "already differed"),
            ("what differed", "lines", list(c.differs))]


def _call_row(multi: bool, r: "RankComparison", event: str, c: "TracedCall") -> Row:
    cells = [(event, "", ""), c.index_a or "-", c.index_b or "-", c.op, c.where or "-", c.module or "-",
             c.phase or "-", c.step, "; ".join(c.differs) or "-"]
    return Row(([_rank(r)] if multi else []) + cells, ([None] if multi else []) + [_severity(event)],
               event, tuple(p for p in c.phase.split(", ") if p), [_file(c.where)] if c.where else (),
               _call_detail(event, c), f"{r.rank}/{event}/{c.index_a}/{c.index_b}")


def _structural_row(multi: bool, r: "RankComparison", s: "Structural", k: int) -> Row:
    what = f"{s.count_a} call(s) only in A, {s.count_b} only in B"
    cells = [("structural", "", ""), s.index_a or "-", s.index_b or "-", "", "-", "-", "-", "", what]
    detail = [("event", "badge", ("structural", MEANING["structural"])),
              ("where", "text", f"before A #{s.index_a} / B #{s.index_b}"),
              ("only in A", "lines", [*s.only_a, *([f"... {s.count_a - len(s.only_a)} more"]
                                                   if s.count_a > len(s.only_a) else [])]),
              ("only in B", "lines", [*s.only_b, *([f"... {s.count_b - len(s.only_b)} more"]
                                                   if s.count_b > len(s.only_b) else [])])]
    ops = [x.split(" at ", 1)[0].split(" ", 1)[-1] for x in (*s.only_a, *s.only_b)]
    places = [x.split(" at ", 1)[1] for x in (*s.only_a, *s.only_b) if " at " in x]
    cells[3] = ", ".join(dict.fromkeys(ops))
    cells[4] = places[0] if places else "-"
    files = [_file(x) for x in places]
    return Row(([_rank(r)] if multi else []) + cells, ([None] if multi else []) + [_severity("structural")],
               "structural", (), list(dict.fromkeys(files)), detail, f"{r.rank}/structural/{k}")


def _final_row(multi: bool, r: "RankComparison") -> Row:
    cells = [("final", "", ""), "-", "-", "", "-", "-", "-", "",
             f"{len(r.final)} of {r.final_compared} final tensors differ"]
    detail = [("event", "badge", ("final", MEANING["final"])), ("tensors", "lines", list(r.final))]
    return Row(([_rank(r)] if multi else []) + cells, ([None] if multi else []) + [_severity("final")], "final",
               (), (), detail, f"{r.rank}/final")


def _severity(event: str) -> int:
    return len(EVENTS) - EVENTS.index(event)


def rows(c: "TraceComparison") -> list[Row]:
    """Every event of every process, in each process's order of calls (final tensors last)."""
    multi = len(c.ranks) > 1
    out = []
    for r in c.ranks:
        events: list[tuple[int, Row]] = []
        for event, call in (("first_difference", r.first_difference), ("root_cause", r.root_cause),
                            ("first_loss", r.first_loss), ("first_update", r.first_update), ("parted", r.parted)):
            if call is not None:
                events.append((call.index_a or call.index_b, _call_row(multi, r, event, call)))
        events += [(s.index_a or s.index_b, _structural_row(multi, r, s, k)) for k, s in enumerate(r.structural)]
        out += [row for _, row in sorted(events, key=lambda e: e[0])]
        if r.final:
            out.append(_final_row(multi, r))
    return out


def _columns(multi: bool) -> tuple[Column, ...]:
    return ((Column("process", "rank"),) if multi else ()) + (
        Column("event", "event", True, "the root cause first when sorted descending", style="badge"),
        Column("# A", "a", True, "the call's number in trace A (views counted)"),
        Column("# B", "b", True, "the same call's number in trace B"),
        Column("op", "op", style="code"), Column("where", "where", wrap=True), Column("module", "module", wrap=True),
        Column("phase", "phase"), Column("step", "step", True, "the optimizer step (0: the script's import)"),
        Column("what differed", "what", wrap=True))


def _differences(c: "TraceComparison") -> str:
    fields = [("environment", f) for f in c.environment] + [("setting", f) for f in c.settings]
    if not fields:
        return ('<p class="good">Nothing: the same environment fingerprint, numerics variables and trace '
                "settings.</p>")
    return (plain_table(("", "field", "A", "B"),
                        [(esc(k), esc(f.name), "-" if f.before is None else code(f.before),
                          "-" if f.after is None else code(f.after)) for k, f in fields])
            + '<p class="cap">The fingerprint fields, numerics variables (<code>ATEN_CPU_CAPABILITY</code>, '
              "thread counts...) and trace settings that differ between the two runs: what explains the rest.</p>")


def _cause_sentence(r: "RankComparison") -> str:
    call = r.root_cause or r.first_difference
    if call is None:
        if r.parted is not None:
            return f"the traces part at {_numbers(r.parted)} ({esc(r.parted.op)})"
        if r.structural_blocks:
            return (f"{r.only_a} call(s) only in A and {r.only_b} only in B, at {r.structural_blocks} place(s); "
                    "every call both made gave the same bits")
        return f"{len(r.final)} final tensor(s) differ"
    what = "root cause" if call is r.root_cause else "first difference (from outside the ops)"
    context = ", ".join(x for x in (call.module, call.phase and f"{call.phase} phase", _step(call)) if x)
    return f"{what}: {_numbers(call)} {code(call.op)} at {code(call.where or '<torch>')} ({esc(context)})"


def _notes(c: "TraceComparison") -> list[str]:
    if c.identical:
        calls = sum(r.compared for r in c.ranks)
        return [f'{badge("identical")} <span class="good">The two runs are bitwise identical</span>: {calls} calls '
                "compared bit for bit, and every final tensor."]
    out = []
    for r in c.ranks:
        if r.identical:
            continue
        first = " (diverged first)" if c.first_rank is not None and r.rank == c.first_rank else ""
        who = "" if r.rank is None else f"<b>{esc(_rank(r))}{first}</b>: "
        out.append(f"{badge('diverged')} {who}{_cause_sentence(r)}.")
    return out


def _spread(r: "RankComparison") -> str:
    call = r.root_cause or r.first_difference
    if call is None:
        return ""
    cause = [f"{_numbers(call)} {call.op}", f"at {(call.where or '<torch>').rsplit('/', 1)[-1]}"
             + (f" in {call.function}" if call.function else ""),
             " · ".join(x for x in (call.module, call.phase, _step(call)) if x)]
    middle = [f"{r.downstream} later call(s) differed", f"{r.differing} of {r.compared} compared"]
    if r.first_loss is not None:
        middle.append(f"first loss: {_step(r.first_loss)}, #{r.first_loss.index_a}")
    if r.first_update is not None:
        middle.append(f"first update: {_step(r.first_update)}, #{r.first_update.index_a}")
    ends = list(r.final[:ENDS]) or ["no final tensor differs"]
    svg = spread(cause, middle, ends, f"{_rank(r)}: from the {'root cause' if r.root_cause else 'first difference'} "
                 "to the final tensors that differ", more=max(len(r.final) - ENDS, 0))
    return f'<div class="fig">{svg}</div>'


def _rank_section(c: "TraceComparison", r: "RankComparison") -> str:
    call = r.root_cause or r.first_difference
    parts = [f"<p>{_cause_sentence(r)}.</p>"]
    if call is not None:
        parts.append(_fields([(k, v) for k, v in (
            ("op", code(call.op)), ("where", code(call.where or "<torch>")), ("function", esc(call.function or "-")),
            ("module", esc(call.module or "-")), ("phase", esc(call.phase or "-")), ("step", esc(_step(call))),
            ("call", esc(_numbers(call))),
            ("inputs", esc("identical in both runs" if call.inputs_identical else "already differed")),
            ("what differed", "<br>".join(esc(d) for d in call.differs) or "-"))]))
        parts.append(_spread(r))
        parts.append('<p class="cap">From the first call that went wrong, through the later calls that differed '
                     "(its difference reached them, or they inherited it), to the final tensors whose bits differ "
                     "(hover a box for its full text).</p>")
    return "".join(parts)


def _fields(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table of a call's fields (values already HTML)."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _timeline(c: "TraceComparison") -> str:
    lines = []
    for r in c.ranks:
        marks = []
        for event, call in (("structural", None), ("first_loss", r.first_loss), ("first_update", r.first_update),
                            ("parted", r.parted), ("first_difference", r.first_difference),
                            ("root_cause", r.root_cause)):
            if event == "structural":
                marks += [(s.index_a or r.calls_a, "structural",
                           f"structural: A #{s.index_a} / B #{s.index_b}, {s.count_a} only in A, {s.count_b} only in B")
                          for s in r.structural]
            elif call is not None and call.index_a:
                marks.append((call.index_a, event, f"{event.replace('_', ' ')}: {_numbers(call)} {call.op} at "
                                                   f"{call.where}"))
        lines.append((_rank(r) if r.rank is not None else "A", r.calls_a, marks))
    svg = timeline(lines, "Where in each process's calls the events sit (trace A's numbering)")
    legend = " ".join(badge(e) for e in EVENTS if e != "final")
    return (f'<div class="fig">{svg}</div><p class="cap">Each line is a process\'s calls in trace A, in order; each '
            f"mark an event at its call (hover it): {legend}.</p>")


def _structural(c: "TraceComparison") -> str:
    parts = []
    for r in c.ranks:
        if not r.structural_blocks:
            continue
        head = "" if r.rank is None else f"<h3>{esc(_rank(r))}</h3>"
        table = plain_table(("before", "only in A", "only in B"), [
            (esc(f"A #{s.index_a} / B #{s.index_b}"),
             "<br>".join(esc(x) for x in s.only_a) + (f"<br>... {s.count_a - len(s.only_a)} more"
                                                       if s.count_a > len(s.only_a) else "") or "-",
             "<br>".join(esc(x) for x in s.only_b) + (f"<br>... {s.count_b - len(s.only_b)} more"
                                                       if s.count_b > len(s.only_b) else "") or "-")
            for s in r.structural])
        more = (f"<p>... {r.structural_blocks - len(r.structural)} more place(s).</p>"
                if r.structural_blocks > len(r.structural) else "")
        parts.append(f"{head}<p>{r.structural_blocks} place(s) where one run made calls the other did not "
                     f"({r.only_a} call(s) only in A, {r.only_b} only in B); realigned after each, so the calls after "
                     f"them were compared.</p>{table}{more}")
    return "".join(parts) or "<p>None: both runs made the same calls, in the same order.</p>"


def _per_rank(c: "TraceComparison") -> str:
    rows: list[Sequence[str]] = []
    for r in c.ranks:
        call = r.root_cause or r.first_difference
        first = "yes" if c.first_rank is not None and r.rank == c.first_rank else ""
        rows.append((esc(_rank(r)), badge("identical" if r.identical else "diverged"), esc(first),
                     f"{code(call.op)} at {code(call.where or '<torch>')}" if call else "-",
                     esc(_numbers(call)) if call else "-",
                     esc("-" if r.collectives_before is None else r.collectives_before),
                     esc(f"{r.differing} of {r.compared}"), esc(r.structural_blocks), esc(len(r.final))))
    return (plain_table(("rank", "verdict", "diverged first", "root cause (or first difference)", "call",
                         "collectives before it", "calls that differed", "structural", "final tensors"), rows)
            + '<p class="cap">The rank that diverged first is the one whose root cause comes first among the '
              "collective calls every rank makes.</p>")


def page(c: "TraceComparison") -> str:
    """The comparison as one HTML page."""
    table_rows = rows(c)
    counts = {e: sum(1 for r in table_rows if r.verdict == e) for e in EVENTS}
    sections = []
    for r in c.ranks:
        if not r.identical:
            first = " (diverged first)" if c.first_rank is not None and r.rank == c.first_rank else ""
            what = "root cause and spread" if r.root_cause or r.first_difference else "how it differs"
            title = what.capitalize() if r.rank is None else f"{_rank(r).capitalize()}{first}: {what}"
            sections.append(section(title, _rank_section(c, r), "cause" if r.rank is None else f"cause-{r.rank}"))
    if not c.identical:
        sections.append(section("Where in the run", _timeline(c), "timeline"))
    sections.append(section("Structural differences, realigned", _structural(c), "structural"))
    if len(c.ranks) > 1:
        sections.append(section("Per rank: first divergences", _per_rank(c), "ranks"))
    return Page("comparison", f"opaudit compare: {c.script}", f"A: {c.a}  B: {c.b}  ({c.window})", _notes(c),
                [(e, e.replace("_", " "), counts[e]) for e in EVENTS],
                Table("events", _columns(len(c.ranks) > 1), table_rows, filterable=True,
                      empty="No event: the two runs are identical."), sections,
                {"verdict": c.verdict, "a": c.a, "b": c.b, "events": counts},
                lead=[section("What differs between the two runs", _differences(c), "differences")]).html()
