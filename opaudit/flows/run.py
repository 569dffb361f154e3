"""One audit run: the recordings of the user's code, the run check, the replay, and the teardown.

The run owns everything an audit sets up and must take down again (the shape of
``FlopCounterMode``, which enters, counts and tears down itself): the recorders
and the inputs they captured, the whole-step check made before them, the worker
process of ``--isolate``, and the partial report when an interrupt or SIGTERM
cuts the run short. Whoever calls it (the command line, :func:`audit`, the
training-loop callbacks, each rank of a torchrun job) says what to run and reads
the result:

>>> with AuditRun(RunOptions(reps=5), root=target.root) as run:
...     run.record_target(target, window)      # both recordings, nothing replayed yet
...     report = run.report()

:func:`run_audit` is that sequence for a script or entry function, with the run
check first. Recording without replaying (to keep the captures) is
:meth:`AuditRun.record_target` alone: :attr:`AuditRun.recorder` and
:attr:`AuditRun.deterministic` then hold what was recorded until :meth:`AuditRun.close`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from opaudit.data.catalog import Catalog
from opaudit.data.errors import interruption
from opaudit.data.report import Report, RunCheck
from opaudit.engine import loader
from opaudit.engine.contention import CpuWatch
from opaudit.engine.detpath import PathRecorder
from opaudit.engine.environment import fingerprint
from opaudit.engine.globalstate import preserved_state, set_deterministic
from opaudit.engine.loader import Target
from opaudit.engine.record import DEFAULT_CAPTURE_BUDGET, DEFAULT_CAPTURES_PER_SIGNATURE, Recorder
from opaudit.engine.window import Recorded, Window, WindowError, run_target
from opaudit.flows.pipeline import DEFAULT_REPS, Progress, build_report
from opaudit.flows.races import DEFAULT_SECONDS as DEFAULT_RACE_SECONDS
from opaudit.flows.races import RaceReplay, catalog_race_ops, shipped_race_ops

INFO, NOTE, WARNING = "info", "note", "warning"
"""The kinds of :meth:`Hooks.say`: ``info`` is what was recorded (a quiet caller drops
it), ``note`` and ``warning`` are always shown."""


class Hooks:
    """What the caller of an :class:`AuditRun` hears while it goes; every method does nothing here."""

    def say(self, kind: str, text: str) -> None:
        """A message for the user (``kind``: :data:`INFO`, :data:`NOTE` or :data:`WARNING`)."""

    def run_check(self, mode: str, i: int, runs: int) -> None:
        """Run ``i`` of ``runs`` of the whole-step check in ``mode`` starts."""

    def run_check_done(self) -> None:
        """The whole-step check ended (or failed)."""

    def replayed(self, progress: Progress) -> None:
        """One more signature was replayed and classified."""

    def replay_done(self) -> None:
        """Replay ended (or was interrupted); what follows is the distributed exchange, if any."""


@dataclass(frozen=True)
class RunOptions:
    """How an audit run records and replays (which code it runs is given to :class:`AuditRun`)."""

    reps: int = DEFAULT_REPS
    """Replays per mode of each signature."""
    seed: int = 0
    """Seed set before the user's code and before the replays."""
    capture_budget: int = DEFAULT_CAPTURE_BUDGET
    """Bytes of captured inputs each recording may hold."""
    captures_per_signature: int = DEFAULT_CAPTURES_PER_SIGNATURE
    """Captures kept per signature of a value-dependent op (see :class:`~opaudit.engine.record.Recorder`)."""
    deterministic_pass: bool = True
    """Also record what ``use_deterministic_algorithms(True)`` runs (see
    :func:`~opaudit.flows.pipeline.merge_recordings`). Never under torchrun: collectives would run twice."""
    run_check: int | None = None
    """Runs per mode of the whole-step check (:mod:`opaudit.flows.runcheck`); ``None``: no check."""
    fresh_processes: bool = False
    """Make each run of the whole-step check a process of its own, compared through traces
    (:mod:`opaudit.flows.trace.fresh`)."""
    isolate: bool = False
    """Replay in a worker process (:class:`~opaudit.engine.isolate.Isolator`)."""
    op_timeout: float | None = None
    """Seconds one signature's replay may take (implies ``isolate``)."""
    timings: bool = True
    """Keep the replays' timings in the report (off: byte-stable reports)."""
    remedies: bool = True
    """Attach the knowledge base's remedies to findings."""
    race_seconds: float = DEFAULT_RACE_SECONDS
    """Seconds the further runs of a race-prone op may take per captured call (see :mod:`opaudit.flows.races`);
    0: none. Without ``timings`` a count the inputs' size fixes takes its place (byte-stable reports)."""
    race_catalog: Catalog | None = None
    """A catalog (``--against``) whose ``diverges`` ops, if it was made on this kind of machine, race here too."""


