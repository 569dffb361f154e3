"""``opaudit compare A B``: where two traces of one script first part, and how far the difference spread.

Both traces are read once, side by side, as streams. The calls that compute
(views and allocations compute nothing and are skipped, as the run check skips them)
are aligned by their key, the op and the user's line:

* while the keys agree, each pair is compared bit for bit: the **root cause** is
  the first pair whose inputs were equal and whose outputs were not; every later
  pair whose outputs differ is downstream of it;
* where they disagree (one run called ops the other did not: deterministic mode,
  another device or torch version took another path), the traces are realigned:
  within a window of calls, growing from 64 to :data:`MAX_WINDOW`, the nearest
  place where :data:`K` keys in a row agree again. The calls skipped on either side
  are a **structural** difference, reported as such, and comparing goes on after
  it: one extra op does not make everything after it "different". If no such place
  is found the traces have **parted** for good, and the rest is counted, not compared.

Memory holds at most the realignment window and the tables of names, so it does
not grow with the length of the traces. A folder of rank traces (``opaudit trace``
under torchrun) is compared rank by rank, each in its own order; the rank whose
root cause comes first among the collective calls all ranks share diverged first.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from collections import deque
from collections.abc import Mapping
from typing import Any

from opaudit.data.comparison import RankComparison, Structural, TraceComparison, TracedCall
from opaudit.data.diff import FieldChange
from opaudit.data.errors import OpauditError
from opaudit.data.fileio import shown_path
from opaudit.engine.phases import OPTIMIZER_BIT, phase_names
from opaudit.engine.tracefile import (
    FLAG_COLLECTIVE,
    FLAG_LOSS,
    FLAG_UNINITIALIZED,
    NO_SITE,
    SUFFIX,
    Call,
    TraceError,
    TraceReader,
)

K = 8
"""Keys in a row that must agree for two traces to count as realigned."""
FIRST_WINDOW = 64
MAX_WINDOW = 65536
"""The most calls held on either side while looking for the place the traces agree again."""
MAX_LISTED = 20
"""Structural blocks listed (all are counted)."""
CALLS_LISTED = 5
"""Calls listed per side of a structural block."""

_DIGEST = struct.Struct("<III")
_END = -1
_RANK_FILE = re.compile(r"^rank(\d+)" + re.escape(SUFFIX) + "$")


class NotComparable(OpauditError):
    """Two traces of other scripts, entries, windows or world sizes: their calls say nothing of each other."""


# -- opening -------------------------------------------------------------------------
def _rank_files(path: str, label: str) -> list[tuple[int, str]]:
    """``[(rank, file)]``: one file (rank 0), or every ``rankN.optrace`` of a folder of rank traces."""
    if not os.path.isdir(path):
        return [(0, path)]
    found = sorted((int(m.group(1)), os.path.join(path, name)) for name in os.listdir(path)
                   if (m := _RANK_FILE.match(name)))
    if not found:
        raise TraceError(f"{label}: a folder with no rank*{SUFFIX} trace in it")
    if [r for r, _ in found] != list(range(len(found))):
        raise TraceError(f"{label}: the rank traces are not ranks 0-{len(found) - 1} "
                         f"({', '.join(f'rank{r}' for r, _ in found)})")
    return found


def _headers(path: str) -> list[tuple[str, dict[str, Any]]]:
    """``[(file, header)]`` per rank; the ranks of a folder must be one job."""
    out = []
    for rank, file in _rank_files(path, path):
        label = file if file == path else f"{path}: rank{rank}{SUFFIX}"
        with TraceReader(file, label) as r:
            out.append((label, r.header))
    if len(out) > 1:
        for label, h in out:
            info = h.get("rank") or {}
            if info.get("world_size") != len(out) or info.get("rank") != out.index((label, h)):
                raise TraceError(f"{label}: not rank {out.index((label, h))} of a {len(out)}-rank job "
                                 f"(its header says {info or 'a single process'}): the folder mixes runs")
        if len({(h.get("rank") or {}).get("run_id") for _, h in out}) > 1:
            raise TraceError(f"{path}: the rank traces come from different torchrun jobs")
    return out


def _window_text(w: Mapping[str, Any], entry: str | None = None) -> str:
    steps, start, secs = w.get("steps"), w.get("start", 0), w.get("max_seconds")
    unit = f"call(s) of {entry}" if entry else "step(s)"
    text = "the whole run" if steps is None else f"{steps} {unit}"
    if start:
        text += f" after {start} {'call(s)' if entry else 'step(s)'}"
    return text + (f", at most {secs:g} s" if secs else "")


def _comparable(a: list[tuple[str, dict[str, Any]]], b: list[tuple[str, dict[str, Any]]], la: str, lb: str) -> None:
    ha, hb = a[0][1], b[0][1]
    ta, tb = ha["target"], hb["target"]
    if ta["sha256"] != tb["sha256"]:
        raise NotComparable(f"not comparable: {la} traced {ta['script']} (sha256 {ta['sha256'][:12]}), {lb} traced "
                            f"{tb['script']} (sha256 {tb['sha256'][:12]}): another script, or the script changed")
    if ta.get("entry") != tb.get("entry"):
        raise NotComparable(f"not comparable: {la} traced the entry {ta.get('entry') or '__main__'}, {lb} "
                            f"{tb.get('entry') or '__main__'}")
    if ha["window"] != hb["window"]:
        raise NotComparable(f"not comparable: {la} traced {_window_text(ha['window'], ta.get('entry'))}, {lb} "
                            f"{_window_text(hb['window'], tb.get('entry'))}: trace both with the same --steps, --start-step and "
                            "--max-record-seconds")
    if len(a) != len(b):
        def what(n: int) -> str:
            return "a single process" if n == 1 else f"a {n}-rank job"
        raise NotComparable(f"not comparable: {la} is {what(len(a))}, {lb} {what(len(b))}")


def _changes(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[FieldChange]:
    return [FieldChange(prefix + k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _environment(a: list[tuple[str, dict[str, Any]]], b: list[tuple[str, dict[str, Any]]]) -> tuple[FieldChange, ...]:
    """Fingerprint fields and variables that differ (per rank where ranks differ: ``rank 1: threads``); then
    fingerprint fields the scripts left different by their end (``threads (at the end)``: set by the script)."""
    out: dict[str, FieldChange] = {}
    for (_, ha), (_, hb) in zip(a, b):
        rank = (ha.get("rank") or {}).get("rank")
        prefix = f"rank {rank}: " if len(a) > 1 else ""
        for f in _changes(ha["environment"], hb["environment"]) + _changes(ha["variables"], hb["variables"]):
            out.setdefault(prefix + f.name, f)
    return tuple(FieldChange(name, f.before, f.after) for name, f in out.items())


def end_environment(ra: TraceReader, rb: TraceReader, prefix: str = "") -> list[FieldChange]:
    """Fingerprint fields that differ at the end of the two runs and did not at their start: the script set them."""
    start = {f.name for f in _changes(ra.header["environment"], rb.header["environment"])}
    ea, eb = (ra.end or {}).get("environment_end"), (rb.end or {}).get("environment_end")
    if not isinstance(ea, dict) or not isinstance(eb, dict):
        return []
    return [FieldChange(f"{prefix}{f.name} (at the end)", f.before, f.after) for f in _changes(ea, eb)
            if f.name not in start]


def _settings(a: dict[str, Any], b: dict[str, Any]) -> tuple[FieldChange, ...]:
    sa = {**a["settings"], "argv": a["target"].get("argv")}
    sb = {**b["settings"], "argv": b["target"].get("argv")}
    return tuple(_changes(sa, sb))


# -- one process -------------------------------------------------------------------
class _Side:
    """One trace's computing calls, keyed by (op, site) in names shared with the other side."""

    def __init__(self, reader: TraceReader, names: dict[Any, int]) -> None:
        self.reader = reader
        self._names = names
        self._ops: list[int] = []
        self._sites: list[int] = []
        self._it = reader.calls()
        self.buf: deque[tuple[int, Call]] = deque()
        self.done = False
        self.skipped = 0

    def _key(self, c: Call) -> int:
        ops, sites = self._ops, self._sites
        r = self.reader
        while c.op >= len(ops):
            ops.append(self._names.setdefault(("op", r.ops[len(ops)]), len(self._names)))
        if c.site == NO_SITE:
            site = 0
        else:
            while c.site >= len(sites):
                sites.append(self._names.setdefault(("site", r.sites[len(sites)]), len(self._names)))
            site = sites[c.site] + 1
        return ops[c.op] << 32 | site

    def _next(self) -> tuple[int, Call] | None:
        for c in self._it:
            if c.flags & FLAG_UNINITIALIZED:
                continue  # an allocation: nothing computed, and its place moves with the allocator's user
            return self._key(c), c
        self.done = True
        return None

    def pop(self) -> tuple[int, Call] | None:
        """The next call, from the look-ahead buffer first."""
        if self.buf:
            return self.buf.popleft()
        return None if self.done else self._next()

    def fill(self, n: int) -> None:
        """Read ahead until ``n`` calls are buffered or the trace ends."""
        while len(self.buf) < n and not self.done:
            item = self._next()
            if item is not None:
                self.buf.append(item)

    def drain(self) -> int:
        """Count (and drop) every call left."""
        n = len(self.buf)
        self.buf.clear()
        while not self.done:
            if self._next() is not None:
                n += 1
        return n


