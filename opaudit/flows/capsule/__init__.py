"""Before you migrate: capture a step's ops once (:func:`capture`), replay them on another machine (:func:`replay_capsule`).

The catalog (``--against``) predicts what a machine will do from OpInfo's sample
inputs; a capsule measures it on the user's own calls. :mod:`.capture` records
the window as an audit does (through its run object: the window, then what deterministic mode calls) and
writes, for every unique signature and the further captures of value-dependent
ops, the arguments as they were and the outputs this machine computed from them
in each mode (:mod:`opaudit.data.capsule`). :mod:`.replay` rebuilds each call on
the target, replays it as the audit does (its local verdict), and compares the
first run of each mode with the source's bits: ``across``
(:class:`~opaudit.data.across.Across`).
"""

from __future__ import annotations

from opaudit.flows.capsule.capture import Captured, capture, write_recording
from opaudit.flows.capsule.replay import DeviceError, check_device, physical_memory, replay_capsule

__all__ = ["Captured", "DeviceError", "capture", "check_device", "physical_memory", "replay_capsule",
           "write_recording"]
