"""What every ``opaudit`` command shares: exit codes, the one-line usage error, argument types, the
output options and their check, and SIGINT, SIGTERM and SIGHUP raised as interrupts.

The bottom of :mod:`opaudit.cli`: it imports no other module of it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opaudit.data.errors import EXIT_ERROR as EXIT_ERROR  # re-exported: the exit codes live here
from opaudit.data.errors import OpauditError
from opaudit.data.errors import Terminated as Terminated  # re-exported: SIGTERM's interrupt, raised here
from opaudit.data.errors import interruption as interruption  # re-exported: how messages name an interrupt

EXIT_OK, EXIT_FINDINGS, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_HUNG_UP = 0, 1, 130, 143, 129
MAX_SECONDS = 1e6
"""Longest time limit accepted (11.6 days): waits past ~24 days overflow the OS's poll timeout."""


class UsageError(OpauditError):
    """Bad command-line input (exit 2)."""


class HungUp(Terminated):
    """SIGHUP (the terminal or the ssh session went away): handled like SIGTERM; the exit code is 129."""


_RAISED = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}
if hasattr(signal, "SIGHUP"):
    _RAISED[signal.SIGHUP] = HungUp
_received: list[int] = []
"""The signals that arrived while :func:`interrupts` was active, first first."""


def _on_signal(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise _RAISED[signum]()


@contextlib.contextmanager
def interrupts() -> Any:
    """While a command runs (main thread only): SIGINT, SIGTERM and SIGHUP raise :class:`KeyboardInterrupt`,
    :class:`Terminated` and :class:`HungUp`, and each is remembered (see :func:`raise_if_signalled`).

    A signal the process started with ignored stays ignored (the Unix convention, which
    Python follows for SIGINT at startup): ``nohup`` ignores SIGHUP, and a shell without
    job control starts a background job with SIGINT ignored, so that a Ctrl-C meant for
    the foreground does not stop it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {signum: signal.signal(signum, _on_signal) for signum in _RAISED
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def raise_if_signalled() -> None:
    """Raise the interrupt of a signal that arrived while :func:`interrupts` was active, if one did.

    For the places a command claims to be complete: an interrupt raised where
    something swallows it (torch's C++ import of NumPy clears any Python error,
    and goes on without NumPy) must still end the command with 130, 143 or 129.
    """
    if _received:
        raise _RAISED[_received[0]]()


def interrupted_code(e: BaseException) -> int:
    """The exit code of an interrupted command: 129 after SIGHUP, 143 after SIGTERM, else 130."""
    if isinstance(e, HungUp):
        return EXIT_HUNG_UP
    return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) raised as :class:`UsageError`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def bounded_int(text: str, minimum: int | None, expected: str, too_small: str = "", hint: str = "",
                maximum: int | None = None) -> int:
    """``text`` as an integer from ``minimum`` to ``maximum``, else an ``ArgumentTypeError`` that says what was
    expected (``too_small`` is formatted with the value ``v``)."""
    try:
        v = int(text)
    except ValueError:
        digits = text.strip()
        if digits.lstrip("+-").isdigit():  # past int()'s 4300 digits
            bound = minimum if digits.startswith("-") else maximum
            if bound is not None:
                side = "least" if digits.startswith("-") else "most"
                raise argparse.ArgumentTypeError(f"must be at {side} {bound:,}, got a {len(digits)}-digit number") \
                    from None
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text[:40]!r}{hint}") from None
    if minimum is not None and v < minimum:
        raise argparse.ArgumentTypeError(too_small.format(v=v))
    if maximum is not None and v > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum:,}, got {_short(v)}")
    return v


def _short(v: int) -> str:
    text = str(v)
    return text if len(text) <= 24 else f"a {len(text)}-digit number"


def bounded(maximum: int) -> Any:
    """An argparse type: an integer from 1 to ``maximum``."""
    def parse(text: str) -> int:
        return bounded_int(text, 1, "a positive integer", "must be at least 1, got {v}", maximum=maximum)

    parse.__name__ = f"integer up to {maximum}"
    return parse


MAX_REPS = 10_000
"""Most replays per mode: each signature runs twice this many times."""
MAX_THREADS = 1024
"""Most intra-op threads (``--threads``): torch.set_num_threads(100000) crashes the process."""
MAX_COUNT = 1_000_000_000
"""Most steps, samples or anything else counted."""
MAX_BUDGET_MIB = 2**24
"""Largest ``--capture-budget``: 16 TiB."""
MAX_CAPTURES = 1000
"""Most captures per signature."""
MAX_PROCESSES = 1024
"""Most processes per node (``--nproc-per-node``)."""
MAX_STRESS_ELEMENTS = 2**31 - 1
"""Largest catalog stress sample, in elements (8 GiB of float32)."""


def positive_int(text: str) -> int:
    """An integer, 1 or more (``--reps``, ``--threads``...)."""
    return bounded_int(text, 1, "a positive integer", "must be at least 1, got {v}", maximum=MAX_COUNT)


def positive_float(text: str) -> float:
    """A number of seconds above 0 (``--op-timeout``...)."""
    return _seconds(text, zero=False)


def non_negative_float(text: str) -> float:
    """A number of seconds, 0 or more (``--race-seconds``: 0 turns it off)."""
    return _seconds(text, zero=True)


def _seconds(text: str, zero: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (v >= 0 if zero else v > 0):
        raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'positive'}, got {text}")
    if not math.isfinite(v) or v > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be a number of seconds up to {MAX_SECONDS:g}, got {text}")
    return v


SEED_RANGE = (-(2**63), 2**64 - 1)
"""What ``torch.manual_seed`` accepts."""


def integer(text: str) -> int:
    """A seed (``--seed``): an integer ``torch.manual_seed`` accepts."""
    return bounded_int(text, SEED_RANGE[0], "an integer", f"must be at least {SEED_RANGE[0]:,}, got {{v}}",
                       maximum=SEED_RANGE[1])


MAX_RUNS = 1000
"""Most whole-step runs per mode for ``--run-check``."""


def run_count(text: str) -> int:
    """``--run-check K``: 2 runs or more."""
    return bounded_int(text, 2, "a number of runs", "needs at least 2 runs to compare, got {v}",
                       " (put the script before --run-check, or write --run-check=K)", maximum=MAX_RUNS)


def non_negative_int(text: str) -> int:
    """An integer, 0 or more (``--start-step``, ``--batch-dim``)."""
    return bounded_int(text, 0, "an integer", "must be 0 or more, got {v}", maximum=MAX_COUNT)


def file_name(text: str) -> str:
    """A path given on the command line: an empty one is refused, not taken for "none" or the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a file name, got {text!r}")
    return text


def add_output_options(p: argparse.ArgumentParser, output: str, *, formats: Sequence[str] = (),
                       default: str = "table", required: bool = False, quiet: str = "no summary on stderr",
                       debug: str = "show full tracebacks on errors") -> None:
    """Add the options every command shares, as the "output" group of its ``--help``: ``-o/--output`` (``output``
    is its help), ``--format`` when the command writes a document in one of ``formats`` (to stdout in ``default``
    without ``-o``), ``-q/--quiet`` (``quiet`` says what it silences) and ``--debug``."""
    group = p.add_argument_group("output")
    group.add_argument("-o", "--output", type=file_name, metavar="PATH", required=required, help=output)
    if formats:
        group.add_argument("--format", metavar="FMT", help=f"{', '.join(formats[:-1])} or {formats[-1]} "
                                                            f"(default: from -o, else {default})")
    group.add_argument("-q", "--quiet", action="store_true", help=quiet)
    group.add_argument("--debug", action="store_true", help=debug)


EMPTY_FAIL_ON = "empty: 'none' never fails (an empty list is refused: an unset variable would turn the gate off)"
"""Why ``--fail-on ''`` is refused."""


def check_output(path: str | None, inputs: Mapping[str, str | None] | None = None) -> str | None:
    """Absolute output path, checked writable before any work is done; refused when it is one of ``inputs``.

    ``inputs`` maps how an error names each input (``"the --against catalog"``) to
    its path. The output, or the stdout that the document goes to without ``-o``,
    must not be any of them, by path, symlink or hard link (the same inode): it
    would be replaced by the document made from it.
    """
    from opaudit.data.fileio import check_writable, same_file

    target = os.path.abspath(path) if path is not None else None
    for name, source in (inputs or {}).items():
        if source is None:
            continue
        if target is None:
            if os.path.exists("/dev/stdout") and same_file("/dev/stdout", source):
                raise UsageError(f"stdout is the same file as {name} ({source}): refusing to overwrite an input")
        elif same_file(target, source):
            raise UsageError(f"-o {path} is the same file as {name} ({source}): refusing to overwrite an input")
    if target is not None:
        check_writable(target)
    return target
