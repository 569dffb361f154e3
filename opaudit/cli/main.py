"""Command line: ``opaudit SCRIPT``, ``opaudit catalog``, ``opaudit diff``, ``opaudit capture``, ``opaudit replay``,
``opaudit trace``, ``opaudit compare``.

The only place where errors become exit codes:

* 0: clean (no finding in ``--fail-on``), or ``--exit-zero``;
* 1: findings in ``--fail-on``;
* 2: usage, model-load, user-code, file-format or internal errors;
* 130: interrupted (a partial report marked ``complete: false`` is still written);
* 143: terminated by SIGTERM (a CI timeout): the same partial report as for Ctrl-C;
* 129: SIGHUP (the terminal went away): as for SIGTERM.

Reports go to ``-o FILE`` (written atomically, only once the analysis is done)
or to stdout; progress and the summary go to stderr.

This module is the audit command and the dispatcher; ``opaudit catalog``,
``opaudit diff``, ``opaudit capture``/``replay`` and ``opaudit trace``/``compare`` live in
:mod:`~opaudit.cli.catalog`, :mod:`~opaudit.cli.diff`, :mod:`~opaudit.cli.capsule` and :mod:`~opaudit.cli.trace`,
what they all share in :mod:`~opaudit.cli.options` and :mod:`~opaudit.cli.output`.
"""

from __future__ import annotations

import argparse
import errno
import gc
import io
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from opaudit.cli import batch, capsule, steps
from opaudit.cli.catalog import catalog_main
from opaudit.cli.diff import diff_main
from opaudit.cli.formats.escape import visible
from opaudit.cli.options import (
    EMPTY_FAIL_ON,
    EXIT_ERROR,
    EXIT_FINDINGS,
    EXIT_OK,
    MAX_BUDGET_MIB,
    MAX_CAPTURES,
    MAX_REPS,
    MAX_THREADS,
    Parser,
    UsageError,
    add_output_options,
    bounded,
    check_output,
    file_name,
    integer,
    interrupted_code,
    interrupts,
    non_negative_float,
    non_negative_int,
    positive_float,
    raise_if_signalled,
    run_count,
)
from opaudit.cli.output import check_format, emit, emit_partial, plain_progress, progress, run_check_progress
from opaudit.cli.trace import compare_main, trace_main
from opaudit.data.errors import OpauditError, interruption
from opaudit.data.fileio import shown_path
from opaudit.data.version import __version__

DEFAULT_FAIL_ON = "raises,diverges,diverges_deterministic"


NOT_REPRODUCIBLE = "not_reproducible"
NOT_REPRODUCIBLE_DETERMINISTIC = "not_reproducible_deterministic"
RUN_CHECK_FAILURES = {
    NOT_REPRODUCIBLE: ("default", "deterministic"),
    NOT_REPRODUCIBLE_DETERMINISTIC: ("deterministic",),
}
"""``--fail-on`` keywords for ``--run-check``: a whole-step check in one of these modes
that is NOT reproducible makes the exit code 1."""


def parse_verdicts(text: str) -> tuple:
    """``raises,diverges`` → verdicts (and run-check keywords); ``none`` → nothing fails (an empty list is
    refused, see :data:`~opaudit.cli.options.EMPTY_FAIL_ON`)."""
    from opaudit.data.verdict import Verdict

    if text.strip().lower() == "none":
        return ()
    if not text.replace(",", "").strip():
        raise argparse.ArgumentTypeError(EMPTY_FAIL_ON)
    out: list = []
    for t in (t.strip() for t in text.split(",")):
        if not t:
            continue
        if t in RUN_CHECK_FAILURES:
            out.append(t)
            continue
        try:
            out.append(Verdict.parse(t))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e}, or a --run-check keyword: {', '.join(RUN_CHECK_FAILURES)}") from None
    return tuple(out)


def _verdicts_only(fail_on: tuple) -> tuple:
    from opaudit.data.verdict import Verdict

    return tuple(v for v in fail_on if isinstance(v, Verdict))


