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
    # Far past the C stack of a recursive composer (libyaml's, as PyYAML ships it, segfaults).
    (("  reps: 1\n", "  reps: 1\n  x: " + "[" * 300000 + "]" * 300000 + "\n"), "nested more than 32"),
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
    return subprocess.run([sys.executable, "-m", "opaudit", *args], env=env, timeout=240, **kw)


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
    _refused(capsys, [str(script), "--op-timeout", value], "--op-timeout")
    assert not marker.exists()  # refused before the script ran


CATALOG = os.path.join(ROOT, "catalogs", "cpu-x86_64-torch2.13.0.yaml")


def test_a_key_given_twice_is_refused_in_yaml_and_json(tmp_path, capsys, report_text):
    text = open(CATALOG).read()
    # The later value would win: diff would then report this entry stable->raises.
    twice = tmp_path / "catalog.yaml"
    twice.write_text(text.replace("  verdict: stable\n", "  verdict: stable\n  verdict: raises\n", 1))
    line = text[:text.index("  verdict: stable\n")].count("\n") + 2
    _refused(capsys, ["diff", CATALOG, str(twice)], f"duplicate key 'verdict' at line {line}")
    _refused(capsys, ["catalog", "--from", str(twice), "--format", "md"], "duplicate key 'verdict'")
    doc = json.loads(render(opaudit.data.report.from_dict(
        __import__("yaml").safe_load(report_text), "r"), Kind.REPORT, Format.JSON))
    as_json = json.dumps(doc, indent=1)
    dup = tmp_path / "report.json"
    dup.write_text(as_json.replace('"complete": true', '"complete": true, "complete": false', 1) + "\n")
    assert as_json.count('"complete": true') >= 1
    _refused(capsys, ["diff", str(dup), str(dup)], "duplicate key 'complete' in a JSON object")


def test_a_directory_given_as_an_input_says_so(tmp_path, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()
    script = tmp_path / "train.py"
    marker = tmp_path / "ran"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "cat.yaml.partial").mkdir()
    for argv in (["diff", str(folder), CATALOG], ["diff", CATALOG, str(folder)], ["catalog", "--from", str(folder)],
                 [str(script), "--against", str(folder)]):
        _refused(capsys, argv, f"{folder}: is a directory, not a file")
    _refused(capsys, ["catalog", "--ops", "abs", "-o", str(tmp_path / "cat.yaml"), "--resume"],
             "cat.yaml.partial: is a directory, not a file")
    assert not marker.exists()


def test_a_second_yaml_document_is_named_as_such(tmp_path, capsys):
    text = open(CATALOG).read()
    two = tmp_path / "two.yaml"
    two.write_text(text + "---\n" + text)
    err = _refused(capsys, ["diff", str(two), CATALOG], "a second YAML document at line", "one document")
    assert "alias" not in err


def _loaders():
    from opaudit.data import files

    libyaml = getattr(files, "_LibyamlLoader", None)
    return [pytest.param(getattr(files, "_PythonLoader", None), id="python"),
            pytest.param(libyaml, id="libyaml", marks=pytest.mark.skipif(libyaml is None, reason="no libyaml"))]


def test_libyaml_reads_the_files_where_pyyaml_has_it():
    import yaml

    from opaudit.data import files

    if yaml.__with_libyaml__:
        assert files._Loader is files._LibyamlLoader and issubclass(files._Loader, yaml.CSafeLoader)


@pytest.mark.parametrize("loader", _loaders())
def test_both_yaml_parsers_read_the_same_and_refuse_the_same(loader):
    import yaml

    from opaudit.data.files import safe_load

    text = open(CATALOG).read()
    assert safe_load(text, loader) == yaml.safe_load(text)
    for bad, needle in ((ALIAS_BOMB, r"found an alias \(\*a\) at line 2"),
                        ("a: 1\nb: 2\na: 3\n", "duplicate key 'a' at line 3"),
                        ("a: 1\n...\n---\nb: 2\n", "a second YAML document at line 3"),
                        ("x: " + "[" * 100000 + "]" * 100000 + "\n", "nested more than 32 levels"),
                        ("x: !!python/object/apply:os.system [echo hi]\n", "could not determine a constructor"),
                        ("x: !!set {a, b}\n", "could not determine a constructor for the tag 'tag:yaml.org,2002:set'"),
                        ("? [a, b]\n: 1\n", "a list or mapping as a mapping key at line 1")):
        with pytest.raises(yaml.YAMLError, match=needle):
            safe_load(bad, loader)
    assert safe_load("", loader) is None
    deepest = "x: " + "[" * 32 + "]" * 32 + "\n"
    assert safe_load(deepest, loader) == yaml.safe_load(deepest)


