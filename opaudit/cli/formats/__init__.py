"""Renderers of every document (report, catalog, diff, prediction) in every :class:`Format`.

:data:`~opaudit.cli.formats.registry.RENDERERS` maps each (kind, format) pair to its
renderer; :func:`render` looks it up.
"""

from opaudit.cli.formats.choice import REPORT_ONLY, Format, FormatError, Kind
from opaudit.cli.formats.registry import RENDERERS, render

__all__ = ["Format", "FormatError", "Kind", "RENDERERS", "REPORT_ONLY", "render"]