class AuditRun:
    """One audit: records, replays, classifies, and releases everything it held when closed.

    ``root`` is the folder source sites are reported relative to (the script's).
    ``distributed`` is this rank's :class:`~opaudit.flows.distributed.rank.RankAudit`
    under torchrun (the run then captures collectives, makes no deterministic-mode
    recording, and merges the ranks' reports on rank 0). ``hooks`` hears what the
    run has to tell, and how far it got (see :class:`Hooks`).
    """

    def __init__(self, options: RunOptions | None = None, *, root: str | None = None, distributed: Any = None,
                 hooks: Hooks | None = None) -> None:
        self.options = options or RunOptions()
        self.root = root
        self.distributed = distributed
        self.hooks = hooks or Hooks()
        self._say = self.hooks.say
        self.recorder: Recorder | None = None
        """The default-mode recording (what is replayed)."""
        self.deterministic: Recorder | None = None
        """The recording made in deterministic mode, if one was made."""
        self.recorded: Recorded | None = None
        """Which steps of the target the default-mode recording holds (``None``: cut short, or not a target)."""
        self.run_checks: tuple[RunCheck, ...] = ()
        self.cut: KeyboardInterrupt | None = None
        """The interrupt (Ctrl-C, SIGTERM) that stopped the user's code while it was recorded, if any:
        the report is then partial, and says so."""
        self.threads_left: tuple[str, ...] = ()
        """Threads the user's code started that still run (replays then happen in a spawned worker)."""
        self.settings: dict[str, Any] = {}
        """What this run adds to the report's settings."""
        self._isolator: Any = None
        self._recording: Recorder | None = None

    # -- context --------------------------------------------------------------
    def __enter__(self) -> AuditRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop any recording still open, stop the replay worker, and drop every captured input."""
        try:
            self.end()
        finally:
            isolator, self._isolator = self._isolator, None
            try:
                if isolator is not None:
                    isolator.close()
            finally:
                for rec in (self.recorder, self.deterministic):
                    if rec is not None:
                        rec.release()

    def _new_recorder(self, **kwargs: Any) -> Recorder:
        o = self.options
        return Recorder(capture_budget=o.capture_budget, root=self.root,
                        captures_per_signature=o.captures_per_signature, **kwargs)

    def _path_recorder(self, default: Recorder, *, same_run: bool) -> PathRecorder:
        o = self.options
        return PathRecorder(default, same_run=same_run, capture_budget=o.capture_budget, root=self.root,
                            captures_per_signature=o.captures_per_signature)

    # -- the whole-step check ----------------------------------------------------
    def check_runs(self, target: Target, window: Window) -> tuple[RunCheck, ...]:
        """Run the whole-step check (``options.run_check`` runs per mode) before anything is recorded.

        Before, so that no recorder's captured inputs are held meanwhile.
        """
        from opaudit.flows.runcheck import run_checks

        runs = self.options.run_check or 2
        on_run = self.hooks.run_check
        if self.distributed is not None:
            on_run = self.distributed.before_run(on_run)
        try:
            if self.options.fresh_processes:
                from opaudit.flows.trace.fresh import fresh_run_checks

                self.run_checks = fresh_run_checks(target, runs, seed=self.options.seed, window=window, on_run=on_run)
            else:
                self.run_checks = run_checks(target, runs, seed=self.options.seed, window=window, on_run=on_run)
        finally:
            self.hooks.run_check_done()
        self.settings["run_check"] = runs
        if self.options.fresh_processes:
            self.settings["fresh_processes"] = True
        return self.run_checks

    # -- recording ------------------------------------------------------------------
    def record_target(self, target: Target, window: Window) -> Recorded | None:
        """Run ``target`` through ``window``, recorded (in deterministic mode too, unless the options say not).

        The default-mode recording captures the window's inputs. Deterministic
        mode is recorded over as many steps again of the same run, right after
        the window (:class:`~opaudit.engine.detpath.PathRecorder`: only what it
        calls, and where from): the script runs once, its unrecorded prefix too.
        A script with no step after the window (no optimizer step, ``--steps
        all``, a time limit, a script that ends there) is run once more, from a
        fresh load, for that recording. An interrupt while the user's code runs
        stops the recording there (see :attr:`cut`); what was recorded until then
        is still audited. The user's code failing raises the loader's errors
        (after the window: a warning, and no deterministic-mode recording).
        Nothing is replayed yet.
        """
        o = self.options
        if self.distributed is not None and self.run_checks:
            self.distributed.fresh_start()  # the run check's runs are gone on every rank before this one starts
        rec = self.recorder = self._new_recorder(capture_collectives=self.distributed is not None)
        recording = self.distributed.recording(rec) if self.distributed is not None else (lambda: rec)
        det = None
        if o.deterministic_pass and self.distributed is None:
            det = self.deterministic = self._path_recorder(rec, same_run=True)
        recorded = again = failure = None
        try:
            recorded = run_target(target, recording, window, seed=o.seed,
                                  then=(lambda: _in_deterministic_mode(det)) if det is not None else None,
                                  on_last_step=rec.mark_step if det is not None else None)
        except KeyboardInterrupt as e:
            # Ctrl-C (or SIGTERM) while the user's code runs: recording stops there, and
            # what was recorded is still audited (a second interrupt stops that too).
            self.cut = e
            if self.distributed is not None:
                raise  # a rank's partial audit is not the job's report: torchrun is ending the job
        if recorded is not None and det is not None:
            failure = recorded.then_error
            if failure is None and not recorded.then_steps and target.entry is None:
                det.release()
                det = self.deterministic = self._path_recorder(rec, same_run=False)
                try:
                    again = run_target(target, lambda: _in_deterministic_mode(det), window, seed=o.seed,
                                       keep_module=False)
                except WindowError:
                    det = None
                except (loader.UserCodeError, loader.ScriptExitError) as e:
                    failure = str(e)
                except KeyboardInterrupt as e:
                    self.cut = e
        if self.deterministic is not None and (failure is not None or self.cut is not None or det is None):
            self.deterministic.release()
            self.deterministic = None
        if failure is not None:
            self._say(WARNING, f"the run in deterministic mode failed ({failure}); the crash list comes from "
                               "the default-mode recording")
        self.recorded = recorded
        if recorded is not None:
            self._say(INFO, recorded.describe(then="in deterministic mode"))
        # A script run twice: what either run left behind is said once.
        boxes = [r.sandbox for r in (recorded, again) if r is not None and r.sandbox is not None]
        self.threads_left = tuple(sorted({name for box in boxes for name in box.threads_left}))
        for note in dict.fromkeys(note for box in boxes for note in box.notes):
            self._say(NOTE, note)
        self.settings.update({"script": target.name, "entry": target.entry or "__main__", "timing": o.timings,
                              "recorded": recorded.span if recorded is not None else "cut short",
                              "deterministic_pass": self.deterministic is not None})
        if self.cut is not None:
            self.settings["recording_cut_short"] = interruption(self.cut)
        return recorded

    def record_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Record one call of ``fn(*args, **kwargs)`` (and, with the deterministic pass, one more); its result.

        The deterministic-mode call comes second, under
        ``use_deterministic_algorithms(True)``, recorded light
        (see :class:`~opaudit.engine.detpath.PathRecorder`); the global RNG states
        are put back after it as the first call left them.
        """
        if self.root is None:
            code = getattr(fn, "__code__", None)
            if code is not None:
                self.root = os.path.dirname(os.path.abspath(code.co_filename))
        self.settings["entry"] = getattr(fn, "__qualname__", repr(fn))
        self.recorder = self._new_recorder()
        with self.recorder:
            result = fn(*args, **kwargs)
        if self.options.deterministic_pass:
            self.deterministic = self._path_recorder(self.recorder, same_run=True)
            with _in_deterministic_mode(self.deterministic):
                fn(*args, **kwargs)
            self.settings["deterministic_pass"] = True
        return result

    def begin(self, *, mid_run: bool = False) -> None:
        """Start recording in default mode, for a caller that runs the steps itself (a training-loop callback).

        ``mid_run``: the run is under way (its model built and run before), so nothing recorded is setup.
        """
        if self._recording is None:
            self.recorder = self._recording = self._new_recorder()
            self._recording.sites.opens_mid_run = mid_run
            self._recording.__enter__()

    def end(self) -> None:
        """Stop the recording :meth:`begin` started (nothing if none runs)."""
        rec, self._recording = self._recording, None
        if rec is not None:
            rec.__exit__(None, None, None)

    # -- replay -----------------------------------------------------------------------
    def report(self, settings: dict[str, Any] | None = None) -> Report | None:
        """Replay and classify what was recorded: the :class:`Report` (``None`` on a rank other than 0).

        ``settings`` are added to the report's. A ``KeyboardInterrupt`` during
        replay propagates with the partial report (``complete: false``) attached
        as its ``report`` attribute.
        """
        self.end()
        rec = self.recorder
        if rec is None:
            raise WindowError("nothing was recorded")
        o = self.options
        all_settings = dict(self.settings)
        if o.isolate or o.op_timeout:
            from opaudit.engine.isolate import Isolator

            # Forking while another thread may hold a lock (torch's, the allocator's,
            # the GIL's bookkeeping) can leave the worker blocked for ever.
            self._isolator = Isolator(rec, timeout=o.op_timeout, start_method="spawn" if self.threads_left else None)
            all_settings["isolate"] = self._isolator.start_method
            if o.op_timeout:
                all_settings["op_timeout_s"] = o.op_timeout
        if self.threads_left:
            left = self.threads_left
            self._say(NOTE, f"{len(left)} thread(s) the script started still run ({', '.join(left[:3])}); "
                      + ("replaying in a spawned worker, which they cannot touch" if self._isolator is not None else
                         "if they run torch ops or change torch settings, replays can be disturbed: use --isolate"))
        all_settings.update(settings or {})
        watch = CpuWatch()
        try:
            with watch:
                report = build_report(rec, reps=o.reps, seed=o.seed, settings=all_settings, timings=o.timings,
                                      remedies=o.remedies, on_progress=self.hooks.replayed, replay_fn=self._isolator,
                                      run_checks=self.run_checks, complete=self.cut is None,
                                      deterministic=self.deterministic, races=self._races(rec))
        finally:
            self.hooks.replay_done()
        contended = watch.contended(torch.get_num_threads())
        if contended is not None:
            if o.timings:
                report = dataclasses.replace(report, env_warnings=(*report.env_warnings, contended))
            else:  # measured, so never in a byte-stable report
                self._say(WARNING, contended)
        if self.distributed is not None:
            return self.distributed.finish(report, rec, reps=o.reps)
        return report


    def _races(self, rec: Recorder) -> RaceReplay | None:
        """How this run replays race-prone signatures further (``None``: it does not)."""
        o = self.options
        if o.race_seconds <= 0:
            return None
        here = fingerprint()
        device = "cuda" if any(s.device.startswith("cuda") for s in rec.signatures()) else "cpu"
        ops = shipped_race_ops(here, device)
        if o.race_catalog is not None:
            ops |= catalog_race_ops(o.race_catalog, here, device)
        return RaceReplay(seconds=o.race_seconds if o.timings else None, ops=ops)


