"""Remedies: PyTorch's documented list (parsed at run time) and the curated knowledge base."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fixtures import models as zoo

import opaudit
from opaudit.data.verdict import Verdict
from opaudit.engine.record import Recorder
from opaudit.engine.remedies import KnowledgeBase, KnowledgeBaseError, documented_ops, parse_determinism_doc
from opaudit.engine.replay import replay, run_in_modes
from opaudit.flows.pipeline import make_finding


def test_installed_torch_documents_both_lists():
    docs = documented_ops()
    raises = {d.api for d in docs if d.behaviour == "raises"}
    fixed = {d.api for d in docs if d.behaviour == "deterministic"}
    assert {"torch.nn.MaxUnpool1d", "torch.nn.MaxUnpool2d", "torch.nn.MaxUnpool3d", "torch.Tensor.put_"} <= raises
    assert {"torch.Tensor.index_put", "torch.Tensor.index_copy", "torch.Tensor.put_"} <= fixed
    put_cpu = [d for d in docs if d.api == "torch.Tensor.put_" and d.behaviour == "deterministic"]
    assert put_cpu and put_cpu[0].devices == ("cpu",)


def test_doc_parser_handles_continuations_and_sub_items():
    doc = """
    The following normally-nondeterministic operations will act
    deterministically when ``mode=True``:

        * :func:`torch.foo` when called on a CPU
          tensor

    The following normally-nondeterministic operations will throw a
    :class:`RuntimeError` when ``mode=True``:

        * :func:`torch.nn.functional.interpolate` when attempting to differentiate a CUDA tensor
          and one of the following modes is used:

          - ``linear``
          - ``bilinear``

        * :class:`torch.nn.Bar`

    In addition, several operations fill uninitialized memory.
    """
    docs = parse_determinism_doc(doc)
    assert [(d.api, d.behaviour, d.devices) for d in docs] == [
        ("torch.foo", "deterministic", ("cpu",)),
        ("torch.nn.functional.interpolate", "raises", ("cuda",)),
        ("torch.nn.Bar", "raises", ()),
    ]
    assert "bilinear" in docs[1].text and docs[1].backward_only


def test_every_curated_entry_names_documented_apis_or_aten_ops():
    kb = KnowledgeBase.load_default()
    documented_apis = {d.api for d in kb.documented}
    assert kb.entries
    for e in kb.entries:
        assert e.ops and all(p.startswith("aten.") for p in e.ops)
        assert e.remedies
    named = {a for e in kb.entries for a in e.apis}
    # Every API PyTorch documents is covered by some curated entry.
    assert documented_apis - named == set()


def test_knowledge_base_refuses_other_files():
    with pytest.raises(KnowledgeBaseError):
        KnowledgeBase.from_data({"format": "opaudit-report", "version": 1})
    with pytest.raises(KnowledgeBaseError):
        KnowledgeBase.from_data({"format": "opaudit-remedies", "version": 1, "entries": [{"ops": "x"}]})


@pytest.mark.parametrize("payload, message", [
    ("!!python/object/apply:os.system ['touch {marker}']\n", "unsafe or unknown YAML tag"),
    ("format: opaudit-remedies\nversion: 1\nentries:\n- ops: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
     "unsafe or unknown YAML tag"),
    ("format: opaudit-remedies\nversion: 1\nentries: [\n", "invalid YAML"),
])
def test_hostile_remedies_file_is_refused_and_nothing_runs(tmp_path, payload, message):
    marker = tmp_path / "pwned"
    path = tmp_path / "remedies.yaml"
    path.write_text(payload.format(marker=marker))
    with pytest.raises(KnowledgeBaseError, match=f"^{path}: {message}"):
        KnowledgeBase.from_text(path.read_text(), str(path))
    assert not marker.exists()


def test_raising_findings_carry_the_curated_remedy():
    # A diverging op's remedy (the setting, the measured cost, PyTorch's bullet) is checked where the
    # race is measured: test_verdicts.test_accumulate_with_collisions_diverges_and_deterministic_mode_fixes_it.
    raising = opaudit.audit(zoo.unpool_all_dims, reps=2).findings(verdicts=["raises"])
    assert len(raising) == 3
    assert all("max_unpool has no deterministic implementation" in f.remedy for f in raising)


def test_cublas_error_gets_the_environment_remedy():
    kb = KnowledgeBase.load_default()
    report = opaudit.audit(zoo.put_no_accumulate, reps=1)
    f = dataclasses.replace(report.all_findings[0], op="aten.mm.default", alert_kind="cublas_workspace")
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in kb.remedy(f) and "before the process starts" in kb.remedy(f)


def test_deterministic_runs_are_strict_unless_strict_mode_refuses_the_op():
    """The deterministic-mode runs are what ``use_deterministic_algorithms(True)`` runs, the strict run
    first; an op strict mode refuses runs them with ``warn_only``. A CPU op gets no extra ``warn_only`` run."""
    with Recorder() as rec:
        torch.randn(8, 8) @ torch.randn(8, 8)
        zoo.put_no_accumulate()
    items = {sig.op: (func, snap) for sig, func, snap in rec.items()}
    modes = {}
    for op in ("aten.mm.default", "aten.put_.default"):
        func, snap = items[op]
        seen = modes.setdefault(op, [])

        def observed(*args, func=func, seen=seen, **kwargs):
            seen.append((torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled(), torch.is_warn_always_enabled()))
            return func(*args, **kwargs)

        obs = replay(observed, snap, 3)
        assert obs.deterministic.runs == 3 and obs.default.runs == 3
        if op == "aten.mm.default":
            assert obs.strict_kind is None
        # What a capsule stores as the source's outputs: the first run of each series.
        seen.append("capsule")
        runs, _ = run_in_modes(observed, snap)
        assert set(runs) == {"deterministic", "default"} and not any(r.error for r in runs.values())
    # Deterministic mode warns every time (TORCH_WARN_ONCE included), and the setting is put back after.
    strict, warn_only, default = (True, False, True), (True, True, True), (False, False, False)
    assert not torch.is_warn_always_enabled()
    off = (False, True, False)  # run_in_modes leaves warn_only on with the setting off: nothing reads it then
    assert modes["aten.mm.default"] == [strict] * 3 + [default] * 3 + ["capsule", strict[:2] + (False,), off]
    # Refused once by strict mode, then 3 warn_only runs (its nondeterministic kernel), then default mode.
    assert modes["aten.put_.default"] == [strict] + [warn_only] * 3 + [default] * 3 + [
        "capsule", strict[:2] + (False,), warn_only[:2] + (False,), off]


def test_cudnn_settings_are_replayed_and_reported():
    """Each cuDNN setting really runs the op ``reps`` times under that setting (the flags
    are read inside the op's call), and the finding carries each setting's k/N."""
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 16, 16)
    with Recorder() as rec:
        conv(x)
    (sig, func, snap), = [i for i in rec.items() if i[0].op == "aten.convolution.default"]
    seen = []

    def observed(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.enabled,
                     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark))
        return func(*args, **kwargs)

    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    obs = replay(observed, snap, 3, cudnn_variants=True)
    assert obs.error is None
    # 3 deterministic-mode runs (the strict run first), 3 default runs, then 3 runs under each cuDNN setting.
    settings = [(False, True, False, False), (False, True, False, True), (False, True, True, False),
                (False, True, True, True)]
    assert seen[:6] == [(True,) + seen[0][1:]] * 3 + [(False,) + seen[0][1:]] * 3
    assert seen[6:] == [s for s in settings for _ in range(3)]
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == before
    names = ["cudnn.deterministic=False,benchmark=False", "cudnn.deterministic=False,benchmark=True",
             "cudnn.deterministic=True,benchmark=False", "cudnn.deterministic=True,benchmark=True"]
    assert [name for name, _ in obs.variants] == names
    assert all(stats.median_s is not None and stats.median_s > 0 for _, stats in obs.variants)
    f = make_finding(sig, obs)
    assert dict(f.cudnn) == dict.fromkeys(names, "0/3")  # a CPU convolution is deterministic
    kb = KnowledgeBase.load_default()
    assert "cudnn.deterministic=True" in kb.remedy(dataclasses.replace(f, verdict=Verdict.DIVERGES))
