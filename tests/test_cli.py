"""The command line: exit codes, outputs, and every kind of bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import EXAMPLES, ROOT

from opaudit.cli.main import main
from opaudit.data.report import VERSION as REPORT_VERSION
from opaudit.engine.loader import ModelLoadError


def _script(tmp_path, body, name="train.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return str(p)


RAISING = """
    import torch
    torch.zeros(10).put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))
"""

CLEAN = """
    import torch
    x = torch.randn(4, 4)
    (x @ x).relu().sum()
"""


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


TABLE_COLUMNS = ["verdict", "op", "calls", "phase", "where", "module", "default", "determ.", "max |diff|",
                 "det. cost"]


def _table(text):
    """The first plain-text table in ``text``: its header and its rows as dicts, cut at the
    column spans the dashed rule gives (a row of a table that lost its shape fails here)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if re.fullmatch(r"-+( +-+)+", line))
    spans = [m.span() for m in re.finditer(r"-+", lines[rule])]
    header = [lines[rule - 1][a:b].strip() for a, b in spans]
    rows = []
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        assert line[spans[0][1]:spans[1][0]].strip() == "", f"row does not line up with the rule: {line!r}"
        rows.append(dict(zip(header, (line[a:b if b < len(line) else None].strip() for a, b in spans))))
    return header, rows


def _line_of(path, text):
    with open(path, encoding="utf-8") as f:
        return next(i for i, line in enumerate(f, 1) if text in line)


def test_findings_exit_1_and_table_on_stdout(tmp_path, capsys):
    script = _script(tmp_path, RAISING)
    code, out, err = _run([script, "--reps", "2"], capsys)
    assert code == 1
    header, rows = _table(out)
    assert header == TABLE_COLUMNS
    where = f"train.py:{_line_of(script, 'put_(')}"
    assert [(r["verdict"], r["op"], r["calls"], r["phase"], r["where"], r["default"], r["determ."]) for r in rows] == [
        ("raises", "aten.put_.default", "1", "forward", where, "0/2", "0/2"),
    ]  # stable findings are counted in the summary line, not listed
    assert "Will deterministic mode crash this run? Yes" in out
    assert out.rstrip().splitlines()[-1] == \
        "4 op calls, 2 unique signatures (+2 view/metadata calls not replayed): 1 raises, 1 stable"


def test_clean_script_exits_0(tmp_path, capsys):
    script = _script(tmp_path, CLEAN)
    code, out, _ = _run([script, "--reps", "2", "--show-all"], capsys)
    assert code == 0
    header, rows = _table(out)
    assert header == TABLE_COLUMNS
    where = f"train.py:{_line_of(script, 'randn')}"
    assert [(r["verdict"], r["op"], r["where"]) for r in rows] == [("random", "aten.randn.default", where)]
    assert out.rstrip().splitlines()[-1] == \
        "4 op calls, 4 unique signatures (+0 view/metadata calls not replayed): 1 random, 3 stable"
    # Without --show-all the random row is summarised, not listed.
    code, out, _ = _run([script, "--reps", "2"], capsys)
    assert code == 0 and "aten.randn.default" not in out
    assert out.splitlines()[0] == "1 random (forward 1): not listed (--show-all lists them)"


@pytest.mark.parametrize("flags", [["--exit-zero"], ["--fail-on", "none"], ["--fail-on", "diverges"]])
def test_exit_zero_and_fail_on(tmp_path, capsys, flags):
    code, _, _ = _run([_script(tmp_path, RAISING), "--reps", "2", *flags], capsys)
    assert code == 0


def test_output_file_gets_the_report_and_stderr_the_summary(tmp_path, capsys):
    out_path = tmp_path / "report.yaml"
    code, out, err = _run([_script(tmp_path, RAISING), "--reps", "2", "-o", str(out_path)], capsys)
    assert code == 1 and out == ""
    assert "report written to" in err and "aten.put_.default" in err
    doc = yaml.safe_load(out_path.read_text())
    assert doc["format"] == "opaudit-report" and doc["summary"]["raises"] == 1
    assert doc["settings"]["script"] == "train.py"


