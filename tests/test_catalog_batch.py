"""``opaudit catalog --batch-invariance``: per-op probes over row counts, the catalog section, diff transitions."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from opaudit.cli import main
from opaudit.data.files import ReportError
from opaudit.data.invariance import BATCH_INVARIANT, BATCH_VARIANT
from opaudit.flows.catalog import catalog_from_dict, load_catalog
from opaudit.flows.catalog.batch import ROWS, probe_batch_invariance, select_probes
from opaudit.flows.diff import BATCH_FIELD, diff_documents, parse_fail_on


@pytest.fixture(scope="module")
def probed():
    return {e.op: e for e in probe_batch_invariance("cpu", ["float32"], ["mm", "softmax", "layer_norm"])}


def test_matmul_is_variant_at_the_row_counts_where_sgemm_reblocks(probed):
    mm = probed["aten.mm.default"]
    assert mm.verdict == BATCH_VARIANT and mm.rows == ROWS and mm.batch == 256
    assert {1, 2, 7} <= set(mm.variant_rows) and not {4, 8, 16, 64, 128} & set(mm.variant_rows)
    assert mm.probes == ("mm",) and mm.max_abs_diff > 0


def test_softmax_and_layer_norm_are_invariant(probed):
    assert probed["aten._softmax.default"].verdict == BATCH_INVARIANT
    assert probed["aten.native_layer_norm.default"].verdict == BATCH_INVARIANT
    assert set(probed) == {"aten.mm.default", "aten._softmax.default", "aten.native_layer_norm.default"}


def test_probe_selection_by_name_torch_and_aten_spelling():
    assert [p.name for p in select_probes(["aten.addmm*"])] == ["linear"]
    assert [p.name for p in select_probes(["nn.functional.scaled_dot_product_attention"])] == [
        "scaled_dot_product_attention", "scaled_dot_product_attention_decode"]
    assert select_probes(["index_put"]) == ()
    assert {p.name for p in select_probes()} >= {"mm", "linear", "bmm", "mean", "layer_norm", "rms_norm",
                                                  "softmax", "log_softmax", "scaled_dot_product_attention"}


def test_cli_sweep_writes_the_section_and_diff_shows_its_transitions(tmp_path, capsys):
    out = tmp_path / "cat.yaml"
    argv = ["catalog", "--ops", "mm", "--batch-invariance", "--in-process", "--no-stress", "--max-samples", "1",
            "--reps", "1", "-o", str(out), "-q"]
    assert main(argv) == 0
    data = yaml.safe_load(out.read_text())
    assert data["version"] == 2 and data["settings"]["batch_invariance"] == {"batch": 256, "rows": list(ROWS)}
    (entry,) = [e for e in data["batch_invariance"] if e["op"] == "aten.mm.default"]
    assert entry["verdict"] == BATCH_VARIANT and 1 in entry["variant_rows"]
    catalog = load_catalog(str(out))
    assert catalog.batch_invariance[0].op == "aten.mm.default"
    md = tmp_path / "cat.md"
    assert main(["catalog", "--from", str(out), "-o", str(md), "-q"]) == 0
    section = md.read_text().split("## Batch invariance", 1)[1].split("\n## ", 1)[0]
    assert "| batch_variant | aten.mm.default | float32 |" in section

    # The same machine with mm made batch-invariant: a transition of this field, and only of it.
    fixed = dataclasses.replace(catalog, batch_invariance=tuple(
        dataclasses.replace(e, verdict=BATCH_INVARIANT, variant_rows=(), max_abs_diff=None)
        for e in catalog.batch_invariance))
    diff = diff_documents(fixed, catalog, "fixed", "now")
    (change,) = diff.changes
    assert change.field == BATCH_FIELD and change.transition == "batch_invariant->batch_variant"
    assert change.detail == "float32 batch invariance" and diff.matching(parse_fail_on("*->batch_variant"))
    assert diff.to_dict()["changes"][0]["field"] == BATCH_FIELD
    # A catalog made without --batch-invariance says nothing about it: no transition.
    plain = dataclasses.replace(catalog, batch_invariance=())
    assert not [c for c in diff_documents(plain, catalog).all_changes if c.field == BATCH_FIELD]
    a = tmp_path / "fixed.yaml"
    a.write_text(out.read_text().replace("verdict: batch_variant", "verdict: batch_invariant"))
    assert main(["diff", str(a), str(out), "--fail-on", "*->batch_variant", "-q"]) == 1
    assert "batch_invariant->batch_variant" in capsys.readouterr().out


def test_bad_sections_are_refused():
    base = {"format": "opaudit-catalog", "version": 2, "environment": {}, "settings": {}, "entries": [],
            "batch_invariance": [{"op": "aten.mm.default", "dtype": "float32", "verdict": "batch_variant",
                                  "batch": 256, "rows": [1, 2]}]}
    assert catalog_from_dict(base).batch_invariance[0].rows == (1, 2)
    with pytest.raises(ReportError, match="version 1 catalog cannot hold"):
        catalog_from_dict({**base, "version": 1})
    bad = {**base, "batch_invariance": [{**base["batch_invariance"][0], "verdict": "often"}]}
    with pytest.raises(ReportError, match="unknown verdict 'often'"):
        catalog_from_dict(bad)
    with pytest.raises(ReportError, match="appear twice"):
        catalog_from_dict({**base, "batch_invariance": base["batch_invariance"] * 2})
