"""Recording: every aten op the user's code runs, deduplicated by signature.

The public :class:`Recorder` owns the results; a private ``TorchDispatchMode``
only intercepts calls and forwards them to it (the shape of PyTorch's own
``FlopCounterMode``). Ops are attributed to the user's source line and module; a
backward op is attributed to the forward line that created its autograd node.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opaudit.ops import OpKind, op_kind, written_args
from opaudit.tensors import CaptureError, Snapshot

if TYPE_CHECKING:
    from opaudit.report import Report

DEFAULT_CAPTURE_BUDGET = 2 * 1024**3
"""Default memory budget for captured inputs, in bytes (2 GiB)."""

MAX_SITES = 8
"""Distinct source sites kept per signature; further sites are only counted."""

FORWARD, BACKWARD, OPTIMIZER = "forward", "backward", "optimizer"

_get_seq_nr: Callable[[], int] | None = getattr(torch._C._autograd, "_get_sequence_nr", None)
_graph_task_id = torch._C._current_graph_task_id
_current_node = torch._C._current_autograd_node


class RecordError(Exception):
    """Recording could not start or finish (e.g. nested recorders)."""


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


UNKNOWN_SITE = Site("<unknown>", 0, "", "")


@dataclass(frozen=True)
class RecordedSignature:
    """One unique op signature seen while recording. Holds no tensors."""

    id: str
    """Stable short hash of op and signature text."""
    op: str
    """Overload name, e.g. ``aten.index_put_.default``."""
    kind: OpKind
    signature: str
    """Arguments by dtype, shape, stride (when not contiguous) and device; other values as given."""
    device: str
    calls: int
    phases: tuple[str, ...]
    sites: tuple[Site, ...]
    """Distinct sites in first-seen order, at most :data:`MAX_SITES`."""
    sites_dropped: int
    """Sites seen beyond :data:`MAX_SITES`."""
    first_call: int
    """1-based position of the first call in execution order."""
    skip_reason: str | None
    """Why the op cannot be replayed (capture budget, capture OOM...), else ``None``."""


@dataclass
class _Entry:
    """Mutable accumulator behind a :class:`RecordedSignature`."""

    func: Any
    kind: OpKind
    key: Any
    first_call: int
    calls: int = 0
    phases: dict = field(default_factory=dict)
    sites: dict = field(default_factory=dict)
    sites_dropped: int = 0
    snapshot: Snapshot | None = None
    skip_reason: str | None = None
    text: str | None = None


def _key(a: Any) -> Any:
    """Hashable signature key of one argument."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.shape, a.stride(), a.device)
    if isinstance(a, (list, tuple)):
        return tuple([_key(x) for x in a])
    if isinstance(a, dict):
        return tuple(sorted((k, _key(v)) for k, v in a.items()))
    if isinstance(a, float) and a != a:
        return ("nan",)
    try:
        hash(a)
    except TypeError:
        return ("repr", repr(a))
    return a


_DTYPE_ABBR = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "b8", torch.complex64: "c64", torch.complex128: "c128",
}


def describe(a: Any) -> str:
    """Readable signature text of one argument: ``f32[4,3]{1,4}@cuda:0``."""
    if isinstance(a, torch.Tensor):
        dt = _DTYPE_ABBR.get(a.dtype, str(a.dtype).replace("torch.", ""))
        s = f"{dt}[{','.join(map(str, a.shape))}]"
        if a.layout == torch.strided and not a.is_contiguous():
            s += "{" + ",".join(map(str, a.stride())) + "}"
        elif a.layout != torch.strided:
            s += f"<{str(a.layout).replace('torch.', '')}>"
        if a.device.type != "cpu":
            s += f"@{a.device}"
        return s
    if isinstance(a, (list, tuple)):
        inner = ", ".join(describe(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, torch.dtype):
        return str(a)
    if isinstance(a, float):
        return repr(a)
    return repr(a)


def signature_text(args: tuple, kwargs: dict) -> str:
    """The signature of one call as text, used in reports and for the stable id."""
    parts = [describe(a) for a in args]
    parts += [f"{k}={describe(v)}" for k, v in sorted(kwargs.items())]
    return ", ".join(parts)


def signature_id(op: str, text: str) -> str:
    """Stable 12-hex id of a signature: the same op and text give the same id everywhere."""
    return hashlib.sha1(f"{op}({text})".encode()).hexdigest()[:12]


def _internal_roots() -> tuple[tuple[str, ...], str]:
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    pkg_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
    stdlib = {sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "platstdlib")}
    return (torch_dir, pkg_dir, *sorted(stdlib)), os.path.join(pkg_dir, "examples") + os.sep


