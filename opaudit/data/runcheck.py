"""A report's step-level records: the whole-step run checks (``--run-check``) and the compiled code the step called.

Both are frozen records with a dict form and a strict parse; :mod:`opaudit.flows.runcheck`
computes the checks, the recorder notes the compiled code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opaudit.data import fields
from opaudit.data.fields import need, opt


@dataclass(frozen=True)
class CompiledCode:
    """A ``torch.compile``d module or function that the recorded step called.

    Under the recorder it ran eagerly (Dynamo does not compile under a dispatch
    mode; opaudit sets the compiler stance ``force_eager`` while recording), so
    the findings for its ops are for the eager aten kernels, not for the kernels
    Inductor generated. ``--run-check`` checks the compiled step itself.
    """

    kind: str
    """``module`` (an ``nn.Module`` compiled with ``torch.compile(model)`` or ``model.compile()``) or ``function``."""
    name: str
    """The module's class name, or the function's qualified name."""
    calls: int
    """Calls while recording."""
    compiled_at: str = ""
    """``file:line`` of the ``torch.compile`` call, when opaudit saw it (empty otherwise)."""
    defined_at: str = ""
    """For a function, ``file:line`` of its definition."""


@dataclass(frozen=True)
class RunCheck:
    """Outcome of re-running the whole step ``runs`` times from identical state in one mode."""

    mode: str
    """``default`` or ``deterministic``."""
    runs: int
    reproducible: bool
    ops: int
    """Ops executed per run (of the first run)."""
    differing_ops: int = 0
    """Ops whose outputs differed between runs."""
    root_cause: Mapping[str, Any] | None = None
    """First op whose outputs differ while its inputs were identical: op, index, site."""
    path_split: Mapping[str, Any] | None = None
    """Where the runs took different op sequences, if they did."""
    mismatches: tuple[str, ...] = ()
    """Outputs, loss, gradients or parameters that differed."""
    error: str | None = None
    compared: int | None = None
    """Final tensors compared after the step (return value, parameters, gradients,
    buffers, optimizer state); ``0`` says none could be found."""
    collectives: Mapping[str, Any] | None = None
    """When the step made collective calls: how many, the first that differed (inputs,
    outputs), and how many came before the root cause (see :mod:`opaudit.flows.runcheck`)."""
    rank: int | None = None
    """The rank that ran this check, in a merged torchrun report."""
    compiled: tuple[str, ...] = ()
    """When the step calls ``torch.compile``d code: the compiled modules and functions
    (``module MLP``, ``function step``). The runs then ran with compilation in force and
    no dispatch mode, so ``ops`` is 0 and only the final tensors were compared."""
    compiles: int | None = None
    """Graphs Dynamo compiled over all the runs of a compiled step (a fresh load of the
    script compiles anew; Inductor's caches make the later compiles cheaper)."""
    inductor_deterministic: bool | None = None
    """For a compiled step: whether ``torch._inductor.config.deterministic`` was on."""
    fresh_processes: bool | None = None
    """``True`` when each run was a process of its own (``--fresh-processes``), compared through traces:
    op digests and final-tensor digests (no max |diff|)."""


def compiled_dict(c: CompiledCode) -> dict[str, Any]:
    """Dict form of a compiled module or function; empty fields are left out."""
    return {k: v for k, v in dataclasses.asdict(c).items() if v != ""}


def run_check_dict(r: RunCheck) -> dict[str, Any]:
    """Dict form of a run check; ``None`` fields are left out."""
    d = dataclasses.asdict(r)
    d["mismatches"] = list(r.mismatches)
    if r.compiled:
        d["compiled"] = list(r.compiled)
    else:
        del d["compiled"]  # an eager step's check reads as it always did
    return {k: v for k, v in d.items() if v is not None}


def parse_compiled(c: Any, where: str) -> CompiledCode:
    """A :class:`CompiledCode` from its dict form."""
    c = fields.mapping(c, where)
    return CompiledCode(kind=need(c, "kind", str, where), name=need(c, "name", str, where),
                        calls=need(c, "calls", int, where), compiled_at=opt(c, "compiled_at", str, where, ""),
                        defined_at=opt(c, "defined_at", str, where, ""))


def parse_run_check(r: Any, where: str) -> RunCheck:
    """A :class:`RunCheck` from its dict form."""
    r = fields.mapping(r, where)
    return RunCheck(
        mode=need(r, "mode", str, where), runs=need(r, "runs", int, where),
        reproducible=need(r, "reproducible", bool, where), ops=need(r, "ops", int, where),
        differing_ops=opt(r, "differing_ops", int, where, 0), root_cause=opt(r, "root_cause", dict, where),
        path_split=opt(r, "path_split", dict, where), mismatches=fields.strings(r, "mismatches", where),
        error=opt(r, "error", str, where), compared=opt(r, "compared", int, where),
        collectives=opt(r, "collectives", dict, where), rank=opt(r, "rank", int, where),
        compiled=fields.strings(r, "compiled", where), compiles=opt(r, "compiles", int, where),
        inductor_deterministic=opt(r, "inductor_deterministic", bool, where),
        fresh_processes=opt(r, "fresh_processes", bool, where))
