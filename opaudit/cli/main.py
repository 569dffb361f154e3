"""Command line: ``opaudit SCRIPT``, ``opaudit catalog``, ``opaudit diff``.

The only place where errors become exit codes:

* 0: clean (no finding in ``--fail-on``), or ``--exit-zero``;
* 1: findings in ``--fail-on``;
* 2: usage, model-load, user-code, file-format or internal errors;
* 130: interrupted (a partial report marked ``complete: false`` is still written);
* 143: terminated by SIGTERM (a CI timeout): the same partial report as for Ctrl-C.

Reports go to ``-o FILE`` (written atomically, only once the analysis is done)
or to stdout; progress and the summary go to stderr.

Over the usual 500 lines: the three commands' parsers and handlers and the one
``emit()`` they share; ``--batch-invariance`` (``cli/batch.py``) and the torchrun
options (``cli/torchrun.py``) already live apart, and the next command should too.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from opaudit.cli import batch, steps
from opaudit.data.version import __version__

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
DEFAULT_FAIL_ON = "raises,diverges,diverges_deterministic"
MAX_SECONDS = 1e6
"""Longest time limit accepted (11.6 days): waits past ~24 days overflow the OS's poll timeout."""


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every path that writes a partial report on
    Ctrl-C does so on a CI job's timeout too; the exit code is 143 instead of 130."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_interrupts() -> Any:
    """Turn SIGTERM into :class:`Terminated` while the audit runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted_code(e: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED


def _emit_partial(partial: Any, fmt_name: str | None, output: str | None, why: str) -> None:
    """Write a partial report (``complete: false``) and say where it went."""
    if output:
        emit(partial, "report", fmt_name, output, quiet=True)
        sys.stderr.write(f"opaudit: {why}; partial report (complete: false) written to {output}\n")
        return
    try:
        emit(partial, "report", fmt_name, None, quiet=True)
    except OSError:
        pass  # the reader of our stdout may have been interrupted too
    sys.stderr.write(f"opaudit: {why}; the report above is partial (complete: false)\n")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) raised as :class:`UsageError`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    if not math.isfinite(v) or v > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be a number of seconds up to {MAX_SECONDS:g}, got {text}")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _run_count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of runs, got {text!r} (put the script before --run-check, or write --run-check=K)"
        ) from None
    if v < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 runs to compare, got {v}")
    return v


NOT_REPRODUCIBLE = "not_reproducible"
NOT_REPRODUCIBLE_DETERMINISTIC = "not_reproducible_deterministic"
RUN_CHECK_FAILURES = {
    NOT_REPRODUCIBLE: ("default", "deterministic"),
    NOT_REPRODUCIBLE_DETERMINISTIC: ("deterministic",),
}
"""``--fail-on`` keywords for ``--run-check``: a whole-step check in one of these modes
that is NOT reproducible makes the exit code 1."""


def parse_verdicts(text: str) -> tuple:
    """``raises,diverges`` → verdicts (and run-check keywords); ``none`` or empty → nothing fails."""
    from opaudit.data.verdict import Verdict

    if text.strip().lower() in ("", "none"):
        return ()
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


def _audit_parser() -> _Parser:
    p = _Parser(
        prog="opaudit",
        description="Audit a PyTorch script for ops that raise, warn or give different bits under "
                    "torch.use_deterministic_algorithms. Subcommands: 'opaudit catalog', 'opaudit diff'.",
        epilog="Arguments after '--' are passed to the script as sys.argv[1:].",
    )
    p.add_argument("script", help="Python script to audit (runs as __main__, or its opaudit_step() is called)")
    p.add_argument("--entry", metavar="NAME", help="function of the script to record instead of opaudit_step")
    steps.add_arguments(p, _positive_float)
    p.add_argument("--reps", type=_positive_int, default=5, metavar="N", help="replays per mode (default 5)")
    p.add_argument("--seed", type=_int, default=0, metavar="S", help="seed set before the user's code and replays")
    p.add_argument("--run-check", nargs="?", const=2, type=_run_count, metavar="K",
                   help="also run the whole step K times (default 2) from identical state, in default and in "
                        "deterministic mode, and report whether its bits reproduce and which op is the root cause")
    p.add_argument("--batch-invariance", action="store_true",
                   help="instead of an audit, check that opaudit_forward(batch)'s first b rows do not depend on the "
                        "rest of the batch: the script defines opaudit_batch() and opaudit_forward(batch); exit 1 "
                        "when a row count gives other bits")
    p.add_argument("--batch-sizes", type=batch.row_counts, metavar="LIST",
                   help="row counts checked with --batch-invariance (default 1,2,3)")
    p.add_argument("--batch-dim", type=steps.non_negative_int, metavar="N", help="the batch dim for --batch-invariance (default 0)")
    p.add_argument("-o", "--output", metavar="PATH", help="write the report here (format from the extension)")
    p.add_argument("--format", metavar="FMT", help="yaml, json, csv, md or table (default: from -o, else table)")
    p.add_argument("--fail-on", type=parse_verdicts, default=parse_verdicts(DEFAULT_FAIL_ON), metavar="LIST",
                   help=f"verdicts that make the exit code 1 (default {DEFAULT_FAIL_ON}; 'none' for never); with "
                        f"--run-check also '{NOT_REPRODUCIBLE}' (either mode) or '{NOT_REPRODUCIBLE_DETERMINISTIC}'")
    p.add_argument("--exit-zero", action="store_true", help="exit 0 even when findings match --fail-on")
    p.add_argument("--against", metavar="CATALOG",
                   help="predict each recorded op's verdict on the hardware CATALOG was built on (ops it lacks "
                        "are 'unknown'); --fail-on then applies to the predicted verdicts")
    p.add_argument("--capture-budget", type=_positive_int, default=2048, metavar="MIB",
                   help="memory for captured op inputs, in MiB (default 2048); ops past it are skipped")
    p.add_argument("--captures-per-signature", type=_positive_int, default=4, metavar="M",
                   help="for ops whose nondeterminism depends on index collisions (index_put_, scatter_add_, "
                        "embedding backward...), replay up to M of each signature's calls, spread over the "
                        "recorded steps, within --capture-budget (default 4; 1: the first call only, like every "
                        "other op)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch.set_num_threads(N) before running")
    p.add_argument("--isolate", action="store_true",
                   help="replay in a worker process: an op that kills it or its CUDA context is reported "
                        "skipped ('crashed: ...') and a new worker goes on")
    p.add_argument("--op-timeout", type=_positive_float, metavar="SECONDS",
                   help="skip (reason 'timeout') a signature whose replay takes longer; implies --isolate, "
                        "since a running C++ op cannot be stopped inside its own process")
    p.add_argument("--no-timing", action="store_true", help="leave timings out of the report (byte-stable output)")
    from opaudit.cli import torchrun

    torchrun.add_arguments(p, _positive_int, _positive_float)
    p.add_argument("--show-all", action="store_true",
                   help="list every finding in the terminal table (random and uninitialized ones are otherwise "
                        "summarised in one line, and the table stops at 40 rows); files keep every row anyway")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary on stderr")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--version", action="version", version=f"opaudit {__version__}")
    return p


def _split_script_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _check_output(path: str | None) -> str | None:
    """Absolute output path, checked writable before any work is done."""
    if path is None:
        return None
    from opaudit.data.fileio import check_writable

    path = os.path.abspath(path)
    check_writable(path)
    return path


def _progress(enabled: bool, desc: str = "replaying", unit: str = "sig"
              ) -> tuple[Callable[[Any], None] | None, Callable[[], None]]:
    """A tqdm bar on stderr fed with ``Progress`` updates (a resumed sweep starts part-way)."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(p: Any) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=p.total, initial=p.done - 1, desc=desc, unit=unit, file=sys.stderr,
                              leave=False)
        bar["bar"].set_postfix_str(p.op, refresh=False)
        bar["bar"].update(1)

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return update, close


