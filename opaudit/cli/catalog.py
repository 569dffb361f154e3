"""``opaudit catalog``: sweep every op on one device (sharded over ranks under torchrun), or convert a catalog."""

from __future__ import annotations

import os
import sys

from opaudit.cli.options import (
    EXIT_OK,
    MAX_REPS,
    MAX_STRESS_ELEMENTS,
    MAX_THREADS,
    Parser,
    UsageError,
    add_output_options,
    bounded,
    check_output,
    file_name,
    interrupted_code,
    interruption,
    positive_float,
    positive_int,
)
from opaudit.cli.output import check_format, emit, progress


def _catalog_parser() -> Parser:
    from opaudit.flows import catalog as c

    p = Parser(prog="opaudit catalog",
                description="Sweep the ops of PyTorch's OpInfo database (and the torch.nn modules it does not "
                            "cover) on one device, forward and backward, on OpInfo's samples and on stress "
                            "inputs, and classify each op like an audit does. Needs: pip install "
                            "'opaudit[catalog]'.")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--ops", metavar="GLOBS", help="comma-separated globs over OpInfo names (index_put, "
                   "nn.functional.max_unpool2d), aten names (aten.index_put*) and modules (nn.LSTM); default all")
    p.add_argument("--dtypes", metavar="LIST", default=",".join(c.DEFAULT_DTYPES),
                   help=f"comma-separated dtypes, or all: every dtype each op supports on the device (default "
                        f"{','.join(c.DEFAULT_DTYPES)})")
    add_output_options(p, "write the catalog here (format from the extension; a partial file PATH.partial is kept "
                          "while the sweep runs)", formats=("yaml", "json", "csv", "md", "html", "table"),
                       default="yaml", quiet="no progress bar and no summary on stderr",
                       debug="show full tracebacks, and the worker's stderr")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep from -o's partial file")
    p.add_argument("--from", dest="source", type=file_name, metavar="CATALOG",
                   help="no sweep: convert an existing catalog file to -o / --format (e.g. the Markdown export)")
    p.add_argument("--no-stress", action="store_true", help="OpInfo's own samples only (no scaled inputs)")
    p.add_argument("--stress-elements", type=bounded(MAX_STRESS_ELEMENTS), default=c.STRESS_ELEMENTS, metavar="N",
                   help=f"size of a stress sample in elements (default {c.STRESS_ELEMENTS:,})")
    p.add_argument("--reps", type=bounded(MAX_REPS), default=c.DEFAULT_REPS, metavar="N",
                   help=f"replays per mode (default {c.DEFAULT_REPS}; {c.DEFAULT_INDEX_REPS} for stress signatures "
                        "with an index argument)")
    p.add_argument("--max-samples", type=positive_int, default=c.DEFAULT_MAX_SAMPLES, metavar="N",
                   help=f"OpInfo samples per op and dtype (default {c.DEFAULT_MAX_SAMPLES})")
    p.add_argument("--op-timeout", type=positive_float, default=c.DEFAULT_OP_TIMEOUT, metavar="SECONDS",
                   help=f"time limit per op and dtype (default {c.DEFAULT_OP_TIMEOUT:g}); the worker is killed "
                        "at 1.5x that plus 30 s and the op recorded as timeout")
    p.add_argument("--threads", type=bounded(MAX_THREADS), metavar="N", help="torch.set_num_threads(N) in the worker")
    p.add_argument("--no-modules", action="store_true", help="skip the torch.nn modules OpInfo does not cover")
    p.add_argument("--dist-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                   help="under torchrun (a sharded sweep), time limit for reaching torchrun's store")
    p.add_argument("--in-process", action="store_true",
                   help="run ops in this process (faster start; no hard time limit, a crashing op ends the sweep)")
    p.add_argument("--batch-invariance", action="store_true",
                   help="after the sweep, check the matmul family, reductions, normalisations, softmax and attention "
                        "(those --ops selects) for batch invariance over 1..128 rows of 256")
    return p


SWEEP_ONLY = ("device", "ops", "dtypes", "resume", "no_stress", "stress_elements", "reps", "max_samples",
              "op_timeout", "threads", "no_modules", "dist_timeout", "in_process", "batch_invariance")
"""Options that steer a sweep, which ``--from`` does not run: refused beside it rather than ignored."""


def catalog_main(argv: list[str]) -> int:
    """``opaudit catalog [options]``."""
    parser = _catalog_parser()
    args = parser.parse_args(argv)
    output = check_output(args.output, {"the --from catalog": args.source})
    check_format(args.format, output, "catalog")
    from opaudit.flows.catalog import CatalogRequest, SweepConfig, build_catalog, load_catalog, partial_path

    if args.source:
        given = [name for name in SWEEP_ONLY if getattr(args, name) != parser.get_default(name)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag} steers a sweep, and --from runs none (it converts {args.source})")
        emit(load_catalog(args.source), "catalog", args.format, output, args.quiet, default="yaml")
        return EXIT_OK
    ops = ()
    if args.ops is not None:
        ops = tuple(g.strip() for g in args.ops.split(",") if g.strip())
        if not ops:
            raise UsageError("--ops: no op given (leave --ops out to sweep every op)")
    if args.resume and not output:
        raise UsageError("--resume needs -o PATH: the sweep resumes from PATH.partial")
    from opaudit.data.fileio import is_replaced

    # A device or FIFO output gets no PATH.partial beside it (/dev/null.partial).
    partial = partial_path(output) if output and is_replaced(output) else None
    if args.resume and partial is None:
        raise UsageError(f"--resume needs -o to name a regular file, not {output}")
    if args.resume:
        check_output(args.output, {"the --resume partial file": partial})
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
    update, close = progress(not args.quiet and sys.stderr.isatty(), "sweeping", "op")
    if world is not None:
        update = shard.with_test_stop(update, world)
    # SIGTERM and SIGHUP interrupt the sweep like Ctrl-C (opaudit.cli.main installs the handlers): the partial
    # file is written at once and the worker stopped. Under torchrun SIGTERM is also how the agent stops the other
    # ranks when one fails or the job is interrupted: each shard then keeps its partial file for --resume.
    try:
        config = SweepConfig(device=device or args.device, stress=not args.no_stress, reps=args.reps,
                             op_timeout=args.op_timeout, max_samples=args.max_samples,
                             stress_elements=args.stress_elements)
        request = CatalogRequest(
            config, ops=ops, dtypes=args.dtypes,
            modules=not args.no_modules, resume=partial if args.resume else None, partial=partial,
            isolate=not args.in_process, threads=args.threads, quiet_worker=not args.debug,
            batch_invariance=args.batch_invariance and (world is None or world.rank == 0),
            shard=(world.rank, world.world_size) if world is not None else None)
        catalog = build_catalog(request, on_progress=update)
    except KeyboardInterrupt as e:
        close()
        why = interruption(e)
        if partial and os.path.exists(partial):  # none yet if the worker had not started
            sys.stderr.write(f"opaudit: {why}; resume with: opaudit catalog ... -o {args.output} --resume\n")
        else:
            sys.stderr.write(f"opaudit: {why}\n")
        return interrupted_code(e)
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
        from opaudit.cli.formats import Format, Kind, render

        sys.stderr.write(render(catalog, Kind.CATALOG, Format.TABLE).splitlines()[-1] + "\n")
    return EXIT_OK
