"""Replay: a capsule's calls rebuilt and replayed here, each compared with the bits its source computed.

Every call is replayed as the audit replays (``reps`` runs per mode, the strict run
the first of deterministic mode's: the local verdict), and the first run of each mode is compared with the source's
outputs of that mode: ``across`` (:class:`~opaudit.data.across.Across`). Nothing in
a capsule decides what runs here beyond its calls: op names are looked up among the
operators this process has, and whether an op is replayed at all is decided from
its schema here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from opaudit.aten.ops import OpKind, is_cudnn_op, op_kind
from opaudit.aten.portable import Expected, NotPortable, Reference, rebuild_snapshot, resolve_op, tensor_from_bytes
from opaudit.aten.tensors import Snapshot
from opaudit.data.across import Across, CapsuleReplay, Crossed, sort_rows
from opaudit.data.capsule import CapsuleEntry, ModeOutputs
from opaudit.data.capsule_file import CapsuleFile
from opaudit.data.errors import OpauditError
from opaudit.data.fileio import shown_path
from opaudit.data.observation import CRASHED, NotReplayed, Observation
from opaudit.data.report import Finding
from opaudit.engine.environment import fingerprint
from opaudit.engine.globalstate import preserved_state
from opaudit.engine.record import RecordedSignature
from opaudit.engine.replay import replay
from opaudit.flows.capsule.capture import CAPTURED_KINDS
from opaudit.flows.pipeline import DEFAULT_REPS, Progress, make_finding, over_calls

ReplayFn = Callable[..., Observation]
"""``(func, snapshot, reps, cudnn, reference=...)``: :func:`opaudit.engine.replay.replay`, or an
:class:`~opaudit.engine.isolate.Isolator`."""


class DeviceError(OpauditError):
    """``--device`` names a device this machine does not have."""


def check_device(name: str | None) -> torch.device | None:
    """The ``--device`` asked for, checked to exist here."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name}: not a device name") from None
    if not _available(device):
        raise DeviceError(f"--device {name}: this machine has no such device")
    return device


