"""Presentation, the top layer: the command line and the renderers of every document format."""

import sys

try:
    from opaudit.cli.main import main
except KeyboardInterrupt:
    # Ctrl-C while the command line loads, before its signal handlers are in place
    # (``opaudit`` and ``python -m opaudit`` import it here first): one line and 130, not a traceback.
    if sys.stderr is not None:
        sys.stderr.write("opaudit: interrupted\n")
    raise SystemExit(130) from None

__all__ = ["main"]
