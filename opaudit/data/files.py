"""Document files: strict, safe reading (YAML or JSON), header and field checks, and writes.

Every opaudit document (report, catalog, diff, prediction) carries ``format`` and
``version``; reading refuses anything else. YAML is read with ``yaml.safe_load``'s
rules (libyaml's parser where PyYAML has it), refusing aliases, a second
document, deep nesting and duplicate keys; JSON refuses duplicate keys too. Only
regular files within a size limit are read (:mod:`opaudit.data.fileio`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import yaml

from opaudit.data.fields import ReportError
from opaudit.data.fileio import FileError, read_input, write_output


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


def check_header(data: Any, fmt: str, version: int | tuple[int, ...], path: str) -> Mapping[str, Any]:
    """Refuse anything that is not a mapping of format ``fmt`` and ``version`` (or one of several)."""
    if not isinstance(data, Mapping):
        raise ReportError(f"{path}: not an opaudit file (expected a mapping at the top level)")
    got = data.get("format")
    if got != fmt:
        raise ReportError(f"{path}: format is {got!r}, expected {fmt!r}")
    versions = version if isinstance(version, tuple) else (version,)
    v = data.get("version")
    if type(v) is not int or v not in versions:  # true and 1.0 compare equal to 1
        readable = " or ".join(map(str, versions))
        raise ReportError(f"{path}: {fmt} version {v!r} is not supported (this opaudit reads version {readable})")
    return data


_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("reps", "seed", "capture_budget_mib", "captures_per_signature", "run_check", "index_reps",
                     "max_samples", "stress_elements", "stress_samples"), (int,)),
    **dict.fromkeys(("op_timeout_s", "worker_memory_gib"), (int, float)),
    **dict.fromkeys(("script", "entry", "isolate", "device", "grad"), (str,)),
    **dict.fromkeys(("timing", "modules", "stress"), (bool,)),
    **dict.fromkeys(("dtypes", "ops"), (list,)),
}
"""Types of the settings opaudit writes (reports and catalogs); other keys must hold plain values."""

def check_settings(settings: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """Refuse a ``settings`` mapping whose known fields have the wrong type or hold a non-finite number."""
    for key, value in settings.items():
        w = f"{where}: settings.{key}"
        types = _SETTING_TYPES.get(key)
        if types is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise ReportError(f"{w} has the wrong type ({type(value).__name__})")
        _check_values(value, w)
    return settings


def check_environment(env: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """Refuse an environment fingerprint whose ``threads`` is not a count or that holds a non-finite number.

    Other fields are plain values, lists or mappings (a merged distributed report
    keeps one fingerprint per rank under ``ranks``).
    """
    threads = env.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)):
        raise ReportError(f"{where}: environment.threads has the wrong type ({type(threads).__name__})")
    for key, value in env.items():
        _check_values(value, f"{where}: environment.{key}")
    return env


def _check_values(value: Any, where: str) -> None:
    stack = [value]
    while stack:
        x = stack.pop()
        if isinstance(x, float) and not math.isfinite(x):
            raise ReportError(f"{where}: {x!r} is not a finite number")
        if isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, Mapping):
            stack.extend(x.values())


class _Refused(yaml.YAMLError):
    """What no opaudit file holds (an alias, a second document, deep nesting, a duplicate key): one line."""


_MAP, _SEQ = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
_NO_KEY = object()


class _StrictLoading:
    """``yaml.safe_load``'s rules (plain data only: the safe constructor's scalar tags, mappings and
    sequences), stricter, built straight from the parser's events.

    PyYAML's composer builds a graph of every node before any value is made (its
    C version recursing once per nesting level, which overflows the C stack on a
    file of ``[[[[...`` far below the size limit), and its constructor keeps a map
    of them all: several times the memory of the data. This loop makes each value
    as its event arrives, with the safe constructor's scalar functions (ints,
    floats, booleans, nulls, timestamps...), and refuses: aliases (opaudit never
    writes them; a few hundred bytes of nested aliases expand to gigabytes), a
    second document, nesting deeper than :data:`MAX_DEPTH`, a key given twice in
    one mapping, and the collection tags opaudit never writes (``!!set``,
    ``!!omap``, ``!!pairs``).
    """

    def load_strict(self) -> Any:
        """The one document's data, or ``None`` for an empty stream."""
        get = self.get_event  # type: ignore[attr-defined]
        resolve = self.resolve  # type: ignore[attr-defined]
        constructors = self.yaml_constructors  # type: ignore[attr-defined]
        scalar_kind, mapping_start, sequence_start = yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent
        get()  # StreamStartEvent
        event = get()
        if isinstance(event, yaml.StreamEndEvent):
            return None
        # One entry per open collection: [the dict or list, the key waiting for its value, that key's event].
        stack: list[list[Any]] = []
        while True:
            event = get()
            kind = type(event)
            if kind is scalar_kind:
                if len(stack) > MAX_DEPTH:
                    raise _Refused(f"nested more than {MAX_DEPTH} levels deep")
                tag = event.tag
                if tag is None or tag == "!":
                    tag = resolve(yaml.ScalarNode, event.value, event.implicit)
                node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
                value = (constructors.get(tag) or constructors[None])(self, node)
            elif kind is mapping_start or kind is sequence_start:
                if len(stack) > MAX_DEPTH:
                    raise _Refused(f"nested more than {MAX_DEPTH} levels deep")
                tag = event.tag
                default = _MAP if kind is mapping_start else _SEQ
                if tag is not None and tag != "!" and tag != default:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"could not determine a constructor for the tag {tag!r}", event.start_mark)
                stack.append([{} if kind is mapping_start else [], _NO_KEY, None])
                continue
            elif kind is yaml.AliasEvent:
                raise _Refused(f"found an alias (*{event.anchor}) at line {event.start_mark.line + 1}; "
                               "opaudit files never use YAML aliases")
            else:  # the end of the innermost collection
                value = stack.pop()[0]
            if not stack:
                break
            top = stack[-1]
            container = top[0]
            if type(container) is list:
                container.append(value)
            elif top[1] is _NO_KEY:
                try:
                    hash(value)
                except TypeError:
                    raise _Refused(f"a list or mapping as a mapping key at line {event.start_mark.line + 1}") \
                        from None
                top[1], top[2] = value, event
            else:
                key = top[1]
                if key in container:
                    raise _Refused(f"duplicate key {key!r} at line {top[2].start_mark.line + 1}")
                container[key] = value
                top[1] = _NO_KEY
        get()  # DocumentEndEvent
        event = get()
        if not isinstance(event, yaml.StreamEndEvent):
            raise _Refused(f"a second YAML document at line {event.start_mark.line + 1}; an opaudit file is one "
                           "document")
        return value


class _PythonLoader(_StrictLoading, yaml.SafeLoader):
    """PyYAML's own parser: where libyaml is missing."""


_CSafeLoader = getattr(yaml, "CSafeLoader", None)
_LibyamlLoader = type("_LibyamlLoader", (_StrictLoading, _CSafeLoader), {}) if _CSafeLoader is not None else None
"""libyaml's parser (``yaml.CSafeLoader``), about 10x faster on a large file."""

_Loader = _LibyamlLoader or _PythonLoader


def safe_load(text: str, loader: type | None = None) -> Any:
    """``yaml.safe_load`` semantics (plain data only); aliases, several documents, nesting deeper than
    :data:`MAX_DEPTH` and duplicate keys refused (``yaml.YAMLError``). ``loader``: :data:`_Loader` unless
    a test or the bench picks PyYAML's own parser."""
    reader = (loader or _Loader)(text)
    try:
        return reader.load_strict()
    except yaml.YAMLError as e:
        # Some libyaml builds (0.2.5 with its depth limit) stop at their own maximum
        # nesting before our check sees the 33rd level: the same refusal, in our words.
        if "exceeded maximum nesting depth" in str(e):
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep") from None
        raise
    finally:
        reader.dispose()


def read_document(path: str) -> Any:
    """Parse a YAML or JSON file safely; :class:`ReportError` with a one-line reason.

    JSON is told from YAML by its first character, not the file name: opaudit
    writes JSON to any name ``-o`` gives it. Only regular files of at most
    :data:`opaudit.data.fileio.MAX_INPUT_BYTES` are read.
    """
    try:
        text = read_input(path)
    except FileError as e:
        raise ReportError(str(e)) from None
    try:
        data = _parse(text, path)
    except RecursionError:
        raise ReportError(f"{path}: refused: nested too deeply for an opaudit file") from None
    except ValueError as e:
        # int() past sys.get_int_max_str_digits, in YAML or JSON: no opaudit field is that long.
        raise ReportError(f"{path}: refused: a number too long for an opaudit file ({str(e).split(':')[0]})") from None
    _check_plain(data, path)
    return data


def _parse(text: str, path: str) -> Any:
    if text.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(text, object_pairs_hook=_json_object)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: invalid JSON (line {e.lineno}: {e.msg})") from None
        except _Refused as e:
            raise ReportError(f"{path}: refused: {e}") from None
    try:
        data = safe_load(text)
    except _Refused as e:
        raise ReportError(f"{path}: refused: {e}") from None
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


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Refused(f"duplicate key {key!r} in a JSON object")
    return obj


MAX_DEPTH = 32
"""Deepest nesting of mappings and lists an opaudit file has (a handful) with room to spare."""


def _check_plain(data: Any, path: str) -> None:
    """Refuse what no opaudit file holds: deep nesting and numbers that are not finite."""
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ReportError(f"{path}: refused: nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, Mapping):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node if not isinstance(k, str))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _is_ours(data: Any) -> bool:
    return isinstance(data, Mapping) and str(data.get("format", "")).startswith("opaudit-")


def _first_line(s: str | None) -> str:
    return (s or "").strip().splitlines()[0] if s else "unknown tag"


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path``: :func:`opaudit.data.fileio.write_output` (atomic for regular files)."""
    write_output(path, text)
