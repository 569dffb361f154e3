#!/usr/bin/env python3
"""Benchmark opaudit against the step it audits: every figure is a ratio measured in this run.

    python scripts/bench.py                  # CPU, the full run (a few minutes on 2 cores)
    python scripts/bench.py --quick          # smoke run (well under a minute)
    python scripts/bench.py --device cuda    # the same on a GPU

Ten parts (``--only`` picks some; ``inputs`` and ``races`` run only when named):

* **overhead**: one training step (forward + backward) of two models, each wrapped
  in: nothing (plain eager), a bare pass-through ``TorchDispatchMode``, the same
  without Dynamo's per-call wrapper, ``torch.profiler`` with ``record_shapes=True``,
  ``FlopCounterMode``, and opaudit's ``Recorder`` (default, and copying every
  input at capture). Every tool is entered fresh for
  each step, as it would be to look at one step. Steps run round-robin (one of
  each tool per round) so that load on the machine hits every tool alike; the
  figure is the median after warm-up.
* **audit**: record + classify (``reps`` runs per mode, both modes) of one step of
  ``nn.TransformerEncoder`` at several depths, split into record and replay time,
  with unique signatures vs total ops.
* **cli**: the whole ``opaudit model.py`` command on a 12-layer encoder step, as a
  user runs it: a subprocess of the real CLI, a subprocess of the plain script
  (build the model, one step), and a subprocess that only imports torch, run
  round-robin. The figure is (CLI - import) / (plain script - import), wall
  clock, median over rounds; CPU seconds (user + sys) are printed beside it,
  and the CPU seconds of each phase (build, step; record, replay) in one process.
  Then ``opaudit train.py --start-step K --steps N`` on a training loop against
  the plain script's K + N steps plus the audit's own replay (timed inside the
  same CLI process): the unrecorded prefix must run once.
* **memory**: peak memory of the audit vs the plain step. On CPU each
  measurement runs in a fresh process: peak RSS minus the RSS before the model
  was built (so the interpreter and torch's libraries, the same in both, do not
  water the ratio down). On CUDA: ``torch.cuda.max_memory_allocated``.
* **capsule**: ``opaudit capture`` / ``opaudit replay`` on the 12-layer encoder step, in
  process: recording the step (the audit's own recording) against recording it and
  writing its capsule; the audit's replay (``build_report``) against replaying the
  capsule (from the file, ``reps`` runs per mode, compared with the source's bits);
  the capsule's bytes against the bytes of its captured inputs and of its outputs.
  Round-robin, medians of each round's ratio of CPU seconds (run it with
  ``--threads 1``), the wall-clock ratio beside.
* **training**: unique signatures of a 2-step and a 1,000-step AdamW + ``LambdaLR``
  loop (they must be equal), and the time of ``opaudit train_loop.py --steps 3``
  on a 20,000-step script over the same on a 3-step script (about 1x).
* **html**: the ``--format html`` page of a 5,000-finding report (a typical mix of
  verdicts, and a worst case where every finding diverges or raises with its remedy
  and three sites): file size, render time, and in headless Chromium (the browser
  tests' driver) the time to open it (navigation start to the load event, the
  page's script included; first contentful paint; the driver's own wait), to sort
  a column and to apply a verdict filter.
* **trace**: ``opaudit trace``'s cost on the 12-layer encoder step (the step under
  the tracer, each call streamed to a trace file, against the plain step,
  round-robin, median), and ``opaudit compare`` on two synthesized traces of
  100,000 and 1,000,000 calls (one extra call and one differing call near the
  end): time, and peak RSS of the comparing process (a fresh one per size).
* **inputs**: reading opaudit's own files: a ~60 MB report (``--quick``: ~6 MB) parsed
  by the reader the CLI uses (libyaml's parser under opaudit's own loop), by the same
  loop on PyYAML's pure-Python parser, and by ``yaml.safe_load`` (the reader before
  issue 22), and ``opaudit diff`` of two 20,000-signature reports
  (one verdict in ten changed), each in a fresh process: wall and CPU time, and
  peak RSS above the RSS before reading. The figure is the ratio of CPU times.
* **races** (it starts two busy processes and takes minutes): the README's quick
  start, ``opaudit opaudit/examples/recommender.py``, audited ``--race-audits``
  times (default 10) with ``--busy`` processes running ``while True: pass`` beside it (default 2, as many as this machine has cores
  here), each time as it ships (race-prone ops replayed further, issue 21 item 8)
  and with ``--race-seconds 0`` (``--reps`` runs only, as before), alternating:
  in how many audits both ``index_put`` divergences (the two embedding lookups'
  backward) were found, how many runs it took, the wall time, and whether the
  contended-CPU warning was given.

The targets of issue 5 are checked at the end; the exit status is 0 either way
(this is a measurement, not a test).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Kineto (torch.profiler) logs every start and stop to stderr unless told not to.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from opaudit.engine.record import Recorder  # noqa: E402
from opaudit.flows.pipeline import build_report  # noqa: E402

TARGETS = {
    "recorder / pass-through (encoder-4, d=64)": 1.25,
    "whole audit / plain step (12 layers)": 3.0,
    "replay growth 12 -> 24 layers": 0.15,
    "whole audit / plain step (24 layers)": 2.5,
    "peak memory audit / plain step": 1.5,
    "whole CLI run (deterministic pass included) / plain script, minus import (12 layers)": 2.5,
    "--start-step K audit / (plain K+N steps + replay)": 1.3,
    "HTML page of 5,000 findings, MB (worst case)": 5.0,
    "HTML page of 5,000 findings, seconds to open in Chromium (worst case)": 2.0,
    "capture / the audit's recording, deterministic pass included (12 layers)": 1.2,
    "capture / recording, once (12 layers)": 1.2,
    "capsule replay / audit replay (12 layers)": 1.0,
    "capsule bytes / captured inputs + outputs (12 layers)": 1.5,
    "traced step / plain step (12 layers)": 1.5,
    "compare two traces of 1,000,000 calls, seconds": 30.0,
}
"""Targets (issues 5, 8 and 17). The CLI's is for the default command, whose deterministic-mode recording
runs the step once more (issue 17 item 7); ``--no-deterministic-pass`` is printed beside it."""

# The plain script the ``cli`` part audits: the same model as ``audit_workload(12)``.
CLI_SCRIPT = """\
import os
import torch
from torch import nn

torch.manual_seed(0)
layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
model = nn.TransformerEncoder(layer, {layers}, enable_nested_tensor=False).to("{device}").train()
x = torch.randn(8, 128, 256, generator=torch.Generator().manual_seed(0)).to("{device}")


def opaudit_step():
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()


if __name__ == "__main__":
    opaudit_step()
"""

# The ``--start-step`` audit's training loop: ``python prefix.py STEPS`` runs STEPS AdamW steps.
PREFIX_SCRIPT = """\
import sys
import torch
from torch import nn

torch.manual_seed(0)
layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to("{device}").train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(8, 64, 128, generator=torch.Generator().manual_seed(0)).to("{device}")
for step in range(int(sys.argv[1])):
    opt.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()
    opt.step()
if x.is_cuda:
    torch.cuda.synchronize()
"""

# CPU seconds per phase of the ``cli`` part's audit, in one process: ``python -c PHASES {plain,one,default}``.
PHASES = """\
import json, sys, time
import torch
mode = sys.argv[1]
t0 = time.process_time()
if mode == "plain":
    ns = {"__name__": "model"}
    exec(compile(open("model.py").read(), "model.py", "exec"), ns)
    t1 = time.process_time()
    ns["opaudit_step"]()
    t2 = time.process_time()
    ns["opaudit_step"]()
    print(json.dumps({"build": t1 - t0, "step": t2 - t1, "warm step": time.process_time() - t2}))
    sys.exit()
