"""Capture: record a window as an audit does and write its capsule (:mod:`opaudit.data.capsule`).

For every unique signature (and the further captures of value-dependent ops) the
capsule gets the captured call's arguments in portable form, and the outputs this
machine computes from them, once in deterministic and once in default mode, from a
known generator state: what a replay elsewhere compares its own first runs with.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from opaudit.aten.bitwise import same_bits
from opaudit.aten.memory import same_memory
from opaudit.aten.ops import OpKind
from opaudit.aten.portable import (
    NotPortable,
    content_digest,
    dtype_name,
    export_snapshot,
    scalar_json,
    tensor_bytes,
)
from opaudit.aten.tensors import Snapshot
from opaudit.data.capsule import (
    Blob,
    Buffer,
    CapsuleEntry,
    Capture,
    GeneratorArg,
    LeftOut,
    Manifest,
    ModeOutputs,
    Output,
    TensorArg,
)
from opaudit.data.capsule_file import write_capsule
from opaudit.engine.environment import fingerprint
from opaudit.engine.globalstate import preserved_state
from opaudit.engine.loader import Target
from opaudit.engine.record import DEFAULT_CAPTURES_PER_SIGNATURE, RecordedSignature, Recorder
from opaudit.engine.replay import ModeRun, run_in_modes
from opaudit.engine.window import Recorded, Window, WindowError
from opaudit.flows.pipeline import Progress, merge_recordings, recorded_calls
from opaudit.flows.run import AuditRun, Hooks, RunOptions

CAPTURED_KINDS = (OpKind.COMPUTE, OpKind.RANDOM, OpKind.UNINITIALIZED)
"""Op kinds a capsule holds calls of; the others are listed with the reason the recorder gave."""


@dataclass(frozen=True)
class Captured:
    """What :func:`capture` wrote."""

    manifest: Manifest
    size: int
    """The capsule file's size in bytes."""
    input_bytes: int
    """Bytes of captured inputs stored (each buffer once)."""
    output_bytes: int
    """Bytes of the source's outputs stored (an output identical in both modes once)."""
    recorded: Recorded | None
    """What the default-mode run recorded (``None`` if only the deterministic one did, or not from a script)."""


_SAMPLE = 4096
"""Bytes checksummed at each of an array's start, middle and end to key it."""
_CANDIDATES = 16
"""Arrays of one size and sample checksum compared byte for byte before the key takes every byte's checksum."""


