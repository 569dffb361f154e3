"""Collectives replayed in lockstep: every rank replays the same recorded collective at once.

Each rank recorded its collectives (inputs captured before the call). The ranks
first agree on one plan: the collectives in first-call order, as long as every
rank recorded the same sequence; past the first disagreement nothing is replayed
(``skipped``, with both sides named). Then, for each planned collective, every
rank calls it ``reps`` times with the setting off and ``reps`` times on, on fresh
clones of its own captured inputs, over opaudit's private gloo group (never the
user's), and compares:

* run to run, on this rank: ``k/N`` like any other op;
* across ranks, for the collectives whose result must be the same everywhere
  (all_reduce, all_gather, broadcast): the digest of the first run's result.

After each collective the ranks report to each other through the store. A rank
that fails, or does not answer within the time limit, makes that collective
``skipped: timeout`` (or ``replay failed``) on every rank, and the collectives
after it are not attempted: a group that timed out cannot be trusted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from opaudit.aten.bitwise import difference, digest, flat_tensors, same_bits
from opaudit.aten.tensors import Snapshot
from opaudit.engine.globalstate import set_deterministic
from opaudit.engine.record import RecordedSignature
from opaudit.flows.distributed.comm import Channel, RankTimeout

STALL_ENV = "OPAUDIT_TEST_STALL_RANK"
"""Fault injection for the test suite: this rank sleeps past the time limit before its
first collective replay, as a rank stuck in a kernel would."""

# op → (how to call it on a gloo backend, result must match across ranks)
_REPLAYABLE: dict[str, tuple[str, bool]] = {
    "c10d::allreduce_": ("allreduce", True),
    "c10d::allreduce_coalesced_": ("allreduce_coalesced", True),
    "c10d::broadcast_": ("broadcast", True),
    "c10d::allgather_": ("allgather", True),
    "c10d::_allgather_base_": ("allgather_base", True),
    "c10d::reduce_scatter_": ("reduce_scatter", False),
    "c10d::_reduce_scatter_base_": ("reduce_scatter_base", False),
    "_c10d_functional::all_reduce": ("f_all_reduce", True),
    "_c10d_functional::all_gather_into_tensor": ("f_all_gather", True),
    "_c10d_functional::reduce_scatter_tensor": ("f_reduce_scatter", False),
    "_c10d_functional::broadcast": ("f_broadcast", True),
}
# Collectives never replayed, and why (any other is "not replayed by opaudit").
_NOT_REPLAYED = {
    "c10d::send": "point-to-point: replaying one side alone would deadlock",
    "c10d::recv_": "point-to-point: replaying one side alone would deadlock",
    "c10d::recv_any_source_": "point-to-point: replaying one side alone would deadlock",
    "c10d::barrier": "barrier: no data to compare",
    "c10d::monitored_barrier_": "barrier: no data to compare",
    "_c10d_functional::wait_tensor": "bookkeeping: waits for a collective, no communication",
    "_c10d_functional::_wrap_tensor_autograd": "bookkeeping: no communication",
}


@dataclass(frozen=True)
class CollectiveResult:
    """What the lockstep replay of one collective found on this rank (JSON-able)."""

    id: str
    status: str
    """``ok``, ``skipped``."""
    reason: str = ""
    default: str = ""
    deterministic: str = ""
    max_abs_diff: float = 0.0
    frac_differing: float = 0.0
    digest: str = ""
    must_match: bool = False
    cross_rank: str = ""
    """``identical``, ``differs: ...`` or empty where the result is rank-specific."""

    def to_json(self) -> dict[str, Any]:
        """Plain dict for the store exchange."""
        return dict(self.__dict__)


def replay_plan(sig: RecordedSignature) -> tuple[str, bool] | str:
    """``(call kind, must match across ranks)`` for a replayable collective, else the skip reason."""
    name = sig.op.rsplit(".", 1)[0].replace(".", "::", 1)
    if name in _REPLAYABLE:
        return _REPLAYABLE[name]
    return _NOT_REPLAYED.get(name, "collective not replayed by opaudit")


def _reduce_op(obj: Any) -> Any:
    if isinstance(obj, str):
        return dist.ReduceOp(dist.ReduceOp.RedOpType.__members__[obj.upper()])
    code = int(obj.op())
    names = {int(v): k for k, v in dist.ReduceOp.RedOpType.__members__.items()}
    return dist.ReduceOp(dist.ReduceOp.RedOpType.__members__[names[code]])


def _group_size(obj: Any) -> int | None:
    if isinstance(obj, torch.ScriptObject):
        return dist.ProcessGroup.unbox(obj).size()
    try:
        return torch._C._distributed_c10d._resolve_process_group(obj).size()
    except Exception:  # destroyed or unknown group
        return None


def _call(kind: str, pg: Any, args: tuple) -> Any:
    """Run one collective on backend ``pg`` with rebuilt ``args``; return its result tensors."""
    if kind == "allreduce":
        o = dist.AllreduceOptions()
        o.reduceOp = _reduce_op(args[2])
        pg.allreduce(args[0], o).wait()
        return args[0]
    if kind == "allreduce_coalesced":
        o = dist.AllreduceCoalescedOptions()
        o.reduceOp = _reduce_op(args[2])
        pg.allreduce_coalesced(args[0], o).wait()
        return args[0]
    if kind == "broadcast":
        o = dist.BroadcastOptions()
        o.rootRank, o.rootTensor = args[2], args[3]
        pg.broadcast(args[0], o).wait()
        return args[0]
    if kind == "allgather":
        pg.allgather(args[0], args[1]).wait()
        return args[0]
    if kind == "allgather_base":
        pg._allgather_base(args[0], args[1]).wait()
        return args[0]
    if kind == "reduce_scatter":
        o = dist.ReduceScatterOptions()
        o.reduceOp = _reduce_op(args[3])
        pg.reduce_scatter(args[0], args[1], o).wait()
        return args[0]
    if kind == "reduce_scatter_base":
        o = dist.ReduceScatterOptions()
        o.reduceOp = _reduce_op(args[3])
        pg._reduce_scatter_base(args[0], args[1], o).wait()
        return args[0]
    t = args[0]
    if kind == "f_all_reduce":
        out = t.clone()
        o = dist.AllreduceOptions()
        o.reduceOp = _reduce_op(args[1])
        pg.allreduce([out], o).wait()
        return out
    if kind == "f_all_gather":
        out = t.new_empty((t.shape[0] * args[1], *t.shape[1:]))
        pg._allgather_base(out, t.contiguous()).wait()
        return out
    if kind == "f_reduce_scatter":
        out = t.new_empty((t.shape[0] // args[2], *t.shape[1:]))
        o = dist.ReduceScatterOptions()
        o.reduceOp = _reduce_op(args[1])
        pg._reduce_scatter_base(out, t.contiguous(), o).wait()
        return out
    if kind == "f_broadcast":
        out = t.clone()
        o = dist.BroadcastOptions()
        o.rootRank = args[1]
        pg.broadcast([out], o).wait()
        return out
    raise ValueError(kind)


def _group_arg(kind: str, args: tuple) -> Any:
    if kind.startswith("f_"):
        return args[-1]
    return args[2] if kind in ("allgather", "allgather_base", "reduce_scatter", "reduce_scatter_base") else args[1]


def _runs(kind: str, pg: Any, snap: Snapshot, reps: int) -> tuple[list[str], str, float, float, str]:
    """``reps`` runs per mode: ``k/N`` per mode, largest difference, digest of the first result."""
    ratios, max_diff, frac, first_digest = [], 0.0, 0.0, ""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        for deterministic in (False, True):
            set_deterministic(deterministic, warn_only=True)
            first = None
            differing = 0
            for _ in range(reps):
                args, _, _ = snap.materialize(fresh_all=True)
                out = flat_tensors(_call(kind, pg, args))
                if first is None:
                    first = out
                    if not first_digest:
                        first_digest = repr([digest(t) for t in out])
                    continue
                if len(out) != len(first) or not all(same_bits(a, b) for a, b in zip(first, out)):
                    differing += 1
                    for a, b in zip(first, out):
                        d = difference(a, b)
                        max_diff = max(max_diff, d.max_abs_diff)
                        frac = max(frac, d.elements_differing / max(d.elements, 1))
            ratios.append(f"{differing}/{reps}")
    finally:
        set_deterministic(before[0], warn_only=before[1])
    return ratios, first_digest, max_diff, frac, ""


def sequence_mismatch(calls: dict[int, list[str]]) -> dict[str, Any] | None:
    """Where the ranks' collective call sequences first part, or ``None`` when they agree."""
    n = max((len(c) for c in calls.values()), default=0)
    for i in range(n):
        at = {r: c[i] if i < len(c) else "<no more collectives>" for r, c in sorted(calls.items())}
        if len(set(at.values())) > 1:
            return {"call": i + 1, "ranks": {str(r): v for r, v in at.items()}}
    return None