from opaudit.engine import loader
from opaudit.engine.window import window_for
from opaudit.flows.run import AuditRun, RunOptions
target = loader.load_target("model.py")
t1 = time.process_time()
with AuditRun(RunOptions(reps=int(sys.argv[2]), deterministic_pass=mode == "default"), root=target.root) as run:
    run.record_target(target, window_for(True))
    t2 = time.process_time()
    run.report()
    t3 = time.process_time()
print(json.dumps({"opaudit import": t1 - t0, "load + record": t2 - t1, "replay": t3 - t2}))
"""

# The CLI, with the replay (``AuditRun.report``) timed: the seconds go to the file named by BENCH_TIMES.
TIMED_CLI = """\
import json, os, sys, time
from opaudit.flows import run
report = run.AuditRun.report
def timed(self, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return report(self, *args, **kwargs)
    finally:
        with open(os.environ["BENCH_TIMES"], "w") as f:
            json.dump({"replay_s": time.perf_counter() - t0}, f)
run.AuditRun.report = timed
from opaudit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


# -- models -----------------------------------------------------------------
def encoder(layers: int, d: int, heads: int, ff: int, dropout: float) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=dropout, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class ConvNet(nn.Module):
    """A VGG-style CNN: conv-BN-ReLU pairs in three stages, max pooling, a linear head."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        blocks: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(chans[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@dataclass
class Workload:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor]

    def step(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.loss(self.model(self.inputs)).backward()


def overhead_workloads(device: str) -> list[Workload]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    small = encoder(4, 64, 4, 256, dropout=0.1).to(device).train()
    large = encoder(4, 256, 4, 1024, dropout=0.1).to(device).train()
    cnn = ConvNet().to(device).train()
    labels = torch.randint(0, 10, (8,), generator=g).to(device)
    return [
        Workload("encoder-4 d=64 (batch 2, seq 64)", small, torch.randn(2, 64, 64, generator=g).to(device),
                 lambda y: y.sum()),
        # Larger and compute-bound: the same 4 layers at d=256, ff=1024, batch 8, seq 128.
        Workload("encoder-4 d=256 (batch 8, seq 128)", large, torch.randn(8, 128, 256, generator=g).to(device),
                 lambda y: y.sum()),
        # Larger and the hard case for capture: nearly every op is a signature of its own.
        Workload("convnet 6 conv+BN (batch 8, 3x32x32)", cnn, torch.randn(8, 3, 32, 32, generator=g).to(device),
                 lambda y: nn.functional.cross_entropy(y, labels)),
    ]


def audit_workload(layers: int, device: str) -> Workload:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = encoder(layers, 256, 4, 1024, dropout=0.0).to(device).train()
    return Workload(f"encoder-{layers} d=256", model, torch.randn(8, 128, 256, generator=g).to(device),
                    lambda y: y.sum())


# -- tools ------------------------------------------------------------------
class PassThrough(TorchDispatchMode):
    """A bare pass-through mode: only calls ``func``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class PassThroughNoDynamo(TorchDispatchMode):
    """The same, without the ``torch._dynamo.disable`` wrapper ``TorchDispatchMode`` puts on
    every ``__torch_dispatch__`` (opaudit's mode replaces it with a flag on its code object)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def tools(device: str) -> dict[str, Callable[[], Any]]:
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    return {
        "plain eager": contextlib.nullcontext,
        "pass-through mode": PassThrough,
        "pass-through, no Dynamo wrapper": PassThroughNoDynamo,
        "torch.profiler record_shapes": lambda: profile(activities=activities, record_shapes=True),
        "FlopCounterMode": lambda: FlopCounterMode(display=False),
        "opaudit Recorder": Recorder,
        "opaudit Recorder(copy_inputs=True)": lambda: Recorder(copy_inputs=True),
    }


# -- measurement ------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _minor_faults() -> int:
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def round_robin(step: Callable[[], None], ctxs: dict[str, Callable[[], Any]], rounds: int, warmup: int,
                device: str) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per step under each context, one step of each per round; and page faults per step."""
    times: dict[str, list[float]] = {k: [] for k in ctxs}
    faults: dict[str, int] = dict.fromkeys(ctxs, 0)

    def run(tool: Any) -> None:
        with tool:
            step()

    for i in range(warmup + rounds):
        for name, make in ctxs.items():
            # Built before and dropped after the timed region: the time covers
            # entering the tool, the step, and leaving it (where the profiler and
            # the flop counter do their bookkeeping and the recorder seals its
            # captures), not freeing what it kept.
            tool = make()
            f0 = _minor_faults()
            t = timed(lambda tool=tool: run(tool), device)
            f1 = _minor_faults()
            del tool
            if i >= warmup:
                times[name].append(t)
                faults[name] += f1 - f0
    return {k: statistics.median(v) for k, v in times.items()}, {k: v / rounds for k, v in faults.items()}


@dataclass
class Results:
    env: dict[str, Any] = field(default_factory=dict)
    overhead: dict[str, dict[str, float]] = field(default_factory=dict)
    faults: dict[str, dict[str, float]] = field(default_factory=dict)
    """Minor page faults per step (first touches of fresh memory), by model and tool."""
    audit: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    cli: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    html: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    capsule: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, Any] = field(default_factory=dict)
    races: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)