def _plain_progress(desc: str = "replaying", unit: str = "signatures"
                    ) -> tuple[Callable[[Any], None], Callable[[], None]]:
    """Progress as plain lines on stderr, for a log (stderr not a terminal): one line per tenth done.

    Counted, never timed, so that two runs print the same lines.
    """
    shown: set[int] = set()

    def update(p: Any) -> None:
        tenth = p.done * 10 // max(p.total, 1)
        if tenth not in shown and (tenth > 0 or p.done == 1):
            shown.add(tenth)
            sys.stderr.write(f"opaudit: {desc} {p.done}/{p.total} {unit}\n")

    return update, lambda: None


def _run_check_progress(enabled: bool) -> tuple[Callable[[str, int, int], None] | None, Callable[[], None]]:
    if not enabled:
        return None, lambda: None

    def show(mode: str, i: int, runs: int) -> None:
        sys.stderr.write(f"\rrun check: {mode} mode, run {i}/{runs}   ")
        sys.stderr.flush()

    def clear() -> None:
        sys.stderr.write("\r" + " " * 48 + "\r")

    return show, clear


def emit(document: Any, kind: str, fmt_name: str | None, output: str | None, quiet: bool,
         default: str = "table", show_all: bool = False) -> None:
    """Write any document to ``output`` (see :mod:`opaudit.data.fileio`) or stdout; a summary to stderr.

    With ``-o``, the format comes from ``--format`` or the extension, and unless
    ``quiet`` the table form goes to stderr with the path written. Without, the
    document goes to stdout in ``--format`` or ``default``. ``show_all``: a
    report's table lists every finding (see :func:`opaudit.cli.formats.table.report`).
    """
    from opaudit.cli.formats import Format, Kind, render
    from opaudit.cli.formats import table as table_format
    from opaudit.data.fileio import write_output

    kind = Kind(kind)

    def text(fmt: Format, written_to: str | None = None) -> str:
        if kind is Kind.REPORT and fmt is Format.TABLE:
            return table_format.report(document, show_all=show_all, written_to=written_to)
        return render(document, kind, fmt)

    if output:
        fmt = Format.parse(fmt_name) if fmt_name else Format.from_path(output)
        write_output(output, text(fmt))
        if not quiet:
            if fmt is not Format.TABLE:
                sys.stderr.write(text(Format.TABLE, written_to=output))
            sys.stderr.write(f"{kind.value} written to {output}\n")
        return
    fmt = Format.parse(fmt_name) if fmt_name else Format.parse(default)
    sys.stdout.write(text(fmt))
    if kind is Kind.REPORT and fmt is not Format.TABLE and not quiet:
        # The report went to stdout for a program; the person still gets the outcome
        # (CSV has no place for the whole-step checks at all).
        from opaudit.cli.formats.table import outcome

        sys.stderr.write(outcome(document))


