"""Document files: strict, safe reading (YAML or JSON), header checks, and atomic writes.

Every opaudit document (report, catalog, diff, prediction) carries ``format`` and
``version``; reading refuses anything else. YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import yaml


class _Dumper(yaml.SafeDumper):
    """Safe dumper that writes multi-line strings as literal blocks."""


def _str(dumper: yaml.SafeDumper, s: str) -> Any:
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


_Dumper.add_multi_representer(str, _str)


def dump_yaml(data: Any) -> str:
    """Stable YAML for plain data: insertion order kept, wide lines, no aliases, an end marker."""
    _Dumper.ignore_aliases = lambda self, data: True  # type: ignore[method-assign]
    # explicit_end writes "...": a file cut at a line break still lacks it, so the
    # reader can tell a truncated file from a whole one.
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True,
                     default_flow_style=False, explicit_end=True)


class ReportError(Exception):
    """A report or catalog file is missing, malformed, or of another format/version."""


def check_header(data: Any, fmt: str, version: int | tuple[int, ...], path: str) -> Mapping[str, Any]:
    """Refuse anything that is not a mapping of format ``fmt`` and ``version`` (or one of several)."""
    if not isinstance(data, Mapping):
        raise ReportError(f"{path}: not an opaudit file (expected a mapping at the top level)")
    got = data.get("format")
    if got != fmt:
        raise ReportError(f"{path}: format is {got!r}, expected {fmt!r}")
    versions = version if isinstance(version, tuple) else (version,)
    v = data.get("version")
    if isinstance(v, bool) or v not in versions:
        readable = " or ".join(map(str, versions))
        raise ReportError(f"{path}: {fmt} version {v!r} is not supported (this opaudit reads version {readable})")
    return data


def read_document(path: str) -> Any:
    """Parse a YAML or JSON file safely; :class:`ReportError` with a one-line reason."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReportError(f"{path}: is a directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read ({e.__class__.__name__})") from None
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: invalid JSON (line {e.lineno}: {e.msg})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        raise ReportError(f"{path}: refused: unsafe or unknown YAML tag ({_first_line(e.problem)})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ReportError(f"{path}: invalid YAML{where} (truncated or hand-edited?)") from None
    if text and not text.endswith("\n"):
        # A YAML file cut mid-line often still parses, into a shorter last value.
        raise ReportError(f"{path}: incomplete YAML: the last line has no line break (truncated?)")
    if _is_ours(data) and text.rstrip().rsplit("\n", 1)[-1].strip() != "...":
        # opaudit writes an explicit end marker; a file cut at a line break lacks it.
        raise ReportError(f"{path}: incomplete YAML: no end-of-document marker '...' (truncated?)")
    return data


def _is_ours(data: Any) -> bool:
    return isinstance(data, Mapping) and str(data.get("format", "")).startswith("opaudit-")


def _first_line(s: str | None) -> str:
    return (s or "").strip().splitlines()[0] if s else "unknown tag"


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".opaudit-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