def _realign(a: _Side, b: _Side) -> tuple[int, int] | None:
    """``(i, j)``: skip ``i`` calls of ``a`` and ``j`` of ``b`` and :data:`K` keys in a row agree (or both traces
    end there), with ``i + j`` as small as can be found; ``None`` if no such place lies within :data:`MAX_WINDOW`."""
    window = FIRST_WINDOW
    while True:
        a.fill(window)
        b.fill(window)
        ka = [k for k, _ in a.buf] + ([_END] * K if a.done else [])
        kb = [k for k, _ in b.buf] + ([_END] * K if b.done else [])
        grams: dict[tuple[int, ...], int] = {}
        for j in range(len(kb) - K + 1):
            grams.setdefault(tuple(kb[j:j + K]), j)
        best: tuple[int, int] | None = None
        for i in range(len(ka) - K + 1):
            if best is not None and i >= best[0] + best[1]:
                break
            j = grams.get(tuple(ka[i:i + K]))
            if j is not None and (best is None or i + j < best[0] + best[1]):
                best = (i, j)
        if best is not None:
            i, j = best
            if i and j and i >= len(a.buf) and j >= len(b.buf):
                return None  # they agree again only by both ending: the traces parted and never met
            return best
        if (a.done and b.done) or window >= MAX_WINDOW:
            return None
        window *= 4