def _limited(args, tmp_path, **kw):
    """opaudit in a subprocess that cannot take the machine down: 4 GiB of heap, 120 s."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (4 * 2**30, 4 * 2**30))

    return _opaudit(args, capture_output=True, text=True, preexec_fn=limit, cwd=tmp_path, **kw)


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo"])
def test_a_script_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path, kind):
    script = tmp_path / "train.py"
    if kind == "fifo":
        os.mkfifo(script)  # no writer: a blocking open waits for ever
    else:
        script.symlink_to("/dev/zero")  # read to the end, it never ends
    done = _limited(["train.py", "--reps", "1"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "opaudit: error: train.py: not a regular file (a device, FIFO or socket); opaudit reads " \
                          "files only\n"


def test_a_script_larger_than_any_script_is_refused(tmp_path, capsys):
    from opaudit.data.fileio import MAX_SCRIPT_BYTES

    script = tmp_path / "train.py"
    with open(script, "wb") as f:
        f.truncate(MAX_SCRIPT_BYTES + 1)  # sparse
    _refused(capsys, [str(script)], "too large", "opaudit reads scripts up to 16 MiB")


@pytest.mark.parametrize("argv, message", [
    (["--seed", "99999999999999999999999"], "argument --seed: must be at most 18,446,744,073,709,551,615, got "
                                            "99999999999999999999999"),
    (["--seed", "-9223372036854775809"], "argument --seed: must be at least -9,223,372,036,854,775,808"),
    (["--reps", "10001"], "argument --reps: must be at most 10,000, got 10001"),
    (["--reps", "9" * 5000], "argument --reps: must be at most 10,000, got a 5000-digit number"),
    (["--capture-budget", "99999999999"], "argument --capture-budget: must be at most 16,777,216"),
    (["--captures-per-signature", "1001"], "argument --captures-per-signature: must be at most 1,000"),
    (["--run-check", "1001"], "argument --run-check: must be at most 1,000"),
    (["--steps", "99999999999"], "argument --steps: must be at most 1,000,000,000"),
    (["--start-step", "99999999999"], "argument --start-step: must be at most 1,000,000,000"),
    (["--against", ""], "argument --against: expected a file name, got ''"),
    (["-o", ""], "argument -o/--output: expected a file name, got ''"),
    (["catalog", "--stress-elements", "9999999999999"], "argument --stress-elements: must be at most 2,147,483,647"),
    (["catalog", "--threads", "100000"], "argument --threads: must be at most 1,024"),
    (["catalog", "--reps", "100000"], "argument --reps: must be at most 10,000"),
    (["catalog", "--max-samples", "99999999999"], "argument --max-samples: must be at most 1,000,000,000"),
    (["catalog", "--from", ""], "argument --from: expected a file name, got ''"),
    (["diff", "", "b.yaml"], "argument A: expected a file name, got ''"),
    # -o of every other command: one helper adds it (cli/options.py: add_output_options)
    *[([*cmd, "-o", ""], "argument -o/--output: expected a file name, got ''") for cmd in (
        ["catalog"], ["diff", "a.yaml", "b.yaml"], ["capture", "train.py"], ["replay", "step.opcap"],
        ["trace", "train.py"], ["compare", "a.optrace", "b.optrace"])],
])
def test_numeric_options_are_bounded_and_empty_paths_refused(tmp_path, capsys, argv, message):
    marker = tmp_path / "ran"
    script = tmp_path / "train.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")
    full = argv if argv[0] in ("catalog", "diff", "capture", "replay", "trace", "compare") else [str(script), *argv]
    assert _refused(capsys, full, message).startswith(f"opaudit: error: {message}")
    assert not marker.exists()


def test_threads_past_what_torch_can_start_is_a_usage_error(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import torch\nx = torch.randn(256, 256)\n(x @ x).sum()\n")
    done = _limited(["train.py", "--threads", "100000", "--reps", "1"], tmp_path)  # torch segfaults (exit 139)
    assert (done.returncode, done.stderr) == (2, "opaudit: error: argument --threads: must be at most 1,024, got "
                                                 "100000\n")


def test_nproc_per_node_is_bounded_before_anything_is_launched():
    from opaudit.cli.main import _audit_parser
    from opaudit.cli.options import UsageError

    with pytest.raises(UsageError, match="argument --nproc-per-node: must be at most 1,024, got 100000"):
        _audit_parser().parse_args(["train.py", "--nproc-per-node", "100000"])
