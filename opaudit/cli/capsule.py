"""``opaudit capture SCRIPT -o step.opcap`` and ``opaudit replay step.opcap``: before you migrate.

``capture`` records the script's window as an audit does and writes a capsule:
each op call's inputs and the bits this machine computed from them, in default and
deterministic mode. ``replay`` needs no script: it replays the capsule's calls here
and says, per op, whether this machine gives the same bits (``across``) beside the
audit's local verdict. Exit codes as for the audit: 0 clean, 1 an op in
``--fail-on``, 2 an error (a capsule that cannot be read included).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from opaudit.cli import steps
from opaudit.cli.options import (
    EMPTY_FAIL_ON,
    EXIT_FINDINGS,
    EXIT_OK,
    MAX_BUDGET_MIB,
    MAX_CAPTURES,
    MAX_REPS,
    MAX_THREADS,
    Parser,
    add_output_options,
    bounded,
    check_output,
    file_name,
    integer,
    interrupted_code,
    interruption,
    positive_float,
)
from opaudit.cli.output import check_format, emit, emit_partial, plain_progress, progress

DEFAULT_FAIL_ON = "differs,differs_default,unsupported,raises,diverges,diverges_deterministic"


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _capture_parser() -> Parser:
    p = Parser(prog="opaudit capture",
               description="Record a script's steps as an audit does and write a capsule: every unique op call's "
                           "inputs and the bits this machine computed from them (default and deterministic mode), "
                           "for 'opaudit replay' on another machine.",
               epilog="Arguments after '--' are passed to the script as sys.argv[1:].")
    p.add_argument("script", type=file_name, help="Python script to record (runs as __main__, or its opaudit_step() is called)")
    p.add_argument("--entry", metavar="NAME", help="function of the script to record instead of opaudit_step")
    steps.add_arguments(p)
    p.add_argument("--seed", type=integer, default=0, metavar="S",
                   help="seed set before the user's code, and the generator state random ops start from")
    p.add_argument("--capture-budget", type=bounded(MAX_BUDGET_MIB), default=2048, metavar="MIB",
                   help="memory for captured inputs and bytes of tensor data in the capsule, in MiB (default "
                        "2048); inputs past it are not captured, outputs past it are kept as digests only")
    p.add_argument("--captures-per-signature", type=bounded(MAX_CAPTURES), default=4, metavar="M",
                   help="calls captured per signature of an index-collision op (default 4), as for the audit")
    p.add_argument("--digests-only", action="store_true",
                   help="keep only digests of the outputs (a small capsule: a replay then says whether an op's "
                        "bits differ, not how far)")
    p.add_argument("--threads", type=bounded(MAX_THREADS), metavar="N", help="torch.set_num_threads(N) before running")
    add_output_options(p, "the capsule file to write (step.opcap)", required=True,
                       quiet="no progress and no summary on stderr")
    return p


def capture_main(argv: list[str]) -> int:
    """``opaudit capture SCRIPT -o step.opcap [options] [-- args]``."""
    own, script_args = _split(argv)
    args = _capture_parser().parse_args(own)
    output = check_output(args.output, {"the script": args.script})
    import torch

    from opaudit.engine import loader
    from opaudit.flows.capsule import capture

    if args.threads:
        torch.set_num_threads(args.threads)
    target = loader.load_target(args.script, args.entry, script_args)
    window = steps.window(args, target)
    update, close = _progress(args.quiet, "capturing")
    try:
        done = capture(target, window, output, seed=args.seed, capture_budget=args.capture_budget * 2**20,
                       captures_per_signature=args.captures_per_signature,
                       deterministic_pass=not args.no_deterministic_pass, digests_only=args.digests_only,
                       settings={"script": target.name, "entry": target.entry or "__main__"},
                       hooks=_said(args.quiet), on_progress=update)
    finally:
        close()
    if not args.quiet:
        sys.stderr.write(capture_summary(done, args.output, args.capture_budget))
    return EXIT_OK


def _said(quiet: bool) -> Any:
    """Hooks of the recording run that print what it says on stderr (what was recorded unless ``quiet``)."""
    from opaudit.flows.run import Hooks

    class Said(Hooks):
        def say(self, kind: str, text: str) -> None:
            if kind != "info":
                sys.stderr.write(f"opaudit: {kind}: {text}\n")
            elif not quiet:
                sys.stderr.write(text + "\n")

    return Said()


def capture_summary(done: Any, path: str, budget_mib: int) -> str:
    """What a capture wrote: the file's size, what it holds, and what the byte budget left out."""
    m = done.manifest
    held = sum(1 for e in m.entries if e.captures)
    calls = sum(len(e.captures) for e in m.entries)
    stored = done.input_bytes + done.output_bytes
    what = f"{held} of {len(m.entries)} signatures captured" if held != len(m.entries) else f"{held} signatures"
    calls = f", {calls} calls" if calls != held else ""
    digests = "; outputs as digests only" if m.settings.get("digests_only") else ""
    lines = [f"capsule written to {path}: {_size(done.size)} ({what}{calls}; tensor data {_size(stored)}: inputs "
             f"{_size(done.input_bytes)}, outputs {_size(done.output_bytes)}{digests})"]
    if m.left_out:
        lines.append(f"left out by the byte budget (--capture-budget {budget_mib} MiB): {len(m.left_out)}")
        for x in m.left_out:
            what = "inputs: not replayable" if x.what == "inputs" else "outputs: kept as digests only"
            lines.append(f"  {x.op} {x.id} ({what}; a --capture-budget of {-(-x.nbytes // 2**20)} MiB would hold it)")
    else:
        lines.append("left out by the byte budget: nothing")
    skipped = [e for e in m.entries if e.skip_reason and e.skip_reason != "capture budget"]
    if skipped:
        reasons: dict[str, int] = {}
        for e in skipped:
            reasons[e.skip_reason] = reasons.get(e.skip_reason, 0) + 1
        lines.append("not captured: " + ", ".join(f"{n} ({r})" for r, n in sorted(reasons.items())))
    return "\n".join(lines) + "\n"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _progress(quiet: bool, desc: str) -> tuple[Any, Any]:
    if quiet or sys.stderr.isatty():
        return progress(not quiet, desc)
    return plain_progress(desc)