class _Process:
    """The comparison of one pair of traces, filled in as the calls stream by."""

    def __init__(self, ra: TraceReader, rb: TraceReader) -> None:
        self.ra, self.rb = ra, rb
        self.compared = self.differing = 0
        self.root_at = 0
        """Differing calls up to and including the root cause."""
        self.root: TracedCall | None = None
        self.first: TracedCall | None = None
        self.loss: TracedCall | None = None
        self.update: TracedCall | None = None
        self.blocks: list[Structural] = []
        self.block_count = self.only_a = self.only_b = 0
        self.parted: TracedCall | None = None
        self.collectives = 0
        self.collectives_before: int | None = None
        self.root_is_collective = False

    def _site(self, c: Call) -> tuple[str, str, str]:
        if c.site == NO_SITE:
            return "", "", ""
        s = self.ra.sites[c.site]
        return s.location, s.function, s.module

    def _named(self, ca: Call, cb: Call | None, differs: tuple[str, ...] = (), inputs_identical: bool = True
               ) -> TracedCall:
        where, function, module = self._site(ca)
        return TracedCall(ca.index, cb.index if cb is not None else 0, self.ra.ops[ca.op], where, function, module,
                          str(ca.phase), ca.step, inputs_identical, differs)  # named by _phase() once A's end is read

    def _what_differs(self, ca: Call, cb: Call) -> tuple[str, ...]:
        out = []
        ins_a, ins_b = self.ra.digests(ca.ins), self.rb.digests(cb.ins)
        outs_a, outs_b = self.ra.digests(ca.outs), self.rb.digests(cb.outs)
        for k, (x, y) in enumerate(zip(ins_a, ins_b)):
            if x != y:
                out.append(f"input {k} ({x[0]})" if x[0] == y[0] else f"input {k} ({x[0]} vs {y[0]})")
        first_written = len(outs_a) - ca.written
        for k, (x, y) in enumerate(zip(outs_a, outs_b)):
            if x != y:
                name = f"output {k}" if k < first_written else f"written input {k - first_written}"
                out.append(f"{name} ({x[0]})" if x[0] == y[0] else f"{name} ({x[0]} vs {y[0]})")
        if len(outs_a) != len(outs_b) or len(ins_a) != len(ins_b):
            out.append(f"{len(ins_a)} inputs and {len(outs_a)} outputs vs {len(ins_b)} and {len(outs_b)}")
        return tuple(out)

    def pair(self, ca: Call, cb: Call) -> None:
        self.compared += 1
        collective = ca.flags & FLAG_COLLECTIVE
        same_in = ca.ins == cb.ins
        if ca.outs == cb.outs and ca.written == cb.written:
            if not same_in and ca.flags & FLAG_LOSS and self.loss is None:
                self.loss = self._named(ca, cb, self._what_differs(ca, cb), False)
            if collective:
                self.collectives += 1
            return
        self.differing += 1
        if self.root is None and same_in:
            self.root = self._named(ca, cb, self._what_differs(ca, cb))
            self.root_at = self.differing
            self.collectives_before = self.collectives
            self.root_is_collective = bool(collective)
        elif self.root is None and self.first is None:
            self.first = self._named(ca, cb, self._what_differs(ca, cb), same_in)
        if self.loss is None and ca.flags & FLAG_LOSS and not same_in:
            self.loss = self._named(ca, cb, self._what_differs(ca, cb), False)
        if self.update is None and ca.phase & OPTIMIZER_BIT:
            self.update = self._named(ca, cb, self._what_differs(ca, cb), same_in)
        if collective:
            self.collectives += 1

    def structural(self, skipped_a: list[Call], skipped_b: list[Call], at_a: int, at_b: int) -> None:
        self.block_count += 1
        self.only_a += len(skipped_a)
        self.only_b += len(skipped_b)
        if len(self.blocks) < MAX_LISTED:
            def listed(side: TraceReader, calls: list[Call]) -> tuple[str, ...]:
                out = []
                for c in calls[:CALLS_LISTED]:
                    s = side.sites[c.site].location if c.site != NO_SITE else "?"
                    out.append(f"#{c.index} {side.ops[c.op]} at {s}")
                return tuple(out)
            self.blocks.append(Structural(skipped_a[0].index if skipped_a else at_a,
                                          skipped_b[0].index if skipped_b else at_b,
                                          listed(self.ra, skipped_a), listed(self.rb, skipped_b),
                                          len(skipped_a), len(skipped_b)))