def replay_collectives(
    channel: Channel,
    items: list[tuple[RecordedSignature, Any, Snapshot | None]],
    calls: list[str],
    reps: int,
    timeout_s: float,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, CollectiveResult], dict[str, Any] | None]:
    """Agree on a plan with the other ranks and replay it; results by signature id, and the mismatch if any.

    ``calls`` is this rank's collective calls in execution order (``op(signature)``),
    compared across ranks to say where the sequences part. The plan itself is the
    recorded signatures in first-call order: replayed up to the first position
    where the ranks disagree. Every rank must call this (it is itself a
    collective over the store).
    """
    world = channel.world
    colls = [(s, f, snap) for s, f, snap in items if s.skip_reason == "collective"]
    mine = {"plan": [s.id for s, _, _ in colls], "calls": list(calls)}
    everyone = channel.exchange("plan", mine, timeout_s * 10)
    plans = {r: v["plan"] for r, v in everyone.items()}
    common = 0
    while all(common < len(p) for p in plans.values()) and len({p[common] for p in plans.values()}) == 1:
        common += 1
    mismatch = sequence_mismatch({r: v["calls"] for r, v in everyone.items()})
    results: dict[str, CollectiveResult] = {}
    for s, _, _ in colls[common:]:
        results[s.id] = CollectiveResult(s.id, "skipped", "collective sequences differ across ranks")
    pg: list[Any] = []

    def group() -> Any:
        # Created on first use, by every rank at the same point of the plan: building it is itself collective.
        if not pg:
            pg.append(channel.process_group(timeout_s))
        return pg[0]

    broken = ""
    stall = os.environ.get(STALL_ENV)
    for i, (sig, _func, snap) in enumerate(colls[:common]):
        plan = replay_plan(sig)
        if broken:
            results[sig.id] = CollectiveResult(sig.id, "skipped", broken)
            continue
        local: CollectiveResult
        if isinstance(plan, str):
            local = CollectiveResult(sig.id, "skipped", f"collective: {plan}")
        elif snap is None:
            local = CollectiveResult(sig.id, "skipped", "collective: inputs not captured")
        else:
            kind, must_match = plan
            args, _ = snap.arguments()
            size = _group_size(_group_arg(kind, args))
            if size != world.world_size:
                why = "its process group no longer exists" if size is None else f"on a subgroup of {size} ranks"
                local = CollectiveResult(sig.id, "skipped", f"collective {why}: not replayed")
            else:
                if stall is not None and int(stall) == world.rank and i == 0:
                    time.sleep(timeout_s * 2)
                if channel.store.check([f"fail/{i}"]):
                    local = CollectiveResult(sig.id, "skipped", "timeout")
                else:
                    local = _replay_one(channel, i, kind, must_match, sig, snap, reps, group)
        try:
            everyone = channel.exchange(f"c/{i}", local.to_json(), timeout_s * 3)
        except RankTimeout as e:
            broken = f"not replayed: rank(s) {', '.join(map(str, e.missing))} stopped answering"
            results[sig.id] = CollectiveResult(sig.id, "skipped", "timeout")
            continue
        results[sig.id] = _agree(local, everyone)
        if results[sig.id].status != "ok" and local.status == "ok" or results[sig.id].reason == "timeout":
            broken = "not replayed: an earlier collective replay failed"
        if on_progress is not None:
            on_progress(i + 1, common)
    return results, mismatch


