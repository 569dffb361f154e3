"""The replay document: each captured op's bits on this machine against the machine that captured it.

``opaudit replay step.opcap`` writes a :class:`CapsuleReplay`: the environment
difference between the two machines, then one :class:`Crossed` row per captured
signature with two verdicts side by side: ``across`` (this machine's bits against
the source's, see :class:`Across`) and ``verdict`` (the audit's local verdict,
measured here: ``raises``, ``diverges``... as a :class:`~opaudit.data.report.Finding`).
Renderers read only this record.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opaudit.data.findings import Finding, _num, finding_dict, parse_finding
from opaudit.data.verdict import FAILING_DEFAULT, Verdict, verdict_counts

FORMAT = "opaudit-replay"
VERSION = 1


class Across(str, enum.Enum):
    """How one op's bits here compare with the bits the capsule's source computed."""

    UNSUPPORTED = "unsupported"
    DIFFERS = "differs"
    DIFFERS_DEFAULT = "differs_default"
    SKIPPED = "skipped"
    SAME = "same"

    @property
    def severity(self) -> int:
        """Higher is worse."""
        return _SEVERITY[self]

    @property
    def meaning(self) -> str:
        """One sentence for reports and ``--help``."""
        return MEANINGS[self]

    @classmethod
    def parse(cls, text: str) -> "Across":
        """An ``Across`` from its name; ``ValueError`` naming the choices otherwise."""
        try:
            return cls(text.strip())
        except ValueError:
            raise ValueError(f"unknown across value {text.strip()!r} "
                             f"(choose from {', '.join(a.value for a in cls)})") from None


_SEVERITY = {Across.UNSUPPORTED: 4, Across.DIFFERS: 3, Across.DIFFERS_DEFAULT: 2, Across.SKIPPED: 1, Across.SAME: 0}

MEANINGS = {
    Across.SAME: "the source's bits, in default and in deterministic mode",
    Across.DIFFERS: "other bits than the source's even in deterministic mode: deterministic mode cannot make "
                    "these machines agree",
    Across.DIFFERS_DEFAULT: "other bits in default mode only; in deterministic mode the source's bits",
    Across.UNSUPPORTED: "the op (or its dtype, or its device) does not run here: the error says why",
    Across.SKIPPED: "not compared; the reason says why",
}

FAILING_ACROSS = (Across.DIFFERS, Across.DIFFERS_DEFAULT, Across.UNSUPPORTED)
"""``across`` values that fail a replay unless ``--fail-on`` says otherwise (with :data:`FAILING_DEFAULT`)."""


@dataclass(frozen=True)
class Crossed:
    """One captured signature replayed here: the cross-machine verdict beside the local one."""

    across: Across
    finding: Finding
    """The audit's finding for this signature, measured here (its ``verdict`` is the local verdict)."""
    max_abs_diff: float | None = None
    """Largest |here - source| over the outputs that differed (either mode)."""
    max_ulp: int | None = None
    """Largest distance in units in the last place (floating outputs; integer outputs: the difference)."""
    frac_differing: float | None = None
    """Largest fraction of output elements whose bits differ from the source's (either mode)."""
    outputs: tuple[str, ...] = ()
    """The outputs whose bits differed from the source's."""
    reason: str = ""
    """For ``unsupported``: the error here; for ``skipped``: why; else a note (digests only...)."""
    modes: tuple[str, ...] = ()
    """The modes whose bits differed from the source's: ``default``, ``deterministic``."""

    @property
    def verdict(self) -> Verdict:
        """The local verdict (measured here)."""
        return self.finding.verdict


@dataclass(frozen=True)
class CapsuleReplay:
    """A capsule replayed on this machine."""

    capsule: str
    """The capsule's path as given."""
    source: Mapping[str, Any]
    """The environment fingerprint where the capsule was captured."""
    here: Mapping[str, Any]
    """This machine's fingerprint, as the replay ran."""
    settings: Mapping[str, Any]
    rows: tuple[Crossed, ...]
    """Worst ``across`` first (see :func:`sort_rows`)."""
    left_out: tuple[Mapping[str, Any], ...] = ()
    """What the capture's byte budget kept out of the capsule (``id``, ``op``, ``what``, ``nbytes``)."""
    complete: bool = True
    """False when the replay was interrupted; ``rows`` then holds what was replayed."""
    format: str = FORMAT
    version: int = VERSION

    @property
    def environment_difference(self) -> list[tuple[str, Any, Any]]:
        """``(field, source, here)`` for every fingerprint field that differs, sorted by field."""
        keys = sorted(set(self.source) | set(self.here))
        return [(k, self.source.get(k), self.here.get(k)) for k in keys if self.source.get(k) != self.here.get(k)]

    @property
    def summary(self) -> dict[str, Any]:
        """Signatures per ``across`` value and per local verdict."""
        across = {a.value: 0 for a in sorted(Across, key=lambda a: -a.severity)}
        for r in self.rows:
            across[r.across.value] += 1
        return {"signatures": len(self.rows), "across": across,
                "verdict": verdict_counts(r.verdict for r in self.rows)}

    def failing(self, fail_on: Iterable[Across | Verdict] = (*FAILING_ACROSS, *FAILING_DEFAULT)) -> list[Crossed]:
        """Rows whose ``across`` or local verdict is in ``fail_on``."""
        want = set(fail_on)
        return [r for r in self.rows if r.across in want or r.verdict in want]

    def to_dict(self) -> dict[str, Any]:
        """Plain, ordered, serialisable form (the file schema)."""
        return {
            "format": self.format, "version": self.version, "complete": self.complete, "capsule": self.capsule,
            "environment_difference": [{"field": k, "source": a, "here": b} for k, a, b in self.environment_difference],
            "source": dict(sorted(self.source.items())), "here": dict(sorted(self.here.items())),
            "settings": dict(sorted(self.settings.items())),
            "summary": self.summary,
            "left_out": [dict(x) for x in self.left_out],
            "ops": [crossed_dict(r) for r in self.rows],
        }


