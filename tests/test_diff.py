"""``opaudit diff``: catalogs against catalogs, reports against reports, never across."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from opaudit.cli.formats import REPORT_ONLY, Format, Kind, render
from opaudit.cli.main import main
from opaudit.data.files import ReportError
from opaudit.data.verdict import Verdict
from opaudit.flows.catalog import CatalogRequest, SweepConfig, build_catalog
from opaudit.flows.diff import DiffError, diff_documents, diff_files, normalize_signature, parse_fail_on
from opaudit.flows.run import audit

SWEEP = SweepConfig(stress=False, max_samples=3, reps=2)
OPTS = dict(isolate=False, modules=False)


@pytest.fixture(scope="module")
def catalogs():
    """Two real catalogs that differ: float32 only, and float32 + float64 on other ops."""
    a = build_catalog(CatalogRequest(SWEEP, ("put", "nn.functional.max_unpool1d"), "float32", **OPTS))
    b = build_catalog(CatalogRequest(SWEEP, ("put", "index_add"), "float32,float64", **OPTS))
    return a, b


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_catalog_diff_lists_changes_and_one_sided_ops(catalogs):
    a, b = catalogs
    # What another machine would give: put no longer raises there.
    entry = b.get("aten.put.default", "float32")
    b2 = dataclasses.replace(b, entries=tuple(dataclasses.replace(e, verdict=Verdict.STABLE) if e is entry else e
                                              for e in b.entries))
    d = diff_documents(a, b2, "a.yaml", "b.yaml")
    assert [(c.op, c.transition) for c in d.changes] == [("aten.put.default", "raises->stable")]
    assert any(c.op == "aten.max_unpool2d.default" and c.transition == "raises->missing" for c in d.only_a)
    assert any(c.op == "aten.index_add.default" and c.detail.startswith("float64") and c.before == "missing"
               for c in d.only_b)
    assert {f.name for f in d.settings} >= {"dtypes", "ops"}
    assert d.summary["changed"] == 1 and d.unchanged > 0
    assert d.transitions()["raises->stable"] == 1


def test_fail_on_rules(catalogs):
    a, b = catalogs
    d = diff_documents(a, b)  # put raises on both; put float64 (raises) is new in b
    assert [c.detail for c in d.matching(parse_fail_on("*->raises"))] == ["float64"]
    assert d.matching(parse_fail_on("raises->missing"))  # max_unpool2d, only in a
    assert not d.matching(parse_fail_on("stable->raises"))
    one = dataclasses.replace(d, only_a=(), only_b=(), changes=(
        dataclasses.replace(d.only_a[0], before="stable", after="diverges_deterministic"),))
    assert one.matching(parse_fail_on("*->diverges*"))
    assert not one.matching(parse_fail_on("raises->*"))
    assert parse_fail_on("none") == ()


@pytest.mark.parametrize("text, message", [
    ("raises", "expected FROM->TO"), ("*->explodes", "'explodes' matches no verdict"), ("->raises", "matches no"),
])
def test_bad_fail_on(text, message):
    with pytest.raises(DiffError, match=message):
        parse_fail_on(text)


def _model_dtype(dtype):
    def step():
        x = torch.zeros(64, dtype=dtype)
        x.put_(torch.tensor([1, 1, 5]), torch.ones(3, dtype=dtype))
        (x * 2).sum()
    return step


def _line_of(text):
    with open(__file__, encoding="utf-8") as f:
        return next(i for i, line in enumerate(f, 1) if text in line)


def test_report_diff_lines_up_signatures():
    a = audit(_model_dtype(torch.float32), reps=2)
    b = audit(_model_dtype(torch.float64), reps=2)
    d = diff_documents(a, b)
    assert d.kind == "report" and not d.changes and d.unchanged == 0
    zeros, put, mul = (_line_of(t) for t in ("x = torch.zeros(64, dtype=dtype)", "x.put_(torch.tensor([1, 1, 5])",
                                              "(x * 2).sum()"))

    def expected(t):
        return sorted([
            ("aten.mul.Tensor", f"{t}[64], 2", "stable", mul),
            ("aten.ones.default", f"[3], device=device(type='cpu'), dtype=torch.{dict(f32='float32', f64='float64')[t]}"
                                  ", pin_memory=False", "stable", put),
            ("aten.put_.default", f"{t}[64], i64[3], {t}[3]", "raises", put),
            ("aten.sum.default", f"{t}[64]", "stable", mul),
            ("aten.zeros.default", f"[64], device=device(type='cpu'), dtype=torch."
                                   f"{dict(f32='float32', f64='float64')[t]}, pin_memory=False", "stable", zeros),
        ])

    def line(where):
        m = re.fullmatch(r"(?:.*/)?test_diff\.py:(\d+)", where)
        assert m, where
        return int(m.group(1))

    assert sorted((c.op, c.detail, c.before, line(c.where)) for c in d.only_a) == expected("f32")
    assert all(c.after == "missing" for c in d.only_a)
    assert sorted((c.op, c.detail, c.after, line(c.where)) for c in d.only_b) == expected("f64")
    assert all(c.before == "missing" for c in d.only_b)
    assert d.summary == {"changed": 0, "only_a": 5, "only_b": 5, "unchanged": 0, "environment": 0, "settings": 0}
    assert normalize_signature("f32[2]@cuda:0, i64[2]@cuda:1") == "f32[2], i64[2]"


def test_report_against_catalog_is_refused(catalogs, tmp_path):
    report = audit(_model_dtype(torch.float32), reps=2)
    with pytest.raises(DiffError, match="--against"):
        diff_documents(report, catalogs[0])
    r = _write(tmp_path, "r.yaml", render(report, Kind.REPORT, Format.YAML))
    c = _write(tmp_path, "c.yaml", render(catalogs[0], Kind.CATALOG, Format.YAML))
    with pytest.raises(DiffError, match="cannot diff a report"):
        diff_files(r, c)


def test_every_format_renders(catalogs):
    d = diff_documents(*catalogs, "a.yaml", "b.yaml")
    for fmt in set(Format) - REPORT_ONLY:  # SARIF is for reports only
        assert render(d, Kind.DIFF, fmt).strip()
    md = render(d, Kind.DIFF, Format.MARKDOWN)
    assert "## Only in B" in md and "## What differs between the two setups" in md
    assert render(d, Kind.DIFF, Format.CSV).splitlines()[0] == "change,op,detail,before,after,where"


# -- command line --------------------------------------------------------------------------
def _cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exit_codes(catalogs, tmp_path, capsys):
    a, b = catalogs
    pa = _write(tmp_path, "a.yaml", render(a, Kind.CATALOG, Format.YAML))
    pb = _write(tmp_path, "b.yaml", render(b, Kind.CATALOG, Format.YAML))
    code, out, _ = _cli(["diff", pa, pa], capsys)
    assert code == 0 and "0 changed, 0 only in A, 0 only in B" in out
    # put float64 is new in B and raises: the default --fail-on (*->raises,*->diverges*) fails.
    code, out, err = _cli(["diff", pa, pb], capsys)
    assert code == 1 and "only in A" in out and "match --fail-on" in err
    code, _, _ = _cli(["diff", pa, pb, "--fail-on", "stable->raises"], capsys)
    assert code == 0
    code, _, _ = _cli(["diff", pa, pb, "--exit-zero"], capsys)
    assert code == 0
    code, _, _ = _cli(["diff", pb, pa, "--fail-on", "none"], capsys)
    assert code == 0
    code, out, _ = _cli(["diff", pa, pb, "--format", "csv"], capsys)
    assert code == 1 and out.startswith("change,op,detail")
    out_path = tmp_path / "d.md"
    code, out, err = _cli(["diff", pa, pb, "-o", str(out_path)], capsys)
    assert code == 1 and out == "" and out_path.read_text().startswith("# opaudit catalog diff")


@pytest.mark.parametrize("b_text, message", [
    (None, "cannot diff a catalog"),
    ("format: opaudit-catalog\nversion: 7\nentries: []\n...\n", "version 7 is not supported"),
    ("format: somebody-else\nversion: 1\n...\n", "format is 'somebody-else'"),
    ("format: opaudit-catalog\nversion: 1\nentries:\n- op: aten", "truncated"),
    ("!!python/object/apply:os.system ['touch /tmp/opaudit-pwned']\n...\n", "unsafe or unknown YAML tag"),
    ("- just\n- a list\n...\n", "not an opaudit file"),
])
def test_cli_bad_input_is_one_line_and_exit_2(catalogs, tmp_path, capsys, b_text, message):
    pa = _write(tmp_path, "a.yaml", render(catalogs[0], Kind.CATALOG, Format.YAML))
    if b_text is None:  # a report
        pb = _write(tmp_path, "b.yaml", render(audit(_model_dtype(torch.float32), reps=2), Kind.REPORT, Format.YAML))
    else:
        pb = _write(tmp_path, "b.yaml", b_text)
    code, out, err = _cli(["diff", pa, pb], capsys)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_file_and_bad_fail_on(catalogs, tmp_path, capsys):
    pa = _write(tmp_path, "a.yaml", render(catalogs[0], Kind.CATALOG, Format.YAML))
    code, _, err = _cli(["diff", pa, str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "no such file" in err
    code, _, err = _cli(["diff", pa, pa, "--fail-on", "stable=>raises"], capsys)
    assert code == 2 and "expected FROM->TO" in err


def test_load_errors_are_report_errors(tmp_path):
    p = _write(tmp_path, "x.json", "{not json")
    with pytest.raises(ReportError, match="invalid JSON"):
        diff_files(p, p)
