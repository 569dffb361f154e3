"""Recorder and global state under what scripts really do: nested tensors, and the TF32
flags set through torch's legacy and new APIs together."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from conftest import ROOT

import opaudit
from opaudit import Verdict


def test_a_nested_tensor_op_is_skipped_with_a_reason_not_a_crash():
    def step():
        parts = [torch.ones(2, 3), torch.ones(4, 3)]
        nested = torch.nested.nested_tensor(parts, layout=torch.strided)
        assert (nested * 2).is_nested
        torch.arange(6.0).sum()

    report = opaudit.audit(step, reps=1)
    mul = [f for f in report.all_findings if f.op == "aten.mul.Tensor"]
    assert [(f.verdict, f.reason) for f in mul] == [(Verdict.SKIPPED, "unsupported input: nested tensor (strided)")]
    assert "nested strided, 2 tensors" in mul[0].signature
    assert "aten.sum.default" in {f.op for f in report.all_findings}  # recording went on


MIXED_TF32 = """
    import torch
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("medium")
    (torch.ones(3) * 2).sum()
"""


def test_legacy_and_new_tf32_settings_survive_an_audit(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(MIXED_TF32))
    check = textwrap.dedent(f"""
        import sys, torch, opaudit
        from opaudit.cli import main
        code = main([{str(script)!r}, "--reps", "1", "-q", "-o", {str(tmp_path / "r.yaml")!r}])
        exec(open({str(script)!r}).read())  # the same settings, then the Python API
        report = opaudit.audit(lambda: (torch.ones(3) * 2).sum(), reps=1)
        print(code, torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
              report.environment["float32_matmul_precision"], report.environment["tf32_cudnn"])
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "medium", "False", "medium", "False"]
    assert opaudit.load_report(str(tmp_path / "r.yaml")).environment["float32_matmul_precision"] == "medium"
