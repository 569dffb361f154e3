"""How strong a ``stable`` verdict is, races replayed until they show, and a contended CPU said (issue 21 item 8).

Real ops and real processes: an ``index_put_(accumulate=True)`` of 3M values into 1,000
slots (its runs differed in 30 of 30 pairs under load: scripts/race_rate.py), busy
processes pinned to the audit's cores. Nothing here asserts a time or a rate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import ROOT

from opaudit.cli.main import main
from opaudit.data.fields import ReportError
from opaudit.data.report import load
from opaudit.engine.environment import fingerprint
from opaudit.flows.races import BYTES_PER_MODE, DEFAULT_RUNS, catalog_race_ops, shipped_race_ops

STEADY = """
    import torch
    x = torch.randn(64, 8)
    lin = torch.nn.Linear(8, 4)
    lin(x).relu().sum().backward()
    # A value-dependent op (a race is possible) whose indices never collide: it cannot race.
    torch.zeros(16).index_put_((torch.arange(16),), torch.ones(16), accumulate=True)
"""

RACY = """
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3_000_000,), generator=g)
    vals = torch.randn(3_000_000, generator=g) * torch.logspace(-3, 3, 3_000_000)
    torch.zeros(1000).index_put_((ids,), vals, accumulate=True)
"""


def _script(tmp_path, body, name="train.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _runs(ratio: str) -> int:
    return int(ratio.split("/")[1])


def test_every_stable_verdict_carries_its_evidence_and_stays_byte_stable(tmp_path, capsys):
    script = _script(tmp_path, STEADY)
    texts = []
    for name in ("a.yaml", "b.yaml"):
        out = tmp_path / name
        assert main([script, "--reps", "3", "--no-timing", "-q", "-o", str(out)]) == 0, capsys.readouterr().err
        texts.append(out.read_text())
    assert texts[0] == texts[1]  # the further runs are a count without timings
    findings = yaml.safe_load(texts[0])["findings"]
    stable = [f for f in findings if f["verdict"] == "stable"]
    assert stable and all("evidence" not in f for f in findings if f["verdict"] != "stable")
    for f in stable:
        runs = f["evidence"]["runs_per_mode"]
        assert runs == _runs(f["default_diverged"]) == _runs(f["deterministic_diverged"])
        assert f["evidence"]["rate_caught_95"] == float(f"{1 - 0.05 ** (1 / (runs - 1)):.3g}")
    (put,) = [f for f in stable if f["op"] == "aten.index_put_.default"]
    assert put["evidence"]["runs_per_mode"] == DEFAULT_RUNS  # replayed further: a race was possible
    assert {f["evidence"]["runs_per_mode"] for f in stable if f is not put} == {3}
    # The evidence is read back, and must agree with the ratios it stands for.
    assert load(str(tmp_path / "a.yaml")).all_findings
    (tmp_path / "bad.yaml").write_text(texts[0].replace(f"runs_per_mode: {DEFAULT_RUNS}", "runs_per_mode: 7"))
    with pytest.raises(ReportError, match="evidence says 7 runs per mode"):
        load(str(tmp_path / "bad.yaml"))


def test_a_race_prone_op_is_replayed_beyond_reps_and_stops_at_its_first_difference(tmp_path, capsys):
    # --reps 1 compares nothing: only the further runs can show the race. Whether it shows depends on
    # the threads really overlapping (a loaded machine can serialize them), so the test asserts what
    # holds either way: more runs than --reps, as many in each mode, and a stop at the first difference
    # (diverges, 1/N) or, if every run agreed, the count the inputs' size fixes under --no-timing.
    out = tmp_path / "r.yaml"
    main([_script(tmp_path, RACY), "--reps", "1", "--no-timing", "-q", "-o", str(out)])
    (put,) = [f for f in yaml.safe_load(out.read_text())["findings"] if f["op"] == "aten.index_put_.default"]
    differing, runs = (int(x) for x in put["default_diverged"].split("/"))
    assert runs > 1 and _runs(put["deterministic_diverged"]) == runs, put
    counted = min(DEFAULT_RUNS, BYTES_PER_MODE // (1000 * 4 + 3_000_000 * 8 + 3_000_000 * 4))
    if put["verdict"] == "diverges":
        assert differing == 1 and 2 <= runs <= counted and "evidence" not in put, put
    else:
        assert put["verdict"] == "stable" and differing == 0 and runs == counted, put
        assert put["evidence"]["runs_per_mode"] == runs
    # Without further runs (--race-seconds 0) the same audit has one run per mode and compares nothing.
    main([_script(tmp_path, RACY), "--reps", "1", "--no-timing", "-q", "--race-seconds", "0", "-o", str(out)])
    (put,) = [f for f in yaml.safe_load(out.read_text())["findings"] if f["op"] == "aten.index_put_.default"]
    assert put["default_diverged"] == "0/1" and put["evidence"] == {"runs_per_mode": 1, "rate_caught_95": 1.0}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/stat"),
                    reason="pins processes to cores (Linux)")
def test_a_contended_cpu_is_said_where_races_hide(tmp_path):
    cores = sorted(os.sched_getaffinity(0))[:2]
    script = _script(tmp_path, STEADY)
    env = {**os.environ, "PYTHONPATH": ROOT}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"], env=env,
                             preexec_fn=lambda: os.sched_setaffinity(0, cores)) for _ in range(2)]
    try:
        def audit(*extra):
            return subprocess.run([sys.executable, "-m", "opaudit", script, "--threads", "2", "--reps", "2",
                                   "--no-deterministic-pass", *extra],
                                  env=env, capture_output=True, text=True, timeout=280,
                                  preexec_fn=lambda: os.sched_setaffinity(0, cores))

        out = tmp_path / "r.yaml"
        done = audit("-o", str(out))
        assert done.returncode == 0, done.stderr
        (warning,) = [w for w in load(str(out)).env_warnings if w.startswith("the CPU was contended")]
        assert "replay's 2 threads" in warning and "weak evidence" in warning
        # Measured, so never in a byte-stable report: said on stderr instead.
        done = audit("--no-timing", "-o", str(out))
        assert "warning: the CPU was contended while ops replayed" in done.stderr
        assert not [w for w in load(str(out)).env_warnings if "contended" in w]
    finally:
        for p in busy:
            p.kill()
            p.wait()


def test_ops_a_catalog_of_this_machine_marks_diverges_race_here_too():
    here = fingerprint()
    if here["torch"] != "2.13.0+cpu" or here["platform"] != "Linux-x86_64":
        pytest.skip("the shipped catalog is for torch 2.13.0+cpu on Linux-x86_64")
    ops = shipped_race_ops(here, "cpu")
    # Besides the value-dependent ops: LAPACK's threaded solver, and the backward PyTorch's decompositions use.
    assert {"aten.linalg_lstsq.default", "aten._unsafe_masked_index_put_accumulate.default",
            "aten.index_put.default"} <= ops
    assert shipped_race_ops({**here, "torch": "2.4.0"}, "cpu") == frozenset()
    assert shipped_race_ops(here, "cuda") == frozenset()
    from opaudit.data.catalog import load_catalog

    shipped = load_catalog(os.path.join(ROOT, "catalogs", "cpu-x86_64-torch2.13.0.yaml"))
    assert catalog_race_ops(shipped, here, "cpu") == ops  # the pattern reads what the loader reads
