"""Catalogs: the sweep on real OpInfo ops, keys, file formats, resume, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import yaml

from opaudit.cli.formats import REPORT_ONLY, Format, Kind, render
from opaudit.cli.main import main
from opaudit.data.files import ReportError
from opaudit.data.verdict import Verdict
from opaudit.engine.record import Recorder
from opaudit.flows.catalog import (
    FORMAT,
    Catalog,
    CatalogEntry,
    CatalogError,
    CatalogRequest,
    SweepConfig,
    SweptOp,
    build_catalog,
    catalog_from_dict,
    entry_key,
    load_catalog,
    select_tasks,
    signature_dtype,
    signature_variant,
    split_signature,
)

# The ops torch.use_deterministic_algorithms documents for CPU (any device, or "CPU"):
# max_unpool1d/2d/3d and put_(accumulate=False) raise; index_put and put_ with
# accumulate=True, and index_copy, are made deterministic by the mode.
DOCUMENTED = ["nn.functional.max_unpool1d", "nn.functional.max_unpool2d", "nn.functional.max_unpool3d",
              "put", "index_put", "index_copy"]
# Small enough for a test on two cores, large enough (> 1e5 elements) for the races.
FAST_SWEEP = SweepConfig(max_samples=4, stress_elements=300_000, stress_samples=2, reps=2)
FAST = dict(isolate=False, modules=False)


@pytest.fixture(scope="module")
def documented() -> Catalog:
    torch.set_num_threads(2)
    return build_catalog(CatalogRequest(FAST_SWEEP, tuple(DOCUMENTED), **FAST))


def test_documented_cpu_ops_are_classified_as_documented(documented):
    """Issue §5: the catalog agrees with torch.use_deterministic_algorithms.__doc__ on CPU.

    Only what does not hang on a thread race is asserted here: whether two threads'
    colliding adds overlap in a given replay depends on the machine's load, so a
    ``diverges`` verdict for the accumulating ops is not something one sweep can
    promise (``test_verdicts.py`` measures the race with enough replays).
    """
    get = documented.get
    assert get("aten.max_unpool2d.default", "float32").verdict is Verdict.RAISES  # max_unpool1d and 2d
    assert get("aten.max_unpool3d.default", "float32").verdict is Verdict.RAISES
    assert {s.source for s in documented.swept} >= {"nn.functional.max_unpool1d", "nn.functional.max_unpool3d"}
    put = get("aten.put.default", "float32", "")
    assert put.verdict is Verdict.RAISES and put.alert == "no_deterministic_impl"
    assert "put_ does not have a deterministic implementation" in put.error
    # Deterministic when enabled: strict mode never raised, on OpInfo's samples or on the stress inputs.
    for key in (("aten.index_put.default", "float32", "accumulate=True"),
                ("aten.put.default", "float32", "accumulate=True"),
                ("aten.index_put.default", "float32", ""), ("aten.index_copy.default", "float32", "")):
        e = get(*key)
        assert e is not None, key
        assert e.alert is None and e.error == "" and Verdict.RAISES not in (e.verdict, e.opinfo, e.stress), (key, e)
    for op in ("aten.index_put.default", "aten.put.default"):
        e = get(op, "float32", "accumulate=True")
        # OpInfo's few-element samples run on one thread: never a race. The stress inputs
        # (colliding indices, 1e5+ elements) reached this kernel too.
        assert e.opinfo is Verdict.STABLE and e.stress is not None, (op, e)
        # The entry keeps the worse of the two, with the input kind that showed it.
        worse = max((e.opinfo, e.stress), key=lambda v: v.severity)
        assert e.verdict is worse
        assert e.input_kind == ("opinfo" if e.opinfo is worse else "stress")


def test_every_swept_op_ran_forward_and_backward(documented):
    assert all(s.status == "ok" and s.samples > 0 and s.stress_samples > 0 for s in documented.swept)
    phases = {e.phase for e in documented.entries}
    assert any("backward" in p for p in phases) and any("forward" in p for p in phases)


def test_summary_counts_entries_ops_and_what_was_not_swept():
    def entry(op, dtype, verdict):
        return CatalogEntry(op, dtype, "", verdict, "opinfo", "forward", op, "f32[1]")

    entries = (entry("aten.a.default", "float32", Verdict.RAISES), entry("aten.a.default", "float64", Verdict.RAISES),
               entry("aten.b.default", "float32", Verdict.DIVERGES), entry("aten.c.default", "float32", Verdict.STABLE))
    swept = (SweptOp("a", "float32", "ok", 2), SweptOp("b", "float32", "partial", 1),
             SweptOp("c", "float32", "failed"), SweptOp("d", "float32", "timeout"), SweptOp("e", "float32", "crashed"))
    summary = Catalog({}, {}, entries, swept).summary
    assert summary == {"raises": 2, "diverges_deterministic": 0, "diverges": 1, "warns": 0, "random": 0,
                       "uninitialized": 0, "skipped": 0, "stable": 1, "entries": 4, "ops": 3, "swept": 5,
                       "not_swept": 3}


# -- keys -------------------------------------------------------------------------
def _recorded(fn) -> list:
    rec = Recorder()
    with rec:
        fn()
    return rec.signatures()


def test_entry_key_of_recorded_signatures():
    x, idx, v = torch.randn(6, 3), torch.tensor([0, 0, 1]), torch.randn(3, 3)
    cond = torch.rand(6, 3) > 0.5
    sigs = _recorded(lambda: (x.clone().index_put_((idx,), v, accumulate=True), torch.where(cond, x, 0.0),
                              x.double().scatter_reduce(0, idx.view(3, 1).expand(3, 3), v.double(), reduce="sum"),
                              x.clone().index_put_((idx,), v)))
    keys = {entry_key(s.op, s.signature) for s in sigs}
    assert ("aten.index_put_.default", "float32", "accumulate=True") in keys
    assert ("aten.index_put_.default", "float32", "") in keys  # accumulate=False is the default
    assert ("aten.where.self", "float32", "") in keys  # the float input, not the bool condition
    assert ("aten.scatter_reduce.two", "float64", "reduce='sum'") in keys


def test_signature_helpers():
    assert split_signature("f32[2,3], [i64[2], None], 'a,b', dtype=torch.float16") == \
        ["f32[2,3]", "[i64[2], None]", "'a,b'", "dtype=torch.float16"]
    assert signature_dtype("[2, 3], dtype=torch.float16, device=device(type='cpu')") == "float16"
    assert signature_dtype("b8[4], i64[4]") == "bool"
    assert signature_dtype("[4]") == "none"
    assert signature_variant("aten.sort.stable", "f32[4], stable=True, descending=True") == \
        "stable=True,descending=True"
    assert signature_variant("aten.not_an_op.default", "f32[4], True") == ""


# -- selection and bad input ------------------------------------------------------------
def test_ops_globs_match_opinfo_and_aten_names():
    names = {t.source for t in select_tasks("cpu", ["aten.index_put*"], ("float32",))}
    assert "index_put" in names
    names = {t.source for t in select_tasks("cpu", ["nn.functional.max_unpool2d"], ("float32",))}
    assert names == {"nn.functional.max_unpool2d", "nn.functional.max_unpool2d.grad"}  # a name takes its variants
    names = {t.source for t in select_tasks("cpu", ["nn.functional.max_unpool2d.grad"], ("float32",))}
    assert names == {"nn.functional.max_unpool2d.grad"}
    assert {t.source for t in select_tasks("cpu", ["nn.LSTM"], ("float32",))} == {"nn.LSTM"}


def test_unknown_ops_name_the_closest():
    with pytest.raises(CatalogError, match=r"matches no .*closest: .*index_put"):
        select_tasks("cpu", ["index_putt"], ("float32",))


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtypes="float33"), "unknown dtype 'float33'"),
    (dict(config=SweepConfig(device="tpu")), "expected cpu, cuda or cuda:N"),
    (dict(ops=("nn.functional.max_unpool2d",), dtypes="int64"), "none of the selected ops supports int64"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(CatalogError, match=message):
        build_catalog(CatalogRequest(**{"ops": ("put",), **kwargs, "isolate": False}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda():
    with pytest.raises(CatalogError, match="CUDA is not available"):
        build_catalog(CatalogRequest(SweepConfig(device="cuda"), ("put",)))


# -- files -------------------------------------------------------------------------------
def test_yaml_round_trip_is_byte_stable(documented, tmp_path):
    text = render(documented, Kind.CATALOG, Format.YAML)
    assert text == render(documented, Kind.CATALOG, Format.YAML)
    p = tmp_path / "c.yaml"
    p.write_text(text)
    again = load_catalog(str(p))
    assert again == dataclasses.replace(documented, settings=again.settings, environment=again.environment)
    assert render(again, Kind.CATALOG, Format.YAML) == text
    assert [e.key for e in again.entries] == sorted(e.key for e in again.entries)
    data = yaml.safe_load(text)
    assert data["format"] == FORMAT and data["version"] == 2 and "generated" not in text


def test_every_format_renders(documented, tmp_path):
    for fmt in set(Format) - REPORT_ONLY:  # SARIF is for reports only
        assert render(documented, Kind.CATALOG, fmt).strip()
    as_json = json.loads(render(documented, Kind.CATALOG, Format.JSON))
    assert catalog_from_dict(as_json).entries == documented.entries
    csv_lines = render(documented, Kind.CATALOG, Format.CSV).splitlines()
    assert csv_lines[0].startswith("op,dtype,variant,verdict,input_kind")
    assert len(csv_lines) == 1 + len(documented.entries)


def test_every_export_of_a_subset_catalog_names_its_selection(documented):
    """A catalog of a few ``--ops`` must not read as a sweep of the whole OpInfo database."""
    named = f"only the ops --ops {','.join(DOCUMENTED)} selects, in float32"
    assert documented.selection == named
    for fmt in set(Format) - REPORT_ONLY:
        text = render(documented, Kind.CATALOG, fmt)
        if fmt in (Format.YAML, Format.JSON):  # the settings themselves: ops and dtypes
            data = yaml.safe_load(text)
            assert data["settings"]["ops"] == DOCUMENTED and data["settings"]["dtypes"] == ["float32"]
            continue
        assert named in text.replace("\n", " ").replace("Only the ops", "only the ops"), fmt
        assert "Every op in PyTorch" not in text and "every op in PyTorch" not in text, fmt
    full = dataclasses.replace(documented, settings={**documented.settings, "ops": ["*"], "modules": True})
    assert full.selection == ("every op in PyTorch's OpInfo test database (plus the torch.nn modules it does not "
                              "cover), in float32")
    assert "stress" in render(documented, Kind.CATALOG, Format.MARKDOWN)
    no_stress = dataclasses.replace(documented, settings={**documented.settings, "stress": False})
    assert "(no stress inputs)" in render(no_stress, Kind.CATALOG, Format.MARKDOWN)


def test_dtypes_all_sweeps_every_dtype_each_op_supports():
    from torch.testing._internal.common_methods_invocations import op_db

    (info,) = [o for o in op_db if o.name == "sum" and not o.variant_test_name]
    supported = {str(d).replace("torch.", "") for d in info.supported_dtypes("cpu")}
    tasks = select_tasks("cpu", ["sum"], ("all",))
    assert {t.dtype for t in tasks if t.source == "sum" and not t.form} == supported
    assert {"int64", "float32", "bool"} <= supported


def test_markdown_is_grouped_by_verdict_with_counts(documented):
    md = render(documented, Kind.CATALOG, Format.MARKDOWN)
    raises = len(documented.entries_with(Verdict.RAISES))
    assert f"## raises ({raises})" in md and "## diverges (" in md and "## stable (" in md
    assert "Crashes a run that sets `torch.use_deterministic_algorithms(True)`" in md
    assert md.index("## raises") < md.index("## diverges (") < md.index("## stable (")
    assert "`aten.max_unpool3d.default`" in md


@pytest.mark.parametrize("text, message", [
    ("format: opaudit-catalog\nversion: 1\nentries:\n  - op: aten.put", "truncated"),
    ("format: opaudit-catalog\nversion: 3\nentries: []\n...\n", "version 3 is not supported"),
    ("format: opaudit-report\nversion: 1\n...\n", "expected 'opaudit-catalog'"),
    ("!!python/object/apply:os.system ['echo pwned']\n...\n", "unsafe or unknown YAML tag"),
    ("format: opaudit-catalog\nversion: 1\nenvironment: {}\nsettings: {}\nentries:\n"
     "- {op: a, dtype: f, variant: '', verdict: sometimes, input_kind: opinfo}\n...\n", "unknown verdict 'sometimes'"),
])
def test_hostile_or_damaged_files_are_refused(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ReportError, match=message):
        load_catalog(str(p))


def test_duplicate_entries_are_refused(documented, tmp_path):
    data = documented.to_dict()
    data["entries"].append(data["entries"][0])
    with pytest.raises(ReportError, match="appears twice"):
        catalog_from_dict(data, "dup.yaml")


# -- merging, resume ---------------------------------------------------------------------
def test_merge_keeps_worst_and_prefers_opinfo_on_ties():
    from opaudit.flows.catalog import merge_entries

    base = CatalogEntry("aten.x.default", "float32", "", Verdict.STABLE, "opinfo", "forward", "x", "f32[1]",
                        opinfo=Verdict.STABLE)
    stressed = dataclasses.replace(base, verdict=Verdict.DIVERGES, input_kind="stress", signature="f32[9]",
                                   opinfo=None, stress=Verdict.DIVERGES)
    skipped = dataclasses.replace(base, verdict=Verdict.SKIPPED, input_kind="stress", opinfo=None,
                                  stress=Verdict.SKIPPED)
    m = merge_entries(base, stressed)
    assert (m.verdict, m.input_kind, m.opinfo, m.stress, m.seen_in) == \
        (Verdict.DIVERGES, "stress", Verdict.STABLE, Verdict.DIVERGES, 2)
    assert merge_entries(stressed, base) == m
    assert merge_entries(base, skipped).verdict is Verdict.STABLE  # a measurement beats "skipped"
    assert merge_entries(base, dataclasses.replace(base, input_kind="stress")).input_kind == "opinfo"


def test_interrupted_sweep_resumes_from_partial_file(tmp_path):
    partial = str(tmp_path / "c.yaml.partial")
    seen = []

    def stop_after_first(p):
        seen.append(p.op)
        raise KeyboardInterrupt

    sweep = dataclasses.replace(FAST_SWEEP, stress=False)
    with pytest.raises(KeyboardInterrupt):
        build_catalog(CatalogRequest(sweep, ("put", "take"), partial=partial, **FAST), on_progress=stop_after_first)
    first = load_catalog(partial)
    assert not first.complete and [s.task_id for s in first.swept] == ["put:float32"]
    done = []
    full = build_catalog(CatalogRequest(sweep, ("put", "take"), resume=partial, **FAST),
                         on_progress=lambda p: done.append(p.op))
    assert done == ["take:float32"] and full.complete
    assert {s.source for s in full.swept} == {"put", "take"}
    assert full.get("aten.put.default", "float32").verdict is Verdict.RAISES
    with pytest.raises(CatalogError, match="cannot resume: it was made with reps=2"):
        build_catalog(CatalogRequest(dataclasses.replace(sweep, reps=3), ("put",), resume=partial, **FAST))


# -- command line --------------------------------------------------------------------------
def _cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["catalog", "--ops", "index_putt"], "matches no OpInfo entry, aten name or module; closest:"),
    (["catalog", "--ops", "put", "--dtypes", "floaty"], "unknown dtype"),
    (["catalog", "--ops", "put", "--resume"], "--resume needs -o PATH"),
    (["catalog", "--ops", "put", "--format", "xml"], "unknown format 'xml'"),
    (["catalog", "--ops", "put", "--op-timeout", "0"], "must be positive"),
    (["catalog", "--ops", "put", "--device", "cuda"] if not torch.cuda.is_available() else ["catalog", "--ops", "x"],
     "CUDA is not available" if not torch.cuda.is_available() else "matches no"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = _cli(argv, capsys)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_resume_without_partial_file(tmp_path, capsys):
    code, _, err = _cli(["catalog", "--ops", "put", "-o", str(tmp_path / "c.yaml"), "--resume"], capsys)
    assert code == 2 and "no partial file" in err


def test_cli_sweeps_in_a_worker_and_writes_the_file(tmp_path, capsys):
    out_path = tmp_path / "cat.md"
    code, out, err = _cli(["catalog", "--ops", "put", "--no-stress", "--max-samples", "2", "--reps", "2",
                           "-o", str(out_path)], capsys)
    assert code == 0, err
    assert out == "" and "catalog written to" in err
    assert "## raises (1)" in out_path.read_text()
    assert not os.path.exists(str(out_path) + ".partial")


def test_cli_converts_an_existing_catalog(documented, tmp_path, capsys):
    src = tmp_path / "c.yaml"
    src.write_text(render(documented, Kind.CATALOG, Format.YAML))
    code, out, _ = _cli(["catalog", "--from", str(src), "--format", "csv"], capsys)
    assert code == 0 and out.startswith("op,dtype,variant")
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: opaudit-catalog\nversion: 1\nentries: [")
    code, out, err = _cli(["catalog", "--from", str(bad)], capsys)
    assert code == 2 and out == "" and "truncated" in err and err.count("\n") == 1
    # A sweep's options beside --from would be ignored: refused instead.
    for flag in (["--device", "cuda"], ["--ops", "sum"], ["--resume"], ["--threads", "2"]):
        code, out, err = _cli(["catalog", "--from", str(src), *flag], capsys)
        assert code == 2 and out == "", flag
        assert err == f"opaudit: error: {flag[0]} steers a sweep, and --from runs none (it converts {src})\n"


@pytest.mark.parametrize("ops", ["", ",", " , ,"])
def test_an_empty_op_selection_is_refused_not_taken_for_all(ops, tmp_path, capsys, monkeypatch):
    import opaudit.flows.catalog as flows_catalog

    def sweep(*args, **kwargs):  # were it taken for "every op", a whole sweep would start here
        raise AssertionError("a sweep started")

    monkeypatch.setattr(flows_catalog, "build_catalog", sweep)
    out_path = tmp_path / "c.yaml"
    code, out, err = _cli(["catalog", "--ops", ops, "--in-process", "-o", str(out_path)], capsys)
    assert code == 2 and out == "" and not out_path.exists()
    assert err == "opaudit: error: --ops: no op given (leave --ops out to sweep every op)\n"
