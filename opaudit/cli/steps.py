"""The step-window options of ``opaudit SCRIPT``: ``--steps``, ``--start-step``, ``--max-record-seconds``.

Kept out of :mod:`opaudit.cli.main`; the mechanism behind them is
:mod:`opaudit.engine.window`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from opaudit.cli.options import MAX_COUNT, bounded_int, non_negative_int, positive_float

if TYPE_CHECKING:
    from opaudit.engine.window import Window


def steps(text: str) -> int | None:
    """``--steps``: a positive number of steps, or ``all`` (``None``: the whole script)."""
    if text.strip().lower() == "all":
        return None
    return bounded_int(text, 1, "a number of steps or 'all'", "must be at least 1 (or 'all'), got {v}",
                       maximum=MAX_COUNT)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The audit parser's window options, and ``--no-deterministic-pass``."""
    from opaudit.engine.window import DEFAULT_ENTRY_CALLS, DEFAULT_STEPS  # torch: only once a command runs

    p.add_argument("--steps", type=steps, default=argparse.SUPPRESS, metavar="N",
                   help=f"optimizer steps to record, then stop the script (default {DEFAULT_STEPS}; 'all' for the "
                        f"whole script); with an entry function, calls of it (default {DEFAULT_ENTRY_CALLS})")
    p.add_argument("--start-step", type=non_negative_int, default=0, metavar="K",
                   help="run the first K steps unrecorded, at full speed, then record (default 0)")
    p.add_argument("--max-record-seconds", type=positive_float, metavar="S",
                   help="stop recording, and the script, after S seconds (for scripts without an optimizer)")
    p.add_argument("--no-deterministic-pass", action="store_true",
                   help="record the steps once only; by default they are recorded again under "
                        "use_deterministic_algorithms(True, warn_only=True) and the crash list comes from what "
                        "that run really calls")


def window(args: argparse.Namespace, target: Any) -> "Window":
    """The step window the options ask for (the default is :func:`~opaudit.engine.window.window_for`'s)."""
    from opaudit.engine.window import DEFAULT, window_for

    return window_for(target.entry is not None, getattr(args, "steps", DEFAULT), start=args.start_step,
                      max_seconds=args.max_record_seconds)
