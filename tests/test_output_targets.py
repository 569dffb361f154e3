"""Where ``-o`` points: devices, FIFOs, the process's own stdout, symlinks, modes, a full disk.

Every target is real: device nodes made with ``os.mknod`` in a temp folder (the
tests run as root), a FIFO with a reader on the other end, a subprocess whose
stdout is a file, ``RLIMIT_FSIZE`` for a write that fails half-way.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import ROOT

import opaudit
from opaudit.cli import main
from opaudit.cli.formats import Format, Kind, render
from opaudit.data.fileio import FileError, write_output

NULL, FULL = os.makedev(1, 3), os.makedev(1, 7)


def _node(tmp_path, name, dev):
    path = tmp_path / name
    os.mknod(path, stat.S_IFCHR | 0o666, dev)
    return path


def _is_same_node(path, dev):
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == dev


@pytest.fixture(scope="module")
def report_yaml(tmp_path_factory):
    report = opaudit.audit(lambda: (opaudit_x() * 2).sum(), reps=1)
    path = tmp_path_factory.mktemp("r") / "report.yaml"
    path.write_text(render(report, Kind.REPORT, Format.YAML))
    return str(path)


def opaudit_x():
    import torch

    return torch.arange(6.0)


def test_a_character_device_is_written_through_not_replaced(tmp_path, capsys):
    null = _node(tmp_path, "null", NULL)
    write_output(str(null), "a report\n")
    assert _is_same_node(null, NULL)
    script = tmp_path / "train.py"
    script.write_text("import torch\ntorch.ones(3).sum()\n")
    assert main([str(script), "--reps", "1", "-o", str(null), "--format", "yaml", "-q"]) == 0
    assert _is_same_node(null, NULL), "the device node was replaced by a regular file"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".opaudit-")] == []


def test_a_symlink_to_a_device_is_written_through(tmp_path, report_yaml):
    null = _node(tmp_path, "null", NULL)
    link = tmp_path / "out.yaml"
    link.symlink_to(null)
    assert main(["diff", report_yaml, report_yaml, "-o", str(link), "-q"]) == 0
    assert link.is_symlink() and _is_same_node(null, NULL)


def test_a_fifo_gets_the_report_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    reader.start()
    write_output(str(fifo), "format: x\n...\n")
    reader.join(30)
    assert got == ["format: x\n...\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


_WRITE_TO = "import sys; from opaudit.data.fileio import write_output; write_output(sys.argv[1], 'the report\\n')"


@pytest.mark.parametrize("how", ["/dev/stdout", "/proc/self/fd/1", "link"])
def test_dev_stdout_writes_to_the_shells_redirection_target(tmp_path, how):
    out = tmp_path / "redirected.txt"
    out.write_text("")
    inode = os.stat(out).st_ino
    target = how
    if how == "link":
        (tmp_path / "stdout-link").symlink_to("/proc/self/fd/1")
        target = str(tmp_path / "stdout-link")
    env = dict(os.environ, PYTHONPATH=ROOT)
    with open(out, "w") as f:
        subprocess.run([sys.executable, "-c", _WRITE_TO, target], stdout=f, env=env, check=True, timeout=240)
    assert out.read_text() == "the report\n"
    assert os.stat(out).st_ino == inode, "the redirected file was replaced instead of written"
    piped = subprocess.run([sys.executable, "-c", _WRITE_TO, target], capture_output=True, text=True, env=env,
                           timeout=240)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == "the report\n"


def test_a_symlink_to_a_regular_file_keeps_the_link_and_replaces_the_target(tmp_path):
    real = tmp_path / "reports" / "latest.yaml"
    real.parent.mkdir()
    real.write_text("old\n")
    os.chmod(real, 0o640)
    link = tmp_path / "report.yaml"
    link.symlink_to(real)
    write_output(str(link), "new\n")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new\n"
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o640


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_file_gets_the_mode_of_an_ordinary_write(tmp_path, mask, mode):
    before = os.umask(mask)
    try:
        write_output(str(tmp_path / "r.yaml"), "x\n")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x\n")
    finally:
        os.umask(before)
    assert stat.S_IMODE(os.stat(tmp_path / "r.yaml").st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode) == mode


def test_an_overwritten_file_keeps_its_mode_and_owner(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("old\n")
    os.chmod(path, 0o604)
    os.chown(path, 1234, 5678)
    write_output(str(path), "new\n")
    st = os.stat(path)
    assert path.read_text() == "new\n"
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o604, 1234, 5678)


def test_a_full_disk_names_the_file(tmp_path, report_yaml, capsys):
    full = _node(tmp_path, "full", FULL)
    with pytest.raises(FileError, match=f"cannot write {full}: No space left on device"):
        write_output(str(full), "x" * 10000)
    capsys.readouterr()
    assert main(["diff", report_yaml, report_yaml, "-o", str(full), "--format", "yaml", "-q"]) == 2
    err = capsys.readouterr().err
    assert err == f"opaudit: error: cannot write {full}: No space left on device\n"


_HALF_WAY = """
    import resource, signal, sys
    from opaudit.data.fileio import write_output
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        write_output(sys.argv[1], "y" * 100000)
    except Exception as e:
        print(type(e).__name__, e)
