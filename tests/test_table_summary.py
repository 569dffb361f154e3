"""The terminal table (issue 13, item 14): what needs doing first, the rest summarised, hints that say where it all is."""

from __future__ import annotations

import os

import yaml
from conftest import ROOT

from opaudit.cli.formats import table
from opaudit.cli.main import main
from opaudit.data.report import Finding, Report, Site
from opaudit.data.verdict import Verdict

TRAIN_LOOP = os.path.join(ROOT, "tests", "fixtures", "scripts", "train_loop.py")


def test_initialisation_rows_are_summarised_and_every_file_keeps_them(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    code = main([TRAIN_LOOP, "--no-timing", "--reps", "1", "-o", str(path), "--", "--steps", "1"])
    _, err = capsys.readouterr()
    assert code == 0
    doc = yaml.safe_load(path.read_text())
    kept = [f for f in doc["findings"] if f["verdict"] in ("random", "uninitialized")]
    random = [f for f in kept if f["verdict"] == "random"]
    assert len(random) >= 6 and len(kept) > len(random)  # the file keeps every row
    # The terminal lists none of them, and says how many, by phase, and where they all are.
    assert "aten.uniform_.default" not in err and "aten.empty.memory_format" not in err
    n_setup = sum(f["phases"] == ["setup"] for f in random)
    n_data = sum(f["phases"] == ["data"] for f in random)
    assert n_setup == 5 and n_setup + n_data == len(random)
    line = (f"{len(random)} random (setup {n_setup}, data {n_data}), {len(kept) - len(random)} uninitialized (")
    (summary,) = [x for x in err.splitlines() if x.startswith(line)]
    assert summary.endswith(f"not listed (listed in {path}; --show-all shows them here)")
    assert "-o report.yaml" not in err


def test_show_all_lists_every_row(tmp_path, capsys):
    code = main([TRAIN_LOOP, "--no-timing", "--reps", "1", "--show-all", "--", "--steps", "1"])
    out, _ = capsys.readouterr()
    assert code == 0 and "not listed" not in out
    rows = [line.split()[:2] for line in out.splitlines()]
    assert rows.count(["random", "aten.uniform_.default"]) == 5
    assert ["uninitialized", "aten.empty.memory_format"] in rows


def _findings(n: int, verdict: Verdict) -> tuple[Finding, ...]:
    return tuple(Finding(id=f"{verdict.value}{i}", op="aten.index_add_.default", verdict=verdict, calls=1,
                         signature=f"f32[{i + 1}]", phases=("backward",), sites=(Site("train.py", i + 1, "step", ""),),
                         first_call=i + 1) for i in range(n))


def test_long_tables_say_where_the_rest_is():
    report = Report(environment={"torch": "2.13.0", "cpu": "x"}, settings={"reps": 2},
                    all_findings=_findings(45, Verdict.DIVERGES) + _findings(3, Verdict.RANDOM), total_calls=48)
    text = table.report(report)
    assert text.count("diverges ") == table.MAX_FINDINGS
    assert "... 5 more (--show-all lists them)" in text
    assert "+ 3 random (backward 3): not listed (--show-all lists them)" in text
    written = table.report(report, written_to="out/r.json")
    assert "... 5 more (listed in out/r.json; --show-all shows them here)" in written
    every = table.report(report, show_all=True)
    assert every.count("diverges ") == 45 and every.count("random ") == 3 and "more (" not in every


_LIB = None


def _long_failure_op():
    """A custom op (Python kernel) that refuses a second run with a ~480-character error: its replay fails."""
    global _LIB
    import torch

    if _LIB is None:
        _LIB = torch.library.Library("opaudit_long_error", "DEF")
        _LIB.define("refuses(Tensor x) -> Tensor")
        calls = [0]

        def refuses(x):
            calls[0] += 1
            if calls[0] > 1:
                raise RuntimeError("cannot run twice: " + "the device state was consumed by the first run; " * 9)
            return x * 2

        _LIB.impl("refuses", refuses, "CPU")
    return lambda: torch.ops.opaudit_long_error.refuses(torch.ones(3))


def test_a_long_skip_reason_is_cut_in_the_verdict_column_and_shown_whole_below():
    import opaudit

    report = opaudit.audit(_long_failure_op(), reps=1)
    (f,) = [f for f in report.all_findings if f.op.startswith("opaudit_long_error")]
    assert f.verdict is Verdict.SKIPPED and len(f.reason) > 400
    text = table.report(report)
    findings_table = text.split("\n\n")[0]
    assert max(map(len, findings_table.splitlines())) < 200, findings_table
    assert f"skipped ({f.reason[:table.MAX_REASON - 1]}…)" in findings_table
    below = text[text.index("Reasons cut short above:"):]
    assert " ".join(f.reason.split()) in " ".join(below.split())  # the whole reason, wrapped
    assert max(map(len, text.splitlines())) < 200
