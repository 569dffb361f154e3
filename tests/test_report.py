"""The report model: round trips, byte stability, every format, atomic writes."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
import yaml
from fixtures import models as zoo

import opaudit
from opaudit.cli.formats import Format, FormatError, Kind, render
from opaudit.data.files import ReportError, atomic_write
from opaudit.data.report import ROW_FIELDS, from_dict, load


def _mixed():
    zoo.put_no_accumulate()
    zoo.empty_outputs()
    _, step = zoo.make_mlp_step()
    step()


@pytest.fixture(scope="module")
def report():
    return opaudit.audit(_mixed, reps=2)


@pytest.mark.parametrize("ext", ["yaml", "json"])
def test_round_trip(report, tmp_path, ext):
    path = tmp_path / f"r.{ext}"
    atomic_write(str(path), render(report, Kind.REPORT, Format.parse(ext)))
    again = load(str(path))
    assert again.all_findings == report.all_findings
    assert again.summary == report.summary
    assert again.environment == report.environment
    assert again.settings == report.settings
    assert again.env_warnings == report.env_warnings


def test_report_is_byte_stable_without_timings():
    def once():
        return opaudit.flows.pipeline.build_report(_recorded(), reps=2, timings=False)

    a, b = once(), once()
    assert render(a, Kind.REPORT, Format.YAML) == render(b, Kind.REPORT, Format.YAML)
    text = render(a, Kind.REPORT, Format.YAML)
    assert "time_default_us" not in text
    assert os.getcwd() not in text


def _recorded():
    rec = opaudit.Recorder()
    with rec:
        _mixed()
    return rec


def test_document_header_and_no_absolute_paths(report):
    d = yaml.safe_load(render(report, Kind.REPORT, Format.YAML))
    assert d["format"] == "opaudit-report" and d["version"] == 2 and d["complete"] is True
    assert set(d["summary"]) >= {"raises", "stable", "random", "uninitialized", "view_calls", "total_calls"}
    for f in d["findings"]:
        for s in f["sites"]:
            assert not os.path.isabs(s["file"])


def test_findings_are_sorted_worst_first(report):
    sev = [f.verdict.severity for f in report.all_findings]
    assert sev == sorted(sev, reverse=True)


def test_every_format_renders(report):
    for fmt in Format:
        text = render(report, Kind.REPORT, fmt)
        assert text.strip(), fmt
    assert "aten.put_.default" in render(report, Kind.REPORT, Format.TABLE)
    md = render(report, Kind.REPORT, Format.MARKDOWN)
    assert "## Will deterministic mode crash this run?" in md and "fixtures/models.py:" in md
    json.loads(render(report, Kind.REPORT, Format.JSON))


def test_csv_has_fixed_columns_and_one_row_per_signature(report):
    rows = list(csv.DictReader(io.StringIO(render(report, Kind.REPORT, Format.CSV))))
    assert len(rows) == len(report.all_findings)
    assert tuple(rows[0].keys()) == (*ROW_FIELDS, "complete")


def test_format_from_extension():
    assert Format.from_path("a/b.yml") is Format.YAML
    assert Format.from_path("x.md") is Format.MARKDOWN
    with pytest.raises(FormatError):
        Format.from_path("report.docx")
    with pytest.raises(FormatError):
        Format.parse("xml")


def test_wrong_format_or_version_is_refused(report, tmp_path):
    d = report.to_dict()
    with pytest.raises(ReportError, match="format"):
        from_dict({**d, "format": "something-else"})
    with pytest.raises(ReportError, match="version 3"):
        from_dict({**d, "version": 3})
    assert from_dict({**d, "version": 1}).all_findings == report.all_findings  # version 1 files are still read
    bad = {**d, "findings": [{**d["findings"][0], "calls": "many"}]}
    with pytest.raises(ReportError, match="calls"):
        from_dict(bad)


def test_atomic_write_never_leaves_a_half_written_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("previous report\n")

    with pytest.raises(UnicodeEncodeError):
        atomic_write(str(path), "half a report \ud800")  # a lone surrogate cannot be written
    assert path.read_text() == "previous report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"]
