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
    REPLAY = "replay"
    COMPARISON = "comparison"


class FormatError(OpauditError, ValueError):
    """An unknown format name or output extension."""


class Format(str, enum.Enum):
    """Output formats of every document; the value is the name ``--format`` takes."""

    YAML = "yaml"
    JSON = "json"
    CSV = "csv"
    MARKDOWN = "md"
    TABLE = "table"
    HTML = "html"
    SARIF = "sarif"

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
            raise FormatError(f"{path}: unknown extension .{ext} (use .yaml, .json, .csv, .md, .html or .sarif, or --format)") from None

_ALIASES = {"yml": "yaml", "markdown": "md", "txt": "table", "htm": "html"}

REPORT_ONLY = frozenset({Format.SARIF})
"""Formats written only for the documents whose rows sit at source lines (:data:`SITE_KINDS`): SARIF's
results sit at lines, and a catalog's entries, a diff's changes and a prediction's rows have none."""

SITE_KINDS = frozenset({Kind.REPORT, Kind.REPLAY, Kind.COMPARISON})
"""The documents whose rows have the user's source lines: an audit report, a capsule replay (its ops
carry the sites where they were captured) and a trace comparison (its root cause's line)."""


def check_kind(kind: Kind, fmt: Format) -> None:
    """Refuse a format the document kind is not written in (``sarif`` for a catalog, diff or prediction)."""
    if fmt in REPORT_ONLY and kind not in SITE_KINDS:
        raise FormatError(f"{fmt.value} is written for audit reports, capsule replays and trace comparisons only, not for a "
                          f"{kind.value}; use html, md, csv, yaml or json")
