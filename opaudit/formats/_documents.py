"""Rendering for the documents that are not reports: catalogs, diffs and predictions.

YAML and JSON are the document's own dict form; every other format has one
module per document kind, ``opaudit.formats.<kind>_<format>`` (for example
``catalog_markdown``), exposing ``render(document) -> str``.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from opaudit.formats import Format

KINDS = ("catalog", "diff", "prediction")
"""Document kinds with renderers here."""

_MODULE_SUFFIX = {Format.CSV: "csv", Format.MARKDOWN: "markdown", Format.TABLE: "table"}


def module_name(kind: str, fmt: Format) -> str | None:
    """The module rendering ``kind`` in ``fmt``, or ``None`` for YAML and JSON (the dict form)."""
    if kind not in KINDS:
        raise ValueError(f"unknown document kind {kind!r}")
    suffix = _MODULE_SUFFIX.get(fmt)
    return f"opaudit.formats.{kind}_{suffix}" if suffix else None


def render_document(document: Any, fmt: Format, kind: str) -> str:
    """``document`` (anything with ``to_dict()``) as text in ``fmt``."""
    if fmt is Format.YAML:
        from opaudit.formats.yaml_ import dump

        return dump(document.to_dict())
    if fmt is Format.JSON:
        return json.dumps(document.to_dict(), indent=2, ensure_ascii=False) + "\n"
    name = module_name(kind, fmt)
    assert name is not None
    return importlib.import_module(name).render(document)
