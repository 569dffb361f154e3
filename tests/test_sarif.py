"""SARIF 2.1.0 for the audit report: valid against the official schema, one result per finding at the user's line.

The schema is OASIS's ``sarif-schema-2.1.0.json`` (errata 01, from github.com/oasis-tcs/sarif-spec,
``sarif-2.1/schema/``), kept as a fixture: the tests need no network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse

import jsonschema
import pytest
from fixtures.review import PUT_LINE, SCRIPT_NAME, documents

from opaudit.cli.formats import Format, FormatError, Kind, render
from opaudit.cli.formats.sarif import LEVELS
from opaudit.data.report import Finding, Report, load
from opaudit.data.site import Site
from opaudit.data.verdict import Verdict
from opaudit.data.version import __version__

SCHEMA = os.path.join(os.path.dirname(__file__), "fixtures", "sarif-schema-2.1.0.json")


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return documents(str(tmp_path_factory.getbasetemp() / "review"))


@pytest.fixture(scope="module")
def report(docs):
    return load(docs.report_yaml)


def _validate(log: dict) -> None:
    schema = json.load(open(SCHEMA))
    jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER).validate(log)


def test_a_real_audit_is_valid_sarif_with_one_result_per_finding(report):
    log = json.loads(render(report, Kind.REPORT, Format.SARIF))
    _validate(log)
    assert log["version"] == "2.1.0"
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert (driver["name"], driver["version"]) == ("opaudit", __version__)
    notable = [f for f in report.all_findings if f.verdict is not Verdict.STABLE]
    assert len(run["results"]) == len(notable) >= 3  # raises, random, uninitialized; stable ones are no results
    assert [r["ruleId"] for r in run["results"]] == [f"{f.verdict.value}/{f.op}" for f in notable]
    rules = {r["id"]: r for r in driver["rules"]}
    for result in run["results"]:
        rule = driver["rules"][result["ruleIndex"]]
        assert rule["id"] == result["ruleId"] and rule["fullDescription"]["text"]
        assert result["level"] == rule["defaultConfiguration"]["level"]
    assert {r["ruleId"]: r["level"] for r in run["results"]} == {
        "raises/aten.put_.default": "error", "random/aten.rand.default": "note",
        "random/aten.randn.default": "note", "uninitialized/aten.empty.memory_format": "note"}
    put = report.finding("aten.put_.default")
    assert rules["raises/aten.put_.default"]["help"]["text"] == put.remedy  # the remedy as the rule's help
    message = next(r for r in run["results"] if r["ruleId"] == "raises/aten.put_.default")["message"]["text"]
    assert put.strict_error in message and put.remedy in message


def test_an_op_of_a_custom_backward_is_placed_at_its_own_line_relative_to_the_audit_folder(report):
    run = json.loads(render(report, Kind.REPORT, Format.SARIF))["runs"][0]
    result = next(r for r in run["results"] if r["ruleId"] == "raises/aten.put_.default")
    assert report.finding("aten.put_.default").phases == ("backward",)
    (location,) = result["locations"]
    physical = location["physicalLocation"]
    # The file name is markup: a URI escapes it; the path stays relative, against %SRCROOT%.
    assert physical["artifactLocation"] == {"uri": urllib.parse.quote(SCRIPT_NAME), "uriBaseId": "%SRCROOT%"}
    assert urllib.parse.unquote(physical["artifactLocation"]["uri"]) == SCRIPT_NAME
    assert physical["region"] == {"startLine": PUT_LINE}  # the put_ in backward(), where PyTorch's traceback points
    assert "%SRCROOT%" in run["originalUriBaseIds"]


def test_sarif_is_byte_stable_and_keeps_no_absolute_path(report, docs):
    text = render(report, Kind.REPORT, Format.SARIF)
    assert text == render(load(docs.report_yaml), Kind.REPORT, Format.SARIF)
    assert docs.folder not in text and "file://" not in text


def test_levels_follow_the_verdict():
    """Every verdict has a documented level; raises and diverges* are errors, warns a warning, stable no result."""
    assert set(LEVELS) == set(Verdict)
    assert {v for v, level in LEVELS.items() if level == "error"} == {
        Verdict.RAISES, Verdict.DIVERGES, Verdict.DIVERGES_DETERMINISTIC}
    assert LEVELS[Verdict.WARNS] == "warning" and LEVELS[Verdict.STABLE] is None
    findings = tuple(Finding(id=f"id{i}", op=f"aten.op{i}.default", verdict=v, calls=1, signature="f32[2]",
                             sites=(Site("train.py", 10 + i, "step", ""),), default_diverged="3/5" if "div" in v.value
                             else "0/5", deterministic_diverged="1/5" if v is Verdict.DIVERGES_DETERMINISTIC else "0/5",
                             max_abs_diff=0.5)
                     for i, v in enumerate(Verdict))
    report = Report(environment={"torch": "2.13.0"}, settings={"script": "train.py"}, all_findings=findings)
    log = json.loads(render(report, Kind.REPORT, Format.SARIF))
    _validate(log)
    levels = {r["properties"]["verdict"]: r["level"] for r in log["runs"][0]["results"]}
    assert levels == {v.value: level for v, level in LEVELS.items() if level is not None}


def test_sarif_is_for_reports_only(docs):
    """A catalog, diff or prediction has no results at source lines: refused at once, one line, exit 2."""
    from opaudit.data.catalog import load_catalog

    with pytest.raises(FormatError, match="audit reports, capsule replays and trace comparisons only"):
        render(load_catalog(docs.catalog_yaml), Kind.CATALOG, Format.SARIF)
    proc = subprocess.run([sys.executable, "-m", "opaudit", "catalog", "--from", docs.catalog_yaml, "-o",
                           os.path.join(docs.folder, "c.sarif")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "opaudit: error: sarif is written for audit reports, capsule replays and trace comparisons only, not for a "
        "catalog; use html, "
        "md, csv, yaml or json"]
    assert not os.path.exists(os.path.join(docs.folder, "c.sarif"))
