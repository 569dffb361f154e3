"""Hardware catalogs: every op in PyTorch's OpInfo database, audited on one device.

A sweep takes each OpInfo entry (and each ``torch.nn`` module that OpInfo does
not cover) and, per dtype, records the sample's forward and, where the op
supports autograd, the backward of its output with a non-uniform gradient. The
recorded signatures go through the model audit's own path
(:func:`opaudit.flows.pipeline.build_report`: replay, then classify); no verdict is
decided here.

OpInfo samples are tiny (around 5 elements) and nondeterminism from parallel
accumulation or atomics only shows at scale with colliding indices, so every op
also gets **stress** inputs: the same samples scaled to about 10^6 elements, with
integer index arguments redrawn from a handful of values. Each catalog entry
records which input kind exposed its verdict.

Entries are keyed by op overload, dtype and *variant* (the bool and string
arguments that select a different kernel, e.g. ``accumulate=True``), so that
``put_(accumulate=False)``, which raises, and ``put_(accumulate=True)``, which
only diverges, stay two entries. The same key is computed from a model report's
signature text by :func:`entry_key`, which is what ``--against`` looks up.

Each entry is swept in a worker process with a time limit: an op that hangs or
crashes the interpreter costs one restart and is recorded as ``skipped`` with
the reason. A partial file is written atomically every few ops so an
interrupted sweep can be resumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import functools
import itertools
import math
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from opaudit.data.files import ReportError, atomic_write, check_header, dump_yaml, read_document
from opaudit.data.verdict import Verdict

FORMAT = "opaudit-catalog"
VERSION = 1

OPINFO, STRESS = "opinfo", "stress"
INPUT_KINDS = (OPINFO, STRESS)
"""Input kinds, in the order a tie between them is resolved (OpInfo's own samples first)."""

DEFAULT_DTYPES = ("float32",)
DEFAULT_REPS = 3
DEFAULT_INDEX_REPS = 20
"""Replays per mode of a stress signature that takes an integer index argument."""
DEFAULT_OP_TIMEOUT = 60.0
DEFAULT_MAX_SAMPLES = 6
"""OpInfo samples recorded per op and dtype (the first ones OpInfo yields)."""
DEFAULT_STRESS_SAMPLES = 3
"""Stress samples recorded per op and dtype: the largest of each mode that run within :data:`STRESS_CALL_S`."""
STRESS_ELEMENTS = 1_000_000
"""Target size of a stress sample, in elements over all its tensors."""
STRESS_CALL_S = 0.1
"""A stress sample whose forward takes longer than this is dropped for a smaller one."""
CAPTURE_BUDGET = 1024**3
MAX_GRAD_ELEMENTS = 16_000_000
"""Outputs larger than this (an expand of a stress input) get no backward."""
ALARM_GRACE_S = 5.0
"""After the op time limit plus this, Python code of the op is interrupted (see :func:`_alarm`)."""
PROBE_FRACTION = 64
"""A tiled stress candidate is first timed at this fraction of its size."""
STRESS_TRIAL_BUDGET_S = 2.0
"""Time spent trying stress candidates for one op and dtype before settling for fewer."""
COLLISION_VALUES = 4
"""Distinct values left in an index argument of a stress sample."""
PARTIAL_EVERY_S = 20.0
"""The partial file is rewritten at most this often (and after the last op)."""

OK, PARTIAL, FAILED, TIMEOUT, CRASHED = "ok", "partial", "failed", "timeout", "crashed"
"""Status of one swept (OpInfo entry, dtype): every sample ran / the time limit cut it short /
no sample could run / the worker was killed at the hard limit / the worker died."""

# Names of torch.nn modules swept from ``common_modules.module_db`` are prefixed with
# ``nn.`` there too; OpInfo covers a module when an OpInfo entry has the module's
# name in lower case as its last dotted part (``nn.Conv2d`` ↔ ``nn.functional.conv2d``).
_MODULE_KIND, _OPINFO_KIND = "module", "opinfo"


class CatalogError(Exception):
    """A catalog cannot be built or read: bad options, no CUDA, a mismatched partial file."""


# -- model --------------------------------------------------------------------
@dataclass(frozen=True)
class CatalogEntry:
    """The worst behaviour seen for one op overload, dtype and variant on this device."""

    op: str
    """Overload, e.g. ``aten.index_put_.default``."""
    dtype: str
    """``float32``...: the first floating tensor argument's dtype (see :func:`signature_dtype`)."""
    variant: str
    """Non-default bool and string arguments, e.g. ``accumulate=True``; empty for the default kernel."""
    verdict: Verdict
    input_kind: str
    """``opinfo`` or ``stress``: the input kind of the sample behind the verdict (OpInfo's if both showed it)."""
    phase: str
    """``forward``, ``backward`` or both, for the sample behind the verdict."""
    source: str
    """OpInfo or module entry whose sample gave the verdict, e.g. ``nn.functional.max_unpool2d``."""
    signature: str
    """Signature of that sample's call."""
    opinfo: Verdict | None = None
    """Worst verdict on OpInfo's samples (``None``: no OpInfo sample reached this op)."""
    stress: Verdict | None = None
    """Worst verdict on stress samples."""
    seen_in: int = 1
    """Swept entries (OpInfo entry or module, per dtype) whose samples ran this op."""
    alert: str | None = None
    """``no_deterministic_impl`` or ``cublas_workspace`` when deterministic mode raised."""
    error: str = ""
    """First line of the deterministic-mode error (``raises``) or why it was skipped."""
    warning: str = ""
    """First determinism warning under ``warn_only=True`` (``warns``)."""

    @property
    def key(self) -> tuple[str, str, str]:
        """``(op, dtype, variant)``: unique within a catalog."""
        return (self.op, self.dtype, self.variant)


@dataclass(frozen=True)
class SweptOp:
    """One OpInfo entry or module swept for one dtype, and how it went."""

    source: str
    dtype: str
    status: str
    """``ok``, ``partial``, ``failed``, ``timeout`` or ``crashed``."""
    samples: int = 0
    """OpInfo samples that ran."""
    stress_samples: int = 0
    """Stress samples that ran."""
    reason: str = ""
    """Why it is not ``ok``; for ``ok``, notes such as ``no stress input``."""

    @property
    def task_id(self) -> str:
        """``source:dtype``."""
        return f"{self.source}:{self.dtype}"


@dataclass(frozen=True)
class Catalog:
    """Every op's verdict on one device and software stack."""

    environment: Mapping[str, Any]
    """The fingerprint of the process that ran the ops (see :func:`opaudit.engine.environment.fingerprint`)."""
    settings: Mapping[str, Any]
    entries: tuple[CatalogEntry, ...]
    """Sorted by op, dtype and variant."""
    swept: tuple[SweptOp, ...] = ()
    """Every OpInfo entry or module swept, per dtype, sorted; a resumed sweep skips these."""
    complete: bool = True
    """False for the partial file of a sweep still running or interrupted."""
    format: str = FORMAT
    version: int = VERSION

    @property
    def summary(self) -> dict[str, int]:
        """Entries per verdict (every verdict present), plus totals."""
        counts = {v.value: 0 for v in Verdict}
        for e in self.entries:
            counts[e.verdict.value] += 1
        counts["entries"] = len(self.entries)
        counts["ops"] = len({e.op for e in self.entries})
        counts["swept"] = len(self.swept)
        counts["not_swept"] = sum(1 for s in self.swept if s.status in (FAILED, TIMEOUT, CRASHED))
        return counts

    @functools.cached_property
    def _index(self) -> dict[tuple[str, str, str], CatalogEntry]:
        return {e.key: e for e in self.entries}

    def get(self, op: str, dtype: str, variant: str = "") -> CatalogEntry | None:
        """The entry for exactly this key, or ``None``."""
        return self._index.get((op, dtype, variant))

    def variants(self, op: str, dtype: str) -> list[CatalogEntry]:
        """Every entry of ``op`` and ``dtype``, whatever its variant."""
        return [e for e in self.entries if e.op == op and e.dtype == dtype]

    def entries_with(self, *verdicts: Verdict | str) -> list[CatalogEntry]:
        """Entries whose verdict is one of ``verdicts``."""
        want = {Verdict(v) for v in verdicts}
        return [e for e in self.entries if e.verdict in want]

    def to_dict(self) -> dict[str, Any]:
        """Plain, ordered, serialisable form (the file schema)."""
        return {
            "format": self.format,
            "version": self.version,
            "complete": self.complete,
            "environment": dict(sorted(self.environment.items())),
            "settings": dict(sorted(self.settings.items())),
            "summary": self.summary,
            "swept": [swept_dict(s) for s in self.swept],
            "entries": [entry_dict(e) for e in self.entries],
        }


def entry_dict(e: CatalogEntry) -> dict[str, Any]:
    """Dict form of an entry; empty optional fields are left out."""
    d: dict[str, Any] = {
        "op": e.op, "dtype": e.dtype, "variant": e.variant, "verdict": e.verdict.value,
        "input_kind": e.input_kind, "phase": e.phase, "source": e.source, "signature": e.signature,
        "opinfo": e.opinfo.value if e.opinfo else None, "stress": e.stress.value if e.stress else None,
        "seen_in": e.seen_in, "alert": e.alert, "error": e.error, "warning": e.warning,
    }
    return {k: v for k, v in d.items() if v not in (None, "") or k == "variant"}


def swept_dict(s: SweptOp) -> dict[str, Any]:
    """Dict form of a swept op; an empty reason is left out."""
    d: dict[str, Any] = {"source": s.source, "dtype": s.dtype, "status": s.status,
                         "samples": s.samples, "stress_samples": s.stress_samples}
    if s.reason:
        d["reason"] = s.reason
    return d


# -- load ---------------------------------------------------------------------
def _field(d: Mapping, key: str, types: type | tuple, where: str, default: Any = ...) -> Any:
    if key not in d or d[key] is None:
        if default is ...:
            raise ReportError(f"{where}: missing field {key!r}")
        return default
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ReportError(f"{where}: field {key!r} has the wrong type (bool)")
    if not isinstance(v, types):
        raise ReportError(f"{where}: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def _verdict(text: Any, where: str) -> Verdict:
    try:
        return Verdict.parse(str(text))
    except ValueError as e:
        raise ReportError(f"{where}: {e}") from None


def parse_entry(d: Any, where: str) -> CatalogEntry:
    """A :class:`CatalogEntry` from its dict form, checking every field."""
    if not isinstance(d, Mapping):
        raise ReportError(f"{where}: an entry must be a mapping")
    kind = _field(d, "input_kind", str, where)
    if kind not in INPUT_KINDS:
        raise ReportError(f"{where}: input_kind {kind!r} is not one of {', '.join(INPUT_KINDS)}")
    opinfo, stress = d.get("opinfo"), d.get("stress")
    return CatalogEntry(
        op=_field(d, "op", str, where), dtype=_field(d, "dtype", str, where),
        variant=_field(d, "variant", str, where, ""), verdict=_verdict(_field(d, "verdict", str, where), where),
        input_kind=kind, phase=_field(d, "phase", str, where, ""), source=_field(d, "source", str, where, ""),
        signature=_field(d, "signature", str, where, ""),
        opinfo=_verdict(opinfo, where) if opinfo is not None else None,
        stress=_verdict(stress, where) if stress is not None else None,
        seen_in=_field(d, "seen_in", int, where, 1), alert=_field(d, "alert", str, where, None),
        error=_field(d, "error", str, where, ""), warning=_field(d, "warning", str, where, ""),
    )


def parse_swept(d: Any, where: str) -> SweptOp:
    """A :class:`SweptOp` from its dict form."""
    if not isinstance(d, Mapping):
        raise ReportError(f"{where}: a swept op must be a mapping")
    status = _field(d, "status", str, where)
    if status not in (OK, PARTIAL, FAILED, TIMEOUT, CRASHED):
        raise ReportError(f"{where}: unknown status {status!r}")
    return SweptOp(source=_field(d, "source", str, where), dtype=_field(d, "dtype", str, where), status=status,
                   samples=_field(d, "samples", int, where, 0), stress_samples=_field(d, "stress_samples", int, where, 0),
                   reason=_field(d, "reason", str, where, ""))


def catalog_from_dict(data: Any, path: str = "<catalog>") -> Catalog:
    """A :class:`Catalog` from its dict form; :class:`~opaudit.data.report.ReportError` on any mismatch."""
    data = check_header(data, FORMAT, VERSION, path)
    entries = tuple(parse_entry(e, f"{path}: entries[{i}]")
                    for i, e in enumerate(_field(data, "entries", list, path)))
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ReportError(f"{path}: entry {'/'.join(x for x in dup if x)} appears twice (hand-edited?)")
    swept = tuple(parse_swept(s, f"{path}: swept[{i}]") for i, s in enumerate(_field(data, "swept", list, path, [])))
    return Catalog(
        environment=_field(data, "environment", dict, path), settings=_field(data, "settings", dict, path),
        entries=tuple(sorted(entries, key=lambda e: e.key)), swept=tuple(sorted(swept, key=_swept_order)),
        complete=_field(data, "complete", bool, path, True),
    )


def load_catalog(path: str) -> Catalog:
    """Load a catalog file (YAML or JSON); refuses other formats, versions and unsafe YAML."""
    return catalog_from_dict(read_document(path), path)


# -- keys: shared with ``--against`` -------------------------------------------
_TENSOR_TOKEN = re.compile(r"(?<![\w.])([a-z][a-z0-9_]*)\[")
_DTYPE_KWARG = re.compile(r"\bdtype=torch\.([a-z0-9_]+)")


@functools.cache
def _abbreviations() -> dict[str, str]:
    import torch

    from opaudit.aten.signature import DTYPE_ABBR  # the recorder's own spelling of dtypes

    out = {abbr: str(dt).replace("torch.", "") for dt, abbr in DTYPE_ABBR.items()}
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            out.setdefault(name, name)
    return out


_FLOATING = ("float", "bfloat", "complex", "half", "double", "cfloat", "cdouble", "chalf")


def signature_dtype(signature: str) -> str:
    """The dtype a signature is filed under: its first floating or complex tensor's, else its
    first tensor's, else its ``dtype=`` argument's, else ``none``.

    Floating first because index and mask arguments (``where``'s bool condition,
    ``embedding``'s indices) do not pick the kernel's arithmetic.
    """
    abbr = _abbreviations()
    names = [abbr[m.group(1)] for m in _TENSOR_TOKEN.finditer(signature) if m.group(1) in abbr]
    for n in names:
        if n.startswith(_FLOATING):
            return n
    if names:
        return names[0]
    m = _DTYPE_KWARG.search(signature)
    return m.group(1) if m else "none"


def split_signature(signature: str) -> list[str]:
    """Top-level arguments of a signature text (brackets and quotes respected)."""
    parts, depth, quote, start = [], 0, "", 0
    i = 0
    while i < len(signature):
        c = signature[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(signature[start:i].strip())
            start = i + 1
        i += 1
    tail = signature[start:].strip()
    if tail:
        parts.append(tail)
    return parts


_KWARG = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.S)


@functools.lru_cache(maxsize=4096)
def _mode_arguments(op: str) -> tuple[tuple[str, int | None, str], ...] | None:
    """``(name, position or None for keyword-only, repr of default)`` of the op's bool and str arguments."""
    import torch

    parts = op.split(".")
    if len(parts) != 3:
        return None
    ns, packet, overload = parts
    try:
        func = getattr(getattr(getattr(torch.ops, ns), packet), overload)
    except (AttributeError, RuntimeError):
        return None
    out, pos = [], 0
    for a in func._schema.arguments:
        t = str(a.type)
        if t in ("bool", "str", "Optional[bool]", "Optional[str]"):
            default = repr(a.default_value) if a.has_default_value() else ""
            out.append((a.name, None if a.kwarg_only else pos, default))
        if not a.kwarg_only:
            pos += 1
    return tuple(out)


def signature_variant(op: str, signature: str) -> str:
    """The op's bool and string arguments that differ from their defaults, e.g. ``accumulate=True``.

    These select a different kernel (``accumulate``, ``reduce='sum'``,
    ``align_corners``, ``training``), so a catalog keeps one entry per variant.
    """
    modes = _mode_arguments(op)
    if not modes:
        return ""
    args = split_signature(signature)
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for a in args:
        m = _KWARG.match(a)
        if m:
            keywords[m.group(1)] = m.group(2)
        else:
            positional.append(a)
    out = []
    for name, pos, default in modes:
        value = keywords.get(name) if pos is None or name in keywords else (
            positional[pos] if pos < len(positional) else None)
        if value is None or value == default or (value == "None" and default in ("", "None")):
            continue
        out.append(f"{name}={value}")
    return ",".join(out)


def entry_key(op: str, signature: str) -> tuple[str, str, str]:
    """``(op, dtype, variant)`` under which a recorded signature is filed in a catalog."""
    return (op, signature_dtype(signature), signature_variant(op, signature))


# -- merging ------------------------------------------------------------------
def _rank(v: Verdict | None) -> int:
    """Severity for merging: ``skipped`` says nothing about the op, so any measurement beats it."""
    if v is None:
        return -2
    return -1 if v is Verdict.SKIPPED else v.severity


def _worse(a: Verdict | None, b: Verdict | None) -> Verdict | None:
    return a if _rank(a) >= _rank(b) else b


def _preference(e: CatalogEntry) -> tuple:
    return (-_rank(e.verdict), INPUT_KINDS.index(e.input_kind), e.source, e.phase, e.signature)


def merge_entries(a: CatalogEntry, b: CatalogEntry, *, same_sweep: bool = False) -> CatalogEntry:
    """One entry for the same key: the worse verdict's evidence, both kinds' verdicts.

    Ties go to OpInfo's own samples, then to the alphabetically first source, so
    the result does not depend on the order ops were swept in.
    """
    best = min(a, b, key=_preference)
    return dataclasses.replace(
        best, opinfo=_worse(a.opinfo, b.opinfo), stress=_worse(a.stress, b.stress),
        seen_in=max(a.seen_in, b.seen_in) if same_sweep else a.seen_in + b.seen_in,
    )


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0].strip() if (text or "").strip() else ""


def entry_from_finding(f: Any, kind: str, source: str) -> CatalogEntry:
    """A one-sample :class:`CatalogEntry` from an audit :class:`~opaudit.data.report.Finding`."""
    op, dtype, variant = entry_key(f.op, f.signature)
    error = f.reason if f.verdict is Verdict.SKIPPED else (
        _alert_text(f.strict_error) if f.verdict is Verdict.RAISES else "")
    return CatalogEntry(
        op=op, dtype=dtype, variant=variant, verdict=f.verdict, input_kind=kind, phase="/".join(f.phases),
        source=source, signature=f.signature, opinfo=f.verdict if kind == OPINFO else None,
        stress=f.verdict if kind == STRESS else None, seen_in=1, alert=f.alert_kind,
        error=error, warning=_alert_text(f.warnings[0]) if f.warnings and f.verdict is Verdict.WARNS else "",
    )


def _alert_text(message: str | None) -> str:
    """What PyTorch's alert says about the op, without its boilerplate advice."""
    line = _first_line(message)
    return line.split(", but you set 'torch.use_deterministic_algorithms", 1)[0]


def _swept_order(s: SweptOp) -> tuple[str, str]:
    return (s.source, s.dtype)


# -- selecting ops --------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One OpInfo entry or module, for one dtype."""

    source: str
    kind: str
    """``opinfo`` or ``module``."""
    dtype: str

    @property
    def task_id(self) -> str:
        """``source:dtype``."""
        return f"{self.source}:{self.dtype}"


def _opinfo_name(op: Any) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


@functools.lru_cache(maxsize=1)
def _databases() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(OpInfo by full name, module info by name)``; needs ``expecttest`` (``opaudit[catalog]``)."""
    import warnings

    import torch.backends

    frozen = torch.backends.flags_frozen()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.testing._internal.common_methods_invocations import op_db
            from torch.testing._internal.common_modules import module_db
    except ImportError as e:
        raise CatalogError(f"cannot load PyTorch's OpInfo database ({e}); install it with "
                           "pip install 'opaudit[catalog]'") from None
    finally:
        # Importing PyTorch's test utilities freezes the cuDNN flags for its own test
        # suite; replays set and restore them, so thaw them again.
        if not frozen and torch.backends.flags_frozen():
            torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    return {_opinfo_name(o): o for o in op_db}, {m.name: m for m in module_db}


def _module_covered(name: str, opinfos: Mapping[str, Any]) -> bool:
    tails = {n.split(".")[-1].replace("_", "") for n in opinfos}
    return name.split(".")[-1].lower() in tails


def _aliases(name: str, op: Any) -> list[str]:
    """Names an OpInfo entry answers to in ``--ops``: its own and its aten names."""
    out = [name, op.name]
    aten = getattr(op, "aten_name", None) or op.name
    if "." not in aten:
        out += [f"aten.{aten}", f"aten.{aten}_", f"aten::{aten}"]
    back = getattr(op, "aten_backward_name", None)
    if back:
        out.append(f"aten.{back}")
    return out


def parse_dtypes(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """Validated dtype names (``float32,bfloat16``); :class:`CatalogError` names the bad one."""
    import torch

    names = DEFAULT_DTYPES if text is None else (
        [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text))
    out = []
    for n in names:
        if not n:
            continue
        n = n.replace("torch.", "")
        if not isinstance(getattr(torch, n, None), torch.dtype):
            close = difflib.get_close_matches(n, list(_abbreviations().values()), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise CatalogError(f"unknown dtype {n!r}{hint}")
        out.append(n)
    if not out:
        raise CatalogError("no dtype given")
    return tuple(dict.fromkeys(out))


def check_device(device: str) -> str:
    """``cpu`` or ``cuda[:N]``, checked available here."""
    import torch

    d = device.strip().lower()
    if d == "cpu":
        return d
    if d == "cuda" or re.fullmatch(r"cuda:\d+", d):
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise CatalogError(f"--device {device}: CUDA is not available on this machine ({why})")
        if ":" in d and int(d.split(":")[1]) >= torch.cuda.device_count():
            raise CatalogError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return d
    raise CatalogError(f"--device {device!r}: expected cpu, cuda or cuda:N")


def select_tasks(device: str, patterns: Iterable[str] | None, dtypes: Iterable[str],
                 modules: bool = True) -> list[Task]:
    """The (entry, dtype) pairs to sweep, in a stable order.

    ``patterns`` are globs over OpInfo names (``nn.functional.max_unpool2d``,
    ``index_put``), their aten names (``aten.index_put*``) and module names
    (``nn.LSTM``). Without patterns: every OpInfo entry, plus the modules that no
    OpInfo entry covers when ``modules`` is true.
    """
    import torch

    opinfos, module_infos = _databases()
    device_type = device.split(":")[0]
    pats = [p.strip() for p in (patterns or []) if p.strip()]
    chosen: dict[str, str] = {}
    if pats:
        for p in pats:
            hits = [n for n, o in opinfos.items() if any(fnmatch.fnmatchcase(a, p) for a in _aliases(n, o))]
            hits += [n for n in module_infos if fnmatch.fnmatchcase(n, p)]
            if not hits:
                names = sorted(set(itertools.chain.from_iterable(_aliases(n, o) for n, o in opinfos.items()))
                               | set(module_infos))
                close = difflib.get_close_matches(p.replace("*", ""), names, n=5, cutoff=0.5)
                hint = f"; closest: {', '.join(close)}" if close else ""
                raise CatalogError(f"--ops {p!r} matches no OpInfo entry, aten name or module{hint}")
            for n in hits:
                chosen[n] = _OPINFO_KIND if n in opinfos else _MODULE_KIND
    else:
        chosen = {n: _OPINFO_KIND for n in opinfos}
        if modules:
            chosen.update({n: _MODULE_KIND for n in module_infos if not _module_covered(n, opinfos)})
    wanted = [getattr(torch, d) for d in dtypes]
    tasks = []
    for name in sorted(chosen):
        info = opinfos[name] if chosen[name] == _OPINFO_KIND else module_infos[name]
        try:
            supported = info.supported_dtypes(device_type)
        except Exception:  # noqa: BLE001 - a broken entry is swept and reported, not fatal
            supported = set(wanted)
        for dt in wanted:
            if dt in supported:
                tasks.append(Task(name, chosen[name], str(dt).replace("torch.", "")))
    if not tasks:
        raise CatalogError(f"none of the selected ops supports {', '.join(dtypes)} on {device}")
    return tasks


# -- one sweep task (runs in the worker) ------------------------------------------
@dataclass(frozen=True)
class SweepConfig:
    """How each op is swept; stored in the catalog's ``settings``."""

    device: str = "cpu"
    reps: int = DEFAULT_REPS
    stress: bool = True
    op_timeout: float = DEFAULT_OP_TIMEOUT
    max_samples: int = DEFAULT_MAX_SAMPLES
    stress_samples: int = DEFAULT_STRESS_SAMPLES
    stress_elements: int = STRESS_ELEMENTS
    index_reps: int = DEFAULT_INDEX_REPS
    seed: int = 0

    def settings(self, dtypes: tuple[str, ...], ops: tuple[str, ...], modules: bool) -> dict[str, Any]:
        """The catalog's ``settings`` mapping."""
        return {
            "device": self.device, "dtypes": list(dtypes), "ops": list(ops) or ["*"],
            "modules": modules and not ops, "reps": self.reps,
            "stress": self.stress, "stress_elements": self.stress_elements if self.stress else 0,
            "stress_samples": self.stress_samples if self.stress else 0, "max_samples": self.max_samples,
            "index_reps": self.index_reps if self.stress else 0, "op_timeout_s": self.op_timeout,
            "seed": self.seed,
            "grad": "standard normal (non-uniform)",
        }


@dataclass(frozen=True)
class TaskResult:
    """What sweeping one task produced."""

    swept: SweptOp
    entries: tuple[CatalogEntry, ...]


@dataclass
class _Case:
    """One runnable sample: a callable making the output, and whether to run its backward."""

    call: Callable[[], Any]
    grad: bool
    label: str = ""


def _tensor_leaves(obj: Any) -> list[Any]:
    import torch
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _numel(sample: Any) -> int:
    return sum(t.numel() for t in _tensor_leaves((sample.input, sample.args, sample.kwargs)))


def _map_sample(sample: Any, fn: Callable[[Any], Any]) -> Any:
    """A new SampleInput with ``fn`` applied to every tensor."""
    import torch
    from torch.testing._internal.opinfo.core import SampleInput
    from torch.utils._pytree import tree_map

    def leaf(x: Any) -> Any:
        return fn(x) if isinstance(x, torch.Tensor) else x

    return SampleInput(tree_map(leaf, sample.input), args=tree_map(leaf, tuple(sample.args)),
                       kwargs=tree_map(leaf, dict(sample.kwargs)),
                       output_process_fn_grad=sample.output_process_fn_grad, name=sample.name)


def _clone(t: Any) -> Any:
    c = t.detach().clone()
    return c.requires_grad_(t.requires_grad) if t.requires_grad else c


_SIZE_CONSTANTS = {"XS": 3, "S": 5, "M": 10, "L": 20}


@contextlib.contextmanager
def _scaled_sizes(factor: float) -> Iterator[None]:
    """OpInfo's sample functions size tensors with the module constants ``S``, ``M``, ``L``;
    scale them for the duration (restored afterwards)."""
    patched = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith("torch.testing._internal"):
            continue
        for k, v in _SIZE_CONSTANTS.items():
            if type(getattr(mod, k, None)) is int and getattr(mod, k) == v:
                setattr(mod, k, max(v, int(round(v * factor))))
                patched.append((mod, k, v))
    try:
        yield
    finally:
        for mod, k, v in patched:
            setattr(mod, k, v)


def _collide(t: Any, gen: Any) -> Any:
    """The same index tensor with its values redrawn from a few of its own (still valid) values."""
    import torch

    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8) or t.numel() < 2:
        return t
    # A few of the tensor's own values: valid wherever the original was.
    pool = torch.unique(t.detach().flatten()[:4096].cpu())[:COLLISION_VALUES]
    picks = torch.randint(len(pool), tuple(t.shape), generator=gen)
    return pool[picks].to(device=t.device, dtype=t.dtype)