def parse_fail_on(text: str) -> tuple:
    """``differs,raises`` → ``across`` values and verdicts; ``none`` → nothing fails (an empty list is refused, see
    :data:`~opaudit.cli.options.EMPTY_FAIL_ON`)."""
    from opaudit.data.across import Across
    from opaudit.data.verdict import Verdict

    if text.strip().lower() == "none":
        return ()
    if not text.replace(",", "").strip():
        raise argparse.ArgumentTypeError(EMPTY_FAIL_ON)
    out: list[Any] = []
    for t in (t.strip() for t in text.split(",")):
        if not t:
            continue
        found = [k for k in (Across, Verdict) if t in {v.value for v in k}]
        if not found:
            raise argparse.ArgumentTypeError(
                f"unknown value {t!r} (across: {', '.join(a.value for a in Across)}; "
                f"verdicts: {', '.join(v.value for v in Verdict)})")
        out += [k(t) for k in found]
    return tuple(out)


def _replay_parser() -> Parser:
    p = Parser(prog="opaudit replay",
               description="Replay a capsule written by 'opaudit capture' here, with no script, and name every op "
                           "whose bits differ from the machine that captured it ('across'), beside the audit's "
                           "verdict measured here.")
    p.add_argument("capsule", type=file_name, help="the capsule file (step.opcap)")
    p.add_argument("--device", metavar="DEV",
                   help="replay on DEV (cpu, cuda, cuda:1); default: where each op was captured if this machine "
                        "has it, else cpu")
    p.add_argument("--reps", type=bounded(MAX_REPS), default=5, metavar="N", help="replays per mode (default 5)")
    p.add_argument("--threads", type=bounded(MAX_THREADS), metavar="N",
                   help="torch.set_num_threads(N) before replaying")
    p.add_argument("--fail-on", type=parse_fail_on, default=parse_fail_on(DEFAULT_FAIL_ON), metavar="LIST",
                   help=f"across values and local verdicts that make the exit code 1 (default {DEFAULT_FAIL_ON}; "
                        "'none' for never)")
    p.add_argument("--exit-zero", action="store_true", help="exit 0 even when ops match --fail-on")
    p.add_argument("--isolate", action="store_true",
                   help="replay in a worker process: an op that kills it is 'unsupported' (crashed: ...) and a new "
                        "worker goes on")
    p.add_argument("--op-timeout", type=positive_float, metavar="SECONDS",
                   help="skip an op whose replay takes longer (implies --isolate)")
    p.add_argument("--max-memory", type=bounded(MAX_BUDGET_MIB), metavar="MIB",
                   help="refuse a capsule that declares more tensor data than this, or one tensor (as if dense) "
                        "larger (default: this machine's memory)")
    p.add_argument("--no-timing", action="store_true", help="leave timings out (byte-stable output)")
    p.add_argument("--show-all", action="store_true", help="list every op in the terminal table, 'same' ones too")
    add_output_options(p, "write the document here (format from the extension)",
                       formats=("yaml", "json", "csv", "md", "html", "sarif", "table"),
                       quiet="no progress and no summary on stderr")
    return p


def replay_main(argv: list[str]) -> int:
    """``opaudit replay step.opcap [options]``."""
    args = _replay_parser().parse_args(argv)
    output = check_output(args.output, {"the capsule": args.capsule})
    check_format(args.format, output)
    import torch

    from opaudit.flows.capsule import check_device, replay_capsule

    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    update, close = _progress(args.quiet, "replaying")
    try:
        doc = replay_capsule(args.capsule, reps=args.reps, device=device,
                             limit=args.max_memory * 2**20 if args.max_memory else None,
                             timings=not args.no_timing, isolate=args.isolate, op_timeout=args.op_timeout,
                             on_progress=update)
    except KeyboardInterrupt as e:
        close()
        partial = getattr(e, "report", None)
        if partial is None:
            raise
        emit_partial(partial, args.format, output, interruption(e), kind="replay")
        return interrupted_code(e)
    finally:
        close()
    emit(doc, "replay", args.format, output, args.quiet, show_all=args.show_all)
    if not args.quiet and not output and args.format and args.format != "table":
        from opaudit.cli.formats.replay import summary_line

        sys.stderr.write(summary_line(doc) + "\n")
    failing = doc.failing(args.fail_on)
    if failing and not args.exit_zero:
        if not args.quiet:
            sys.stderr.write(f"opaudit: {len(failing)} op(s) match --fail-on\n")
        return EXIT_FINDINGS
    return EXIT_OK

