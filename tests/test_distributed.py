"""Distributed audits: real 2-process gloo jobs launched through torch.distributed.run.

Each launch costs a few seconds of interpreter start-up per rank, so each test
launches once and checks everything that launch shows. The merge, the report
round trip and the option checks are tested in-process on plain data.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, default_signals

from opaudit.cli.main import main
from opaudit.data.report import Finding, RankOutcome, Report, RunCheck, load
from opaudit.data.site import Site
from opaudit.data.verdict import Verdict
from opaudit.engine.record import Recorder
from opaudit.flows.distributed.collectives import STALL_ENV, sequence_mismatch
from opaudit.flows.distributed.merge import merge_findings, mixed_environment
from opaudit.flows.distributed.replicas import compare

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "distributed")


def _fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def _finding(op: str, verdict: Verdict, **kw) -> Finding:
    return Finding(id=kw.pop("id", op), op=op, verdict=verdict, calls=1, signature="f32[4]", **kw)


# -- in-process: merge, report model, options ---------------------------------
def test_merge_takes_the_worst_verdict_and_keeps_each_ranks_k_of_n():
    site0, site1 = Site("a.py", 1, "f", "M"), Site("a.py", 2, "f", "M")
    r0 = Report({}, {}, (_finding("aten.x", Verdict.DIVERGES, default_diverged="4/5", deterministic_diverged="0/5",
                                  sites=(site0,), max_abs_diff=1e-6),
                         _finding("aten.y", Verdict.STABLE)))
    r1 = Report({}, {}, (_finding("aten.x", Verdict.STABLE, default_diverged="0/5", deterministic_diverged="0/5",
                                  sites=(site1,), max_abs_diff=0.0),))
    merged = {f.op: f for f in merge_findings({0: r0, 1: r1})}
    x = merged["aten.x"]
    assert x.verdict is Verdict.DIVERGES and x.calls == 2 and x.max_abs_diff == 1e-6
    assert x.ranks == (RankOutcome(0, Verdict.DIVERGES, "4/5", "0/5"), RankOutcome(1, Verdict.STABLE, "0/5", "0/5"))
    assert x.sites == (site0, site1)
    assert merged["aten.y"].ranks == (RankOutcome(0, Verdict.STABLE),)  # ran on rank 0 only


def test_mixed_hardware_across_ranks_is_a_warning():
    same = {"torch": "2.13.0", "cpu": "EPYC"}
    assert mixed_environment({0: same, 1: dict(same)}) == []
    warnings = mixed_environment({0: same, 1: {"torch": "2.12.0", "cpu": "EPYC"}})
    assert len(warnings) == 1 and "torch differs (rank 0: 2.13.0; rank 1: 2.12.0)" in warnings[0]


def test_replica_compare_names_the_first_write_that_differed():
    def rank(bn, writes):
        return {"final": {"Net.bn.running_mean": {"kind": "buffer", "digest": bn},
                          "Net.lin.weight": {"kind": "parameter", "digest": "w"}},
                "writes": {"Net.bn.running_mean": writes}}

    same = {"op": "c10d.broadcast_.default", "call": 3, "where": "t.py:5", "module": "", "digest": "b0"}
    bn = {"op": "aten.native_batch_norm.default", "call": 9, "where": "t.py:9", "module": "DDP.module.bn"}
    diffs = compare({0: rank("m0", [same, {**bn, "digest": "m0"}]), 1: rank("m1", [same, {**bn, "digest": "m1"}])})
    assert [d["tensor"] for d in diffs] == ["Net.bn.running_mean"]
    assert diffs[0]["first_op"]["op"] == "aten.native_batch_norm.default" and diffs[0]["first_op"]["write"] == 2
    assert compare({0: rank("m", [same]), 1: rank("m", [same])}) == []


def test_sequence_mismatch_points_at_the_first_differing_call():
    assert sequence_mismatch({0: ["a", "b"], 1: ["a", "b"]}) is None
    assert sequence_mismatch({0: ["a", "b"], 1: ["a", "c"]}) == {"call": 2, "ranks": {"0": "b", "1": "c"}}
    assert sequence_mismatch({0: ["a"], 1: ["a", "c"]})["ranks"]["0"] == "<no more collectives>"


def test_merged_report_round_trips_through_yaml(tmp_path):
    f = _finding("c10d.allreduce_.default", Verdict.STABLE, cross_rank="identical",
                 ranks=(RankOutcome(0, Verdict.STABLE, "0/3", "0/3"), RankOutcome(1, Verdict.SKIPPED, reason="timeout")))
    report = Report({"torch": "2.13", "ranks": [{"rank": 0, "host": "h"}]}, {"world_size": 2}, (f,),
                    distributed={"world_size": 2, "replicas": {"differing": []}})
    from opaudit.cli.formats import Format, render

    path = tmp_path / "r.yaml"
    path.write_text(render(report, "report", Format.YAML))
    back = load(str(path))
    assert back.all_findings == report.all_findings and back.distributed == report.distributed


def test_single_process_reports_carry_no_distributed_fields(tmp_path, capsys):
    script = tmp_path / "t.py"
    script.write_text("import torch\n(torch.ones(3) * 2).sum()\n")
    out = tmp_path / "r.yaml"
    assert main([str(script), "--reps", "1", "-o", str(out), "-q"]) == 0
    text = out.read_text()
    assert "distributed:" not in text and "ranks:" not in text and "cross_rank" not in text


def test_collective_signatures_are_stable_text():
    from fixtures.models import collective_op

    rec = Recorder()
    with rec:
        collective_op()
    sig = next(s for s in rec.signatures() if s.op.startswith("c10d."))
    # A ScriptObject's repr holds its address: ids would differ run to run and rank to rank.
    assert sig.signature == "[f32[4]], ProcessGroup(size=1), ReduceOp.SUM, None, False"


def test_distributed_options_outside_torchrun_are_usage_errors(tmp_path, capsys):
    script = tmp_path / "t.py"
    script.write_text("pass\n")
    assert main([str(script), "--per-rank-reports", str(tmp_path)]) == 2
    assert "needs a distributed run" in capsys.readouterr().err
    # A folder that is not there is refused before N ranks are launched
    assert main([str(script), "--nproc-per-node", "2", "--per-rank-reports", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"opaudit: error: --per-rank-reports: {tmp_path / 'nope'} is not a folder\n"


def _check(mode: str, root: int | None, before: int, *, root_call: int | None = None, calls=()) -> RunCheck:
    coll = {"calls": 3, "before_root_cause": before,
            "differing": [{"call": c, "index": 10 * c, "op": "c10d.allreduce_.default", "where": "t.py:9",
                           "inputs_differ": i, "outputs_differ": o} for c, i, o in calls]}
    if root_call is not None:
        coll["root_cause_call"] = root_call
    return RunCheck(mode=mode, runs=2, reproducible=root is None, ops=50,
                    root_cause=None if root is None else {"index": root, "op": "aten.x", "where": "t.py:3"},
                    collectives=coll)


def test_run_checks_across_ranks_name_the_rank_that_diverged_first_and_the_collective_that_spread_it():
    from opaudit.flows.distributed.runchecks import merge_run_checks

    # Rank 1 diverges at op 15 (after collective call 1); rank 0 only receives it through call 2.
    r0 = _check("default", 20, 1, root_call=2, calls=[(2, False, True)])
    r1 = _check("default", 15, 1, calls=[(2, True, True), (3, False, True)])
    checks, summary = merge_run_checks({0: (r0,), 1: (r1,)})
    assert [(c.mode, c.rank) for c in checks] == [("default", 0), ("default", 1)]
    (s,) = summary
    assert s["not_reproducible_on"] == [0, 1] and s["reproducible_on"] == []
    assert s["diverged_first"]["rank"] == 1 and s["diverged_first"]["before_collective_call"] == 2
    assert s["spread_through"]["call"] == 2 and s["spread_through"]["inputs_differed_on"] == [1]
    # The collective itself: inputs identical on every rank, outputs not; nothing spread.
    same = _check("default", 20, 1, root_call=2, calls=[(2, False, True)])
    _, (s,) = merge_run_checks({0: (same,), 1: (same,)})
    assert s["diverged_first"]["collective_call"] == 2 and "spread_through" not in s
    # Reproducible everywhere: no blame at all.
    _, (s,) = merge_run_checks({0: (_check("default", None, 0),), 1: (_check("default", None, 0),)})
    assert s["reproducible_on"] == [0, 1] and "diverged_first" not in s and "spread_through" not in s


def test_run_check_counts_a_processs_collectives_and_the_one_that_differed(tmp_path):
    """In-process, a one-rank gloo group: the run check keeps the collective calls (which differed, whether their
    input did, how many came before the root cause) for the merge across ranks."""
    from opaudit.engine import loader
    from opaudit.flows.runcheck import run_check

    script = tmp_path / "t.py"
    script.write_text(
        "import pathlib, torch, torch.distributed as dist\n"
        "if not dist.is_initialized():\n"  # as tests/fixtures/models.collective_op leaves it
        "    dist.init_process_group('gloo', rank=0, world_size=1, store=dist.HashStore())\n"
        "t = torch.ones(4)\n"
        "dist.all_reduce(t)\n"
        "runs = pathlib.Path(__file__).with_suffix('.runs')\n"  # a value from outside the ops: 0, then 1
        "n = int(runs.read_text()) if runs.exists() else 0\n"
        "runs.write_text(str(n + 1))\n"
        "v = torch.full((4,), float(n))\n"
        "dist.all_reduce(v)\n")
    rc = run_check(loader.load_target(str(script), None, []))
    assert not rc.reproducible and rc.root_cause["op"] == "aten.full.default"
    assert not rc.root_cause["inputs_identical"]  # its fill value came from outside the ops
    coll = rc.collectives
    assert coll["calls"] == 2 and coll["before_root_cause"] == 1 and "root_cause_call" not in coll
    assert [(c["call"], c["op"], c["inputs_differ"], c["outputs_differ"]) for c in coll["differing"]] == [
        (2, "c10d.allreduce_.default", True, True)]


# -- real jobs ------------------------------------------------------------------
def _torchrun(*args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--monitor-interval", "0.2", "-m", "opaudit", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          preexec_fn=default_signals)  # a rank's SIGINT must not be ignored (STOP_ENV)


def test_torchrun_ddp_step_merged_report(tmp_path):
    """``torchrun -m opaudit --run-check``: one merged report, per-rank k/N, collectives, the BatchNorm replicas,
    and the run check across ranks (rank 0 diverges first, DDP's gradient all-reduce spreads it to rank 1)."""
    out, per_rank = tmp_path / "report.yaml", tmp_path / "ranks"
    per_rank.mkdir()
    proc = _torchrun(_fixture("ddp_step.py"), "-o", str(out), "--per-rank-reports", str(per_rank), "--reps", "3",
                     "--no-timing", "--dist-timeout", "30", "--fail-on", "raises", "--run-check", timeout=240)
    # No verdict is in --fail-on: exit 1 (rank 0's, passed on by torchrun) comes from the replicas that differ.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["ranks", "report.yaml"]  # rank 1 wrote no report of its own
    assert sorted(os.listdir(per_rank)) == ["rank-0.yaml", "rank-1.yaml"]
    report = load(str(out))
    assert report.settings["world_size"] == 2 and report.distributed["world_size"] == 2
    assert [(r["rank"], r["device"]) for r in report.environment["ranks"]] == [(0, "cpu"), (1, "cpu")]
    assert all(r["host"] for r in report.environment["ranks"])

    jitter = report.finding("opaudit_dist.jitter.default")  # nondeterministic on rank 0 only
    assert jitter.verdict is Verdict.DIVERGES_DETERMINISTIC
    assert [(o.rank, o.verdict, o.default_diverged) for o in jitter.ranks] == [
        (0, Verdict.DIVERGES_DETERMINISTIC, "2/3"), (1, Verdict.STABLE, "0/3")]
    assert jitter.calls == 2

    reduces = [f for f in report.all_findings if f.op == "c10d.allreduce_.default"]
    assert reduces and all(f.verdict is Verdict.STABLE and f.cross_rank == "identical" for f in reduces)
    assert all(len(f.ranks) == 2 and f.default_diverged == "0/3" for f in reduces)
    assert report.distributed["collectives_replayed"] >= 2

    differing = {d["tensor"]: d for d in report.distributed["replicas"]["differing"]}
    assert set(differing) == {"Net.bn.running_mean", "Net.bn.running_var"}  # parameters and grads stay in sync
    blame = differing["Net.bn.running_mean"]["first_op"]
    assert blame["op"] == "aten.native_batch_norm.default"
    bn_line = next(i for i, line in enumerate(open(_fixture("ddp_step.py")), 1) if "return self.bn(" in line)
    assert blame["where"] == f"tests/fixtures/distributed/ddp_step.py:{bn_line}"

    # The whole-step check, run on each rank: DDP re-initialised each run (the ranks meet between runs).
    assert [(c.mode, c.rank, c.reproducible) for c in report.run_checks] == [
        ("default", 0, False), ("default", 1, False), ("deterministic", 0, False), ("deterministic", 1, False)]
    jitter_line = next(i for i, line in enumerate(open(_fixture("ddp_step.py")), 1) if "jitter(self.lin" in line)
    for c in report.run_checks:
        if c.rank == 0:  # its own op, in its own execution order
            assert c.root_cause["op"] == "opaudit_dist.jitter.default" and c.root_cause["inputs_identical"]
            assert c.root_cause["where"] == f"tests/fixtures/distributed/ddp_step.py:{jitter_line}"
        else:  # it only received the difference: through DDP's gradient all-reduce
            assert c.root_cause["op"] == "c10d.allreduce_.default" and c.root_cause["phase"] == "backward"
    for s in report.distributed["run_check"]:
        assert s["not_reproducible_on"] == [0, 1]
        first, spread = s["diverged_first"], s["spread_through"]
        assert (first["rank"], first["op"]) == (0, "opaudit_dist.jitter.default")
        assert spread["op"] == "c10d.allreduce_.default" and spread["inputs_differed_on"] == [0]
        assert spread["outputs_differed_on"] == [0, 1] and first["before_collective_call"] == spread["call"]
    assert "spread through collective call" in proc.stderr

    own = load(str(per_rank / "rank-1.yaml"))  # a rank's own report: its findings, no merge
    assert own.finding("opaudit_dist.jitter.default").verdict is Verdict.STABLE and not own.distributed


def test_mismatched_collectives_and_a_stalled_rank(tmp_path, capfd):
    """The shortcut; rank 1 stalls in the first collective replay: skipped: timeout everywhere, nothing hangs.

    The ranks' second all-reduce differs (SUM on rank 0, MAX on rank 1): the report says where they part.
    """
    out = tmp_path / "report.yaml"
    omp_before = os.environ.get("OMP_NUM_THREADS")
    os.environ[STALL_ENV] = "1"
    try:
        code = main(["--nproc-per-node", "2", _fixture("mismatch.py"), "-o", str(out), "--reps", "2",
                     "--dist-timeout", "3", "-q"])
    finally:
        del os.environ[STALL_ENV]
    err = capfd.readouterr().err
    assert code == 0, err[-3000:]
    report = load(str(out))
    first = next(f for f in report.all_findings if f.op == "c10d.allreduce_.default" and f.calls > 1)
    assert first.verdict is Verdict.SKIPPED and first.reason == "timeout"
    assert [(o.rank, o.reason) for o in first.ranks] == [(0, "timeout"), (1, "timeout")]
    mismatch = report.distributed["collective_sequence_mismatch"]
    assert mismatch["call"] == 2
    assert "ReduceOp.SUM" in mismatch["ranks"]["0"] and "ReduceOp.MAX" in mismatch["ranks"]["1"]
    only_rank1 = next(f for f in report.all_findings if "ReduceOp.MAX" in f.signature)
    assert only_rank1.reason == "collective sequences differ across ranks"
    assert [o.rank for o in only_rank1.ranks] == [1]
    assert os.environ.get("OMP_NUM_THREADS") == omp_before  # torchrun's changes to this process were undone


@pytest.mark.parametrize("how, message", [("raise", "rank 1 exited with code 2"),
                                          ("kill", "rank 1 was killed by SIGKILL")])
def test_a_failing_rank_ends_the_job_with_exit_2(tmp_path, capfd, how, message):
    out = tmp_path / "report.yaml"
    os.environ["FAIL"] = how
    try:
        code = main(["--nproc-per-node", "2", _fixture("rank_fails.py"), "-o", str(out), "--dist-timeout", "10"])
    finally:
        del os.environ["FAIL"]
    err = capfd.readouterr().err
    assert code == 2
    assert f"opaudit: error: the distributed audit failed: {message}" in err
    if how == "raise":
        assert "opaudit [rank 1]: error: the script raised RuntimeError: rank 1 ran out of data" in err
    assert not out.exists()


def test_a_rank_stopped_in_the_middle_of_its_audit_writes_no_report(tmp_path, capfd, monkeypatch):
    """torchrun stops rank 0 while it replays (rank 1 died): rank 0's own findings are not the job's report.

    Without the fixture's handshake this was a race: a stop that landed during rank 0's
    replay left a partial report of rank 0 alone at ``-o`` (and the job's exit 2).
    """
    out, mark = tmp_path / "report.yaml", tmp_path / "replaying"
    monkeypatch.setenv("REPLAY_MARK", str(mark))
    code = main(["--nproc-per-node", "2", _fixture("dies_while_rank0_replays.py"), "-o", str(out), "--reps", "1",
                 "--no-timing", "--dist-timeout", "10"])
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    assert mark.exists()  # rank 0 was replaying when it was stopped
    assert "opaudit: error: the distributed audit failed: rank 1 was killed by SIGKILL" in err
    assert "opaudit [rank 0]: terminated\n" in err and "partial report" not in err
    assert sorted(os.listdir(tmp_path)) == ["replaying"]


def test_world_of_one_without_a_process_group_with_per_rank_reports(tmp_path, capfd):
    out, per_rank = tmp_path / "report.yaml", tmp_path / "ranks"
    per_rank.mkdir()
    # --per-rank-reports with the --nproc-per-node shortcut (issue 22 item 10: was refused, asking for it)
    code = main(["--nproc-per-node", "1", _fixture("no_group.py"), "-o", str(out), "--reps", "2", "-q",
                 "--per-rank-reports", str(per_rank)])
    assert code == 0, capfd.readouterr().err[-3000:]
    assert os.listdir(per_rank) == ["rank-0.yaml"]
    assert load(str(per_rank / "rank-0.yaml")).finding("aten.mm.default").verdict is Verdict.STABLE
    report = load(str(out))
    assert report.distributed["world_size"] == 1 and report.complete
    assert report.distributed["process_group"].startswith("never initialised by the script on rank(s) 0")
    assert report.finding("aten.mm.default").ranks == (RankOutcome(0, Verdict.STABLE, "0/2", "0/2"),)
    assert torch.get_num_threads() == 2  # the launcher left this process's settings alone



def test_interrupted_sharded_catalog_resumes_to_a_single_process_sweep(tmp_path):
    """``torchrun -m opaudit catalog``: each rank sweeps its share, rank 0 merges. Rank 0 gets a real SIGINT after
    its first op (the STOP_ENV test hook); torchrun stops rank 1 with SIGTERM; both keep their partial files. The
    ``--resume`` run sweeps what is left, and the merged catalog equals one single-process sweep."""
    from opaudit.flows.catalog import CatalogRequest, SweepConfig, build_catalog, load_catalog
    from opaudit.flows.distributed.shard import STOP_ENV

    ops = ("put", "take", "nn.functional.max_unpool1d", "cumsum", "index_add")
    out = tmp_path / "cat.yaml"
    opts = ["--dtypes", "float32", "--no-stress", "--max-samples", "2", "--reps", "2", "--in-process"]
    args = ("catalog", "--ops", ",".join(ops), *opts, "--threads", "2", "-o", str(out), "-q")
    cut = _torchrun(*args, timeout=240, env={STOP_ENV: "0:1"})
    assert cut.returncode != 0 and not out.exists(), cut.stderr[-3000:]
    path0 = tmp_path / "cat.yaml.partial.rank-0"
    partial0 = load_catalog(str(path0))
    assert not partial0.complete and len(partial0.swept) == 1  # rank 0's first op, kept
    # Marked, so that the result shows whether the resumed run kept it or swept it again.
    data = yaml.safe_load(path0.read_text())
    kept = data["swept"][0]
    kept["reason"] = "kept from the partial file"
    path0.write_text(yaml.safe_dump(data, sort_keys=False, explicit_end=True))

    resumed = _torchrun(*args, "--resume", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["cat.yaml"]  # the ranks' partial files are gone, no other output
    sharded = load_catalog(str(out))
    single = build_catalog(CatalogRequest(SweepConfig(stress=False, max_samples=2, reps=2), ops, dtypes="float32",
                                          isolate=False, threads=2))
    assert [s.task_id for s in sharded.swept] == [s.task_id for s in single.swept] and len(single.swept) >= 5
    marked = [s for s in sharded.swept if s.reason == "kept from the partial file"]
    assert [s.task_id for s in marked] == [partial0.swept[0].task_id]  # not swept again
    got, want = sharded.to_dict(), single.to_dict()
    i = next(i for i, s in enumerate(got["swept"]) if s.get("reason") == "kept from the partial file")
    got["swept"][i] = want["swept"][i]
    assert got == want