def bench_overhead(args: argparse.Namespace, res: Results) -> None:
    print("\n## Recording overhead: one forward + backward step, median ms, ratio to plain eager\n")
    ctxs = tools(args.device)
    for i, w in enumerate(overhead_workloads(args.device)):
        # The first model is the one the target is about: it gets every round.
        rounds = args.rounds if i == 0 else max(3, args.rounds // 3)
        med, faults = round_robin(w.step, ctxs, rounds, args.warmup, args.device)
        res.overhead[w.name] = med
        res.faults[w.name] = faults
        plain = med["plain eager"]
        print(f"{w.name}   ({rounds} rounds)")
        print(f"  {'tool':38s} {'ms/step':>9s} {'x plain':>8s} {'faults/step':>12s}")
        for name, t in med.items():
            print(f"  {name:38s} {t * 1e3:9.2f} {t / plain:7.2f}x {faults[name]:12.0f}")
        print(f"  recorder / pass-through: {med['opaudit Recorder'] / med['pass-through mode']:.2f}x"
              f"   (recorder / pass-through without Dynamo wrapper: "
              f"{med['opaudit Recorder'] / med['pass-through, no Dynamo wrapper']:.2f}x)")


def bench_audit(args: argparse.Namespace, res: Results) -> None:
    print(f"\n## Whole audit: record + classify (reps={args.reps}, both modes), encoder d=256,"
          f" batch 8, seq 128, forward + backward\n")
    # One small audit first, so that one-time imports (report, formats, remedies
    # knowledge base) are not charged to the first depth.
    warm = audit_workload(1, args.device)
    with Recorder() as rec:
        warm.step()
    build_report(rec, reps=1)
    rec.release()
    print(f"  {'layers':>6s} {'plain s':>8s} {'record s':>9s} {'replay s':>9s} {'record':>7s} {'replay':>7s}"
          f" {'audit':>7s} {'unique':>7s} {'replayed':>8s} {'ops':>6s} {'views':>6s}")
    # Every depth is built first and measured round-robin (plain steps, then an
    # audit, for each depth in turn, each round), so that load on the machine
    # that comes and goes falls on every depth alike.
    workloads = {depth: audit_workload(depth, args.device) for depth in args.depths}
    for w in workloads.values():
        for _ in range(args.warmup_audit):
            w.step()
    runs: dict[int, list[tuple[float, float, float, dict[str, Any]]]] = {d: [] for d in workloads}
    for _ in range(args.audit_repeats):
        for depth, w in workloads.items():
            plain = statistics.median(timed(w.step, args.device) for _ in range(args.plain_steps))
            record, replay, row = audit_once(w, args)
            runs[depth].append((plain, record, replay, row))
    for depth, rs in runs.items():
        plain = statistics.median(r[0] for r in rs)
        record = statistics.median(r[1] for r in rs)
        replay = statistics.median(r[2] for r in rs)
        ratio = statistics.median((r[1] + r[2]) / r[0] for r in rs)
        row = dict(rs[0][3], layers=depth, plain_s=plain, record_s=record, replay_s=replay, audit_ratio=ratio,
                   record_ratio=statistics.median(r[1] / r[0] for r in rs),
                   replay_ratio=statistics.median(r[2] / r[0] for r in rs))
        res.audit.append(row)
        print(f"  {depth:6d} {plain:8.3f} {record:9.3f} {replay:9.3f} {row['record_ratio']:6.2f}x"
              f" {row['replay_ratio']:6.2f}x {ratio:6.2f}x {row['unique_signatures']:7d} {row['replayed']:8d}"
              f" {row['total_ops']:6d} {row['view_calls']:6d}")
    print("  (seconds are medians; record, replay and audit are medians of each round's ratio to the plain"
          " step measured just before it; 'unique' counts unique non-view signatures, 'replayed' those"
          " replayed in both modes, 'ops' every aten call, 'views' the view/metadata calls among them)")


def audit_once(w: Workload, args: argparse.Namespace) -> tuple[float, float, dict[str, Any]]:
    """Seconds to record one step, seconds to classify it, and what was recorded."""
    gc.collect()
    rec = Recorder()

    def record() -> None:
        with rec:
            w.step()

    reports: list[Any] = []
    record_s = timed(record, args.device)
    replay_s = timed(lambda: reports.append(build_report(rec, reps=args.reps)), args.device)
    row = {
        "layers": 0, "total_ops": rec.total_calls, "view_calls": sum(rec.view_calls.values()),
        "unique_signatures": len(rec.signatures()),
        "replayed": sum(1 for f in reports[0].all_findings if f.default_diverged),
        "captured_mib": rec.captured_bytes / 2**20,
    }
    rec.release()
    return record_s, replay_s, row


# -- capsules (issue 18) ----------------------------------------------------
def bench_capsule(args: argparse.Namespace, res: Results) -> None:
    import tempfile

    from opaudit.data.capsule import DTYPE_SIZES
    from opaudit.flows.capsule import replay_capsule, write_recording
    from opaudit.flows.run import AuditRun, RunOptions

    layers = args.cli_layers
    print(f"\n## Capsules: capture and replay of the {layers}-layer encoder step (d=256, batch 8, seq 128),"
          f" reps={args.reps}, in process, seconds\n")
    tmp = tempfile.mkdtemp(prefix="opaudit-bench-")
    replayed, written = os.path.join(tmp, "replayed.opcap"), os.path.join(tmp, "written.opcap")
    w = audit_workload(layers, args.device)
    for _ in range(args.warmup_audit):
        w.step()

    def recordings(twice: bool) -> tuple[Recorder, Recorder | None]:
        """The step recorded by the audit's own run object: once, or (``twice``, the audit's default) then
        again, light, in deterministic mode. The recorders are handed over (released by the caller)."""
        run = AuditRun(RunOptions(deterministic_pass=twice))
        run.record_call(w.step)
        held = run.recorder, run.deterministic
        run.recorder = run.deterministic = None  # kept past the run: write_recording reads them
        run.close()
        return held

    def release(*recs: Recorder | None) -> None:
        for r in recs:
            if r is not None:
                r.release()
        gc.collect()

    first, _ = recordings(False)
    shape = write_recording(first, replayed)
    release(first)
    replay_capsule(replayed, reps=1)
    m = shape.manifest
    outputs = sum(math.prod(o.shape) * DTYPE_SIZES[o.dtype] for e in m.entries for c in e.captures
                  if "default" in c.outputs for o in c.outputs["default"].outputs if o.dtype)

    def clocked(fn: Callable[[], Any]) -> tuple[float, float]:
        """(wall, CPU) seconds of ``fn``: the CPU seconds are the figure (wall is noise on a loaded machine)."""
        c0 = time.process_time()
        wall = timed(fn, args.device)
        return wall, time.process_time() - c0

    def record(twice: bool) -> tuple[float, float]:
        held: list[Any] = []
        t = clocked(lambda: held.extend(recordings(twice)))
        release(*held)
        return t

    def capture(twice: bool) -> tuple[float, float]:
        held: list[Any] = []
        t = clocked(lambda: held.extend(recordings(twice)) or write_recording(held[0], written, deterministic=held[1]))
        release(*held)
        return t

    def audit_replay() -> tuple[float, float]:
        rec, _ = recordings(False)
        t = clocked(lambda: build_report(rec, reps=args.reps))
        release(rec)
        return t

    tasks = {"record_s1": lambda: record(False), "capture_s1": lambda: capture(False),
             "record_s2": lambda: record(True), "capture_s2": lambda: capture(True),
             "replay_s": audit_replay,
             "capsule_replay_s": lambda: clocked(lambda: replay_capsule(replayed, reps=args.reps))}
    rounds = []
    for i in range(args.capsule_rounds):
        # Every other round in the reverse order: load that drifts over a round falls on both sides alike.
        order = list(tasks) if i % 2 == 0 else list(reversed(tasks))
        rounds.append({name: tasks[name]() for name in order})

    def ratio(a: str, b: str, clock: int) -> float:
        return statistics.median(x[a][clock] / x[b][clock] for x in rounds)

    cpu = {k: statistics.median(x[k][1] for x in rounds) for k in tasks}
    wall = {k: statistics.median(x[k][0] for x in rounds) for k in tasks}
    pairs = {"capture_ratio": ("capture_s1", "record_s1"), "capture_ratio_twice": ("capture_s2", "record_s2"),
             "replay_ratio": ("capsule_replay_s", "replay_s")}
    row = dict(cpu, wall={k: wall[k] for k in tasks}, size=shape.size, captured_inputs=shape_inputs(replayed),
               outputs=outputs, signatures=len(m.entries),
               **{k: ratio(a, b, 1) for k, (a, b) in pairs.items()},
               wall_ratios={k: ratio(a, b, 0) for k, (a, b) in pairs.items()})
    row["size_ratio"] = row["size"] / (row["captured_inputs"] + outputs)
    res.capsule = row
    print(f"  {'CPU seconds (wall ratio beside)':48s} {'audit':>7s} {'capsule':>8s} {'ratio':>7s} {'wall':>7s}")
    for label, key, (a, b) in (("record once / capture (--no-deterministic-pass)", "capture_ratio", pairs["capture_ratio"]),
                               ("record + deterministic path / capture (default)", "capture_ratio_twice",
                                pairs["capture_ratio_twice"]),
                               ("replay: build_report / the capsule", "replay_ratio", pairs["replay_ratio"])):
        print(f"  {label:48s} {cpu[b]:7.2f} {cpu[a]:8.2f} {row[key]:6.2f}x {row['wall_ratios'][key]:6.2f}x")
    print(f"  capsule: {row['size'] / 2**20:.1f} MiB for {row['signatures']} signatures; captured inputs"
          f" {row['captured_inputs'] / 2**20:.1f} MiB + outputs {outputs / 2**20:.1f} MiB:"
          f" {row['size_ratio']:.2f}x")
    print(f"  ({len(rounds)} rounds, every other one in reverse order; ratios are medians of each round's ratio,"
          " of CPU seconds (process time: run with --threads 1), wall beside. Capture = the recording(s) plus one"
          " run of each captured call per mode and the file (a digest only for an output whose bytes it does not"
          " keep); the default also records the step's next call in deterministic mode, light, as the audit does)")


def shape_inputs(path: str) -> int:
    """Bytes of the captured inputs a capsule's calls read, each call's own (as the recorder counts them)."""
    from opaudit.data.capsule_file import CapsuleFile

    with CapsuleFile.open(path, 2**40) as cap:
        return sum(b.blob.nbytes for e in cap.manifest.entries for c in e.captures for b in c.buffers)


# -- the whole command line -------------------------------------------------
def compiled_first(env: dict[str, str]) -> None:
    """Compile opaudit's bytecode before any timed process, as installing it does.

    ``pip install`` writes every module's bytecode, and an editable install writes
    it on first import, unless ``PYTHONDONTWRITEBYTECODE`` is set. Where it is (a
    sandbox, some CI images), every fresh process would compile opaudit's ~70
    modules from source (0.1-0.2 CPU s here, half a plain step), which no installed
    user pays; torch's own bytecode was written when it was installed.
    """
    flag = env.get("PYTHONDONTWRITEBYTECODE")
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "opaudit")], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    print(f"  opaudit's bytecode compiled first (python -m compileall opaudit; PYTHONDONTWRITEBYTECODE="
          f"{flag or 'unset'} here)\n")