def _failing_run_checks(report: Any, fail_on: tuple) -> list:
    modes = {m for k in fail_on if k in RUN_CHECK_FAILURES for m in RUN_CHECK_FAILURES[k]}
    return [r for r in report.run_checks if r.mode in modes and not r.reproducible]


def _audit_parser() -> Parser:
    p = Parser(
        prog="opaudit",
        description="Audit a PyTorch script for ops that raise, warn or give different bits under "
                    "torch.use_deterministic_algorithms. Subcommands: 'opaudit catalog', 'opaudit diff', "
                    "'opaudit capture', 'opaudit replay', 'opaudit trace', 'opaudit compare'.",
        epilog="Arguments after '--' are passed to the script as sys.argv[1:].",
    )
    p.add_argument("script", type=file_name, help="Python script to audit (runs as __main__, or its opaudit_step() is called)")
    p.add_argument("--entry", metavar="NAME", help="function of the script to record instead of opaudit_step")
    steps.add_arguments(p)
    p.add_argument("--reps", type=bounded(MAX_REPS), default=5, metavar="N", help="replays per mode (default 5)")
    p.add_argument("--seed", type=integer, default=0, metavar="S", help="seed set before the user's code and replays")
    p.add_argument("--run-check", nargs="?", const=2, type=run_count, metavar="K",
                   help="also run the whole step K times (default 2) from identical state, in default and in "
                        "deterministic mode, and report whether its bits reproduce and which op is the root cause")
    p.add_argument("--fresh-processes", type=run_count, metavar="K",
                   help="with --run-check: run the step K times per mode, each in a new process (opaudit trace), "
                        "and compare their traces: covers what a process chooses once (cuDNN's benchmarked "
                        "algorithm, hash seeds, addresses)")
    p.add_argument("--batch-invariance", action="store_true",
                   help="instead of an audit, check that opaudit_forward(batch)'s first b rows do not depend on the "
                        "rest of the batch: the script defines opaudit_batch() and opaudit_forward(batch); exit 1 "
                        "when a row count gives other bits")
    p.add_argument("--batch-sizes", type=batch.row_counts, metavar="LIST",
                   help="row counts checked with --batch-invariance (default 1,2,3)")
    p.add_argument("--batch-dim", type=non_negative_int, metavar="N", help="the batch dim for --batch-invariance (default 0)")
    add_output_options(p, "write the report here (format from the extension)",
                       formats=("yaml", "json", "csv", "md", "html", "sarif", "table"),
                       quiet="no progress bar and no summary on stderr")
    p.add_argument("--fail-on", type=parse_verdicts, default=parse_verdicts(DEFAULT_FAIL_ON), metavar="LIST",
                   help=f"verdicts that make the exit code 1 (default {DEFAULT_FAIL_ON}; 'none' for never); with "
                        f"--run-check also '{NOT_REPRODUCIBLE}' (either mode) or '{NOT_REPRODUCIBLE_DETERMINISTIC}'")
    p.add_argument("--exit-zero", action="store_true", help="exit 0 even when findings match --fail-on")
    p.add_argument("--against", type=file_name, metavar="CATALOG",
                   help="predict each recorded op's verdict on the hardware CATALOG was built on (ops it lacks "
                        "are 'unknown'); --fail-on then applies to the predicted verdicts")
    p.add_argument("--capture-budget", type=bounded(MAX_BUDGET_MIB), default=2048, metavar="MIB",
                   help="memory for captured op inputs, in MiB (default 2048); ops past it are skipped")
    p.add_argument("--captures-per-signature", type=bounded(MAX_CAPTURES), default=4, metavar="M",
                   help="for ops whose nondeterminism depends on index collisions (index_put_, scatter_add_, "
                        "embedding backward...), replay up to M of each signature's calls, spread over the "
                        "recorded steps, within --capture-budget (default 4; 1: the first call only, like every "
                        "other op)")
    p.add_argument("--threads", type=bounded(MAX_THREADS), metavar="N", help="torch.set_num_threads(N) before running")
    p.add_argument("--isolate", action="store_true",
                   help="replay in a worker process: an op that kills it or its CUDA context is reported "
                        "skipped ('crashed: ...') and a new worker goes on")
    p.add_argument("--op-timeout", type=positive_float, metavar="SECONDS",
                   help="skip (reason 'timeout') a signature whose replay takes longer; implies --isolate, "
                        "since a running C++ op cannot be stopped inside its own process")
    p.add_argument("--no-timing", action="store_true", help="leave timings out of the report (byte-stable output)")
    p.add_argument("--race-seconds", type=non_negative_float, metavar="SECONDS",
                   help="ops whose nondeterminism is a race (index_put_, scatter_add_, embedding backward, and the "
                        "ops a catalog of this machine marks diverges) are replayed beyond --reps, up to 60 runs "
                        "per mode or the first that differs, for at most this long per captured call (default 2; "
                        "0: --reps only; with --no-timing the inputs' size fixes the count instead)")
    from opaudit.cli import torchrun

    torchrun.add_arguments(p)
    p.add_argument("--show-all", action="store_true",
                   help="list every finding in the terminal table (random and uninitialized ones are otherwise "
                        "summarised in one line, and the table stops at 40 rows); files keep every row anyway")
    p.add_argument("--version", action="version", version=f"opaudit {__version__}")
    return p


