"""Where a call came from: the record every layer that reports an op's site shares."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opaudit.data import fields
from opaudit.data.fields import need, opt


@dataclass(frozen=True)
class Site:
    """Where a call came from: the user's innermost frame and the module running."""

    file: str
    """Path relative to the audit root (or to the ``sys.path`` entry holding it)."""
    line: int
    function: str
    module: str
    """Fully qualified module path, e.g. ``TwoTower.mlp.0``; empty outside any module."""
    caller: "Site | None" = None
    """When ``file`` is code generated at run time (``exec``'d source, a module written
    to the temp folder and imported, as torch_geometric does): the nearest frame in
    the user's own files that led to it. ``None`` otherwise."""
    node: "Site | None" = None
    """For an op run by Python code of the user's during backward (a custom
    ``autograd.Function``'s ``backward()``, a tensor hook): the forward line that
    created the autograd node running it (the ``.apply`` call). ``None`` otherwise."""
    recomputed: bool = False
    """A forward op run again during backward by activation checkpointing
    (``torch.utils.checkpoint``) to rebuild what it did not keep."""

    @property
    def location(self) -> str:
        """``file:line``; ``user.py:12 via generated.py:3`` for generated code; with ``(recomputed)`` or
        ``(backward of line 10)`` for an op run during backward by checkpointing or by a Python ``backward()``."""
        here = f"{self.file}:{self.line}"
        text = f"{self.caller.file}:{self.caller.line} via {here}" if self.caller is not None else here
        if self.recomputed:
            text += " (recomputed)"
        if self.node is not None:
            made = f"line {self.node.line}" if self.node.file == self.file else f"{self.node.file}:{self.node.line}"
            text += f" (backward of {made})"
        return text

    def __str__(self) -> str:
        return f"{self.location} ({self.function})"

    def to_dict(self) -> dict[str, Any]:
        """The dict form written to YAML and JSON."""
        d: dict[str, Any] = {"file": self.file, "line": self.line, "function": self.function, "module": self.module}
        if self.caller is not None:
            d["caller"] = {"file": self.caller.file, "line": self.caller.line, "function": self.caller.function}
        if self.node is not None:
            d["node"] = {"file": self.node.file, "line": self.node.line, "function": self.node.function}
        if self.recomputed:
            d["recomputed"] = True
        return d


def locations_of(sites: Iterable[Site]) -> tuple[str, ...]:
    """Distinct ``file:line`` locations of ``sites``, in first-seen order."""
    return tuple(dict.fromkeys(s.location for s in sites))


def modules_of(sites: Iterable[Site]) -> tuple[str, ...]:
    """Distinct module paths of ``sites`` (empty ones left out), in first-seen order."""
    return tuple(dict.fromkeys(s.module for s in sites if s.module))


def parse_site(s: Any, where: str) -> Site:
    """A :class:`Site` from its dict form (:meth:`Site.to_dict`), read strictly."""
    s = fields.mapping(s, where, "a site")
    caller = opt(s, "caller", Mapping, where)
    node = opt(s, "node", Mapping, where)
    return Site(need(s, "file", str, where), need(s, "line", int, where), opt(s, "function", str, where, ""),
                opt(s, "module", str, where, ""), parse_site(caller, f"{where}.caller") if caller is not None else None,
                parse_site(node, f"{where}.node") if node is not None else None, opt(s, "recomputed", bool, where, False))