def bench_cli(args: argparse.Namespace, res: Results) -> None:
    import resource
    import tempfile

    print(f"\n## Whole command line: `opaudit model.py` on a {args.cli_layers}-layer encoder step (d=256, batch 8,"
          f" seq 128), each a fresh process, wall seconds\n")
    tmp = tempfile.mkdtemp(prefix="opaudit-bench-")
    script = os.path.join(tmp, "model.py")
    with open(script, "w") as f:
        f.write(CLI_SCRIPT.format(layers=args.cli_layers, device=args.device))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's default thread count in all three processes
    commands = {
        "import torch": [sys.executable, "-c", "import torch"],
        "plain script": [sys.executable, script],
        "opaudit model.py": [sys.executable, "-m", "opaudit", script, "--reps", str(args.reps)],
        "... one recording": [sys.executable, "-m", "opaudit", script, "--reps", str(args.reps),
                              "--no-deterministic-pass"],
    }
    compiled_first(env)
    walls: dict[str, list[float]] = {k: [] for k in commands}
    cpus: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.cli_rounds):
        for name, cmd in commands.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp,
                                  check=False)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode not in (0, 1):  # 1: the audit found something, still a whole run
                raise SystemExit(f"{name} failed with exit code {proc.returncode}:\n{proc.stderr.decode()}")
            walls[name].append(wall)
            cpus[name].append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    med = {k: statistics.median(v) for k, v in walls.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    base = med["import torch"]
    # Per round, so that load that comes and goes hits the three alike.
    per_round = [(c - i) / (p - i) for i, p, c in zip(walls["import torch"], walls["plain script"],
                                                     walls["opaudit model.py"])]
    ratio = (med["opaudit model.py"] - base) / (med["plain script"] - base)
    one_ratio = (med["... one recording"] - base) / (med["plain script"] - base)
    cpu_ratio = (cpu["opaudit model.py"] - cpu["import torch"]) / (cpu["plain script"] - cpu["import torch"])
    print(f"  {'process':20s} {'wall s':>8s} {'- import':>9s} {'cpu s':>7s}   ({args.cli_rounds} rounds, medians)")
    for name in commands:
        print(f"  {name:20s} {med[name]:8.2f} {med[name] - base:9.2f} {cpu[name]:7.2f}")
    print(f"  whole CLI / plain script, each minus import: {ratio:.2f}x wall"
          f" (per-round median {statistics.median(per_round):.2f}x, range {min(per_round):.2f}-{max(per_round):.2f});"
          f" {cpu_ratio:.2f}x CPU seconds")
    print(f"  the same with --no-deterministic-pass (no deterministic-mode step): {one_ratio:.2f}x wall")
    inproc = next((r for r in res.audit if r["layers"] == args.cli_layers), None)
    if inproc is not None:
        print(f"  in-process audit (record + classify) / plain step, same model: {inproc['audit_ratio']:.2f}x")
        print(f"  CLI minus import / in-process plain step: {(med['opaudit model.py'] - base) / inproc['plain_s']:.2f}x"
              " (the model build is charged to the CLI here)")
    res.cli = {"layers": args.cli_layers, "rounds": args.cli_rounds, "wall_s": walls, "cpu_s": cpus,
               "ratio": ratio, "one_recording_ratio": one_ratio, "per_round": per_round, "cpu_ratio": cpu_ratio}
    phases: dict[str, list[dict[str, float]]] = {"plain": [], "one": [], "default": []}
    for _ in range(max(1, args.cli_rounds // 2)):
        for mode in phases:
            out = subprocess.run([sys.executable, "-c", PHASES, mode, str(args.reps)], capture_output=True, text=True,
                                 env=env, cwd=tmp, check=True)
            phases[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"  CPU seconds by phase, after import torch, in one process (median of {len(phases['plain'])}):")
    for mode, runs in phases.items():
        print(f"    {mode:8s} " + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in runs[0]))
    res.cli["phases_cpu_s"] = phases
    bench_prefix(args, res, tmp, env)


def bench_prefix(args: argparse.Namespace, res: Results, tmp: str, env: dict[str, str]) -> None:
    """``opaudit prefix.py --start-step K --steps N`` against the plain K + N steps plus the audit's replay."""
    import resource

    k, n = (40, 2) if args.quick else (300, 3)
    script = os.path.join(tmp, "prefix.py")
    with open(script, "w") as f:
        f.write(PREFIX_SCRIPT.format(device=args.device))
    times = os.path.join(tmp, "times.json")
    audit = [sys.executable, "-c", TIMED_CLI, script, "--start-step", str(k), "--steps", str(n), "--reps",
             str(args.reps), "-q", "--exit-zero", "--format", "json", "--", str(k + 2 * n + 10)]
    commands = {"import torch": [sys.executable, "-c", "import torch"],
                f"plain {k}+{n} steps": [sys.executable, script, str(k + n)],
                f"opaudit --start-step {k}": audit}
    print(f"\n## --start-step: `opaudit prefix.py --start-step {k} --steps {n}` (2-layer encoder d=128, AdamW) "
          f"against the plain {k + n} steps, each a fresh process, wall seconds\n")
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    replays: list[float] = []
    for _ in range(args.cli_rounds):
        for name, cmd in commands.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp, check=False,
                                  env=dict(env, BENCH_TIMES=times))
            walls[name].append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus[name].append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed with exit code {proc.returncode}:\n{proc.stderr.decode()}")
            if cmd is audit:
                with open(times) as f:
                    replays.append(json.load(f)["replay_s"])
    med = {name: statistics.median(v) for name, v in walls.items()}
    cpu = {name: statistics.median(v) for name, v in cpus.items()}
    replay = statistics.median(replays)
    base, plain, audited = med["import torch"], med[f"plain {k}+{n} steps"], med[f"opaudit --start-step {k}"]
    print(f"  {'process':26s} {'wall s':>8s} {'- import':>9s} {'cpu s':>7s}   ({args.cli_rounds} rounds, medians)")
    for name in commands:
        print(f"  {name:26s} {med[name]:8.2f} {med[name] - base:9.2f} {cpu[name]:7.2f}")
    print(f"  {'  of which the replay':26s} {replay:8.2f}")
    ratio = audited / (plain + replay)
    bare = (audited - base) / (plain - base + replay)
    print(f"  audit / (plain {k + n} steps + replay): {ratio:.2f}x wall; each minus import: {bare:.2f}x")
    res.cli["prefix"] = {"start_step": k, "steps": n, "wall_s": walls, "cpu_s": cpus, "replay_s": replays,
                         "ratio": ratio, "ratio_minus_import": bare}


# -- training jobs ------------------------------------------------------------
TRAIN_LOOP = os.path.join(ROOT, "tests", "fixtures", "scripts", "train_loop.py")


def _loop_signatures(steps: int, device: str) -> tuple[int, int]:
    """Unique signatures and op calls of ``steps`` AdamW + LambdaLR steps of a 4-layer MLP, recorded in-process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * 0.99**s)
    x = torch.randn(8, 16, device=device)
    y = torch.randint(0, 4, (8,), device=device)
    with Recorder() as rec:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    n = len(rec.signatures())
    rec.release()
    return n, rec.total_calls


def _opaudit_seconds(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "opaudit", *argv], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bench_training(args: argparse.Namespace, res: Results) -> None:
    many = 100 if args.quick else 1000
    print("\n## Training jobs: signatures vs steps (AdamW + LambdaLR, 4-layer MLP), and --steps on a long script\n")
    rows = {n: _loop_signatures(n, args.device) for n in (2, many)}
    for n, (sigs, calls) in rows.items():
        print(f"  {n:5d} steps: {sigs:4d} unique signatures, {calls:7d} op calls")
    res.training["signatures"] = {str(n): sigs for n, (sigs, _) in rows.items()}
    common = [TRAIN_LOOP, "--steps", "3", "--reps", str(args.reps), "-q", "--exit-zero", "--format", "json"]
    # Round-robin, medians: each run is a fresh process (start-up, imports) in both cases.
    long_s, short_s = [], []
    for _ in range(args.audit_repeats):
        long_s.append(_opaudit_seconds([*common, "--", "--steps", "20000"]))
        short_s.append(_opaudit_seconds([*common, "--", "--steps", "3"]))
    lo, sh = statistics.median(long_s), statistics.median(short_s)
    res.training.update(long_script_s=lo, three_step_script_s=sh, window_ratio=lo / sh)
    print(f"  opaudit train_loop.py --steps 3 on a 20,000-step script: {lo:.2f} s")
    print(f"  the same on a script that has only 3 steps:              {sh:.2f} s")
    print(f"  ratio: {lo / sh:.2f}x   (both include start-up, recording 3 steps, and the replay)")


# -- inputs -----------------------------------------------------------------
def _inputs_step() -> None:
    """A few real findings to copy: a lookup table's backward (index_put with accumulate) and a small MLP."""
    torch.manual_seed(0)
    table = torch.randn(64, 8, requires_grad=True)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    ids = torch.randint(0, 64, (256,))
    mlp(table[ids]).sum().backward()


def _synthetic_report(template: dict[str, Any], findings: int, changed_every: int = 0) -> str:
    """``template`` (a real report's dict) with ``findings`` distinct signatures, copied from its findings
    (and no summary); every ``changed_every``-th one ``diverges`` (a second report to diff against the first)."""
    import yaml

    base = template["findings"]
    out = []
    for i in range(findings):
        f = dict(base[i % len(base)])
        f["id"] = f"{i:012x}"
        f["signature"] = f"{f['signature']}, i64[{i}]"
        if changed_every and i % changed_every == 0:
            f["verdict"] = "diverges"
        out.append(f)
    doc = {k: v for k, v in template.items() if k != "summary"}  # optional; its counts would not add up
    doc["findings"] = out

    class Dumper(yaml.CSafeDumper if hasattr(yaml, "CSafeDumper") else yaml.SafeDumper):  # type: ignore[misc]
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=120, allow_unicode=True, default_flow_style=False,
                     explicit_end=True)


