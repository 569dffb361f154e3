"""YAML report: the default, round-trips through ``report.load``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from opaudit.report import Report


class _Dumper(yaml.SafeDumper):
    """Safe dumper that writes multi-line strings as literal blocks."""


def _str(dumper: yaml.SafeDumper, s: str) -> Any:
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


_Dumper.add_multi_representer(str, _str)


def dump(data: Any) -> str:
    """Stable YAML for plain data: insertion order kept, wide lines, no aliases, an end marker."""
    _Dumper.ignore_aliases = lambda self, data: True  # type: ignore[method-assign]
    # explicit_end writes "...": a file cut at a line break still lacks it, so the
    # reader can tell a truncated file from a whole one.
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True,
                     default_flow_style=False, explicit_end=True)


def render(report: "Report") -> str:
    """The report as YAML."""
    return dump(report.to_dict())
