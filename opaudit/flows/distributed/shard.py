"""Catalog sweeps sharded over the ranks of a torchrun job.

``torchrun --nproc-per-node N -m opaudit catalog -o cat.yaml``: every rank
selects the same task list, sweeps every N-th task from its own offset on its
own device (``cuda:LOCAL_RANK`` for ``--device cuda``), keeping its own partial
file (``cat.yaml.partial.rank-R``, so ``--resume`` resumes each shard), and
sends its catalog to rank 0 through torchrun's store. Rank 0 merges them with
the same entry merge a single sweep uses, which does not depend on the order
ops were swept in: the merged catalog equals a single-process sweep on the same
machine in every field except timings.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

from opaudit.data.catalog import Catalog, catalog_from_dict, swept_order
from opaudit.flows.catalog.entries import CatalogError, merge_entries
from opaudit.flows.distributed.comm import Channel, World

STOP_ENV = "OPAUDIT_TEST_STOP_AFTER"
"""Fault injection for the test suite: ``R:N`` makes rank R send itself a real SIGINT (a Ctrl-C) once it has
swept N tasks; its shard is then interrupted like any other (partial file written, torchrun stops the others)."""

GATHER_TIMEOUT_S = 24 * 3600.0
"""How long rank 0 waits for the other shards: a shard's ops each have their own hard time limit, so this only
bounds a job whose ranks were given very different amounts of work; a rank that dies ends the job through torchrun."""

_MUST_AGREE = ("torch", "cuda", "cudnn", "gpu", "cpu", "platform", "threads")
"""Fingerprint fields every shard must share: a catalog describes one kind of machine."""


def shard_device(device: str, world: World) -> str:
    """Each rank on its own GPU: ``cuda`` becomes ``cuda:LOCAL_RANK``; anything else is kept."""
    return f"cuda:{world.local_rank}" if device == "cuda" else device


def shard_partial(partial: str, world: World) -> str:
    """This rank's own partial file."""
    return f"{partial}.rank-{world.rank}"


def with_test_stop(update: Callable[[Any], None] | None, world: World) -> Callable[[Any], None] | None:
    """``update`` (the progress callback), followed by :data:`STOP_ENV`'s interrupt where it names this rank."""
    spec = os.environ.get(STOP_ENV)
    if not spec:
        return update
    rank, after = (int(x) for x in spec.split(":"))
    if rank != world.rank:
        return update
    swept = [0]

    def stop_after(p: Any) -> None:
        if update is not None:
            update(p)
        swept[0] += 1
        if swept[0] >= after:
            os.kill(os.getpid(), signal.SIGINT)

    return stop_after


def merge_catalogs(parts: Sequence[Catalog]) -> Catalog:
    """One catalog from disjoint shards of one sweep (the first shard's environment, settings and
    batch-invariance probes)."""
    for key in _MUST_AGREE:
        values = [c.environment.get(key) for c in parts]
        if len({repr(v) for v in values}) > 1:
            shown = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise CatalogError(f"the ranks swept on different machines or software ({key}: {shown}): "
                               "a catalog describes one kind of machine")
    entries: dict[tuple, object] = {}
    for c in parts:
        for e in c.entries:
            entries[e.key] = merge_entries(entries[e.key], e) if e.key in entries else e  # type: ignore[arg-type]
    swept = {s.task_id: s for c in parts for s in c.swept}
    first = parts[0]
    return Catalog(environment=first.environment, settings=first.settings,
                   entries=tuple(entries[k] for k in sorted(entries)),  # type: ignore[misc]
                   swept=tuple(sorted(swept.values(), key=swept_order)),
                   complete=all(c.complete for c in parts),
                   batch_invariance=first.batch_invariance)  # probed on rank 0 only


def gather_catalog(world: World, catalog: Catalog, timeout_s: float) -> Catalog | None:
    """Send this shard to rank 0; the merged catalog on rank 0, ``None`` elsewhere."""
    channel = Channel(world, timeout_s)
    channel.post("catalog", catalog.to_dict())
    if world.rank != 0:
        return None
    parts = channel.gather("catalog", GATHER_TIMEOUT_S)
    return merge_catalogs([catalog_from_dict(parts[r], f"<rank {r} shard>") for r in sorted(parts)])
