"""One rank's part in a distributed audit, and rank 0's merge.

Each rank records and replays its own ops exactly as a single-process audit does
(:func:`opaudit.pipeline.build_report`), then, with the other ranks:

1. replays its collectives in lockstep (:mod:`.collectives`);
2. sends its report, its replicas' digests and write logs through the store;
3. rank 0 merges everything into one report (:mod:`.merge`) and compares the
   replicas (:mod:`.replicas`); the other ranks return ``None`` and write nothing
   unless ``--per-rank-reports DIR`` asks each to write its own report there.

Every wait has a time limit (``timeout_s``); a rank that stops answering is named
in the merged report instead of being waited for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Callable
from typing import Any

import torch

from opaudit.data.files import atomic_write, dump_yaml
from opaudit.data.report import Report
from opaudit.data.verdict import Verdict
from opaudit.engine.record import Recorder
from opaudit.flows.distributed import collectives, replicas
from opaudit.flows.distributed.comm import Channel, World
from opaudit.flows.distributed.merge import merge

DEFAULT_TIMEOUT_S = 60.0
"""Time limit for one exchange or one collective replay; the first meeting waits 10x longer."""


def device_for(world: World) -> str:
    """The device this rank audits on: ``cuda:LOCAL_RANK`` when there are GPUs, else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{world.local_rank % torch.cuda.device_count()}"
    return "cpu"


class RankAudit:
    """The distributed half of an audit, for one rank of a torchrun job."""

    def __init__(self, world: World, *, timeout_s: float = DEFAULT_TIMEOUT_S, per_rank_dir: str | None = None,
                 root: str | None = None) -> None:
        self.world = world
        self.timeout_s = timeout_s
        self.per_rank_dir = per_rank_dir
        self.device = device_for(world)
        if self.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.device))
        self.tracker = replicas.ReplicaTracker(root)
        self._pg_seen = False
        self._groups_made = 0
        self._runs = 0
        self._channel: Channel | None = None

    def fresh_start(self) -> None:
        """Prepare for another run of the script in this process (``--run-check`` loads it afresh each run).

        Every rank lets go of the previous run's objects at the same point: the
        ranks first meet on the store, then collect garbage (a DDP model or a
        process group freed while a peer already set up the next run's group
        waits on that peer for ever), then meet again. The default group a
        previous run left behind is destroyed (a second ``init_process_group``
        would fail), and group names keep counting up: ``destroy_process_group``
        restarts them at 0, and a new group named like an old one would find the
        old one's gloo addresses in torchrun's store.
        """
        import gc

        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        channel = self.channel()
        self._runs += 1
        # The ranks may end a run far apart (a script with no collective runs at each rank's own pace).
        channel.exchange(f"run/{self._runs}/before", True, self.timeout_s * 10)
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()
        self._groups_made = max(self._groups_made, c10d._world.group_count) + 100
        c10d._world.group_count = self._groups_made
        channel.exchange(f"run/{self._runs}/after", True)

    def channel(self) -> Channel:
        """opaudit's channel to the other ranks (made on first use)."""
        if self._channel is None:
            self._channel = Channel(self.world, self.timeout_s)
        return self._channel

    def before_run(self, show: Callable[[str, int, int], None] | None) -> Callable[[str, int, int], None]:
        """The run check's ``on_run``: a fresh start, then the caller's progress display."""
        def on_run(mode: str, i: int, runs: int) -> None:
            self.fresh_start()
            if show is not None:
                show(mode, i, runs)
        return on_run

    def recording(self, rec: Recorder) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        """The recording context for the loader: the recorder, with the replica tracker below it."""
        return lambda: self._watch(self.tracker.around(rec))

    @contextlib.contextmanager
    def _watch(self, inner: contextlib.AbstractContextManager[Any]) -> Any:
        with inner as value:
            try:
                yield value
            finally:
                import torch.distributed as dist

                self._pg_seen = self._pg_seen or dist.is_initialized()

    def finish(self, report: Report, rec: Recorder, *, reps: int) -> Report | None:
        """Collectives in lockstep, then the exchange; the merged report on rank 0, ``None`` elsewhere."""
        import torch.distributed as dist

        channel = self.channel()
        items = rec.items()
        results, mismatch = collectives.replay_collectives(channel, items, self.tracker.collective_calls, reps,
                                                           self.timeout_s)
        report = _apply_collectives(report, results)
        self._pg_seen = self._pg_seen or dist.is_initialized()
        used_pg = self._pg_seen or bool(results) or bool(self.tracker.modules)
        payload = {
            "rank": self.world.rank, "host": socket.gethostname(), "device": self.device,
            "process_group": used_pg, "report": report.to_dict(),
            "replicas": {"final": self.tracker.final_digests(), "writes": self.tracker.writes,
                         "modules": len(self.tracker.modules)},
        }
        self.tracker.release()
        if self.per_rank_dir:
            atomic_write(os.path.join(self.per_rank_dir, f"rank-{self.world.rank}.yaml"), dump_yaml(report.to_dict()))
        channel.post("report", payload)
        if self.world.rank != 0:
            return None
        payloads, missing = channel.gather_available("report", self.timeout_s * 10)
        return merge(payloads, self.world.world_size, missing=missing,
                     distributed=_distributed_section(self.world, payloads, missing, mismatch, results))


def _apply_collectives(report: Report, results: dict[str, collectives.CollectiveResult]) -> Report:
    """This rank's findings with the lockstep replays' verdicts on its collectives."""
    out = []
    for f in report.all_findings:
        r = results.get(f.id)
        if r is None:
            out.append(f)
        elif r.status != "ok":
            out.append(dataclasses.replace(f, verdict=Verdict.SKIPPED, reason=r.reason))
        else:
            differs_across = r.cross_rank.startswith("differs")
            k_default, k_det = int(r.default.split("/")[0]), int(r.deterministic.split("/")[0])
            if differs_across or k_det:
                verdict = Verdict.DIVERGES_DETERMINISTIC
            elif k_default:
                verdict = Verdict.DIVERGES
            else:
                verdict = Verdict.STABLE
            out.append(dataclasses.replace(
                f, verdict=verdict, reason="", default_diverged=r.default, deterministic_diverged=r.deterministic,
                max_abs_diff=r.max_abs_diff, frac_differing=r.frac_differing, cross_rank=r.cross_rank))
    from opaudit.data.report import sort_findings

    return dataclasses.replace(report, all_findings=sort_findings(out))


def _distributed_section(world: World, payloads: dict[int, Any], missing: list[int],
                         mismatch: dict[str, Any] | None, results: dict[str, Any]) -> dict[str, Any]:
    ranks = sorted(payloads)
    section: dict[str, Any] = {
        "world_size": world.world_size,
        "ranks_reported": ranks,
        "process_group": ("initialised by the script" if all(payloads[r]["process_group"] for r in ranks)
                          else "never initialised by the script on rank(s) "
                               + ",".join(str(r) for r in ranks if not payloads[r]["process_group"])
                               + ": each rank was audited alone, with no collective and no replica check"),
        "collectives_replayed": sum(1 for r in results.values() if r.status == "ok"),
    }
    if missing:
        section["missing_ranks"] = missing
    if mismatch:
        section["collective_sequence_mismatch"] = mismatch
    reps = {r: payloads[r]["replicas"] for r in ranks}
    checked = sorted({n for r in ranks for n in reps[r]["final"]})
    section["replicas"] = {
        "ddp_modules": max((reps[r]["modules"] for r in ranks), default=0),
        "tensors_checked": len(checked),
        "differing": replicas.compare(reps) if len(ranks) > 1 else [],
    }
    return section
