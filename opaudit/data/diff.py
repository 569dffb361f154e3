"""The diff document: verdict transitions between two catalogs or two reports, and its dict form.

Pure data: :mod:`opaudit.flows.diff` computes a :class:`Diff`; the renderers read it.
A diff is written, never read back, so it has no loader.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FORMAT = "opaudit-diff"
VERSION = 1
MISSING = "missing"
"""The verdict side of an op that one document does not have."""
VERDICT, BATCH_FIELD = "verdict", "batch_invariance"
"""What a :class:`Change` is about: the op's determinism verdict, or its batch-invariance verdict (catalogs
made with ``--batch-invariance``)."""


@dataclass(frozen=True)
class Change:
    """One op whose verdict differs, or that is present on one side only."""

    op: str
    detail: str
    """Catalogs: ``dtype`` and variant, e.g. ``float32 accumulate=True``; reports: the signature."""
    before: str
    """Verdict in the first document, or ``missing``."""
    after: str
    """Verdict in the second document, or ``missing``."""
    where: str = ""
    """Reports: the first source location; catalogs: the OpInfo entry behind the new verdict."""
    field: str = VERDICT
    """:data:`VERDICT`, or :data:`BATCH_FIELD` for a catalog's batch-invariance verdict."""

    @property
    def transition(self) -> str:
        """``before->after``."""
        return f"{self.before}->{self.after}"


@dataclass(frozen=True)
class FieldChange:
    """A fingerprint or settings field that differs."""

    name: str
    before: Any
    after: Any


@dataclass(frozen=True)
class Diff:
    """Everything that differs between two documents of the same kind."""

    kind: str
    """``catalog`` or ``report``."""
    a: str
    """Label (path) of the first document."""
    b: str
    changes: tuple[Change, ...]
    """Ops on both sides whose verdict differs, worst new verdict first."""
    only_a: tuple[Change, ...]
    only_b: tuple[Change, ...]
    environment: tuple[FieldChange, ...]
    settings: tuple[FieldChange, ...]
    unchanged: int
    """Ops on both sides with the same verdict."""
    format: str = FORMAT
    version: int = VERSION

    @property
    def all_changes(self) -> tuple[Change, ...]:
        """Verdict changes, then ops only in ``a``, then ops only in ``b``."""
        return self.changes + self.only_a + self.only_b

    @property
    def summary(self) -> dict[str, int]:
        """Counts of each part."""
        return {"changed": len(self.changes), "only_a": len(self.only_a), "only_b": len(self.only_b),
                "unchanged": self.unchanged, "environment": len(self.environment), "settings": len(self.settings)}

    def transitions(self) -> dict[str, int]:
        """How many ops made each transition (``stable->diverges``: 3), sorted."""
        out: dict[str, int] = {}
        for c in self.all_changes:
            out[c.transition] = out.get(c.transition, 0) + 1
        return dict(sorted(out.items()))

    def matching(self, rules: Iterable[tuple[str, str]]) -> list[Change]:
        """Changes whose transition matches any ``(before_glob, after_glob)`` rule."""
        rules = list(rules)
        return [c for c in self.all_changes
                if any(fnmatch.fnmatchcase(c.before, a) and fnmatch.fnmatchcase(c.after, b) for a, b in rules)]

    def to_dict(self) -> dict[str, Any]:
        """Plain, ordered, serialisable form."""
        def change(c: Change) -> dict[str, Any]:
            d = {"op": c.op, "detail": c.detail, "before": c.before, "after": c.after}
            if c.where:
                d["where"] = c.where
            if c.field != VERDICT:
                d["field"] = c.field
            return d

        def fields(fs: tuple[FieldChange, ...]) -> list[dict[str, Any]]:
            return [{"name": f.name, "a": f.before, "b": f.after} for f in fs]

        return {
            "format": self.format, "version": self.version, "kind": self.kind, "a": self.a, "b": self.b,
            "summary": self.summary, "transitions": self.transitions(),
            "environment": fields(self.environment), "settings": fields(self.settings),
            "changes": [change(c) for c in self.changes],
            "only_a": [change(c) for c in self.only_a], "only_b": [change(c) for c in self.only_b],
        }
