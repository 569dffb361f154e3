"""``opaudit trace`` and ``opaudit compare``: real scripts traced in real processes, then compared.

The capability cases need a CPU with AVX2 (``ATEN_CPU_CAPABILITY=avx2`` against
``default``); they are skipped, saying so, where it has none. The realignment and
the hostile files are checked on traces written by the writer itself.
"""

from __future__ import annotations

import os
import runpy
import struct
import subprocess
import sys
import tracemalloc
import zlib

import pytest
import torch
import yaml
from conftest import ROOT

from opaudit.cli.main import main
from opaudit.data.site import Site
from opaudit.engine import tracefile
from opaudit.engine.tracefile import TraceReader, TraceWriter
from opaudit.flows.trace.compare import compare_process, compare_traces

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "trace")
TINY_LM = os.path.join(FIXTURES, "tiny_lm.py")
DET_PATH = os.path.join(FIXTURES, "det_path.py")
AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_avx2 = pytest.mark.skipif(not AVX2, reason="this CPU lacks AVX2: ATEN_CPU_CAPABILITY=avx2 cannot be compared "
                                                 "with default here")


def _line(path: str, text: str) -> int:
    return next(i for i, line in enumerate(open(path), 1) if text in line)


def _trace_cmd(script: str, out: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "opaudit", "trace", script, "-o", out, "-q", *args]


def _run_all(jobs: dict[str, tuple[list[str], dict[str, str]]]) -> None:
    """Start every trace at once (interpreter start-up overlaps), then wait for all."""
    procs = {k: subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, (cmd, env) in jobs.items()}
    for k, p in procs.items():
        out, err = p.communicate(timeout=280)
        assert p.returncode == 0, f"{k}: {err[-2000:]}"


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """tiny_lm.py traced with drawn weights (default capability twice, avx2 once) and with loaded weights (avx2,
    default); det_path.py in default and in deterministic mode."""
    d = tmp_path_factory.mktemp("traces")
    weights = str(d / "weights.pt")
    runpy.run_path(os.path.join(FIXTURES, "save_weights.py"))["save"](weights)
    default, avx2 = {"ATEN_CPU_CAPABILITY": "default"}, {"ATEN_CPU_CAPABILITY": "avx2"}
    jobs = {
        "default": (_trace_cmd(TINY_LM, str(d / "default.optrace")), default),
        "default_again": (_trace_cmd(TINY_LM, str(d / "default_again.optrace")), default),
        "det_default": (_trace_cmd(DET_PATH, str(d / "det_default.optrace")), {}),
        "det_deterministic": (_trace_cmd(DET_PATH, str(d / "det_deterministic.optrace"), "--deterministic"), {}),
    }
    if AVX2:
        jobs.update({
            "avx2": (_trace_cmd(TINY_LM, str(d / "avx2.optrace")), avx2),
            "loaded_avx2": (_trace_cmd(TINY_LM, str(d / "loaded_avx2.optrace"), "--", weights), avx2),
            "loaded_default": (_trace_cmd(TINY_LM, str(d / "loaded_default.optrace"), "--", weights), default),
        })
    _run_all(jobs)
    return {k: str(d / f"{k}.optrace") for k in jobs}


def test_the_same_script_traced_twice_is_identical(traces, tmp_path, capsys):
    assert main(["compare", traces["default"], traces["default_again"]]) == 0
    out = capsys.readouterr().out
    assert "IDENTICAL" in out and "Same environment fingerprint" in out
    # Every format; the file forms are byte-stable.
    for fmt in ("yaml", "json", "csv", "md", "html"):
        path = tmp_path / f"c.{fmt}"
        assert main(["compare", traces["default"], traces["default_again"], "-o", str(path), "-q"]) == 0
        text = path.read_text()
        assert main(["compare", traces["default"], traces["default_again"], "-o", str(path), "-q"]) == 0
        assert path.read_text() == text
    d = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert d["format"] == "opaudit-comparison" and d["verdict"] == "identical"
    (proc,) = d["processes"]
    assert proc["differing"] == 0 and proc["compared"] > 40 and proc["final"]["compared"] == 10


