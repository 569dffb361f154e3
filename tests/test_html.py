"""The HTML pages without a browser: escaping, a self-contained file, what each page holds.

(``test_html_browser.py`` opens the same pages in a real Chromium.)
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from fixtures.review import HOSTILE_OP, HOSTILE_TEXT, MODULE_NAME, SCRIPT_NAME, documents, has_avx2

from opaudit.cli.formats import Format, Kind, render
from opaudit.cli.formats.html_page import esc, json_script
from opaudit.data import across
from opaudit.data.report import Finding, Report, load
from opaudit.data.site import Site
from opaudit.data.verdict import Verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return documents(str(tmp_path_factory.getbasetemp() / "review"))


class Parsed(html.parser.HTMLParser):
    """Every element (tag, attributes) and the text of a page, as a browser's parser splits them."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def tags(self, name: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.elements if t == name]


def test_esc_leaves_no_markup_and_shows_control_characters():
    text = esc('<img src=x onerror="alert(1)">\x1b[31m</table>\x00 it\'s & \x9b')
    assert "<" not in text and ">" not in text and '"' not in text and "'" not in text
    assert "\x1b" not in text and "\x00" not in text and "\x9b" not in text
    assert "\\x1b[31m" in text and "\\x00" in text and "\\x9b" in text and "&amp;" in text
    assert esc("a\nb\tc") == "a\nb\tc"  # line breaks of an error text are kept


def test_inline_json_cannot_end_its_script_or_open_a_comment():
    data = {"title": "</script><script>alert(1)</script><!-- \u2028 &"}
    text = json_script(data)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == data


def test_every_page_is_one_self_contained_file(docs):
    """No attribute points outside the file, no external stylesheet, font, frame or base, and a CSP that forbids
    every fetch: the browser test checks the same in Chromium."""
    for name, path in docs.pages.items():
        page = Parsed(open(path, encoding="utf-8").read())
        for tag, attrs in page.elements:
            for key in ("src", "srcset", "action", "formaction", "poster", "background", "data", "xlink:href"):
                assert key not in attrs, (name, tag, attrs)
            href = attrs.get("href")
            assert href is None or href.startswith("#") or href == "data:,", (name, tag, href)
            assert tag not in ("iframe", "object", "embed", "base", "audio", "video", "img", "form"), (name, tag)
        (csp,) = [a for a in page.tags("meta") if a.get("http-equiv") == "Content-Security-Policy"]
        assert csp["content"].startswith("default-src 'none';")
        assert [a.get("rel") for a in page.tags("link")] == ["icon"]
        styles = "".join(page.text)
        assert "@import" not in styles and "url(" not in styles and "@font-face" not in styles
        # The page's own script, and data (JSON) that no browser runs.
        assert [a.get("type") for a in page.tags("script")].count(None) == 1, name
        assert {a.get("type") for a in page.tags("script")} == {None, "application/json"}, name


def _data(source: str, table: str) -> dict:
    """A table's inline JSON rows, as the page's script reads them."""
    return json.loads(re.search(f'<script type="application/json" id="{table}-data">(.*?)</script>', source,
                                re.S).group(1))


def test_hostile_names_are_text_in_every_page(docs):
    """File names, module names, op names, error texts and a hand-made catalog's fields that are markup create no
    element: they come out as the text they are (control characters as \\xNN) in the HTML a browser without
    JavaScript shows, and unchanged in the JSON the page's script reads (which puts them in as text nodes)."""
    shown_op = HOSTILE_OP.replace("\x1b", "\\x1b") + "0"
    shown_text = HOSTILE_TEXT.replace("\x07", "\\x07")
    expect = {
        "report": ([SCRIPT_NAME, MODULE_NAME], "findings", [SCRIPT_NAME]),
        "hostile report": ([shown_op, shown_text], "findings", [HOSTILE_OP + "0", HOSTILE_TEXT]),
        "hostile catalog": ([shown_op, shown_text], "entries", [HOSTILE_OP + "0", HOSTILE_TEXT]),
        "diff": ([shown_op], "changes", [HOSTILE_OP + "0"]),
        "prediction": ([shown_text], "predictions", []),
        "replay": ([SCRIPT_NAME, MODULE_NAME], "ops", [SCRIPT_NAME]),
        "hostile replay": ([shown_op, shown_text], "ops", [HOSTILE_OP + "0", HOSTILE_TEXT]),
        "compare": ([SCRIPT_NAME, MODULE_NAME], "events", [SCRIPT_NAME, MODULE_NAME]),
        "hostile compare": ([shown_op[:-1], shown_text], "events", [HOSTILE_OP, HOSTILE_TEXT]),
    }
    for name, (needles, table, data_needles) in expect.items():
        source = open(docs.pages[name], encoding="utf-8").read()
        page = Parsed(source)
        assert not page.tags("img") and [a.get("type") for a in page.tags("script")].count(None) == 1
        assert not [(t, k) for t, a in page.elements for k in a if k.startswith("on")]  # no event handler at all
        assert [t for t, _ in page.elements].count("table") == source.count("<table")
        text = "".join(page.text)
        for needle in needles:
            assert needle in text, (name, needle)
        strings = _data(source, table)["s"]
        for needle in data_needles:
            assert any(needle in x for x in strings), (name, needle)
        meta = json.loads(re.search(r'<script type="application/json" id="opaudit-meta">(.*?)</script>', source,
                                    re.S).group(1))
        assert meta["kind"] in ("report", "catalog", "diff", "prediction", "replay", "comparison")