_INTERNAL_PREFIXES, _EXAMPLES_DIR = _internal_roots()


def _is_internal(filename: str) -> bool:
    if filename.startswith("<"):
        return not filename.startswith("<stdin")
    if filename.startswith(_EXAMPLES_DIR):
        return False
    return filename.startswith(_INTERNAL_PREFIXES)


def relative_path(filename: str, root: str | None) -> str:
    """``filename`` relative to ``root`` or to the ``sys.path`` entry holding it: never absolute."""
    if filename.startswith(_EXAMPLES_DIR):
        return "opaudit/examples/" + filename[len(_EXAMPLES_DIR):].replace(os.sep, "/")
    candidates = ([root] if root else []) + [p for p in sys.path if p]
    best = None
    for base in candidates:
        base = os.path.abspath(base) + os.sep
        if filename.startswith(base) and (best is None or len(base) > len(best)):
            best = base
            if base.rstrip(os.sep) == (os.path.abspath(root) if root else None):
                break
    if best is not None:
        return filename[len(best):].replace(os.sep, "/")
    if not os.path.isabs(filename):
        return filename
    return os.path.basename(filename)


class SiteTracker:
    """Tracks the current module and resolves the user's source site of a call.

    Forward ops read the innermost user frame (cached per code object) and the
    module stack, kept by global module hooks. ``ModuleTracker`` keeps an
    unordered set of modules and adds a grad hook per module call; a stack plus
    autograd node metadata is both cheaper and exact: every forward op that creates
    an autograd node stores its site under the node's sequence number, and a
    backward op looks up the node the engine is running.
    """

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root) if root else None
        self._stack: list[str] = []
        self._names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._internal: dict[Any, bool] = {}
        self._sites: dict[tuple, Site] = {}
        self._node_sites: dict[int, Site] = {}
        self._last_nr = _get_seq_nr() if _get_seq_nr else -1
        self.in_optimizer = 0
        self._handles: list[Any] = []

    # -- module stack -------------------------------------------------------
    def _name(self, mod: torch.nn.Module) -> str:
        name = self._names.get(mod)
        if name is None:
            name = type(mod).__name__
            self._names[mod] = name
            for child_name, child in mod.named_modules(prefix=name):
                if child is not mod and child not in self._names:
                    self._names[child] = child_name
        return name

    def _pre(self, mod: torch.nn.Module, *_: Any) -> None:
        self._stack.append(self._name(mod))

    def _post(self, mod: torch.nn.Module, *_: Any) -> None:
        if self._stack:
            self._stack.pop()

    def _opt_pre(self, *_: Any) -> None:
        self.in_optimizer += 1

    def _opt_post(self, *_: Any) -> None:
        self.in_optimizer = max(0, self.in_optimizer - 1)

    def start(self) -> None:
        """Install the global module and optimizer hooks."""
        from torch.nn.modules import module as nn_module
        from torch.optim import optimizer as optim_module

        self._handles.append(nn_module.register_module_forward_pre_hook(self._pre))
        try:
            self._handles.append(nn_module.register_module_forward_hook(self._post, always_call=True))
        except TypeError:  # torch without always_call
            self._handles.append(nn_module.register_module_forward_hook(self._post))
        self._handles.append(optim_module.register_optimizer_step_pre_hook(self._opt_pre))
        self._handles.append(optim_module.register_optimizer_step_post_hook(self._opt_post))

    def stop(self) -> None:
        """Remove every hook installed by :meth:`start`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    # -- sites --------------------------------------------------------------
    @property
    def module(self) -> str:
        """Innermost module running now, or ``""``."""
        return self._stack[-1] if self._stack else ""

    def frame_site(self, module: str, depth: int = 2) -> Site:
        """The innermost frame of user code (not torch, not opaudit, not the stdlib)."""
        f = sys._getframe(depth)
        internal = self._internal
        while f is not None:
            code = f.f_code
            r = internal.get(code)
            if r is None:
                r = internal[code] = _is_internal(code.co_filename)
            if not r:
                break
            f = f.f_back
        if f is None:
            key = (None, 0, module)
        else:
            key = (f.f_code, f.f_lineno, module)
        site = self._sites.get(key)
        if site is None:
            if f is None:
                site = Site("<torch>", 0, "", module)
            else:
                site = Site(relative_path(f.f_code.co_filename, self.root), f.f_lineno, f.f_code.co_name, module)
            self._sites[key] = site
        return site

    def current(self) -> tuple[str, Site]:
        """Phase and site of the op being dispatched now."""
        if _graph_task_id() != -1:
            node = _current_node()
            site = None
            if node is not None:
                site = self._node_sites.get(node._sequence_nr())
            if site is None:
                site = self.frame_site("", depth=3)
            return BACKWARD, site
        site = self.frame_site(self.module, depth=3)
        if _get_seq_nr is not None:
            nr = _get_seq_nr()
            if nr != self._last_nr:
                # This op's autograd layer created node ``nr - 1``: remember its site
                # for the backward ops that node will run.
                self._last_nr = nr
                self._node_sites[nr - 1] = site
        return (OPTIMIZER if self.in_optimizer else FORWARD), site


class _RecordingMode(TorchDispatchMode):
    """Intercepts every aten call and forwards it to the recorder before running it."""

    def __init__(self, on_call: Callable[[Any, tuple, dict], None]) -> None:
        super().__init__()
        self._on_call = on_call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._on_call(func, args, kwargs)
        return func(*args, **kwargs)


class Recorder:
    """Records every aten op run inside ``with Recorder() as rec:``.

    >>> with Recorder() as rec:
    ...     loss = model(x).sum(); loss.backward()
    >>> report = rec.classify(reps=5)

    Each unique signature keeps its call count, phases, sites and a snapshot of
    the inputs of its first call, within ``capture_budget`` bytes.
    """

    def __init__(self, capture_budget: int = DEFAULT_CAPTURE_BUDGET, root: str | None = None) -> None:
        self.capture_budget = capture_budget
        self.sites = SiteTracker(root)
        self._entries: dict[Any, _Entry] = {}
        self._view_calls: dict[str, int] = {}
        self.total_calls = 0
        self.captured_bytes = 0
        self._mode: _RecordingMode | None = None
        self._active = False

    # -- context ------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        if self._active:
            raise RecordError("this Recorder is already recording")
        self._active = True
        self.sites.start()
        self._mode = _RecordingMode(self._on_call)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
        finally:
            self._mode = None
            self.sites.stop()
            self._active = False

    # -- hot path -----------------------------------------------------------
    def _on_call(self, func: Any, args: tuple, kwargs: dict) -> None:
        self.total_calls += 1
        kind = op_kind(func)[0]
        if kind is OpKind.VIEW:
            name = str(func)
            self._view_calls[name] = self._view_calls.get(name, 0) + 1
            return
        try:
            key = (func, _key(args), _key(kwargs) if kwargs else None)
            hash(key)
        except Exception:  # noqa: BLE001 - an unhashable value still gets recorded
            key = (func, repr(args), repr(kwargs))
        phase, site = self.sites.current()
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry(func, kind, key, self.total_calls)
            entry.text = signature_text(args, kwargs)
            self._entries[key] = entry
            if kind in (OpKind.COMPUTE, OpKind.RANDOM):
                self._capture(entry, func, args, kwargs)
            elif kind is OpKind.SIDE_EFFECT:
                entry.skip_reason = op_kind(func)[1]
        entry.calls += 1
        entry.phases[phase] = True
        sites = entry.sites
        if site in sites:
            sites[site] += 1
        elif len(sites) < MAX_SITES:
            sites[site] = 1
        else:
            entry.sites_dropped += 1

    def _capture(self, entry: _Entry, func: Any, args: tuple, kwargs: dict) -> None:
        estimate = _estimate_bytes(args, kwargs)
        if self.captured_bytes + estimate > self.capture_budget:
            entry.skip_reason = "capture budget"
            return
        pos_w, kw_w = written_args(func)
        written = [pos_w[i] if i < len(pos_w) else False for i in range(len(args))]
        written += [k in kw_w for k in kwargs]
        try:
            snap = Snapshot(args, kwargs, written)
        except CaptureError as e:
            entry.skip_reason = str(e) if str(e) == "capture OOM" else f"capture failed: {e}"
            return
        except Exception as e:  # noqa: BLE001 - the user's run must carry on
            entry.skip_reason = f"capture failed: {type(e).__name__}: {e}"
            return
        if self.captured_bytes + snap.nbytes > self.capture_budget:
            entry.skip_reason = "capture budget"
            return
        self.captured_bytes += snap.nbytes
        entry.snapshot = snap

    # -- results ------------------------------------------------------------
    def _entries_in_order(self) -> Iterator[_Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.first_call))

    def signatures(self) -> list[RecordedSignature]:
        """Every unique non-view signature, in order of first call."""
        out = []
        for e in self._entries_in_order():
            op = str(e.func)
            out.append(RecordedSignature(
                id=signature_id(op, e.text or ""),
                op=op,
                kind=e.kind,
                signature=e.text or "",
                device=_device_of(e),
                calls=e.calls,
                phases=tuple(p for p in (FORWARD, BACKWARD, OPTIMIZER) if p in e.phases),
                sites=tuple(e.sites),
                sites_dropped=e.sites_dropped,
                first_call=e.first_call,
                skip_reason=e.skip_reason,
            ))
        return out

    def items(self) -> list[tuple[RecordedSignature, Any, Snapshot | None]]:
        """``(signature, op overload, snapshot)`` triples in order of first call."""
        sigs = self.signatures()
        return [(s, e.func, e.snapshot) for s, e in zip(sigs, self._entries_in_order())]

    @property
    def view_calls(self) -> dict[str, int]:
        """Calls of view and metadata ops, by op name (not replayed)."""
        return dict(sorted(self._view_calls.items()))

    def release(self) -> None:
        """Drop every captured input (the signatures stay)."""
        for e in self._entries.values():
            e.snapshot = None
        self.captured_bytes = 0

    def classify(self, **options: Any) -> "Report":
        """Replay every signature and build a :class:`~opaudit.report.Report`.

        Keyword options are those of :func:`opaudit.audit.build_report`.
        """
        from opaudit.audit import build_report

        return build_report(self, **options)


def _device_of(e: _Entry) -> str:
    if e.snapshot is not None:
        devices = [str(d) for d in e.snapshot.devices]
    else:
        devices = [str(p) for p in _walk_key(e.key) if isinstance(p, torch.device)]
    accelerators = sorted(d for d in devices if d != "cpu")
    return accelerators[0] if accelerators else "cpu"


def _walk_key(k: Any) -> Iterator[Any]:
    if isinstance(k, tuple) and not isinstance(k, torch.Size):
        for x in k:
            yield from _walk_key(x)
    else:
        yield k


def _estimate_bytes(args: tuple, kwargs: dict) -> int:
    total = 0
    stack: list[Any] = [args, kwargs]
    while stack:
        a = stack.pop()
        if isinstance(a, torch.Tensor):
            total += a.numel() * a.element_size()
        elif isinstance(a, (list, tuple)):
            stack.extend(a)
        elif isinstance(a, dict):
            stack.extend(a.values())
    return total
