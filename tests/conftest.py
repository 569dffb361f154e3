"""Shared test setup: 2 intra-op threads (the races these tests measure need them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "opaudit", "examples")


def default_signals() -> None:
    """``preexec_fn`` of an opaudit process a test will signal: SIGINT, SIGTERM and SIGHUP at their defaults.

    opaudit keeps a signal it started with ignored (a Ctrl-C meant for the foreground
    must not stop a background audit), and a shell without job control starts a
    background job (``pytest &``, a CI runner's script) with SIGINT ignored, ``nohup``
    with SIGHUP ignored: the test's signal would be lost, not tested.
    """
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_orphans(monkeypatch):
    """Processes a test started and left running (an assertion failed first, a wait timed out) are killed when
    it ends, with their whole process group when they were started in one of their own (``start_new_session``):
    the group outlives its leader, an opaudit's worker or ranks too. An orphaned audit keeps a core busy for
    every test after it, and the races those tests measure need both."""
    started: list[tuple[subprocess.Popen, bool]] = []

    class Tracked(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append((self, bool(kwargs.get("start_new_session")) or kwargs.get("process_group") is not None))

    monkeypatch.setattr(subprocess, "Popen", Tracked)
    yield
    for proc, own_group in started:
        try:
            if own_group:
                # A group's id is not reused while any process is in it: this reaches only what the test started.
                os.killpg(proc.pid, signal.SIGKILL)
            elif proc.poll() is None:
                proc.kill()
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
