"""The ``--batch-invariance`` options of ``opaudit SCRIPT``: their argument types and the check behind them.

Kept out of :mod:`opaudit.cli.main`, which turns the result into output and an exit code.
"""

from __future__ import annotations

import argparse
from typing import Any

CONFLICTS = ("run_check", "against", "entry", "isolate", "op_timeout")
"""Options of an audit that make no sense with ``--batch-invariance`` (attribute names)."""


def row_counts(text: str) -> tuple[int, ...]:
    """``1,2,3`` → row counts (each checked against the batch once it is known)."""
    parts = [t.strip() for t in text.split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError("expected comma-separated row counts, e.g. 1,2,3")
    out = []
    for t in parts:
        try:
            out.append(int(t))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated row counts, got {t!r} in {text!r}") from None
    return tuple(out)




def run(args: argparse.Namespace, script_args: list[str]) -> Any:
    """Check the script's ``opaudit_forward(opaudit_batch())``; the report holding the ``batch_invariance`` section."""
    import torch

    from opaudit.engine import loader
    from opaudit.flows.batchinv import DEFAULT_ROWS, batch_report, check_script

    if args.threads:
        torch.set_num_threads(args.threads)
    target = loader.load_target(args.script, None, script_args)
    dim = args.batch_dim if args.batch_dim is not None else 0
    result = check_script(target, args.batch_sizes or DEFAULT_ROWS, dim, seed=args.seed)
    return batch_report(result, {"script": target.name, "entry": "opaudit_forward"})
