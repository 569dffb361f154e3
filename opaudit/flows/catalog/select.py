"""Which ops a sweep runs: OpInfo entries and ``torch.nn`` modules, per dtype, chosen by ``--ops`` globs."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from opaudit.aten.signature import dtype_abbreviations
from opaudit.data.catalog import ALL_DTYPES
from opaudit.flows.catalog.config import DEFAULT_DTYPES
from opaudit.flows.catalog.entries import CatalogError

# Names of torch.nn modules swept from ``common_modules.module_db`` are prefixed with
# ``nn.`` there too; OpInfo covers a module when an OpInfo entry has the module's
# name in lower case as its last dotted part (``nn.Conv2d`` ↔ ``nn.functional.conv2d``).
MODULE_TASK, OPINFO_TASK = "module", "opinfo"


FUNCTION, INPLACE, OUT = "", "inplace", "out"
"""How a task calls its OpInfo entry: the function (``torch.put``), its in-place method (``Tensor.put_``),
or the function with ``out=`` tensors (``torch.median(x, 0, out=(v, i))``, aten's ``median.dim_values``)."""

OUT_FORMS = frozenset({"median"})
"""OpInfo entries that OpInfo marks without ``out=`` support although the function takes ``out=`` for some
samples, and whose ``out=`` overload PyTorch documents (``median`` with indices output)."""

INDEX_DTYPE = "int64"
"""The dtype of an entry that supports none of the requested dtypes but takes integers only (``bincount``)."""


@dataclass(frozen=True)
class Task:
    """One OpInfo entry or module, for one dtype, called one way."""

    source: str
    kind: str
    """``opinfo`` or ``module``."""
    dtype: str
    form: str = FUNCTION
    """:data:`FUNCTION`, :data:`INPLACE` or :data:`OUT`."""

    @property
    def label(self) -> str:
        """``put``, or ``put@inplace`` / ``median@out``: the name the catalog's ``source`` fields use."""
        return f"{self.source}@{self.form}" if self.form else self.source

    @property
    def task_id(self) -> str:
        """``label:dtype``."""
        return f"{self.label}:{self.dtype}"


def opinfo_name(op: Any) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


@functools.lru_cache(maxsize=1)
def databases() -> tuple[dict[str, Any], dict[str, Any]]:
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
    return {opinfo_name(o): o for o in op_db}, {m.name: m for m in module_db}


def _module_covered(name: str, opinfos: Mapping[str, Any]) -> bool:
    tails = {n.split(".")[-1].replace("_", "") for n in opinfos}
    return name.split(".")[-1].lower() in tails


def _aliases(name: str, op: Any) -> list[str]:
    """Names an OpInfo entry's function form answers to in ``--ops``: its own and its aten names."""
    out = [name, op.name]
    aten = getattr(op, "aten_name", None) or op.name
    if "." not in aten:
        out += [f"aten.{aten}", f"aten::{aten}"]
    back = getattr(op, "aten_backward_name", None)
    if back:
        out.append(f"aten.{back}")
    return out


def _form_aliases(name: str, op: Any, form: str) -> list[str]:
    """Names the in-place or ``out=`` form of an OpInfo entry answers to: ``put_``, ``aten.put_``,
    ``put@inplace``; ``median@out`` and the aten ``out=`` overloads (``aten.median.dim_values``)."""
    aten = getattr(op, "aten_name", None) or op.name
    if form == INPLACE:
        out = [f"{name}@{INPLACE}"]
        if not op.name.endswith("_"):
            out += [f"{op.name}_", f"aten.{aten}_", f"aten::{aten}_"]
        return out
    return [f"{name}@{OUT}", *_out_overloads(aten)]


@functools.cache
def _out_overloads(aten: str) -> tuple[str, ...]:
    """``aten.median.dim_values``...: the overloads of ``aten`` that write ``out=`` tensors."""
    import torch

    if "." in aten:
        return ()
    packet = getattr(torch.ops.aten, aten, None)
    if packet is None:
        return ()
    out = []
    for overload in packet.overloads():
        try:
            schema = getattr(packet, overload)._schema
        except (AttributeError, RuntimeError):
            continue
        if any(a.is_out for a in schema.arguments):
            out.append(f"aten.{aten}.{overload}")
    return tuple(out)


def _forms(op: Any) -> tuple[str, ...]:
    """The forms an OpInfo entry is swept in: the function, and its in-place and ``out=`` forms where it has
    them (an entry named like a method, ``resize_``, is in-place already)."""
    forms = [FUNCTION]
    if getattr(op, "inplace_variant", None) is not None and not op.name.endswith("_"):
        forms.append(INPLACE)
    if getattr(op, "supports_out", False) or op.name in OUT_FORMS:
        forms.append(OUT)
    return tuple(forms)


def parse_dtypes(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """Validated dtype names (``float32,bfloat16``), or ``("all",)`` for every dtype each op supports
    (:data:`~opaudit.data.catalog.ALL_DTYPES`); :class:`CatalogError` names the bad one."""
    import torch

    names = DEFAULT_DTYPES if text is None else (
        [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text))
    if [n for n in names if n] == [ALL_DTYPES]:
        return (ALL_DTYPES,)
    out = []
    for n in names:
        if not n:
            continue
        n = n.replace("torch.", "")
        if not isinstance(getattr(torch, n, None), torch.dtype):
            close = difflib.get_close_matches(n, list(dtype_abbreviations().values()), n=3)
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
    """The (entry, form, dtype) tasks to sweep, in a stable order.

    ``patterns`` are globs over OpInfo names (``nn.functional.max_unpool2d``,
    ``index_put``), their aten names (``aten.index_put*``), in-place names (``put_``),
    ``out=`` overloads (``aten.median.dim_values``) and module names (``nn.LSTM``); a
    name takes its variants and forms. Without patterns: every OpInfo entry in each of
    its forms, plus the modules that no OpInfo entry covers when ``modules`` is true.
    An OpInfo entry on integers only is swept in ``int64`` when none of ``dtypes`` applies.
    ``dtypes`` ``("all",)`` sweeps each entry in every dtype it supports on the device.
    """
    import torch

    opinfos, module_infos = databases()
    device_type = device.split(":")[0]
    pats = [p.strip() for p in (patterns or []) if p.strip()]
    chosen: dict[tuple[str, str], str] = {}
    """(name, form) → task kind."""

    def candidates() -> Iterator[tuple[str, str, list[str]]]:
        for n, o in opinfos.items():
            for form in _forms(o):
                yield n, form, (_aliases(n, o) if form == FUNCTION else _form_aliases(n, o, form))
        for n in module_infos:
            yield n, FUNCTION, [n]

    if pats:
        every = list(candidates())
        for p in pats:
            hits = [(n, form) for n, form, aliases in every if any(fnmatch.fnmatchcase(a, p) for a in aliases)]
            if not hits:
                names = sorted(set(itertools.chain.from_iterable(aliases for _, _, aliases in every)))
                close = difflib.get_close_matches(p.replace("*", ""), names, n=5, cutoff=0.5)
                hint = f"; closest: {', '.join(close)}" if close else ""
                raise CatalogError(f"--ops {p!r} matches no OpInfo entry, aten name or module{hint}")
            for n, form in hits:
                chosen[(n, form)] = OPINFO_TASK if n in opinfos else MODULE_TASK
    else:
        chosen = {(n, form): OPINFO_TASK for n, o in opinfos.items() for form in _forms(o)}
        if modules:
            chosen.update({(n, FUNCTION): MODULE_TASK for n in module_infos if not _module_covered(n, opinfos)})
    every = list(dtypes) == [ALL_DTYPES]
    wanted = [] if every else [getattr(torch, d) for d in dtypes]
    index_dtype = getattr(torch, INDEX_DTYPE)
    tasks = []
    for name, form in sorted(chosen):
        kind = chosen[(name, form)]
        info = opinfos[name] if kind == OPINFO_TASK else module_infos[name]
        try:
            supported = info.supported_dtypes(device_type)
        except Exception:  # a broken entry is swept and reported, not fatal
            supported = set(wanted) if wanted else {getattr(torch, DEFAULT_DTYPES[0])}
        picked = sorted(supported, key=str) if every else [dt for dt in wanted if dt in supported]
        if not picked and kind == OPINFO_TASK and supported and not any(
                dt.is_floating_point or dt.is_complex for dt in supported) and index_dtype in supported:
            # An op on integers only (bincount, histogram counts): swept in int64 rather than left out.
            picked = [index_dtype]
        tasks += [Task(name, kind, str(dt).replace("torch.", ""), form) for dt in picked]
    if not tasks:
        raise CatalogError(f"none of the selected ops supports {', '.join(dtypes)} on {device}")
    return tasks
