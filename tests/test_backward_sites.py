"""Sites of ops that Python runs during backward (issue 21 items 2 and 3): a custom ``autograd.Function``'s
``backward()`` and activation checkpointing's recomputation keep their own lines and modules."""

from __future__ import annotations

import os

from conftest import ROOT

from opaudit.cli.formats import Format, Kind, render
from opaudit.cli.main import main
from opaudit.data.report import load
from opaudit.data.site import Site

SCRIPTS = os.path.join(ROOT, "tests", "fixtures", "scripts")


def _line(script: str, text: str) -> int:
    with open(os.path.join(SCRIPTS, script)) as f:
        return next(i for i, line in enumerate(f, 1) if text in line)


def _audit(tmp_path, capsys, script: str) -> tuple[int, str, object]:
    path = tmp_path / "r.yaml"
    code = main([os.path.join(SCRIPTS, script), "--no-timing", "--reps", "1", "-o", str(path)])
    out, _ = capsys.readouterr()
    return code, out, load(str(path))


def test_ops_of_a_custom_backward_carry_their_own_line_and_the_node_they_belong_to(tmp_path, capsys):
    here = "tests/fixtures/scripts/custom_backward.py"
    code, out, report = _audit(tmp_path, capsys, "custom_backward.py")
    put_line, new_line = _line("custom_backward.py", "out.put_("), _line("custom_backward.py", "grad.new_zeros")
    made = _line("custom_backward.py", "table.index_select")
    (put,) = [f for f in report.all_findings if f.op == "aten.put_.default"]
    assert code == 1 and put.verdict.value == "raises" and put.phases == ("backward",)
    # Its own line in backward(), the module of the forward that made its node, and that forward's line.
    assert put.sites == (Site(here, put_line, "backward", "Lookup", node=Site(here, made, "forward", "")),)
    assert put.locations == (f"{here}:{put_line} (backward of line {made})",)
    (zeros,) = [f for f in report.all_findings if f.op == "aten.new_zeros.default"]
    assert zeros.sites[0].line == new_line and zeros.sites[0].node.line == made
    # The crash list names the line PyTorch's own traceback would.
    table = render(report, Kind.REPORT, Format.TABLE)
    crash = table[table.index("Will deterministic mode crash this run?"):]
    assert f"{here}:{put_line} (backward of line {made})" in crash
    assert f"<code>{here}:{put_line}</code> backward of {here}:{made}" in render(report, Kind.REPORT, Format.HTML)
    # The forward op itself is where it was.
    (gather,) = [f for f in report.all_findings if f.op == "aten.index_select.default"]
    assert gather.sites == (Site(here, made, "forward", "Lookup"),)
    # Ops of PyTorch's own nodes still point at the forward line that created them.
    (pow_bw,) = [f for f in report.all_findings if f.op == "aten.pow.Tensor_Scalar" and f.phases == ("backward",)]
    assert pow_bw.sites[0].node is None and pow_bw.sites[0].line == _line("custom_backward.py", ".square()")


def test_recomputed_forward_ops_keep_their_lines_and_modules(tmp_path, capsys):
    here = "tests/fixtures/scripts/checkpointed.py"
    _, out, report = _audit(tmp_path, capsys, "checkpointed.py")
    lookup, norm = _line("checkpointed.py", "self.table[ids]"), _line("checkpointed.py", "return self.norm(h)")
    mlp = _line("checkpointed.py", "checkpoint(self.mlp")
    expected = {
        # In the user's function that checkpoint() wraps: its own lines.
        "aten.index.Tensor": (lookup, "embed", "Block"),
        "aten.native_layer_norm.default": (norm, "embed", "Block.norm"),
        # In library code (nn.Sequential's forward) that checkpoint() wraps: the user's checkpoint() line,
        # and each module's own name (the GELU, not the Linear whose backward asked for the recompute).
        "aten.gelu.default": (mlp, "forward", "Block.mlp.1"),
        "aten.addmm.default": (mlp, "forward", "Block.mlp.0"),
    }
    for op, (line, function, module) in expected.items():
        (f,) = [f for f in report.all_findings if f.op == op and "backward" in f.phases and f.signature.count("f32") < 4]
        first = Site(here, line, function, module)
        assert f.sites == (first, Site(here, line, function, module, recomputed=True)), op
        assert f.locations == (f"{here}:{line}", f"{here}:{line} (recomputed)"), op
        assert f.phases == ("forward", "backward"), op
    assert f"{here}:{lookup};{here}:{lookup} (recomputed)" in render(report, Kind.REPORT, Format.CSV)
    # The backward ops of checkpointed code are not recomputations.
    assert not [s for f in report.all_findings if f.op.endswith("_backward.default") for s in f.sites if s.recomputed]
