"""Where a call came from: the record every layer that reports an op's site shares."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Site:
    """Where a call came from: the user's innermost frame and the module running."""

    file: str
    """Path relative to the audit root (or to the ``sys.path`` entry holding it)."""
    line: int
    function: str
    module: str
    """Fully qualified module path, e.g. ``TwoTower.mlp.0``; empty outside any module."""

    @property
    def location(self) -> str:
        """``file:line``."""
        return f"{self.file}:{self.line}"

    def __str__(self) -> str:
        return f"{self.location} ({self.function})"
