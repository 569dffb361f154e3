"""Faults that must not take an audit down: crashing and hanging ops, Ctrl-C,
memory pressure while capturing, hostile report files and unruly user scripts.

Every fault here is real: ops that kill their process or hang, a real SIGINT to
a running CLI, a real allocation failure under ``RLIMIT_AS``, real YAML payloads.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import yaml
from conftest import ROOT, default_signals

import opaudit
from opaudit import Verdict
from opaudit.cli.main import main
from opaudit.data.files import ReportError
from opaudit.data.observation import NotReplayed
from opaudit.data.report import load
from opaudit.engine.isolate import Isolator
from opaudit.engine.record import Recorder
from opaudit.flows.catalog import load_catalog
from opaudit.flows.diff import load_document
from opaudit.flows.pipeline import build_report

# -- ops that misbehave only when replayed -------------------------------------
# The worker is forked after recording, so it sees whatever _REPLAY holds then.
_REPLAY = {"armed": False}


@torch.library.custom_op("opaudit_ft::exits_on_replay", mutates_args=())
def exits_on_replay(x: torch.Tensor) -> torch.Tensor:
    if _REPLAY["armed"]:
        ctypes.CDLL(None)._exit(3)  # from C, as a C++ kernel would: nothing in the process can stop it
    return x + 1


_QUITS = {"sys.exit()": lambda: sys.exit(), "sys.exit(0)": lambda: sys.exit(0), "sys.exit(3)": lambda: sys.exit(3)}


@torch.library.custom_op("opaudit_ft::quits_on_replay", mutates_args=())
def quits_on_replay(x: torch.Tensor) -> torch.Tensor:
    if _REPLAY["armed"]:
        _QUITS[_REPLAY["quit"]]()
    return x + 2


@torch.library.custom_op("opaudit_ft::segfaults_on_replay", mutates_args=())
def segfaults_on_replay(x: torch.Tensor) -> torch.Tensor:
    if _REPLAY["armed"]:
        faulthandler.disable()  # pytest's traceback dump would only add noise
        ctypes.string_at(0)  # a real invalid read, in the calling thread
    return x * 3


@torch.library.custom_op("opaudit_ft::hangs_on_replay", mutates_args=())
def hangs_on_replay(x: torch.Tensor) -> torch.Tensor:
    if _REPLAY["armed"]:
        time.sleep(600)
    return x - 1


@pytest.fixture
def armed():
    """Record with the ops behaving; replay with them misbehaving."""
    yield lambda: _REPLAY.update(armed=True)
    _REPLAY["armed"] = False


def _verdicts(report):
    return {f.op: (f.verdict, f.reason) for f in report.all_findings}


# -- isolation ----------------------------------------------------------------
def test_isolate_reports_crashed_ops_and_a_new_worker_goes_on(armed):
    x = torch.randn(16)
    with Recorder() as rec:
        y = x + 1
        exits_on_replay(x)
        segfaults_on_replay(x)
        (y * 2).sum()
    armed()
    with Isolator(rec) as iso:
        report = build_report(rec, reps=2, replay_fn=iso, remedies=False)
    v = _verdicts(report)
    assert v["opaudit_ft.exits_on_replay.default"] == (Verdict.SKIPPED, "crashed: exit status 3")
    assert v["opaudit_ft.segfaults_on_replay.default"] == (Verdict.SKIPPED, "crashed: SIGSEGV")
    # Ops replayed after each crash got a fresh worker and a real verdict.
    for op in ("aten.add.Tensor", "aten.mul.Tensor", "aten.sum.default"):
        assert v[op] == (Verdict.STABLE, ""), op
    assert iso.starts == 3
    assert report.complete


@pytest.mark.parametrize(("quit", "isolate"), [(q, False) for q in _QUITS] + [("sys.exit(3)", True)])
def test_an_op_that_calls_sys_exit_when_replayed_fails_its_replay(quit, isolate, armed):
    x = torch.randn(16)
    with Recorder() as rec:
        quits_on_replay(x)
        x.sum()
    _REPLAY["quit"] = quit
    armed()
    with Isolator(rec) if isolate else contextlib.nullcontext() as iso:
        report = build_report(rec, reps=2, replay_fn=iso, remedies=False)
    v = _verdicts(report)
    assert v["opaudit_ft.quits_on_replay.default"] == (Verdict.SKIPPED, f"replay failed: the op called {quit}")
    assert v["aten.sum.default"] == (Verdict.STABLE, "")
    assert report.complete


def test_op_timeout_skips_a_hanging_op_and_kills_its_worker(armed):
    x = torch.randn(16)
    with Recorder() as rec:
        hangs_on_replay(x)
        x.sum()
    armed()
    with Isolator(rec, timeout=3.0) as iso:  # a healthy replay in a fresh worker takes far less, even under load
        report = build_report(rec, reps=2, replay_fn=iso, remedies=False)
    v = _verdicts(report)
    assert v["opaudit_ft.hangs_on_replay.default"] == (Verdict.SKIPPED, "timeout")
    assert v["aten.sum.default"] == (Verdict.STABLE, "")
    assert iso.starts == 2  # the hung worker was killed, the next op got a new one


def test_a_worker_killed_between_ops_does_not_blame_the_next_op():
    x = torch.randn(16)
    with Recorder() as rec:
        x + 1
        x.sum()
    (_, add, add_inputs), (_, total, total_inputs) = rec.items()
    with Isolator(rec) as iso:
        iso(add, add_inputs, 1, False)
        os.kill(iso.pid, signal.SIGKILL)  # e.g. the kernel's OOM killer, while idle
        obs = iso(total, total_inputs, 1, False)
    assert not isinstance(obs, NotReplayed) and obs.default is not None
    assert iso.starts == 2


def test_isolated_replay_finds_what_in_process_replay_finds():
    """The forked worker keeps its intra-op threads: the CPU accumulation race still shows."""
    from fixtures import models as zoo

    def step():
        zoo.accumulate_index_put()
        zoo.unpool_all_dims()
        zoo.empty_outputs()

    with Recorder() as rec:
        step()
    try:
        # A real race each time (3M values into 1,000 slots): 6 replays miss it with odds below 1 in 10^7.
        in_process = build_report(rec, reps=6, remedies=False)
        with Isolator(rec) as iso:
            isolated = build_report(rec, reps=6, replay_fn=iso, remedies=False)
    finally:
        rec.release()
    assert iso.start_method == "fork" and iso.starts == 1
    assert {f.id: f.verdict for f in isolated.all_findings} == {f.id: f.verdict for f in in_process.all_findings}
    assert isolated.finding("aten.index_put_.default").verdict is Verdict.DIVERGES
    assert isolated.findings(verdicts=["raises"])


def test_spawned_worker_gets_inputs_sent_and_ops_by_name():
    """The path CUDA needs (no fork after CUDA init), checked on the CPU."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)
    with Recorder() as rec:
        c = a @ b.t()
        c.add_(1).relu().sum(dim=0)
        torch.zeros(3).put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))
    in_process = build_report(rec, reps=2, remedies=False, timings=False)
    with Isolator(rec, start_method="spawn") as iso:
        spawned = build_report(rec, reps=2, replay_fn=iso, remedies=False, timings=False)
    assert iso.starts == 1
    assert spawned.to_dict()["findings"] == in_process.to_dict()["findings"]


