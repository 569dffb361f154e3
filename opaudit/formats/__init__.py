"""One renderer per output format, chosen by :class:`Format`.

Each module exposes ``render(report) -> str``. pandas and tabulate are imported
inside the renderers that need them, so ``import opaudit`` stays light.
"""

from __future__ import annotations

import enum
import importlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opaudit.report import Report


class FormatError(ValueError):
    """An unknown format name or output extension."""


class Format(str, enum.Enum):
    """Report output formats; each value names the module that renders it."""

    YAML = "yaml"
    JSON = "json"
    CSV = "csv"
    MARKDOWN = "md"
    TABLE = "table"

    @classmethod
    def parse(cls, name: str) -> "Format":
        """A format from its name (``markdown`` and ``yml`` accepted too)."""
        key = _ALIASES.get(name.lower(), name.lower())
        try:
            return cls(key)
        except ValueError:
            raise FormatError(f"unknown format {name!r} (choose from {', '.join(f.value for f in cls)})") from None

    @classmethod
    def from_path(cls, path: str) -> "Format":
        """The format an output file's extension implies."""
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        if not ext:
            raise FormatError(f"{path}: no extension to tell the format from; use --format")
        try:
            return cls.parse(ext)
        except FormatError:
            raise FormatError(f"{path}: unknown extension .{ext} (use .yaml, .json, .csv or .md, or --format)") from None

    @property
    def module(self) -> str:
        """Module under ``opaudit.formats`` that renders this format."""
        return {"md": "markdown", "yaml": "yaml_", "json": "json_", "csv": "csv_"}.get(self.value, self.value)


_ALIASES = {"yml": "yaml", "markdown": "md", "txt": "table"}


def render(report: "Report", fmt: Format) -> str:
    """``report`` as text in ``fmt``."""
    mod = importlib.import_module(f"opaudit.formats.{fmt.module}")
    return mod.render(report)
