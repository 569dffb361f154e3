"""The comparison document: where two traces of one script part, and how far the difference spread.

Pure data: :mod:`opaudit.flows.trace.compare` computes a :class:`TraceComparison`
from two ``.optrace`` files; the renderers in ``cli/formats`` read only this record.
A comparison is written, never read back, so it has no loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opaudit.data.diff import FieldChange

FORMAT = "opaudit-comparison"
VERSION = 1
IDENTICAL, DIVERGED = "identical", "diverged"


@dataclass(frozen=True)
class TracedCall:
    """One call, as both traces hold it (or as trace A does, for a call B lacks)."""

    index_a: int
    """1-based call number in trace A (views counted: the audit's ``first_call`` numbering)."""
    index_b: int
    """The same call's number in trace B (0 when B has no such call)."""
    op: str
    where: str
    """``file:line`` of the user's code (a backward op: the forward line that made it)."""
    function: str = ""
    module: str = ""
    phase: str = ""
    step: int = 0
    """The optimizer step (a script) or entry call the call belongs to; 0: the entry's import."""
    inputs_identical: bool = True
    """Whether every input's bits were the same in both traces."""
    differs: tuple[str, ...] = ()
    """What differed: ``output 0 (float32[8,64])``, ``input 1 ...``, ``written input 2 ...``."""

    def to_dict(self) -> dict[str, Any]:
        """Plain, ordered form."""
        d: dict[str, Any] = {"index_a": self.index_a, "index_b": self.index_b, "op": self.op, "where": self.where,
                             "function": self.function, "module": self.module, "phase": self.phase,
                             "step": self.step, "inputs_identical": self.inputs_identical}
        if self.differs:
            d["differs"] = list(self.differs)
        return d


@dataclass(frozen=True)
class Structural:
    """Calls one trace made and the other did not, between two stretches the traces share."""

    index_a: int
    """Where in trace A the block starts (the first call only A made, or the call before which B's come)."""
    index_b: int
    only_a: tuple[str, ...]
    """The first calls only A made: ``aten.clone.default at train.py:12``."""
    only_b: tuple[str, ...]
    count_a: int
    """How many calls only A made here (``only_a`` lists the first few)."""
    count_b: int

    def to_dict(self) -> dict[str, Any]:
        """Plain, ordered form."""
        return {"index_a": self.index_a, "index_b": self.index_b, "count_a": self.count_a, "count_b": self.count_b,
                "only_a": list(self.only_a), "only_b": list(self.only_b)}


@dataclass(frozen=True)
class RankComparison:
    """Two traces of one process (or of one rank of a torchrun job) side by side, in that process's order."""

    rank: int | None
    calls_a: int
    """Every call in trace A, views included."""
    calls_b: int
    compared: int
    """Calls made in both traces (aligned by op and site) whose bits were compared."""
    differing: int
    """Of those, calls whose outputs differed."""
    root_cause: TracedCall | None = None
    """The first call whose inputs were bitwise equal in both traces and whose outputs were not."""
    first_difference: TracedCall | None = None
    """The first call whose outputs differed, when its inputs already differed (data from outside the ops:
    files, Python or NumPy values) and it came before any root cause."""
    downstream: int = 0
    """Differing calls after the root cause (or the first difference): how far it spread."""
    first_loss: TracedCall | None = None
    """The first ``backward()`` whose loss differed (its gradient seed's input)."""
    first_update: TracedCall | None = None
    """The first optimizer-phase call whose outputs differed: the first parameter update that differed."""
    structural: tuple[Structural, ...] = ()
    """Where one trace made calls the other did not (the first few blocks), realigned after each."""
    structural_blocks: int = 0
    only_a: int = 0
    """Calls only trace A made, in all."""
    only_b: int = 0
    parted: TracedCall | None = None
    """When the traces could not be realigned: the call where they part for good (``op`` names both)."""
    final: tuple[str, ...] = ()
    """Final tensors whose bits differ (``grad of model.w``), or that one trace lacks."""
    final_compared: int = 0
    collectives_before: int | None = None
    """Collective calls before the root cause (the timeline ranks share); ``None`` without a root cause."""
    root_is_collective: bool = False

    @property
    def identical(self) -> bool:
        """Bitwise the same run: every call, every final tensor, no call made by one trace only."""
        return not (self.differing or self.only_a or self.only_b or self.final or self.parted is not None
                    or self.calls_a != self.calls_b)

    def to_dict(self) -> dict[str, Any]:
        """Plain, ordered form."""
        d: dict[str, Any] = {}
        if self.rank is not None:
            d["rank"] = self.rank
        d.update({"verdict": IDENTICAL if self.identical else DIVERGED, "calls_a": self.calls_a,
                  "calls_b": self.calls_b, "compared": self.compared, "differing": self.differing})
        for name in ("root_cause", "first_difference"):
            call = getattr(self, name)
            if call is not None:
                d[name] = call.to_dict()
        if self.root_cause is not None or self.first_difference is not None:
            d["downstream"] = self.downstream
        if self.collectives_before is not None:
            d["collectives_before_root_cause"] = self.collectives_before
            d["root_cause_is_collective"] = self.root_is_collective
        for name in ("first_loss", "first_update"):
            call = getattr(self, name)
            if call is not None:
                d[name] = call.to_dict()
        d["structural"] = {"blocks": self.structural_blocks, "only_a": self.only_a, "only_b": self.only_b,
                           "listed": [s.to_dict() for s in self.structural]}
        if self.parted is not None:
            d["parted"] = self.parted.to_dict()
        d["final"] = {"compared": self.final_compared, "differing": list(self.final)}
        return d


@dataclass(frozen=True)
class TraceComparison:
    """``opaudit compare A B``: the environment difference, then each process's comparison."""

    a: str
    """Label (path) of trace A."""
    b: str
    script: str
    """The traced script (both traces ran the same content)."""
    window: str
    """What both traces cover (``whole script``, ``steps 1-3``...)."""
    environment: tuple[FieldChange, ...]
    """Fingerprint fields and numerics variables that differ (``threads``, ``ATEN_CPU_CAPABILITY``...)."""
    settings: tuple[FieldChange, ...]
    """Trace settings that differ (seed, deterministic mode, script arguments)."""
    ranks: tuple[RankComparison, ...]
    """One per process: one for a single-process trace, one per rank for a torchrun job, in rank order."""
    first_rank: int | None = None
    """For a torchrun job: the rank whose root cause came first in the timeline of collective calls."""
    format: str = FORMAT
    version: int = VERSION

    @property
    def identical(self) -> bool:
        """Every process's trace is bitwise the same."""
        return all(r.identical for r in self.ranks)

    @property
    def verdict(self) -> str:
        """``identical`` or ``diverged``."""
        return IDENTICAL if self.identical else DIVERGED

    def to_dict(self) -> dict[str, Any]:
        """Plain, ordered, serialisable form."""
        d: dict[str, Any] = {"format": self.format, "version": self.version, "verdict": self.verdict,
                             "a": self.a, "b": self.b, "script": self.script, "window": self.window,
                             "environment": [{"name": f.name, "a": f.before, "b": f.after} for f in self.environment],
                             "settings": [{"name": f.name, "a": f.before, "b": f.after} for f in self.settings]}
        if self.first_rank is not None:
            d["diverged_first_on_rank"] = self.first_rank
        d["processes"] = [r.to_dict() for r in self.ranks]
        return d
