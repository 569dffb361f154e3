"""``opaudit --nproc-per-node N SCRIPT ...``: the same audit, launched through ``torch.distributed.run``.

The shortcut builds torchrun's own command line (``--standalone --nproc-per-node
N -m opaudit SCRIPT ...``) and hands it to ``torch.distributed.run.run``: the
workers are exactly what ``torchrun --nproc-per-node N -m opaudit SCRIPT ...``
starts. torchrun counts any non-zero exit as a failed worker and tears the job
down, so rank 0 reports "findings" (exit 1) through a status file instead, and
exits 0; real failures keep their exit codes and torchrun's fail-fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile

from opaudit.data.errors import OpauditError

STATUS_ENV = "OPAUDIT_STATUS_FILE"
"""Set by the shortcut: rank 0 writes its exit code there."""


_HANDLED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, n))


class LaunchError(OpauditError):
    """The job failed: a rank raised, exited non-zero or was killed (exit 2)."""


def _describe(failure: object) -> str:
    code = getattr(failure, "exitcode", None)
    if isinstance(code, int) and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _accepts(parser: argparse.ArgumentParser, option: str) -> bool:
    return any(option in a.option_strings for a in parser._actions)


def launch(nproc: int, argv: list[str], monitor_interval: float = 0.2) -> int:
    """Run ``opaudit argv`` on ``nproc`` local ranks; rank 0's exit code, or :class:`LaunchError`."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    fd, status = tempfile.mkstemp(prefix="opaudit-status-", suffix=".txt")
    os.close(fd)
    parser = get_args_parser()
    # torchrun installs its handler for each signal it is told to handle, whatever this process inherited: a
    # signal it started with ignored (a background job's SIGINT, nohup's SIGHUP) stays ignored, as it does in a
    # single-process audit. (A torch without --signals-to-handle handles all four whatever they were.)
    kept = [s.name for s in _HANDLED_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
    handled = ["--signals-to-handle", ",".join(kept or ["SIGTERM"])] if _accepts(parser, "--signals-to-handle") else []
    args = parser.parse_args([
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--monitor-interval", str(monitor_interval), "--max-restarts", "0", *handled,
        "-m", "opaudit", *argv,
    ])
    # torchrun writes OMP_NUM_THREADS into this process's environment and installs its
    # own signal handlers; both are put back, so that a caller (a test run, a notebook) is left as it was.
    saved_env = dict(os.environ)
    saved_signals = {s: signal.getsignal(s) for s in _HANDLED_SIGNALS}
    os.environ[STATUS_ENV] = status
    os.environ.setdefault("LOGLEVEL", "WARNING")
    try:
        try:
            run(args)
        except ChildFailedError as e:
            first, failure = e.get_first_failure()
            others = sorted(r for r in e.failures if r != first)
            then = f"; torchrun then stopped rank(s) {', '.join(map(str, others))}" if others else ""
            raise LaunchError(f"the distributed audit failed: rank {first} {_describe(failure)} "
                              f"(see its message above){then}") from None
        except SignalException as e:
            raise LaunchError(f"the launcher got {signal.Signals(e.sigval).name}: the job was stopped") from None
        with open(status, encoding="utf-8") as f:
            text = f.read().strip()
        if not text:
            raise LaunchError("rank 0 finished without an exit status")
        return int(text)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in saved_signals.items():
            if handler is not None:
                signal.signal(sig, handler)
        try:
            os.unlink(status)
        except OSError:
            pass
        sys.stdout.flush()
