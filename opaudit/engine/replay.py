"""Replay: run one captured op under each determinism mode and compare the bits.

For one signature, on its captured inputs (those the op writes cloned afresh for
every run; it cannot change the others) and with the same RNG state restored
before every run:

* **strict**: once under ``use_deterministic_algorithms(True)``: does it raise?
* **deterministic**: ``reps`` times with the setting on, the strict run first. An
  op that does not raise runs every time as ``use_deterministic_algorithms(True)``
  runs it; one that raises runs with ``warn_only=True`` (its nondeterministic
  kernel, as ``warn_only`` users get it). The bits are compared run to run.
* **warn_only**: the determinism warnings these runs raise. An op on an
  accelerator that did not raise also runs once with ``warn_only=True``: CUDA's
  flash and memory-efficient attention backward read that flag and take their
  nondeterministic branch under it (with a warning), the deterministic one under
  strict mode. On the CPU no kernel reads it but the alerts that strict mode
  raises, so that run would repeat a deterministic run and is not made.
* **default**: ``reps`` times with the setting off: do the bits differ run to run?
* on CUDA, cuDNN-backed ops also run under each ``cudnn.deterministic`` /
  ``cudnn.benchmark`` setting.

Global state (determinism flags, ``fill_uninitialized_memory``, RNG states, grad
mode, threads, cuDNN and TF32 flags, ``warn_always``) is restored after every replay
(:mod:`opaudit.engine.globalstate`). A script's own op is called through its live
registration (:func:`~opaudit.engine.optraits.live_op`).
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from opaudit.aten.bitwise import difference, differing_mask, fill_mask, flat_tensors, same_bits
from opaudit.aten.memory import zeroed_allocations
from opaudit.aten.portable import Reference, compare_expected
from opaudit.aten.tensors import Snapshot
from opaudit.data.errors import OpauditError
from opaudit.data.observation import Crossing, Observation, RunStats, Unwritten, error_text
from opaudit.engine.globalstate import (
    OP_FAILURES,
    alert_kind,
    exits_fail_the_op,
    failure_text,
    is_determinism_warning,
    preserved_state,
    set_deterministic,
    stderr_captured,
)
from opaudit.engine.optraits import live_op

NOT_REGISTERED = "the op is no longer registered (the script let go of the library that defined it)"
"""Why an op the script defined and then let go of cannot be replayed (see :func:`~opaudit.engine.optraits.live_op`)."""


class ReplayError(OpauditError):
    """A replay could not be set up (not raised for ops that fail: those are observations)."""


class _Rng:
    """Saved RNG states for the CPU and the CUDA devices an op touches."""

    def __init__(self, devices: set[torch.device]) -> None:
        self.cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"}) if torch.cuda.is_available() else []
        self.cpu = torch.get_rng_state()
        self.gpu = [torch.cuda.get_rng_state(i) for i in self.cuda]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for i, s in zip(self.cuda, self.gpu):
            torch.cuda.set_rng_state(s, i)

    def advanced(self) -> bool:
        if not torch.equal(torch.get_rng_state(), self.cpu):
            return True
        return any(not torch.equal(torch.cuda.get_rng_state(i), s) for i, s in zip(self.cuda, self.gpu))


class _Timer:
    """Times one call; synchronises on CUDA so that kernel time is counted."""

    def __init__(self, devices: set[torch.device]) -> None:
        self.cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"}) if torch.cuda.is_available() else []

    def sync(self) -> None:
        for i in self.cuda:
            torch.cuda.synchronize(i)


def _outputs(result: Any, written: list[torch.Tensor]) -> list[Any]:
    leaves = flat_tensors(result)
    seen = {id(x) for x in leaves if isinstance(x, torch.Tensor)}
    return leaves + [t for t in written if id(t) not in seen]


def output_names(func: Any, result: Any, written: list[torch.Tensor]) -> list[str]:
    """Names of the outputs :func:`_outputs` lists, for reports.

    Returned values are ``output`` (or ``output 0``, ``output 1``... for several);
    inputs the op writes that it does not also return are ``input <name>``, named
    from the op's schema (``input self``).
    """
    leaves = flat_tensors(result)
    seen = {id(x) for x in leaves if isinstance(x, torch.Tensor)}
    names = ["output"] if len(leaves) == 1 else [f"output {i}" for i in range(len(leaves))]
    schema = getattr(func, "_schema", None)
    writes = [a.name for a in getattr(schema, "arguments", ()) if a.alias_info is not None and a.alias_info.is_write]
    extra = [t for t in written if id(t) not in seen]
    if len(writes) != len(written):
        writes = [str(i) for i in range(len(written))]
    by_id = {id(t): name for t, name in zip(written, writes)}
    return names + [f"input {by_id.get(id(t), '?')}" for t in extra]


def _generator_states(args: tuple, kwargs: dict) -> list[tuple[torch.Generator, torch.Tensor]]:
    gens = [x for x in (*args, *kwargs.values()) if type(x) is torch.Generator]
    return [(g, g.get_state()) for g in gens]


@dataclass(frozen=True)
class MoreRuns:
    """More runs for an op whose nondeterminism is a race, after the first ``reps`` per mode found none.

    A race shows only when threads (or atomics) really overlap: on a busy machine a
    handful of runs can all agree. The replay then goes on, one run per mode at a
    time, until a run differs, each mode has had ``runs``, or ``seconds`` have passed
    (``None``: the count alone decides, for byte-stable reports).
    """

    runs: int
    """Runs per mode to reach, the first ``reps`` included."""
    seconds: float | None = None
    """Time the further runs of one replay may take, both modes together."""


class _Series:
    """Runs of one op in one mode, each compared bitwise with the first, output by output."""

    def __init__(self, func: Any, snap: Snapshot, rng: _Rng, timer: _Timer) -> None:
        self.func, self.snap, self.rng, self.timer = func, snap, rng, timer
        self.runs = 0
        self.differing = 0
        self.max_diff = 0.0
        self.max_frac = 0.0
        self.times: list[float] = []
        self.rng_used = False
        self.masks: dict[int, torch.Tensor | None] = {}
        """Output index → elements that differed from the first run in any run (``None``: not
        comparable element by element, e.g. another shape)."""
        self.names: list[str] = []
        self.first: list[Any] = []
        """The first run's outputs."""

    @property
    def diverges(self) -> bool:
        return self.differing > 0

    def run(self) -> bool:
        """One more run; whether its bits differ from the first run's."""
        func = self.func
        args, kwargs, written = self.snap.materialize()
        generators = _generator_states(args, kwargs)
        self.rng.restore()
        self.timer.sync()
        t0 = time.perf_counter()
        result = func(*args, **kwargs)
        self.timer.sync()
        self.times.append(time.perf_counter() - t0)
        if not self.rng_used and (self.rng.advanced() or any(not torch.equal(g.get_state(), s) for g, s in generators)):
            self.rng_used = True
        outs = _outputs(result, written)
        self.runs += 1
        if self.runs == 1:
            self.first, self.names = outs, output_names(func, result, written)
            return False
        first, masks = self.first, self.masks
        if len(outs) != len(first):
            self.differing += 1
            self.max_diff, self.max_frac = float("inf"), 1.0
            masks.update(dict.fromkeys(range(len(first))))
            return True
        run_differs, changed, total = False, 0, 0
        for i, (a, b) in enumerate(zip(first, outs)):
            n = a.numel() if isinstance(a, torch.Tensor) else 1
            total += n
            if same_bits(a, b):
                continue
            run_differs = True
            d = difference(a, b)
            changed += d.elements_differing
            self.max_diff = max(self.max_diff, d.max_abs_diff)
            comparable = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                          and a.shape == b.shape and a.dtype == b.dtype)
            if comparable and masks.get(i, 0) is not None:
                m = differing_mask(a, b)
                masks[i] = m if i not in masks else masks[i] | m
            else:
                masks[i] = None
        if run_differs:
            self.differing += 1
            self.max_frac = max(self.max_frac, changed / total if total else 1.0)
        return run_differs

    @property
    def stats(self) -> RunStats:
        median = statistics.median(self.times) if self.times else None
        outputs = tuple(self.names[i] for i in sorted(self.masks) if i < len(self.names))
        return RunStats(self.runs, self.differing, self.max_diff, self.max_frac, median, outputs)


