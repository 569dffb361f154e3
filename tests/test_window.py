"""Step windows on real training scripts: --steps, --start-step, --max-record-seconds, stopping cleanly."""

from __future__ import annotations

import os
import textwrap

import pytest
import yaml
from conftest import EXAMPLES, ROOT

from opaudit.cli.main import main

TRAIN_LOOP = os.path.join(ROOT, "tests", "fixtures", "scripts", "train_loop.py")


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_steps_stop_a_long_script_cleanly_with_its_workers_and_files(tmp_path, capsys):
    log, pids, report = tmp_path / "log.txt", tmp_path / "pids.txt", tmp_path / "r.yaml"
    code, _, err = _run([TRAIN_LOOP, "--steps", "2", "--reps", "1", "-o", str(report), "--",
                         "--steps", "20000", "--workers", "2", "--log", str(log), "--pids", str(pids)], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert "recorded steps 1-2 of the script, then steps 3-4 in deterministic mode; stopped it there" in err
    assert yaml.safe_load(report.read_text())["settings"]["recorded"] == "steps 1-2"
    # The log was never closed by the script (1 MiB buffer): its lines are there because opaudit
    # dropped the stopped script's globals, which closed it. Every step ran to its end: the window's
    # two, then the two recorded in deterministic mode, in the same run.
    lines = log.read_text().splitlines()
    assert lines[:2] == ["step 1 loss 1.3296", "step 2 loss 1.3272"] and len(lines) == 4
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2  # one run of the script
    assert not [p for p in workers if _alive(p)], "DataLoader workers still running after the stop"


def test_start_step_runs_the_first_steps_unrecorded(tmp_path, capsys):
    log, report = tmp_path / "log.txt", tmp_path / "r.yaml"
    code, _, err = _run([TRAIN_LOOP, "--start-step", "3", "--steps", "1", "--reps", "1", "-o", str(report), "--",
                         "--log", str(log)], capsys)
    assert code == 0, err
    assert "recorded step 4 of the script (steps 1-3 ran unrecorded), then step 5 in deterministic mode; " \
           "stopped it there" in err
    doc = yaml.safe_load(report.read_text())
    assert doc["settings"]["recorded"] == "step 4"
    assert len(log.read_text().splitlines()) == 5  # the unrecorded steps ran once (not once per recording)
    # One step: no model construction, no first-step state init; the optimizer ops are there.
    few = doc["summary"]["total_calls"]
    code, _, _ = _run([TRAIN_LOOP, "--steps", "1", "--reps", "1", "-o", str(report)], capsys)
    first = yaml.safe_load(report.read_text())
    assert code == 0 and first["summary"]["total_calls"] > few
    assert any("optimizer" in f["phases"] for f in doc["findings"])


def test_a_script_shorter_than_the_window_is_recorded_to_its_end(capsys):
    code, _, err = _run([TRAIN_LOOP, "--steps", "5", "--reps", "1", "--", "--steps", "2"], capsys)
    assert code == 0
    assert "recorded steps 1-2 of the script; it ended there" in err


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "argument --steps: must be at least 1 (or 'all'), got 0"),
    (["--steps", "-3"], "argument --steps: must be at least 1 (or 'all'), got -3"),
    (["--steps", "three"], "argument --steps: expected a number of steps or 'all', got 'three'"),
    (["--start-step", "-1"], "argument --start-step: must be 0 or more, got -1"),
    (["--max-record-seconds", "0"], "argument --max-record-seconds: must be positive, got 0"),
])
def test_bad_windows_are_one_line_errors(flags, message, capsys):
    code, out, err = _run([TRAIN_LOOP, *flags], capsys)
    assert code == 2
    assert err == f"opaudit: error: {message}\n" and out == ""


def test_start_step_past_the_end_says_nothing_was_recorded(tmp_path, capsys):
    log = tmp_path / "log.txt"
    code, out, err = _run([TRAIN_LOOP, "--start-step", "10", "--", "--steps", "4", "--log", str(log)], capsys)
    assert code == 2 and out == ""
    assert err == ("opaudit: error: the script ended after 4 optimizer steps, before --start-step 10 was "
                   "reached: nothing was recorded\n")
    assert len(log.read_text().splitlines()) == 4  # what the script saved is intact


