"""``opaudit trace SCRIPT -o run.optrace`` and ``opaudit compare A B``: why does my run differ over there?

``trace`` runs the script once and writes every op call (op, site, module, phase,
step, digests of every input and output) to a trace file; ``compare`` reads two
traces and names the first call whose inputs were equal and whose outputs were not.
Exit codes of ``compare``: 0 identical, 1 diverged, 2 a file that is not a whole
trace, or two traces that cannot be compared (another script, entry, window or
world size).
"""

from __future__ import annotations

import argparse
import sys

from opaudit.cli import steps as step_options
from opaudit.cli.options import (
    EXIT_FINDINGS,
    EXIT_OK,
    Parser,
    add_output_options,
    check_output,
    integer,
    non_negative_int,
    positive_float,
    positive_int,
    raise_if_signalled,
)
from opaudit.cli.output import check_format, emit


def _trace_parser() -> Parser:
    p = Parser(prog="opaudit trace",
               description="Run a script once and write every op call it makes (op, source line, module, phase, "
                           "step, and a digest of every input and output) to a trace file, for 'opaudit compare'. "
                           "Under torchrun each rank writes OUTPUT/rankN.optrace.",
               epilog="Arguments after '--' are passed to the script as sys.argv[1:].")
    p.add_argument("script", help="Python script to trace (runs as __main__, or its opaudit_step() is called)")
    p.add_argument("--entry", metavar="NAME", help="function of the script to trace instead of opaudit_step")
    p.add_argument("--steps", type=step_options.steps, default=argparse.SUPPRESS, metavar="N",
                   help="optimizer steps to trace, then stop the script (default: all, the whole script from its "
                        "first line); with an entry function, calls of it (default 1, after its import)")
    p.add_argument("--start-step", type=non_negative_int, default=0, metavar="K",
                   help="run the first K steps untraced, then trace (default 0)")
    p.add_argument("--max-record-seconds", type=positive_float, metavar="S",
                   help="stop tracing, and the script, after S seconds")
    p.add_argument("--seed", type=integer, default=0, metavar="S", help="seed set before the user's code (default 0)")
    p.add_argument("--deterministic", action="store_true",
                   help="run under torch.use_deterministic_algorithms(True, warn_only=True)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch.set_num_threads(N) before running")
    add_output_options(p, "the trace file to write (.optrace)", required=True, quiet="nothing on stderr but errors")
    return p


def trace_main(argv: list[str]) -> int:
    """``opaudit trace SCRIPT -o PATH [options] [-- args]``."""
    own, script_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = _trace_parser().parse_args(own)
    from opaudit.flows.trace.record import rank_from_env

    rank = rank_from_env()
    output = check_output(args.output, {"the script": args.script}) if rank is None else args.output
    import torch

    raise_if_signalled()
    from opaudit.engine import loader
    from opaudit.engine.window import Window
    from opaudit.flows.trace.record import default_window, trace_target

    if args.threads:
        torch.set_num_threads(args.threads)
    target = loader.load_target(args.script, args.entry, script_args)
    window = Window(steps=getattr(args, "steps", default_window(target).steps), start=args.start_step,
                    max_seconds=args.max_record_seconds)
    recorded, calls, path = trace_target(target, output, window, seed=args.seed, deterministic=args.deterministic,
                                         rank=rank)
    raise_if_signalled()
    if not args.quiet and (rank is None or rank.rank == 0):
        where = args.output if rank is None else f"{args.output}/ (rank{rank.rank}.optrace and one file per other rank)"
        sys.stderr.write(f"{recorded.describe()}\ntrace of {calls} calls written to {where}\n")
    return EXIT_OK


def _compare_parser() -> Parser:
    p = Parser(prog="opaudit compare",
               description="Compare two traces of one script (opaudit trace): identical, or the first call whose "
                           "inputs were bitwise equal and whose outputs were not, how far it spread, and the calls "
                           "one run made and the other did not. Exit 0 identical, 1 diverged, 2 malformed or not "
                           "comparable.")
    p.add_argument("a", metavar="A", help="first trace (.optrace), or a folder of rank traces from torchrun")
    p.add_argument("b", metavar="B", help="second trace, of the same script and window")
    add_output_options(p, "write the comparison here (format from the extension)",
                       formats=("table", "md", "html", "csv", "yaml", "json", "sarif"))
    return p


def compare_main(argv: list[str]) -> int:
    """``opaudit compare A B [options]``."""
    args = _compare_parser().parse_args(argv)
    output = check_output(args.output, {"trace A": args.a, "trace B": args.b})
    check_format(args.format, output, "comparison")
    from opaudit.flows.trace.compare import compare_traces

    comparison = compare_traces(args.a, args.b)
    emit(comparison, "comparison", args.format, output, args.quiet)
    return EXIT_OK if comparison.identical else EXIT_FINDINGS
