"""Which signatures race, and how far their replays go before a ``stable`` verdict is given.

A race (threads or atomics adding into the same element in another order) shows
only now and then, and less on a busy machine: ``--reps`` runs can all agree on
an op that differs in one run of ten. The signatures of ops whose nondeterminism
is a race are replayed further (:class:`~opaudit.engine.replay.MoreRuns`): the
value-dependent ops (:data:`~opaudit.aten.ops.VALUE_DEPENDENT_OPS`: index_put,
scatter_add, embedding backward...) and the ops a catalog of this device marks
``diverges`` (the shipped one for this torch and platform, and the ``--against``
catalog when it was made on this kind of machine).

How far: up to :data:`DEFAULT_RUNS` runs per mode (a ``stable`` verdict then
rules out, at 95 %, an op that differs in 5 % of its runs), stopping at the first
run that differs, and within :data:`DEFAULT_SECONDS` per replayed capture. A
report without timings must be byte-stable, so there the time limit is replaced
by a count the inputs decide: as many runs as fit :data:`BYTES_PER_MODE` bytes of
inputs, between ``--reps`` and :data:`DEFAULT_RUNS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opaudit.aten.ops import OpKind, value_dependent
from opaudit.aten.tensors import Snapshot
from opaudit.data.catalog import Catalog
from opaudit.data.verdict import Verdict
from opaudit.engine.record import RecordedSignature
from opaudit.engine.replay import MoreRuns

DEFAULT_RUNS = 60
"""Runs per mode a race-prone signature's replay goes up to: 59 comparisons catch, at 95 %, an op
that differs in 5 % of its runs."""

DEFAULT_SECONDS = 2.0
"""Seconds the further runs of one capture may take (both modes together), when timings are kept."""

BYTES_PER_MODE = 1024**3
"""Without timings: bytes of captured inputs replayed per mode that fix the count of runs."""

_MATCH_KEYS = ("torch", "platform")
"""Fingerprint fields a catalog shares with this machine to say which of its ops race here."""


@dataclass(frozen=True)
class RaceReplay:
    """How the signatures whose nondeterminism is a race are replayed (see the module)."""

    runs: int = DEFAULT_RUNS
    seconds: float | None = DEFAULT_SECONDS
    """``None``: no time limit, the inputs' size fixes the count (byte-stable reports)."""
    ops: frozenset[str] = frozenset()
    """Op overloads a catalog of this device marks ``diverges``, besides the value-dependent ops."""

    def more_runs(self, sig: RecordedSignature, func: Any, snap: Snapshot, reps: int) -> MoreRuns | None:
        """How far to replay ``sig`` beyond ``reps`` runs; ``None`` if it is not race-prone."""
        if sig.kind is not OpKind.COMPUTE or not (value_dependent(func) or sig.op in self.ops):
            return None
        if self.seconds is not None:
            runs = self.runs
        else:
            runs = min(self.runs, BYTES_PER_MODE // max(snap.nbytes, 1))
        return MoreRuns(runs, self.seconds) if runs > reps else None


def catalog_race_ops(catalog: Catalog, environment: Mapping[str, Any], device: str = "cpu") -> frozenset[str]:
    """The ops ``catalog`` marks ``diverges`` (or ``diverges_deterministic``), if it was made on this kind
    of machine (same torch, platform and device type; empty otherwise)."""
    if not _same_machine(catalog.environment, catalog.settings, environment, device):
        return frozenset()
    racy = (Verdict.DIVERGES, Verdict.DIVERGES_DETERMINISTIC)
    return frozenset(e.op for e in catalog.entries if e.verdict in racy)


_ENTRY = re.compile(r"^- op: (\S+)\n(?:  (?!op:).*\n)*?  verdict: diverges", re.M)


def shipped_race_ops(environment: Mapping[str, Any], device: str = "cpu") -> frozenset[str]:
    """:func:`catalog_race_ops` over the catalogs shipped with opaudit (``opaudit.catalogs``).

    Read with a pattern over their canonical YAML rather than the strict loader:
    a shipped catalog is opaudit's own file, and loading the CPU one takes
    seconds, which every audit would pay.
    """
    from importlib import resources

    try:
        files = [f for f in resources.files("opaudit.catalogs").iterdir()
                 if f.name.endswith(".yaml") and f.name != "remedies.yaml"]
    except (ModuleNotFoundError, OSError):
        return frozenset()
    out: set[str] = set()
    for f in sorted(files, key=lambda f: f.name):
        try:
            text = f.read_text(encoding="utf-8")
        except OSError:
            continue
        head = text[:4096]
        env = {k: _field(head, k) for k in (*_MATCH_KEYS, "gpu")}
        settings = {"device": _field(head[head.find("\nsettings:"):] if "\nsettings:" in head else "", "device")}
        if _same_machine(env, settings, environment, device):
            out.update(_ENTRY.findall(text))
    return frozenset(out)


def _field(text: str, key: str) -> str | None:
    m = re.search(rf"^  {key}: (.+)$", text, re.M)
    return m.group(1).strip().strip("'\"") if m else None


def _same_machine(env: Mapping[str, Any], settings: Mapping[str, Any], here: Mapping[str, Any], device: str) -> bool:
    kind = str(settings.get("device") or "cpu").split(":")[0]
    if kind != device.split(":")[0]:
        return False
    keys = (*_MATCH_KEYS, "gpu") if kind == "cuda" else _MATCH_KEYS
    return all(str(env.get(k)) == str(here.get(k)) for k in keys)
