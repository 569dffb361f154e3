"""What is documented holds: PyTorch's documented list, and opaudit's own docs.

Every op on ``torch.use_deterministic_algorithms.__doc__``'s list is in the
catalog's default selection (the selection, not a sweep: a full sweep takes
minutes), and a remedy quotes the bullet that fits the call.

Every command README.md and docs/*.md show parses with opaudit's own parser and
reads files that exist, every relative link resolves (``scripts/check_docs.py``),
the README's test command is the one CI runs, and its quick start runs as shown.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from opaudit.data.verdict import Verdict
from opaudit.engine.remedies import KnowledgeBase, documented_ops
from opaudit.flows.catalog import DEFAULT_DTYPES, select_tasks
from opaudit.flows.catalog.select import INPLACE, databases
from opaudit.flows.run import audit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# -- opaudit's own docs -------------------------------------------------------

@pytest.fixture(scope="module")
def doc_commands():
    """``scripts/doc_commands.py``, the checker ``scripts/check_docs.py`` runs."""
    spec = importlib.util.spec_from_file_location("doc_commands", os.path.join(ROOT, "scripts", "doc_commands.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["doc_commands"] = module  # its dataclasses look their module up while they are made
    spec.loader.exec_module(module)
    return module


def test_every_documented_command_parses_and_reads_files_that_exist(doc_commands):
    problems = doc_commands.check_all()
    assert not problems, "\n".join(map(str, problems))
    counted = sum(1 for page in doc_commands.pages() for _ in doc_commands.command_lines(page))
    assert counted > 40  # the pages were read: a checker that finds no command would pass vacuously


def _docs_tree(tmp_path, page: str) -> str:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A section\n")
    (tmp_path / "README.md").write_text(page)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[project.optional-dependencies]\ntest = []\n')
    (tmp_path / "train.py").write_text("")
    return str(tmp_path)


@pytest.mark.parametrize("page, message", [
    ("```bash\nopaudit train.py --no-such-option\n```\n", "unrecognized arguments: --no-such-option"),
    ("```bash\nopaudit train.py --reps zero\n```\n", "--reps"),
    ("```bash\nopaudit catalog --ops put --batch-size 3\n```\n", "unrecognized arguments: --batch-size"),
    ("```\n$ opaudit missing.py -o out.yaml\nverdict ...\n```\n", "no such file: missing.py"),
    ("```bash\nopaudit diff a.yaml b.yaml\n```\n", "no such file: a.yaml"),
    ("```bash\ntorchrun --nproc-per-node 2 -m opaudit train.py --nproc-per-node\n```\n", "--nproc-per-node"),
    ("```bash\npip install -e '.[test,nope]'\n```\n", "no such extra in pyproject.toml: nope"),
    ("```bash\nopaudt train.py\n```\n", "unknown program 'opaudt'"),
    ("```\nopaudit train.py\n```\n", "without ```bash"),
    ("See [the page](docs/nothere.md).\n", "link to a missing file: docs/nothere.md"),
    ("See [the section](docs/other.md#no-such-section).\n", "no heading gives #no-such-section"),
])
def test_the_checker_names_what_does_not_hold(doc_commands, tmp_path, page, message):
    root = _docs_tree(tmp_path, page)
    problems = [str(p) for p in doc_commands.check_all(root)]
    assert any(message in p for p in problems), problems


def test_the_checker_accepts_what_holds(doc_commands, tmp_path):
    page = """See [the section](docs/other.md#a-section) and [top](#top).

# Top

```bash
opaudit train.py -o report.yaml --reps 2 -- --steps 3   # the script's own options after --
opaudit diff report.yaml report.yaml && echo $?
timeout --preserve-status 20 opaudit train.py -q 2>&1 >/dev/null | head -1
```

<!-- check_docs: not runnable (another machine's catalog) -->
```bash
opaudit diff catalogs/a100.yaml catalogs/h100.yaml
```
"""
    root = _docs_tree(tmp_path, page)
    assert [str(p) for p in doc_commands.check_all(root)] == []


def _fenced_after(text: str, heading: str) -> str:
    """The first fenced block's content after ``heading``."""
    rest = text[text.index(heading):]
    start = rest.index("```")
    start = rest.index("\n", start) + 1
    return rest[start:rest.index("```", start)]


def test_the_readme_test_command_is_the_one_ci_runs():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        command = _fenced_after(f.read(), "## Tests (fresh machine)").strip()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert command in f.read().splitlines()


def test_the_readme_stays_one_scroll():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().count("\n")
    assert lines <= 300, f"README.md has {lines} lines: move the details to a page in docs/"


def test_every_audit_option_is_in_the_options_table():
    from opaudit.cli.main import _audit_parser

    with open(os.path.join(ROOT, "docs", "auditing.md"), encoding="utf-8") as f:
        table = "\n".join(line for line in f if line.startswith("| `-"))
    options = {o for a in _audit_parser()._actions for o in a.option_strings if o.startswith("--")}
    assert options and sorted(o for o in options if f"{o}`" not in table and f"{o} " not in table) == []


@pytest.mark.timeout(300)
def test_the_quick_start_runs_as_the_readme_shows():
    """The README's quick-start command, as written, records what the README's output says it recorded."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    install = _fenced_after(readme, "## Quick start (fresh machine)").strip()
    command = install.split("&&")[-1].split()
    assert command[0] == "opaudit"
    shown = _fenced_after(readme, "(the replay's progress bar left out)").splitlines()
    assert shown[0] == "$ " + " ".join(command)
    proc = subprocess.run([sys.executable, "-m", "opaudit", *command[1:]], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=280)
    assert proc.returncode in (0, 1), proc.stderr  # 1 when a race showed, as in the README; 0 on a busy machine
    printed = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert shown[1] in printed  # what was recorded
    summary = [line for line in shown if " op calls, " in line]
    assert summary and summary[0].split(":")[0] in [line.split(":")[0] for line in printed]  # counts, not verdicts
    if proc.returncode == 1:  # a race showed, so the findings table opens the output as in the README
        assert shown[2] == proc.stdout.splitlines()[0]  # the table's columns
    # on a loaded machine no race may show: exit 0 and no table (the summary line alone), which is not a failure