def _replay_one(channel: Channel, i: int, kind: str, must_match: bool, sig: RecordedSignature,
                snap: Snapshot, reps: int, group: Callable[[], Any]) -> CollectiveResult:
    try:
        ratios, dig, max_diff, frac, _ = _runs(kind, group(), snap, reps)
    except Exception as e:  # a failing collective is an observation, not a crash
        text = f"{type(e).__name__}: {e}"
        reason = "timeout" if "timeout" in text.lower() or "timed out" in text.lower() else \
            f"replay failed: {text.splitlines()[0][:200]}"
        channel.store.set(f"fail/{i}", reason)
        return CollectiveResult(sig.id, "skipped", reason)
    return CollectiveResult(sig.id, "ok", "", ratios[0], ratios[1], max_diff, frac, dig, must_match)


def _agree(local: CollectiveResult, everyone: dict[int, Any]) -> CollectiveResult:
    """The same conclusion on every rank: skipped everywhere if it failed anywhere, and the cross-rank check."""
    failed = {r: v for r, v in everyone.items() if v["status"] != "ok"}
    if failed:
        reasons = {v["reason"] for v in failed.values()}
        reason = "timeout" if "timeout" in reasons else sorted(reasons)[0]
        if len(failed) < len(everyone) and reason != "timeout":
            reason = f"{reason} (on rank {min(failed)})"
        return CollectiveResult(local.id, "skipped", reason)
    if not local.must_match:
        return local
    digests = {r: v["digest"] for r, v in everyone.items()}
    if len(set(digests.values())) == 1:
        return CollectiveResult(**{**local.to_json(), "cross_rank": "identical"})
    groups: dict[str, list[int]] = {}
    for r, d in sorted(digests.items()):
        groups.setdefault(d, []).append(r)
    text = " vs ".join("ranks " + ",".join(map(str, rs)) for rs in groups.values())
    return CollectiveResult(**{**local.to_json(), "cross_rank": f"differs: {text}"})