def test_the_report_page_holds_every_finding_its_detail_and_the_run_check(docs):
    report = load(docs.report_yaml)
    source = open(docs.report_html, encoding="utf-8").read()
    page = Parsed(source)
    data = _data(source, "findings")
    strings = data["s"]
    assert [(strings[i], strings[v]) for i, v in zip(data["i"], data["v"])] == [
        (f.id, f.verdict.value) for f in report.all_findings]
    chips = {a["data-verdict"]: a for a in page.tags("button") if "chip" in (a.get("class") or "")}
    assert set(chips) == {v.value for v in Verdict}
    text = "".join(page.text)
    put = report.finding("aten.put_.default")
    for needle in (put.strict_error, put.remedy, f"{SCRIPT_NAME}:{put.sites[0].line}"):
        assert needle in text
    meta = json.loads(re.search(r'id="opaudit-meta">(.*?)</script>', source, re.S).group(1))
    assert meta["summary"] == report.summary and meta["title"] == f"opaudit report: {SCRIPT_NAME}"
    # The strip: a mark per signature at its first call; the run check: root cause to the tensors that differed.
    default = next(r for r in report.run_checks if r.mode == "default")
    assert not default.reproducible and default.mismatches
    assert f"1 raises: #{put.first_call} aten.put_.default at {SCRIPT_NAME}:{put.sites[0].line}" in text
    assert f"op #{default.root_cause['index']} {default.root_cause['op']}" in text
    assert default.mismatches[0].split(" (")[0] in text


@pytest.mark.skipif(not has_avx2(), reason="this CPU lacks AVX2: the capture and the replay ran the same kernels")
def test_the_replay_page_leads_with_the_environment_difference_and_holds_every_op(docs):
    """A real capture (AVX2 kernels) replayed under the scalar ones: the fingerprint field that differs comes
    before the table; the table holds every captured signature, worst across first, with how far its bits moved;
    the chips count each across value; the pictures draw the op whose bits moved on a log scale."""
    doc = across.from_dict(yaml.safe_load(open(docs.replay_yaml)))
    source = open(docs.replay_html, encoding="utf-8").read()
    assert ("cpu_capability", "AVX2", "DEFAULT") in doc.environment_difference
    lead = source.index('id="environment"')
    assert lead < source.index('<table class="data t-ops') < source.index('id="magnitude"')
    text = "".join(Parsed(source[lead:source.index("</details>", lead)]).text)
    assert "cpu_capability" in text and "AVX2" in text and "DEFAULT" in text
    data = _data(source, "ops")
    strings = data["s"]
    assert [(strings[i], strings[v]) for i, v in zip(data["i"], data["v"])] == [
        (r.finding.id, r.across.value) for r in doc.rows]
    page = Parsed(source)
    chips = {a["data-verdict"]: a for a in page.tags("button") if "chip" in (a.get("class") or "")}
    assert list(chips) == ["unsupported", "differs", "differs_default", "skipped", "same"]
    moved = next(r for r in doc.rows if r.across is across.Across.DIFFERS)
    assert moved.finding.op == "aten.randn.default" and moved.max_ulp
    row = data["c"][doc.rows.index(moved)]
    assert [strings[i] for i in row[0]] == ["differs", "", ""] and strings[row[6]] == str(moved.max_ulp)
    detail = {strings[t]: v for t, _, v in data["d"][doc.rows.index(moved)]}
    assert f"{moved.max_ulp} ULP" in strings[detail["bits that moved"]]
    bars = _bars(source, "How far each op")
    assert list(bars) == [f"{moved.max_abs_diff:.3g}"]
    assert f"aten.randn.default {SCRIPT_NAME[:20]}" in "".join(page.text)  # the bar's label: op and file (cut)


