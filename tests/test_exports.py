"""Exports under hostile names: CSV cells never run as formulas, Markdown never carries raw
HTML, and every Markdown table opaudit writes renders as a table.

The names are real: a script file named like a formula, a module registered under an
HTML name, a catalog file whose ``op``/``source``/``error`` fields were edited by hand.
Markdown is checked with a real CommonMark + tables renderer (markdown-it-py).
"""

from __future__ import annotations

import csv
import io
import json
import re
import textwrap

import pytest
import yaml
from conftest import ROOT
from markdown_it import MarkdownIt

from opaudit.cli import main
from opaudit.cli.formats.escape import csv_cell, md_code, md_text

HTML = "<img src=x onerror=alert(1)>"
FORMULA = '=HYPERLINK("http://evil.example","click")'
MODULE = HTML + "|=cmd|' /C calc'!A0"  # no dots: torch refuses them in module names
NASTY = f"{HTML}|{FORMULA}\nsecond line `tick` *bold* [link](javascript:alert(1))"
ALLOWED_HTML = {"<details><summary>Show the list</summary>", "</details>"}
_MD = MarkdownIt("commonmark").enable("table")


def _unescaped_pipes(line: str) -> int:
    n, i = 0, 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        n += line[i] == "|"
        i += 1
    return n


def check_markdown(text: str) -> str:
    """Every table renders as a table with one column count; no HTML but opaudit's own; the HTML."""
    lines = text.splitlines()
    delimiters = [i for i, line in enumerate(lines) if re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line)]
    tokens = _MD.parse(text)
    assert len([t for t in tokens if t.type == "table_open"]) == len(delimiters), "a table does not render"
    for d in delimiters:
        block = [lines[d - 1]]
        for line in lines[d:]:
            if not line.startswith("|"):
                break
            block.append(line)
        counts = {_unescaped_pipes(line) for line in block}
        assert len(counts) == 1, f"rows with different cell counts: {block}"
    html = [t.content.strip() for t in tokens if t.type == "html_block"]
    html += [c.content for t in tokens if t.type == "inline" for c in t.children or () if c.type == "html_inline"]
    assert set(html) <= ALLOWED_HTML, html
    rendered = _MD.render(text)
    assert "<img" not in rendered and "<script" not in rendered and 'href="javascript' not in rendered
    return rendered


def check_csv(text: str) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(text)))
    for row in rows:
        for cell in row:
            if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
                float(cell)  # only numbers may start like a formula
    return rows


