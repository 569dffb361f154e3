"""A small segmentation network trained for one step: convolutions, batch norm,
bilinear upsampling, max-unpooling in the decoder.

On CPU: ``max_unpool2d`` has no deterministic implementation on any device, so
``torch.use_deterministic_algorithms(True)`` would crash this run; everything
else is stable. On CUDA (``OPAUDIT_DEVICE=cuda``) the convolutions are cuDNN's
(replayed under each ``cudnn.deterministic`` / ``benchmark`` setting), and the
backward of bilinear upsampling has no deterministic kernel either.

    opaudit opaudit/examples/segmenter.py
"""

import os

import torch
from torch import nn
from torch.nn import functional as F

DEVICE = torch.device(os.environ.get("OPAUDIT_DEVICE", "cpu"))


class Segmenter(nn.Module):
    """Encoder (conv, BN, max-pool with indices) and decoder (unpool, bilinear upsample)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        pooled, idx = F.max_pool2d(h, 2, return_indices=True)
        h = F.max_unpool2d(self.mid(pooled), idx, 2)
        low = F.avg_pool2d(h, 2)
        h = h + F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(h)


torch.manual_seed(0)
model = Segmenter().to(DEVICE)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
images = torch.randn(4, 3, 64, 64, device=DEVICE)
labels = torch.randint(0, 4, (4, 64, 64), device=DEVICE)


def opaudit_step() -> torch.Tensor:
    """One training step."""
    optimizer.zero_grad()
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss


if __name__ == "__main__":
    print(f"loss {opaudit_step().item():.4f}")