def inputs_worker(job: str, loader: str, paths: list[str]) -> dict[str, Any]:
    """One measurement in this fresh process: ``parse`` (read_document) or ``diff`` (diff_files)."""
    from opaudit.data import files
    from opaudit.flows.diff import diff_files

    if loader == "python":
        files._Loader = files._PythonLoader
    elif loader == "safe_load":  # the reader before issue 22: PyYAML's pure-Python SafeLoader, node graph and all
        import yaml

        files.safe_load = lambda text, loader=None: yaml.load(text, Loader=yaml.SafeLoader)
    start = _status_kib("VmRSS")
    # Reset the peak: ru_maxrss would count the parent's RSS when it started this process (Linux keeps it
    # across fork and exec), and the parent holds the generated files.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0, c0 = time.perf_counter(), time.process_time()
    if job == "parse":
        n = len(files.read_document(paths[0])["findings"])
    else:
        n = diff_files(paths[0], paths[1]).summary["changed"]
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "peak_mib": (_status_kib("VmHWM") - start) / 1024, "count": n,
            "loader": "yaml.safe_load" if loader == "safe_load" else files._Loader.__name__}


def bench_inputs(args: argparse.Namespace, res: Results) -> None:
    import tempfile

    import yaml

    from opaudit import audit
    from opaudit.cli.formats import Format, Kind, render
    from opaudit.data import files

    print("\n## Reading opaudit's files: libyaml's parser vs PyYAML's pure-Python one (fresh process each)\n")
    if files._LibyamlLoader is None:
        print("  PyYAML has no libyaml here: nothing to compare")
        return
    template = yaml.safe_load(render(audit(_inputs_step, reps=1), Kind.REPORT, Format.YAML))
    per = len(_synthetic_report(template, 200)) / 200
    big_mb = 6 if args.quick else 60
    with tempfile.TemporaryDirectory() as tmp:
        big, a, b = (os.path.join(tmp, n) for n in ("big.yaml", "a.yaml", "b.yaml"))
        for path, text in ((big, _synthetic_report(template, int(big_mb * 1e6 / per))),
                           (a, _synthetic_report(template, 20_000)), (b, _synthetic_report(template, 20_000, 10))):
            with open(path, "w") as f:
                f.write(text)
        sizes = {p: os.path.getsize(p) / 1e6 for p in (big, a, b)}
        print(f"  report: {sizes[big]:.1f} MB; diffed reports: {sizes[a]:.1f} and {sizes[b]:.1f} MB, 20,000 "
              "signatures each")
        print("  (each: wall s, CPU s, peak MiB above the start; the ratio is of CPU times, libyaml = 1)")
        for job, paths in (("parse", [big]), ("diff", [a, b])):
            got = {}
            for loader in ("libyaml", "python", "safe_load"):
                out = subprocess.run([sys.executable, __file__, "--_inputs", job, "--_loader", loader, *paths],
                                     check=True, capture_output=True, text=True).stdout
                got[loader] = json.loads(out.strip().splitlines()[-1])
            what = f"parse the {sizes[big]:.0f} MB report" if job == "parse" else "diff the two reports"
            base = got["libyaml"]["cpu_s"]
            cells = [f"{name:24s} {r['seconds']:6.0f} s  {r['cpu_s']:6.1f} CPU s  {r['peak_mib']:6.0f} MiB  "
                     f"{r['cpu_s'] / base:5.1f}x"
                     for name, r in (("libyaml", got["libyaml"]), ("pure Python", got["python"]),
                                     ("before (yaml.safe_load)", got["safe_load"]))]
            print(f"  {what}:\n    " + "\n    ".join(cells))
            res.inputs[job] = {"mb": [sizes[p] for p in paths], **got,
                               "cpu_ratio_python": got["python"]["cpu_s"] / base,
                               "cpu_ratio_before": got["safe_load"]["cpu_s"] / base}


# -- memory -----------------------------------------------------------------
def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else 0


