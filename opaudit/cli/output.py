"""Where a command's document and progress go: :func:`emit` (a file written atomically, or stdout, with a
summary on stderr), partial reports, and progress on stderr (a bar on a terminal, plain lines in a log)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from opaudit.cli.options import raise_if_signalled


def progress(enabled: bool, desc: str = "replaying", unit: str = "sig"
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


def plain_progress(desc: str = "replaying", unit: str = "signatures"
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


def run_check_progress(enabled: bool) -> tuple[Callable[[str, int, int], None] | None, Callable[[], None]]:
    if not enabled:
        return None, lambda: None

    def show(mode: str, i: int, runs: int) -> None:
        sys.stderr.write(f"\rrun check: {mode} mode, run {i}/{runs}   ")
        sys.stderr.flush()

    def clear() -> None:
        sys.stderr.write("\r" + " " * 48 + "\r")

    return show, clear


def check_format(fmt_name: str | None, output: str | None, kind: str = "report") -> None:
    """Refuse an unknown ``--format``, an ``-o`` extension with no format, or a format the document
    ``kind`` is not written in (SARIF for a catalog), before any work is done."""
    from opaudit.cli.formats import Format, Kind
    from opaudit.cli.formats.choice import check_kind

    if fmt_name:
        check_kind(Kind(kind), Format.parse(fmt_name))
    elif output:
        check_kind(Kind(kind), Format.from_path(output))


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
    from opaudit.data.fileio import write_output, write_stdout

    if getattr(document, "complete", True) is not False:
        raise_if_signalled()  # a signal whose interrupt something swallowed: never a complete document after it
    kind = Kind(kind)

    def text(fmt: Format, written_to: str | None = None) -> str:
        if kind is Kind.REPORT and fmt is Format.TABLE:
            return table_format.report(document, show_all=show_all, written_to=written_to)
        if kind is Kind.REPLAY and fmt is Format.TABLE:
            from opaudit.cli.formats import replay

            return replay.table(document, show_all=show_all)
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
    write_stdout(text(fmt))
    if kind is Kind.REPORT and fmt is not Format.TABLE and not quiet:
        # The report went to stdout for a program; the person still gets the outcome
        # (CSV has no place for the whole-step checks at all).
        from opaudit.cli.formats.table import outcome

        sys.stderr.write(outcome(document))


def emit_partial(partial: Any, fmt_name: str | None, output: str | None, why: str, kind: str = "report") -> None:
    """Write a partial document (``complete: false``) of ``kind`` and say where it went."""
    if output:
        emit(partial, kind, fmt_name, output, quiet=True)
        sys.stderr.write(f"opaudit: {why}; partial {kind} (complete: false) written to {output}\n")
        return
    from opaudit.data.fileio import FileError

    try:
        emit(partial, kind, fmt_name, None, quiet=True)
    except (OSError, FileError):
        pass  # the reader of our stdout may have been interrupted too
    sys.stderr.write(f"opaudit: {why}; the {kind} above is partial (complete: false)\n")