@needs_avx2
def test_cpu_capability_diverges_at_the_first_draw_of_the_models_construction(traces, capsys):
    assert main(["compare", traces["avx2"], traces["default"]]) == 1
    out = capsys.readouterr().out
    c = compare_traces(traces["avx2"], traces["default"])
    env = {f.name: (f.before, f.after) for f in c.environment}
    assert env["ATEN_CPU_CAPABILITY"] == ("avx2", "default") and env["cpu_capability"] == ("AVX2", "DEFAULT")
    (r,) = c.ranks
    root = r.root_cause
    assert root is not None and root.op in ("aten.normal_.default", "aten.uniform_.default")
    assert root.where == f"tests/fixtures/trace/tiny_lm.py:{_line(TINY_LM, 'self.emb = nn.Embedding')}"
    assert root.phase == "setup" and root.function == "__init__" and root.index_a == root.index_b
    assert r.downstream > 10 and "value of model.emb.weight" in r.final
    assert f"root cause: call #{root.index_a} {root.op} at {root.where}" in out


@needs_avx2
def test_loaded_weights_move_the_root_cause_into_the_step(traces):
    c = compare_traces(traces["loaded_avx2"], traces["loaded_default"])
    assert not c.identical
    (r,) = c.ranks
    root = r.root_cause
    assert root is not None and ("softmax" in root.op or "layer_norm" in root.op), root
    assert root.phase == "forward" and root.step == 1 and root.module.startswith("TinyLM")
    assert r.first_difference is None  # nothing differed before it: the weights and ids came from the file
    assert r.first_update is not None and r.first_update.phase == "optimizer"


def test_a_call_only_deterministic_mode_makes_is_realigned(traces):
    c = compare_traces(traces["det_default"], traces["det_deterministic"])
    assert {f.name for f in c.settings} == {"deterministic"}
    (r,) = c.ranks
    clone = f"aten.clone.default at tests/fixtures/trace/det_path.py:{_line(DET_PATH, 'x = x.clone()')}"
    assert r.parted is None and r.structural_blocks == 2 and (r.only_a, r.only_b) == (0, 2)
    assert all(s.count_b == 1 and s.only_b[0].endswith(clone) for s in r.structural)
    # Everything else was compared: the call after each extra clone was paired with its counterpart.
    with TraceReader(traces["det_default"]) as ra:
        computing = sum(1 for call in ra.calls() if not call.flags & tracefile.FLAG_UNINITIALIZED)
    assert r.compared == computing
    if r.root_cause is not None:  # the accumulation raced, or summed in another order: it is the cause
        lookup = _line(DET_PATH, "self.table[ids]")
        assert r.root_cause.op == "aten.index_put_.default" and r.root_cause.phase == "backward"
        assert r.root_cause.where.endswith(f"det_path.py:{lookup}")
    else:
        assert r.differing == 0