def audit_main(argv: list[str]) -> int:
    """``opaudit SCRIPT [options] [-- args]``."""
    own, script_args = _split_script_args(argv)
    args = _audit_parser().parse_args(own)
    rank_audit = None
    if args.nproc_per_node or args.per_rank_reports or "TORCHELASTIC_RUN_ID" in os.environ:
        from opaudit.cli import torchrun

        rank_audit = torchrun.rank_audit(args, UsageError)
        if args.nproc_per_node:
            from opaudit.flows.distributed.launch import launch

            _check_output(args.output)
            rest = script_args if "--" in argv else None
            return launch(args.nproc_per_node, torchrun.without_option(own, rest, "--nproc-per-node"))
    output = _check_output(args.output)
    if args.format:
        from opaudit.cli.formats import Format

        Format.parse(args.format)
    if output and not args.format:
        from opaudit.cli.formats import Format

        Format.from_path(output)

    if args.batch_invariance:
        return _batch_invariance_main(args, script_args, output)
    for flag, value in (("--batch-sizes", args.batch_sizes), ("--batch-dim", args.batch_dim)):
        if value is not None:
            raise UsageError(f"{flag} needs --batch-invariance")
    keywords = [k for k in args.fail_on if k in RUN_CHECK_FAILURES]
    if keywords and not args.run_check:
        raise UsageError(f"--fail-on {keywords[0]} needs --run-check")
    against = _load_against(args.against) if args.against else None

    import torch

    from opaudit.engine import loader
    from opaudit.engine.record import Recorder
    from opaudit.engine.window import WindowError
    from opaudit.flows.pipeline import build_report, record_target

    if args.threads:
        torch.set_num_threads(args.threads)
    target = loader.load_target(args.script, args.entry, script_args)
    window = steps.window(args, target)
    checks: tuple = ()
    if args.run_check:
        from opaudit.flows.runcheck import run_checks

        # Before recording, so that the recorder's captured inputs are not held meanwhile.
        show, clear = _run_check_progress(not args.quiet and sys.stderr.isatty())
        try:
            checks = run_checks(target, args.run_check, seed=args.seed, window=window,
                                on_run=rank_audit.before_run(show) if rank_audit is not None else show)
        finally:
            clear()
    budget = args.capture_budget * 2**20
    cut: KeyboardInterrupt | None = None
    recorded = det_recorded = None
    det_rec = det_failure = None
    if not args.no_deterministic_pass and rank_audit is None:
        # First, so that the recording replayed for most signatures is the last one made: an op the
        # script registers itself (torch.library) is registered anew by each run. (Not under torchrun:
        # the ranks' collectives would run twice.)
        det_rec = Recorder(capture_budget=budget, root=target.root, captures_per_signature=args.captures_per_signature)
        try:
            det_recorded = record_target(target, det_rec, window, seed=args.seed, deterministic=True)
        except WindowError:
            det_rec = None  # nothing recorded: the default-mode run below says so
        except (loader.UserCodeError, loader.ScriptExitError) as e:
            # Said only once the default-mode run succeeded: if it fails too, its error is the one message.
            det_rec, det_failure = None, e
        except KeyboardInterrupt as e:
            cut = e  # the audit goes on with what the deterministic-mode run recorded
    if cut is None:
        if rank_audit is not None and checks:
            rank_audit.fresh_start()  # the run check's runs are gone on every rank before this one starts
        rec = Recorder(capture_budget=budget, root=target.root, capture_collectives=rank_audit is not None,
                       captures_per_signature=args.captures_per_signature)
        try:
            recorded = record_target(target, rec, window, seed=args.seed,
                                     recording=rank_audit.recording if rank_audit else None)
        except KeyboardInterrupt as e:
            # Ctrl-C (or SIGTERM) while the user's code runs: recording stops there, and
            # what was recorded is still audited (a second interrupt stops that too).
            cut = e
    else:
        rec, det_rec = det_rec, None
    if det_failure is not None:
        sys.stderr.write(f"opaudit: warning: the run in deterministic mode failed ({det_failure}); the crash "
                         "list comes from the default-mode recording\n")
    if recorded is not None and not args.quiet:
        sys.stderr.write(recorded.describe() + "\n")
    # The script ran once per recording: what either run left behind is said once.
    boxes = [r.sandbox for r in (det_recorded, recorded) if r is not None and r.sandbox is not None]
    threads_left = tuple(sorted({name for box in boxes for name in box.threads_left}))
    for note in dict.fromkeys(note for box in boxes for note in box.notes):
        _say(f"opaudit: note: {note}\n")

    if args.quiet or sys.stderr.isatty():
        update, close = _progress(not args.quiet)
    else:
        update, close = _plain_progress()
    settings = {"script": target.name, "entry": target.entry or "__main__", "timing": not args.no_timing,
                "recorded": recorded.span if recorded is not None else "cut short",
                "deterministic_pass": det_rec is not None}
    if cut is not None:
        settings["recording_cut_short"] = "terminated" if isinstance(cut, Terminated) else "interrupted"
    if args.run_check:
        settings["run_check"] = args.run_check
    isolator = None
    if args.isolate or args.op_timeout:
        from opaudit.engine.isolate import Isolator

        # Forking while another thread may hold a lock (torch's, the allocator's,
        # the GIL's bookkeeping) can leave the worker blocked for ever.
        isolator = Isolator(rec, timeout=args.op_timeout, start_method="spawn" if threads_left else None)
        settings["isolate"] = isolator.start_method
        if args.op_timeout:
            settings["op_timeout_s"] = args.op_timeout
    if threads_left:
        _say(f"opaudit: note: {len(threads_left)} thread(s) the script started still run "
             f"({', '.join(threads_left[:3])}); "
             + ("replaying in a spawned worker, which they cannot touch\n" if isolator is not None else
                "if they run torch ops or change torch settings, replays can be disturbed: use --isolate\n"))
    try:
        report = build_report(rec, reps=args.reps, seed=args.seed, settings=settings,
                              timings=not args.no_timing, on_progress=update, replay_fn=isolator,
                              run_checks=checks, complete=cut is None, deterministic=det_rec)
        if rank_audit is not None:
            close()
            report = rank_audit.finish(report, rec, reps=args.reps)
    except KeyboardInterrupt as e:
        close()
        partial = getattr(e, "report", None)
        why = "terminated" if isinstance(e, Terminated) else "interrupted"
        if partial is None:
            sys.stderr.write(f"opaudit: {why}\n")
        else:
            _emit_partial(partial, args.format, output, why)
        return _interrupted_code(e)
    finally:
        close()
        if isolator is not None:
            isolator.close()
        rec.release()
        if det_rec is not None:
            det_rec.release()
    if cut is not None and report is not None:
        why = "terminated" if isinstance(cut, Terminated) else "interrupted"
        _emit_partial(report, args.format, output, f"{why} while the script ran; what it ran until then is audited")
        return _interrupted_code(cut)
    if rank_audit is None:
        return _finish(report, against, args, output)
    if report is None:
        return EXIT_OK  # a rank other than 0: rank 0 writes the merged report
    from opaudit.cli import torchrun

    return torchrun.rank0_status(_finish(report, against, args, output))


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


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {}
"""Subcommand name → handler taking the remaining argv; filled in below."""


