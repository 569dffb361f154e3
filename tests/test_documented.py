"""PyTorch's documented list (``torch.use_deterministic_algorithms.__doc__``) against opaudit.

Every op on the list is in the catalog's default selection (the selection, not a
sweep: a full sweep takes minutes), and a remedy quotes the bullet that fits the call.
"""

from __future__ import annotations

import pytest
import torch

from opaudit.data.verdict import Verdict
from opaudit.engine.remedies import KnowledgeBase, documented_ops
from opaudit.flows.catalog import DEFAULT_DTYPES, select_tasks
from opaudit.flows.catalog.select import INPLACE, databases
from opaudit.flows.run import audit


def _covered(api: str, tasks: list) -> bool:
    """Whether a task sweeps ``api``: ``torch.nn.MaxUnpool1d``, ``torch.Tensor.put_``, ``torch.bincount``..."""
    opinfos, _ = databases()
    name = api.rsplit(".", 1)[-1]
    for t in tasks:
        base = opinfos[t.source].name if t.source in opinfos else t.source
        if api.startswith("torch.nn.") and name[:1].isupper():
            key = name.lower()
            if t.source == f"nn.{name}" or base.rsplit(".", 1)[-1].replace("_", "") == key:
                return True
        elif name.endswith("_") and not name.startswith("__"):
            if base == name or (base == name[:-1] and t.form == INPLACE):
                return True
        elif base in (name, f"nn.functional.{name}"):
            return True
    return False


@pytest.fixture(scope="module")
def selection() -> list:
    return select_tasks("cpu", None, DEFAULT_DTYPES)


def test_every_documented_op_is_in_the_default_selection(selection):
    documented = documented_ops()
    assert len(documented) > 40  # the list parsed: a broken parser would make this test pass vacuously
    missing = sorted({d.api for d in documented if not _covered(d.api, selection)})
    assert missing == []


def test_selection_has_the_forms_opinfo_lists_under_other_names(selection):
    labels = {t.task_id for t in selection}
    assert "put@inplace:float32" in labels  # Tensor.put_
    assert "median@out:float32" in labels  # median.dim_values
    assert "resize_:float32" in labels
    assert "bincount:int64" in labels  # integers only: swept in int64, not left out
    assert "index_put@inplace:float32" in labels


def test_ops_names_select_the_forms():
    assert {t.label for t in select_tasks("cpu", ["put_"], DEFAULT_DTYPES)} == {"put@inplace"}
    assert {t.label for t in select_tasks("cpu", ["aten.median.dim_values"], DEFAULT_DTYPES)} == {"median@out"}
    assert {t.task_id for t in select_tasks("cpu", ["bincount"], DEFAULT_DTYPES)} == {"bincount:int64"}


def _quantized_resize() -> None:
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8)
    q.resize_(8)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quantized_resize_raises_under_deterministic_mode():
    report = audit(_quantized_resize, reps=2)
    (f,) = [f for f in report.all_findings if f.op == "aten.resize_.default"]
    assert f.verdict is Verdict.RAISES, (f.verdict, f.reason)
    assert "resize" in (f.strict_error or "")


def test_remedy_quotes_the_bullet_of_this_call():
    kb = KnowledgeBase.load_default()
    no_acc = kb.documentation("aten.put_.default", "cpu", Verdict.RAISES, "f32[10], i64[3], f32[3]")
    assert [d.text for d in no_acc] == ["torch.Tensor.put_ when accumulate=False"]
    acc = kb.documentation("aten.put_.default", "cpu", Verdict.DIVERGES, "f32[10], i64[3], f32[3], True")
    assert [d.text for d in acc] == ["torch.Tensor.put_ with accumulate=True when called on a CPU tensor"]
    unpool = kb.documentation("aten.max_unpool3d.default", "cpu", Verdict.RAISES, "f32[1,1,2,2,2]")
    assert [d.api for d in unpool] == ["torch.nn.MaxUnpool3d"]