def _with_collisions(sample: Any, float_op: bool, gen: Any) -> Any:
    """Index arguments redrawn with heavy collisions. The input itself is only touched when the
    op is swept for a floating dtype (then an integer input is an index, as in ``embedding``)."""
    new = _map_sample(sample, lambda t: _collide(t, gen))
    if not float_op:
        from torch.testing._internal.opinfo.core import SampleInput

        new = SampleInput(sample.input, args=new.args, kwargs=new.kwargs,
                          output_process_fn_grad=sample.output_process_fn_grad, name=sample.name)
    return new


_INDEX_DTYPES = ("int64", "int32", "int16", "int8", "uint8")


def _is_index(t: Any) -> bool:
    return str(t.dtype).replace("torch.", "") in _INDEX_DTYPES and t.dim() >= 1 and t.shape[0] > 0


def _index_tensor(sample: Any, float_op: bool) -> Any | None:
    """The first integer tensor that indexes: among the arguments, or the input itself when the
    op is swept for a floating dtype (``embedding``'s input is its index)."""
    leaves = _tensor_leaves((sample.args, sample.kwargs))
    if float_op:
        leaves = _tensor_leaves(sample.input) + leaves
    return next((t for t in leaves if _is_index(t)), None)


@dataclass(frozen=True)
class _Candidate:
    """A stress sample not built yet: a sample and how many times to tile it along dim 0."""

    sample: Any
    size0: int
    """Tensors whose dim 0 has this size are tiled; 0 for the sample as it is."""
    reps: int
    numel: int

    def build(self) -> Any:
        if not self.size0:
            return self.sample
        size0, reps = self.size0, self.reps

        def grow(t: Any) -> Any:
            if t.dim() == 0 or t.shape[0] != size0:
                return t
            g = t.detach().repeat(reps, *([1] * (t.dim() - 1)))
            return g.requires_grad_(t.requires_grad) if t.requires_grad else g

        return _map_sample(self.sample, grow)