# -- catalogs: ``opaudit catalog``, ``opaudit diff``, ``--against`` ---------------------
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

    prediction = predict(report, catalog, args.against)
    emit(prediction, "prediction", args.format, output, args.quiet)
    if prediction.failing(_verdicts_only(args.fail_on)) and not args.exit_zero:
        return EXIT_FINDINGS
    return EXIT_OK


def _catalog_parser() -> _Parser:
    from opaudit.flows import catalog as c

    p = _Parser(prog="opaudit catalog",
                description="Sweep the ops of PyTorch's OpInfo database (and the torch.nn modules it does not "
                            "cover) on one device, forward and backward, on OpInfo's samples and on stress "
                            "inputs, and classify each op like an audit does. Needs: pip install "
                            "'opaudit[catalog]'.")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--ops", metavar="GLOBS", help="comma-separated globs over OpInfo names (index_put, "
                   "nn.functional.max_unpool2d), aten names (aten.index_put*) and modules (nn.LSTM); default all")
    p.add_argument("--dtypes", metavar="LIST", default=",".join(c.DEFAULT_DTYPES),
                   help=f"comma-separated dtypes (default {','.join(c.DEFAULT_DTYPES)})")
    p.add_argument("-o", "--output", metavar="PATH",
                   help="write the catalog here (format from the extension; a partial file PATH.partial is kept "
                        "while the sweep runs)")
    p.add_argument("--format", metavar="FMT", help="yaml, json, csv, md or table (default: from -o, else yaml)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep from -o's partial file")
    p.add_argument("--from", dest="source", metavar="CATALOG",
                   help="no sweep: convert an existing catalog file to -o / --format (e.g. the Markdown export)")
    p.add_argument("--no-stress", action="store_true", help="OpInfo's own samples only (no scaled inputs)")
    p.add_argument("--stress-elements", type=_positive_int, default=c.STRESS_ELEMENTS, metavar="N",
                   help=f"size of a stress sample in elements (default {c.STRESS_ELEMENTS:,})")
    p.add_argument("--reps", type=_positive_int, default=c.DEFAULT_REPS, metavar="N",
                   help=f"replays per mode (default {c.DEFAULT_REPS}; {c.DEFAULT_INDEX_REPS} for stress signatures "
                        "with an index argument)")
    p.add_argument("--max-samples", type=_positive_int, default=c.DEFAULT_MAX_SAMPLES, metavar="N",
                   help=f"OpInfo samples per op and dtype (default {c.DEFAULT_MAX_SAMPLES})")
    p.add_argument("--op-timeout", type=_positive_float, default=c.DEFAULT_OP_TIMEOUT, metavar="SECONDS",
                   help=f"time limit per op and dtype (default {c.DEFAULT_OP_TIMEOUT:g}); the worker is killed "
                        "at 1.5x that plus 30 s and the op recorded as timeout")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch.set_num_threads(N) in the worker")
    p.add_argument("--no-modules", action="store_true", help="skip the torch.nn modules OpInfo does not cover")
    p.add_argument("--dist-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                   help="under torchrun (a sharded sweep), time limit for reaching torchrun's store")
    p.add_argument("--in-process", action="store_true",
                   help="run ops in this process (faster start; no hard time limit, a crashing op ends the sweep)")
    p.add_argument("--batch-invariance", action="store_true",
                   help="after the sweep, check the matmul family, reductions, normalisations, softmax and attention "
                        "(those --ops selects) for batch invariance over 1..128 rows of 256")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary on stderr")
    p.add_argument("--debug", action="store_true", help="show full tracebacks, and the worker's stderr")
    return p


def catalog_main(argv: list[str]) -> int:
    """``opaudit catalog [options]``."""
    args = _catalog_parser().parse_args(argv)
    output = _check_output(args.output)
    from opaudit.cli.formats import Format

    if args.format:
        Format.parse(args.format)
    elif output:
        Format.from_path(output)
    from opaudit.flows.catalog import CatalogRequest, build_catalog, load_catalog, partial_path

    if args.source:
        emit(load_catalog(args.source), "catalog", args.format, output, args.quiet, default="yaml")
        return EXIT_OK
    if args.resume and not output:
        raise UsageError("--resume needs -o PATH: the sweep resumes from PATH.partial")
    from opaudit.data.fileio import is_replaced

    # A device or FIFO output gets no PATH.partial beside it (/dev/null.partial).
    partial = partial_path(output) if output and is_replaced(output) else None
    if args.resume and partial is None:
        raise UsageError(f"--resume needs -o to name a regular file, not {output}")
    world = device = None
    if "TORCHELASTIC_RUN_ID" in os.environ:
        from opaudit.flows.distributed import shard, world_from_env

        world = world_from_env()
    if world is not None:  # one shard of the sweep per rank, merged on rank 0
        device = shard.shard_device(args.device, world)
        partial = shard.shard_partial(partial, world) if partial else None
        if args.resume and partial and not os.path.exists(partial):
            args.resume = False  # this shard had not written its partial file yet: it starts over
        args.quiet = args.quiet or world.rank != 0
    update, close = _progress(not args.quiet and sys.stderr.isatty(), "sweeping", "op")
    if world is not None:
        update = shard.with_test_stop(update, world)
    # Under torchrun, SIGTERM is how the agent stops the other ranks when one fails or the job is interrupted:
    # each shard then keeps its partial file for --resume, as on Ctrl-C.
    sigterm = _sigterm_interrupts() if world is not None else contextlib.nullcontext()
    try:
        with sigterm:
            request = CatalogRequest(
                device=device or args.device, ops=tuple(args.ops.split(",")) if args.ops else (), dtypes=args.dtypes,
                stress=not args.no_stress, reps=args.reps, op_timeout=args.op_timeout, max_samples=args.max_samples,
                stress_elements=args.stress_elements, modules=not args.no_modules,
                resume=partial if args.resume else None, partial=partial, isolate=not args.in_process,
                threads=args.threads, quiet_worker=not args.debug,
                batch_invariance=args.batch_invariance and (world is None or world.rank == 0),
                shard=(world.rank, world.world_size) if world is not None else None)
            catalog = build_catalog(request, on_progress=update)
    except KeyboardInterrupt as e:
        close()
        if partial:
            sys.stderr.write(f"opaudit: interrupted; resume with: opaudit catalog ... -o {args.output} --resume\n")
        else:
            sys.stderr.write("opaudit: interrupted\n")
        return _interrupted_code(e)
    finally:
        close()
    if world is not None:
        merged = shard.gather_catalog(world, catalog, args.dist_timeout)
        if partial and os.path.exists(partial):
            os.unlink(partial)  # this shard is safe on rank 0 now
        if merged is None:
            return EXIT_OK  # a rank other than 0: rank 0 writes the merged catalog
        catalog = merged
    emit(catalog, "catalog", args.format, output, args.quiet, default="yaml")
    if partial and os.path.exists(partial):
        os.unlink(partial)
    if not args.quiet and not output and (args.format or "yaml") != "table":
        from opaudit.cli.formats import Kind, render

        sys.stderr.write(render(catalog, Kind.CATALOG, Format.TABLE).splitlines()[-1] + "\n")
    return EXIT_OK


def _diff_parser() -> _Parser:
    from opaudit.flows.diff import DEFAULT_FAIL_ON as DIFF_FAIL_ON

    p = _Parser(prog="opaudit diff",
                description="Show the ops whose verdict differs between two catalogs, or between two reports, "
                            "the ops present on one side only, and the fingerprint fields that differ.")
    p.add_argument("a", metavar="A", help="first catalog or report (YAML or JSON)")
    p.add_argument("b", metavar="B", help="second catalog or report, of the same kind")
    p.add_argument("-o", "--output", metavar="PATH", help="write the diff here (format from the extension)")
    p.add_argument("--format", metavar="FMT", help="table, md, csv, yaml or json (default: from -o, else table)")
    p.add_argument("--fail-on", default=DIFF_FAIL_ON, metavar="RULES",
                   help=f"transitions FROM->TO (globs; 'missing' for an op on one side only) that make the exit "
                        f"code 1 (default {DIFF_FAIL_ON}; 'none' for never)")
    p.add_argument("--exit-zero", action="store_true", help="exit 0 even when a transition matches --fail-on")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def diff_main(argv: list[str]) -> int:
    """``opaudit diff A B [options]``."""
    args = _diff_parser().parse_args(argv)
    from opaudit.flows.diff import diff_files, parse_fail_on

    rules = parse_fail_on(args.fail_on)
    output = _check_output(args.output)
    if args.format:
        from opaudit.cli.formats import Format

        Format.parse(args.format)
    diff = diff_files(args.a, args.b)
    emit(diff, "diff", args.format, output, args.quiet)
    failing = diff.matching(rules)
    if failing and not args.quiet:
        sys.stderr.write(f"opaudit: {len(failing)} transition(s) match --fail-on {args.fail_on}\n")
    return EXIT_FINDINGS if failing and not args.exit_zero else EXIT_OK


SUBCOMMANDS.update(catalog=catalog_main, diff=diff_main)


def _known_errors() -> tuple[type[BaseException], ...]:
    from opaudit.cli.formats import FormatError
    from opaudit.data.files import ReportError
    from opaudit.engine.loader import ModelLoadError, ScriptExitError

    from opaudit.data.fileio import FileError

    errors: list[type[BaseException]] = [UsageError, ModelLoadError, ScriptExitError, ReportError, FormatError,
                                         FileError]
    for mod, name in (("opaudit.flows.catalog", "CatalogError"), ("opaudit.flows.diff", "DiffError"),
                      ("opaudit.flows.runcheck", "RunCheckError"), ("opaudit.engine.remedies", "KnowledgeBaseError"),
                      ("opaudit.flows.batchinv", "BatchInvarianceError"),
                      ("opaudit.engine.isolate", "IsolationError"),
                      ("opaudit.flows.distributed.comm", "DistributedError"),
                      ("opaudit.flows.distributed.launch", "LaunchError"), ("opaudit.engine.window", "WindowError")):
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


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
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
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
    from opaudit.engine.loader import UserCodeError

    # A torchrun worker names its rank: several ranks write to the same terminal.
    name = f"opaudit [rank {os.environ.get('RANK')}]" if "TORCHELASTIC_RUN_ID" in os.environ else "opaudit"
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        with _sigterm_interrupts():
            return audit_main(argv)
    except SystemExit as e:  # --help / --version
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else EXIT_ERROR
    except KeyboardInterrupt as e:
        _say(f"{name}: {'terminated' if isinstance(e, Terminated) else 'interrupted'}\n")
        return _interrupted_code(e)
    except UserCodeError as e:
        if debug:
            raise
        _say(e.user_traceback)
        _say(f"{name}: error: {e}\n")
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - every error becomes exit 2 here
        if debug:
            raise
        if isinstance(e, _known_errors()):
            _say(f"{name}: error: {e}\n")
        elif isinstance(e, OSError):
            _say(f"{name}: error: {e.strerror or e}: {e.filename or ''}\n".replace(": \n", "\n"))
        else:
            _say(f"{name}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
