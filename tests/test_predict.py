"""``--against CATALOG``: a model recorded here, its ops looked up in catalogs built elsewhere."""

from __future__ import annotations

import dataclasses
import os
import textwrap

import pytest
import torch
from conftest import ROOT

from opaudit.cli.formats import REPORT_ONLY, Format, Kind, render
from opaudit.cli.main import main
from opaudit.data.verdict import Verdict
from opaudit.flows.catalog import CatalogRequest, SweepConfig, build_catalog, load_catalog
from opaudit.flows.predict import EXACT, OTHER_VARIANT, TWIN, UNKNOWN, predict
from opaudit.flows.run import audit

SWEEP = SweepConfig(stress=False, max_samples=4, reps=2)
OPTS = dict(isolate=False, modules=False)

MODEL = """
    import torch

    def opaudit_step():
        x = torch.zeros(64)
        x.put_(torch.tensor([1, 1, 5]), torch.ones(3))
        y = torch.zeros(8, 4).index_put((torch.tensor([0, 0, 3]),), torch.ones(3, 4), accumulate=True)
        return (y @ torch.ones(4, 4)).sum() + x.sum()
"""


def _step():
    x = torch.zeros(64)
    x.put_(torch.tensor([1, 1, 5]), torch.ones(3))  # PUT
    y = torch.zeros(8, 4).index_put((torch.tensor([0, 0, 3]),), torch.ones(3, 4), accumulate=True)
    return (y @ torch.ones(4, 4)).sum() + x.sum()


@pytest.fixture(scope="module")
def catalogs():
    """Two catalogs that differ: float32 on this machine, and a float64-only sweep."""
    here = build_catalog(CatalogRequest(SWEEP, ("put", "index_put"), "float32", **OPTS))
    other = build_catalog(CatalogRequest(SWEEP, ("put", "index_put"), "float64", **OPTS))
    return here, other


@pytest.fixture(scope="module")
def report():
    return audit(_step, reps=2)


def _line_of(text):
    with open(__file__, encoding="utf-8") as f:
        return next(i for i, line in enumerate(f, 1) if text in line and "_line_of" not in line)


def _row(prediction, op, variant=None):
    rows = [r for r in prediction.rows if r.op == op and (variant is None or r.variant == variant)]
    assert rows, f"{op} not predicted"
    return rows[0]


def test_prediction_uses_the_catalog(report, catalogs):
    p = predict(report, catalogs[0], "here.yaml")
    put = _row(p, "aten.put_.default")
    assert put.predicted == "raises" and put.match == TWIN and "aten.put.default" in put.note
    assert put.locations and put.locations[0].endswith(f"test_predict.py:{_line_of('# PUT')}")
    acc = _row(p, "aten.index_put.default", "accumulate=True")
    # The prediction is the catalog's measurement for the same key, whichever the sweep saw.
    assert acc.match == EXACT
    assert acc.predicted == catalogs[0].get("aten.index_put.default", "float32", "accumulate=True").verdict.value
    mm = _row(p, "aten.mm.default")
    assert mm.predicted == UNKNOWN and mm.note == "op not in the catalog, which swept only --ops put,index_put"
    assert p.summary[UNKNOWN] >= 1 and p.summary["signatures"] == len(report.all_findings)
    # Worst first, unknown right after the verdicts that fail.
    ranks = [r.predicted for r in p.rows]
    assert ranks.index("raises") < ranks.index(UNKNOWN)
    assert p.failing() and all(r.predicted == "raises" for r in p.failing([Verdict.RAISES]))


def test_two_catalogs_that_differ_predict_differently(report, catalogs):
    here, other = catalogs
    a, b = predict(report, here), predict(report, other)
    assert _row(a, "aten.put_.default").predicted == "raises"
    put_b = _row(b, "aten.put_.default")
    assert put_b.predicted == UNKNOWN and "only for float64" in put_b.note
    # Never 'stable' for what a catalog did not measure.
    assert all(r.predicted == UNKNOWN for r in b.rows if r.dtype == "float32")


