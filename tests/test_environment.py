"""The environment fingerprint and the environment's own hazards."""

from __future__ import annotations

import re

import torch
from fixtures import models as zoo

import opaudit
from opaudit.engine import environment
from opaudit.engine.environment import environment_warnings, fingerprint


def test_fingerprint_is_stable_and_complete():
    a, b = fingerprint("cpu"), fingerprint("cpu")
    assert a == b and list(a) == sorted(a)
    for key in ("torch", "python", "platform", "cpu", "threads", "cuda", "cudnn", "cublas_workspace_config",
                "cudnn_deterministic", "cudnn_benchmark", "tf32_matmul", "tf32_cudnn", "fill_uninitialized_memory"):
        assert key in a
    assert a["threads"] == torch.get_num_threads()
    assert isinstance(a["torch"], str) and type(a["torch"]) is str


def test_cuda_hazards_are_named(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(environment, "_CUBLAS_AT_START", None)
    bench, tf32 = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        text = "\n".join(environment_warnings({"cuda:0"}))
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = bench, tf32
    assert "CUBLAS_WORKSPACE_CONFIG is missing" in text
    assert "cudnn.benchmark=True" in text
    assert "TF32 matmuls are enabled" in text


def test_cublas_set_after_start_is_named(monkeypatch):
    monkeypatch.setattr(environment, "_CUBLAS_AT_START", None)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    text = "\n".join(environment_warnings({"cuda:0"}))
    assert "set after the process started" in text
    monkeypatch.setattr(environment, "_CUBLAS_AT_START", ":4096:8")
    assert not any("CUBLAS" in w for w in environment_warnings({"cuda:0"}))


def test_cpu_run_has_no_cuda_warnings():
    assert environment_warnings({"cpu"}) == []


def test_fill_uninitialized_memory_cost_is_measured():
    report = opaudit.audit(zoo.empty_outputs, reps=3)
    (w,) = [w for w in report.env_warnings if "uninitialized" in w]
    # The cost is a measurement: a figure, or the documented wording when filling cost nothing
    # measurable here (which an idle or a loaded machine may give). Which one is not the test's business.
    assert re.search(r"^2 call\(s\) return uninitialized memory: .*fill_uninitialized_memory=True\) "
                     r"\((no measurable cost here|measured here: \d+\.\d us in total over the recorded run's calls)\);",
                     w), w
    for f in report.findings(verdicts=["uninitialized"]):
        assert f.time_default_us is not None and f.time_deterministic_us is not None
        assert f.default_diverged == ""  # timed only, never compared


def test_report_environment_reflects_the_users_settings():
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        report = opaudit.audit(lambda: torch.ones(3).sum(), reps=1)
    finally:
        torch.use_deterministic_algorithms(False)
    assert report.environment["deterministic_algorithms"] is True
    assert report.environment["deterministic_warn_only"] is True