"""


def test_a_write_failing_half_way_names_the_file_and_leaves_the_old_one(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("previous report\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_HALF_WAY), str(path)], capture_output=True,
                          text=True, env=env, timeout=240)
    assert done.stdout == f"FileError cannot write {path}: File too large\n", done.stderr
    assert path.read_text() == "previous report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_the_scripts_umask_does_not_change_the_reports_mode(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import os, torch\nos.umask(0o777)\ntorch.ones(3).sum()\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "opaudit", str(script), "--reps", "1", "-q", "-o", "r.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.umask(0o027))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "r.yaml").st_mode) == 0o640


def _one_line_refusal(code, err, *needles):
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("opaudit: error: "), err
    for n in needles:
        assert n in err, err


def test_an_output_that_is_one_of_the_inputs_is_refused_before_anything_runs(tmp_path, report_yaml, capsys,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    catalog = tmp_path / "cat.yaml"
    catalog.write_text(open(os.path.join(ROOT, "catalogs", "cpu-x86_64-torch2.13.0.yaml")).read())
    report = tmp_path / "r.yaml"
    report.write_text(open(report_yaml).read())
    (tmp_path / "link.yaml").symlink_to(report)
    os.link(catalog, tmp_path / "hard.yaml")
    script = tmp_path / "train.py"
    script.write_text("open('ran', 'w').close()\nimport torch\ntorch.ones(3).sum()\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(catalog.read_text())
    (tmp_path / "sweep.yaml.partial").symlink_to(sweep)  # the partial file a resumed sweep reads is -o itself
    before = {p.name: p.read_bytes() for p in (catalog, report, script, sweep)}

    def refused(argv, *needles):
        code = main(argv)
        _one_line_refusal(code, capsys.readouterr().err, *needles)

    refused(["diff", "r.yaml", "r.yaml", "-o", "r.yaml"], "-o r.yaml is the same file as input A")
    refused(["diff", "r.yaml", "r.yaml", "-o", "link.yaml", "--format", "md"], "input A (r.yaml)")
    refused(["catalog", "--from", "cat.yaml", "-o", "hard.yaml", "--format", "md"],
            "-o hard.yaml is the same file as the --from catalog (cat.yaml)")
    refused(["train.py", "--against", "cat.yaml", "-o", "cat.yaml"],
            "-o cat.yaml is the same file as the --against catalog (cat.yaml)")
    refused(["train.py", "-o", "train.py", "--format", "yaml"], "the script (train.py)")
    refused(["capture", "train.py", "-o", "train.py"], "-o train.py is the same file as the script (train.py)")
    refused(["trace", "train.py", "-o", "./train.py"], "-o ./train.py is the same file as the script (train.py)")
    refused(["compare", "r.yaml", "link.yaml", "-o", "r.yaml", "--format", "yaml"],
            "-o r.yaml is the same file as trace A (r.yaml)")
    refused(["replay", "r.yaml", "-o", "link.yaml", "--format", "yaml"], "the same file as the capsule (r.yaml)")
    refused(["catalog", "--ops", "abs", "-o", "sweep.yaml", "--resume"],
            "-o sweep.yaml is the same file as the --resume partial file")
    with open(report, "a") as appended:  # opaudit diff r.yaml r.yaml >> r.yaml
        done = subprocess.run([sys.executable, "-m", "opaudit", "diff", "r.yaml", "r.yaml"], cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=ROOT), text=True, stderr=subprocess.PIPE,
                              stdout=appended, timeout=120)
    _one_line_refusal(done.returncode, done.stderr, "stdout is the same file as input A")
    assert {p.name: p.read_bytes() for p in (catalog, report, script, sweep)} == before
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_a_report_cut_short_on_stdout_is_exit_2_not_a_truncated_success(tmp_path, unbuffered):
    catalog = os.path.join(ROOT, "catalogs", "cpu-x86_64-torch2.13.0.yaml")
    out = tmp_path / "catalog.json"
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED=unbuffered)
    # ulimit -f 4: the shell's redirection target takes 4 KiB, the JSON catalog is ~600 KiB.
    done = subprocess.run(["bash", "-c", 'ulimit -f 4 && exec "$@" > "$0"', str(out), sys.executable, "-m", "opaudit",
                           "catalog", "--from", catalog, "--format", "json", "-q"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "opaudit: error: cannot write stdout: File too large\n"
    assert out.stat().st_size == 4096


def test_stdout_on_a_full_disk_is_exit_2_with_the_reason(report_yaml):
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "opaudit", "diff", report_yaml, report_yaml, "--format", "yaml"],
                              env=dict(os.environ, PYTHONPATH=ROOT), stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    assert done.returncode == 2
    assert done.stderr == "opaudit: error: cannot write stdout: No space left on device\n"


@pytest.mark.parametrize("fd, stream", [(2, "stderr"), (1, "stdout")])
def test_dev_stderr_or_stdout_when_the_shell_closed_it_is_exit_2(report_yaml, fd, stream):
    # 2>&- : the closed descriptor must not be handed to the next file opened (opaudit opened its stand-in for
    # stderr there, and -o /dev/stderr wrote the report into that: exit 0, the report nowhere).
    done = subprocess.run([sys.executable, "-m", "opaudit", "diff", report_yaml, report_yaml, "-o", f"/dev/{stream}",
                           "--format", "yaml", "-q"], env=dict(os.environ, PYTHONPATH=ROOT), timeout=120,
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL if fd == 2 else None,
                          stderr=subprocess.DEVNULL if fd == 1 else None, preexec_fn=lambda: os.close(fd))
    assert done.returncode == 2
