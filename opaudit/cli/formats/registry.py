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
    comparison,
    csv_,
    html,
    html_catalog,
    html_compare,
    html_replay,
    markdown,
    replay,
    sarif,
    table,
)
from opaudit.cli.formats.choice import Format, Kind, check_kind
from opaudit.cli.formats.escape import json_text, visible
from opaudit.data.files import dump_yaml


def as_yaml(document: Any) -> str:
    """Any document's dict form as stable YAML (the file form, read back by its loader)."""
    return dump_yaml(document.to_dict())


def as_json(document: Any) -> str:
    """Any document's dict form as indented JSON: the same content as the YAML."""
    return json_text(json.dumps(document.to_dict(), indent=2, ensure_ascii=False)) + "\n"


Renderer = Callable[[Any], str]

RENDERERS: dict[tuple[Kind, Format], Renderer] = {
    (Kind.REPORT, Format.YAML): as_yaml,
    (Kind.REPORT, Format.JSON): as_json,
    (Kind.REPORT, Format.CSV): csv_.report,
    (Kind.REPORT, Format.MARKDOWN): markdown.report,
    (Kind.REPORT, Format.TABLE): table.report,
    (Kind.REPORT, Format.HTML): html.report,
    (Kind.REPORT, Format.SARIF): sarif.report,
    (Kind.CATALOG, Format.YAML): as_yaml,
    (Kind.CATALOG, Format.JSON): as_json,
    (Kind.CATALOG, Format.CSV): csv_.catalog,
    (Kind.CATALOG, Format.MARKDOWN): markdown.catalog,
    (Kind.CATALOG, Format.TABLE): table.catalog,
    (Kind.CATALOG, Format.HTML): html_catalog.catalog,
    (Kind.DIFF, Format.YAML): as_yaml,
    (Kind.DIFF, Format.JSON): as_json,
    (Kind.DIFF, Format.CSV): csv_.diff,
    (Kind.DIFF, Format.MARKDOWN): markdown.diff,
    (Kind.DIFF, Format.TABLE): table.diff,
    (Kind.DIFF, Format.HTML): html_catalog.diff,
    (Kind.PREDICTION, Format.YAML): as_yaml,
    (Kind.PREDICTION, Format.JSON): as_json,
    (Kind.PREDICTION, Format.CSV): csv_.prediction,
    (Kind.PREDICTION, Format.MARKDOWN): markdown.prediction,
    (Kind.PREDICTION, Format.TABLE): table.prediction,
    (Kind.PREDICTION, Format.HTML): html_catalog.prediction,
    (Kind.REPLAY, Format.YAML): as_yaml,
    (Kind.REPLAY, Format.JSON): as_json,
    (Kind.REPLAY, Format.CSV): replay.csv,
    (Kind.REPLAY, Format.MARKDOWN): replay.markdown,
    (Kind.REPLAY, Format.TABLE): replay.table,
    (Kind.REPLAY, Format.HTML): html_replay.page,
    (Kind.REPLAY, Format.SARIF): sarif.replay,
    (Kind.COMPARISON, Format.YAML): as_yaml,
    (Kind.COMPARISON, Format.JSON): as_json,
    (Kind.COMPARISON, Format.CSV): comparison.csv_form,
    (Kind.COMPARISON, Format.MARKDOWN): comparison.markdown,
    (Kind.COMPARISON, Format.TABLE): comparison.table,
    (Kind.COMPARISON, Format.HTML): html_compare.page,
    (Kind.COMPARISON, Format.SARIF): sarif.comparison,
}
"""Every (kind, format) pair: each document kind is written in every format but the
:data:`~opaudit.cli.formats.choice.REPORT_ONLY` ones (SARIF), which only the kinds with source lines
(:data:`~opaudit.cli.formats.choice.SITE_KINDS`: a report, a capsule replay, a trace comparison) are."""


def render(document: Any, kind: Kind | str, fmt: Format) -> str:
    """``document`` (a report, catalog, diff, prediction, capsule replay or trace comparison) as text in ``fmt``.

    :class:`~opaudit.cli.formats.choice.FormatError` for a format its kind is not written in.
    """
    kind = Kind(kind)
    check_kind(kind, fmt)
    text = RENDERERS[(kind, fmt)](document)
    # Control characters a file or the audited code put in a name or a message are escaped in the whole text
    # (visible()), so that nothing reaches a terminal that shows the file raw (cat, a pager); SARIF is JSON,
    # kept exact with \u escapes as as_json does.
    if fmt is Format.SARIF:
        return json_text(text)
    return visible(text) if fmt in (Format.MARKDOWN, Format.HTML, Format.CSV) else text
