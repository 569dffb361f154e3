"""The two-tower recommender, trained with DistributedDataParallel on gloo: the distributed example.

Each rank looks its own batch up in the embedding tables by advanced indexing
(``self.users[user_ids]``). The backward of that lookup is an ``index_put``
with ``accumulate=True`` over repeated ids, which on CPU adds the gradients in a
thread-dependent order: its bits change from run to run on every rank, and DDP's
all-reduce then spreads each rank's noise to all of them. The user tower also
has a plain ``BatchNorm1d``: without ``SyncBatchNorm`` its running statistics
come from each rank's own batch, so the replicas' buffers part after one step.

    torchrun --nproc-per-node 2 opaudit/examples/ddp_recommender.py      # train
    opaudit --nproc-per-node 2 --threads 2 opaudit/examples/ddp_recommender.py  # audit

(torchrun starts each rank with one thread; ``--threads 2`` gives the lookup's
backward the threads it races with.)
"""

import os

import torch
import torch.distributed as dist
from torch import nn

N_USERS, N_ITEMS, DIM, BATCH = 2_000, 5_000, 32, 32_768
"""BATCH is per rank."""


class TwoTower(nn.Module):
    """User and item towers over embedding tables, scored by a dot product."""

    def __init__(self) -> None:
        super().__init__()
        self.users = nn.Parameter(torch.randn(N_USERS, DIM) * 0.1)
        self.items = nn.Parameter(torch.randn(N_ITEMS, DIM) * 0.1)
        self.mlp = nn.Sequential(nn.Linear(DIM, DIM), nn.BatchNorm1d(DIM), nn.ReLU(), nn.Linear(DIM, DIM))

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        u = self.mlp(self.users[user_ids])
        v = self.items[item_ids]
        return (u * v).sum(-1)


dist.init_process_group("gloo")
RANK = dist.get_rank()
DEVICE = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if os.environ.get("OPAUDIT_DEVICE") == "cuda"
                      else "cpu")
torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them from rank 0)
model = nn.parallel.DistributedDataParallel(TwoTower().to(DEVICE))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
_g = torch.Generator().manual_seed(RANK)  # each rank its own shard of the data
user_ids = torch.randint(0, N_USERS, (BATCH,), generator=_g).to(DEVICE)
item_ids = torch.randint(0, N_ITEMS, (BATCH,), generator=_g).to(DEVICE)
clicks = torch.rand(BATCH, generator=_g).round().to(DEVICE)


def opaudit_step() -> torch.Tensor:
    """One DDP training step on this rank's own batch (what opaudit records)."""
    optimizer.zero_grad()
    loss = nn.functional.binary_cross_entropy_with_logits(model(user_ids, item_ids), clicks)
    loss.backward()
    optimizer.step()
    return loss


if __name__ == "__main__":
    loss = opaudit_step()
    if RANK == 0:
        print(f"loss {loss.item():.4f}")
    dist.destroy_process_group()
