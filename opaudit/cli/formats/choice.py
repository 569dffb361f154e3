"""What a renderer is chosen by: the document kind and the output :class:`Format`."""

from __future__ import annotations

import enum
import os

from opaudit.data.errors import OpauditError


class Kind(str, enum.Enum):
    """The documents opaudit writes."""

    REPORT = "report"
    CATALOG = "catalog"
    DIFF = "diff"
    PREDICTION = "prediction"


class FormatError(OpauditError, ValueError):
    """An unknown format name or output extension."""


class Format(str, enum.Enum):
    """Output formats of every document; the value is the name ``--format`` takes."""

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

_ALIASES = {"yml": "yaml", "markdown": "md", "txt": "table"}