def test_max_record_seconds_stops_a_script_without_an_optimizer(tmp_path, capsys, monkeypatch):
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent("""
        import torch
        model = torch.nn.Linear(8, 8)
        x = torch.randn(4, 8)
        with open("served.txt", "w") as f, torch.no_grad():
            while True:  # an inference loop that never ends
                f.write(f"{model(x).sum().item():.3f}\\n")
    """))
    monkeypatch.chdir(tmp_path)
    code, out, err = _run([str(script), "--max-record-seconds", "1", "--reps", "1", "--format", "yaml"], capsys)
    assert code == 0, err
    assert "recorded the script (no optimizer step); stopped it there (--max-record-seconds)" in err
    assert "aten.addmm.default" in {f["op"] for f in yaml.safe_load(out)["findings"]}
    assert (tmp_path / "served.txt").read_text().count("\n") > 1


def test_entry_mode_counts_calls_of_the_entry(capsys):
    code, _, err = _run([os.path.join(EXAMPLES, "mlp.py"), "--start-step", "1", "--steps", "2", "--reps", "1",
                         "--format", "yaml"], capsys)
    assert code == 0
    assert "recorded calls 2-3 of opaudit_step (1 call before ran unrecorded)" in err
    code, out, _ = _run([os.path.join(EXAMPLES, "mlp.py"), "--steps", "2", "--reps", "1", "--format", "yaml"], capsys)
    doc = yaml.safe_load(out)
    assert doc["settings"]["recorded"] == "calls 1-2"
    (addmm,) = [f for f in doc["findings"] if f["op"] == "aten.addmm.default" and f["phases"] == ["forward"]
                and "f32[32,64]" in f["signature"]]
    assert addmm["calls"] == 2


def test_steps_all_of_an_entry_function_needs_a_time_limit(capsys):
    # An entry function has no last call: 'all' used to record one call and say nothing.
    code, out, err = _run([os.path.join(EXAMPLES, "mlp.py"), "--steps", "all", "--reps", "1"], capsys)
    assert code == 2 and out == ""
    assert err == ("opaudit: error: --steps all records a script to its end, and an entry function has none: "
                   "give a number of calls, or --max-record-seconds to call it until then\n")


def test_steps_all_of_an_entry_function_calls_it_until_the_time_limit(tmp_path, capsys):
    script = tmp_path / "tick.py"
    script.write_text(textwrap.dedent("""
        import time
        import torch

        def opaudit_step():
            time.sleep(0.05)
            return torch.ones(3).sum()
    """))
    code, out, err = _run([str(script), "--steps", "all", "--max-record-seconds", "1", "--reps", "1",
                           "--no-deterministic-pass", "--format", "yaml"], capsys)
    assert code == 0, err
    doc = yaml.safe_load(out)
    span = doc["settings"]["recorded"]
    assert span.startswith("calls 1-") and span.endswith(" (stopped by --max-record-seconds)"), span
    last = int(span.removeprefix("calls 1-").split()[0])
    assert last > 1, span
    (total,) = [f for f in doc["findings"] if f["op"] == "aten.sum.default"]
    assert total["calls"] == last


def test_run_check_traces_the_same_window_of_a_long_script(capsys):
    code, out, err = _run([TRAIN_LOOP, "--steps", "2", "--run-check", "--reps", "1", "--", "--steps", "20000"],
                          capsys)
    assert code == 0, err
    assert "Whole-step check, default mode, 2 runs: bitwise reproducible" in out
    assert "Whole-step check, deterministic mode, 2 runs: bitwise reproducible" in out


@pytest.mark.parametrize("wait", [
    "time.sleep(600)",                              # a sleep in C
    "threading.Event().wait()",                     # a lock wait in C, no timeout
    "while True:\n    n = sum(range(100))",         # plain Python, no torch op
])
def test_max_record_seconds_stops_a_script_that_runs_no_ops(wait, tmp_path, capsys):
    script = tmp_path / "idle.py"
    after = tmp_path / "after.txt"
    script.write_text(f"import threading, time\nimport torch\nx = torch.ones(3) * 2\n{wait}\n"
                      f"open({str(after)!r}, 'w').close()\n")
    report = tmp_path / "r.yaml"
    code, _, err = _run([str(script), "--max-record-seconds", "1", "--reps", "1", "--no-deterministic-pass",
                         "-o", str(report)], capsys)
    assert code == 0, err
    assert "stopped it there (--max-record-seconds)" in err
    assert yaml.safe_load(report.read_text())["settings"]["recorded"] == \
        "start of the script (stopped by --max-record-seconds)"
    assert not after.exists()
