"""Signals at any moment end a command with 130 (SIGINT), 143 (SIGTERM) or 129 (SIGHUP), with a partial
report or none, never a complete one, and never a traceback.

Every signal here is real and lands at an exact moment: the process sends it to itself
when it first imports a module (``tests/fixtures/signals/sitecustomize.py``), or a catalog
worker sends it to its parent as it starts a task. No sleeps decide when.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml
from conftest import EXAMPLES, ROOT, default_signals

HOOK = os.path.join(ROOT, "tests", "fixtures", "signals")


def _opaudit(args, env, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HOOK, ROOT, os.environ.get("PYTHONPATH", "")]), **env)
    return subprocess.run([sys.executable, "-m", "opaudit", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=default_signals)


@pytest.mark.parametrize(("module", "signame", "code", "said"), [
    ("opaudit.cli.main", "SIGINT", 130, "interrupted"),  # before opaudit's handlers are in place
    ("numpy", "SIGINT", 130, "interrupted"),   # while import torch loads NumPy: its C++ swallowed the interrupt
    ("numpy", "SIGTERM", 143, "terminated"),
    ("numpy", "SIGHUP", 129, "terminated"),
])
def test_a_signal_while_opaudit_starts_ends_it_with_no_report(tmp_path, module, signame, code, said):
    if module == "numpy":
        pytest.importorskip("numpy")
    out = tmp_path / "r.yaml"
    done = _opaudit([os.path.join(EXAMPLES, "mlp.py"), "--reps", "1", "-o", str(out)],
                    {"OPAUDIT_TEST_SIGNAL_ON_IMPORT": f"{module}:{signame}"})
    assert done.returncode == code, done.stderr
    assert done.stderr.splitlines()[-1] == f"opaudit: {said}"
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_sigterm_on_a_catalog_sweep_writes_the_partial_file_at_once_and_stops_the_worker(tmp_path):
    out, pidfile = tmp_path / "cat.yaml", tmp_path / "worker.pid"
    done = _opaudit(["catalog", "--ops", "abs,neg", "--dtypes", "float32", "--no-stress", "--max-samples", "1",
                     "--reps", "1", "-o", str(out)],
                    {"OPAUDIT_TEST_SIGNAL_PARENT": f"2:SIGTERM:{pidfile}"})
    assert done.returncode == 143, done.stderr
    assert done.stderr.endswith(f"opaudit: terminated; resume with: opaudit catalog ... -o {out} --resume\n")
    partial = yaml.safe_load((tmp_path / "cat.yaml.partial").read_text())
    assert partial["complete"] is False
    assert [s["source"] for s in partial["swept"]] == ["abs"]  # the first task, done before the signal
    assert not out.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)  # the worker was stopped, not left to finish its task


def test_a_signal_the_script_swallows_still_ends_the_audit_without_a_complete_report(tmp_path, capsys):
    from opaudit.cli.main import main

    script = tmp_path / "swallows.py"
    script.write_text("import os, signal, torch\n"
                      "torch.ones(3).sum()\n"
                      "try:\n"
                      "    os.kill(os.getpid(), signal.SIGTERM)\n"
                      "except BaseException:\n"
                      "    pass  # a script that catches everything, the interrupt included\n")
    out = tmp_path / "r.yaml"
    assert main([str(script), "--reps", "1", "-o", str(out)]) == 143
    assert capsys.readouterr().err.endswith("opaudit: terminated\n")
    assert not out.exists()


def _ignore_sigint_and_sighup():
    # What a shell without job control (SIGINT) and nohup (SIGHUP) give a background job.
    default_signals()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def test_signals_the_audit_started_with_ignored_stay_ignored(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import os, signal, torch\n"
                      "x = torch.ones(3)\n"
                      "os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C meant for the foreground job\n"
                      "os.kill(os.getpid(), signal.SIGHUP)  # the terminal closing under nohup\n"
                      "(x * 2).sum()\n")
    out = tmp_path / "r.yaml"
    done = subprocess.run([sys.executable, "-m", "opaudit", str(script), "--reps", "1", "-q", "-o", str(out)],
                          capture_output=True, text=True, timeout=240, preexec_fn=_ignore_sigint_and_sighup)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(out.read_text())["complete"] is True



def test_a_distributed_audit_started_with_signals_ignored_keeps_them_ignored(tmp_path):
    """``--nproc-per-node``: torchrun's launcher installs its own handlers; the signals the audit started with
    ignored stay ignored there too (rank 0 sends them to the launcher, its parent)."""
    script = tmp_path / "train.py"
    script.write_text("import os, signal, torch\n"
                      "x = torch.ones(3)\n"
                      "if os.environ.get('RANK') == '0':\n"
                      "    os.kill(os.getppid(), signal.SIGINT)\n"
                      "    os.kill(os.getppid(), signal.SIGHUP)\n"
                      "(x * 2).sum()\n")
    out = tmp_path / "r.yaml"
    done = subprocess.run([sys.executable, "-m", "opaudit", "--nproc-per-node", "2", str(script), "--reps", "1",
                           "-q", "-o", str(out), "--dist-timeout", "60"],
                          capture_output=True, text=True, timeout=240, preexec_fn=_ignore_sigint_and_sighup)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(out.read_text())["complete"] is True