def _available(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    module = getattr(torch, device.type, None)
    return bool(module is not None and getattr(module, "is_available", lambda: False)())


def target_device(entry: CapsuleEntry, requested: torch.device | None) -> torch.device:
    """Where ``entry`` is replayed: ``--device``, else where it was captured if this machine has that, else CPU."""
    if requested is not None:
        return requested
    try:
        device = torch.device(entry.device)
    except (RuntimeError, ValueError):
        return torch.device("cpu")
    return device if _available(device) else torch.device("cpu")


def _device_map(entry: CapsuleEntry, target: torch.device) -> Callable[[str], torch.device]:
    """Source device name → device here: the signature's device goes to ``target``; CPU tensors of an accelerator
    op (0-dim scalars, index tensors) stay on the CPU, as they were."""
    keep_cpu = entry.device != "cpu"

    def device(name: str) -> torch.device:
        if name == "cpu" and keep_cpu:
            return torch.device("cpu")
        return target

    return device


def load_blobs(cap: CapsuleFile) -> dict[str, torch.Tensor]:
    """Every blob's bytes, read into memory torch allocated (aligned as torch aligns), CRCs checked."""
    out: dict[str, torch.Tensor] = {}
    for blob in cap.manifest.blobs():
        if blob.name not in out:
            t = torch.empty(blob.nbytes, dtype=torch.uint8)
            cap.read_into(blob, t.numpy())
            out[blob.name] = t
    return out


def _expected(m: ModeOutputs, blobs: dict[str, torch.Tensor]) -> Expected:
    if m.error:
        return Expected(error=m.error)
    # Numbers, and tensors kept as digests only, are compared by digest (value None).
    values = [tensor_from_bytes(blobs[o.blob.name], o.dtype, o.shape) if o.blob is not None else None
              for o in m.outputs]
    return Expected(tuple(o.name for o in m.outputs), tuple(o.digest for o in m.outputs), tuple(values))


def _signature(entry: CapsuleEntry, kind: OpKind, skip_reason: str | None) -> RecordedSignature:
    return RecordedSignature(
        id=entry.id, op=entry.op, kind=kind, signature=entry.signature, device=entry.device, calls=entry.calls,
        phases=entry.phases, sites=entry.sites, sites_dropped=entry.sites_dropped, first_call=entry.first_call,
        skip_reason=skip_reason, checked_calls=tuple(c.call for c in entry.captures) if len(entry.captures) > 1 else ())


def _kind(entry: CapsuleEntry) -> OpKind:
    try:
        return OpKind(entry.kind)
    except ValueError:
        return OpKind.COMPUTE


def cross_verdict(obs: Observation | None, finding: Finding) -> tuple[Across, dict[str, Any]]:
    """The cross-machine verdict of one replayed call, and its measurements."""
    if obs is None:
        return Across.SKIPPED, {"reason": finding.reason or "not replayed"}
    if isinstance(obs, NotReplayed):
        if obs.reason.startswith(CRASHED):
            return Across.UNSUPPORTED, {"reason": obs.reason}
        return Across.SKIPPED, {"reason": obs.reason}
    if obs.error is not None or obs.default is None:
        return Across.UNSUPPORTED, {"reason": obs.error or obs.strict_error or "replay failed"}
    if obs.unwritten:
        return Across.SKIPPED, {"reason": "partly uninitialized memory: its bits mean nothing there"}
    crossings = dict(obs.across)
    if not crossings:
        return Across.SKIPPED, {"reason": "no outputs of the source to compare"}
    # A mode whose runs differ among themselves here says nothing about the other machine: its first
    # run is one draw of a race (the local verdict, diverges, is the finding there).
    varies = {"default": obs.default.diverges,
              "deterministic": obs.deterministic is not None and obs.deterministic.diverges}
    usable, notes = {}, []
    for mode, c in crossings.items():
        if c.error is not None:
            notes.append(c.error)
        elif varies.get(mode):
            notes.append(f"{mode}-mode bits vary run to run here: that mode not compared")
        else:
            usable[mode] = c
    if not usable:
        return Across.SKIPPED, {"reason": "; ".join(dict.fromkeys(notes))}
    differing = [m for m, c in usable.items() if c.differs]
    detail: dict[str, Any] = {}
    if differing:
        cs = [usable[m] for m in differing]
        detail = {
            "max_abs_diff": _max(c.max_abs_diff for c in cs), "max_ulp": _max(c.max_ulp for c in cs),
            "frac_differing": _max(c.frac_differing for c in cs),
            "outputs": tuple(dict.fromkeys(o for c in cs for o in c.outputs)), "modes": tuple(differing),
        }
        if any(c.max_abs_diff is None for c in cs):
            notes.append("digests only: the capsule holds no bytes to measure how far")
    if "deterministic" in usable and "default" not in usable and not differing:
        notes.append("compared in deterministic mode only")
    if "default" in usable and "deterministic" not in usable:
        notes.append("compared in default mode only")
    if notes:
        detail["reason"] = "; ".join(dict.fromkeys(notes))
    if "deterministic" in differing:
        return Across.DIFFERS, detail
    if "default" in differing:
        return Across.DIFFERS_DEFAULT, detail
    return Across.SAME, detail


def _max(values: Any) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return max(present, key=lambda v: math.inf if isinstance(v, float) and math.isnan(v) else v)


def _worst(results: list[tuple[Across, dict[str, Any]]]) -> tuple[Across, dict[str, Any]]:
    return max(results, key=lambda r: r[0].severity)


@dataclass
class _Job:
    """One capsule entry made ready to replay here: a row already decided, or its calls rebuilt."""

    entry: CapsuleEntry
    row: Crossed | None = None
    func: Any = None
    sig: RecordedSignature | None = None
    target: torch.device | None = None
    calls: list[tuple[int, Snapshot | str, Reference | None]] | None = None
    """``(call, snapshot or why it cannot be rebuilt here, the source's outputs)``."""


def _prepare(entry: CapsuleEntry, blobs: dict[str, torch.Tensor], device: torch.device | None) -> _Job:
    kind = _kind(entry)
    if entry.skip_reason or not entry.captures:
        sig = _signature(entry, kind, entry.skip_reason or "not captured")
        return _Job(entry, Crossed(Across.SKIPPED, make_finding(sig, None, recorded_in=entry.recorded_in),
                                   reason=entry.skip_reason or "not captured"))
    try:
        func = resolve_op(entry.op)
    except NotPortable as e:
        sig = _signature(entry, kind, f"not available here: {e}")
        return _Job(entry, Crossed(Across.UNSUPPORTED, make_finding(sig, None, recorded_in=entry.recorded_in),
                                   reason=str(e)))
    kind, why = op_kind(func)
    if kind not in CAPTURED_KINDS:
        # Decided here, whatever the capsule says: a capsule is untrusted input.
        sig = _signature(entry, kind, why or "not replayed")
        return _Job(entry, Crossed(Across.SKIPPED, make_finding(sig, None, recorded_in=entry.recorded_in),
                                   reason=why or "not replayed"))
    sig = _signature(entry, kind, None)
    if kind is OpKind.UNINITIALIZED:
        return _Job(entry, Crossed(Across.SKIPPED, make_finding(sig, None, recorded_in=entry.recorded_in),
                                   reason="uninitialized memory: its bits mean nothing"))
    target = target_device(entry, device)
    mapping = _device_map(entry, target)
    calls: list[tuple[int, Snapshot | str, Reference | None]] = []
    for c in entry.captures:
        try:
            snap: Snapshot | str = rebuild_snapshot(c, lambda b: blobs[b.name], mapping)
            reference = Reference({mode: _expected(m, blobs) for mode, m in c.outputs.items()})
        except NotPortable as e:
            snap, reference = f"cannot be rebuilt here: {e}", None
        except (RuntimeError, ValueError, TypeError) as e:
            snap, reference = f"cannot be rebuilt here: {_first(e)}", None
        calls.append((c.call, snap, reference))
    return _Job(entry, func=func, sig=sig, target=target, calls=calls)


def _run(job: _Job, rng_note: str | None, reps: int, replay_fn: ReplayFn) -> Crossed:
    """Replay a prepared job's calls; the worst call's ``across`` and (as the audit does) the worst finding.

    ``rng_note``: why the source's generator state is not in force for this job's device, if it is not.
    """
    if job.row is not None:
        return job.row
    entry, sig, target = job.entry, job.sig, job.target
    assert sig is not None and target is not None and job.calls is not None
    cudnn = target.type == "cuda" and is_cudnn_op(job.func)
    results: list[tuple[int, Finding, tuple[Across, dict[str, Any]]]] = []
    for call, snap, reference in job.calls:
        note = rng_note if entry.rng else None
        source = entry.device.split(":")[0]
        if entry.rng and source != target.type:
            note = (f"draws from the RNG: the source drew from the {source} generator, this replay from the "
                    f"{target.type} one (another stream)")
        if isinstance(snap, str):
            obs = Observation(None, None, (), None, None, False, error=snap)
        else:
            obs = replay_fn(job.func, snap, reps, cudnn, reference=reference)
        f = make_finding(sig, obs, recorded_in=entry.recorded_in)
        across = cross_verdict(obs, f)
        if note and across[0] is not Across.SAME:
            across = (across[0], {**across[1], "reason": note})
        results.append((call, f, across))
    _, finding, _ = results[0]
    if len(results) > 1:
        finding = over_calls(replace(sig, checked_calls=tuple(c for c, _, _ in results)), finding,
                             [(c, f) for c, f, _ in results[1:]])
    across, detail = _worst([a for _, _, a in results])
    return Crossed(across, finding, **detail)


def _in_process(func: Any, snap: Snapshot, reps: int, cudnn: bool, reference: Reference | None = None) -> Observation:
    return replay(func, snap, reps, cudnn_variants=cudnn, reference=reference)


def _set_rng(states: dict[str, torch.Tensor], target: torch.device) -> str | None:
    """Put the source's generator state in force for ``target``; a note when this machine cannot take it.

    Set once, before any replay: every replay restores the state it found, and a replay
    worker (``--isolate``) is forked or spawned with it.
    """
    if target.type == "cpu":
        state = states.get("cpu")
        if state is None:
            return "draws from the RNG, and the capsule holds no CPU generator state"
        try:
            torch.set_rng_state(state)
        except (RuntimeError, ValueError) as e:
            return f"draws from the RNG: this torch cannot take the source's generator state ({_first(e)})"
        return None
    if target.type == "cuda":
        index = target.index or 0
        state = next((s for name, s in sorted(states.items()) if name.startswith("cuda")), None)
        if state is None:
            return "draws from the RNG: the source drew from the CPU's generator, this replay from CUDA's (another stream)"
        try:
            torch.cuda.set_rng_state(state, index)
        except (RuntimeError, ValueError) as e:
            return f"draws from the RNG: this torch cannot take the source's generator state ({_first(e)})"
        return None
    return f"draws from the RNG: no generator state for {target.type}"


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def replay_capsule(path: str, *, reps: int = DEFAULT_REPS, device: torch.device | None = None,
                   limit: int | None = None, timings: bool = True, remedies: bool = True, isolate: bool = False,
                   op_timeout: float | None = None, settings: dict[str, Any] | None = None,
                   on_progress: Callable[[Progress], None] | None = None) -> CapsuleReplay:
    """Replay every capture of the capsule at ``path`` here and compare it with the source's bits.

    ``limit`` (bytes) bounds what the capsule may declare (default: this machine's
    memory); the file is checked whole before any tensor is allocated. ``isolate`` and
    ``op_timeout`` replay in a worker process, as ``opaudit --isolate`` does: an op that
    crashes it is ``unsupported`` (``crashed: SIGILL``), one past the timeout ``skipped``.
    A ``KeyboardInterrupt`` returns what was replayed so far as a document marked
    ``complete=False``, attached to the re-raised interrupt as ``report``.
    """
    if reps < 1:
        raise ValueError("reps must be at least 1")
    with CapsuleFile.open(path, limit if limit is not None else physical_memory()) as cap:
        manifest = cap.manifest
        blobs = load_blobs(cap)
    rng = {name: blobs[b.name] for name, b in manifest.rng.items()}
    kb = None
    if remedies:
        from opaudit.engine.remedies import KnowledgeBase

        kb = KnowledgeBase.load_default()
    jobs = [_prepare(e, blobs, device) for e in manifest.entries]
    isolator = None
    fn: ReplayFn = _in_process
    if isolate or op_timeout:
        from opaudit.engine.isolate import Isolator

        isolator = Isolator(timeout=op_timeout, snapshots=[(j.func, snap) for j in jobs if j.calls
                                                          for _, snap, _ in j.calls if not isinstance(snap, str)])
        fn = isolator
    rows: list[Crossed] = []
    interrupted: KeyboardInterrupt | None = None
    try:
        with preserved_state():
            notes = {t: _set_rng(rng, t) for t in dict.fromkeys(j.target for j in jobs if j.target is not None)}
            for i, job in enumerate(jobs):
                row = _run(job, notes.get(job.target), reps, fn)
                f = row.finding
                if not timings:
                    f = replace(f, time_default_us=None, time_deterministic_us=None)
                if kb is not None:
                    f = replace(f, remedy=kb.remedy(f))
                rows.append(replace(row, finding=f))
                if on_progress is not None:
                    on_progress(Progress(i + 1, len(jobs), job.entry.op))
    except KeyboardInterrupt as e:
        interrupted = e
    finally:
        if isolator is not None:
            isolator.close()
    accel = next((j.target for j in jobs if j.target is not None and j.target.type != "cpu"), None)
    here = fingerprint(str(device or accel or "cpu"))
    all_settings = {"reps": reps, "device": str(device) if device is not None else "as captured", "timing": timings}
    if isolator is not None:
        all_settings["isolate"] = isolator.start_method
    all_settings.update(settings or {})
    doc = CapsuleReplay(
        capsule=shown_path(path), source=manifest.environment, here=here, settings=all_settings,
        rows=sort_rows(rows), complete=interrupted is None,
        left_out=tuple({"id": x.id, "op": x.op, "what": x.what, "nbytes": x.nbytes} for x in manifest.left_out))
    if interrupted is not None:
        interrupted.report = doc  # type: ignore[attr-defined]
        raise interrupted
    return doc


def physical_memory() -> int:
    """This machine's memory in bytes (the default bound on what a capsule may declare)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 * 2**30
