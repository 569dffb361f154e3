"""One explicit map from (document kind, format) to the function that renders it.

pip-audit's shape: the map is written out, not built from module names, so a reader
(and ``tests/test_formats.py``, which checks it is exhaustive) sees every renderer.
pandas and tabulate are imported inside the renderers that need them, so importing
this stays light.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from opaudit.cli.formats import (
    catalog_csv,
    catalog_markdown,
    catalog_table,
    csv_,
    diff_csv,
    diff_markdown,
    diff_table,
    markdown,
    prediction_csv,
    prediction_markdown,
    prediction_table,
    table,
)
from opaudit.cli.formats.choice import Format, Kind
from opaudit.data.files import dump_yaml


def as_yaml(document: Any) -> str:
    """Any document's dict form as stable YAML (the file form, read back by its loader)."""
    return dump_yaml(document.to_dict())


def as_json(document: Any) -> str:
    """Any document's dict form as indented JSON: the same content as the YAML."""
    return json.dumps(document.to_dict(), indent=2, ensure_ascii=False) + "\n"


Renderer = Callable[[Any], str]

RENDERERS: dict[tuple[Kind, Format], Renderer] = {
    (Kind.REPORT, Format.YAML): as_yaml,
    (Kind.REPORT, Format.JSON): as_json,
    (Kind.REPORT, Format.CSV): csv_.render,
    (Kind.REPORT, Format.MARKDOWN): markdown.render,
    (Kind.REPORT, Format.TABLE): table.render,
    (Kind.CATALOG, Format.YAML): as_yaml,
    (Kind.CATALOG, Format.JSON): as_json,
    (Kind.CATALOG, Format.CSV): catalog_csv.render,
    (Kind.CATALOG, Format.MARKDOWN): catalog_markdown.render,
    (Kind.CATALOG, Format.TABLE): catalog_table.render,
    (Kind.DIFF, Format.YAML): as_yaml,
    (Kind.DIFF, Format.JSON): as_json,
    (Kind.DIFF, Format.CSV): diff_csv.render,
    (Kind.DIFF, Format.MARKDOWN): diff_markdown.render,
    (Kind.DIFF, Format.TABLE): diff_table.render,
    (Kind.PREDICTION, Format.YAML): as_yaml,
    (Kind.PREDICTION, Format.JSON): as_json,
    (Kind.PREDICTION, Format.CSV): prediction_csv.render,
    (Kind.PREDICTION, Format.MARKDOWN): prediction_markdown.render,
    (Kind.PREDICTION, Format.TABLE): prediction_table.render,
}
"""Every (kind, format) pair: each document kind is written in every format."""


def render(document: Any, kind: Kind | str, fmt: Format) -> str:
    """``document`` (a report, catalog, diff or prediction) as text in ``fmt``."""
    return RENDERERS[(Kind(kind), fmt)](document)