def test_traces_of_another_script_or_window_are_not_comparable(traces, tmp_path, capsys):
    from opaudit.engine import loader
    from opaudit.engine.window import Window
    from opaudit.flows.trace import trace_target

    assert main(["compare", traces["default"], traces["det_default"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not comparable" in err and "another script" in err
    one_step = str(tmp_path / "one_step.optrace")
    trace_target(loader.load_target(DET_PATH), one_step, Window(steps=1))
    assert main(["compare", traces["det_default"], one_step]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not comparable" in err and "1 step(s)" in err


# -- hostile files ------------------------------------------------------------------
def _expect_error(capsys, a: str, b: str, *words: str) -> None:
    assert main(["compare", a, b]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("opaudit: error: "), err
    assert all(w in err for w in words), err


def test_hostile_trace_files_are_refused_in_one_line(tmp_path, capsys):
    good = _synth(str(tmp_path / "good.optrace"), [(f"aten.op{i % 7}", 10 + i % 13) for i in range(30000)])
    data = open(good, "rb").read()
    assert main(["compare", good, good]) == 0
    capsys.readouterr()

    def write(name: str, raw: bytes) -> str:
        p = tmp_path / name
        p.write_bytes(raw)
        return str(p)

    _expect_error(capsys, good, write("cut.optrace", data[: len(data) // 2]), "truncated")
    _expect_error(capsys, good, write("noend.optrace", data[:-3]), "truncated")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    _expect_error(capsys, good, write("flipped.optrace", bytes(flipped)), "corrupt")
    head = len(tracefile.MAGIC)
    future = data[:head] + struct.pack("<H", 2) + data[head + 2:]
    _expect_error(capsys, good, write("future.optrace", future), "version 2 is not supported")
    _expect_error(capsys, good, write("yaml.optrace", b"format: opaudit-report\n"), "not an opaudit trace")
    _expect_error(capsys, good, write("empty.optrace", b""), "empty")
    # A frame that claims 4 GiB, and one whose data inflates past what it claims (a bomb): refused unread.
    preamble = tracefile.MAGIC + struct.pack("<H", tracefile.VERSION)
    _expect_error(capsys, good, write("claims.optrace", preamble + struct.pack("<cII", b"H", (1 << 32) - 1, 10) + b"x" * 10),
                  "corrupt")
    bomb = zlib.compress(b"\0" * (64 << 20), 9)
    bomb_file = write("bomb.optrace", preamble + struct.pack("<cII", b"H", 1 << 20, len(bomb)) + bomb)
    tracemalloc.start()
    try:
        _expect_error(capsys, good, bomb_file, "corrupt")
        assert tracemalloc.get_traced_memory()[1] < 8 << 20  # it claims 1 MiB: the 64 MiB it inflates to are never made
    finally:
        tracemalloc.stop()
    huge = tmp_path / "huge.optrace"
    with open(huge, "wb") as f:
        f.truncate(tracefile.MAX_TRACE_BYTES + 1)  # sparse: nothing written
    # Its size in bytes: rounded to MiB it would read as the limit itself.
    _expect_error(capsys, good, str(huge), f"too large ({tracefile.MAX_TRACE_BYTES + 1} bytes; opaudit reads traces "
                  "up to 64 GiB)")
    _expect_error(capsys, good, str(tmp_path), "no rank")  # a folder without rank traces


# -- realignment, on traces the writer makes -------------------------------------------
def _synth(path: str, ops: list[tuple[str, int]], *, bits: dict[int, int] | None = None) -> str:
    """A trace of calls ``(op, line)``, each with one input and one output; ``bits[i]`` changes call i's output."""
    header = {"target": {"script": "s.py", "sha256": "0" * 64, "entry": None, "argv": []},
              "window": {"steps": None, "start": 0, "max_seconds": None}, "settings": {}, "environment": {},
              "variables": {}, "rank": None}
    with TraceWriter(path, header) as w:
        for i, (op, line) in enumerate(ops):
            site = w.site_id(line, Site("s.py", line, "f", ""))
            h = (bits or {}).get(i, 0)
            w.call(op, site, 1, 0, 1, (("torch.float32", (4,), line, 7),), (("torch.float32", (4,), line + h, 9),))
        w.close({"final": {}})
    return path


def _process(tmp_path, a_ops, b_ops, **kw):
    a = _synth(str(tmp_path / "a.optrace"), a_ops)
    b = _synth(str(tmp_path / "b.optrace"), b_ops, **kw)
    with TraceReader(a) as ra, TraceReader(b) as rb:
        return compare_process(ra, rb)


def test_extra_calls_are_one_structural_block_and_the_rest_is_compared(tmp_path):
    body = [(f"aten.op{i % 7}", 10 + i % 13) for i in range(400)]
    extra = [("aten.clone", 99), ("aten.copy_", 98), ("aten.clone", 99)]
    # B makes three calls A does not, then differs at call 300 of A's (302 of B's) with equal inputs.
    r = _process(tmp_path, body, body[:200] + extra + body[200:], bits={303: 1})
    assert r.parted is None and (r.structural_blocks, r.only_a, r.only_b) == (1, 0, 3)
    (s,) = r.structural
    assert s.index_b == 201 and s.count_b == 3 and s.only_b[0] == "#201 aten.clone at s.py:99"
    assert r.compared == 400 and r.differing == 1
    assert r.root_cause is not None and (r.root_cause.index_a, r.root_cause.index_b) == (301, 304)
    # A trace that stops early: the rest of the other is one block at its end, not a divergence.
    r = _process(tmp_path, body, body[:350])
    assert (r.structural_blocks, r.only_a, r.only_b, r.differing, r.parted) == (1, 50, 0, 0, None)


def test_traces_that_never_meet_again_have_parted(tmp_path):
    a = [(f"aten.a{i % 5}", i % 11) for i in range(300)]
    b = a[:100] + [(f"aten.b{i % 5}", 50 + i % 11) for i in range(200)]
    r = _process(tmp_path, a, b)
    assert r.parted is not None and r.parted.index_a == 101 and r.parted.op == "aten.a0 vs aten.b0"
    assert (r.compared, r.only_a, r.only_b) == (100, 200, 200)


def test_a_comparison_in_sarif_puts_its_root_cause_on_the_line(tmp_path, capsys):
    """Valid SARIF 2.1.0 (the OASIS schema): an error at the root cause's line, nothing for identical traces."""
    import json

    import jsonschema

    body = [(f"aten.op{i % 7}", 10 + i % 13) for i in range(100)]
    a = _synth(str(tmp_path / "a.optrace"), body)
    b = _synth(str(tmp_path / "b.optrace"), body, bits={40: 1})
    out = tmp_path / "c.sarif"
    assert main(["compare", a, b, "-o", str(out), "-q"]) == 1
    log = json.loads(out.read_text())
    schema = json.load(open(os.path.join(ROOT, "tests", "fixtures", "sarif-schema-2.1.0.json")))
    jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER).validate(log)
    (run,) = log["runs"]
    (result,) = run["results"]
    assert (result["ruleId"], result["level"]) == ("trace/root_cause/aten.op5", "error")
    location = result["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == "s.py" and location["region"]["startLine"] == 10 + 40 % 13
    assert result["properties"]["index_a"] == 41 and run["properties"]["verdict"] == "diverged"
    assert main(["compare", a, a, "--format", "sarif"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["results"] == []


# -- torchrun ------------------------------------------------------------------------
def test_torchrun_ranks_each_trace_and_the_rank_that_diverged_first_is_named(tmp_path, capsys):
    """A 2-rank gloo job traced twice, rank 1 on 2 threads the second time: rank 1 diverges at its own sum,
    rank 0 only through the all-reduce, and rank 1 diverged first."""
    script = os.path.join(FIXTURES, "dist_threads.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "--monitor-interval", "0.2", "-m", "opaudit", "trace", script]
    env = {k: v for k, v in os.environ.items() if k != "OPAUDIT_TEST_RANK1_THREADS"}
    a, b = str(tmp_path / "a.optrace"), str(tmp_path / "b.optrace")
    for out, extra in ((a, {}), (b, {"OPAUDIT_TEST_RANK1_THREADS": "2"})):
        proc = subprocess.run([*launch, "-o", out], cwd=ROOT, capture_output=True, text=True, timeout=280,
                              env={**env, **extra})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert sorted(os.listdir(out)) == ["rank0.optrace", "rank1.optrace"]
    assert main(["compare", a, b]) == 1
    out = capsys.readouterr().out
    c = compare_traces(a, b)
    assert c.first_rank == 1 and "Diverged first: rank 1" in out
    r0, r1 = c.ranks
    sum_line, reduce_line = _line(script, "x.sum()"), _line(script, "dist.all_reduce(total)")
    assert (r1.rank, r1.root_cause.op, r1.root_cause.where) == (1, "aten.sum.default", f"tests/fixtures/trace/dist_threads.py:{sum_line}")
    assert (r0.rank, r0.root_cause.op) == (0, "c10d.allreduce_.default") and r0.root_is_collective
    assert r0.root_cause.where.endswith(f":{reduce_line}") and r1.collectives_before == 0
    assert any(f.name == "rank 1: threads (at the end)" and (f.before, f.after) == (1, 2) for f in c.environment)
    # One rank's trace alone is a single-process trace: not comparable with the job.
    assert main(["compare", a, os.path.join(b, "rank0.optrace")]) == 2
    assert "a 2-rank job" in capsys.readouterr().err


# -- --run-check --fresh-processes ---------------------------------------------------
def test_fresh_processes_see_what_one_process_chooses_once(tmp_path, capsys):
    """The op order follows a set of strings: the same in every run of one process (its hash seed), not across
    processes (each draws its own)."""
    from opaudit.data.report import load
    from opaudit.engine import loader
    from opaudit.flows.runcheck import run_check

    script = os.path.join(FIXTURES, "hash_order.py")
    assert run_check(loader.load_target(script)).reproducible  # in one process: the same order every run
    out = tmp_path / "report.yaml"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    proc = subprocess.run([sys.executable, "-m", "opaudit", script, "--run-check", "--fresh-processes", "2",
                           "--no-deterministic-pass", "--reps", "1", "--no-timing", "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = load(str(out))
    assert report.settings["fresh_processes"] is True and report.settings["run_check"] == 2
    assert [(c.mode, c.runs, c.fresh_processes) for c in report.run_checks] == [
        ("default", 2, True), ("deterministic", 2, True)]
    for c in report.run_checks:
        assert not c.reproducible and c.path_split is not None and c.path_split["runs"] == [1, 2]
    assert "2 runs, each in a fresh process: NOT reproducible" in proc.stderr
    assert "runs took different paths" in proc.stderr


def test_fresh_processes_options(capsys):
    assert main([os.path.join(FIXTURES, "hash_order.py"), "--fresh-processes", "2"]) == 2
    assert "--fresh-processes needs --run-check" in capsys.readouterr().err
    assert main([os.path.join(FIXTURES, "hash_order.py"), "--run-check", "--fresh-processes", "1"]) == 2
    assert "at least 2 runs" in capsys.readouterr().err