# -- CLI: --isolate / --op-timeout, Ctrl-C ------------------------------------
def _script(tmp_path, body, name="train.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return str(p)


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(kw.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "opaudit.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals, **kw)


MISBEHAVING = """
    import ctypes, os, time, torch

    # Replays turn deterministic mode on after the script has ended (the script itself
    # also runs once in deterministic mode, for the deterministic-path recording).
    RUNNING = True

    @torch.library.custom_op("ft_script::exits", mutates_args=())
    def exits(x: torch.Tensor) -> torch.Tensor:
        if torch.are_deterministic_algorithms_enabled() and not RUNNING:
            ctypes.CDLL(None)._exit(5)  # from C: only a worker process can survive it
        return x + 1

    @torch.library.custom_op("ft_script::hangs", mutates_args=())
    def hangs(x: torch.Tensor) -> torch.Tensor:
        if torch.are_deterministic_algorithms_enabled() and not RUNNING:
            time.sleep(600)
        return x - 1

    x = torch.randn(8)
    exits(x)
    hangs(x)
    (x * 2).sum()
    RUNNING = False
"""


def test_cli_op_timeout_implies_isolation(tmp_path):
    out = tmp_path / "report.json"
    proc = _cli([_script(tmp_path, MISBEHAVING), "--op-timeout", "4", "--reps", "2", "-o", str(out)])
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    report = load(str(out))
    v = _verdicts(report)
    assert v["ft_script.exits.default"] == (Verdict.SKIPPED, "crashed: exit status 5")
    assert v["ft_script.hangs.default"] == (Verdict.SKIPPED, "timeout")
    assert v["aten.sum.default"] == (Verdict.STABLE, "")
    assert report.settings["isolate"] == "fork" and report.settings["op_timeout_s"] == 4.0


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "isolated"])
def test_an_op_that_calls_os_exit_when_replayed_fails_its_replay(tmp_path, isolate):
    """``os._exit`` ends a process wherever it is called; opaudit replaces it while ops replay."""
    out = tmp_path / "report.yaml"
    script = _script(tmp_path, """
        import os, torch

        RUNNING = True

        @torch.library.custom_op("ft_quit::quits", mutates_args=())
        def quits(x: torch.Tensor) -> torch.Tensor:
            if not RUNNING:
                os._exit(0)
            return x + 1

        quits(torch.randn(8)).sum()
        RUNNING = False
    """)
    proc = _cli([script, "--reps", "2", "--no-deterministic-pass", "-o", str(out), *(["--isolate"] * isolate)])
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "report written to" in err
    v = _verdicts(load(str(out)))
    assert v["ft_quit.quits.default"] == (Verdict.SKIPPED, "replay failed: the op called os._exit(0)")
    assert v["aten.sum.default"] == (Verdict.STABLE, "")


