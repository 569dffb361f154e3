"""Capsules: ``opaudit capture`` on one setting, ``opaudit replay`` on another, and hostile capsule files.

The cross-machine tests are real processes on this CPU's two stand-ins for two
machines: ATen's AVX2 kernels and its scalar (``default``) ones, picked with
``ATEN_CPU_CAPABILITY``; and 2 threads against 1. Nothing here mocks torch.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import jsonschema
import pytest
import torch
import yaml
from conftest import ROOT

from opaudit.aten.portable import content_digest, tensor_from_bytes
from opaudit.cli.main import main
from opaudit.data import across as across_doc

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "scripts")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


needs_avx2 = pytest.mark.skipif("avx2" not in _cpu_flags(),
                                reason="this CPU lacks AVX2: ATEN_CPU_CAPABILITY=avx2 cannot select AVX2 kernels, "
                                       "so avx2 and default are not two settings here")


def _cli(args, capability=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    return subprocess.run([sys.executable, "-m", "opaudit", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _by_op(doc):
    """op -> set of across values (an op can have several signatures)."""
    out: dict[str, set[str]] = {}
    for row in doc["ops"]:
        out.setdefault(row["op"], set()).add(row["across"])
    return out


# -- two settings of one CPU, in real processes -------------------------------------------------
@pytest.fixture(scope="module")
def transformer_capsule(tmp_path_factory):
    """The tiny transformer's training step captured under AVX2 kernels."""
    if "avx2" not in _cpu_flags():
        pytest.skip("this CPU lacks AVX2: ATEN_CPU_CAPABILITY=avx2 cannot select AVX2 kernels")
    path = str(tmp_path_factory.mktemp("capsule") / "step.opcap")
    r = _cli(["capture", os.path.join(FIXTURES, "tiny_transformer.py"), "-o", path], capability="avx2")
    assert r.returncode == 0, r.stderr
    assert f"capsule written to {path}: " in r.stderr
    assert "left out by the byte budget: nothing" in r.stderr
    return path


@needs_avx2
def test_replay_under_the_default_kernels_names_softmax_and_layer_norm(transformer_capsule, tmp_path):
    out = tmp_path / "replay.json"
    r = _cli(["replay", transformer_capsule, "--reps", "1", "-o", str(out), "-q"], capability="default")
    assert r.returncode == 1, r.stderr  # differs is in the default --fail-on
    doc = json.loads(out.read_text())
    assert {"field": "cpu_capability", "source": "AVX2", "here": "DEFAULT"} in doc["environment_difference"]
    ops = _by_op(doc)
    for op in ("aten._softmax.default", "aten._softmax_backward_data.default", "aten.native_layer_norm.default",
               "aten.native_layer_norm_backward.default"):
        assert ops[op] == {"differs"}, (op, ops[op])
    for op in ("aten.add.Tensor", "aten.mul.Tensor", "aten.relu.default", "aten.cat.default",
               "aten.embedding.default"):
        assert ops[op] == {"same"}, (op, ops[op])
    # The seeded noise draws other numbers with the other kernels: a random op whose bits move.
    noise = next(row for row in doc["ops"] if row["op"] == "aten.randn_like.default")
    assert (noise["across"], noise["verdict"]) == ("differs", "random")
    softmax = next(row for row in doc["ops"] if row["op"] == "aten._softmax.default")
    assert softmax["verdict"] == "stable"  # deterministic here: the bits moved between machines, not runs
    assert softmax["max_ulp_across"] >= 1 and 0 < softmax["frac_differing_across"] <= 1
    assert softmax["modes_across"] == ["default", "deterministic"]
    assert doc["summary"]["across"]["differs"] == sum(1 for row in doc["ops"] if row["across"] == "differs")


@needs_avx2
def test_replay_under_the_same_kernels_is_all_same(transformer_capsule):
    r = _cli(["replay", transformer_capsule, "--reps", "1", "--format", "json", "-q"], capability="avx2")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["environment_difference"] == []
    assert {row["across"] for row in doc["ops"]} == {"same"}
    assert doc["summary"]["across"]["same"] == doc["summary"]["signatures"] > 100


