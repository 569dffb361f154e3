"""Shared test setup: 2 intra-op threads (the races these tests measure need them)."""

from __future__ import annotations

import os
import signal
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