SLOW = """
    import os, time, torch

    MARK = os.environ["FT_MARK"]
    if os.environ.get("FT_HANG_WHILE_RECORDING"):
        open(MARK, "w").close()
        time.sleep(600)

    RUNNING = True  # replays come after the script ended (it also runs once in deterministic mode)

    @torch.library.custom_op("ft_slow::slow", mutates_args=())
    def slow(x: torch.Tensor) -> torch.Tensor:
        if torch.are_deterministic_algorithms_enabled() and not RUNNING:  # replaying
            with open(MARK, "a") as f:
                f.write(f"{x.numel()}\\n")
            time.sleep(0.3)
        return x + 1

    x = torch.arange(4.0)
    (x * 2).sum()
    for n in range(1, 41):
        slow(torch.ones(n))
    RUNNING = False
"""
SLOW_SIGNATURES = 3 + 2 * 40  # arange, mul, sum, then ones + slow per size


def _wait_for(predicate, proc, what, limit=240.0):
    deadline = time.monotonic() + limit
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"opaudit exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _replayed_sizes(mark):
    try:
        with open(mark) as f:
            return set(f.read().split())
    except FileNotFoundError:
        return set()


@pytest.mark.parametrize("mode", ["in-process", "isolated", "stdout"])
def test_ctrl_c_during_replay_writes_a_partial_report_and_exits_130(tmp_path, mode):
    out, mark = tmp_path / "report.json", tmp_path / "mark"
    out.write_text('{"an": "older report"}\n')
    args = [_script(tmp_path, SLOW), "--reps", "1"]
    args += {"in-process": ["-o", str(out)], "isolated": ["-o", str(out), "--isolate"],
             "stdout": ["--format", "json"]}[mode]
    # A session of its own, so that the SIGINT reaches every process of the audit, like Ctrl-C.
    proc = _cli(args, env={"FT_MARK": str(mark)}, start_new_session=True)
    # A second size replaying means the first slow signature is classified.
    _wait_for(lambda: len(_replayed_sizes(mark)) >= 2, proc, "replay reached the second slow signature")
    os.killpg(proc.pid, signal.SIGINT)
    stdout, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no replay worker left behind
    assert "(complete: false)" in err
    if mode == "stdout":
        out.write_text(stdout)
    report = load(str(out))
    assert report.complete is False
    assert json.loads(out.read_text())["complete"] is False
    ops = [f.op for f in report.all_findings]
    assert "aten.sum.default" in ops and "ft_slow.slow.default" in ops
    assert len(report.all_findings) < SLOW_SIGNATURES
    assert all(f.verdict is Verdict.STABLE for f in report.all_findings if f.op == "ft_slow.slow.default")
    assert sorted(os.listdir(tmp_path)) == ["mark", "report.json", "train.py"]  # no temp file left


