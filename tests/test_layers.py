"""The package's layers only import downward, with no cycle: import-linter holds the picture.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``); import-linter
counts imports made inside functions and under ``TYPE_CHECKING`` too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _lint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)


def test_import_linter_contracts_hold():
    r = _lint("--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        contracts = f.read().count("[[tool.importlinter.contracts]]")
    assert f"Contracts: {contracts} kept, 0 broken." in r.stdout


@pytest.mark.parametrize("module", ["opaudit", "opaudit.data.report", "opaudit.data.files", "opaudit.data.catalog",
                                    "opaudit.data.diff", "opaudit.data.prediction", "opaudit.cli.formats"])
def test_lower_and_presentation_modules_do_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=240)
    assert out.stdout.strip() == "False"


def test_every_subpackage_is_in_the_distribution():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the test extra installs tomli where the standard library has no tomllib
        import tomli as tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "opaudit"))
             if "__init__.py" in files}
    assert found - listed == set()  # a package missing here is left out of a non-editable install