def memory_worker(mode: str, depth: int, device: str, reps: int) -> dict[str, Any]:
    """One measurement in this (fresh) process; see the module docstring."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    if device == "cuda":
        torch.cuda.init()
    base = _status_kib("VmRSS")
    w = audit_workload(depth, device)
    w.step()  # warm-up: the same one-time allocations (thread pools, kernels) for both modes
    w.model.zero_grad(set_to_none=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (the peak) to the current RSS
    if mode == "plain":
        w.step()
    else:
        rec = Recorder()
        with rec:
            w.step()
        build_report(rec, reps=reps)
    if device == "cuda":
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated()}
    return {"peak_bytes": (_status_kib("VmHWM") - base) * 1024, "peak_rss_bytes": _status_kib("VmHWM") * 1024}


def bench_memory(args: argparse.Namespace, res: Results) -> None:
    what = "peak allocated CUDA memory" if args.device == "cuda" else \
        "peak RSS above the RSS before the model was built, each in a fresh process"
    print(f"\n## Memory: {what}\n")
    print(f"  {'layers':>6s} {'plain MiB':>10s} {'audit MiB':>10s} {'ratio':>7s}")
    for depth in args.memory_depths:
        row: dict[str, Any] = {"layers": depth}
        for mode in ("plain", "audit"):
            cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--_memory", mode,
                   "--_depth", str(depth), "--reps", str(args.reps)]
            env = dict(os.environ, BENCH_THREADS=str(torch.get_num_threads()))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                raise SystemExit(f"memory worker failed ({mode}, {depth} layers):\n{out.stderr}")
            row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = row["audit"]["peak_bytes"] / row["plain"]["peak_bytes"]
        row["ratio"] = ratio
        res.memory.append(row)
        print(f"  {depth:6d} {row['plain']['peak_bytes'] / 2**20:10.1f} {row['audit']['peak_bytes'] / 2**20:10.1f}"
              f" {ratio:6.2f}x")
        if "peak_rss_bytes" in row["plain"]:
            print(f"  {'':6s} (absolute peak RSS: plain {row['plain']['peak_rss_bytes'] / 2**20:.0f} MiB,"
                  f" audit {row['audit']['peak_rss_bytes'] / 2**20:.0f} MiB,"
                  f" {row['audit']['peak_rss_bytes'] / row['plain']['peak_rss_bytes']:.2f}x)")


# -- html -------------------------------------------------------------------
HTML_FINDINGS = 5000


def html_report(n: int, worst: bool) -> Any:
    """A report of ``n`` findings whose fields are as long as real ones (PyTorch's error text, the remedies
    of opaudit's own catalog, encoder module paths). Typical: 85% stable and a mix of the rest; worst: every
    finding ``diverges`` or ``raises``, with its remedy, PyTorch's error and three sites."""
    import yaml

    from opaudit.data.report import Finding, Report, sort_findings
    from opaudit.data.site import Site
    from opaudit.data.verdict import Verdict

    with open(os.path.join(ROOT, "catalogs", "remedies.yaml")) as f:
        remedies = [e[k] for e in yaml.safe_load(f)["entries"] for k in ("diverges", "raises") if e.get(k)]
    error = ("put_ does not have a deterministic implementation, but you set 'torch.use_deterministic_algorithms("
             "True)'. You can turn off determinism just for this operation, or you can use the 'warn_only=True' "
             "option, if that's acceptable for your application. You can also file an issue at "
             "https://github.com/pytorch/pytorch/issues to help us prioritize adding deterministic support for "
             "this operation.")
    ops = ["aten.index_put_.default", "aten.scatter_add_.default", "aten.mm.default", "aten.addmm.default",
           "aten._softmax.default", "aten.native_layer_norm.default", "aten.embedding_dense_backward.default",
           "aten.bmm.default", "aten.gelu.default", "aten.add_.Tensor", "aten.mul.Tensor", "aten.sum.dim_IntList"]
    typical = ([Verdict.STABLE] * 85 + [Verdict.DIVERGES] * 5 + [Verdict.RANDOM] * 3 + [Verdict.UNINITIALIZED] * 3
               + [Verdict.RAISES] * 2 + [Verdict.WARNS, Verdict.SKIPPED])
    phases = ("setup", "data", "forward", "backward", "optimizer")
    findings = []
    for i in range(n):
        v = (Verdict.RAISES if i % 4 == 0 else Verdict.DIVERGES) if worst else typical[i % len(typical)]
        layer = i % 48
        sites = tuple(Site(f"models/encoder_{i % 7}.py", 20 + (i * 7 + k) % 400, "forward",
                           f"Transformer.encoder.layers.{layer}.self_attn.out_proj")
                      for k in range(3 if worst else 1 + i % 2))
        diverged = v in (Verdict.DIVERGES, Verdict.DIVERGES_DETERMINISTIC)
        findings.append(Finding(
            id=f"{i:012x}", op=ops[i % len(ops)], verdict=v, calls=1 + i % 9,
            signature=f"f32[{8 + i % 64},128,256], f32[256,256], [i64[{1000 + i}]], True", device="cpu",
            reason="capture budget" if v is Verdict.SKIPPED else "", phases=(phases[i % 5],), sites=sites,
            first_call=1 + (i * 13) % (n * 3), strict_error=error if v is Verdict.RAISES else None,
            default_diverged="4/5" if diverged else "0/5", deterministic_diverged="0/5",
            max_abs_diff=1.5 * 10.0 ** -(i % 12) if diverged else 0.0, frac_differing=0.25 if diverged else 0.0,
            outputs=("output",) if diverged else (), time_default_us=50.0 + i % 300,
            time_deterministic_us=(50.0 + i % 300) * (0.5 + (i % 40) / 10),
            remedy=remedies[i % len(remedies)] if v is not Verdict.STABLE else ""))
    return Report(environment={"torch": torch.__version__, "cpu": "bench", "threads": 2},
                  settings={"script": "bench_5000.py", "reps": 5}, all_findings=sort_findings(findings),
                  total_calls=n * 3)


def bench_html(args: argparse.Namespace, res: Results) -> None:
    print(f"\n## HTML page of a {HTML_FINDINGS:,}-finding report: size, render, and Chromium (median of 3 opens)\n")
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from fixtures import browser

    from opaudit.cli.formats import Format, Kind, render

    why = browser.missing()
    pages = {}
    folder = tempfile.mkdtemp(prefix="opaudit-bench-html-")
    for case in ("typical", "worst"):
        report = html_report(HTML_FINDINGS, worst=case == "worst")
        t = time.perf_counter()
        text = render(report, Kind.REPORT, Format.HTML)
        render_s = time.perf_counter() - t
        path = os.path.join(folder, f"{case}.html")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        pages[case] = path
        res.html[case] = {"bytes": len(text.encode()), "render_s": render_s}
    if why:
        print(f"  (no browser: {why}; sizes only)")
    else:
        with browser.chromium() as driver:
            for case, path in pages.items():
                opens, paints, walls, sorts, filters, lists = [], [], [], [], [], []
                for _ in range(3):
                    driver.get("about:blank")
                    t = time.perf_counter()
                    driver.get(browser.file_url(path))
                    walls.append(time.perf_counter() - t)
                    opens.append(driver.execute_script(
                        "var n=performance.getEntriesByType('navigation')[0];return n.loadEventEnd-n.startTime;"))
                    paints.append(driver.execute_script(
                        "var p=performance.getEntriesByName('first-contentful-paint')[0];return p?p.startTime:null;"))
                    sorts.append(driver.execute_script(
                        "var t=performance.now();document.querySelector(\"th[data-key='cost'] button\").click();"
                        "return performance.now()-t;"))
                    filters.append(driver.execute_script(
                        "var t=performance.now();document.querySelector('.chip[data-verdict=raises]').click();"
                        "return performance.now()-t;"))
                    lists.append(driver.execute_script(
                        "var t=performance.now();document.getElementById('f-reset').click();"
                        "document.getElementById('f-more').click();return performance.now()-t;"))
                    assert not browser.console_errors(driver)
                res.html[case].update(open_s=statistics.median(opens) / 1000, wall_s=statistics.median(walls),
                                      sort_s=statistics.median(sorts) / 1000, filter_s=statistics.median(filters) / 1000,
                                      all_s=statistics.median(lists) / 1000)
                if None not in paints:
                    res.html[case]["paint_s"] = statistics.median(paints) / 1000
    shutil.rmtree(folder, ignore_errors=True)
    columns = (("open_s", "open s", 7), ("paint_s", "1st paint s", 12), ("wall_s", "driver s", 9),
               ("sort_s", "sort s", 7), ("filter_s", "filter s", 9), ("all_s", "list all s", 11))
    print(f"  {'case':8s} {'MB':>6s} {'render s':>9s}" + "".join(f" {t:>{w}s}" for _, t, w in columns))
    for case, r in res.html.items():
        timed = "".join(f" {r[k]:>{w}.2f}" if k in r else f" {'-':>{w}s}" for k, _, w in columns)
        print(f"  {case:8s} {r['bytes'] / 1e6:6.2f} {r['render_s']:9.2f}{timed}")
    print("  (open: navigation start to the load event, the page's script included; 1st paint: to the first "
          "contentful paint; driver: the WebDriver's get() as the bench waits for it; sort: a click on the cost "
          "column; filter: a click on the raises chip; list all: drawing every row)")


# -- trace -------------------------------------------------------------------
def synth_trace(path: str, calls: int, *, extra_at: int | None = None, differ_at: int | None = None) -> None:
    """A trace of ``calls`` calls shaped like training steps: a cycle of 1,500 (op, line) keys, two inputs and one
    output each; ``extra_at`` adds one call there, ``differ_at`` changes one call's output."""
    from opaudit.data.site import Site
    from opaudit.engine.tracefile import TraceWriter

    header = {"target": {"script": "synth.py", "sha256": "0" * 64, "entry": None, "argv": []},
              "window": {"steps": None, "start": 0, "max_seconds": None}, "settings": {}, "environment": {},
              "variables": {}, "rank": None}
    ops = [f"aten.op{k}.default" for k in range(40)]
    with TraceWriter(path, header) as w:
        sites = [w.site_id(k, Site("synth.py", 10 + k, "forward", f"Net.layer{k % 12}")) for k in range(300)]
        for i in range(calls):
            if i == extra_at:
                w.call("aten.clone.default", sites[0], 1, 0, 1, (("torch.float32", (8, 64), 1, 2),),
                       (("torch.float32", (8, 64), 1, 2),))
            k = i % 1500
            x = ("torch.float32", (8, 128, 256), k, i & 0xFFFF)
            y = ("torch.float32", (8, 128, 256), k + 1, (i + (1 if i == differ_at else 0)) & 0xFFFF)
            w.call(ops[k % 40], sites[k % 300], 1 << (k % 3), 0, 1 + i // 1500, (x, ("torch.float32", (256,), k, 0)),
                   (y,))
        w.close({"final": {}})


def compare_worker(a: str, b: str) -> dict[str, Any]:
    """Compare two traces in this (fresh) process: seconds, and how far its peak RSS rose above its RSS before."""
    from opaudit.flows.trace.compare import compare_traces

    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the RSS now: the imports' own peak is not the comparison's
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    c = compare_traces(a, b)
    seconds = time.perf_counter() - t0
    (r,) = c.ranks
    return {"seconds": seconds, "rss_before_kib": before, "peak_rise_kib": _status_kib("VmHWM") - before,
            "compared": r.compared, "only_b": r.only_b, "root_cause": r.root_cause.index_a if r.root_cause else None}


def bench_trace(args: argparse.Namespace, res: Results) -> None:
    import tempfile

    from opaudit.engine.tracefile import TraceWriter
    from opaudit.engine.tracer import Tracer
    from opaudit.flows.trace.record import _Sink, _Steps

    print("\n## opaudit trace: the 12-layer encoder step traced (streamed to a file) vs plain, median seconds\n")
    w = audit_workload(12, args.device)
    tmp = tempfile.mkdtemp(prefix="opaudit-bench-trace-")
    path = os.path.join(tmp, "step.optrace")
    calls = [0]

    class Traced:
        """What ``opaudit trace`` does per call: the tracer, its sink (site lookup, step number, flags), the
        writer (encoded, compressed, written as it goes)."""

        def __enter__(self) -> Any:
            self.writer = TraceWriter(path, {"target": {}, "window": {}, "settings": {}, "environment": {},
                                             "variables": {}})
            sink = _Sink(self.writer, _Steps(0, entry=True))
            self.tracer = sink.tracer = Tracer(os.path.dirname(os.path.abspath(__file__)), sink=sink)
            self.tracer.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.tracer.__exit__(*exc)
            self.writer.close({"final": {}})
            calls[0] = self.writer.calls

    rounds = 3 if args.quick else 8
    times, _ = round_robin(w.step, {"plain": contextlib.nullcontext, "traced": Traced}, rounds, 1, args.device)
    ratio = times["traced"] / times["plain"]
    size = os.path.getsize(path)
    res.trace.update(plain_s=times["plain"], traced_s=times["traced"], ratio=ratio, calls=calls[0], bytes=size)
    print(f"  plain {times['plain']:.3f} s, traced {times['traced']:.3f} s: {ratio:.2f}x "
          f"({calls[0]} calls, trace file {size / 1e6:.2f} MB)")
    print("\n## opaudit compare: two synthesized traces (one extra call, one differing call), each size in a fresh "
          "process\n")
    res.trace["compare"] = {}
    for n in (100_000, 1_000_000):
        a, b = os.path.join(tmp, f"a{n}.optrace"), os.path.join(tmp, f"b{n}.optrace")
        t0 = time.perf_counter()
        synth_trace(a, n)
        synth_trace(b, n, extra_at=n // 2, differ_at=n - 1000)
        written = time.perf_counter() - t0
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_compare", a, b], capture_output=True,
                             text=True, check=True).stdout
        r = json.loads(out)
        r["file_bytes"] = os.path.getsize(a)
        res.trace["compare"][n] = r
        print(f"  {n:>9,} calls: {r['seconds']:.1f} s, peak RSS {r['peak_rise_kib'] / 1024:.1f} MiB above the "
              f"process's {r['rss_before_kib'] / 1024:.0f} MiB before comparing "
              f"(trace {r['file_bytes'] / 1e6:.1f} MB each, written in {written / 2:.1f} s; compared "
              f"{r['compared']:,}, {r['only_b']} extra, root cause at call {r['root_cause']})")
        os.unlink(a)
        os.unlink(b)
    os.unlink(path)
    os.rmdir(tmp)
# -- races ------------------------------------------------------------------
RECOMMENDER = os.path.join(ROOT, "opaudit", "examples", "recommender.py")

RACES_TARGET = 0.9
"""Issue 21 item 8: with two busy processes beside it, at least 9 audits in 10 of the quick start find both
``index_put`` divergences."""


def _race_audit(extra: list[str], out: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "opaudit", RECOMMENDER, "-q", "--exit-zero", "-o", out, *extra],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"opaudit failed with exit code {proc.returncode}:\n{proc.stderr.decode()}")
    import yaml

    with open(out) as f:
        report = yaml.safe_load(f)
    puts = [f for f in report["findings"] if f["op"] == "aten.index_put.default"]
    return {"wall_s": wall, "found": sum(f["verdict"] == "diverges" for f in puts), "of": len(puts),
            "runs": [f["default_diverged"] for f in puts],
            "contended": any("contended" in w for w in report.get("env_warnings", []))}