@dataclass(frozen=True)
class Outcome:
    """What :func:`run_audit` made."""

    report: Report | None
    """The report (partial when :attr:`cut`); ``None`` on a torchrun rank other than 0."""
    cut: KeyboardInterrupt | None
    """The interrupt that stopped the user's code while it was recorded, if any."""


def run_audit(target: Target, window: Window, options: RunOptions | None = None, *, distributed: Any = None,
              hooks: Hooks | None = None) -> Outcome:
    """Audit ``target``: the run check if asked, both recordings of ``window``, replay and classification.

    The user's code failing raises the loader's errors; an interrupt during
    replay propagates with the partial report attached (see :meth:`AuditRun.report`).
    """
    options = options or RunOptions()
    # The script's own global torch settings (Trainer(deterministic=True) turns strict mode on, threads,
    # grad mode, cuDNN and TF32 flags) end with the audit, as they would with the script's process; the
    # report's environment, assembled inside, still names the ones it ran with.
    with preserved_state(), AuditRun(options, root=target.root, distributed=distributed, hooks=hooks) as run:
        if options.run_check:
            run.check_runs(target, window)
        run.record_target(target, window)
        return Outcome(run.report(), run.cut)


def audit(fn: Callable[..., Any], *args: Any, reps: int = DEFAULT_REPS, seed: int = 0,
          capture_budget: int = DEFAULT_CAPTURE_BUDGET, deterministic_pass: bool = False,
          captures_per_signature: int = DEFAULT_CAPTURES_PER_SIGNATURE, **kwargs: Any) -> Report:
    """Record one call of ``fn(*args, **kwargs)`` and return its audit :class:`Report`.

    ``reps``, ``seed``, ``capture_budget``, ``deterministic_pass`` and
    ``captures_per_signature`` are opaudit's own options; every other keyword goes to ``fn``.

    With ``deterministic_pass=True``, ``fn`` is **called twice**: as usual, then
    once more under ``torch.use_deterministic_algorithms(True)``,
    where only what it calls, and from where, is recorded (the global RNG states
    are put back after it as the first call left them). As the command line
    does, the report then says which recording called each op (``recorded_in``),
    and :meth:`Report.crashes` leaves out the ops that only the default-mode path
    calls. It is off by default because a step usually changes state (an
    optimizer step, a counter, a data iterator): the second call starts from what
    the first left. Use it when ``fn`` can be called twice, or when its code
    branches on ``torch.are_deterministic_algorithms_enabled()``.
    """
    options = RunOptions(reps=reps, seed=seed, capture_budget=capture_budget, deterministic_pass=deterministic_pass,
                         captures_per_signature=captures_per_signature, timings=True)
    with AuditRun(options) as run:
        run.record_call(fn, *args, **kwargs)
        report = run.report()
    assert report is not None
    return report


@contextmanager
def _in_deterministic_mode(rec: Recorder) -> Iterator[Recorder]:
    """``rec`` recording under ``use_deterministic_algorithms(True)``, its warnings silenced; every flag (and
    the RNG states) put back afterwards.

    Strict, not ``warn_only``: code reads that flag too (on CUDA, which attention kernel
    ``scaled_dot_product_attention`` chooses), and what deterministic mode calls is what
    ``use_deterministic_algorithms(True)`` calls. An op strict mode refuses does not end the
    run: ``rec``'s dispatch mode, entered with the flag, runs that call with the setting off
    (:mod:`opaudit.engine.mode`), and records it as called.
    """
    with preserved_state(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        set_deterministic(True)
        with rec:
            yield rec