def _split_script_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def audit_main(argv: list[str]) -> int:
    """``opaudit SCRIPT [options] [-- args]``."""
    _load_frozen()
    try:
        return _audit(argv)
    finally:
        gc.unfreeze()


def _load_frozen() -> None:
    """Load what an audit runs with the garbage collector paused, then freeze everything loaded.

    Loading opaudit's modules after torch set off one more full collection of
    torch's ~170,000 objects than the audited script itself makes. ``import
    torch`` comes first, with the collector on, as it runs in the script (and
    with :func:`~opaudit.cli.options.interrupts` in place: a signal that comes
    while it imports NumPy is kept for ``raise_if_signalled``); opaudit's
    modules are then loaded with it paused, and what is loaded by then (alive as
    long as the process) is frozen (:func:`gc.freeze`) so that no collection
    walks it while the audit runs. :func:`audit_main` unfreezes it when it ends,
    so that the process's last collection walks it as the plain script's does.
    """
    import torch  # noqa: F401  (first, with the collector on)

    collecting = gc.isenabled()
    gc.disable()
    try:
        from opaudit.engine import loader, window  # noqa: F401
        from opaudit.flows import run  # noqa: F401
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


def _audit(argv: list[str]) -> int:
    own, script_args = _split_script_args(argv)
    args = _audit_parser().parse_args(own)
    rank_audit = None
    inputs = {"the script": args.script, "the --against catalog": args.against}
    if args.nproc_per_node or args.per_rank_reports or "TORCHELASTIC_RUN_ID" in os.environ:
        from opaudit.cli import torchrun

        rank_audit = torchrun.rank_audit(args)
        if args.nproc_per_node:
            from opaudit.flows.distributed.launch import launch

            check_output(args.output, inputs)
            rest = script_args if "--" in argv else None
            return launch(args.nproc_per_node, torchrun.without_option(own, rest, "--nproc-per-node"))
    output = check_output(args.output, inputs)
    check_format(args.format, output, "prediction" if args.against else "report")

    if args.batch_invariance:
        return _batch_invariance_main(args, script_args, output)
    for flag, value in (("--batch-sizes", args.batch_sizes), ("--batch-dim", args.batch_dim)):
        if value is not None:
            raise UsageError(f"{flag} needs --batch-invariance")
    keywords = [k for k in args.fail_on if k in RUN_CHECK_FAILURES]
    if args.fresh_processes:
        if not args.run_check:
            raise UsageError("--fresh-processes needs --run-check")
        if rank_audit is not None:
            raise UsageError("--fresh-processes: not under torchrun (each rank would start its own processes)")
        args.run_check = args.fresh_processes
    if keywords and not args.run_check:
        raise UsageError(f"--fail-on {keywords[0]} needs --run-check")
    if args.run_check and args.against:
        # The prediction is a document of its own: it has no place for the run check's result.
        raise UsageError("--run-check cannot be combined with --against (audit with --run-check, then predict)")
    against = _load_against(args.against) if args.against else None

    import torch

    raise_if_signalled()  # one that came while torch imported NumPy: its C++ swallows the interrupt
    from opaudit.engine import loader
    from opaudit.flows.run import RunOptions, run_audit

    if args.threads:
        torch.set_num_threads(args.threads)
    target = loader.load_target(args.script, args.entry, script_args)
    options = RunOptions(reps=args.reps, seed=args.seed, capture_budget=args.capture_budget * 2**20,
                         captures_per_signature=args.captures_per_signature,
                         deterministic_pass=not args.no_deterministic_pass, run_check=args.run_check,
                         fresh_processes=bool(args.fresh_processes),
                         isolate=args.isolate, op_timeout=args.op_timeout, timings=not args.no_timing,
                         race_catalog=against,
                         **({"race_seconds": args.race_seconds} if args.race_seconds is not None else {}))
    hooks = _Hooks(args.quiet)
    try:
        outcome = run_audit(target, steps.window(args, target), options, distributed=rank_audit, hooks=hooks)
    except KeyboardInterrupt as e:
        if rank_audit is not None:
            # torchrun stops every rank when one fails or the job is interrupted: one rank's
            # findings, unmerged, are not the job's report. No file; the launcher says why.
            raise
        partial = getattr(e, "report", None)
        if partial is None:
            sys.stderr.write(f"opaudit: {interruption(e)}\n")
        else:
            emit_partial(partial, args.format, output, interruption(e))
        return interrupted_code(e)
    report = outcome.report
    if outcome.cut is not None and report is not None:
        emit_partial(report, args.format, output,
                     f"{interruption(outcome.cut)} while the script ran; what it ran until then is audited")
        return interrupted_code(outcome.cut)
    if rank_audit is None:
        return _finish(report, against, args, output)
    if report is None:
        return EXIT_OK  # a rank other than 0: rank 0 writes the merged report
    from opaudit.cli import torchrun

    return torchrun.rank0_status(_finish(report, against, args, output))