def test_escaping_helpers():
    assert [csv_cell(v) for v in ("-0.5", "-inf", "+3", -2, 1.5, "", "ok")] == ["-0.5", "-inf", "+3", -2, 1.5, "",
                                                                               "ok"]
    assert [csv_cell(v) for v in (FORMULA, "-1+1", "@SUM(A1)", "\tx", "+cmd")] == [
        "'" + FORMULA, "'-1+1", "'@SUM(A1)", "'\tx", "'+cmd"]
    check_markdown(f"| a | b |\n|---|---|\n| {md_text(NASTY)} | {md_code('a`b|c')} |\n")
    assert _MD.renderInline(md_code("a`b|c")).count("<code>") == 1


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    """An audit of a script named like a formula, whose module has an HTML name."""
    tmp = tmp_path_factory.mktemp("hostile")
    script = tmp / "=1+2.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from torch import nn

        class Step(nn.Module):
            def forward(self, x):
                return x.put_(torch.tensor([0, 0]), torch.ones(2))  # raises under deterministic mode

        model = nn.Sequential()
        model.add_module({MODULE!r}, Step())
        model(torch.zeros(4))
    """))
    outs = {}
    for ext in ("md", "csv", "yaml"):
        outs[ext] = tmp / f"report.{ext}"
        assert main([str(script), "--reps", "1", "-q", "-o", str(outs[ext])]) == 1
    return outs


def test_report_exports_escape_hostile_names(hostile_report):
    md = hostile_report["md"].read_text()
    assert "max \\|diff\\|" in md
    rendered = check_markdown(md)
    assert "&lt;img src=x onerror=alert(1)&gt;" in rendered  # shown, as text
    rows = check_csv(hostile_report["csv"].read_text())
    header, body = rows[0], rows[1:]
    put = next(dict(zip(header, r)) for r in body if r[header.index("op")] == "aten.put_.default")
    assert put["locations"].startswith("'=1+2.py:")
    assert MODULE in put["modules"]
    assert {r[header.index("complete")] for r in body} == {"True"}


@pytest.fixture(scope="module")
def hostile_catalog(tmp_path_factory):
    data = yaml.safe_load(open(f"{ROOT}/catalogs/cpu-x86_64-torch2.13.0.yaml"))
    raises = next(e for e in data["entries"] if e["verdict"] == "raises")
    raises.update(source=NASTY, error=NASTY)
    data["entries"].append({**raises, "op": f"aten.{FORMULA}`x`|<b>.default", "dtype": "float64"})
    data["entries"].append({**raises, "op": "aten.x.default", "verdict": "skipped", "error": NASTY, "dtype": "int8"})
    data["swept"].append({"source": NASTY, "dtype": "float32", "status": "failed", "reason": NASTY})
    data["environment"]["cpu"] = NASTY
    data["summary"] = {}
    from opaudit.data.files import dump_yaml as dump

    path = tmp_path_factory.mktemp("cat") / "hostile.yaml"
    path.write_text(dump(data))
    return str(path)


def test_catalog_and_diff_exports_escape_hostile_fields(hostile_catalog, tmp_path, capsys):
    shipped = f"{ROOT}/catalogs/cpu-x86_64-torch2.13.0.yaml"
    for kind, argv in (("catalog", ["catalog", "--from", hostile_catalog]),
                       ("diff", ["diff", shipped, hostile_catalog, "--exit-zero"])):
        for ext in ("md", "csv"):
            out = tmp_path / f"{kind}.{ext}"
            assert main([*argv, "-o", str(out), "-q"]) == 0, capsys.readouterr().err
            text = out.read_text()
            if ext == "md":
                check_markdown(text)
            else:
                cells = [c for row in check_csv(text) for c in row]
                assert any(c.startswith("'<img") or c.startswith("'=") or FORMULA in c for c in cells)


def test_every_markdown_table_of_a_plain_report_renders(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("import torch\nx = torch.zeros(4)\nx.put_(torch.tensor([0, 0]), torch.ones(2))\n"
                      "torch.empty(3)\n")
    out = tmp_path / "r.md"
    assert main([str(script), "--reps", "1", "-q", "-o", str(out), "--run-check"]) == 1, capsys.readouterr().err
    text = out.read_text()
    assert "## Findings" in text and "## What to do" in text
    check_markdown(text)


TERMINAL = "\x1b[2J\x1b]0;pwned\x07\x9b31m\u202etxt.exe\r"
"""Clear the screen, set the window title (OSC ... BEL), a C1 CSI, a right-to-left override, a carriage return."""
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def test_control_characters_from_files_reach_no_output_raw(tmp_path, capsys):
    from opaudit.data.files import dump_yaml, safe_load

    data = safe_load(open(f"{ROOT}/catalogs/cpu-x86_64-torch2.13.0.yaml").read())
    raises = next(e for e in data["entries"] if e["verdict"] == "raises")
    data["entries"] = data["entries"][:10]
    data["summary"] = {}
    small = tmp_path / "small.yaml"
    small.write_text(dump_yaml(data))
    data["entries"].append({**raises, "op": f"aten.evil{TERMINAL}.default", "source": TERMINAL, "error": TERMINAL})
    data["environment"]["torch"] = TERMINAL
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(dump_yaml(data))
    assert "\x1b" not in hostile.read_text()  # PyYAML writes "\e": the file itself is safe to cat
    for argv in (["catalog", "--from", str(hostile)], ["diff", str(small), str(hostile), "--exit-zero"]):
        for fmt in ("table", "md", "html", "csv", "json", "yaml"):
            assert main([*argv, "--format", fmt]) == 0
            out, err = capsys.readouterr()
            # YAML keeps the data as it is but for C0/C1/DEL, which PyYAML escapes ("\e", "\x9b").
            assert set(RAW.findall(out + err)) <= ({"\u202e"} if fmt == "yaml" else set()), (argv, fmt)
            if fmt in ("table", "html", "csv"):
                assert "\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202etxt.exe\\x0d" in out, (argv, fmt)
            if fmt == "md":  # Markdown escapes the backslash and brackets in turn: it renders as the above
                assert "\\\\x1b\\[2J\\\\x1b\\]0;pwned\\\\x07" in out, (argv, fmt)
            if fmt == "json" and argv[0] == "catalog":
                ops = {e["op"] for e in json.loads(out)["entries"]}
                assert f"aten.evil{TERMINAL}.default" in ops  # JSON escapes keep the data exact
    # An error message that quotes the file (a settings key here) is escaped too.
    data["settings"][f"k{TERMINAL}"] = float("inf")
    hostile.write_text(dump_yaml(data))
    assert main(["catalog", "--from", str(hostile)]) == 2
    err = capsys.readouterr().err
    assert not RAW.search(err) and "settings.k\\x1b[2J" in err and len(err.splitlines()) == 1, err


def test_control_characters_in_a_report_are_escaped_in_every_format():
    from opaudit.cli.formats import Format, Kind, render
    from opaudit.data.report import Finding, Report, Site
    from opaudit.data.verdict import Verdict

    f = Finding(id="abc", op=f"aten.evil{TERMINAL}.default", verdict=Verdict.SKIPPED, calls=1, signature=TERMINAL,
                phases=("forward",), sites=(Site(f"train{TERMINAL}.py", 7, "step", f"Net.{TERMINAL}"),), first_call=1,
                reason=f"replay failed: RuntimeError: {TERMINAL}")
    report = Report(environment={"torch": TERMINAL}, settings={"reps": 1}, all_findings=(f,), total_calls=1)
    for fmt in Format:
        text = render(report, Kind.REPORT, fmt)
        assert set(RAW.findall(text)) <= ({"\u202e"} if fmt is Format.YAML else set()), fmt
        if fmt in (Format.JSON, Format.SARIF):
            assert "\\u001b[2J\\u001b]0;pwned\\u0007\\u009b31m\\u202etxt.exe\\r" in text, fmt