def test_other_variant_and_unmeasured_entries(report, catalogs):
    here = catalogs[0]
    # A catalog that measured index_put only with accumulate=False, and one whose put was skipped.
    only_default = dataclasses.replace(here, entries=tuple(
        e for e in here.entries if not (e.op == "aten.index_put.default" and e.variant == "accumulate=True")))
    row = _row(predict(report, only_default), "aten.index_put.default", "accumulate=True")
    assert row.match == OTHER_VARIANT and "only with (defaults)" in row.note
    skipped = dataclasses.replace(here, entries=tuple(
        dataclasses.replace(e, verdict=Verdict.SKIPPED, error="replay failed: timeout") if e.op == "aten.put.default"
        else e for e in here.entries))
    row = _row(predict(report, skipped), "aten.put_.default")
    assert row.predicted == UNKNOWN and "could not measure it" in row.note


def test_every_format_renders(report, catalogs):
    p = predict(report, catalogs[0], "here.yaml")
    for fmt in set(Format) - REPORT_ONLY:  # SARIF is for reports only
        assert render(p, Kind.PREDICTION, fmt).strip()
    assert "aten.put_.default" in render(p, Kind.PREDICTION, Format.MARKDOWN)
    assert render(p, Kind.PREDICTION, Format.CSV).startswith("predicted,here,op,dtype")


# -- command line --------------------------------------------------------------------------
def _files(tmp_path, catalog):
    script = tmp_path / "model.py"
    script.write_text(textwrap.dedent(MODEL))
    cat = tmp_path / "cat.yaml"
    cat.write_text(render(catalog, Kind.CATALOG, Format.YAML))
    return str(script), str(cat)


def test_cli_against(tmp_path, capsys, catalogs):
    script, cat = _files(tmp_path, catalogs[0])
    code = main([script, "--reps", "2", "--against", cat])
    out, err = capsys.readouterr()
    assert code == 1  # put_ is predicted to raise there
    assert "prediction on" in out and "aten.put_.default" in out and "model.py:" in out and "unknown" in out
    code = main([script, "--reps", "2", "--against", cat, "--fail-on", "none"])
    assert code == 0
    capsys.readouterr()
    out_path = tmp_path / "pred.yaml"
    code = main([script, "--reps", "2", "--against", cat, "-o", str(out_path), "--exit-zero"])
    assert code == 0 and "format: opaudit-prediction" in out_path.read_text()


@pytest.mark.parametrize("text, message", [
    ("format: opaudit-report\nversion: 1\n...\n", "expected 'opaudit-catalog'"),
    ("format: opaudit-catalog\nversion: 1\nentries:\n- op", "truncated"),
    ("!!python/object/apply:os.system ['echo pwned']\n...\n", "unsafe or unknown YAML tag"),
])
def test_cli_bad_catalog_fails_before_running_the_model(tmp_path, capsys, catalogs, text, message):
    script, _ = _files(tmp_path, catalogs[0])
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    marker = tmp_path / "ran"
    with open(script, "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    code = main([script, "--against", str(bad)])
    out, err = capsys.readouterr()
    assert code == 2 and message in err and err.count("\n") == 1
    assert not marker.exists()


SHIPPED = os.path.join(ROOT, "catalogs", "cpu-x86_64-torch2.13.0.yaml")


def _integers():
    ids = torch.randint(0, 10, (64,))
    return ids.sum()


@pytest.fixture(scope="module")
def integers():
    return audit(_integers, reps=2)


def test_randint_is_found_in_a_catalog_of_this_machine(integers):
    """A factory called without dtype= is filed under the dtype it ran with, by the sweep and the lookup."""
    here = build_catalog(CatalogRequest(SWEEP, ("randint",), "float32", **OPTS))
    assert {e.dtype for e in here.entries if e.op == "aten.randint.low"} == {"int64"}
    row = _row(predict(integers, here), "aten.randint.low")
    assert row.dtype == "int64" and row.predicted == "random" and row.match != "none"
    # The shipped catalog filed it under "none", as every catalog made before did: still found.
    shipped = load_catalog(SHIPPED)
    assert {e.dtype for e in shipped.entries if e.op == "aten.randint.low"} == {"none"}
    assert _row(predict(integers, shipped), "aten.randint.low").predicted == "random"


def test_a_dtype_the_catalog_did_not_sweep_says_which_it_did_and_how_to_measure_it(integers):
    row = _row(predict(integers, load_catalog(SHIPPED)), "aten.sum.default")
    assert row.dtype == "int64" and row.predicted == UNKNOWN
    assert "it swept float32 only" in row.note and "int64 was left out" in row.note
    assert "opaudit catalog --ops aten.sum --dtypes int64" in row.note
