"""Hostile or broken input files (``diff``, ``catalog --from``, ``--against``, ``report.load``).

Each file is real: a few hundred bytes of nested YAML aliases, a device node and a
FIFO made in a temp folder, a sparse file of hundreds of MB, hand-edited fields,
and processes started with their stderr or stdout closed.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
from conftest import ROOT

import opaudit
from opaudit.cli import main
from opaudit.cli.formats import Format, Kind, render
from opaudit.data.fileio import MAX_INPUT_BYTES
from opaudit.data.report import ReportError, load


@pytest.fixture(scope="module")
def report_text():
    import torch

    report = opaudit.audit(lambda: (torch.arange(6.0) * 2).sum(), reps=1)
    return render(report, Kind.REPORT, Format.YAML)


def _readers(path):
    """Every way a user hands opaudit an input file."""
    return [["diff", path, path], ["catalog", "--from", path], ["diff", path, path, "--format", "md"]]


def _refused(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "internal error" not in err, err
    for n in needles:
        assert n in err, err
    return err


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def test_yaml_aliases_are_refused_at_load_time(tmp_path, capsys, report_text):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 600
    for argv in _readers(str(bomb)):
        _refused(capsys, argv, "alias")
    # Inside an otherwise valid report, where the renderers would expand it.
    hidden = tmp_path / "report.yaml"
    hidden.write_text(report_text.replace("settings:\n", "settings:\n  notes: &n [1, 2]\n  more: *n\n"))
    with pytest.raises(ReportError, match=r"alias \(\*n\)"):
        load(str(hidden))


def test_a_device_a_fifo_and_a_huge_file_are_refused_without_reading_them(tmp_path, capsys):
    zero = tmp_path / "zero"
    os.mknod(zero, stat.S_IFCHR | 0o666, os.makedev(1, 5))
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # no writer: opening it for reading would block forever
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(MAX_INPUT_BYTES * 4)  # sparse: hundreds of MB that take no disk
    for path in (zero, fifo):
        for argv in _readers(str(path)):
            _refused(capsys, argv, str(path), "not a regular file")
    for argv in _readers(str(huge)):
        _refused(capsys, argv, "too large", "256 MiB")


@pytest.mark.parametrize("edit, needle", [
    (("  reps: 1\n", "  reps: 1\n  x: " + "[" * 1000 + "]" * 1000 + "\n"), "nested too deeply"),
    (("  reps: 1\n", "  reps: 1\n  x: " + "[" * 40 + "]" * 40 + "\n"), "nested more than"),
    (("  reps: 1\n", "  reps: " + "9" * 5000 + "\n"), "a number too long"),
    (("  reps: 1\n", "  reps: 1.0e+400\n"), "settings.reps has the wrong type (float)"),
    (("  seed: 0\n", "  seed: 0\n  op_timeout_s: 1.0e+400\n"), "settings.op_timeout_s: inf is not a finite"),
    (("version: 2\n", "version: true\n"), "version True is not supported"),
    (("version: 2\n", "version: 2.0\n"), "version 2.0 is not supported"),
    (("  reps: 1\n", "  reps: many\n"), "settings.reps has the wrong type (str)"),
    (("  threads: 2\n", "  threads: [1, 2]\n"), "environment.threads has the wrong type (list)"),
])
def test_hostile_fields_are_one_line_bad_input_errors(tmp_path, capsys, report_text, edit, needle):
    assert edit[0] in report_text
    path = tmp_path / "report.yaml"
    path.write_text(report_text.replace(*edit, 1))
    _refused(capsys, ["diff", str(path), str(path)], needle)
    _refused(capsys, ["diff", str(path), str(path), "--format", "md"], needle)


def test_a_catalog_with_hostile_settings_is_refused(tmp_path, capsys):
    text = open(os.path.join(ROOT, "catalogs", "cpu-x86_64-torch2.13.0.yaml")).read()
    for edit, needle in ((("  stress_elements: 1000000\n", "  stress_elements: 1.0e+400\n"), "wrong type (float)"),
                         (("  op_timeout_s: 60.0\n", "  op_timeout_s: .inf\n"), "not a finite number")):
        path = tmp_path / "catalog.yaml"
        path.write_text(text.replace(*edit, 1))
        _refused(capsys, ["catalog", "--from", str(path), "--format", "md"], needle)


def test_json_is_read_back_whatever_its_name(tmp_path, capsys, report_text):
    script = tmp_path / "train.py"
    script.write_text("import torch\ntorch.ones(3).sum()\n")
    upper = tmp_path / "r.JSON"
    assert main([str(script), "--reps", "1", "-o", str(upper), "-q"]) == 0
    json.loads(upper.read_text())  # opaudit wrote JSON there...
    assert load(str(upper)).all_findings  # ...and reads it back
    bare = tmp_path / "report"
    bare.write_text(json.dumps(json.loads(upper.read_text()), indent=2) + "\n")
    assert load(str(bare)).all_findings == load(str(upper)).all_findings
    assert main(["diff", str(upper), str(bare), "-q"]) == 0, capsys.readouterr().err


def _opaudit(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "opaudit", *args], env=env, timeout=120, **kw)


def test_closed_stderr_still_gives_exit_2_for_bad_input(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    done = _opaudit(["diff", missing, missing], stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    assert done.returncode == 2


def test_closed_stdout_is_an_error_when_the_report_goes_there(tmp_path, report_text):
    path = tmp_path / "r.yaml"
    path.write_text(report_text)
    done = _opaudit(["diff", str(path), str(path), "--format", "json"], stderr=subprocess.PIPE, text=True,
                    preexec_fn=lambda: os.close(1))
    assert done.returncode == 2
    assert done.stderr == "opaudit: error: stdout is closed\n"


@pytest.mark.parametrize("value", ["inf", "nan", "1e300", "-1"])
def test_op_timeout_must_be_finite_and_is_checked_before_the_script_runs(tmp_path, capsys, value):
    marker = tmp_path / "ran"
    script = tmp_path / "train.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    start = time.monotonic()
    _refused(capsys, [str(script), "--op-timeout", value], "--op-timeout")
    assert not marker.exists() and time.monotonic() - start < 30
