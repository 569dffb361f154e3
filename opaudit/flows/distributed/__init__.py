"""Distributed audits: torchrun jobs audited rank by rank and merged into one report.

* :mod:`.comm`: the ranks' private channel over torchrun's store, with time limits;
* :mod:`.collectives`: recorded collectives replayed in lockstep on every rank;
* :mod:`.replicas`: what DDP keeps replicated, compared across ranks by digest;
* :mod:`.merge`: the ranks' reports merged into one (pure data);
* :mod:`.rank`: one rank's part, and rank 0's merge;
* :mod:`.launch`: ``opaudit --nproc-per-node N``, through ``torch.distributed.run``.

Nothing here is imported on the single-process path.
"""

from __future__ import annotations

from opaudit.flows.distributed.comm import DistributedError, World, world_from_env

__all__ = ["DistributedError", "World", "world_from_env"]