@pytest.mark.skipif(not has_avx2(), reason="this CPU lacks AVX2: both traces ran the same kernels")
def test_the_compare_page_leads_with_what_differs_and_names_the_root_cause(docs):
    """Two real traces of the review step (AVX2 and scalar kernels) compared by the CLI: what differs comes before
    the table; the root cause is the first event, with its op, line, phase, step and call numbers, in the table,
    its detail and the spread picture; the chips count the events."""
    from opaudit.flows.trace.compare import compare_traces

    (r,) = compare_traces(*docs.traces).ranks
    cause = r.root_cause
    assert cause is not None and cause.where.startswith(SCRIPT_NAME) and cause.phase == "setup"
    source = open(docs.compare_html, encoding="utf-8").read()
    lead = source.index('id="differences"')
    assert lead < source.index('<table class="data t-events') < source.index('id="cause"')
    text = "".join(Parsed(source[lead:source.index("</details>", lead)]).text)
    assert "cpu_capability" in text and "AVX2" in text and "DEFAULT" in text
    data = _data(source, "events")
    strings = data["s"]
    first = [strings[i] if isinstance(i, int) else [strings[j] for j in i] for i in data["c"][0]]
    assert first[:8] == [["root_cause", "", ""], str(cause.index_a), str(cause.index_b), cause.op, cause.where,
                         cause.module or "-", "setup", str(cause.step)]
    detail = {strings[t]: v for t, _, v in data["d"][0]}
    assert strings[detail["call"]] == f"call #{cause.index_a}" and strings[detail["phase"]] == "setup"
    page = Parsed(source)
    chips = {a["data-verdict"]: a for a in page.tags("button") if "chip" in (a.get("class") or "")}
    assert list(chips) == ["root_cause", "first_difference", "parted", "structural", "first_loss", "first_update",
                           "final"]
    cause_text = "".join(Parsed(source[source.index('id="cause"'):]).text)
    assert f"call #{cause.index_a} {cause.op}" in cause_text and f"{r.downstream} later call(s) differed" in cause_text
    assert r.final and r.final[0] in cause_text  # the spread ends at the final tensors that differ


def _timed_report() -> Report:
    sites = (Site("train.py", 7, "step", "Net.fc"),)
    findings = (
        Finding(id="a", op="aten.index_put_.default", verdict=Verdict.DIVERGES, calls=2, signature="f32[8]",
                sites=sites, first_call=3, default_diverged="4/5", deterministic_diverged="0/5", max_abs_diff=1e-3,
                time_default_us=10.0, time_deterministic_us=200.0),
        Finding(id="b", op="aten.scatter_add_.default", verdict=Verdict.DIVERGES, calls=1, signature="f32[8]",
                sites=sites, first_call=5, default_diverged="2/5", deterministic_diverged="0/5", max_abs_diff=1e-9,
                time_default_us=10.0, time_deterministic_us=20.0),
        Finding(id="c", op="aten.mm.default", verdict=Verdict.STABLE, calls=1, signature="f32[8,8]", sites=sites,
                first_call=1, default_diverged="0/5", deterministic_diverged="0/5", max_abs_diff=0.0,
                time_default_us=10.0, time_deterministic_us=5.0),
    )
    return Report(environment={"torch": "2.13.0", "cpu": "x"}, settings={"script": "train.py", "reps": 5},
                  all_findings=findings, total_calls=6)


def _bars(source: str, title: str) -> dict[str, float]:
    """Bar widths by label in the chart whose title is ``title``."""
    svg = source[source.index(f"<title>{title}"):]
    svg = svg[: svg.index("</svg>")]
    return {m.group(2): float(m.group(1)) for m in re.finditer(
        r'<rect x="[0-9.]+" y="[0-9.]+" width="([0-9.]+)"[^>]*/>.*?<text[^>]*>([^<]*)</text></g>', svg)}


def test_cost_and_divergence_charts_are_log_scale_svg():
    source = render(_timed_report(), Kind.REPORT, Format.HTML)
    cost = _bars(source, "Deterministic-mode cost")
    assert set(cost) == {"20x", "2x", "0.5x"}
    # Log scale: 20x is one decade from 2x, and 2x as far right of 1x as 0.5x is left of it.
    assert cost["20x"] == pytest.approx(cost["2x"] * (1 + 1 / 0.30103), rel=0.02)
    assert cost["2x"] == pytest.approx(cost["0.5x"], rel=0.02)
    diff = _bars(source, "Divergence magnitude")
    assert set(diff) == {"0.001", "1e-09"}  # only the signatures that diverged
    assert diff["0.001"] > diff["1e-09"]


def test_the_cli_writes_html_from_the_extension(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text("import torch\n\ndef opaudit_step():\n    x = torch.randn(4)\n    return (x * 2).sum()\n")
    proc = subprocess.run([sys.executable, "-m", "opaudit", str(script), "--reps", "1", "--no-timing",
                           "--no-deterministic-pass", "-o", str(tmp_path / "r.htm")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    source = (tmp_path / "r.htm").read_text()
    assert source.startswith("<!DOCTYPE html>") and "opaudit report: tiny.py" in source
    assert "report written to" in proc.stderr
