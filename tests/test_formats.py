"""The renderer registry: every document kind is written in every format, through one explicit map."""

from __future__ import annotations

import json

import yaml

from opaudit.cli.formats import RENDERERS, REPORT_ONLY, Format, Kind, render
from opaudit.cli.formats.choice import SITE_KINDS
from opaudit.data.report import Finding, Report, Site
from opaudit.data.verdict import Verdict


def test_registry_is_exhaustive():
    """Every kind in every format, but SARIF (results at source lines) for reports, capsule replays and trace comparisons only."""
    assert REPORT_ONLY == {Format.SARIF} and SITE_KINDS == {Kind.REPORT, Kind.REPLAY, Kind.COMPARISON}
    assert set(RENDERERS) == {(k, f) for k in Kind for f in Format if f not in REPORT_ONLY or k in SITE_KINDS}


def _report() -> Report:
    f = Finding(id="abc", op="aten.put_.default", verdict=Verdict.RAISES, calls=2, signature="f32[4], i64[2]",
                phases=("forward",), sites=(Site("train.py", 7, "step", "Net.fc"),), first_call=3,
                strict_error="put_ does not have a deterministic implementation")
    return Report(environment={"torch": "2.13.0", "cpu": "x"}, settings={"reps": 2}, all_findings=(f,),
                  total_calls=2)


def test_each_format_of_a_report_is_its_own():
    r = _report()
    assert yaml.safe_load(render(r, Kind.REPORT, Format.YAML))["findings"][0]["op"] == "aten.put_.default"
    assert json.loads(render(r, Kind.REPORT, Format.JSON))["summary"]["raises"] == 1
    assert render(r, Kind.REPORT, Format.CSV).splitlines()[0].startswith("id,op,verdict,")
    assert render(r, Kind.REPORT, Format.MARKDOWN).startswith("# opaudit report")
    table = render(r, Kind.REPORT, Format.TABLE)
    assert "train.py:7" in table and table.rstrip().endswith("1 raises")
    assert render(r, "report", Format.TABLE) == table  # a kind by name is the same kind
