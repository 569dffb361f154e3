"""Strict reading of a document's fields: required or optional, of the types given, one-line errors.

Every loader of an opaudit document (the report and its sections, the catalog)
reads its dict form through these functions, so that a hand-edited or truncated
file is refused with the same kind of message wherever the mismatch is:
``report.yaml: findings[3]: field 'calls' has the wrong type (str)``.
``where`` is the place in the file, printed before the reason.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from opaudit.data.errors import OpauditError
from opaudit.data.verdict import Verdict


class ReportError(OpauditError):
    """A report or catalog file is missing, malformed, or of another format/version."""


Types = type | tuple[type, ...]


def need(d: Mapping[str, Any], key: str, types: Types, where: str) -> Any:
    """``d[key]``, which must be present, not null, and of ``types`` (``bool`` passes only where named)."""
    if d.get(key) is None:
        raise ReportError(f"{where}: missing field {key!r}")
    v = d[key]
    allowed = types if isinstance(types, tuple) else (types,)
    # True is an int to isinstance; a count written as ``true`` is a mistake.
    if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
        raise ReportError(f"{where}: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def opt(d: Mapping[str, Any], key: str, types: Types, where: str, default: Any = None) -> Any:
    """``d[key]`` checked as :func:`need` does, or ``default`` when it is absent or null."""
    if d.get(key) is None:
        return default
    return need(d, key, types, where)


def mapping(value: Any, where: str, what: str = "") -> Mapping[str, Any]:
    """``value`` if it is a mapping; else ``{where}: {what} must be a mapping``."""
    if not isinstance(value, Mapping):
        raise ReportError(f"{where}: {what + ' ' if what else ''}must be a mapping")
    return value


def number(d: Mapping[str, Any], key: str, where: str) -> float | None:
    """An optional number: an int, a float, or the text ``inf`` / ``nan`` (how opaudit writes them)."""
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ReportError(f"{where}.{key}: expected a number, got {type(v).__name__}")
    try:
        return float(v)
    except ValueError:
        raise ReportError(f"{where}.{key}: expected a number, got {v!r}") from None


def strings(d: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    """An optional list of strings (absent: empty)."""
    items = opt(d, key, list, where, [])
    if not all(isinstance(x, str) for x in items):
        raise ReportError(f"{where}: {key} must be a list of strings")
    return tuple(items)


def ints(d: Mapping[str, Any], key: str, where: str, minimum: int | None = None) -> tuple[int, ...]:
    """An optional list of integers (absent: empty), each at least ``minimum`` when given."""
    items = opt(d, key, list, where, [])
    if not all(isinstance(x, int) and not isinstance(x, bool) and (minimum is None or x >= minimum) for x in items):
        floor = f" of at least {minimum}" if minimum is not None else ""
        raise ReportError(f"{where}: {key} must be a list of integers{floor}")
    return tuple(items)


def choice(d: Mapping[str, Any], key: str, choices: Collection[str], where: str) -> str:
    """A required string that must be one of ``choices``."""
    v = need(d, key, str, where)
    if v not in choices:
        raise ReportError(f"{where}: unknown {key} {v!r} (expected one of: {', '.join(choices)})")
    return v


def verdict(value: Any, where: str) -> Verdict:
    """A :class:`Verdict` from its name; the error names the choices."""
    try:
        return Verdict.parse(str(value))
    except ValueError as e:
        raise ReportError(f"{where}: {e}") from None
