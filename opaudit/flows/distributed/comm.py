"""How the ranks of a torchrun job talk to each other: torchrun's own store, with time limits.

opaudit never touches the user's process groups. Under torchrun every worker can
reach the elastic agent's TCPStore (``MASTER_ADDR:MASTER_PORT``, with
``TORCHELASTIC_USE_AGENT_STORE=True``), the same store ``init_process_group``
uses; :func:`torch.distributed.rendezvous` connects to it. opaudit works under its
own key prefix there, so its traffic never mixes with the user's collectives, and
it works whether or not the script ever initialised a process group.

Exchanges are JSON (never pickle): a rank can only send data, not code. Every wait
has a time limit; a rank that does not answer in time is reported, never waited
for forever.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from opaudit.data.errors import OpauditError

_WAIT_SLICE_S = 0.5
"""Longest single wait on the store: signals (torchrun's SIGTERM) are handled between slices."""


class DistributedError(OpauditError):
    """A distributed audit cannot be set up or its ranks cannot agree (exit 2)."""


class RankTimeout(DistributedError):
    """Some ranks did not answer within the time limit."""

    def __init__(self, what: str, missing: Sequence[int]) -> None:
        super().__init__(f"{what}: no answer from rank(s) {', '.join(map(str, missing))} in time")
        self.missing = tuple(missing)


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job, read from the environment torchrun sets."""

    rank: int
    world_size: int
    local_rank: int
    run_id: str
    """torchrun's ``TORCHELASTIC_RUN_ID`` plus the restart count: keys of one attempt never meet another's."""


def world_from_env(env: dict[str, str] | None = None) -> World | None:
    """The :class:`World` when running under torchrun, else ``None`` (the single-process path)."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env or "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise DistributedError("RANK, WORLD_SIZE or LOCAL_RANK is not an integer") from None
    run_id = f"{env['TORCHELASTIC_RUN_ID']}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return World(rank, size, local, run_id)


class Channel:
    """opaudit's private key space on torchrun's store: barriers and gathers of JSON values."""

    def __init__(self, world: World, timeout_s: float) -> None:
        self.world = world
        self.timeout_s = timeout_s
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
            raise DistributedError("opaudit needs torchrun's agent store (run under torchrun / torch.distributed.run)")
        try:
            store, _, _ = next(dist.rendezvous("env://", rank=world.rank, world_size=world.world_size,
                                               timeout=datetime.timedelta(seconds=timeout_s)))
        except Exception as e:  # any failure to reach the store is the same error to the user
            raise DistributedError(f"cannot reach torchrun's store: {type(e).__name__}: {e}") from e
        self.store = dist.PrefixStore(f"opaudit/{world.run_id}/", store)

    def _wait(self, keys: list[str], timeout_s: float, what: str, ranks: Sequence[int]) -> None:
        # In short slices: a store wait blocks in C++, where Python's signal handlers cannot run. torchrun
        # stops the other ranks with SIGTERM when one fails, and waits 30 s before SIGKILL.
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                self.store.wait(keys, datetime.timedelta(seconds=max(min(left, _WAIT_SLICE_S), 0.001)))
                return
            except Exception:  # the store raises a timeout as a plain RuntimeError/DistStoreError
                if left > _WAIT_SLICE_S:
                    continue
                missing = [r for r, k in zip(ranks, keys) if not self.store.check([k])]
                raise RankTimeout(what, missing or list(ranks)) from None

    def post(self, key: str, value: Any) -> None:
        """Publish this rank's ``value`` under ``key``."""
        self.store.set(f"{key}/{self.world.rank}", json.dumps(value, sort_keys=True))

    def gather(self, key: str, timeout_s: float | None = None, ranks: Sequence[int] | None = None
               ) -> dict[int, Any]:
        """Every rank's value under ``key``; :class:`RankTimeout` names the ranks that did not post."""
        ranks = list(range(self.world.world_size)) if ranks is None else list(ranks)
        keys = [f"{key}/{r}" for r in ranks]
        self._wait(keys, self.timeout_s if timeout_s is None else timeout_s, key, ranks)
        return {r: json.loads(self.store.get(k)) for r, k in zip(ranks, keys)}

    def gather_available(self, key: str, timeout_s: float | None = None) -> tuple[dict[int, Any], list[int]]:
        """Like :meth:`gather`, but returns what arrived in time and the ranks that were missing."""
        try:
            return self.gather(key, timeout_s), []
        except RankTimeout as e:
            got = [r for r in range(self.world.world_size) if r not in e.missing]
            return (self.gather(key, 0.1, got) if got else {}), list(e.missing)

    def exchange(self, key: str, value: Any, timeout_s: float | None = None) -> dict[int, Any]:
        """Post ``value`` and return every rank's (an all-gather of JSON values)."""
        self.post(key, value)
        return self.gather(key, timeout_s)

    def process_group(self, timeout_s: float) -> Any:
        """A private gloo process group over every rank, for replaying collectives.

        Built straight from the store, never registered as the default group: the
        user's groups (and whether the script made any) are left alone.
        """
        try:
            return dist.ProcessGroupGloo(dist.PrefixStore("pg/", self.store), self.world.rank,
                                         self.world.world_size, datetime.timedelta(seconds=timeout_s))
        except Exception as e:
            raise DistributedError(f"cannot create opaudit's gloo group: {type(e).__name__}: {e}") from e
