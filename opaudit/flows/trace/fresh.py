"""``--run-check --fresh-processes K``: the whole-step check over K separate processes, through traces.

Inside one process some choices are made once and kept: cuDNN's benchmark mode
times its algorithms on first use and keeps the winner, Python's hash seed orders
sets of strings, allocations land at the addresses the allocator hands out, lazy
initialisations happen once. The in-process run check (:mod:`opaudit.flows.runcheck`)
re-runs the step in the same process, after those choices, so it cannot see a
difference they make. Here each run is a process of its own (``python -m opaudit
trace``, with this process's environment: an unset ``PYTHONHASHSEED`` is drawn anew
by each), run 1's trace is compared with each later run's
(:mod:`opaudit.flows.trace.compare`), and the outcome is a
:class:`~opaudit.data.runcheck.RunCheck`, reported as the run check's is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import torch

from opaudit.data.comparison import RankComparison
from opaudit.data.errors import OpauditError
from opaudit.data.runcheck import RunCheck
from opaudit.engine import loader
from opaudit.engine.window import Window
from opaudit.flows.runcheck import DETERMINISTIC, MODES
from opaudit.flows.trace.compare import compare_traces


class FreshProcessError(OpauditError):
    """The first fresh process could not run the step (the user's code failed there)."""


def trace_command(target: loader.Target, output: str, window: Window, seed: int, deterministic: bool) -> list[str]:
    """The ``opaudit trace`` command line that runs ``target`` through ``window`` in a new process."""
    cmd = [sys.executable, "-m", "opaudit", "trace", target.path, "-o", output, "-q", "--seed", str(seed),
           "--threads", str(torch.get_num_threads())]
    if target.entry is not None:
        cmd += ["--entry", target.entry]
    cmd += ["--steps", "all" if window.steps is None else str(window.steps), "--start-step", str(window.start)]
    if window.max_seconds is not None:
        cmd += ["--max-record-seconds", repr(window.max_seconds)]
    if deterministic:
        cmd.append("--deterministic")
    return [*cmd, "--", *target.argv]


def _run(cmd: list[str]) -> str | None:
    """Run one traced process; ``None``, or why it failed (its last line of stderr)."""
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, errors="replace")
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {proc.returncode}"
    return last.removeprefix("opaudit: error: ")


def _call_fields(call: Any) -> dict[str, Any]:
    return {"index": call.index_a, "op": call.op, "where": call.where, "function": call.function,
            "module": call.module, "phase": call.phase}


def run_check_of(mode: str, runs: int, calls: int, compared: list[tuple[int, RankComparison]],
                 errors: list[tuple[int, str]]) -> RunCheck:
    """The :class:`RunCheck` of run 1's trace against each later run's (``(run, comparison)``)."""
    root_cause = None
    roots = [(r.root_cause.index_a, k, r) for k, r in compared if r.root_cause is not None]
    firsts = [(r.first_difference.index_a, k, r) for k, r in compared if r.first_difference is not None]
    if roots:
        _, _, r = min(roots)
        root_cause = {**_call_fields(r.root_cause), "inputs_identical": True, "downstream": r.downstream}
        if firsts and min(firsts)[0] < r.root_cause.index_a:
            fd = min(firsts)[2].first_difference
            root_cause["first_difference"] = {"index": fd.index_a, "op": fd.op, "where": fd.where}
    elif firsts:
        _, _, r = min(firsts)
        root_cause = {**_call_fields(r.first_difference), "inputs_identical": False, "downstream": r.downstream}
    path_split = None
    for k, r in compared:
        if r.structural:
            s = r.structural[0]
            path_split = {"index": s.index_a, "runs": [1, k],
                          "ops": [s.only_a[0] if s.only_a else "(nothing)", s.only_b[0] if s.only_b else "(nothing)"],
                          "where": ["", ""]}
        elif r.parted is not None:
            path_split = {"index": r.parted.index_a, "runs": [1, k], "ops": r.parted.op.split(" vs ", 1),
                          "where": [r.parted.where, ""]}
        if path_split is not None:
            break
    mismatches: dict[str, str] = {}
    for k, r in compared:
        for name in r.final:
            mismatches.setdefault(name, f"{name} (its digest differs; run {k} vs run 1)")
    error = "; ".join(f"run {k}: {e}" for k, e in errors) or None
    differing = max((r.differing for _, r in compared), default=0)
    return RunCheck(mode=mode, runs=runs, ops=calls, differing_ops=differing,
                    reproducible=not (differing or mismatches or path_split or error),
                    root_cause=root_cause, path_split=path_split, mismatches=tuple(mismatches.values()),
                    error=error, compared=compared[0][1].final_compared if compared else None,
                    fresh_processes=True)


def fresh_run_checks(target: loader.Target, runs: int, *, seed: int = 0, window: Window,
                     modes: Iterable[str] = MODES, on_run: Callable[[str, int, int], None] | None = None
                     ) -> tuple[RunCheck, ...]:
    """Run ``target`` ``runs`` times per mode, each time in a new process, and compare run 1's trace with the others'.

    The first process failing raises :class:`FreshProcessError` with its message; a
    later one failing is the check's ``error``.
    """
    out = []
    with tempfile.TemporaryDirectory(prefix="opaudit-fresh-") as tmp:
        for mode in modes:
            paths: list[tuple[int, str]] = []
            errors: list[tuple[int, str]] = []
            for k in range(1, runs + 1):
                if on_run is not None:
                    on_run(mode, k, runs)
                path = os.path.join(tmp, f"{mode}-{k}.optrace")
                failed = _run(trace_command(target, path, window, seed, mode == DETERMINISTIC))
                if failed is None:
                    paths.append((k, path))
                elif k == 1:
                    raise FreshProcessError(f"--fresh-processes: run 1 ({mode} mode) failed: {failed}")
                else:
                    errors.append((k, failed))
            compared = []
            for k, path in paths[1:]:
                (r,) = compare_traces(paths[0][1], path).ranks
                compared.append((k, r))
                os.unlink(path)
            calls = compared[0][1].calls_a if compared else 0
            out.append(run_check_of(mode, runs, calls, compared, errors))
    return tuple(out)
