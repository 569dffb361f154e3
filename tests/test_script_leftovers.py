"""What a user's script leaves behind in the process: forks, atexit hooks, timers and
signal handlers, ``os._exit``, output on stdout, threads still calling torch, and
dispatch modes entered and never exited.

Everything here is real: ``os.fork``, ``atexit``, ``signal.setitimer``, descriptor-level
writes to stdout and a shell child, a thread flipping torch's global flags. The fork
runs in a subprocess: a child that escaped would run the rest of the test session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import yaml
from conftest import ROOT

from opaudit.cli import main
from opaudit.data.report import load

# put_ without accumulate raises under deterministic mode on every machine: exit 1, not a race.
RAISES = "torch.zeros(4).put_(torch.tensor([0, 0]), torch.ones(2))"


def _script(tmp_path, body, name="train.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _opaudit(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "opaudit", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_forked_child_never_audits_or_writes(tmp_path):
    out = tmp_path / "report.yaml"
    script = _script(tmp_path, f"""
        import os, torch
        {RAISES}
        if os.fork() == 0:
            torch.arange(5.0).cumsum(0)
            print("child", os.getpid(), "falls through")
        # parent and child both fall through to the end of the script
    """)
    # capture_output reads until every holder of the pipes is gone: the child too.
    done = _opaudit([script, "--reps", "1", "-o", str(out)])
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("report written to") == 1, done.stderr
    assert "falls through" in done.stderr
    report = load(str(out))
    assert report.summary["raises"] == 1
    assert "aten.cumsum.default" not in {f.op for f in report.all_findings}  # only the child ran it


def test_atexit_hooks_run_at_the_end_of_the_script_and_keep_the_exit_code(tmp_path, capfd):
    script = _script(tmp_path, f"""
        import atexit, os, torch
        atexit.register(os._exit, 0)
        atexit.register(print, "bye from the script's hook")
        {RAISES}
    """)
    assert main([script, "--reps", "1", "--format", "yaml"]) == 1
    out, err = capfd.readouterr()
    assert out.endswith("...\n")
    assert yaml.safe_load(out)["summary"]["raises"] == 1
    assert "bye from the script's hook" in err
    assert "atexit hook os._exit called os._exit(0)" in err


def test_os_exit_in_the_script_is_exit_2_with_one_line(tmp_path, capsys):
    script = _script(tmp_path, """
        import os, torch
        torch.ones(3).sum()
        os._exit(0)
    """)
    assert main([script, "--reps", "1", "-o", str(tmp_path / "r.yaml")]) == 2
    assert capsys.readouterr().err == ("opaudit: error: the script called os._exit(0), which would end opaudit with "
                                       "it; end the script with sys.exit() or by returning\n")
    assert not (tmp_path / "r.yaml").exists()


def _timers():
    return {t: signal.getitimer(t) for t in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)}


def test_timers_are_cancelled_and_every_signal_handler_is_restored(tmp_path, capsys):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGALRM, signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP)}
    timers = _timers()
    script = _script(tmp_path, """
        import signal, torch

        class Watchdog(Exception):
            pass

        def on_alarm(*_):
            raise Watchdog("too slow")

        for s in (signal.SIGALRM, signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, on_alarm)
        signal.alarm(100000)  # longer than pytest-timeout's own SIGALRM deadline
        signal.setitimer(signal.ITIMER_VIRTUAL, 60)
        signal.setitimer(signal.ITIMER_PROF, 60, 1)
        torch.ones(3).sum()
    """)
    try:
        assert main([script, "--reps", "1", "-q", "-o", str(tmp_path / "r.yaml")]) == 0, capsys.readouterr().err
        after = _timers()
        real = signal.ITIMER_REAL
        assert after[real][0] <= timers[real][0] and (after[real][0] > 0) == (timers[real][0] > 0)
        assert {t: v for t, v in after.items() if t != real} == {t: v for t, v in timers.items() if t != real}
        assert {s: signal.getsignal(s) for s in handlers} == handlers
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.setitimer(signal.ITIMER_PROF, 0)
        for s, h in handlers.items():
            signal.signal(s, h)


def test_the_scripts_stdout_goes_to_stderr_and_the_report_stays_parseable(tmp_path, capfd):
    script = _script(tmp_path, """
        import os, sys, torch
        print("from print")
        sys.stdout.write("from sys.stdout\\n")
        sys.stdout.flush()
        os.write(1, b"from descriptor 1\\n")
        os.system("echo from a shell child")
        torch.ones(3).sum()
    """)
    assert main([script, "--reps", "1", "-q", "--format", "json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["summary"]["signatures"] == 2
    for line in ("from print", "from sys.stdout", "from descriptor 1", "from a shell child"):
        assert line in err


def test_a_dispatch_mode_left_entered_does_not_see_opaudit(tmp_path, capsys):
    script = _script(tmp_path, """
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        class Logger(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        Logger().__enter__()  # never exited
        (torch.ones(3) * 2).sum()
    """)
    out = tmp_path / "r.yaml"
    assert main([script, "--reps", "2", "-q", "-o", str(out)]) == 0, capsys.readouterr().err
    assert torch._C._len_torch_dispatch_stack() == 0
    assert sorted(f.op for f in load(str(out)).all_findings) == ["aten.mul.Tensor", "aten.ones.default",
                                                             "aten.sum.default"]


def test_isolate_finishes_while_a_script_thread_still_calls_torch(tmp_path, capsys):
    stop = tmp_path / "stop"
    script = _script(tmp_path, f"""
        import os, threading, time, torch

        def flip():  # holds torch's locks over and over, all through the replay
            while not os.path.exists({str(stop)!r}):
                torch.use_deterministic_algorithms(True)
                torch.use_deterministic_algorithms(False)
                torch.ones(2).sum()
                time.sleep(0.0005)  # leave the GIL to the audit now and then: a test, not a benchmark

        threading.Thread(target=flip, name="flipper", daemon=True).start()
        (torch.ones(30) * 2).sum()
    """)
    out = tmp_path / "r.yaml"
    try:
        code = main([script, "--reps", "1", "--isolate", "-o", str(out)])
    finally:
        stop.touch()
        for t in threading.enumerate():
            if t.name == "flipper":
                t.join(60)
        torch.use_deterministic_algorithms(False)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "1 thread(s) the script started still run (flipper); replaying in a spawned worker" in err
    report = load(str(out))
    assert report.settings["isolate"] == "spawn"
    assert {f.op for f in report.all_findings} >= {"aten.mul.Tensor", "aten.sum.default"}


@pytest.mark.parametrize("entry", [False, True])
def test_inference_mode_left_entered_is_left_before_the_audit_goes_on(entry, tmp_path, capsys):
    body = """
        import torch
        kept = []

        def step():
            cm = torch.inference_mode()
            cm.__enter__()  # never exited; freed only with the script's globals
            kept.append(cm)
            return (torch.ones(3) * 2).sum()
    """
    script = _script(tmp_path, body if entry else body + "\n        step()\n")
    out = tmp_path / "r.yaml"
    assert main([script, *(["--entry", "step"] if entry else []), "--reps", "2", "-q", "-o", str(out)]) == 0, \
        capsys.readouterr().err
    assert not torch.is_inference_mode_enabled()
    assert (torch.ones(2) * 3).requires_grad is False and torch.ones(2, requires_grad=True).sum().requires_grad
    report = load(str(out))
    assert report.complete and {"aten.mul.Tensor", "aten.sum.default"} <= {f.op for f in report.all_findings}
    assert not [f for f in report.all_findings if f.verdict.value == "skipped"]


def test_a_script_that_closes_its_streams_leaves_opaudit_its_own(tmp_path):
    out = tmp_path / "r.yaml"
    script = _script(tmp_path, f"""
        import os, sys, torch
        {RAISES}
        print("from print")
        sys.stdout.buffer.write(b"from the buffer\\n")
        for stream in (sys.stdout.buffer, sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            stream.close()
        os.close(2)
    """)
    done = _opaudit([script, "--reps", "1", "--no-deterministic-pass", "-o", str(out)])
    assert done.returncode == 1, done.stderr
    assert "from print\nfrom the buffer\n" in done.stderr
    assert f"report written to {out}" in done.stderr  # opaudit's stderr still works
    assert load(str(out)).summary["raises"] == 1


def test_builtins_the_script_replaces_hold_for_its_code_only(tmp_path, capsys):
    import builtins

    before = dict(vars(builtins))
    broken = _script(tmp_path, f"""
        import builtins, torch
        {RAISES}
        builtins.isinstance = lambda obj, cls: False
        builtins.len = lambda obj: 0
        del builtins.sorted
    """, name="broken.py")
    own = _script(tmp_path, """
        import builtins, torch

        def counting_len(obj, _len=len):
            counting_len.calls += 1
            return _len(obj)

        counting_len.calls = 0
        builtins.len = counting_len  # the script's own len holds for its own code

        def opaudit_step():
            assert len([1, 2]) == 2 and getattr(len, "calls", 0) > 0
            return torch.ones(3).sum()
    """, name="own.py")
    out = tmp_path / "r.yaml"
    try:
        assert main([broken, "--reps", "1", "-q", "-o", str(out)]) == 1, capsys.readouterr().err
        assert load(str(out)).summary["raises"] == 1
        assert main([own, "--reps", "1", "-q", "-o", str(out)]) == 0, capsys.readouterr().err
        assert vars(builtins) == before
    finally:
        vars(builtins).update(before)


@pytest.mark.parametrize("definition, kind", [
    ("async def opaudit_step():\n    return torch.ones(3).sum()", "an async function"),
    ("async def opaudit_step():\n    yield torch.ones(3).sum()", "an async function"),
    ("def opaudit_step():\n    yield torch.ones(3).sum()", "a generator function (it yields)"),
])
def test_an_entry_that_would_run_none_of_its_body_is_refused(definition, kind, tmp_path, capsys):
    script = _script(tmp_path, "import torch\n\n" + definition + "\n")
    assert main([script, "--reps", "1", "-o", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"opaudit: error: train.py: the entry 'opaudit_step' is {kind}: calling it runs none of "
                          "its body;") and err.count("\n") == 1
    assert not (tmp_path / "r.yaml").exists()


def test_the_scripts_global_torch_settings_end_with_it(tmp_path, capsys):
    """Trainer(deterministic=True)-style scripts turn strict mode on for their process; after the audit
    (in this process) the flags are what they were before it."""
    script = _script(tmp_path, """
        import torch
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        torch.set_grad_enabled(False)
        torch.backends.cudnn.benchmark = True
        torch.ones(3) * 2
    """)
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(), torch.is_grad_enabled(),
              torch.backends.cudnn.benchmark)
    assert before == (False, 2, True, False)  # conftest's 2 threads; the flags the script flips are off
    code = main([script, "--reps", "1", "-q", "--no-timing", "-o", str(tmp_path / "r.yaml")])
    assert code == 0, capsys.readouterr().err
    after = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(), torch.is_grad_enabled(),
             torch.backends.cudnn.benchmark)
    assert after == before


def test_a_child_forked_first_runs_parallel_ops_in_every_run_of_the_script(tmp_path):
    # The script runs twice in one process (it has no step after its window: the default recording, then
    # the deterministic-mode one): the first run's parallel ops start GNU OpenMP's pool, which a forked child cannot use (it waits
    # for ever on threads it does not have). The plain script never meets that state.
    log = tmp_path / "log.txt"
    script = _script(tmp_path, f"""
        import os, time, torch
        pid = os.fork()
        if pid == 0:
            x = torch.randn(1_000_000)
            (x * 2 + 1).sum()  # a parallel region
            with open({str(log)!r}, "a") as f:
                f.write("child done\\n")
            os._exit(0)
        deadline = time.monotonic() + 120
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise SystemExit("the child hung in its first parallel op")
            time.sleep(0.05)
        with open({str(log)!r}, "a") as f:
            f.write("parent done\\n")
        x = torch.randn(1_000_000)
        (x * 2 + 1).sum()
    """)
    done = _opaudit([script, "--reps", "1", "--no-timing"], timeout=600)
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    assert lines.count("parent done") == 2, lines
    assert lines.count("child done") == 2, lines


def test_a_child_still_running_when_the_audit_ends_does_not_hold_its_output_open(tmp_path):
    pids = tmp_path / "pids.txt"
    script = _script(tmp_path, f"""
        import os, time, torch
        if os.fork() == 0:
            with open({str(pids)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(900)  # as good as hung
            os._exit(0)
        torch.arange(5.0).cumsum(0)
    """)
    try:
        # capture_output reads until every holder of the pipes is gone: a child left running too.
        done = _opaudit([script, "--reps", "1", "--no-deterministic-pass"], timeout=200)
        assert done.returncode == 0, done.stderr
    finally:
        for pid in pids.read_text().split() if pids.exists() else ():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
