"""Value dependence: index/scatter/put-family signatures replayed on several of their calls."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import ROOT

from opaudit.cli.main import main
from opaudit.data.report import ReportError, finding_dict, load, parse_finding
from opaudit.data.verdict import Verdict
from opaudit.engine.record import Recorder
from opaudit.engine.samples import Sample, Samples
from opaudit.flows.pipeline import build_report

COLLIDE = os.path.join(ROOT, "tests", "fixtures", "scripts", "collide_steps.py")
INDEX_PUT = "aten.index_put_.default"


def test_a_later_call_with_colliding_indices_is_found(tmp_path, capsys):
    """Step 1's indices never collide (its accumulation is exact whatever the threads do), steps 2-3's do.

    The first call alone reads ``stable``; with several captures the audit finds the race
    and says which calls diverged. Call 1 can never diverge (no collisions: no race), so
    ``diverging_calls`` is a subset of (2, 3); each of those two calls runs 6 times per
    mode over 3 million values landing on 1,000 rows, where the fixture's race shows.
    """
    first_only = tmp_path / "first.yaml"
    # Call 1 is exact whatever the threads do: 2 replays show it as well as 6.
    assert main([COLLIDE, "--reps", "2", "--captures-per-signature", "1", "--no-deterministic-pass",
                 "--no-timing", "--exit-zero", "-q", "-o", str(first_only)]) == 0
    f1 = load(str(first_only)).finding(INDEX_PUT)
    assert f1.calls == 3 and f1.verdict is Verdict.STABLE
    assert f1.checked_calls == () and f1.calls_checked == 1 and f1.calls_diverged == 0

    several = tmp_path / "several.yaml"
    assert main([COLLIDE, "--reps", "6", "--no-deterministic-pass", "--no-timing", "-q", "-o", str(several)]) == 1
    capsys.readouterr()
    f = load(str(several)).finding(INDEX_PUT)
    assert f.verdict is Verdict.DIVERGES, f
    assert f.checked_calls == (1, 2, 3)
    assert f.diverging_calls and set(f.diverging_calls) <= {2, 3}
    assert f.calls_checked == 3 and f.calls_diverged == len(f.diverging_calls)
    # The k/N shown is the worst call's: one that diverged.
    assert f.diverges and f.calls_not_checked == 0
    text = several.read_text()
    assert f"calls_checked: 3\n  calls_diverged: {len(f.diverging_calls)}\n" in text


def test_captures_are_spread_over_the_window_deterministically():
    def kept(limit: int, calls: int) -> tuple[int, ...]:
        s = Samples(limit)
        for c in range(2, calls + 1):
            take, _ = s.wants(c)
            if take:
                s.kept.append(Sample(None, c, object()))
        return s.calls()

    assert kept(4, 3) == (2, 3)
    assert kept(4, 4) == (2, 3, 4)
    assert kept(4, 20) == (9, 17)
    assert kept(4, 100) == (33, 65, 97)
    assert kept(2, 100) == (65,)


def _index_puts(rec_kwargs: dict, n: int) -> tuple[Recorder, list[int]]:
    """``n`` calls of one index_put_ signature, each with other indices; captured bytes after each call."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1000)
    vals = torch.ones(1000)
    idxs = [torch.randint(0, 1000, (1000,), generator=g) for _ in range(n)]
    seen = []
    rec = Recorder(**rec_kwargs)
    with rec:
        for idx in idxs:
            x.index_put_((idx,), vals, accumulate=True)
            seen.append(rec.captured_bytes)
    return rec, seen


def test_the_capture_budget_holds_every_capture_and_says_what_it_left_out():
    one = 4000 + 8000 + 4000  # x (written: copied), the indices, the values
    rec, _ = _index_puts({}, 1)
    assert rec.captured_bytes == one
    rec.release()

    budget = int(2.5 * one)  # the first capture and one more
    rec, seen = _index_puts({"capture_budget": budget}, 4)
    try:
        assert max(seen) <= budget
        (sig,) = rec.signatures()
        assert sig.checked_calls == (1, 2) and sig.calls_not_held == 2
        assert [c for c, _ in rec.further_captures()[sig.id]] == [2]
        report = build_report(rec, reps=1, remedies=False, timings=False)
    finally:
        rec.release()
    f = report.finding(INDEX_PUT)
    assert f.checked_calls == (1, 2) and f.calls_not_checked == 2
    assert any("value-dependent signature(s) were replayed on fewer" in w for w in report.env_warnings)


def test_a_first_capture_takes_precedence_over_further_ones():
    """A new signature that does not fit makes room by dropping further captures; none are taken after."""
    one = 4000 + 8000 + 4000
    budget = 3 * one
    g = torch.Generator().manual_seed(0)
    x, vals = torch.zeros(1000), torch.ones(1000)
    idxs = [torch.randint(0, 1000, (1000,), generator=g) for _ in range(5)]
    big = torch.ones(1500)  # add's capture: 6,000 bytes, past what is left once 3 index_put_ calls are held
    rec = Recorder(capture_budget=budget)
    with rec:
        for idx in idxs[:3]:
            x.index_put_((idx,), vals, accumulate=True)
        held_before = rec.captured_bytes
        torch.add(big, 1)
        for idx in idxs[3:]:
            x.index_put_((idx,), vals, accumulate=True)
    try:
        assert held_before == 3 * one and rec.captured_bytes <= budget
        put, add = rec.signatures()
        assert add.skip_reason is None and add.op == "aten.add.Tensor"
        assert put.checked_calls == (1, 2)  # call 3 made room; calls 4 and 5 were not taken
        assert put.calls_not_held == 3
    finally:
        rec.release()


def test_one_capture_per_signature_is_the_first_call_only():
    rec, _ = _index_puts({"captures_per_signature": 1}, 3)
    try:
        (sig,) = rec.signatures()
        assert sig.checked_calls == () and rec.further_captures() == {}
    finally:
        rec.release()
    with pytest.raises(ValueError):
        Recorder(captures_per_signature=0)


def test_call_lists_round_trip_and_a_count_that_disagrees_is_refused():
    rec, _ = _index_puts({}, 3)
    try:
        report = build_report(rec, reps=1, remedies=False, timings=False)
    finally:
        rec.release()
    f = report.finding(INDEX_PUT)
    d = finding_dict(f)
    assert d["calls_checked"] == 3 and d["checked_calls"] == [1, 2, 3]
    assert parse_finding(d, "f") == f
    with pytest.raises(ReportError, match="calls_checked is 4"):
        parse_finding({**d, "calls_checked": 4}, "f")
    with pytest.raises(ReportError, match="among checked_calls"):
        parse_finding({**d, "diverging_calls": [7], "calls_diverged": 1}, "f")


def test_the_command_line_default_is_the_recorders():
    from opaudit.cli.main import _audit_parser
    from opaudit.engine.record import DEFAULT_CAPTURES_PER_SIGNATURE

    assert _audit_parser().parse_args(["x.py"]).captures_per_signature == DEFAULT_CAPTURES_PER_SIGNATURE