def _final(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, ...]:
    out = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            out.append(f"{key} (only in A)")
        elif key not in a:
            out.append(f"{key} (only in B)")
        elif a[key] != b[key]:
            out.append(key)
    return tuple(out)


def compare_process(ra: TraceReader, rb: TraceReader, rank: int | None = None) -> RankComparison:
    """Compare two traces of one process (both readers positioned after their headers)."""
    names: dict[Any, int] = {}
    a, b = _Side(ra, names), _Side(rb, names)
    p = _Process(ra, rb)
    while True:
        x, y = a.pop(), b.pop()
        if x is not None and y is not None and x[0] == y[0]:
            p.pair(x[1], y[1])
            continue
        if x is None and y is None:
            break
        if x is not None:
            a.buf.appendleft(x)
        if y is not None:
            b.buf.appendleft(y)
        found = _realign(a, b)
        if found is None:
            ca, cb = (a.buf[0][1] if a.buf else None), (b.buf[0][1] if b.buf else None)
            if ca is not None:
                parted = p._named(ca, cb, inputs_identical=False)
                op = f"{ra.ops[ca.op]} vs {rb.ops[cb.op] if cb is not None else '<end of B>'}"
                p.parted = dataclasses.replace(parted, op=op)
            elif cb is not None:
                p.parted = TracedCall(0, cb.index, f"<end of A> vs {rb.ops[cb.op]}", "", step=cb.step,
                                      inputs_identical=False)
            p.only_a += a.drain()
            p.only_b += b.drain()
            break
        i, j = found
        skipped_a = [a.buf.popleft()[1] for _ in range(i)]
        skipped_b = [b.buf.popleft()[1] for _ in range(j)]
        # Where the other side's calls go: before the next call both make (0 at the end of a trace).
        p.structural(skipped_a, skipped_b, a.buf[0][1].index if a.buf else 0, b.buf[0][1].index if b.buf else 0)
    end_a, end_b = ra.end or {}, rb.end or {}
    fa, fb = end_a.get("final", {}), end_b.get("final", {})
    forward_seen = bool(end_a.get("forward_seen", True))

    def phase(c: TracedCall | None) -> TracedCall | None:
        # Calls before the first forward are setup if a forward came, and forward if none did: known at the end.
        if c is None or not c.phase.isdigit():
            return c
        return dataclasses.replace(c, phase=", ".join(phase_names(int(c.phase), forward_seen)))

    return RankComparison(
        rank=rank, calls_a=end_a.get("calls", 0), calls_b=end_b.get("calls", 0), compared=p.compared,
        differing=p.differing, root_cause=phase(p.root), first_difference=phase(p.first),
        downstream=p.differing - p.root_at if p.root is not None else max(0, p.differing - 1),
        first_loss=phase(p.loss), first_update=phase(p.update), structural=tuple(p.blocks),
        structural_blocks=p.block_count, only_a=p.only_a, only_b=p.only_b, parted=phase(p.parted),
        final=_final(fa, fb), final_compared=len(set(fa) | set(fb)),
        collectives_before=p.collectives_before, root_is_collective=p.root_is_collective)


