"""One strict field reader for every document: the same mistake gets the same one-line words wherever it is.

The documents are built as records, written to their dict form, edited as a hand
would, and read back with each document's own loader.
"""

from __future__ import annotations

import copy

import pytest

from opaudit.data import invariance
from opaudit.data.catalog import BatchEntry, Catalog, CatalogEntry, SweptOp, catalog_from_dict
from opaudit.data.errors import OpauditError
from opaudit.data.fields import ReportError
from opaudit.data.invariance import BATCH_VARIANT, BatchInvariance, BatchOp, RowCheck
from opaudit.data.report import Finding, Report, from_dict
from opaudit.data.site import Site
from opaudit.data.verdict import Verdict

SITE = Site("model.py", 3, "forward", "Net")


def _report() -> dict:
    finding = Finding(id="f1", op="aten.index_put_.default", verdict=Verdict.DIVERGES, calls=2,
                      signature="f32[4], [i64[3]], f32[3], True", sites=(SITE,), default_diverged="3/5",
                      deterministic_diverged="0/5", max_abs_diff=1e-6, frac_differing=0.5)
    batch = BatchInvariance(batch_size=4, dim=0, checks=(RowCheck(rows=1, invariant=False),),
                            ops=(BatchOp(id="b1", op="aten.mm.default", verdict=BATCH_VARIANT, signature="f32[4,4]",
                                         sites=(SITE,), variant_rows=(1,), max_abs_diff=1e-7),))
    return Report(environment={"torch": "2.x"}, settings={"reps": 5}, all_findings=(finding,),
                  batch_invariance=batch).to_dict()


def _catalog() -> dict:
    entry = CatalogEntry(op="aten.put_.default", dtype="float32", variant="accumulate=True", verdict=Verdict.DIVERGES,
                         input_kind="stress", phase="forward", source="put", signature="f32[5]")
    batch = BatchEntry(op="aten.mm.default", dtype="float32", verdict=BATCH_VARIANT, probes=("linear",), batch=256,
                       rows=(1, 2), variant_rows=(1,), max_abs_diff=1e-7)
    return Catalog(environment={"torch": "2.x"}, settings={"reps": 3}, entries=(entry,),
                   swept=(SweptOp("put", "float32", "ok", samples=2),), batch_invariance=(batch,)).to_dict()


def _load(kind: str, data: dict):
    return from_dict(data, "r.yaml") if kind == "report" else catalog_from_dict(data, "c.yaml")


def _set(data: dict, path: tuple, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


CASES = [
    ("report", ("findings", 0, "calls"), "three", "r.yaml: findings[0]: field 'calls' has the wrong type (str)"),
    ("report", ("findings", 0, "calls"), True, "r.yaml: findings[0]: field 'calls' has the wrong type (bool)"),
    ("report", ("batch_invariance", "ops", 0, "calls"), "three",
     "r.yaml: batch_invariance.ops[0]: field 'calls' has the wrong type (str)"),
    ("catalog", ("entries", 0, "seen_in"), "three", "c.yaml: entries[0]: field 'seen_in' has the wrong type (str)"),
    ("catalog", ("swept", 0, "samples"), "three", "c.yaml: swept[0]: field 'samples' has the wrong type (str)"),
    # numbers: a finding's, a batch-invariance op's and a catalog batch entry's read alike
    ("report", ("findings", 0, "max_abs_diff"), "lots", "r.yaml: findings[0].max_abs_diff: expected a number, got 'lots'"),
    ("report", ("batch_invariance", "ops", 0, "max_abs_diff"), "lots",
     "r.yaml: batch_invariance.ops[0].max_abs_diff: expected a number, got 'lots'"),
    ("catalog", ("batch_invariance", 0, "max_abs_diff"), "lots",
     "c.yaml: batch_invariance[0].max_abs_diff: expected a number, got 'lots'"),
    # a site, in a finding or in a batch-invariance op
    ("report", ("findings", 0, "sites", 0, "line"), "3", "r.yaml: findings[0].sites: field 'line' has the wrong type (str)"),
    ("report", ("batch_invariance", "ops", 0, "sites", 0), "model.py:3",
     "r.yaml: batch_invariance.ops[0].sites: a site must be a mapping"),
    # a closed set of names
    ("catalog", ("entries", 0, "input_kind"), "fuzz",
     "c.yaml: entries[0]: unknown input_kind 'fuzz' (expected one of: opinfo, stress)"),
    ("catalog", ("swept", 0, "status"), "done",
     "c.yaml: swept[0]: unknown status 'done' (expected one of: ok, partial, failed, timeout, crashed)"),
    ("catalog", ("batch_invariance", 0, "verdict"), "often",
     "c.yaml: batch_invariance[0]: unknown verdict 'often' (expected one of: batch_variant, batch_invariant, "
     "not_comparable)"),
    ("report", ("batch_invariance", "ops", 0, "verdict"), "often",
     "r.yaml: batch_invariance.ops[0]: unknown verdict 'often' (expected one of: batch_variant, batch_invariant, "
     "not_comparable)"),
    # lists
    ("report", ("findings", 0, "checked_calls"), [0], "r.yaml: findings[0]: checked_calls must be a list of integers of at least 1"),
    ("catalog", ("batch_invariance", 0, "rows"), [1, "2"], "c.yaml: batch_invariance[0]: rows must be a list of integers"),
    ("catalog", ("batch_invariance", 0, "probes"), ["linear", 2], "c.yaml: batch_invariance[0]: probes must be a list of strings"),
]


@pytest.mark.parametrize("kind, path, value, message", CASES, ids=[f"{c[0]}-{'.'.join(map(str, c[1]))}-{c[2]!r}" for c in CASES])
def test_a_bad_field_is_one_line_naming_where_and_what(kind, path, value, message):
    data = _report() if kind == "report" else _catalog()
    _load(kind, data)  # the unedited document reads back
    with pytest.raises(ReportError) as e:
        _load(kind, _set(data, path, value))
    assert str(e.value) == message
    assert isinstance(e.value, OpauditError) and e.value.exit_code == 2


@pytest.mark.parametrize("kind, path, message", [
    ("report", ("findings", 0, "op"), "r.yaml: findings[0]: missing field 'op'"),
    ("report", ("batch_invariance", "ops", 0, "op"), "r.yaml: batch_invariance.ops[0]: missing field 'op'"),
    ("catalog", ("entries", 0, "op"), "c.yaml: entries[0]: missing field 'op'"),
    ("catalog", ("batch_invariance", 0, "op"), "c.yaml: batch_invariance[0]: missing field 'op'"),
])
def test_a_required_field_absent_or_null_is_missing(kind, path, message):
    data = _report() if kind == "report" else _catalog()
    with pytest.raises(ReportError) as e:
        _load(kind, _set(data, path, None))
    assert str(e.value) == message
    absent = copy.deepcopy(data)
    node = absent
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(ReportError) as e:
        _load(kind, absent)
    assert str(e.value) == message


def test_the_batch_invariance_section_raises_the_document_error_itself():
    """Read on its own (not through a report), the section's loader raises the same error type."""
    section = _report()["batch_invariance"]
    assert invariance.from_dict(section).batch_size == 4
    with pytest.raises(ReportError, match=r"^batch_invariance\.checks\[0\]: field 'rows' has the wrong type \(str\)$"):
        invariance.from_dict(_set(section, ("checks", 0, "rows"), "one"))
