"""A two-tower recommender trained for one step: opaudit's quick-start example.

The user and item embeddings are looked up by advanced indexing
(``self.users[user_ids]``). On CPU the backward of that lookup is an
``index_put`` with ``accumulate=True`` over repeated ids, which adds the
gradients in a thread-dependent order: its bits change from run to run unless
``torch.use_deterministic_algorithms(True)`` is on.

    opaudit opaudit/examples/recommender.py

Set ``OPAUDIT_DEVICE=cuda`` to run it on a GPU.
"""

import os

import torch
from torch import nn

N_USERS, N_ITEMS, DIM, BATCH = 2_000, 5_000, 32, 65_536
DEVICE = torch.device(os.environ.get("OPAUDIT_DEVICE", "cpu"))


class TwoTower(nn.Module):
    """User and item towers over embedding tables, scored by a dot product."""

    def __init__(self) -> None:
        super().__init__()
        self.users = nn.Parameter(torch.randn(N_USERS, DIM) * 0.1)
        self.items = nn.Parameter(torch.randn(N_ITEMS, DIM) * 0.1)
        self.mlp = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, DIM))

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        u = self.mlp(self.users[user_ids])
        v = self.items[item_ids]
        return (u * v).sum(-1)


torch.manual_seed(0)
model = TwoTower().to(DEVICE)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
# Popular users and items appear many times in a batch: the ids collide.
user_ids = torch.randint(0, N_USERS, (BATCH,)).to(DEVICE)
item_ids = torch.randint(0, N_ITEMS, (BATCH,)).to(DEVICE)
clicks = torch.rand(BATCH).round().to(DEVICE)


def opaudit_step() -> torch.Tensor:
    """One training step: forward, loss, backward, optimizer step."""
    optimizer.zero_grad()
    logits = model(user_ids, item_ids)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, clicks)
    loss.backward()
    optimizer.step()
    return loss


if __name__ == "__main__":
    print(f"loss {opaudit_step().item():.4f}")