def test_thread_count_changes_a_full_sum_and_not_an_elementwise_op(tmp_path, capsys):
    path = str(tmp_path / "sum.opcap")
    script = os.path.join(FIXTURES, "thread_sum.py")
    assert _run(["capture", script, "-o", path, "--threads", "2", "-q"], capsys)[0] == 0
    code, out, _ = _run(["replay", path, "--threads", "1", "--reps", "1", "--format", "json", "-q"], capsys)
    doc = json.loads(out)
    assert code == 1
    assert {"field": "threads", "source": 2, "here": 1} in doc["environment_difference"]
    assert _by_op(doc) == {"aten.sum.default": {"differs"}, "aten.mul.Tensor": {"same"}}
    # SARIF, as the audit writes it: the sum's move at its line, an error; nothing for the elementwise op.
    sarif = tmp_path / "sum.sarif"
    assert _run(["replay", path, "--threads", "1", "--reps", "1", "-q", "-o", str(sarif)], capsys)[0] == 1
    log = json.loads(sarif.read_text())
    schema = json.load(open(os.path.join(ROOT, "tests", "fixtures", "sarif-schema-2.1.0.json")))
    jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER).validate(log)
    (result,) = log["runs"][0]["results"]
    assert (result["ruleId"], result["level"]) == ("across/differs/aten.sum.default", "error")
    assert result["locations"][0]["physicalLocation"]["region"]["startLine"] == 10
    assert result["properties"]["max_ulp_across"] >= 1 and "max ULP" in result["message"]["text"]
    code, out, _ = _run(["replay", path, "--threads", "2", "--reps", "1", "--format", "json", "-q"], capsys)
    assert code == 0 and _by_op(json.loads(out)) == {"aten.sum.default": {"same"}, "aten.mul.Tensor": {"same"}}


def test_digests_only_says_whether_not_how_far(tmp_path, capsys):
    path = str(tmp_path / "sum.opcap")
    script = os.path.join(FIXTURES, "thread_sum.py")
    assert _run(["capture", script, "-o", path, "--threads", "2", "--digests-only", "-q"], capsys)[0] == 0
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("manifest.json"))
        outputs = [o for e in manifest["signatures"] for c in e["captures"] for m in c["outputs"].values()
                   for o in m["outputs"]]
        assert outputs and all("blob" not in o and len(o["digest"]) == 32 for o in outputs)
    code, out, _ = _run(["replay", path, "--threads", "1", "--reps", "1", "--format", "json", "-q"], capsys)
    doc = json.loads(out)
    row = next(r for r in doc["ops"] if r["op"] == "aten.sum.default")
    assert row["across"] == "differs" and "max_abs_diff_across" not in row and "digests only" in row["reason_across"]


# -- a small capsule made in this process -------------------------------------------------------
SMALL = """
    import torch

    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(0))
    w = torch.randn(33, 8, generator=torch.Generator().manual_seed(1))


    def opaudit_step():
        y = torch.softmax(x @ w, dim=-1)
        return torch.cat([y, y.relu()]).sum()
"""


