"""The command line's distributed half: options, the ``--nproc-per-node`` shortcut, and rank 0's exit status.

Its options are part of every audit's parser, so this module imports nothing of
:mod:`opaudit.flows.distributed` (nor ``torch.distributed``) until a distributed
option is given or the process runs under torchrun (``TORCHELASTIC_RUN_ID`` is
set): the single-process path never loads them.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from opaudit.cli.options import MAX_PROCESSES, UsageError, bounded, positive_float


def under_torchrun() -> bool:
    """True in a worker started by torchrun (``torch.distributed.run``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The audit parser's distributed options."""
    p.add_argument("--nproc-per-node", type=bounded(MAX_PROCESSES), metavar="N",
                   help="audit a distributed job: launch N ranks through torch.distributed.run (torchrun); each "
                        "rank records and replays its own ops, rank 0 writes one merged report")
    p.add_argument("--per-rank-reports", metavar="DIR",
                   help="under torchrun, also write each rank's own report to DIR/rank-N.yaml")
    p.add_argument("--dist-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                   help="under torchrun, time limit for each exchange between ranks and each collective replay "
                        "(default 60); a rank that does not answer in time is reported, not waited for")


def without_option(own: list[str], rest: list[str] | None, name: str) -> list[str]:
    """The command line without ``name VALUE`` / ``name=VALUE`` among opaudit's own options."""
    out, skip = [], False
    for a in own:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out + (["--", *rest] if rest is not None else [])


def rank_audit(args: argparse.Namespace) -> Any:
    """The distributed half of the audit when this process is a torchrun worker, else ``None``."""
    if args.per_rank_reports and not os.path.isdir(args.per_rank_reports):
        raise UsageError(f"--per-rank-reports: {args.per_rank_reports} is not a folder")
    if not under_torchrun():
        if args.per_rank_reports and not args.nproc_per_node:
            raise UsageError("--per-rank-reports needs a distributed run (--nproc-per-node N, or torchrun)")
        return None  # --nproc-per-node: this process launches the ranks, which take the option
    if args.nproc_per_node:
        raise UsageError("--nproc-per-node: already running under torchrun (drop the option)")
    from opaudit.flows.distributed import world_from_env
    from opaudit.flows.distributed.rank import RankAudit

    world = world_from_env()
    if world is None:
        return None
    if world.rank != 0:
        args.quiet = True
    return RankAudit(world, timeout_s=args.dist_timeout, per_rank_dir=args.per_rank_reports,
                     root=os.path.dirname(os.path.abspath(args.script)))


def replicas_differ(report: Any) -> bool:
    """DDP replicas that part across ranks (they fail the audit like a failing verdict)."""
    return bool((report.distributed.get("replicas") or {}).get("differing"))


def rank0_status(code: int) -> int:
    """Under the shortcut, rank 0 hands its exit code over in a file and exits 0.

    torchrun takes any non-zero exit (1 = findings) for a crashed worker.
    """
    from opaudit.flows.distributed.launch import STATUS_ENV

    path = os.environ.get(STATUS_ENV)
    if not path or not under_torchrun():
        return code
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{code}\n")
    return 0