def bench_races(args: argparse.Namespace, res: Results) -> None:
    n = 3 if args.quick else args.race_audits
    print(f"\n## Races under load: {n} audits of the quick start (opaudit/examples/recommender.py), each as it ships"
          f" and with --race-seconds 0, alternating, beside {args.busy} busy process(es)\n")
    tmp = tempfile.mkdtemp(prefix="opaudit-bench-")
    variants = {"as shipped": [], "--race-seconds 0": ["--race-seconds", "0"]}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for i in range(n):
            for name, extra in variants.items():
                r = _race_audit(extra, os.path.join(tmp, "r.yaml"))
                runs[name].append(r)
                print(f"  audit {i + 1:2d} {name:17s} both found: {'yes' if r['found'] == 2 else 'no ':3s}"
                      f"  index_put default runs {', '.join(r['runs']):14s} {r['wall_s']:6.1f} s"
                      f"{'  (contended-CPU warning)' if r['contended'] else ''}", flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    for name, rs in runs.items():
        both = sum(r["found"] == 2 for r in rs)
        print(f"  {name:17s} both divergences found in {both} of {n} audits; median {statistics.median(r['wall_s'] for r in rs):.1f} s"
              f" an audit; contended-CPU warning in {sum(r['contended'] for r in rs)} of {n}")
    shipped = sum(r["found"] == 2 for r in runs["as shipped"]) / n
    res.races = {"audits": n, "busy": args.busy, "runs": runs, "found_fraction": shipped}
    met = shipped >= RACES_TARGET
    res.targets.append({"figure": "quick start audits finding both index_put divergences, 2 busy processes beside",
                        "value": shipped, "target": RACES_TARGET, "met": met})
    print(f"  target: both found in at least {RACES_TARGET:.0%} of audits: {shipped:.0%} {'met' if met else 'MISSED'}")


# -- targets ----------------------------------------------------------------
def check_targets(res: Results) -> None:
    print("\n## Targets (issues 5, 8, 18, 19 and 20)\n")
    found: dict[str, float] = {}
    small = next((v for k, v in res.overhead.items() if k.startswith("encoder-4 d=64")), None)
    if small:
        found["recorder / pass-through (encoder-4, d=64)"] = small["opaudit Recorder"] / small["pass-through mode"]
    by_depth = {r["layers"]: r for r in res.audit}
    if 12 in by_depth:
        found["whole audit / plain step (12 layers)"] = by_depth[12]["audit_ratio"]
    if 12 in by_depth and 24 in by_depth:
        found["replay growth 12 -> 24 layers"] = by_depth[24]["replay_s"] / by_depth[12]["replay_s"] - 1
    if 24 in by_depth:
        found["whole audit / plain step (24 layers)"] = by_depth[24]["audit_ratio"]
    if res.cli:
        found["whole CLI run (deterministic pass included) / plain script, minus import (12 layers)"] = \
            res.cli["ratio"]
        if "prefix" in res.cli:
            found["--start-step K audit / (plain K+N steps + replay)"] = res.cli["prefix"]["ratio_minus_import"]
    if res.capsule:
        found["capture / the audit's recording, deterministic pass included (12 layers)"] = \
            res.capsule["capture_ratio_twice"]
        found["capture / recording, once (12 layers)"] = res.capsule["capture_ratio"]
        found["capsule replay / audit replay (12 layers)"] = res.capsule["replay_ratio"]
        found["capsule bytes / captured inputs + outputs (12 layers)"] = res.capsule["size_ratio"]
    if res.memory:
        found["peak memory audit / plain step"] = max(r["ratio"] for r in res.memory)
    worst = res.html.get("worst", {})
    if worst:
        found["HTML page of 5,000 findings, MB (worst case)"] = worst["bytes"] / 1e6
    if "open_s" in worst:
        found["HTML page of 5,000 findings, seconds to open in Chromium (worst case)"] = worst["open_s"]
    if "ratio" in res.trace:
        found["traced step / plain step (12 layers)"] = res.trace["ratio"]
    if 1_000_000 in res.trace.get("compare", {}):
        found["compare two traces of 1,000,000 calls, seconds"] = res.trace["compare"][1_000_000]["seconds"]
    for name, target in TARGETS.items():
        if name not in found:
            print(f"  {name:56s} not measured in this run")
            continue
        value = found[name]
        unit = "" if "HTML" in name or "seconds" in name else "x"
        shown = f"{value * 100:+.1f}%" if "growth" in name else f"{value:.2f}{unit}"
        limit = f"{target * 100:.0f}%" if "growth" in name else f"{target:.2f}{unit}"
        ok = value <= target
        res.targets.append({"figure": name, "value": value, "target": target, "met": ok})
        print(f"  {name:56s} {shown:>8s}  target <= {limit:6s} {'met' if ok else 'MISSED'}")


# -- main -------------------------------------------------------------------
def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else cpu
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "device": args.device,
        "cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "command": " ".join(["python"] + sys.argv),
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        env["loadavg_start"] = os.getloadavg()[0]
    return env


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="a fast smoke run: fewer steps, depths 2 and 12 only")
    p.add_argument("--only", default="overhead,audit,cli,memory,training,html,capsule,trace",
                   help="comma-separated parts to run")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per tool (overhead)")
    p.add_argument("--reps", type=int, default=5, help="replays per mode (audit)")
    p.add_argument("--depths", default=None, help="encoder depths for the audit part (default 2,6,12,24)")
    p.add_argument("--cli-rounds", type=int, default=None, help="rounds of the three processes (cli; default 5)")
    p.add_argument("--race-audits", type=int, default=10, help="audits per variant (races; default 10)")
    p.add_argument("--busy", type=int, default=2, help="busy processes beside the audits (races; default 2)")
    p.add_argument("--json", default=None, help="also write the raw numbers to this file")
    p.add_argument("--_memory", choices=["plain", "audit"], help=argparse.SUPPRESS)
    p.add_argument("--_depth", type=int, default=12, help=argparse.SUPPRESS)
    p.add_argument("--_inputs", choices=["parse", "diff"], help=argparse.SUPPRESS)
    p.add_argument("--_loader", choices=["libyaml", "python", "safe_load"], default="libyaml", help=argparse.SUPPRESS)
    p.add_argument("_paths", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--_compare", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.rounds = a.rounds or (8 if a.quick else 60)
    a.warmup = 2 if a.quick else 5
    a.warmup_audit = 1 if a.quick else 2
    a.plain_steps = 1 if a.quick else 3
    a.audit_repeats = 1 if a.quick else 3
    a.depths = [int(d) for d in (a.depths or ("2,12" if a.quick else "2,6,12,24")).split(",")]
    a.memory_depths = [12] if a.quick else [12, 24]
    a.cli_layers = 12
    a.cli_rounds = a.cli_rounds or (2 if a.quick else 5)
    a.capsule_rounds = 2 if a.quick else 6
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        print(json.dumps(memory_worker(args._memory, args._depth, args.device, args.reps)))
        return 0
    if args._inputs:
        print(json.dumps(inputs_worker(args._inputs, args._loader, args._paths)))
        return 0
    if args._compare:
        print(json.dumps(compare_worker(*args._compare)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    # Any TorchDispatchMode imports Dynamo on first use (~1.5 s) unless it skips
    # Dynamo's wrapper: pay that once here, not inside the first timed step.
    with PassThrough():
        torch.ones(1) + 1
    res = Results(env=environment(args))
    print("# opaudit benchmark")
    for k, v in res.env.items():
        print(f"  {k}: {v}")
    t0 = time.perf_counter()
    parts = args.only.split(",")
    if "overhead" in parts:
        bench_overhead(args, res)
    if "audit" in parts:
        bench_audit(args, res)
    if "cli" in parts:
        bench_cli(args, res)
    if "memory" in parts:
        bench_memory(args, res)
    if "training" in parts:
        bench_training(args, res)
    if "html" in parts:
        bench_html(args, res)
    if "inputs" in parts:
        bench_inputs(args, res)
    if "capsule" in parts:
        bench_capsule(args, res)
    if "trace" in parts:
        bench_trace(args, res)
    if "races" in parts:
        bench_races(args, res)
    check_targets(res)
    with contextlib.suppress(OSError):
        res.env["loadavg_end"] = os.getloadavg()[0]
    print(f"\n  ({time.perf_counter() - t0:.0f} s; load average {res.env.get('loadavg_start', 0):.2f} at start,"
          f" {res.env.get('loadavg_end', 0):.2f} at end)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.__dict__, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