class _Blobs:
    """Names and keeps the byte arrays of one capsule, each content once.

    A step's tensors repeat: an op's output is the next op's input, an output is the
    same in both modes, several ops read one activation. Arrays are matched by size
    and a CRC-32 of their first, middle and last 4 KiB, then compared byte for byte
    (a comparison of arrays that differ ends at their first differing byte: for two
    activations, in the first few). Checksumming every byte cost more than the
    capture's file writes. At most :data:`_CANDIDATES` arrays are compared per key:
    past them (arrays alike in those samples, differing elsewhere: sparse gradients,
    padded batches) a CRC-32 of every byte is added to the key.
    """

    def __init__(self) -> None:
        self.items: list[tuple[str, torch.Tensor]] = []
        self._by_content: dict[tuple[int, int], list[Blob]] = {}
        self._by_checksum: dict[tuple[int, int, int], list[Blob]] = {}
        """Arrays past the candidates of their sample key, by a checksum of every byte too."""
        self._data: dict[str, torch.Tensor] = {}
        """Blob name → its bytes: held until written, so no address below is reused meanwhile."""
        self._by_address: dict[tuple[int, int], Blob] = {}

    def add(self, data: torch.Tensor) -> Blob:
        """The blob holding ``data`` (a CPU ``uint8`` tensor), added if no blob holds those bytes yet."""
        data = data.contiguous()
        # The same memory again (an activation several ops read, held once by the recorder): no need to look.
        at = (data.data_ptr(), data.numel())
        known = self._by_address.get(at)
        if known is not None:
            return known
        n = data.numel()
        raw = memoryview(data.numpy())
        sample = raw if n <= 3 * _SAMPLE else b"".join((raw[:_SAMPLE], raw[n // 2:n // 2 + _SAMPLE], raw[-_SAMPLE:]))
        key = (n, zlib.crc32(sample))
        same = self._by_content.setdefault(key, [])
        found = self._match(same, data)
        if found is None and len(same) >= _CANDIDATES:
            same = self._by_checksum.setdefault((*key, zlib.crc32(raw)), [])
            found = self._match(same, data)
        if found is not None:
            return found
        blob = Blob(f"b/{len(self.items)}", n)
        self.items.append((blob.name, data))
        self._data[blob.name] = data
        self._by_address[at] = blob
        same.append(blob)
        return blob

    def _match(self, candidates: list[Blob], data: torch.Tensor) -> Blob | None:
        for blob in candidates:
            held = self._data[blob.name]
            if same_memory(held, data) or torch.equal(held, data):
                return blob
        return None

    def stream(self) -> Iterator[tuple[str, memoryview]]:
        for name, data in self.items:
            yield name, memoryview(data.numpy()).cast("B")


def _rng_states(devices: set[str]) -> dict[str, torch.Tensor]:
    """The generator states every op's runs start from: the CPU's, and each CUDA device's a signature used."""
    states = {"cpu": torch.get_rng_state()}
    for d in sorted(devices):
        if d.startswith("cuda") and torch.cuda.is_available():
            index = torch.device(d).index or 0
            states[f"cuda:{index}"] = torch.cuda.get_rng_state(index)
    return states


def _restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    for name, state in states.items():
        if name.startswith("cuda"):
            torch.cuda.set_rng_state(state, torch.device(name).index or 0)


def _portable_capture(call: int, snap: Snapshot, blobs: _Blobs) -> Capture:
    """A capture's arguments in portable form, its byte arrays added to ``blobs`` (inputs shared between
    captures, as the recorder holds them, stored once)."""
    p = export_snapshot(snap)
    buffers = []
    for raw, base, device in p.buffers:
        buffers.append(Buffer(blobs.add(raw), base, device))
    tensors: list[TensorArg | GeneratorArg] = []
    for t in p.tensors:
        if isinstance(t, int):
            device, state = p.states[t]
            tensors.append(GeneratorArg(device, blobs.add(state.view(torch.uint8).reshape(-1))))
        else:
            tensors.append(t)
    return Capture(call, p.args, p.kwargs, tuple(buffers), tuple(tensors))


def _outputs(run: ModeRun, blobs: _Blobs | None, other: tuple[ModeRun, ModeOutputs] | None) -> ModeOutputs:
    """One mode's outputs for the manifest: the bytes, or (``blobs`` is ``None``) their digests; a number's value
    and digest.

    ``other``: the other mode's run and record; an output with the same bits there shares
    its digest and bytes (the usual case: most ops ignore the determinism setting).
    """
    if run.error:
        return ModeOutputs(error=run.error)
    out = []
    for i, (name, value) in enumerate(zip(run.names, run.outputs)):
        if other is not None and i < len(other[0].outputs) and i < len(other[1].outputs) \
                and same_bits(other[0].outputs[i], value):
            out.append(replace(other[1].outputs[i], name=name))
        elif not isinstance(value, torch.Tensor):
            out.append(Output(name, content_digest(value), value=scalar_json(value)))
        elif blobs is None:
            out.append(Output(name, content_digest(value), dtype_name(value.dtype), tuple(value.shape)))
        else:
            blob = blobs.add(tensor_bytes(value))
            out.append(Output(name, None, dtype_name(value.dtype), tuple(value.shape), blob))
    return ModeOutputs(tuple(out))


def _leftovers_zeroed(func: Any, snap: Snapshot, runs: dict[str, ModeRun], states: dict[str, torch.Tensor]
                      ) -> Snapshot:
    """``snap``, or a copy whose buffers the op writes hold zeros, when their bytes do not change what it computes.

    An ``out=`` buffer, the tensor ``bernoulli_`` or ``uniform_`` fills: the op
    writes it whole without reading it, and its bytes are whatever the allocator
    handed out, often another tensor's freed memory. Stored, they would make two
    captures of one step differ and carry that memory to another machine. A run on
    zeros that gives the default run's bits exactly shows that they do not matter
    (the capsule's outputs are the same either way); an op that reads them
    (``add_``), or whose default runs vary, keeps them.
    """
    zeroed = snap.writes_zeroed()
    default = runs.get("default")
    if zeroed is None or default is None or default.error:
        return snap
    _restore_rng(states)
    again = run_in_modes(func, zeroed, modes=("default",))[0]["default"]
    if again.error or len(again.outputs) != len(default.outputs):
        return snap
    return zeroed if all(same_bits(a, b) for a, b in zip(default.outputs, again.outputs)) else snap


def _output_nbytes(runs: dict[str, ModeRun]) -> int:
    total = 0
    for run in runs.values():
        for v in run.outputs:
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def capture(target: Target, window: Window, path: str, *, seed: int = 0, capture_budget: int = 2 * 1024**3,
            captures_per_signature: int = 4, deterministic_pass: bool = True, digests_only: bool = False,
            settings: dict[str, Any] | None = None, hooks: Hooks | None = None,
            on_progress: Callable[[Progress], None] | None = None) -> Captured:
    """Record ``window`` of ``target`` as an audit records it (an :class:`~opaudit.flows.run.AuditRun`:
    the window, then what deterministic mode calls) and write its capsule to ``path`` (see :func:`write_recording`).

    An interrupt while the user's code runs stops the capture: no capsule is written
    (a capsule of part of a step would look whole). ``hooks`` hears what the run says.
    """
    options = RunOptions(seed=seed, capture_budget=capture_budget, captures_per_signature=captures_per_signature,
                         deterministic_pass=deterministic_pass)
    with AuditRun(options, root=target.root, hooks=hooks) as run:
        recorded = run.record_target(target, window)
        if run.cut is not None:
            raise run.cut
        if run.recorder is None:
            raise WindowError("nothing was recorded")
        all_settings = {"recorded": recorded.span if recorded is not None else ""}
        if captures_per_signature != DEFAULT_CAPTURES_PER_SIGNATURE:
            all_settings["captures_per_signature"] = captures_per_signature
        done = write_recording(run.recorder, path, deterministic=run.deterministic, seed=seed,
                               digests_only=digests_only, settings={**all_settings, **(settings or {})},
                               on_progress=on_progress)
    return replace(done, recorded=recorded)


def write_recording(rec: Recorder, path: str, *, deterministic: Recorder | None = None, seed: int = 0,
                    digests_only: bool = False, settings: dict[str, Any] | None = None,
                    on_progress: Callable[[Progress], None] | None = None) -> Captured:
    """Write the capsule of what ``rec`` recorded (and ``deterministic``, a recording of the same steps in
    deterministic mode: :func:`~opaudit.flows.pipeline.merge_recordings`) to ``path``.

    Each captured call is run once in deterministic and once in default mode, from
    the generator state ``torch.manual_seed(seed)`` gives, for the source's outputs.
    The recorder's ``capture_budget`` bounds the capsule's tensor data too: outputs
    past it are kept as digests only, and what was left out (inputs the recorder could
    not hold, outputs past the budget) is listed in the manifest (``left_out``).
    ``digests_only`` keeps no output bytes at all (a replay then says whether, not how
    far, an op's bits differ).
    """
    budget = rec.capture_budget
    items = merge_recordings(rec, deterministic)
    further = rec.further_captures()
    det_further = deterministic.further_captures() if deterministic is not None else {}
    devices = {sig.device for sig, _, _, _ in items}
    with preserved_state():
        torch.manual_seed(seed)
        states = _rng_states(devices)
        blobs = _Blobs()
        rng = {name: blobs.add(state.view(torch.uint8).reshape(-1)) for name, state in states.items()}
        entries, left_out = [], []
        input_bytes = output_bytes = 0
        for i, (sig, func, snap, paths) in enumerate(items):
            entry = _entry(sig, paths)
            if sig.skip_reason or snap is None or sig.kind not in CAPTURED_KINDS:
                if sig.skip_reason == "capture budget":
                    left_out.append(LeftOut(sig.id, sig.op, "inputs", sig.capture_needed or 0))
                entries.append(replace(entry, skip_reason=sig.skip_reason or "not captured"))
                continue
            extra = (det_further if paths == ("deterministic",) else further).get(sig.id, ())
            captures, drew = [], False
            for call, s in ((1, snap), *extra):
                runs, used = None, False
                if sig.kind is not OpKind.UNINITIALIZED:
                    _restore_rng(states)
                    runs, used = run_in_modes(func, s)
                    s = _leftovers_zeroed(func, s, runs, states)
                try:
                    before = len(blobs.items)
                    c = _portable_capture(call, s, blobs)
                except NotPortable as e:
                    if call == 1:
                        entry = replace(entry, skip_reason=f"not portable: {e}")
                        break
                    continue
                input_bytes += sum(data.numel() for _, data in blobs.items[before:])
                if runs is not None:
                    drew = drew or used
                    keep = not digests_only
                    need = _output_nbytes(runs)
                    if keep and input_bytes + output_bytes + need > budget:
                        keep = False
                        left_out.append(LeftOut(sig.id, sig.op, "outputs", input_bytes + output_bytes + need))
                    before = len(blobs.items)
                    det = _outputs(runs["deterministic"], blobs if keep else None, None)
                    default = _outputs(runs["default"], blobs if keep else None, (runs["deterministic"], det))
                    output_bytes += sum(data.numel() for _, data in blobs.items[before:])
                    c = replace(c, outputs={"default": default, "deterministic": det})
                captures.append(c)
            entries.append(replace(entry, captures=tuple(captures), rng=drew))
            if on_progress is not None:
                on_progress(Progress(i + 1, len(items), sig.op))
    all_settings = {"seed": seed, "capture_budget_mib": budget // 2**20, "deterministic_pass": deterministic is not None,
                    "digests_only": digests_only, **(settings or {})}
    accel = sorted(d for d in devices if d != "cpu")
    manifest = Manifest(environment=fingerprint(accel[0] if accel else "cpu"), settings=all_settings,
                        entries=tuple(entries), rng=rng, left_out=tuple(left_out),
                        total_calls=recorded_calls(rec, items), view_calls=rec.view_calls)
    size = write_capsule(path, manifest, blobs.stream())
    return Captured(manifest, size, input_bytes, output_bytes, None)


def _entry(sig: RecordedSignature, paths: tuple[str, ...]) -> CapsuleEntry:
    return CapsuleEntry(id=sig.id, op=sig.op, kind=sig.kind.value, signature=sig.signature, device=sig.device,
                        calls=sig.calls, first_call=sig.first_call, phases=sig.phases, sites=sig.sites,
                        sites_dropped=sig.sites_dropped, recorded_in=paths)