def _check_raising_report(doc):
    """The RAISING script's report, whatever file format carried it."""
    assert doc["format"] == "opaudit-report" and doc["version"] == REPORT_VERSION
    assert {k: doc["summary"][k] for k in ("raises", "stable", "signatures", "total_calls")} == \
        {"raises": 1, "stable": 1, "signatures": 2, "total_calls": 4}
    assert [(f["op"], f["verdict"], f["signature"]) for f in doc["findings"]] == [
        ("aten.put_.default", "raises", "f32[10], i64[2], f32[2]"),
        ("aten.zeros.default", "stable", "[10], device=device(type='cpu'), pin_memory=False"),
    ]


@pytest.mark.parametrize("ext", ["json", "csv", "md"])
def test_output_format_from_extension(tmp_path, capsys, ext):
    out_path = tmp_path / f"report.{ext}"
    script = _script(tmp_path, RAISING)
    code, out, err = _run([script, "--reps", "2", "-o", str(out_path), "-q"], capsys)
    assert code == 1 and out == "" and err == ""
    text = out_path.read_text()
    where = f"train.py:{_line_of(script, 'put_(')}"
    if ext == "json":
        _check_raising_report(json.loads(text))
    elif ext == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [(r["op"], r["verdict"], r["locations"], r["calls"]) for r in rows] == [
            ("aten.put_.default", "raises", where, "1"), ("aten.zeros.default", "stable", where, "1")]
        assert rows[0]["alert_kind"] == "no_deterministic_impl"
        assert rows[0]["strict_error"].startswith("put_ does not have a deterministic implementation")
    else:
        lines = text.splitlines()
        assert lines[0] == "# opaudit report"
        counts = {cells[0]: cells[1] for cells in
                  ([c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| "))
                  if len(cells) == 3}
        assert counts["raises"] == "1" and counts["stable"] == "1" and counts["diverges"] == "0"
        assert "## Will deterministic mode crash this run?" in lines
        assert any("aten.put_.default" in line and where in line for line in lines if line.startswith("|"))


def test_format_to_stdout(tmp_path, capsys):
    code, out, _ = _run([_script(tmp_path, RAISING), "--reps", "2", "--format", "json"], capsys)
    assert code == 1
    _check_raising_report(json.loads(out))


def test_entry_function_is_recorded_not_main(tmp_path, capsys):
    body = """
        import sys, torch
        CALLS = []
        def opaudit_step():
            torch.zeros(10).put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))
        def other():
            torch.ones(3).sum()
        if __name__ == "__main__":
            raise SystemExit("must not run as __main__ when opaudit_step exists")
    """
    code, out, _ = _run([_script(tmp_path, body), "--reps", "2"], capsys)
    assert code == 1 and "aten.put_.default" in out
    code, out, _ = _run([_script(tmp_path, body), "--entry", "other", "--reps", "2", "--format", "yaml"], capsys)
    assert code == 0 and "aten.put_" not in out and "op: aten.sum.default" in out


def test_script_args_after_double_dash(tmp_path, capsys):
    body = """
        import sys, torch
        assert sys.argv[1:] == ["--lr", "0.1"], sys.argv
        torch.ones(2).sum()
    """
    code, _, err = _run([_script(tmp_path, body), "--reps", "1", "--", "--lr", "0.1"], capsys)
    assert code == 0, err


def test_script_with_no_torch_op_gives_an_empty_valid_report(tmp_path, capsys):
    out_path = tmp_path / "r.yaml"
    code, _, _ = _run([_script(tmp_path, "print('hello')\n"), "-o", str(out_path), "-q"], capsys)
    assert code == 0
    doc = yaml.safe_load(out_path.read_text())
    assert doc["findings"] == [] and doc["summary"]["signatures"] == 0


def _bad(argv, capsys, must_contain):
    code, out, err = _run(argv, capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("opaudit: error:")
    assert must_contain in lines[0], lines[0]


def test_nonexistent_file(tmp_path, capsys):
    _bad([str(tmp_path / "nope.py")], capsys, "no such file")


def test_directory(tmp_path, capsys):
    _bad([str(tmp_path)], capsys, "is a directory")


def test_non_python_file(tmp_path, capsys):
    p = tmp_path / "data.csv"
    p.write_text("a,b\n1,2\n")
    _bad([str(p)], capsys, "not a Python script")


def test_binary_file(tmp_path, capsys):
    p = tmp_path / "model"
    p.write_bytes(b"\x89PNG\x00\x01\xff")
    _bad([str(p)], capsys, "not a Python script")


def test_syntax_error(tmp_path, capsys):
    _bad([_script(tmp_path, "def f(:\n    pass\n")], capsys, "syntax error")


def test_missing_entry(tmp_path, capsys):
    _bad([_script(tmp_path, CLEAN), "--entry", "train_step"], capsys, "no function named 'train_step'")


@pytest.mark.parametrize("reps", ["0", "-3", "many"])
def test_bad_reps(tmp_path, capsys, reps):
    _bad([_script(tmp_path, CLEAN), "--reps", reps], capsys, "--reps")


def test_unknown_flag(tmp_path, capsys):
    _bad([_script(tmp_path, CLEAN), "--frobnicate"], capsys, "unrecognized arguments")


def test_unknown_fail_on_verdict(tmp_path, capsys):
    _bad([_script(tmp_path, CLEAN), "--fail-on", "explodes"], capsys, "unknown verdict")


def test_unwritable_output_path(tmp_path, capsys):
    _bad([_script(tmp_path, CLEAN), "-o", str(tmp_path / "missing" / "r.yaml")], capsys, "does not exist")
    _bad([_script(tmp_path, CLEAN), "-o", str(tmp_path)], capsys, "is a directory")
    _bad([_script(tmp_path, CLEAN), "-o", str(tmp_path / "r.docx")], capsys, "unknown extension")


def test_user_exception_shows_their_frames_only(tmp_path, capsys):
    body = """
        import torch

        def build():
            torch.ones(2).sum()
            return torch.ones(2) @ torch.ones(3)   # shape error raised inside torch

        build()
    """
    code, out, err = _run([_script(tmp_path, body)], capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert 'train.py", line 6, in build' in err
    assert "site-packages" not in err and "opaudit/" not in err
    assert err.strip().splitlines()[-1].startswith("opaudit: error: the script raised RuntimeError")


@pytest.mark.parametrize("where", ["module", "step"])
def test_a_base_exception_the_script_raises_is_its_failure_not_opaudits(tmp_path, capsys, where):
    """Not an Exception (a BaseException subclass, GeneratorExit...), and a message that cannot be made."""
    body = """
        import torch

        class Stop(BaseException):
            def __str__(self):
                raise ValueError("no message either")

        def opaudit_step():
            torch.ones(2).sum()
            raise Stop()
    """ + ("" if where == "step" else "\n        raise Stop()\n")
    code, out, err = _run([_script(tmp_path, body), "-q"], capsys)
    assert code == 2 and out == ""
    assert "opaudit/" not in err and "internal error" not in err
    assert err.strip().splitlines()[-1] == ("opaudit: error: the script raised Stop: "
                                            "(its message could not be made: ValueError)")


@pytest.mark.parametrize("command", [["AUDIT"], ["diff", "A", "A"], ["replay", "A"]])
@pytest.mark.parametrize("fail_on", ["", ",", " , "])
def test_an_empty_fail_on_is_refused_not_taken_for_never(tmp_path, capsys, command, fail_on):
    """``--fail-on "$GATE"`` with GATE unset must not turn the CI gate off: 'none' says never."""
    script = _script(tmp_path, "import torch\ntorch.ones(2).sum()\n")
    argv = [script if a == "AUDIT" else str(tmp_path / "nothing.yaml") if a == "A" else a for a in command]
    code, out, err = _run([*argv, "--fail-on", fail_on], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "'none' never fails (an empty list is refused" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        main([str(tmp_path / "nope.py"), "--debug"])


def test_console_entry_point_runs_the_shipped_example():
    """The quick start through the console entry point, on 4 threads: a real race that must show.

    With two busy processes beside the suite and 2 threads, the example's two lookup backwards
    repeated their bits in up to 13 and 10 of 30 pairs of runs: the second thread often starts
    after the first has finished. With 4 threads on the 2 cores they are preempted mid-way and
    neither repeated in 30 pairs (scripts/race_rate.py --threads 4).
    """
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-m", "opaudit", os.path.join(EXAMPLES, "recommender.py"), "--reps", "5", "--threads", "4"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=240,
    )
    assert proc.returncode == 1, proc.stderr
    assert "aten.index_put.default" in proc.stdout and "diverges" in proc.stdout
    assert "opaudit/examples/recommender.py:" in proc.stdout
