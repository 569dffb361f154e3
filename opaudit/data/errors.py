"""The one base of every error opaudit raises on purpose.

Each layer defines its own errors (``ModelLoadError`` in the loader,
``CatalogError`` in the catalog flow...), and each subclasses
:class:`OpauditError`. The command line catches the base once and turns it into
a one-line message and :attr:`OpauditError.exit_code`: a rename cannot turn a
user's mistake into an "internal error", and there is no list of error names to
keep in step (the shape of pip-audit's ``ServiceError``).
"""

from __future__ import annotations

EXIT_ERROR = 2
"""Exit code of usage, input-file, model-load and user-code errors."""


class OpauditError(Exception):
    """An error the user can act on: the CLI prints ``opaudit: error: <message>`` and exits with :attr:`exit_code`."""

    exit_code: int = EXIT_ERROR
    """The command's exit status when this error ends it."""

    @property
    def detail(self) -> str:
        """Text printed before the one-line message (a user traceback), or ``""``."""
        return ""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every path that writes a partial report on
    Ctrl-C does so on a CI job's timeout too; the exit code is 143 instead of 130."""


def interruption(e: BaseException) -> str:
    """How messages and reports name an interrupt: ``terminated`` (SIGTERM, SIGHUP) or ``interrupted``."""
    return "terminated" if isinstance(e, Terminated) else "interrupted"