def test_ctrl_c_while_the_script_runs_audits_what_was_recorded(tmp_path):
    """Issue 13 §9: Ctrl-C during the user's code stops recording; what it recorded is audited."""
    out, mark = tmp_path / "report.json", tmp_path / "mark"
    out.write_text('{"an": "older report"}\n')
    proc = _cli([_script(tmp_path, SLOW), "-o", str(out)],
                env={"FT_MARK": str(mark), "FT_HANG_WHILE_RECORDING": "1"}, start_new_session=True)
    _wait_for(mark.exists, proc, "the script started")
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    report = load(str(out))
    assert report.complete is False and report.settings["recording_cut_short"] == "interrupted"
    assert sorted(os.listdir(tmp_path)) == ["mark", "report.json", "train.py"]


# -- memory pressure while capturing ------------------------------------------
CAPTURE_OOM = """
    import resource
    import torch

    BIG = torch.ones(2**27)  # 512 MiB, allocated before the limit


    def _address_space():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024


    # Room for everything the run needs, but not for a second copy of BIG.
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + 256 * 2**20, resource.RLIM_INFINITY))


    def opaudit_step():
        total = BIG.sum()
        small = torch.randn(8, 8) @ torch.randn(8, 8)
        print("step finished", int(total), tuple(small.shape))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_capture_oom_skips_that_signature_and_the_run_carries_on(tmp_path):
    out = tmp_path / "report.json"
    proc = _cli([_script(tmp_path, CAPTURE_OOM), "--reps", "2", "-o", str(out)])
    stdout, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert f"step finished {2**27} (8, 8)" in err  # the script's stdout goes to stderr
    v = _verdicts(load(str(out)))
    assert v["aten.sum.default"] == (Verdict.SKIPPED, "capture OOM")
    assert v["aten.mm.default"] == (Verdict.STABLE, "")


# -- hostile report files -----------------------------------------------------
@pytest.fixture(scope="module")
def report_text():
    """A real report, as YAML."""
    from opaudit.cli.formats import Format, Kind, render

    def step():
        x = torch.randn(4, 4)
        (x @ x).sum()
        torch.zeros(10).put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))

    return render(opaudit.audit(step, reps=2), Kind.REPORT, Format.YAML)


def _refused(path, *needles):
    with pytest.raises(ReportError) as e:
        load(str(path))
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path))
    for n in needles:
        assert n in message, message
    return message


@pytest.mark.parametrize("payload", [
    "!!python/object/apply:os.system ['touch {marker}']\n",
    "format: opaudit-report\nversion: 1\nfindings: !!python/object/apply:os.system ['touch {marker}']\n",
    "!!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
    "!!python/object:opaudit.data.report.Report {{results: []}}\n",
    "environment: !!python/name:os.system\n",
])
def test_yaml_with_python_tags_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(payload.format(marker=marker))
    _refused(path, "refused: unsafe or unknown YAML tag")
    assert not marker.exists()


@pytest.mark.parametrize("load_fn", [load, load_catalog, load_document], ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_every_reader_of_opaudit_files_refuses_python_tags(tmp_path, load_fn):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"format: opaudit-catalog\nversion: 1\nops: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ReportError, match="unsafe or unknown YAML tag"):
        load_fn(str(path))
    assert not marker.exists()


def test_wrong_format_or_version_is_refused(tmp_path, report_text):
    data = yaml.safe_load(report_text)
    for change, needle in (({"format": "opaudit-catalog"}, "format is 'opaudit-catalog'"),
                           ({"version": 99}, "version 99 is not supported")):
        path = tmp_path / "other.yaml"
        path.write_text(yaml.safe_dump({**data, **change}) + "...\n")
        _refused(path, needle)


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
@pytest.mark.parametrize("ext", ["yaml", "json"])
def test_truncated_file_is_refused(tmp_path, report_text, fraction, ext):
    text = report_text if ext == "yaml" else json.dumps(yaml.safe_load(report_text), indent=2) + "\n"
    path = tmp_path / f"cut.{ext}"
    path.write_text(text[: int(len(text) * fraction)])
    _refused(path)


def test_file_cut_after_a_whole_finding_is_refused(tmp_path, report_text):
    lines = report_text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("- id:")]
    assert len(starts) >= 2
    path = tmp_path / "cut.yaml"
    # valid YAML, one finding short, even with the end marker put back
    path.write_text("".join(lines[: starts[-1]]) + "...\n")
    _refused(path, "summary gives signatures", "truncated or hand-edited?")


def test_file_cut_at_a_line_break_inside_the_last_finding_is_refused(tmp_path, report_text):
    lines = report_text.splitlines(keepends=True)
    assert lines[-1] == "...\n"
    path = tmp_path / "cut.yaml"
    path.write_text("".join(lines[:-3]))  # drops the last finding's last fields: still valid YAML
    _refused(path, "no end-of-document marker")


@pytest.mark.parametrize("where, value, needle", [
    ("findings.0.calls", "three", "field 'calls' has the wrong type (str)"),
    ("findings.0.verdict", "exploded", "unknown verdict 'exploded'"),
    ("findings.0.phases", [1, 2], "phases must be a list of strings"),
    ("findings.0.sites", "here", "field 'sites' has the wrong type (str)"),
    ("findings.0", ["not", "a", "mapping"], "a finding must be a mapping"),
    ("complete", "no", "field 'complete' has the wrong type (str)"),
    ("environment", [], "field 'environment' has the wrong type (list)"),
    ("findings", {"a": 1}, "field 'findings' has the wrong type (dict)"),
    ("env_warnings", [{"x": 1}], "env_warnings must be a list of strings"),
])
def test_wrong_field_types_are_refused(tmp_path, report_text, where, value, needle):
    data = yaml.safe_load(report_text)
    *parents, last = where.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[int(last) if isinstance(node, list) else last] = value
    path = tmp_path / "typed.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False) + "...\n")
    _refused(path, needle)


def test_an_untouched_report_still_loads(tmp_path, report_text):
    path = tmp_path / "good.yaml"
    path.write_text(report_text)
    assert len(load(str(path)).all_findings) == yaml.safe_load(report_text)["summary"]["signatures"]


def test_cli_refuses_a_hostile_report_with_exit_2(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    code = main(["diff", str(evil), str(evil)])
    err = capsys.readouterr().err
    assert code == 2
    assert "unsafe or unknown YAML tag" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


# -- scripts that exit, chdir, start threads or take over Ctrl-C ---------------
def _audit_in_process(tmp_path, capsys, body, *extra):
    out = tmp_path / "report.json"
    argv_before, path_before, cwd_before = list(sys.argv), list(sys.path), os.getcwd()
    handler_before = signal.getsignal(signal.SIGINT)
    code = main([_script(tmp_path, body), "--reps", "1", "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert (sys.argv, sys.path, os.getcwd()) == (argv_before, path_before, cwd_before)
    assert signal.getsignal(signal.SIGINT) is handler_before
    return code, err, (load(str(out)) if out.exists() else None)


@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "sys.exit()", "sys.exit(None)", "raise SystemExit(0)"])
def test_script_exiting_with_success_ends_normally_and_the_audit_goes_on(tmp_path, capsys, exit_call):
    body = f"""
        import sys, torch
        x = torch.arange(6.0).reshape(2, 3)
        x.sum()
        {exit_call}
        x.mean()  # never runs
    """
    code, err, report = _audit_in_process(tmp_path, capsys, body)
    assert code == 0, err
    ops = {f.op for f in report.all_findings}
    assert "aten.sum.default" in ops and "aten.mean.default" not in ops


@pytest.mark.parametrize("status, shown", [("3", "3"), ("'bad config'", "'bad config'")])
def test_script_exiting_with_failure_is_exit_2_with_the_status(tmp_path, capsys, status, shown):
    body = f"""
        import sys, torch
        torch.ones(2).sum()
        sys.exit({status})
    """
    code, err, report = _audit_in_process(tmp_path, capsys, body)
    assert code == 2 and report is None
    assert f"opaudit: error: the script exited with status {shown}" in err


def test_script_changing_directory_does_not_move_the_report(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    body = """
        import os, torch
        os.makedirs("elsewhere", exist_ok=True)
        os.chdir("elsewhere")
        torch.ones(2).sum()
    """
    script = _script(tmp_path, body)
    code = main([script, "--reps", "1", "-o", "report.json"])
    assert code == 0, capsys.readouterr().err
    assert os.getcwd() == str(tmp_path)
    assert (tmp_path / "report.json").exists() and not (tmp_path / "elsewhere" / "report.json").exists()
    (f,) = [f for f in load("report.json").all_findings if f.op == "aten.sum.default"]
    assert [s.file for s in f.sites] == ["train.py"]


THREADS = """
    import threading, torch
    from torch import nn

    stop = threading.Event()
    noise = nn.Sequential(nn.Linear(8, 8), nn.ReLU())

    def background():  # runs modules all through the recorded part
        x = torch.randn(4, 8)
        while not stop.is_set():
            noise(x)

    def late_writer():  # still running when the script ends: must be waited for
        stop.wait()
        torch.ones(3).sum()
        open(OUT, "w").write("done")

    OUT = __file__ + ".thread"
    threading.Thread(target=background).start()
    threading.Thread(target=late_writer).start()
    threading.Thread(target=background, daemon=True).start()

    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    for _ in range(50):
        model(torch.randn(2, 16)).sum()
    stop.set()