def _runs(func: Any, snap: Snapshot, reps: int, rng: _Rng, timer: _Timer) -> _Series:
    """``reps`` runs compared bitwise with the first, output by output."""
    series = _Series(func, snap, rng, timer)
    for _ in range(reps):
        series.run()
    return series


def _more_runs(det: _Series, default: _Series, more: MoreRuns, sink: list[str]) -> None:
    """Pairs of runs (deterministic mode, then default mode) until one differs or ``more`` says stop."""
    start = time.perf_counter()
    with stderr_captured(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            while default.runs < more.runs:
                if more.seconds is not None and time.perf_counter() - start >= more.seconds:
                    break
                set_deterministic(True)  # only ops that did not raise get here
                det_differs = det.run()
                set_deterministic(False)
                if default.run() or det_differs:
                    break
        finally:
            set_deterministic(False)


def _never_written(filled_outs: list[Any], default: _Series, floating_only: bool,
                   ref_outs: list[Any] | None = None) -> tuple[Unwritten, ...]:
    """The outputs' never-written regions, if they hold every element that differed between default runs.

    ``filled_outs`` are the outputs of a deterministic-mode run with
    ``fill_uninitialized_memory`` on: memory the kernel allocates and never writes
    holds the fill value there (NaN, or an integer dtype's largest value). An
    element that differed between default runs but was written (a race over
    colliding indices) holds a real value there, and the op keeps its divergence:
    ``()``. With ``floating_only``, an output counts as partly unwritten also when
    its default runs agreed (the garbage happened to repeat) but it holds NaN only
    in ``filled_outs``: NaN is a fill nobody computes by accident; an integer
    maximum could be. ``ref_outs`` (default: the first default run's outputs) are what
    the NaNs are looked for in.
    """
    if any(m is None for m in default.masks.values()):
        return ()
    refs = default.first if ref_outs is None else ref_outs
    found = []
    for i, out in enumerate(filled_outs):
        mask = default.masks.get(i)
        ref = refs[i] if i < len(refs) else None
        if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor) or out.shape != ref.shape:
            if mask is not None:
                return ()
            continue
        if mask is None and (not floating_only or not (out.is_floating_point() or out.is_complex())):
            continue
        if mask is None and same_bits(out, ref):
            continue  # the same bits hold the fill value in the same places: none is new
        filled = fill_mask(out)
        if mask is not None and bool((mask & ~filled).any()):
            return ()
        if mask is None and not bool((filled & ~fill_mask(ref)).any()):
            continue
        found.append(Unwritten(default.names[i], int(filled.sum()), filled.numel()))
    if any(i >= len(filled_outs) for i in default.masks):
        return ()
    return tuple(found)


