"""Replay and classify what was recorded: recordings → findings → :class:`Report`.

:func:`build_report` replays each recorded signature and classifies it; the
audit run (:mod:`opaudit.flows.run`) calls it, and so do the catalog sweep and
whoever holds a :class:`~opaudit.engine.record.Recorder` of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from opaudit.aten.ops import OpKind, is_cudnn_op
from opaudit.aten.tensors import Snapshot
from opaudit.data.observation import Observation
from opaudit.data.report import Finding, Report, RunCheck, sort_findings
from opaudit.data.verdict import Verdict
from opaudit.engine.classify import classify
from opaudit.engine.detpath import PathRecorder
from opaudit.engine.environment import environment_warnings, fingerprint
from opaudit.engine.globalstate import preserved_state
from opaudit.engine.record import DEFAULT_CAPTURES_PER_SIGNATURE, RecordedSignature, Recorder
from opaudit.engine.replay import MoreRuns, replay, time_fill
from opaudit.flows.races import RaceReplay

DEFAULT_REPS = 5


@dataclass(frozen=True)
class Progress:
    """Where a running audit stands; passed to an ``on_progress`` callback."""

    done: int
    total: int
    op: str


ReplayFn = Callable[[Any, Snapshot, int, bool], Observation]
"""How one signature is replayed: in-process by default, in a worker with ``--isolate``."""


def _in_process(func: Any, snap: Snapshot, reps: int, cudnn: bool, more: MoreRuns | None = None) -> Observation:
    return replay(func, snap, reps, cudnn_variants=cudnn, more=more)


def _replayed(replay_fn: ReplayFn, func: Any, snap: Snapshot, reps: int, cudnn: bool,
              more: MoreRuns | None) -> Observation:
    """``replay_fn``'s observation; ``more`` is passed only when set (a caller's own ``replay_fn`` may not take it)."""
    if more is None:
        return replay_fn(func, snap, reps, cudnn)
    return replay_fn(func, snap, reps, cudnn, more=more)  # type: ignore[call-arg]


DEFAULT_PATH, DETERMINISTIC_PATH = "default", "deterministic"

Item = tuple[RecordedSignature, Any, "Snapshot | None", tuple[str, ...]]
"""A signature to classify: the recorded signature, its op, its captured inputs, the recordings that called it."""


def merge_recordings(default: Recorder, deterministic: PathRecorder | None) -> list[Item]:
    """The signatures to classify: the default-mode recording's, then those only deterministic mode called.

    PyTorch's Python code (and the user's) takes other paths when
    ``torch.are_deterministic_algorithms_enabled()``: ``nn.functional`` switches
    ``max_pool3d``, ``pad(mode="replicate")`` and bilinear ``interpolate`` to
    decompositions on CUDA. With a recording made in deterministic mode, a
    default-mode signature is ``(default, deterministic)`` when deterministic
    mode called its op from one of its sites too, ``(default,)`` when it did not
    and could have (:meth:`~opaudit.engine.detpath.PathRecorder.judges`), and
    ``()`` (not known, so still on the deterministic path) otherwise; the
    signatures only deterministic mode called follow, ``(deterministic,)``.
    Without that recording, every signature's paths are left empty.
    """
    items = default.items()
    if deterministic is None:
        return [(sig, func, snap, ()) for sig, func, snap in items]
    called = deterministic.called()
    called_ops = {op for op, _ in called}
    det_items = deterministic.items()
    det_ids = {sig.id for sig, _, _ in det_items}
    judged = deterministic.judges(default.since_mark())
    out: list[Item] = []
    for sig, func, snap in items:
        if (sig.id in det_ids or any((sig.op, site) in called for site in sig.sites)
                or (sig.sites_dropped and sig.op in called_ops)):
            paths: tuple[str, ...] = (DEFAULT_PATH, DETERMINISTIC_PATH)
        else:
            paths = (DEFAULT_PATH,) if judged(sig) else ()
        out.append((sig, func, snap, paths))
    seen = {sig.id for sig, _, _ in items}
    out += [(sig, func, snap, (DETERMINISTIC_PATH,)) for sig, func, snap in det_items if sig.id not in seen]
    return out


def recorded_calls(default: Recorder, items: list[Item]) -> int:
    """Op calls recorded (view and metadata calls are counted apart): the default-mode recording's, and those of
    the signatures only deterministic mode called (the two recordings' shared calls counted once)."""
    return default.total_calls + sum(sig.calls for sig, _, _, paths in items if paths == (DETERMINISTIC_PATH,))


def make_finding(sig: RecordedSignature, obs: Observation | None, remedy: str = "",
                 recorded_in: tuple[str, ...] = ()) -> Finding:
    """Combine a recorded signature and its replay into a :class:`Finding`."""
    verdict, reason = classify(sig, obs)
    f = Finding(
        id=sig.id, op=sig.op, verdict=verdict, calls=sig.calls, signature=sig.signature, device=sig.device,
        reason=reason, phases=sig.phases, sites=sig.sites, sites_dropped=sig.sites_dropped,
        first_call=sig.first_call, recorded_in=recorded_in,
    )
    if obs is None:
        return _with(f, remedy=remedy)
    changes: dict[str, Any] = {
        "alert_kind": obs.strict_kind if obs.strict_kind != "error" else None,
        "strict_error": obs.strict_error,
        "warnings": obs.warnings,
        "rng": obs.rng_used if obs.default is not None else sig.kind is OpKind.RANDOM,
        "remedy": remedy,
    }
    if obs.default is not None and obs.deterministic is not None:
        d, t = obs.default, obs.deterministic
        changes.update(
            default_diverged=d.ratio, deterministic_diverged=t.ratio,
            max_abs_diff=_round(max(d.max_abs_diff, t.max_abs_diff), 6),
            frac_differing=_round(max(d.frac_differing, t.frac_differing), 6),
            time_default_us=None if d.median_s is None else _round(d.median_s * 1e6, 4),
            time_deterministic_us=None if t.median_s is None else _round(t.median_s * 1e6, 4),
            outputs=tuple(dict.fromkeys(d.outputs + t.outputs)),
        )
    if obs.variants:
        changes["cudnn"] = tuple((name, stats.ratio) for name, stats in obs.variants)
    return _with(f, **changes)


def over_calls(sig: RecordedSignature, first: Finding, more: list[tuple[int, Finding]]) -> Finding:
    """One finding for a value-dependent signature replayed on several of its calls.

    ``first`` is the finding of the first call's capture, ``more`` the ``(call,
    finding)`` of the others. The verdict and the ``k/N`` are those of the worst
    call (the earliest of the worst); ``checked_calls`` and ``diverging_calls`` say
    which calls were replayed and which of them diverged at least once (in either
    mode). A further call whose replay was skipped (it failed, timed out) is not
    counted as checked but as ``calls_not_checked``, next to the calls whose
    capture the budget could not hold.
    """
    found = [(1, first)] + [(c, f) for c, f in more if f.verdict is not Verdict.SKIPPED]
    worst = max(found, key=lambda cf: (cf[1].verdict.severity, -cf[0]))[1]
    not_checked = sig.calls_not_held + len(more) + 1 - len(found)
    return _with(worst, checked_calls=tuple(c for c, _ in found),
                 diverging_calls=tuple(c for c, f in found if f.diverges or f.diverges_deterministic),
                 calls_not_checked=not_checked)


def _with_fill_timing(f: Finding, func: Any, snap: Snapshot, reps: int) -> Finding:
    timed = time_fill(func, snap, reps)
    if timed is None:
        return f
    return _with(f, time_default_us=_round(timed[0] * 1e6, 4), time_deterministic_us=_round(timed[1] * 1e6, 4))


def _round(x: float, digits: int) -> float:
    """Significant digits kept in reports, so that a saved report loads back equal."""
    return x if x != x or x in (float("inf"), float("-inf")) else float(f"{x:.{digits}g}")


def _with(f: Finding, **changes: Any) -> Finding:
    import dataclasses

    return dataclasses.replace(f, **changes)


def build_report(
    rec: Recorder,
    *,
    reps: int = DEFAULT_REPS,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    timings: bool = True,
    remedies: bool = True,
    replay_fn: ReplayFn | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    run_checks: Iterable[RunCheck] = (),
    complete: bool = True,
    deterministic: PathRecorder | None = None,
    races: RaceReplay | None = None,
) -> Report:
    """Replay every recorded signature and classify it.

    ``complete=False`` marks the report partial from the start (the recording was
    cut short). ``deterministic`` is what ``use_deterministic_algorithms(True,
    warn_only=True)`` ran, recorded after or beside ``rec`` (see :func:`merge_recordings`).
    ``races`` replays the signatures whose nondeterminism is a race further (see
    :mod:`opaudit.flows.races`).

    A ``KeyboardInterrupt`` during replay returns a report marked
    ``complete=False`` holding every finding classified so far; the interrupt is
    re-raised after the report is attached to it as ``report``.
    """
    if reps < 1:
        raise ValueError("reps must be at least 1")
    replay_fn = replay_fn or _in_process
    kb = None
    if remedies:
        from opaudit.engine.remedies import KnowledgeBase

        kb = KnowledgeBase.load_default()
    items = merge_recordings(rec, deterministic)
    further = rec.further_captures()
    det_further = deterministic.further_captures() if deterministic is not None else {}
    findings: list[Finding] = []
    devices: set[str] = set()
    interrupted: KeyboardInterrupt | None = None
    with preserved_state():
        torch.manual_seed(seed)
        try:
            for i, (sig, func, snap, paths) in enumerate(items):
                devices.add(sig.device)
                obs = None
                if sig.kind in (OpKind.COMPUTE, OpKind.RANDOM) and snap is not None and not sig.skip_reason:
                    cudnn = sig.device.startswith("cuda") and is_cudnn_op(func)
                    more = races.more_runs(sig, func, snap, reps) if races is not None else None
                    obs = _replayed(replay_fn, func, snap, reps, cudnn, more)
                f = make_finding(sig, obs, recorded_in=paths)
                if sig.checked_calls and obs is not None and f.verdict is not Verdict.SKIPPED:
                    # Value-dependent op: its other captured calls, each replayed like the first.
                    extra = (det_further if paths == (DETERMINISTIC_PATH,) else further).get(sig.id, ())
                    f = over_calls(sig, f, [
                        (call, make_finding(sig, _replayed(replay_fn, func, s, reps, cudnn,
                                                           races.more_runs(sig, func, s, reps) if races else None),
                                            recorded_in=paths))
                        for call, s in extra])
                if sig.kind is OpKind.UNINITIALIZED and snap is not None:
                    f = _with_fill_timing(f, func, snap, reps)
                if not timings:
                    f = _with(f, time_default_us=None, time_deterministic_us=None)
                if kb is not None:
                    # After the timings are dropped, so that --no-timing keeps the remedy text stable too.
                    f = _with(f, remedy=kb.remedy(f))
                if sig.capture_needed and not f.remedy:
                    mib = -(-sig.capture_needed // 2**20)
                    f = _with(f, remedy=f"not replayed: its inputs did not fit in the capture budget; "
                                        f"--capture-budget {mib} (MiB) would have held them")
                findings.append(f)
                if on_progress is not None:
                    on_progress(Progress(i + 1, len(items), sig.op))
        except KeyboardInterrupt as e:
            interrupted = e
    report = assemble(rec, findings, reps=reps, seed=seed, settings=settings, devices=devices,
                      complete=complete and interrupted is None, run_checks=tuple(run_checks),
                      total_calls=recorded_calls(rec, items))
    if interrupted is not None:
        interrupted.report = report  # type: ignore[attr-defined]
        raise interrupted
    return report


def assemble(rec: Recorder, findings: list[Finding], *, reps: int, seed: int, settings: dict | None,
             devices: set[str], complete: bool = True, run_checks: tuple[RunCheck, ...] = (),
             total_calls: int | None = None) -> Report:
    """Build the :class:`Report` around classified findings (``total_calls``: :func:`recorded_calls`, else the
    recording's own count)."""
    accel = sorted(d for d in devices if d != "cpu")
    env = fingerprint(accel[0] if accel else "cpu")
    uninit = [f for f in findings if f.verdict is Verdict.UNINITIALIZED]
    timed = [f for f in uninit if f.time_default_us is not None and f.time_deterministic_us is not None]
    fill_cost = sum((f.time_deterministic_us - f.time_default_us) * f.calls for f in timed) * 1e-6 if timed else None
    warnings = environment_warnings(devices, sum(f.calls for f in uninit), fill_cost)
    if rec.strict_refusals:
        ops = ", ".join(f"{op} ({n}x)" for op, n in sorted(rec.strict_refusals.items()))
        warnings.append(f"the script turned on torch.use_deterministic_algorithms(True) itself, and it refused {ops}: "
                        "each such call ran its nondeterministic kernel, as warn_only=True would, so that the "
                        "run could go on (see the raises findings); without opaudit the first of them ends the run")
    children = rec.children
    if children.warning():
        warnings.append(children.warning())
    all_settings = {"reps": reps, "seed": seed, "capture_budget_mib": rec.capture_budget // 2**20}
    if rec.captures_per_signature != DEFAULT_CAPTURES_PER_SIGNATURE:
        all_settings["captures_per_signature"] = rec.captures_per_signature
    short = [f for f in findings if f.calls_not_checked]
    if short:
        warnings.append(f"{len(short)} value-dependent signature(s) were replayed on fewer of their calls than "
                        f"captures_per_signature ({rec.captures_per_signature}) allows: the capture budget could not "
                        "hold the others, or their replay failed (see calls_not_checked); "
                        "a larger --capture-budget checks more calls")
    if children.forked:
        all_settings["child_processes"] = {"forked": children.forked, "recorded": children.recorded}
    all_settings.update(settings or {})
    return Report(
        environment=env, settings=all_settings, all_findings=sort_findings(findings),
        view_calls=rec.view_calls, total_calls=rec.total_calls if total_calls is None else total_calls,
        complete=complete,
        env_warnings=tuple(warnings), run_checks=run_checks, compiled=rec.compiled(),
    )
