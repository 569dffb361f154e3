"""Which ops a sweep runs: OpInfo entries and ``torch.nn`` modules, per dtype, chosen by ``--ops`` globs."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opaudit.flows.catalog.config import DEFAULT_DTYPES
from opaudit.flows.catalog.keys import dtype_abbreviations
from opaudit.flows.catalog.model import CatalogError

# Names of torch.nn modules swept from ``common_modules.module_db`` are prefixed with
# ``nn.`` there too; OpInfo covers a module when an OpInfo entry has the module's
# name in lower case as its last dotted part (``nn.Conv2d`` ↔ ``nn.functional.conv2d``).
MODULE_TASK, OPINFO_TASK = "module", "opinfo"


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
    """The (entry, dtype) pairs to sweep, in a stable order.

    ``patterns`` are globs over OpInfo names (``nn.functional.max_unpool2d``,
    ``index_put``), their aten names (``aten.index_put*``) and module names
    (``nn.LSTM``). Without patterns: every OpInfo entry, plus the modules that no
    OpInfo entry covers when ``modules`` is true.
    """
    import torch

    opinfos, module_infos = databases()
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
                chosen[n] = OPINFO_TASK if n in opinfos else MODULE_TASK
    else:
        chosen = {n: OPINFO_TASK for n in opinfos}
        if modules:
            chosen.update({n: MODULE_TASK for n in module_infos if not _module_covered(n, opinfos)})
    wanted = [getattr(torch, d) for d in dtypes]
    tasks = []
    for name in sorted(chosen):
        info = opinfos[name] if chosen[name] == OPINFO_TASK else module_infos[name]
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