class _Hooks:
    """What the audit run says and how far it got, on stderr: messages, the run check's line, the replay's bar."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        tty = sys.stderr.isatty()
        self._show, self._clear = run_check_progress(not quiet and tty)
        self._update, self._close = progress(not quiet) if quiet or tty else plain_progress()

    def say(self, kind: str, text: str) -> None:
        if kind == "info":
            if not self.quiet:
                sys.stderr.write(text + "\n")
        else:
            _say(f"opaudit: {kind}: {text}\n")

    def run_check(self, mode: str, i: int, runs: int) -> None:
        if self._show is not None:
            self._show(mode, i, runs)

    def run_check_done(self) -> None:
        self._clear()

    def replayed(self, p: Any) -> None:
        if self._update is not None:
            self._update(p)

    def replay_done(self) -> None:
        self._close()


def _finish(report: Any, against: Any, args: argparse.Namespace, output: str | None) -> int:
    """Write the report (or the ``--against`` prediction) and return the exit code."""
    if against is not None:
        return _emit_prediction(report, against, args, output)
    emit(report, "report", args.format, output, args.quiet, show_all=args.show_all)
    failing: Any = [f for f in report.all_findings if f.verdict in _verdicts_only(args.fail_on)]
    if report.distributed and args.fail_on:
        from opaudit.cli import torchrun

        failing = failing or torchrun.replicas_differ(report)
    failing = failing or _failing_run_checks(report, args.fail_on)
    if failing and not args.exit_zero:
        return EXIT_FINDINGS
    return EXIT_OK


def _batch_invariance_main(args: argparse.Namespace, script_args: list[str], output: str | None) -> int:
    """``opaudit SCRIPT --batch-invariance``: exit 1 when a row count gives other bits."""
    for name in batch.CONFLICTS:
        if getattr(args, name):
            raise UsageError(f"--{name.replace('_', '-')} cannot be combined with --batch-invariance")
    report = batch.run(args, script_args)
    emit(report, "report", args.format, output, args.quiet)
    return EXIT_FINDINGS if not report.batch_invariance.invariant and not args.exit_zero else EXIT_OK


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "catalog": catalog_main,
    "diff": diff_main,
    "capture": capsule.capture_main,
    "replay": capsule.replay_main,
    "trace": trace_main,
    "compare": compare_main,
}
"""Subcommand name → handler taking the remaining argv."""


def _load_against(path: str) -> Any:
    """The ``--against`` catalog, loaded before any model code runs (a bad file fails fast)."""
    from opaudit.flows.catalog import load_catalog

    catalog = load_catalog(path)
    if not catalog.complete:
        sys.stderr.write(f"opaudit: warning: {path} is a partial catalog (complete: false); "
                         "ops it has not reached yet are predicted 'unknown'\n")
    return catalog


def _emit_prediction(report: Any, catalog: Any, args: argparse.Namespace, output: str | None) -> int:
    from opaudit.flows.predict import predict

    prediction = predict(report, catalog, shown_path(args.against))
    emit(prediction, "prediction", args.format, output, args.quiet)
    if prediction.failing(_verdicts_only(args.fail_on)) and not args.exit_zero:
        return EXIT_FINDINGS
    return EXIT_OK


class _ClosedStream(io.TextIOBase):
    """Stands in for a standard stream the shell closed (``>&-``): writing to it is an error, not a crash."""

    def __init__(self, name: str) -> None:
        self.name = name

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, f"{self.name} is closed")


def _say(text: str) -> None:
    """Write a message to stderr; a stderr that cannot take it must not change the exit code."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (never raises, except with ``--debug``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in _split_script_args(argv)[0]
    saved = sys.stdout, sys.stderr
    # Started with 2>&- or >&-: Python sets the stream to None. Messages are then
    # lost, but the exit code must still tell findings (1) from errors (2).
    from opaudit.data.fileio import hold_closed_std_fds

    hold_closed_std_fds()  # so that the devnull below, or a report, does not become fd 2
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # closed in finally
    if sys.stdout is None:
        sys.stdout = _ClosedStream("stdout")
    try:
        return _main(argv, debug)
    finally:
        for stream, before in zip((sys.stdout, sys.stderr), saved, strict=True):
            if before is None and stream is not None:
                stream.close()
        if saved[0] is None:
            sys.stdout = None
        if saved[1] is None:
            sys.stderr = None


def _main(argv: list[str], debug: bool) -> int:
    # A torchrun worker names its rank: several ranks write to the same terminal.
    name = f"opaudit [rank {os.environ.get('RANK')}]" if "TORCHELASTIC_RUN_ID" in os.environ else "opaudit"
    try:
        with interrupts():
            if argv and argv[0] in SUBCOMMANDS:
                return SUBCOMMANDS[argv[0]](argv[1:])
            return audit_main(argv)
    except SystemExit as e:  # --help / --version
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else EXIT_ERROR
    except KeyboardInterrupt as e:
        _say(f"{name}: {interruption(e)}\n")
        return interrupted_code(e)
    except OpauditError as e:
        if debug:
            raise
        _say(e.detail)
        _say(f"{name}: error: {visible(str(e))}\n")  # a message may quote a hostile file's field
        return e.exit_code
    except Exception as e:  # every error becomes exit 2 here
        if debug:
            raise
        if isinstance(e, OSError):
            _say(visible(f"{name}: error: {e.strerror or e}: {e.filename or ''}\n".replace(": \n", "\n")))
        else:
            _say(visible(f"{name}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)\n"))
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