def sort_rows(rows: Iterable[Crossed]) -> tuple[Crossed, ...]:
    """Worst ``across`` first, then worst local verdict, then op and signature id: a total, stable order."""
    return tuple(sorted(rows, key=lambda r: (-r.across.severity, -r.verdict.severity, r.finding.op, r.finding.id)))


def crossed_dict(r: Crossed) -> dict[str, Any]:
    """Nested form of one row: the ``across`` fields, then the local finding's."""
    d: dict[str, Any] = {"across": r.across.value}
    if r.max_abs_diff is not None:
        d["max_abs_diff_across"] = _num(r.max_abs_diff)
    if r.max_ulp is not None:
        d["max_ulp_across"] = r.max_ulp
    if r.frac_differing is not None:
        d["frac_differing_across"] = _num(r.frac_differing)
    if r.outputs:
        d["outputs_across"] = list(r.outputs)
    if r.modes:
        d["modes_across"] = list(r.modes)
    if r.reason:
        d["reason_across"] = r.reason
    d.update(finding_dict(r.finding))
    return d


ROW_FIELDS = ("across", "verdict", "op", "calls", "phases", "modules", "locations", "max_abs_diff_across",
              "max_ulp_across", "frac_differing_across", "outputs_across", "modes_across", "reason_across",
              "default_diverged", "deterministic_diverged", "reason", "signature", "device", "id")
"""Column order of a replay's CSV rows."""


def flat_row(r: Crossed) -> dict[str, Any]:
    """A flat row (lists joined with ``;``) for CSV."""
    f = r.finding
    return {
        "across": r.across.value, "verdict": f.verdict.value, "op": f.op, "calls": f.calls,
        "phases": ";".join(f.phases), "modules": ";".join(f.modules), "locations": ";".join(f.locations),
        "max_abs_diff_across": _num(r.max_abs_diff), "max_ulp_across": r.max_ulp,
        "frac_differing_across": _num(r.frac_differing), "outputs_across": ";".join(r.outputs),
        "modes_across": ";".join(r.modes), "reason_across": r.reason,
        "default_diverged": f.default_diverged, "deterministic_diverged": f.deterministic_diverged,
        "reason": f.reason, "signature": f.signature, "device": f.device, "id": f.id,
    }


def from_dict(data: Mapping[str, Any], path: str = "<replay>") -> CapsuleReplay:
    """A :class:`CapsuleReplay` from its dict form (what ``-o replay.yaml`` wrote)."""
    from opaudit.data.files import ReportError, check_header

    data = check_header(data, FORMAT, VERSION, path)
    rows = []
    for i, d in enumerate(data.get("ops") or []):
        where = f"{path}: ops[{i}]"
        if not isinstance(d, Mapping):
            raise ReportError(f"{where}: must be a mapping")
        try:
            across = Across.parse(str(d.get("across")))
        except ValueError as e:
            raise ReportError(f"{where}: {e}") from None
        ulp = d.get("max_ulp_across")
        rows.append(Crossed(
            across=across, finding=parse_finding(d, where),
            max_abs_diff=_float(d.get("max_abs_diff_across")), max_ulp=ulp if isinstance(ulp, int) else None,
            frac_differing=_float(d.get("frac_differing_across")),
            outputs=tuple(str(x) for x in d.get("outputs_across") or ()),
            reason=str(d.get("reason_across") or ""), modes=tuple(str(x) for x in d.get("modes_across") or ())))
    return CapsuleReplay(capsule=str(data.get("capsule", "")), source=dict(data.get("source") or {}),
                         here=dict(data.get("here") or {}), settings=dict(data.get("settings") or {}),
                         rows=tuple(rows), left_out=tuple(dict(x) for x in data.get("left_out") or ()),
                         complete=bool(data.get("complete", True)))


def _float(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
