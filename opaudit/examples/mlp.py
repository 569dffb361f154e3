"""A clean MLP classifier with dropout, trained for one step.

Nothing here raises or diverges; dropout draws from the RNG and is reported
``random`` (identical once seeded).

    opaudit opaudit/examples/mlp.py
"""

import os

import torch
from torch import nn

DEVICE = torch.device(os.environ.get("OPAUDIT_DEVICE", "cpu"))

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10)).to(DEVICE)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(32, 64, device=DEVICE)
y = torch.randint(0, 10, (32,), device=DEVICE)


def opaudit_step() -> torch.Tensor:
    """One training step."""
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


if __name__ == "__main__":
    print(f"loss {opaudit_step().item():.4f}")