@pytest.fixture(scope="module")
def small_capsule(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    script = d / "small.py"
    script.write_text(textwrap.dedent(SMALL))
    path = str(d / "small.opcap")
    assert main(["capture", str(script), "-o", path, "-q"]) == 0
    return path


def test_self_check_and_every_format(small_capsule, tmp_path, capsys, monkeypatch):
    code, out, err = _run(["replay", small_capsule, "--reps", "2"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Capsule small.opcap: captured on ")  # no absolute path
    assert lines[1] == "Environment difference: none (same fingerprint: expect every op to be 'same')"
    assert lines[-1].startswith("Across: ") and "same" in lines[-1]
    written = {}
    for ext in ("yaml", "json", "csv", "md", "html"):
        out_path = tmp_path / f"replay.{ext}"
        code, _, err = _run(["replay", small_capsule, "--reps", "1", "--no-timing", "-o", str(out_path)], capsys)
        assert code == 0 and f"replay written to {out_path}" in err
        written[ext] = out_path.read_text()
    doc = across_doc.from_dict(yaml.safe_load(written["yaml"]))
    assert doc.rows and all(r.across is across_doc.Across.SAME for r in doc.rows)
    assert json.loads(written["json"])["summary"] == doc.summary
    assert written["csv"].splitlines()[0].startswith("across,verdict,op,")
    assert written["md"].startswith("# opaudit replay")
    assert written["html"].startswith("<!DOCTYPE html>") and "opaudit replay: small.opcap" in written["html"]
    # Byte-stable: the same capsule replayed again writes the same file.
    again = tmp_path / "again.yaml"
    assert _run(["replay", small_capsule, "--reps", "1", "--no-timing", "-o", str(again)], capsys)[0] == 0
    assert again.read_text() == written["yaml"]
    # Named from its own folder rather than by its absolute path, it writes the same bytes too.
    assert not any(small_capsule in text for text in written.values())
    monkeypatch.chdir(os.path.dirname(small_capsule))
    assert _run(["replay", "small.opcap", "--reps", "1", "--no-timing", "-o", str(again)], capsys)[0] == 0
    assert again.read_text() == written["yaml"]


def test_capture_budget_left_out_is_listed_in_the_file_and_the_output(tmp_path, capsys):
    script = tmp_path / "big.py"
    script.write_text(textwrap.dedent("""
        import torch

        big = torch.randn(400_000, generator=torch.Generator().manual_seed(0))
        small = torch.randn(16, generator=torch.Generator().manual_seed(1))


        def opaudit_step():
            return big.exp(), small.tanh()
    """))
    path = str(tmp_path / "big.opcap")
    code, _, err = _run(["capture", str(script), "-o", path, "--capture-budget", "1"], capsys)
    assert code == 0
    assert "left out by the byte budget (--capture-budget 1 MiB): 1" in err
    assert "aten.exp.default" in err and "inputs: not replayable" in err
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("manifest.json"))
    assert [(x["op"], x["what"]) for x in manifest["left_out"]] == [("aten.exp.default", "inputs")]
    code, out, _ = _run(["replay", path, "--reps", "1"], capsys)
    assert "Left out of the capsule by its byte budget:" in out
    assert "aten.exp.default" in out.split("Left out of the capsule by its byte budget:")[1]
    code, out, _ = _run(["replay", path, "--reps", "1", "--format", "json", "-q"], capsys)
    doc = json.loads(out)
    rows = {r["op"]: r for r in doc["ops"]}
    assert (rows["aten.exp.default"]["across"], rows["aten.exp.default"]["reason_across"]) == \
        ("skipped", "capture budget")
    assert rows["aten.tanh.default"]["across"] == "same"
    assert [(x["op"], x["what"]) for x in doc["left_out"]] == [("aten.exp.default", "inputs")]


# -- ops that do not run here ------------------------------------------------------------------
_REPLAY = {"armed": False}


@torch.library.custom_op("opaudit_capsule::crashes_when_armed", mutates_args=())
def crashes_when_armed(x: torch.Tensor) -> torch.Tensor:
    if _REPLAY["armed"]:
        faulthandler.disable()
        ctypes.string_at(0)  # a real invalid read: the worker dies with SIGSEGV, as an illegal instruction would
    return x * 2


def test_an_op_that_kills_the_replay_is_unsupported_under_isolate(tmp_path, capsys):
    script = tmp_path / "custom.py"
    script.write_text(textwrap.dedent("""
        import torch

        x = torch.arange(6.0)


        def opaudit_step():
            return torch.ops.opaudit_capsule.crashes_when_armed(x).exp() + torch.randn_like(x)
    """))
    path = str(tmp_path / "custom.opcap")
    assert _run(["capture", str(script), "-o", path, "-q"], capsys)[0] == 0
    _REPLAY["armed"] = True
    try:
        code, out, _ = _run(["replay", path, "--reps", "1", "--isolate", "--format", "json", "-q"], capsys)
    finally:
        _REPLAY["armed"] = False
    rows = {r["op"]: r for r in json.loads(out)["ops"]}
    crashed = rows["opaudit_capsule.crashes_when_armed.default"]
    assert (crashed["across"], crashed["reason_across"]) == ("unsupported", "crashed: SIGSEGV")
    assert rows["aten.exp.default"]["across"] == "same"  # a fresh worker went on
    # The worker draws from the source's generator state, as an in-process replay does.
    assert (rows["aten.randn_like.default"]["across"], rows["aten.randn_like.default"]["verdict"]) == ("same", "random")
    assert code == 1


def _rewrite(src, dst, edit=None, add=(), drop=()):
    """Copy a capsule, changing its manifest (``edit(dict)``), adding members and leaving some out."""
    with zipfile.ZipFile(src) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    manifest = json.loads(members.pop("manifest.json"))
    if edit is not None:
        edit(manifest)
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
        for name, data in members.items():
            if name not in drop:
                z.writestr(name, data)
        for name, data in add:
            z.writestr(name, data)
    return str(dst)


def test_an_op_missing_here_or_touching_files_is_unsupported(small_capsule, tmp_path, capsys):
    names = {"aten.relu.default": "aten.no_such_op.default", "aten.sum.default": "aten.save.default",
             "aten.cat.default": "os.system.default"}

    def rename(m):
        for e in m["signatures"]:
            e["op"] = names.get(e["op"], e["op"])

    path = _rewrite(small_capsule, tmp_path / "renamed.opcap", rename)
    code, out, _ = _run(["replay", path, "--reps", "1", "--format", "json", "-q"], capsys)
    rows = {r["op"]: r for r in json.loads(out)["ops"]}
    assert code == 1
    assert rows["aten.no_such_op.default"]["across"] == "unsupported"
    assert "does not exist in this torch" in rows["aten.no_such_op.default"]["reason_across"]
    assert rows["aten.no_such_op.default"]["verdict"] == "skipped"
    assert rows["aten.save.default"]["across"] == "unsupported"
    assert "touches files: never run from a capsule" in rows["aten.save.default"]["reason_across"]
    assert rows["os.system.default"]["across"] == "unsupported"
    assert rows["aten._softmax.default"]["across"] == "same"


def test_device_not_here_is_a_usage_error(small_capsule, capsys):
    code, _, err = _run(["replay", small_capsule, "--device", "cuda:7"], capsys)
    assert code == 2 and err.strip() == "opaudit: error: --device cuda:7: this machine has no such device"


# -- hostile capsule files: exit 2, one line, nothing run ---------------------------------------
class _Payload:
    """Unpickling this creates ``path``: proof that something ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _refused(path, capsys, *extra):
    code, out, err = _run(["replay", str(path), *extra], capsys)
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("opaudit: error: "), err
    return lines[0]


def test_empty_truncated_and_corrupt_capsules_are_refused(small_capsule, tmp_path, capsys):
    empty = tmp_path / "empty.opcap"
    empty.write_bytes(b"")
    assert "empty file" in _refused(empty, capsys)
    data = open(small_capsule, "rb").read()
    cut = tmp_path / "cut.opcap"
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated" in _refused(cut, capsys)
    # A flipped byte inside a stored blob: the zip's CRC-32 catches it.
    with zipfile.ZipFile(small_capsule) as z:
        info = max((i for i in z.infolist() if i.filename.startswith("b/") and i.compress_type == zipfile.ZIP_STORED),
                   key=lambda i: i.file_size)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    flipped = bytearray(data)
    flipped[start + info.file_size // 2] ^= 0xFF
    corrupt = tmp_path / "corrupt.opcap"
    corrupt.write_bytes(bytes(flipped))
    assert "corrupt capsule" in _refused(corrupt, capsys) and "CRC" in _refused(corrupt, capsys)
    not_zip = tmp_path / "text.opcap"
    not_zip.write_text("hello")
    assert "not an opaudit capsule" in _refused(not_zip, capsys)


def test_future_version_and_lying_sizes_are_refused(small_capsule, tmp_path, capsys):
    future = _rewrite(small_capsule, tmp_path / "future.opcap", lambda m: m.update(version=3))
    assert "version 3 is not supported (this opaudit reads version 1 or 2)" in _refused(future, capsys)

    def grow(m):
        t = next(t for e in m["signatures"] for c in e["captures"] for t in c["tensors"] if "buffer" in t)
        t["shape"] = [2**40]
        t["stride"] = [1]

    huge = _rewrite(small_capsule, tmp_path / "huge.opcap", grow)
    assert "reaches past its buffer" in _refused(huge, capsys)

    def shape_only(m):
        c = m["signatures"][0]["captures"][0]
        # Two elements, but a stride that makes rebuilding them allocate 4 TiB.
        c["tensors"].append({"dtype": "float32", "shape": [2], "stride": [2**40], "device": "cpu"})

    unbacked = _rewrite(small_capsule, tmp_path / "unbacked.opcap", shape_only)
    assert "of tensor data, more than the limit here" in _refused(unbacked, capsys)

    def lie(m):
        b = m["signatures"][0]["captures"][0]["buffers"][0]
        b["nbytes"] += 4

    lying = _rewrite(small_capsule, tmp_path / "lying.opcap", lie)
    assert "the manifest says" in _refused(lying, capsys)
    sparse = tmp_path / "sparse.opcap"
    with open(sparse, "wb") as f:
        f.truncate(2**40)  # a 1 TiB file that takes no disk
    assert "too large" in _refused(sparse, capsys)


def _stored_outputs(manifest):
    return [o for e in manifest["signatures"] for c in e["captures"] for m in c["outputs"].values()
            for o in m.get("outputs", ())]


def test_stored_outputs_carry_no_digest_and_a_version_1_capsule_still_replays(small_capsule, tmp_path, capsys):
    with zipfile.ZipFile(small_capsule) as z:
        manifest = json.loads(z.read("manifest.json"))
        members = {n: z.read(n) for n in z.namelist()}
    outputs = _stored_outputs(manifest)
    assert manifest["version"] == 2 and outputs
    # The bytes are what a replay compares: hashing them too was a fifth of a capture's own time.
    assert all("blob" in o and "digest" not in o for o in outputs)

    def version_1(m):  # as opaudit wrote capsules before: a digest beside every output's bytes
        m["version"] = 1
        for o in _stored_outputs(m):
            raw = torch.frombuffer(bytearray(members[o["blob"]]), dtype=torch.uint8)
            o["digest"] = content_digest(tensor_from_bytes(raw, o["dtype"], o["shape"]))

    old = _rewrite(small_capsule, tmp_path / "v1.opcap", version_1)
    code, out, err = _run(["replay", old, "--reps", "1", "--format", "json", "-q"], capsys)
    assert code == 0, err
    rows = json.loads(out)["ops"]
    assert rows and {r["across"] for r in rows} == {"same"}

    def bare(m):  # an output with neither its bytes nor a digest says nothing
        o = _stored_outputs(m)[0]
        del o["blob"], o["nbytes"]

    assert "digest" in _refused(_rewrite(small_capsule, tmp_path / "bare.opcap", bare), capsys)


LEFTOVERS = """
    import torch

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))


    def opaudit_step():
        total = torch.sum(x, 0, out=torch.full((8,), 3.0))  # bytes the op overwrites without reading them
        kept = torch.full((8,), 2.0).add_(total)            # read, then written: these bytes matter
        noise = torch.empty(4096).uniform_()                # whatever the allocator held, then filled
        return torch.nn.functional.dropout(x, 0.5).sum() + kept.sum() + noise.sum()
