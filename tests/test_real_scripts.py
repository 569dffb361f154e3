"""Issue 13: verdicts users can trust on real scripts (no false alarms, no silent blind spots)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, default_signals

from opaudit.cli.main import main
from opaudit.data.report import load
from opaudit.data.verdict import Verdict
from opaudit.flows.catalog import CatalogRequest, SweepConfig, build_catalog

SCRIPTS = os.path.join(ROOT, "tests", "fixtures", "scripts")


def _script(name: str) -> str:
    return os.path.join(SCRIPTS, name)


def _audit(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _report(tmp_path, capsys, *argv: str, name: str = "r.yaml") -> tuple[int, dict]:
    path = tmp_path / name
    code, _, err = _audit(capsys, *argv, "--no-timing", "-o", str(path))
    assert path.exists(), err
    return code, yaml.safe_load(path.read_text())


def _by_op(report: dict, op: str) -> list[dict]:
    return [f for f in report["findings"] if f["op"] == op]


# -- 1: a partly uninitialized output is not a divergence -----------------------------
def test_ctc_loss_is_partly_uninitialized_not_diverging(tmp_path, capsys):
    code, report = _report(tmp_path, capsys, _script("ctc_train.py"), "--reps", "3")
    assert report["summary"]["diverges"] == 0 and code == 0
    (ctc,) = _by_op(report, "aten._ctc_loss.Tensor")
    assert ctc["verdict"] == "uninitialized"
    # The loss (output 0) is compared and identical; the never-written part of output 1 is named.
    assert ctc["reason"].startswith("output 1: ") and "never written" in ctc["reason"]
    assert ctc["default_diverged"] == "0/3"
    assert "never writes" in ctc["remedy"]


def test_ctc_loss_in_the_catalog_sweep_is_not_diverging():
    """The catalog classifies through the same replay: ``_ctc_loss`` on OpInfo's and stress samples."""
    sweep = SweepConfig(max_samples=2, stress_samples=1, stress_elements=100_000, reps=3)
    catalog = build_catalog(CatalogRequest(sweep, ("nn.functional.ctc_loss",), isolate=False, modules=False))
    ctc = [e for e in catalog.entries if e.op.startswith("aten._ctc_loss.")]
    assert ctc, catalog.entries
    assert all(e.verdict is not Verdict.DIVERGES for e in ctc), ctc
    assert any(e.verdict is Verdict.UNINITIALIZED for e in ctc), ctc


# -- 6: random from observed RNG use -------------------------------------------------
SDPA = "aten._scaled_dot_product_flash_attention_for_cpu.default"