def _fill_repeated(filled_outs: list[Any], default: _Series) -> bool:
    """Whether a floating output the default runs agreed on holds NaN wherever the filled run does."""
    for i, out in enumerate(filled_outs):
        ref = default.first[i] if i < len(default.first) else None
        if (default.masks.get(i) is None and isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)
                and out.shape == ref.shape and (out.is_floating_point() or out.is_complex())):
            filled = fill_mask(out)
            if bool(filled.any()) and not bool((filled & ~fill_mask(ref)).any()):
                return True
    return False


_SCRUB_BYTES = 256 * 2**20
"""The most memory :func:`_scrubbed_run` takes at once."""


def _scrubbed_run(func: Any, snap: Snapshot, rng: _Rng, like: list[Any], copies: int) -> list[Any] | None:
    """One default-mode run on zeroed memory, as far as the allocator lets that be had.

    A new block is mostly the one of its size freed last (glibc's per-thread cache,
    the CUDA caching allocator): taking, zeroing and freeing ``copies`` blocks of each
    size of ``like``'s storages (fewer if that would pass :data:`_SCRUB_BYTES`) leaves
    the most recently freed ones holding zeros, not what earlier runs left. A process
    that replayed long (its heap split into many freed blocks of that size) can still
    hand out another: on the CPU, glibc then carves it zeroed
    (:func:`~opaudit.aten.memory.zeroed_allocations`).
    """
    sizes = [(t.untyped_storage().nbytes(), t.device) for t in like if isinstance(t, torch.Tensor)
             and t.layout == torch.strided]
    copies = min(copies, _SCRUB_BYTES // max(1, sum(n for n, _ in sizes)))
    try:
        scratch = [torch.zeros(n, dtype=torch.uint8, device=d) for n, d in sizes for _ in range(copies)]
    except (RuntimeError, MemoryError):  # out of memory: the run goes on unscrubbed
        scratch = []
    del scratch
    set_deterministic(False)
    with zeroed_allocations():
        return _one_run(func, snap, rng)  # ``None``: no second look, the first stands


def _filled_run(func: Any, snap: Snapshot, rng: _Rng) -> list[Any] | None:
    """The outputs of one run in deterministic mode with ``fill_uninitialized_memory`` on."""
    from torch.utils import deterministic as det_utils

    det_utils.fill_uninitialized_memory = True
    set_deterministic(True)  # only ops that did not raise get here
    return _one_run(func, snap, rng)  # ``None``: no filled run, no excuse, a divergence stands


def _one_run(func: Any, snap: Snapshot, rng: _Rng) -> list[Any] | None:
    """The outputs of one run in the mode set now, its warnings ignored; ``None`` if the op fails."""
    try:
        args, kwargs, written = snap.materialize()
        rng.restore()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _outputs(func(*args, **kwargs), written)
    except OP_FAILURES:
        return None


def _warn_only_run(func: Any, snap: Snapshot, rng: _Rng, timer: _Timer) -> None:
    """One run under the flags in force, for the warnings it raises (the caller collects them); its bits are not
    compared: they are the ``warn_only`` branch's, not the deterministic series'.

    If it fails (the nondeterministic branch can need more memory than the deterministic
    one), the runs that did succeed still stand: it adds nothing but its warnings.
    """
    try:
        args, kwargs, _ = snap.materialize()
        rng.restore()
        func(*args, **kwargs)
        timer.sync()
    except Exception:  # see the docstring; SystemExit and Ctrl-C still end the replay
        pass


@dataclass
class _Strict:
    """What the strict run raised, if it raised: kept when a later run fails the replay."""

    kind: str | None = None
    error: str | None = None


def _deterministic_series(func: Any, snap: Snapshot, reps: int, rng: _Rng, timer: _Timer,
                          sink: list[str], strict: _Strict) -> _Series:
    """The strict run (its failure goes to ``strict``), then the rest of the deterministic-mode series (see
    the module's docstring); the determinism warnings they raise are added to ``sink``."""
    det = _Series(func, snap, rng, timer)
    # TORCH_WARN_ONCE warns once per process (CUDA attention's warn_only warning): the step,
    # or an earlier replay, may have used it up.
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with stderr_captured(sink), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            set_deterministic(True)
            try:
                det.run()
            except OP_FAILURES as e:  # an op's own failure is an observation
                strict.kind = alert_kind(str(e))
                strict.error = str(e).strip() if isinstance(e, Exception) else failure_text(e)
                det = _Series(func, snap, rng, timer)
            set_deterministic(True, warn_only=strict.kind is not None)
            while det.runs < reps:
                det.run()
            if len(det.times) > 1:
                # The series' first run is the op's first here (caches, allocator, lazy init): its time
                # would weigh on the cost of deterministic mode against default runs that all come after.
                det.times.pop(0)
            if strict.kind is None and any(d.type != "cpu" for d in snap.devices):
                set_deterministic(True, warn_only=True)
                _warn_only_run(func, snap, rng, timer)
    finally:
        torch.set_warn_always(warn_always)
    for w in caught:
        msg = str(w.message)
        if is_determinism_warning(msg) and msg not in sink:
            sink.append(msg)
    return det


def replay(func: Any, snap: Snapshot, reps: int = 5, *, cudnn_variants: bool = False,
           reference: Reference | None = None, more: MoreRuns | None = None) -> Observation:
    """Replay ``func`` on ``snap`` (written inputs cloned afresh each run) under every mode. Never raises for op
    failures.

    With ``reference`` (what a capsule's source computed for this call), the first run of
    each mode is also compared with the source's outputs of that mode (``Observation.across``).
    With ``more``, an op whose ``reps`` runs per mode all agreed (and that raised,
    warned and drew nothing) is run further, as :class:`MoreRuns` says.
    """
    if reps < 1:
        raise ReplayError("reps must be at least 1")
    func = live_op(func)
    if func is None:
        return Observation(None, None, (), None, None, False, error=NOT_REGISTERED)
    devices = snap.devices
    with preserved_state(), _disable_current_modes(), torch.no_grad(), exits_fail_the_op():
        rng = _Rng(devices)
        timer = _Timer(devices)
        strict = _Strict()
        sink: list[str] = []
        from torch.utils import deterministic as det_utils

        fill_on = bool(det_utils.fill_uninitialized_memory)
        try:
            det = _deterministic_series(func, snap, reps, rng, timer, sink, strict)
            set_deterministic(False)
            default = _runs(func, snap, reps, rng, timer)
            across = _across(reference, {"deterministic": det, "default": default})
            if (more is not None and strict.kind is None and not sink and not det.diverges and not default.diverges
                    and not det.rng_used and not default.rng_used):
                _more_runs(det, default, more, sink)
            variants: list[tuple[str, RunStats]] = []
            if cudnn_variants:
                for d in (False, True):
                    for b in (False, True):
                        with torch.backends.cudnn.flags(enabled=True, deterministic=d, benchmark=b):
                            stats = _runs(func, snap, reps, rng, timer).stats
                        variants.append((f"cudnn.deterministic={d},benchmark={b}", stats))
            unwritten: tuple[Unwritten, ...] = ()
            default_stats = default.stats
            if strict.kind is None and not det.stats.diverges:
                # The deterministic runs filled never-written memory unless the user turned that off.
                filled = det.first if fill_on else (_filled_run(func, snap, rng) if default_stats.diverges else None)
                if filled is not None:
                    ref_outs = None
                    if fill_on and _fill_repeated(filled, default):
                        # The default runs came after the deterministic ones and may have been handed
                        # their freed memory, fill and all: NaN there says nothing. A default run on
                        # memory zeroed first tells never-written memory from a NaN the op computes.
                        ref_outs = _scrubbed_run(func, snap, rng, filled, 2 * reps + 2)
                    unwritten = _never_written(filled, default, floating_only=fill_on, ref_outs=ref_outs)
                if unwritten and default_stats.diverges:
                    # Everything that differed is memory the kernel never wrote: the rest is identical.
                    default_stats = RunStats(default_stats.runs, 0, 0.0, 0.0, default_stats.median_s)
        except OP_FAILURES as e:
            return Observation(strict.kind, strict.error, tuple(sink), None, None, False, error=failure_text(e))
        return Observation(strict.kind, strict.error, tuple(sink), default_stats, det.stats,
                           default.rng_used or det.rng_used, variants=tuple(variants), unwritten=unwritten,
                           across=across)


def _across(reference: Reference | None, runs: dict[str, _Series]) -> tuple[tuple[str, Crossing], ...]:
    """Each mode's first run against the source's outputs of that mode (modes the reference lacks left out)."""
    if reference is None:
        return ()
    out = []
    for mode in ("default", "deterministic"):
        expected = reference.modes.get(mode)
        if expected is not None:
            out.append((mode, compare_expected(expected, runs[mode].first, runs[mode].names)))
    return tuple(out)


@dataclass(frozen=True)
class ModeRun:
    """One run of an op in one mode, as :func:`replay` runs it: its outputs and their names, or its error."""

    outputs: list[Any]
    names: list[str]
    error: str = ""


def run_in_modes(func: Any, snap: Snapshot, modes: tuple[str, ...] = ("deterministic", "default")
                 ) -> tuple[dict[str, ModeRun], bool]:
    """One run of ``func`` on a fresh copy of ``snap`` in deterministic mode and one in default mode (or in
    the ``modes`` named), as the first run of each of :func:`replay`'s series runs; and whether it drew from an
    RNG.

    Deterministic mode is strict, or ``warn_only`` for an op that raises under strict
    mode, as :func:`replay` runs it. What a capsule stores as the source's outputs: a
    replay elsewhere compares its own first run of each mode with these. The global RNG
    state each run starts from is the one in force when this is called.
    """
    runs: dict[str, ModeRun] = {}
    rng_used = False
    func = live_op(func)
    if func is None:
        return {mode: ModeRun([], [], NOT_REGISTERED) for mode in modes}, False
    with preserved_state(), _disable_current_modes(), torch.no_grad():
        rng = _Rng(snap.devices)
        timer = _Timer(snap.devices)
        for mode, warn_only in (("deterministic", False), ("deterministic", True), ("default", True)):
            if mode in runs or mode not in modes:
                continue
            set_deterministic(mode == "deterministic", warn_only=warn_only)
            try:
                with stderr_captured([]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = _runs(func, snap, 1, rng, timer)
            except Exception as e:  # an op's own failure is what the capsule says
                if not warn_only:
                    continue  # strict mode refused it: its deterministic-mode run is warn_only's
                runs[mode] = ModeRun([], [], error_text(e))
                continue
            rng_used = rng_used or r.rng_used
            runs[mode] = ModeRun(r.first, r.names)
    return runs, rng_used


def time_fill(func: Any, snap: Snapshot, reps: int = 5) -> tuple[float, float] | None:
    """Seconds per call of an op returning uninitialized memory, with the determinism
    setting off and on (where ``fill_uninitialized_memory`` fills it).

    Only timed: the bits of uninitialized memory mean nothing. The two settings
    alternate run by run and each keeps its fastest run: an ``empty`` takes
    microseconds, and a median of runs taken in two separate bursts measured
    whatever else the machine was doing in each (a negative "cost" included).
    ``None`` if it fails.
    """
    from torch.utils import deterministic as det_utils

    best = [float("inf"), float("inf")]
    func = live_op(func)
    if func is None:
        return None
    with preserved_state(), _disable_current_modes(), torch.no_grad(), exits_fail_the_op():
        timer = _Timer(snap.devices)
        det_utils.fill_uninitialized_memory = True
        for _ in range(max(reps, 5)):
            for i, mode in enumerate((False, True)):
                set_deterministic(mode, warn_only=True)
                args, kwargs, _ = snap.materialize()
                timer.sync()
                t0 = time.perf_counter()
                try:
                    func(*args, **kwargs)
                except OP_FAILURES:  # timing is best effort
                    return None
                timer.sync()
                best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]