def _first_rank(ranks: list[RankComparison]) -> int | None:
    """The rank whose root cause comes first among the collective calls all ranks share: a call between
    collective calls ``c`` and ``c+1`` comes before collective call ``c+1`` itself; then by call number."""
    placed = [(2 * r.collectives_before + (1 if r.root_is_collective else 0), r.root_cause.index_a, r.rank)
              for r in ranks if r.root_cause is not None and r.collectives_before is not None]
    return min(placed)[2] if placed else None


# -- public ---------------------------------------------------------------------------
def compare_traces(a: str, b: str) -> TraceComparison:
    """Compare trace ``a`` with trace ``b`` (files, or folders of rank traces).

    :class:`~opaudit.engine.tracefile.TraceError` for a file that is not a whole
    trace, :class:`NotComparable` for traces of other scripts, entries, windows or
    world sizes.
    """
    ha, hb = _headers(a), _headers(b)
    _comparable(ha, hb, a, b)
    ranks = []
    files_a, files_b = _rank_files(a, a), _rank_files(b, b)
    environment = list(_environment(ha, hb))
    for (rank, fa), (_, fb), (la, _), (lb, _) in zip(files_a, files_b, ha, hb):
        with TraceReader(fa, la) as ra, TraceReader(fb, lb) as rb:
            multi = len(files_a) > 1
            ranks.append(compare_process(ra, rb, rank if multi else None))
            environment += end_environment(ra, rb, f"rank {rank}: " if multi else "")
    first = _first_rank(ranks) if len(ranks) > 1 else None
    head = ha[0][1]
    return TraceComparison(
        a=shown_path(a), b=shown_path(b), script=head["target"]["script"], window=_window_text(head["window"], head["target"].get("entry")),
        environment=tuple(environment), settings=_settings(head, hb[0][1]), ranks=tuple(ranks), first_rank=first)
