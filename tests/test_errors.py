"""One error base: every error class opaudit defines derives from OpauditError, and the CLI catches the base."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import opaudit
from opaudit.data.errors import OpauditError


def _modules() -> list:
    names = [m.name for m in pkgutil.walk_packages(opaudit.__path__, "opaudit.")
             if not m.name.startswith("opaudit.examples") and not m.name.endswith("__main__")]
    return [importlib.import_module(n) for n in names]


def test_every_error_class_derives_from_the_one_base() -> None:
    found = {}
    for mod in _modules():
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and obj.__module__ == mod.__name__ and issubclass(obj, Exception) \
                    and name.endswith("Error"):
                found[f"{mod.__name__}.{name}"] = obj
    assert len(found) >= 15, sorted(found)  # the walk really reached the layers
    strays = sorted(n for n, cls in found.items() if not issubclass(cls, OpauditError))
    assert strays == [], f"errors outside the one base: {strays}"


def test_a_layer_error_becomes_its_message_and_exit_code(tmp_path, capsys) -> None:
    from opaudit.cli.main import main

    bad = tmp_path / "catalog.yaml"
    bad.write_text("format: nothing-we-know\n")
    code = main(["diff", str(bad), str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("opaudit: error: "), err
    assert "internal error" not in err


def test_user_code_error_prints_the_users_traceback_first(tmp_path, capsys) -> None:
    from opaudit.cli.main import main

    script = tmp_path / "boom.py"
    script.write_text("import torch\n\ndef helper():\n    raise RuntimeError('boom from the user')\n\nhelper()\n")
    code = main([str(script), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "boom.py" in err and "line 4" in err, err
    assert err.strip().splitlines()[-1].startswith("opaudit: error:"), err


@pytest.mark.parametrize("cls", [OpauditError])
def test_exit_code_is_carried_by_the_error(cls) -> None:
    assert cls("x").exit_code == 2 and cls("x").detail == ""