"""


def test_bytes_an_op_overwrites_without_reading_are_stored_as_zeros(tmp_path, capsys):
    script = tmp_path / "leftovers.py"
    script.write_text(textwrap.dedent(LEFTOVERS))
    paths = [tmp_path / f"{i}.opcap" for i in (1, 2)]
    for p in paths:
        assert main(["capture", str(script), "-o", str(p), "-q", "--threads", "1"]) == 0
    # Leftover memory would differ from one capture to the next: zeros do not.
    assert paths[0].read_bytes() == paths[1].read_bytes()
    with zipfile.ZipFile(paths[0]) as z:
        manifest = json.loads(z.read("manifest.json"))

        def written(op):
            entry = next(e for e in manifest["signatures"] if e["op"] == op)
            c = entry["captures"][0]
            blobs = [c["buffers"][t["buffer"]]["blob"] for t in c["tensors"] if t.get("written")]
            assert blobs, op
            return b"".join(z.read(b) for b in blobs)

        assert not any(written("aten.sum.IntList_out"))  # was 3.0 eight times
        assert not any(written("aten.uniform_.default"))
        assert not any(written("aten.bernoulli_.float"))  # dropout's mask, drawn into empty_like's memory
        assert torch.equal(torch.frombuffer(bytearray(written("aten.add_.Tensor")), dtype=torch.float32),
                           torch.full((8,), 2.0))
    code, out, err = _run(["replay", str(paths[0]), "--reps", "1", "--format", "json", "-q"], capsys)
    assert code == 0, err
    assert {r["across"] for r in json.loads(out)["ops"]} - {"skipped"} == {"same"}


def test_a_small_memory_limit_refuses_before_allocating(tmp_path, capsys):
    script = tmp_path / "two_mib.py"
    script.write_text("import torch\nx = torch.ones(600_000)\n\n\ndef opaudit_step():\n    return x.exp()\n")
    path = str(tmp_path / "two.opcap")
    assert _run(["capture", str(script), "-o", path, "-q"], capsys)[0] == 0
    assert "more than the limit here (1.0 MiB: --max-memory)" in _refused(path, capsys, "--max-memory", "1")


def test_pickles_in_a_capsule_never_run(small_capsule, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(str(marker)))
    # A torch.save file (a zip holding data.pkl) named like a capsule.
    saved = tmp_path / "saved.opcap"
    torch.save({"x": torch.ones(3)}, saved)
    with zipfile.ZipFile(saved, "a") as z:
        z.writestr("saved/evil.pkl", payload)
    assert "not an opaudit capsule (no manifest.json" in _refused(saved, capsys)
    # A capsule with a pickle beside its blobs, and one whose blob is a pickle.
    extra = _rewrite(small_capsule, tmp_path / "extra.opcap", add=[("data.pkl", payload)])
    assert "unexpected member 'data.pkl'" in _refused(extra, capsys)
    with zipfile.ZipFile(small_capsule) as z:
        blob = next(i.filename for i in z.infolist() if i.filename.startswith("b/") and i.file_size != len(payload))
    swapped = _rewrite(small_capsule, tmp_path / "swapped.opcap", drop=[blob], add=[(blob, payload)])
    assert "the manifest says" in _refused(swapped, capsys)
    # The manifest itself a pickle.
    with zipfile.ZipFile(tmp_path / "pickled.opcap", "w") as z:
        z.writestr("manifest.json", payload)
    assert "manifest.json" in _refused(tmp_path / "pickled.opcap", capsys)
    assert not marker.exists()


def test_a_mode_whose_runs_vary_here_is_not_compared_across():
    from opaudit.data.across import Across
    from opaudit.data.observation import Crossing, Observation, RunStats
    from opaudit.data.report import Finding
    from opaudit.data.verdict import Verdict
    from opaudit.flows.capsule.replay import cross_verdict

    racing, steady = RunStats(5, 3, 1e-3, 0.5, None), RunStats(5, 0, 0.0, 0.0, None)
    moved, kept = Crossing(True, 1e-3, 4, 0.5, ("output",)), Crossing(False)
    f = Finding(id="x", op="aten.index_put_.default", verdict=Verdict.DIVERGES, calls=1, signature="")

    def verdict(default, det, across):
        return cross_verdict(Observation(None, None, (), default, det, False, across=across), f)

    # Default-mode runs race here: the first of them against the source's one run says nothing.
    across, detail = verdict(racing, steady, (("default", moved), ("deterministic", kept)))
    assert across is Across.SAME and "default-mode bits vary run to run here" in detail["reason"]
    across, detail = verdict(racing, racing, (("default", moved), ("deterministic", moved)))
    assert across is Across.SKIPPED
    across, detail = verdict(steady, steady, (("default", moved), ("deterministic", kept)))
    assert across is Across.DIFFERS_DEFAULT and detail["modes"] == ("default",) and detail["max_ulp"] == 4


def _claim(src, dst, name, nbytes, compressed):
    """Copy a capsule whose zip directory (and manifest) claim ``nbytes`` for member ``name``, which holds what
    it held: the stored bytes a liar's file keeps small. ``compressed`` deflates that member and claims only its
    size once inflated; otherwise its stored size is claimed too."""
    with zipfile.ZipFile(src) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    manifest = json.loads(members.pop("manifest.json"))
    for b in (b for e in manifest["signatures"] for c in e["captures"] for b in c["buffers"]):
        if b["blob"] == name:
            b["nbytes"] = nbytes
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
        for member, data in members.items():
            z.writestr(member, data, compress_type=zipfile.ZIP_DEFLATED if compressed and member == name else None)
    with zipfile.ZipFile(dst) as z:
        at = z.start_dir  # the central directory
    data = bytearray(open(dst, "rb").read())
    while at >= 0:
        length = int.from_bytes(data[at + 28:at + 30], "little")
        if data[at + 46:at + 46 + length].decode() == name:
            if not compressed:
                data[at + 20:at + 24] = nbytes.to_bytes(4, "little")
            data[at + 24:at + 28] = nbytes.to_bytes(4, "little")
        at = data.find(b"PK\x01\x02", at + 4)
    open(dst, "wb").write(bytes(data))
    return str(dst)


def test_sizes_are_checked_against_the_file_before_allocating(small_capsule, tmp_path, capsys):
    with zipfile.ZipFile(small_capsule) as z:
        manifest = json.loads(z.read("manifest.json"))
    name = manifest["signatures"][0]["captures"][0]["buffers"][0]["blob"]
    # A directory that claims 2 GiB for a member of a few KiB: refused from the file's size, before a buffer of
    # the size it claims is allocated (the reading would fail later, but only after that allocation).
    stored = _claim(small_capsule, tmp_path / "stored.opcap", name, 2**31, compressed=False)
    assert f"{name} reaches past the end of its data (2.0 GiB declared" in _refused(stored, capsys)
    inflated = _claim(small_capsule, tmp_path / "inflated.opcap", name, 2**31, compressed=True)
    assert f"{name} declares 2.0 GiB stored in" in _refused(inflated, capsys)
    assert "more than those bytes can hold" in _refused(inflated, capsys)

    def expand(m):
        # Four stored bytes seen as 2**20 elements (stride 0): cheap to rebuild, but the op's output is dense.
        c = m["signatures"][0]["captures"][0]
        t = next(t for t in c["tensors"] if "buffer" in t)
        t["shape"], t["stride"] = [2**20], [0]

    expanded = _rewrite(small_capsule, tmp_path / "expanded.opcap", expand)
    line = _refused(expanded, capsys, "--max-memory", "2")
    assert "float32[1048576] argument takes 4.0 MiB, more than the limit here (2.0 MiB: --max-memory)" in line


def test_views_keep_their_strides_offsets_and_shared_memory(tmp_path, capsys):
    script = tmp_path / "views.py"
    script.write_text(textwrap.dedent("""\
        import torch
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))


        def opaudit_step():
            y = x.clone()
            return torch.mm(y[:, 1:5], y[2:6, :4].t())
        """))
    path = str(tmp_path / "views.opcap")
    assert _run(["capture", str(script), "-o", path, "-q"], capsys)[0] == 0
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("manifest.json"))
    mm = next(e for e in manifest["signatures"] if e["op"] == "aten.mm.default")["captures"][0]
    # Both arguments are views of one storage: one buffer, each its own offset and strides.
    assert len(mm["buffers"]) == 1
    assert [(t["shape"], t["stride"], t["offset"], t["buffer"]) for t in mm["tensors"]] == [
        ([6, 4], [8, 1], 1, 0), ([4, 4], [1, 8], 16, 0)]
    code, out, err = _run(["replay", path, "--reps", "1", "--format", "json", "-q"], capsys)
    assert code == 0, err
    assert {r["op"]: r["across"] for r in json.loads(out)["ops"]}["aten.mm.default"] == "same"


def test_a_generator_argument_travels_as_its_state(tmp_path, capsys):
    script = tmp_path / "gen.py"
    script.write_text(textwrap.dedent("""\
        import torch
        g = torch.Generator().manual_seed(5)
        w = torch.empty(64, 64)


        def opaudit_step():
            torch.nn.init.normal_(w, generator=g)
            return w + torch.rand(64, 64, generator=g)
        """))
    path = str(tmp_path / "gen.opcap")
    assert _run(["capture", str(script), "-o", path, "-q"], capsys)[0] == 0
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("manifest.json"))
    states = {e["op"]: [t for t in e["captures"][0]["tensors"] if "generator" in t] for e in manifest["signatures"]}
    for op in ("aten.normal_.default", "aten.rand.generator"):
        assert [(t["generator"], t["nbytes"]) for t in states[op]] == [("cpu", len(torch.get_rng_state()))], op
    code, out, err = _run(["replay", path, "--reps", "2", "--format", "json", "-q"], capsys)
    assert code == 0, err
    rows = {r["op"]: (r["across"], r["verdict"]) for r in json.loads(out)["ops"]}
    # Drawn again from the captured state: the source's bits, and random (not diverges) here.
    assert rows["aten.normal_.default"] == rows["aten.rand.generator"] == ("same", "random")


def test_a_zip_directory_longer_than_a_capsules_is_refused_before_it_is_parsed(tmp_path, capsys):
    import struct
    import zlib

    from opaudit.data.capsule_file import MAX_DIRECTORY_BYTES

    # A real zip whose directory is longer than any capsule's: 1,000 members with big extra fields here; a
    # directory of that length in 47-byte entries would list half a million (a Python object each, once parsed).
    local, central = [], []
    offset, crc, extra = 0, zlib.crc32(b""), b"\x99\x99" + struct.pack("<H", 30_000) + bytes(30_000)
    for i in range(1000):
        name = f"b/{i}".encode()
        local.append(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 33, crc, 0, 0, len(name), 0) + name)
        central.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 33, crc, 0, 0, len(name),
                                   len(extra), 0, 0, 0, 0, offset) + name + extra)
        offset += len(local[-1])
    directory = b"".join(central)
    assert len(directory) > MAX_DIRECTORY_BYTES
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1000, 1000, len(directory), offset, 0)
    long = tmp_path / "long.opcap"
    long.write_bytes(b"".join(local) + directory + end)
    with zipfile.ZipFile(long) as z:  # a zip that zipfile reads whole
        assert len(z.infolist()) == 1000
    assert "its zip directory takes 28.7 MiB, more than a capsule's (24.0 MiB at most" in _refused(long, capsys)


def test_capture_refuses_to_write_more_members_than_a_capsule_holds(tmp_path, capsys, monkeypatch):
    from opaudit.data import capsule_file

    script = tmp_path / "small.py"
    script.write_text(textwrap.dedent(SMALL))
    path = tmp_path / "small.opcap"
    monkeypatch.setattr(capsule_file, "MAX_MEMBERS", 3)  # the manifest and two arrays
    code, _, err = _run(["capture", str(script), "-o", str(path), "-q"], capsys)
    assert code == 2 and err.strip().endswith(": more than 2 arrays, more than a capsule holds (a smaller "
                                              "--capture-budget, or --digests-only, stores fewer)")
    assert not path.exists()


def test_an_index_op_keeps_its_further_captures(tmp_path, capsys):
    """An op whose result depends on its index values keeps up to --captures-per-signature calls, as the audit
    replays them: each is stored and replayed, and the row says which calls were checked."""
    script = tmp_path / "index.py"
    script.write_text(textwrap.dedent("""\
        import torch
        g = torch.Generator().manual_seed(0)
        src = torch.randn(256, 8, generator=g)
        indices = [torch.randint(0, 8, (256,), generator=g) for _ in range(3)]


        def opaudit_step():
            out = torch.zeros(8, 8)
            for i in indices:
                out.index_add_(0, i, src)
            return out
        """))
    path = str(tmp_path / "index.opcap")
    code, _, err = _run(["capture", str(script), "-o", path], capsys)
    assert code == 0 and "(2 signatures, 4 calls;" in err
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("manifest.json"))
    entry = next(e for e in manifest["signatures"] if e["op"] == "aten.index_add_.default")
    assert [c["call"] for c in entry["captures"]] == [1, 2, 3]
    code, out, err = _run(["replay", path, "--reps", "1", "--format", "json", "-q"], capsys)
    assert code == 0, err
    row = next(r for r in json.loads(out)["ops"] if r["op"] == "aten.index_add_.default")
    assert (row["across"], row["checked_calls"]) == ("same", [1, 2, 3])
    one = str(tmp_path / "one.opcap")
    assert _run(["capture", str(script), "-o", one, "--captures-per-signature", "1", "-q"], capsys)[0] == 0
    with zipfile.ZipFile(one) as z:
        manifest = json.loads(z.read("manifest.json"))
    assert [len(e["captures"]) for e in manifest["signatures"] if e["op"] == "aten.index_add_.default"] == [1]


def test_arrays_alike_in_their_sampled_bytes_are_kept_apart_and_copies_are_stored_once():
    """The capsule's arrays are matched by a checksum of samples, then byte for byte: arrays that differ only
    between the samples stay distinct, and a copy of one is stored once, past the compared candidates too."""
    from opaudit.flows.capsule.capture import _CANDIDATES, _Blobs

    blobs = _Blobs()
    arrays = []
    for i in range(_CANDIDATES + 4):
        a = torch.zeros(64 * 1024, dtype=torch.uint8)
        a[20_000] = i + 1  # between the first, middle and last 4 KiB
        arrays.append(a)
    added = [blobs.add(a) for a in arrays]
    assert len({b.name for b in added}) == len(arrays)
    stored = dict(blobs.stream())
    for a, b in zip(arrays, added):
        assert bytes(stored[b.name]) == bytes(a.numpy())
    assert blobs.add(arrays[3].clone()) == added[3]  # a copy elsewhere in memory: the same blob
    assert blobs.add(arrays[-1].clone()) == added[-1]  # past the candidates, keyed by every byte's checksum
    assert len(blobs.items) == len(arrays)
