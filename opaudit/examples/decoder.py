"""A small decoder-only language model (random weights, no download), checked for batch invariance.

A serving stack batches requests together; this checks whether request 0's
next-token logits depend on how many other requests share its batch:

    opaudit opaudit/examples/decoder.py --batch-invariance --batch-sizes 1,2,7

``opaudit_batch()`` is a batch of 8 prompts of 6 tokens; ``opaudit_forward``
returns the logits of the last position. On CPU the projections (``nn.Linear``
over ``B*T`` rows) pick their blocking by row count, so a request gets other
bits alone than in a batch of 8.
"""

import os

import torch
from torch import nn
from torch.nn import functional as F

DEVICE = torch.device(os.environ.get("OPAUDIT_DEVICE", "cpu"))
VOCAB, DIM, HEADS, LAYERS, CONTEXT = 96, 64, 4, 2, 6


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.up, self.down = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(DIM, dim=-1)
        q, k, v = (z.view(b, t, HEADS, DIM // HEADS).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, DIM))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Decoder(nn.Module):
    """Token and position embeddings, blocks, a final norm and the LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(CONTEXT, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x[:, -1]))


torch.manual_seed(0)
model = Decoder().to(DEVICE).eval()


def opaudit_batch() -> torch.Tensor:
    """8 prompts of 6 tokens: the batch a serving step would run."""
    return torch.randint(0, VOCAB, (8, CONTEXT), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def opaudit_forward(ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits of every prompt in the batch."""
    return model(ids)


def _best_time(fn, ids: torch.Tensor, reps: int = 200) -> float:
    """Fastest of ``reps`` calls, in seconds (the least disturbed by other work on the machine)."""
    import time

    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn(ids)
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    # The remedy, measured: pad a lone request to the batch size with dummy prompts.
    ids = opaudit_batch()
    one = ids[:1]
    padded = torch.cat([one, torch.zeros(7, CONTEXT, dtype=ids.dtype, device=ids.device)])
    with torch.no_grad():
        batched = opaudit_forward(ids)[:1]
        alone, pad = opaudit_forward(one), opaudit_forward(padded)[:1]
        cost = _best_time(opaudit_forward, padded) / _best_time(opaudit_forward, one)
    print(f"request 0 alone vs in a batch of 8: bitwise equal: {torch.equal(alone, batched)}, "
          f"max |diff| {(alone - batched).abs().max().item():.3g}")
    print(f"request 0 padded to 8 rows vs in a batch of 8: bitwise equal: {torch.equal(pad, batched)}; "
          f"padding costs {cost:.2f}x the lone request's forward time")