"""


def test_script_threads_are_waited_for_and_do_not_corrupt_attribution(tmp_path, capsys):
    threads_before = set(threading.enumerate())
    code, err, report = _audit_in_process(tmp_path, capsys, THREADS)
    assert code == 0, err
    assert (tmp_path / "train.py.thread").read_text() == "done"
    leftover = [t for t in threading.enumerate() if t not in threads_before and not t.daemon]
    assert not leftover
    modules = {f.op: set(f.modules) for f in report.all_findings}
    # Only the recording thread's ops and modules: the background Linear(8, 8) never shows.
    assert modules["aten.tanh.default"] == {"Sequential.1"}
    assert modules["aten.sum.default"] == set()
    assert {f.signature.split(",")[0] for f in report.all_findings if f.op == "aten.addmm.default"} == {
        "f32[32]", "f32[4]"}


def test_script_installing_its_own_ctrl_c_handler_gets_it_removed(tmp_path, capsys):
    body = """
        import signal, sys, torch
        signal.signal(signal.SIGINT, lambda *a: None)
        sys.stdout = open(__file__ + ".log", "w")
        torch.ones(2).sum()
    """
    stdout_before = sys.stdout
    code, err, _ = _audit_in_process(tmp_path, capsys, body)
    assert code == 0, err
    assert sys.stdout is stdout_before
