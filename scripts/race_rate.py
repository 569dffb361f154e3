"""How often two runs of a racy CPU kernel give the same bits: the numbers behind the suite's race tests.

    python scripts/race_rate.py [--trials 30] [--threads 2]

A thread race shows only when the threads really run side by side; on a loaded
machine it can hide. The tests that assert a real race (``diverges`` on
``index_put_(accumulate=True)``, a whole step that is not reproducible) size their
inputs and replays from these rates. Run it with other work beside it to see the
rate a loaded CI machine gets, e.g. two busy processes:

    python -c 'while True: pass' & python -c 'while True: pass' &
    python scripts/race_rate.py
    kill %1 %2

For each workload it prints how many of ``--trials`` pairs of runs were bitwise
identical (the race missed). A test that compares R runs with the first misses the
race only if R-1 pairs all do.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

N = 3_000_000
"""The test zoo's size for accumulation races (tests/fixtures/models.py, N_ACC)."""


def workloads() -> dict[str, Callable[[], torch.Tensor]]:
    """The racy kernels the suite relies on, on the suite's own sizes."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 1000, (N,), generator=g)
    vals = torch.randn(N, generator=g) * torch.logspace(-3, 3, N)
    rows = torch.randint(0, 64, (N,), generator=g)
    src = torch.randn(N, 4, generator=g)
    # The quick-start example's lookups (opaudit/examples/recommender.py): their backward.
    users, items = torch.randint(0, 2_000, (65_536,), generator=g), torch.randint(0, 5_000, (65_536,), generator=g)
    grads = torch.randn(65_536, 32, generator=g) * 1e-5
    # The run check's table (tests/test_runcheck.py COLLIDE): 400,000 ids into 64 rows of 8.
    ids, wide = torch.randint(0, 64, (400_000,), generator=g), torch.randn(400_000, 8, generator=g)
    return {
        "index_put_(accumulate=True), 3M into 1000": lambda: torch.zeros(1000).index_put_((idx,), vals, accumulate=True),
        "put_(accumulate=True), 3M into 1000": lambda: torch.zeros(1000).put_(idx, vals, accumulate=True),
        "index_copy_, 3M rows into 64 (last writer)": lambda: torch.zeros(64, 4).index_copy_(0, rows, src),
        "recommender users backward": lambda: torch.zeros(2_000, 32).index_put_((users,), grads, accumulate=True),
        "recommender items backward": lambda: torch.zeros(5_000, 32).index_put_((items,), grads, accumulate=True),
        "run-check table backward, 400k x 8 into 64": lambda: torch.zeros(64, 8).index_put_((ids,), wide,
                                                                                            accumulate=True),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (``-0.0 != 0.0``)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=30, help="pairs of runs per workload (default 30)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, as the suite sets them (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name, run in workloads().items():
        same, t0 = 0, time.perf_counter()
        for _ in range(args.trials):
            same += same_bits(run(), run())
        ms = (time.perf_counter() - t0) / (2 * args.trials) * 1e3
        print(f"{name:45s} identical pairs {same:3d}/{args.trials}  ({ms:.0f} ms a run)", flush=True)


if __name__ == "__main__":
    main()
