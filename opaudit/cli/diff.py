"""``opaudit diff A B``: what differs between two catalogs or two reports; exit 1 on a ``--fail-on`` transition."""

from __future__ import annotations

import sys

from opaudit.cli.options import EXIT_FINDINGS, EXIT_OK, Parser, add_output_options, check_output, file_name
from opaudit.cli.output import check_format, emit


def _diff_parser() -> Parser:
    from opaudit.flows.diff import DEFAULT_FAIL_ON as DIFF_FAIL_ON

    p = Parser(prog="opaudit diff",
                description="Show the ops whose verdict differs between two catalogs, or between two reports, "
                            "the ops present on one side only, and the fingerprint fields that differ.")
    p.add_argument("a", type=file_name, metavar="A", help="first catalog or report (YAML or JSON)")
    p.add_argument("b", type=file_name, metavar="B", help="second catalog or report, of the same kind")
    p.add_argument("--fail-on", default=DIFF_FAIL_ON, metavar="RULES",
                   help=f"transitions FROM->TO (globs; 'missing' for an op on one side only) that make the exit "
                        f"code 1 (default {DIFF_FAIL_ON}; 'none' for never)")
    p.add_argument("--exit-zero", action="store_true", help="exit 0 even when a transition matches --fail-on")
    add_output_options(p, "write the diff here (format from the extension)",
                       formats=("table", "md", "html", "csv", "yaml", "json"))
    return p


def diff_main(argv: list[str]) -> int:
    """``opaudit diff A B [options]``."""
    args = _diff_parser().parse_args(argv)
    from opaudit.flows.diff import diff_files, parse_fail_on

    rules = parse_fail_on(args.fail_on)
    output = check_output(args.output, {"input A": args.a, "input B": args.b})
    check_format(args.format, output, "diff")
    diff = diff_files(args.a, args.b)
    emit(diff, "diff", args.format, output, args.quiet)
    failing = diff.matching(rules)
    if failing and not args.quiet:
        sys.stderr.write(f"opaudit: {len(failing)} transition(s) match --fail-on {args.fail_on}\n")
    return EXIT_FINDINGS if failing and not args.exit_zero else EXIT_OK