def test_sdpa_without_dropout_is_not_random(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDPA_DROPOUT", "0.0")
    _, report = _report(tmp_path, capsys, _script("sdpa_attention.py"), "--reps", "2")
    (f,) = _by_op(report, SDPA)
    assert f["verdict"] == "stable" and "rng" not in f


def test_sdpa_with_dropout_is_random(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDPA_DROPOUT", "0.5")
    _, report = _report(tmp_path, capsys, _script("sdpa_attention.py"), "--reps", "2")
    drawn = [f for f in report["findings"] if f["verdict"] == "random" and f["first_call"] > 3]
    assert drawn, report["findings"]


# -- 7: nothing process-specific in a signature ---------------------------------------
def test_shuffling_loader_reports_are_byte_identical(tmp_path, capsys):
    paths = []
    for name in ("a.yaml", "b.yaml"):
        _report(tmp_path, capsys, _script("shuffle_loader.py"), "--reps", "2", name=name)
        paths.append(tmp_path / name)
    a, b = (p.read_text() for p in paths)
    assert a == b
    assert "generator=Generator(cpu)" in a and " at 0x" not in a


# -- 2-4: the whole-step check ---------------------------------------------------------
def test_two_worker_dataloader_is_reproducible_in_deterministic_mode(tmp_path, capsys):
    """Profiler markers and batch arrivals land at different places among the ops: not a path split."""
    code, report = _report(tmp_path, capsys, _script("worker_loader.py"), "--reps", "1", "--run-check", "3",
                           "--fail-on", "not_reproducible")
    checks = {r["mode"]: r for r in report["run_checks"]}
    assert checks["deterministic"]["reproducible"], checks["deterministic"]
    assert checks["default"]["reproducible"], checks["default"]
    assert "path_split" not in checks["deterministic"]
    assert checks["deterministic"]["compared"] > 0
    assert code == 0


def test_main_style_script_lists_its_gradient_and_optimizer_mismatches(tmp_path, capsys):
    code, report = _report(tmp_path, capsys, _script("main_style.py"), "--reps", "1", "--run-check",
                           "--fail-on", "not_reproducible_deterministic")
    check = {r["mode"]: r for r in report["run_checks"]}["deterministic"]
    assert not check["reproducible"]
    listed = " | ".join(check["mismatches"])
    for name in ("grad of Sequential.0.weight", "grad of Sequential.2.weight", "value of Sequential.1.running_mean",
                 "optimizer state momentum_buffer of Sequential.0.weight"):
        assert name in listed, listed
    assert "leaf tensor" not in listed  # each parameter once, under its module's name
    assert code == 1  # gated by --fail-on not_reproducible_deterministic


def test_run_check_exit_code_is_gated_only_when_asked(tmp_path, capsys):
    code, report = _report(tmp_path, capsys, _script("main_style.py"), "--reps", "1", "--run-check")
    assert not report["run_checks"][0]["reproducible"] and code == 0
    code, _, err = _audit(capsys, _script("main_style.py"), "--fail-on", "not_reproducible")
    assert code == 2 and "needs --run-check" in err
    # A prediction has no place for the run check's result: refused rather than dropped.
    catalog = os.path.join(ROOT, "catalogs", "cpu-x86_64-torch2.13.0.yaml")
    code, out, err = _audit(capsys, _script("main_style.py"), "--run-check", "--fail-on", "not_reproducible",
                            "--against", catalog)
    assert code == 2 and out == ""
    assert err.strip() == ("opaudit: error: --run-check cannot be combined with --against "
                           "(audit with --run-check, then predict)")


def test_nothing_to_compare_is_said(tmp_path, capsys):
    script = tmp_path / "plain.py"
    script.write_text("import torch\nx = torch.randn(4)\nprint((x * 2).sum().item())\n")
    code, out, err = _audit(capsys, str(script), "--reps", "1", "--run-check", "-q")
    assert "nothing to compare after the step" in out and code == 0


# -- 5: a script that turns strict mode on itself ----------------------------------------
def test_script_in_strict_mode_gets_a_report_with_every_raising_op(tmp_path, capsys):
    code, report = _report(tmp_path, capsys, _script("strict_mode.py"), "--reps", "2")
    assert code == 1
    raising = sorted((f["op"], f["sites"][0]["line"]) for f in report["findings"] if f["verdict"] == "raises")
    assert raising == [("aten.max_unpool2d.default", 11), ("aten.put_.default", 13)]
    assert any("turned on torch.use_deterministic_algorithms(True) itself" in w for w in report["env_warnings"])
    # The script's own assertion (strict mode still on after the refused ops) held: the run went on to the end.
    assert report["summary"]["total_calls"] > 15


# -- 9: SIGTERM and Ctrl-C while the script runs --------------------------------------------
def _start(argv: list[str], started) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRAINING_STARTED=str(started))
    return subprocess.Popen([sys.executable, "-m", "opaudit.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=default_signals)


def _wait_for_file(path, proc, limit: float = 240.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"opaudit exited ({proc.returncode}) before the script started: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the script to start")
        time.sleep(0.05)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_stopping_a_running_script_audits_what_it_recorded(tmp_path, signum, code):
    out, started = tmp_path / "report.yaml", tmp_path / "started"
    proc = _start([_script("long_training.py"), "--reps", "2", "--no-timing", "-o", str(out)], started)
    _wait_for_file(started, proc)
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err
    assert "partial report (complete: false) written to" in err
    report = load(str(out))
    assert report.complete is False
    assert report.settings["recording_cut_short"] == ("interrupted" if signum == signal.SIGINT else "terminated")
    assert {"aten.index_put_.default", "aten.randint.low"} <= {f.op for f in report.all_findings}
    assert sorted(os.listdir(tmp_path)) == ["report.yaml", "started"]  # no temp file left


# -- 8: DataLoader worker processes ----------------------------------------------------------
def test_ops_in_dataloader_workers_are_recorded_and_replayed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ITEM_SIZE", "200000")
    with open(_script("worker_pipeline.py"), encoding="utf-8") as f:
        line = next(i for i, text in enumerate(f, 1) if "counts.index_put_(" in text)
    found = {}
    for workers in ("0", "2"):
        monkeypatch.setenv("WORKERS", workers)
        _, report = _report(tmp_path, capsys, _script("worker_pipeline.py"), "--reps", "2", name=f"w{workers}.yaml")
        (f,) = _by_op(report, "aten.index_put_.default")
        found[workers] = f
        assert f["calls"] == 2 and f["sites"][0]["line"] == line and f["verdict"] != "skipped"
        assert f["default_diverged"]  # replayed in the parent
    assert found["0"]["id"] == found["2"]["id"]
    assert report["settings"]["child_processes"] == {"forked": 2, "recorded": 2}
    assert not any("child process" in w for w in report["env_warnings"])


def test_workers_that_outlive_the_recording_ship_when_it_ends(tmp_path, capsys, monkeypatch):
    # persistent_workers=True: the workers still run when the script (and its recording) ends.
    monkeypatch.setenv("ITEM_SIZE", "1000")
    monkeypatch.setenv("PERSISTENT", "1")
    _, report = _report(tmp_path, capsys, _script("worker_pipeline.py"), "--reps", "1")
    assert report["settings"]["child_processes"] == {"forked": 2, "recorded": 2}
    (f,) = _by_op(report, "aten.index_put_.default")
    assert f["calls"] == 2 and f["phases"] == ["data"]
    assert not any("child process" in w for w in report["env_warnings"])


def test_workers_ship_what_they_ran_when_the_window_ends_mid_epoch(tmp_path, capsys):
    # The default window (3 steps) ends after 3 of 100 batches: by then the loader had sent its
    # 2 workers 2 * prefetch_factor tasks up front and one more per batch taken, 7 of 4 items;
    # each item runs one mul. The workers finish the tasks they were sent before they ship.
    _, report = _report(tmp_path, capsys, _script("long_loader.py"), "--reps", "1")
    assert report["settings"]["recorded"] == "steps 1-3"
    assert report["settings"]["child_processes"] == {"forked": 2, "recorded": 2}
    (mul,) = _by_op(report, "aten.mul.Tensor")
    assert mul["phases"] == ["data"] and mul["calls"] == 7 * 4
    assert not any("child process" in w for w in report["env_warnings"])


CHILDREN_THAT_DO_NOT_SHIP = """
import multiprocessing, os, torch

def work():
    torch.arange(6.0).cumsum(0)
    os._exit(0)  # skips multiprocessing's finalizers, which ship

p = multiprocessing.get_context("fork").Process(target=work)
p.start()
p.join()
pid = os.fork()
if pid == 0:
    torch.arange(7.0).cumsum(0)
    os._exit(0)
os.waitpid(pid, 0)
torch.arange(5.0).cumsum(0)
"""


def test_children_whose_ops_are_missing_are_reported_with_the_reason(tmp_path, capsys):
    script = tmp_path / "children.py"
    script.write_text(CHILDREN_THAT_DO_NOT_SHIP)
    _, report = _report(tmp_path, capsys, str(script), "--reps", "1", "--no-deterministic-pass")
    assert report["settings"]["child_processes"] == {"forked": 2, "recorded": 0}
    (warning,) = [w for w in report["env_warnings"] if "child process" in w]
    assert warning.startswith("2 of 2 child process(es) forked while recording ran ops that were not recorded: ")
    assert "ended before shipping (killed, or os._exit): 1" in warning
    assert "forked with os.fork, not multiprocessing" in warning and "persistent_workers" not in warning


# -- 12: remedies that fit how the op was called ------------------------------------------
INDEXING = """
import torch

g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 1000, (3_000_000,), generator=g)
weights = torch.randn(3_000_000, generator=g) * torch.logspace(-3, 3, 3_000_000)
if {backward}:
    table = torch.zeros(1000, requires_grad=True)
    (table[ids] * weights).sum().backward()
else:
    torch.zeros(1000).index_put_((ids,), weights, accumulate=True)
"""


@pytest.mark.parametrize("backward", [True, False])
def test_index_put_remedy_depends_on_how_it_was_called(tmp_path, capsys, backward):
    script = tmp_path / "indexing.py"
    script.write_text(INDEXING.format(backward=backward))
    _, report = _report(tmp_path, capsys, str(script), "--reps", "6")
    (f,) = [f for f in report["findings"] if f["op"].startswith("aten.index_put") and f["verdict"] == "diverges"]
    assert ("backward of advanced indexing" in f["remedy"]) is backward
    assert ("index_add_" in f["remedy"]) is not backward


# -- 13: the capture budget ---------------------------------------------------------------------
BUDGET = """
import torch

big = torch.randn(4_000_000)   # 16 MB
counts = big.new_zeros(10)     # needs big's dtype and device, not its 16 MB
doubled = big * 2
"""


def test_capture_budget_charges_only_values_that_matter_and_says_what_would_fit(tmp_path, capsys):
    script = tmp_path / "budget.py"
    script.write_text(BUDGET)
    _, report = _report(tmp_path, capsys, str(script), "--reps", "1", "--capture-budget", "8")
    (zeros,) = _by_op(report, "aten.new_zeros.default")
    assert zeros["verdict"] == "stable"
    (mul,) = _by_op(report, "aten.mul.Tensor")
    assert mul["verdict"] == "skipped" and mul["reason"] == "capture budget"
    assert "--capture-budget 16 (MiB)" in mul["remedy"]


# -- 15: entry arguments, CSV on stdout, --against and factory ops ------------------------------
def test_entry_with_required_arguments_is_a_clear_error(tmp_path, capsys):
    script = tmp_path / "step.py"
    script.write_text("def train(batch, lr=0.1):\n    return batch\n")
    code, _, err = _audit(capsys, str(script), "--entry", "train")
    assert code == 2
    assert "takes required arguments (batch)" in err and "must take no arguments" in err
    assert "TypeError" not in err


def test_csv_on_stdout_still_tells_the_outcome_on_stderr(capsys):
    code, out, err = _audit(capsys, _script("main_style.py"), "--reps", "1", "--run-check", "--format", "csv")
    assert out.startswith("id,op,verdict")
    assert "Whole-step check, deterministic mode, 2 runs: NOT reproducible" in err
    assert "unique signatures" in err


FACTORIES = """
import torch

torch.zeros(4, 4)
torch.ones(4)
torch.arange(0.0, 4.0, 0.5)
torch.arange(4)
"""


def test_against_looks_up_factory_ops_under_the_dtype_they_ran_with(tmp_path, capsys):
    script = tmp_path / "factories.py"
    script.write_text(FACTORIES)
    out = tmp_path / "prediction.yaml"
    catalog = os.path.join(ROOT, "catalogs", "cpu-x86_64-torch2.13.0.yaml")
    _audit(capsys, str(script), "--reps", "1", "--against", catalog, "-o", str(out))
    rows = {(r["op"], r["signature"].split(",")[0]): r for r in yaml.safe_load(out.read_text())["predictions"]}
    assert rows[("aten.zeros.default", "[4")]["predicted"] == "stable"
    assert rows[("aten.zeros.default", "[4")]["dtype"] == "float32"
    assert rows[("aten.arange.start_step", "0.0")]["dtype"] == "float32"
    assert rows[("aten.arange.start_step", "0.0")]["predicted"] != "unknown"
    assert all(r["predicted"] != "unknown" for r in rows.values()), rows


# -- 14: output a person can read --------------------------------------------------------------
def test_progress_goes_to_a_log_as_plain_lines_and_the_fill_cost_is_never_negative(tmp_path, capsys):
    script = tmp_path / "alloc.py"
    script.write_text("import torch\nfor _ in range(50):\n    buf = torch.empty(100_000)\n    (buf.fill_(1) * 2).sum()\n")
    code, out, err = _audit(capsys, str(script), "--reps", "2")  # capsys: stderr is not a terminal
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("opaudit: replaying ")]
    assert lines and lines[-1].startswith("opaudit: replaying 4/4 signatures") and len(lines) <= 11
    (fill,) = [line for line in out.splitlines() if "return uninitialized memory" in line]
    assert "per step" not in fill and "+" not in fill and "-" not in fill.split("(")[1].split(")")[0]
    assert "no measurable cost here" in fill or "us in total over the recorded run's calls" in fill
