"""Sites in code generated at run time (issue 13, item 10): the generated frame, and the user's line that led there."""

from __future__ import annotations

import os

from conftest import ROOT

from opaudit.cli.main import main
from opaudit.data.report import load
from opaudit.data.site import Site
from opaudit.engine.sourcefiles import is_generated, is_internal

SCRIPT = os.path.join(ROOT, "tests", "fixtures", "scripts", "generated_code.py")
HERE = "tests/fixtures/scripts/generated_code.py"


def _line(text: str) -> int:
    with open(SCRIPT) as f:
        return next(i for i, line in enumerate(f, 1) if text in line)


def test_ops_in_generated_code_name_the_users_line_too(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    code = main([SCRIPT, "--no-timing", "--reps", "1", "-o", str(path)])
    _, err = capsys.readouterr()
    assert code == 1
    report = load(str(path))
    by_op = {}
    for f in report.all_findings:
        by_op.setdefault((f.op, f.phases), []).append(f)
    conv, agg = _line("self.propagate(self.lin(x)"), _line('namespace["aggregate"]')
    # A module written to the temp folder and imported (torch_geometric's propagate).
    (scatter,) = by_op[("aten.index_put_.default", ("forward",))]
    assert scatter.sites == (Site("gen_propagate.py", 7, "propagate", "Conv", Site(HERE, conv, "forward", "")),)
    assert scatter.locations == (f"{HERE}:{conv} via gen_propagate.py:7",)
    # exec'd source: the raising put_ is listed with the user's line.
    (put,) = by_op[("aten.put_.default", ("forward",))]
    assert put.verdict.value == "raises"
    assert put.sites == (Site("<generated aggregate>", 3, "aggregate", "", Site(HERE, agg, "<module>", "")),)
    assert f"{HERE}:{agg} via <generated aggregate>:3" in err
    # The backward of the generated index_put_ points at the same two frames.
    backward = {f.locations for f in by_op[("aten.index.Tensor", ("backward",))]}
    assert backward == {(f"{HERE}:{conv} via gen_propagate.py:7",)}
    # Ops of the user's own files are unchanged.
    (addmm,) = by_op[("aten.addmm.default", ("forward",))]
    assert addmm.sites[0].caller is None and addmm.locations == (f"{HERE}:{conv}",)


def test_what_counts_as_generated(tmp_path):
    gone = tmp_path / "gone.py"
    assert is_generated("<string>") and is_generated("<generated aggregate>")
    assert not is_generated("<stdin>") and not is_internal("<stdin>")
    assert is_internal("<frozen importlib._bootstrap>") and is_internal("<eval_with_key>.3")
    assert is_generated(str(gone))  # never written, or deleted since
    gone.write_text("x = 1\n")
    assert is_generated(str(gone))  # in the temp folder
    assert not is_generated(str(gone), homes=(str(tmp_path),))  # the audited script's own folder
    assert not is_generated(os.__file__)  # a real file outside the temp folder