def _tile(sample: Any, size0: int, target: int, cap: int) -> _Candidate | None:
    """Plan to repeat along dim 0 every tensor whose dim 0 is ``size0`` (a batch, or an index
    and the values that go with it) until the sample holds about ``target`` elements. An index
    tiled this way repeats each of its values: collisions by construction."""
    leaves = _tensor_leaves((sample.input, sample.args, sample.kwargs))
    group = sum(t.numel() for t in leaves if t.dim() > 0 and t.shape[0] == size0)
    rest = sum(t.numel() for t in leaves) - group
    if group == 0 or size0 == 0:
        return None
    reps = max(2, target // group)
    while reps > 2 and rest + group * reps > cap:
        reps //= 2
    if rest + group * reps > cap:
        return None
    return _Candidate(sample, size0, reps, rest + group * reps)


def _opinfo_samples(op: Any, device: str, dtype: Any, grad: bool, n: int) -> list[Any]:
    """OpInfo's first ``n`` samples, seeded as OpInfo's own tests seed them."""
    import torch

    # ``op.sample_inputs`` wraps this in an iterator that walks the stack to find the
    # calling test (tens of ms per call), which a sweep has no use for.
    torch.manual_seed(0)
    return list(itertools.islice(op.sample_inputs_func(op, device, dtype, grad), n))


def _scaled_samples(op: Any, device: str, dtype: Any, grad: bool, base: list[Any], cfg: SweepConfig) -> list[Any]:
    """OpInfo's samples regenerated with the size constants scaled so that the largest comes
    near ``stress_elements``. The scale is set from how each sample grows when the constants
    double (a 3-d sample grows 8x), so no sample overshoots."""
    target, cap = cfg.stress_elements, 4 * cfg.stress_elements
    sizes = [_numel(s) for s in base]
    try:
        with _scaled_sizes(2):
            doubled = [_numel(s) for s in _opinfo_samples(op, device, dtype, grad, cfg.max_samples)]
    except Exception:  # noqa: BLE001 - a sampler that breaks when scaled simply is not scaled
        return []
    if len(doubled) != len(sizes):
        return []
    limits = []
    for a, b in zip(sizes, doubled):
        if a > 0 and b > a:
            exponent = max(1, round(math.log2(b / a)))
            limits.append((target / a) ** (1 / exponent))
    factor = min(limits) if limits else 0.0
    if factor < 2:
        return []
    try:
        with _scaled_sizes(min(factor, 200_000.0)):
            return [s for s in _opinfo_samples(op, device, dtype, grad, cfg.max_samples) if _numel(s) <= cap]
    except Exception:  # noqa: BLE001
        return []


def _index_along_rows(device: str, dtype: Any, grad: bool, target: int) -> list[Any]:
    """``(input [n, n], dim=0, index [n] with 4 distinct rows, source [n, n])``."""
    import torch
    from torch.testing import make_tensor
    from torch.testing._internal.opinfo.core import SampleInput

    n = max(2, int(math.sqrt(target / 2)))
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(0, COLLISION_VALUES, (n,), generator=gen).to(device)
    make = functools.partial(make_tensor, device=device, dtype=dtype, requires_grad=grad)
    return [SampleInput(make((n, n)), args=(0, index, make((n, n))))]


# OpInfo samples that no generic transformation turns into colliding writes along the
# kernel's parallel dimension: their only 2-d samples index along the last dimension.
# Named here, one sampler each, so the list of hand-made inputs stays visible.
STRESS_EXTRAS: dict[str, Callable[[str, Any, bool, int], list[Any]]] = {
    "index_copy": _index_along_rows,
    "index_add": _index_along_rows,
}


def _stress_candidates(op: Any, device: str, dtype: Any, grad: bool, base: list[Any], cfg: SweepConfig) -> list[Any]:
    """Stress samples to try, best first: the named extras, index arguments tiled (many
    colliding indices into data of realistic size), then the scaled samples, then inputs
    tiled along dim 0."""
    target, cap = cfg.stress_elements, 4 * cfg.stress_elements
    float_op = dtype.is_floating_point or dtype.is_complex
    scaled = _scaled_samples(op, device, dtype, grad, base, cfg)
    extra = STRESS_EXTRAS.get(_opinfo_name(op))
    extras = [_Candidate(s, 0, 1, _numel(s)) for s in extra(device, dtype, grad, target)] if extra else []
    by_index: list[_Candidate] = []
    for s in scaled + base:
        idx = _index_tensor(s, float_op)
        if idx is not None:
            c = _tile(s, idx.shape[0], target, cap)
            if c is not None:
                by_index.append(c)
    plain = [_Candidate(s, 0, 1, n) for s in scaled if (n := _numel(s)) >= target // 100]
    by_input = []
    for s in base:
        inp = s.input
        if hasattr(inp, "dim") and inp.dim() > 0:
            c = _tile(s, inp.shape[0], target, cap)
            if c is not None:
                by_input.append(c)
    out: list[_Candidate] = list(extras)
    for group in (by_index, plain, by_input):
        out += sorted(group, key=lambda c: c.numel, reverse=True)
    return out


def _trial(call: Callable[[], Any], device: str, cap: int) -> float | None:
    """Seconds an unrecorded forward takes (the faster of two runs, so that a busy machine
    sways the choice of stress samples less), infinite when its output exceeds ``cap``
    elements, ``None`` if it fails."""
    import torch

    best = math.inf
    for _ in range(2):
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = call()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        except Exception:  # noqa: BLE001
            return None
        # An expand-like op turns a stress input into an output far larger than the input;
        # its gradient alone would dominate the sweep.
        if sum(t.numel() for t in _tensor_leaves(out)) > cap:
            return math.inf
        del out
        if best > STRESS_CALL_S:
            break
    return best


def _sample_call(op: Any, sample: Any) -> Callable[[], Any]:
    def call() -> Any:
        out = op(sample.input, *sample.args, **sample.kwargs)
        return sample.output_process_fn_grad(out) if sample.output_process_fn_grad else out
    return call


def _cloned_call(op: Any, sample: Any) -> Callable[[], Any]:
    """A call on fresh copies (a trial must not mutate the sample an in-place op is recorded on)."""
    return lambda: _sample_call(op, _map_sample(sample, _clone))()


def _opinfo_cases(op: Any, device: str, dtype: Any, cfg: SweepConfig, kind: str) -> tuple[list[_Case], str]:
    import torch

    dtype_name = str(dtype).replace("torch.", "")
    grad = bool(op.supports_autograd) and dtype in op.supported_backward_dtypes(device.split(":")[0])
    base = _opinfo_samples(op, device, dtype, grad, cfg.max_samples)
    if kind == OPINFO:
        return [_Case(_sample_call(op, s), grad, f"sample {i}") for i, s in enumerate(base)], ""
    gen = torch.Generator().manual_seed(cfg.seed)
    float_op = dtype.is_floating_point or dtype.is_complex
    cases: list[_Case] = []
    # One stress sample per mode (the sample's plain arguments: ``accumulate=True``, a bool
    # mask instead of an index...), so a few samples cover an op's kernels, not one kernel
    # at several sizes.
    seen: set[str] = set()
    covered: set[str] = set()
    budget_end = time.monotonic() + STRESS_TRIAL_BUDGET_S
    for cand in _stress_candidates(op, device, dtype, grad, base, cfg):
        if len(cases) >= cfg.stress_samples or time.monotonic() > budget_end:
            break
        shape, mode = _shapes(cand.sample) + repr(cand.size0), _mode(cand.sample)
        if shape in seen or mode in covered:
            continue
        seen.add(shape)
        sample = _fit(cand, lambda v: _cloned_call(op, v), float_op, gen, device, 4 * cfg.stress_elements)
        if sample is not None:
            cases.append(_Case(_sample_call(op, sample), grad, f"stress {_numel(sample)} elements"))
            covered.add(mode)
    note = "" if cases else f"no stress input ({dtype_name}: no sample scales to "\
                            f"{cfg.stress_elements:.0e} elements within {STRESS_CALL_S}s)"
    return cases, note


def _fit(cand: _Candidate, call_of: Callable[[Any], Callable[[], Any]], float_op: bool, gen: Any, device: str,
         cap: int) -> Any | None:
    """The candidate with colliding indices, tiled as far as its forward stays within
    :data:`STRESS_CALL_S`; ``None`` if it fails or is too slow even small.

    A tiled candidate starts at a fraction of its size and grows: an op whose time grows
    with dim 0 (an RNN over a sequence) would otherwise run for minutes at full size.
    """
    def attempt(reps: int) -> tuple[Any, float]:
        s = dataclasses.replace(cand, reps=reps).build() if cand.size0 else cand.sample
        for variant in (_with_collisions(s, float_op, gen), s):
            t = _trial(call_of(variant), device, cap)
            if t is not None:
                return variant, t
        return None, math.inf  # the collided indices broke it, and so did the original

    if not cand.size0 or cand.reps < 4 * PROBE_FRACTION:
        sample, t = attempt(cand.reps)
        return sample if t <= STRESS_CALL_S else None
    reps = cand.reps // PROBE_FRACTION
    sample, t = attempt(reps)
    if sample is None or t > STRESS_CALL_S:
        return None
    while reps < cand.reps:
        # Aim at half the limit from the last timing; at least double, at most the plan.
        bigger = min(cand.reps, max(2 * reps, int(reps * STRESS_CALL_S / 2 / max(t, 1e-6))))
        grown, t_grown = attempt(bigger)
        if grown is None or t_grown > STRESS_CALL_S:
            break
        sample, t, reps = grown, t_grown, bigger
    return sample


def _mode(sample: Any) -> str:
    """Plain arguments, tensor dtypes and ranks: what selects the kernel, whatever the sizes."""
    import torch
    from torch.utils._pytree import tree_flatten

    leaves = tree_flatten((sample.input, sample.args, sample.kwargs))[0]
    return repr([(x.dtype, x.dim()) if isinstance(x, torch.Tensor) else x for x in leaves])


def _shapes(sample: Any) -> str:
    """Shapes and plain arguments: two candidates equal here would record the same signatures."""
    import torch
    from torch.utils._pytree import tree_flatten

    leaves = tree_flatten((sample.input, sample.args, sample.kwargs))[0]
    return repr([tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in leaves])


def _module_cases(info: Any, device: str, dtype: Any, cfg: SweepConfig, kind: str) -> tuple[list[_Case], str]:
    import torch
    from torch.testing._internal.opinfo.core import SampleInput

    grad = dtype.is_floating_point or dtype.is_complex
    inputs = info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=grad, training=True)
    inputs = list(inputs)[: cfg.max_samples]
    gen = torch.Generator().manual_seed(cfg.seed)
    target, cap = cfg.stress_elements, 4 * cfg.stress_elements
    budget_end = time.monotonic() + STRESS_TRIAL_BUDGET_S
    cases = []
    for i, mi in enumerate(inputs):
        try:
            module = info.module_cls(*mi.constructor_input.args, **mi.constructor_input.kwargs)
            module = module.to(device=device, dtype=dtype).train()
        except Exception:  # noqa: BLE001 - a module that cannot be built has no sample here
            continue

        def call_of(s: Any, m: Any = module) -> Callable[[], Any]:
            return lambda: m(s.input, *s.args, **s.kwargs)

        fwd = list(mi.forward_input.args)
        if not fwd:
            continue
        sample = SampleInput(fwd[0], args=tuple(fwd[1:]), kwargs=dict(mi.forward_input.kwargs))
        if kind == STRESS:
            if len(cases) >= cfg.stress_samples or time.monotonic() > budget_end:
                break
            first = sample.input
            if not isinstance(first, torch.Tensor) or first.dim() == 0:
                continue
            # Dim 0 is the batch for most modules (the sequence for RNNs without batch_first).
            cand = _tile(sample, first.shape[0], target, cap)
            fitted = _fit(cand, call_of, grad, gen, device, cap) if cand is not None else None
            if fitted is None:
                continue
            sample = fitted
        cases.append(_Case(call_of(sample), grad, f"{kind} {i}"))
    note = "" if cases or kind == OPINFO else "no stress input (module input does not tile along dim 0)"
    return cases, note


def _run_case(rec: Any, case: _Case, gen: Any, device: str) -> None:
    """Record the forward and, where it has one, the backward with a non-uniform gradient."""
    import torch

    with rec:
        out = case.call()
    if not case.grad:
        return
    outs = [t for t in _tensor_leaves(out) if t.requires_grad and t.grad_fn is not None
            and (t.dtype.is_floating_point or t.dtype.is_complex)]
    if not outs or sum(t.numel() for t in outs) > MAX_GRAD_ELEMENTS:
        return
    # Non-uniform gradients: an all-ones gradient hides atomics whose order does not
    # matter when every addend is equal.
    grads = [torch.randn(tuple(t.shape), dtype=t.dtype, generator=gen).to(t.device) for t in outs]
    with rec:
        torch.autograd.backward(outs, grads)


def _has_index(snap: Any) -> bool:
    args, kwargs, _ = snap.materialize()
    return any(_is_index(t) for t in _tensor_leaves((args, kwargs)))


def _replay_until(deadline: float, index_reps: int = 0) -> Callable[..., Any]:
    """The pipeline's replay, cut off at ``deadline``; signatures with an integer index
    argument get ``index_reps`` runs per mode when that is more."""
    from opaudit.data.observation import Observation
    from opaudit.engine.replay import replay

    def run(func: Any, snap: Any, reps: int, cudnn: bool) -> Observation:
        if time.monotonic() > deadline:
            return Observation(None, None, (), None, None, False, error="op time limit reached")
        if index_reps > reps and _has_index(snap):
            # Colliding writes race only now and then (a few runs in twenty on two busy
            # cores), so the ops that take indices get more chances to show it.
            reps = index_reps
        return replay(func, snap, reps, cudnn_variants=cudnn)

    return run


def sweep_task(task: Task, cfg: SweepConfig) -> TaskResult:
    """Sweep one OpInfo entry or module for one dtype: record OpInfo and stress samples,
    replay and classify through :func:`opaudit.flows.pipeline.build_report`, and key the findings.

    Never raises for the op's own failures: they become the task's status and reason.
    """

    import torch


    deadline = time.monotonic() + cfg.op_timeout
    dtype = getattr(torch, task.dtype)
    opinfos, module_infos = _databases()
    info = opinfos.get(task.source) if task.kind == _OPINFO_KIND else module_infos.get(task.source)
    if info is None:
        return TaskResult(SweptOp(task.source, task.dtype, FAILED, reason="not in this torch's OpInfo database"), ())
    kinds = INPUT_KINDS if cfg.stress else (OPINFO,)
    entries: dict[tuple, CatalogEntry] = {}
    counts = {OPINFO: 0, STRESS: 0}
    first_error, notes, cut = "", [], False
    gen = torch.Generator().manual_seed(cfg.seed)
    with _alarm(cfg.op_timeout + ALARM_GRACE_S):
        try:
            for kind in kinds:
                if time.monotonic() > deadline:
                    cut = True
                    break
                error, kind_cut = _sweep_kind(task, info, kind, dtype, cfg, deadline, gen, entries, counts, notes)
                first_error, cut = first_error or error, cut or kind_cut
        except _OpTimeLimit:
            cut = True
    if any(e.error == "replay failed: op time limit reached" for e in entries.values()):
        cut = True
    ran = counts[OPINFO] + counts[STRESS]
    if ran == 0:
        status, reason = FAILED, first_error or ("time limit reached before any sample ran" if cut else "no sample ran")
    elif cut:
        status, reason = PARTIAL, f"time limit of {cfg.op_timeout:g}s reached"
    else:
        status, reason = OK, "; ".join(notes)
    swept = SweptOp(task.source, task.dtype, status, counts[OPINFO], counts[STRESS], reason)
    return TaskResult(swept, tuple(entries[k] for k in sorted(entries)))


def _sweep_kind(task: Task, info: Any, kind: str, dtype: Any, cfg: SweepConfig, deadline: float, gen: Any,
                entries: dict[tuple, CatalogEntry], counts: dict[str, int], notes: list[str]) -> tuple[str, bool]:
    """Record and classify one input kind of a task into ``entries``.

    Returns the first error and whether the soft time limit cut the samples short.
    """
    import warnings

    import torch

    from opaudit.engine.record import Recorder
    from opaudit.flows.pipeline import build_report

    first_error, cut = "", False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            make = _opinfo_cases if task.kind == _OPINFO_KIND else _module_cases
            cases, note = make(info, cfg.device, dtype, cfg, kind)
        except Exception as e:  # noqa: BLE001 - OpInfo refusing its own samples is a result
            cases, note = [], ""
            first_error = f"{kind} samples: {_error_line(e)}"
        if note:
            notes.append(note)
        rec = Recorder(capture_budget=CAPTURE_BUDGET)
        for case in cases:
            if time.monotonic() > deadline:
                cut = True
                break
            try:
                torch.manual_seed(cfg.seed)
                _run_case(rec, case, gen, cfg.device)
                counts[kind] += 1
            except Exception as e:  # noqa: BLE001
                first_error = first_error or f"{kind} {case.label}: {_error_line(e)}"
        try:
            report = build_report(rec, reps=cfg.reps, seed=cfg.seed, remedies=False, timings=False,
                                  replay_fn=_replay_until(deadline, cfg.index_reps if kind == STRESS else 0))
        finally:
            rec.release()
    for f in report.all_findings:
        e = entry_from_finding(f, kind, task.source)
        entries[e.key] = merge_entries(entries[e.key], e, same_sweep=True) if e.key in entries else e
    return first_error, cut


class _OpTimeLimit(BaseException):
    """Raised by the alarm when an op overruns its time limit in Python code (sample
    generation, a Python-level op). A BaseException so that the ``except Exception``
    around each sample does not swallow it."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`_OpTimeLimit` after ``seconds`` (main thread only; else a no-op).

    A C++ kernel is not interrupted, only the Python code around it: the worker's hard
    limit covers the rest.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise _OpTimeLimit()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _error_line(e: BaseException) -> str:
    line = _first_line(str(e))
    return f"{type(e).__name__}: {line}"[:300] if line else type(e).__name__


# -- running tasks: in process, or in a worker that can be killed ------------------
def _worker_process(fd: int) -> None:
    """Entry point of a sweep worker: read its settings, then sweep tasks until told to stop.

    Started with ``python -c`` rather than ``multiprocessing``'s spawn, which would
    re-run the caller's ``__main__`` in the worker.
    """
    import warnings
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    cfg, threads = conn.recv()
    _limit_memory(worker_memory_limit())
    warnings.simplefilter("ignore")
    import torch

    from opaudit.engine.environment import fingerprint

    if threads:
        torch.set_num_threads(threads)
    _databases()
    conn.send(("ready", fingerprint(cfg.device)))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        try:
            result = sweep_task(task, cfg)
        except Exception as e:  # noqa: BLE001 - reported to the parent as this task's failure
            sys.stderr.write(traceback.format_exc(limit=5))
            result = TaskResult(SweptOp(task.source, task.dtype, FAILED, reason=f"sweep error: {_error_line(e)}"), ())
        conn.send(("result", result))


def worker_memory_limit() -> int:
    """Bytes of heap a sweep worker may use: a quarter of this machine's memory, 2 to 16 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 1024**3
    return int(min(16 * 1024**3, max(2 * 1024**3, total // 4)))


def _limit_memory(limit: int) -> None:
    """Make allocations past ``limit`` fail in this process instead of exhausting the machine.

    A few OpInfo samples, scaled, ask an op for an output of many GiB; with the limit
    the op raises (the sample is dropped) rather than pushing the machine into swap or
    its OOM killer, which would take the user's other processes with it.
    """
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass


class _Worker:
    """A sweep worker process; restarted after a timeout or a crash."""

    START_TIMEOUT = 300.0

    def __init__(self, cfg: SweepConfig, quiet: bool, threads: int | None) -> None:
        self.cfg, self.quiet, self.threads = cfg, quiet, threads
        self.proc: subprocess.Popen | None = None
        self.conn: Any = None
        self.environment: Mapping[str, Any] | None = None

    def start(self) -> None:
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        code = "import sys; from opaudit.flows.catalog.sweep import _worker_process; _worker_process(int(sys.argv[1]))"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL if self.quiet else None)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send((self.cfg, self.threads))
        if not self.conn.poll(self.START_TIMEOUT):
            self.stop()
            raise CatalogError("the sweep worker did not start (importing torch and OpInfo took too long)")
        try:
            _, env = self.conn.recv()
        except EOFError:
            code_ = self.proc.wait()
            self.stop()
            raise CatalogError(f"the sweep worker exited while starting (exit code {code_}); "
                               "rerun with --debug to see its errors") from None
        self.environment = env

    def run(self, task: Task, limit: float) -> TaskResult:
        """Sweep ``task`` in the worker; kill it after ``limit`` seconds."""
        if self.proc is None:
            self.start()
        assert self.proc is not None
        self.conn.send(task)
        end = time.monotonic() + limit
        while True:
            if self.conn.poll(min(1.0, max(0.0, end - time.monotonic()))):
                try:
                    _, result = self.conn.recv()
                    return result
                except EOFError:
                    break
            if self.proc.poll() is not None:
                break
            if time.monotonic() > end:
                self.stop()
                return TaskResult(SweptOp(task.source, task.dtype, TIMEOUT,
                                          reason=f"killed after {limit:.0f}s (hung or too slow)"), ())
        code = self.proc.wait()
        self.stop()
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return TaskResult(SweptOp(task.source, task.dtype, CRASHED, reason=f"worker died ({how})"), ())

    def stop(self) -> None:
        """End the worker (politely, then by force)."""
        if self.proc is not None:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None


# -- building a catalog ----------------------------------------------------------------
@dataclass(frozen=True)
class SweepProgress:
    """Where a running sweep stands; passed to an ``on_progress`` callback."""

    done: int
    total: int
    op: str
    """The task just finished (``source:dtype``)."""
    status: str


@dataclass
class _Accumulator:
    """Entries and swept ops so far (mutable, private to :func:`build_catalog`)."""

    entries: dict[tuple, CatalogEntry] = field(default_factory=dict)
    swept: dict[str, SweptOp] = field(default_factory=dict)

    def add(self, result: TaskResult) -> None:
        self.swept[result.swept.task_id] = result.swept
        for e in result.entries:
            self.entries[e.key] = merge_entries(self.entries[e.key], e) if e.key in self.entries else e

    def catalog(self, env: Mapping[str, Any], settings: Mapping[str, Any], complete: bool) -> Catalog:
        return Catalog(environment=env, settings=settings,
                       entries=tuple(self.entries[k] for k in sorted(self.entries)),
                       swept=tuple(sorted(self.swept.values(), key=_swept_order)), complete=complete)


_RESUME_KEYS = ("torch", "cuda", "cudnn", "gpu", "cpu", "threads", "platform")
"""Fingerprint fields a resumed sweep must share with its partial file."""


def _check_resume(partial: Catalog, path: str, settings: Mapping[str, Any], env: Mapping[str, Any]) -> None:
    for k in ("device", "dtypes", "reps", "stress", "stress_elements", "stress_samples", "index_reps", "max_samples",
              "seed"):
        if partial.settings.get(k) != settings.get(k):
            raise CatalogError(f"{path}: cannot resume: it was made with {k}={partial.settings.get(k)!r}, "
                               f"this sweep uses {settings.get(k)!r} (start over without --resume)")
    for k in _RESUME_KEYS:
        if partial.environment.get(k) != env.get(k):
            raise CatalogError(f"{path}: cannot resume: it was made with {k}={partial.environment.get(k)!r}, "
                               f"this machine has {env.get(k)!r} (start over without --resume)")


def partial_path(output: str) -> str:
    """Where a sweep writing ``output`` keeps its partial file."""
    return output + ".partial"


def build_catalog(
    device: str = "cpu",
    ops: Iterable[str] | None = None,
    dtypes: Iterable[str] | str | None = None,
    *,
    stress: bool = True,
    reps: int = DEFAULT_REPS,
    op_timeout: float = DEFAULT_OP_TIMEOUT,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    stress_samples: int = DEFAULT_STRESS_SAMPLES,
    stress_elements: int = STRESS_ELEMENTS,
    modules: bool = True,
    resume: str | None = None,
    partial: str | None = None,
    isolate: bool = True,
    threads: int | None = None,
    quiet_worker: bool = True,
    on_progress: Callable[[SweepProgress], None] | None = None,
) -> Catalog:
    """Sweep the selected ops on ``device`` and return the :class:`Catalog`.

    ``resume`` names a partial file whose swept ops are kept and not swept again;
    ``partial`` is where the partial file is written (atomically, every
    :data:`PARTIAL_EVERY_S` seconds). With ``isolate`` each op runs in a worker
    process killed at the hard time limit; without it, ops run here and only the
    soft limit between samples applies.

    A ``KeyboardInterrupt`` writes the partial file before propagating.
    """
    if reps < 1:
        raise CatalogError("reps must be at least 1")
    if op_timeout <= 0:
        raise CatalogError("the op time limit must be positive")
    device = check_device(device)
    dtype_names = parse_dtypes(dtypes)
    patterns = tuple(p.strip() for p in (ops or ()) if p.strip())
    cfg = SweepConfig(device=device, reps=reps, stress=stress, op_timeout=op_timeout, max_samples=max_samples,
                      stress_samples=stress_samples, stress_elements=stress_elements)
    tasks = select_tasks(device, patterns, dtype_names, modules=modules)
    settings = cfg.settings(dtype_names, patterns, modules)
    if isolate:
        settings["worker_memory_gib"] = round(worker_memory_limit() / 1024**3, 1)
    acc = _Accumulator()
    prior: Catalog | None = None
    if resume is not None:
        if not os.path.exists(resume):
            raise CatalogError(f"--resume: no partial file at {resume}")
        prior = load_catalog(resume)
    worker = _Worker(cfg, quiet_worker, threads) if isolate else None
    if worker is not None:
        worker.start()
        env = dict(worker.environment or {})
    else:
        import torch

        from opaudit.engine.environment import fingerprint

        if threads:
            torch.set_num_threads(threads)
        env = fingerprint(device)
    if prior is not None:
        _check_resume(prior, resume or "", settings, env)
        for s in prior.swept:
            acc.swept[s.task_id] = s
        for e in prior.entries:
            acc.entries[e.key] = e
    todo = [t for t in tasks if t.task_id not in acc.swept]
    done = len(tasks) - len(todo)
    last_write = time.monotonic()
    hard_limit = op_timeout * 1.5 + 30
    try:
        for i, task in enumerate(todo):
            if worker is not None:
                result = worker.run(task, hard_limit)
                if result.swept.status == CRASHED:
                    # Once more in the fresh worker: a crash can come from the state an
                    # earlier op left behind (a failed allocation deep in a kernel).
                    result = worker.run(task, hard_limit)
            else:
                result = sweep_task(task, cfg)
            acc.add(result)
            if on_progress is not None:
                on_progress(SweepProgress(done + i + 1, len(tasks), task.task_id, result.swept.status))
            if partial and time.monotonic() - last_write > PARTIAL_EVERY_S:
                _write_partial(partial, acc.catalog(env, settings, complete=False))
                last_write = time.monotonic()
    except KeyboardInterrupt:
        if partial:
            _write_partial(partial, acc.catalog(env, settings, complete=False))
        raise
    finally:
        if worker is not None:
            worker.stop()
    return acc.catalog(env, settings, complete=True)


def _write_partial(path: str, catalog: Catalog) -> None:
    atomic_write(path, dump_yaml(catalog.to_dict()))
