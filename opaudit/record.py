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
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opaudit.ops import OpKind, op_kind, written_args
from opaudit.tensors import CaptureError, Snapshot, copy_span

if TYPE_CHECKING:
    from opaudit.report import Report

DEFAULT_CAPTURE_BUDGET = 2 * 1024**3
"""Default memory budget for captured inputs, in bytes (2 GiB)."""

MAX_SITES = 8
"""Distinct source sites kept per signature; further sites are only counted."""

FORWARD, BACKWARD, OPTIMIZER = "forward", "backward", "optimizer"
# The hot path keeps phases as bits of one int; ``signatures()`` turns them into names.
_PHASE_BITS = ((FORWARD, 1), (BACKWARD, 2), (OPTIMIZER, 4))
_FORWARD_BIT, _BACKWARD_BIT, _OPTIMIZER_BIT = 1, 2, 4

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


class _Entry:
    """Mutable accumulator behind a :class:`RecordedSignature`."""

    __slots__ = ("func", "kind", "key", "first_call", "calls", "phases", "sites", "sites_dropped",
                 "snapshot", "skip_reason", "text")

    def __init__(self, func: Any, kind: OpKind, key: Any, first_call: int) -> None:
        self.func = func
        self.kind = kind
        self.key = key
        self.first_call = first_call
        self.calls = 0
        self.phases = 0
        """Bits of ``_PHASE_BITS``."""
        self.sites: dict[int, int] = {}
        """Site id (see :meth:`SiteTracker.site`) → calls from there."""
        self.sites_dropped = 0
        self.snapshot: Snapshot | None = None
        self.skip_reason: str | None = None
        self.text: str | None = None


class _OpInfo:
    """What the hot path needs to know about one op overload, worked out once per process."""

    __slots__ = ("func", "call", "kind", "skip_reason", "view", "name", "written", "writes")

    def __init__(self, func: Any) -> None:
        self.func = func
        # ``OpOverload.__call__`` is a Python frame that only forwards to ``_op``.
        self.call = getattr(func, "_op", func)
        self.kind, self.skip_reason = op_kind(func)
        self.view = self.kind is OpKind.VIEW
        self.name = str(func)
        self.written: tuple[tuple[bool, ...], frozenset[str]] = written_args(func)
        """Positional arguments and keyword names the op writes (schema ``Tensor(a!)``)."""
        self.writes = any(self.written[0]) or bool(self.written[1])


# Keyed by ``id(func)``: ``OpOverload.__hash__`` is a Python method, and this dict is
# read on every call. Each value holds its ``func``, so no id is ever reused.
_OP_INFO: dict[int, _OpInfo] = {}


def _op_info(func: Any) -> _OpInfo:
    info = _OP_INFO.get(id(func))
    if info is None or info.func is not func:
        info = _OP_INFO[id(func)] = _OpInfo(func)
    return info


_Tensor = torch.Tensor
_storage_use_count: Callable[[Any], int] | None = getattr(torch._C, "_storage_Use_Count", None)
_NAN_KEY = ("nan",)


def _args_key(args: Iterable[Any]) -> tuple:
    """Signature key of a sequence of arguments, built for what aten passes.

    Aten arguments are tensors, scalars, and lists or tuples of those; a tensor
    stands for its dtype, shape, strides and device. Hashability is left to the
    dict lookup that uses the key; the caller falls back to the signature text
    when it fails.
    """
    out = []
    for a in args:
        if isinstance(a, _Tensor):
            out.append((a.dtype, a.shape, a.stride(), a.device))
        elif isinstance(a, (list, tuple)):
            out.append(_args_key(a))
        elif a.__class__ is float and a != a:
            out.append(_NAN_KEY)
        else:
            out.append(a)
    return tuple(out)


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


# Whether a code object belongs to torch, opaudit or the stdlib, by ``id(code)``:
# hashing a code object hashes its bytecode and constants, every time, and the
# site lookup asks once per frame it walks. ``_KEPT_CODE`` holds each code object
# so that its id cannot be reused.
_INTERNAL_CODE: dict[int, bool] = {}
_KEPT_CODE: list[Any] = []
# ``Module.__call__``'s frames: ``self`` there is the module being called.
_MODULE_CALL = frozenset(
    id(getattr(torch.nn.Module, name).__code__) for name in ("_call_impl", "_wrapped_call_impl")
    if hasattr(getattr(torch.nn.Module, name, None), "__code__")
)


def _internal_code(code: Any) -> bool:
    r = _INTERNAL_CODE[id(code)] = _is_internal(code.co_filename)
    _KEPT_CODE.append(code)
    return r


def relative_path(filename: str, root: str | None, cwd: str | None = None) -> str:
    """``filename`` as reports show it: never absolute.

    Relative to the working directory when the file is under it (clickable in a
    terminal or IDE), else to ``root`` (the audited script's folder), else to the
    ``sys.path`` entry holding it, else just its name.
    """
    if filename.startswith(_EXAMPLES_DIR):
        return "opaudit/examples/" + filename[len(_EXAMPLES_DIR):].replace(os.sep, "/")
    if not os.path.isabs(filename):
        return filename.replace(os.sep, "/")
    for base in (cwd or os.getcwd(), root):
        if base:
            base = os.path.abspath(base) + os.sep
            if filename.startswith(base):
                return filename[len(base):].replace(os.sep, "/")
    best = ""
    for entry in sys.path:
        if entry:
            base = os.path.abspath(entry) + os.sep
            if filename.startswith(base) and len(base) > len(best):
                best = base
    if best:
        return filename[len(best):].replace(os.sep, "/")
    return os.path.basename(filename)


class SiteTracker:
    """Resolves the user's source site and module of a call.

    A forward op's site is the innermost user frame on the stack, and its module
    the innermost ``nn.Module`` being called (the ``self`` of the innermost
    ``Module.__call__`` frame), both read from the frames themselves. The result is
    cached per calling frame: most ops come from the same frame as the op before.
    ``ModuleTracker`` instead installs global module hooks, which send every
    module call of the recorded step down ``Module._call_impl``'s slow path; the
    frames already hold the answer, and reading them is exact per thread.
    Every forward op that creates an autograd node stores its site under the
    node's sequence number, and a backward op looks up the node the engine is
    running.
    """

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root) if root else None
        # Fixed at start: the user's code may chdir while it runs.
        self.cwd = os.getcwd()
        self._names: dict[int, tuple[torch.nn.Module, str]] = {}
        """``id(module)`` → (module, qualified name), while recording; the module is
        held so that its id cannot be reused, and let go by :meth:`stop`."""
        self._site_ids: dict[tuple, int] = {}
        self._site_list: list[Site] = []
        self._paths: dict[str, str] = {}
        """``relative_path()`` per file name: many sites share a file, and it walks ``sys.path``."""
        self._node_sites: dict[int, int] = {}
        self._last_nr = _get_seq_nr() if _get_seq_nr else -1
        self.in_optimizer = 0
        self._handles: list[Any] = []
        self._thread: int | None = None
        # The last forward lookup: nearest Python frame, its line (-1 when that
        # frame is internal) and the site found. Holding the frame keeps it alive,
        # so ``is`` on the next call means the same activation, whose callers (and
        # so whose user frame and module) cannot have changed while it runs.
        self._last: tuple[Any, int, int] = (None, -1, -1)
        self._last_bare: tuple[Any, int, int] = (None, -1, -1)
        """The same for lookups without a module (backward ops whose node has no site)."""
        self._last_node: tuple[Any, int] = (None, -1)

    # -- modules ------------------------------------------------------------
    def _name(self, mod: torch.nn.Module, f: Any) -> str:
        """Fully qualified name of ``mod``, called in frame ``f``'s stack."""
        names = self._names
        entry = names.get(id(mod))
        if entry is not None and entry[0] is mod:
            return entry[1]
        # Name it, and everything under it, from the outermost module being called.
        root = mod
        while f is not None:
            if id(f.f_code) in _MODULE_CALL:
                outer = f.f_locals.get("self")
                if isinstance(outer, torch.nn.Module) and id(outer) not in names:
                    root = outer
            f = f.f_back
        for child_name, child in root.named_modules(prefix=type(root).__name__):
            if id(child) not in names:
                names[id(child)] = (child, child_name)
        entry = names.get(id(mod))
        return entry[1] if entry is not None and entry[0] is mod else type(mod).__name__

    def _opt_pre(self, *_: Any) -> None:
        if threading.get_ident() == self._thread:
            self.in_optimizer += 1

    def _opt_post(self, *_: Any) -> None:
        if threading.get_ident() == self._thread:
            self.in_optimizer = max(0, self.in_optimizer - 1)

    def start(self) -> None:
        """Install the global optimizer hooks (for the ``optimizer`` phase)."""
        from torch.optim import optimizer as optim_module

        self._thread = threading.get_ident()
        self._handles.append(optim_module.register_optimizer_step_pre_hook(self._opt_pre))
        self._handles.append(optim_module.register_optimizer_step_post_hook(self._opt_post))

    def stop(self) -> None:
        """Remove every hook installed by :meth:`start`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._names.clear()
        self._last = self._last_bare = (None, -1, -1)
        self._last_node = (None, -1)

    # -- sites --------------------------------------------------------------
    def site(self, site_id: int) -> Site:
        """The :class:`Site` behind an id returned by :meth:`current`."""
        return self._site_list[site_id]

    def frame_site(self, depth: int = 2) -> Site:
        """The innermost frame of user code (not torch, not opaudit, not the stdlib) and module."""
        return self._site_list[self._site_id(sys._getframe(depth))]

    def _site_id(self, f: Any, with_module: bool = True) -> int:
        """Id of the site of the innermost user frame at or above ``f``, and of the innermost module."""
        last_f, last_line, last_site = self._last if with_module else self._last_bare
        if f is last_f and (last_line < 0 or f.f_lineno == last_line):
            return last_site
        f0 = f
        internal = _INTERNAL_CODE
        user = mod = None
        while f is not None:
            code = f.f_code
            r = internal.get(id(code))
            if r is None:
                r = _internal_code(code)
            if not r:
                if user is None:
                    user = f
                    if mod is not None or not with_module:
                        break
            elif with_module and mod is None and id(code) in _MODULE_CALL:
                mod = f
                if user is not None:
                    break
            f = f.f_back
        module = ""
        if mod is not None:
            called = mod.f_locals.get("self")
            if isinstance(called, torch.nn.Module):
                module = self._name(called, mod)
        line = user.f_lineno if user is not None else 0
        key = (id(user.f_code) if user is not None else 0, line, module)
        site_id = self._site_ids.get(key)
        if site_id is None:
            if user is None:
                site = Site("<torch>", 0, "", module)
            else:
                filename = user.f_code.co_filename
                path = self._paths.get(filename)
                if path is None:
                    path = self._paths[filename] = relative_path(filename, self.root, self.cwd)
                site = Site(path, line, user.f_code.co_name, module)
            site_id = self._site_ids[key] = len(self._site_list)
            self._site_list.append(site)
        if with_module:
            self._last = (f0, line if user is f0 else -1, site_id)
        else:
            self._last_bare = (f0, line if user is f0 else -1, site_id)
        return site_id

    def current(self) -> tuple[int, int]:
        """Phase bit and site id of the op being dispatched now.

        Called from the recording mode's ``__torch_dispatch__`` through
        ``Recorder._on_call``: the op's caller is three frames up.
        """
        if _graph_task_id() != -1:
            node = _current_node()
            if node is not None and node is self._last_node[0]:
                return _BACKWARD_BIT, self._last_node[1]
            site_id = None
            if node is not None:
                site_id = self._node_sites.get(node._sequence_nr())
            if site_id is None:
                site_id = self._site_id(sys._getframe(3), with_module=False)
            # Held, so that the next op of the same node gets the same Python object back.
            self._last_node = (node, site_id)
            return _BACKWARD_BIT, site_id
        site_id = self._site_id(sys._getframe(3))
        if _get_seq_nr is not None:
            nr = _get_seq_nr()
            if nr != self._last_nr:
                # This op's autograd layer created node ``nr - 1``: remember its site
                # for the backward ops that node will run.
                self._last_nr = nr
                self._node_sites[nr - 1] = site_id
        return (_OPTIMIZER_BIT if self.in_optimizer else _FORWARD_BIT), site_id


def _dispatch(self: "_RecordingMode", func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
    call = self.on_call(func, args, kwargs)
    return call(*args, **kwargs) if kwargs else call(*args)


def _skip_dynamo(code: Any) -> bool:
    """Tell Dynamo never to trace ``code`` nor anything it calls; ``False`` if this torch cannot.

    ``TorchDispatchMode`` otherwise wraps every ``__torch_dispatch__`` in
    ``torch._dynamo.disable``, which imports Dynamo on first use (about 1.5 s)
    and adds two Python frames to every op. Marking the code object gives the
    same protection (a ``torch.compile``'d function run while recording never
    traces into the recorder) at no cost per call.
    """
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy

        set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))
    except Exception:  # noqa: BLE001 - older or newer torch: keep TorchDispatchMode's own wrapper
        return False
    return True


_DYNAMO_SKIPPED = _skip_dynamo(_dispatch.__code__)


class _RecordingMode(TorchDispatchMode):
    """Intercepts every aten call, lets the recorder see it, then runs it.

    ``on_call(func, args, kwargs)`` records the call and returns the callable
    that runs it.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return not _DYNAMO_SKIPPED

    __torch_dispatch__ = _dispatch

    def __init__(self, on_call: Callable[[Any, tuple, dict | None], Callable[..., Any]]) -> None:
        super().__init__()
        self.on_call = on_call


class Recorder:
    """Records every aten op run inside ``with Recorder() as rec:``.

    >>> with Recorder() as rec:
    ...     loss = model(x).sum(); loss.backward()
    >>> report = rec.classify(reps=5)

    Each unique signature keeps its call count, phases, sites and a snapshot of
    the inputs of its first call, within ``capture_budget`` bytes.

    Snapshots are copy on write: an input the op only reads is held as it is,
    and copied only when a later op is about to write it (its schema says so) or,
    when recording ends, if anything besides the recorder still references it.
    This relies on every write going through an aten op, as every
    ``TorchDispatchMode`` does; for code that writes tensors some other way (a
    C++ extension writing through ``data_ptr()``, a NumPy view) pass
    ``copy_inputs=True`` to copy every input when it is captured. See
    ``docs/performance.md``.
    """

    def __init__(self, capture_budget: int = DEFAULT_CAPTURE_BUDGET, root: str | None = None, *,
                 copy_inputs: bool = False) -> None:
        self.capture_budget = capture_budget
        self.copy_inputs = copy_inputs
        """Copy every input when it is captured, instead of holding the ones the op
        only reads until something is about to write them (see :meth:`_before_write`).
        Needed only when the recorded code writes tensors other than through aten
        ops (a C++ extension writing through ``data_ptr()``, a NumPy view)."""
        self.sites = SiteTracker(root)
        self._entries: dict[Any, _Entry] = {}
        self._held: dict[int, list[Any]] = {}
        """Storage data pointer → ``[storage, [(entry, buffer), ...]]``: the snapshots holding it uncopied."""
        self._view_calls: dict[_OpInfo, int] = {}
        self.total_calls = 0
        self.captured_bytes = 0
        self._mode: _RecordingMode | None = None
        self._active = False

    # -- context ------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        if self._active:
            raise RecordError("this Recorder is already recording")
        self._active = True
        if _DYNAMO_SKIPPED:
            _skip_dynamo(_dispatch.__code__)  # again: ``torch._dynamo.reset()`` may have cleared it
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
            self._seal()

    # -- hot path -----------------------------------------------------------
    def _on_call(self, func: Any, args: tuple, kwargs: dict | None) -> Callable[..., Any]:
        """Account for one call; return what runs it. Runs before every aten op: keep it lean."""
        self.total_calls += 1
        info = _OP_INFO.get(id(func))
        if info is None or info.func is not func:
            info = _op_info(func)
        if info.writes and self._held:
            self._before_write(info, args, kwargs)
        if info.view:
            views = self._view_calls
            views[info] = views.get(info, 0) + 1
            return info.call
        entries = self._entries
        try:
            key = (info, _args_key(args), (tuple(kwargs), _args_key(kwargs.values())) if kwargs else None)
            entry = entries.get(key)
        except Exception:  # noqa: BLE001 - unhashable values, tensors without strides
            key = (info, signature_text(args, kwargs or {}))
            entry = entries.get(key)
        phase, site = self.sites.current()
        if entry is None:
            entry = entries[key] = _Entry(func, info.kind, key, self.total_calls)
            self._first_call(entry, info, args, kwargs or {})
        entry.calls += 1
        entry.phases |= phase
        sites = entry.sites
        n = sites.get(site)
        if n is not None:
            sites[site] = n + 1
        elif len(sites) < MAX_SITES:
            sites[site] = 1
        else:
            entry.sites_dropped += 1
        return info.call

    def _first_call(self, entry: _Entry, info: _OpInfo, args: tuple, kwargs: dict) -> None:
        if info.kind in (OpKind.COMPUTE, OpKind.RANDOM, OpKind.UNINITIALIZED):
            self._capture(entry, info, args, kwargs)
        elif info.kind is OpKind.SIDE_EFFECT:
            entry.skip_reason = info.skip_reason
        if entry.snapshot is None:
            # With a snapshot the text waits for ``signatures()`` (see ``_text``).
            entry.text = signature_text(args, kwargs)

    def _capture(self, entry: _Entry, info: _OpInfo, args: tuple, kwargs: dict) -> None:
        written = None
        if info.writes:
            pos_w, kw_w = info.written
            written = [pos_w[i] if i < len(pos_w) else False for i in range(len(args))]
            written += [k in kw_w for k in kwargs]
        try:
            # An op returning uninitialized memory is only ever timed: its inputs'
            # values do not matter, so none are held.
            snap = Snapshot(args, kwargs, written, share=not self.copy_inputs,
                            budget=self.capture_budget - self.captured_bytes,
                            values=info.kind is not OpKind.UNINITIALIZED)
        except CaptureError as e:
            entry.skip_reason = str(e) if str(e) in ("capture OOM", "capture budget") else f"capture failed: {e}"
            return
        except Exception as e:  # noqa: BLE001 - the user's run must carry on
            entry.skip_reason = f"capture failed: {type(e).__name__}: {e}"
            return
        if self.captured_bytes + snap.nbytes > self.capture_budget:
            entry.skip_reason = "capture budget"
            return
        self.captured_bytes += snap.nbytes
        entry.snapshot = snap
        held = self._held
        for b, storage in snap.shared():
            ptr = storage.data_ptr()
            slot = held.get(ptr)
            if slot is None:
                held[ptr] = [storage, [(entry, b)]]
            else:
                slot[1].append((entry, b))
                if slot[0] is not storage:
                    # Two storages share this memory (``from_numpy`` twice, DLPack...):
                    # their reference counts say nothing about each other, so seal copies it.
                    slot[0] = None

    # -- copy on write ------------------------------------------------------
    # A snapshot copies at once only the storages its op writes; the storages it
    # only reads are held as they are. Before any later op writes one of those
    # (the op schema says which arguments it writes: ``Tensor(a!)``),
    # ``_before_write`` copies it; when recording ends, ``_seal`` copies those that
    # something outside the recorder still references. Activations, most of what
    # a step captures, are never copied at all.
    def _before_write(self, info: _OpInfo, args: tuple, kwargs: dict | None) -> None:
        pos, kw = info.written
        for i, w in enumerate(pos):
            if w and i < len(args):
                self._unhold(args[i])
        if kw and kwargs:
            for name in kw:
                if name in kwargs:
                    self._unhold(kwargs[name])

    def _unhold(self, a: Any) -> None:
        if isinstance(a, torch.Tensor):
            try:
                ptr = a.untyped_storage().data_ptr()
            except Exception:  # noqa: BLE001 - no storage (sparse, nested...): nothing held
                return
            slot = self._held.pop(ptr, None)
            if slot is not None:
                self._own(slot[1])
        elif isinstance(a, (list, tuple)):
            for x in a:
                self._unhold(x)

    def _own(self, waiting: list[tuple[_Entry, int]]) -> None:
        """Copy one held storage, once, over the union of the spans its holders need."""
        live = []
        lo = hi = -1
        for e, b in waiting:
            snap = e.snapshot
            if snap is not None:
                live.append((e, b))
                s_lo, s_hi = snap.span(b)
                if lo < 0 or s_lo < lo:
                    lo = s_lo
                if s_hi > hi:
                    hi = s_hi
        if not live:
            return
        storage = live[0][0].snapshot.shared_storage(live[0][1])
        try:
            copy = copy_span(storage, lo, hi, storage.device)
        except CaptureError as e:
            for entry, _ in live:
                self._drop(entry, str(e))
            return
        except Exception as e:  # noqa: BLE001 - the user's run must carry on
            for entry, _ in live:
                self._drop(entry, f"capture failed: {type(e).__name__}: {e}")
            return
        for entry, b in live:
            entry.snapshot.own(b, copy)

    def _drop(self, entry: _Entry, reason: str) -> None:
        self._text(entry)
        if entry.snapshot is not None:
            self.captured_bytes -= entry.snapshot.nbytes
        entry.snapshot = None
        entry.skip_reason = reason

    def _seal(self) -> None:
        """Copy the held storages that anything besides the snapshots still references."""
        held, self._held = self._held, {}
        count = _storage_use_count
        for storage, waiting in held.values():
            # One reference is the snapshots' own Python storage object (torch
            # keeps one per storage): any other means something else can still write it.
            if storage is None or count is None or count(storage._cdata) > 1:
                self._own(waiting)

    # -- results ------------------------------------------------------------
    def _entries_in_order(self) -> Iterator[_Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.first_call))

    def signatures(self) -> list[RecordedSignature]:
        """Every unique non-view signature, in order of first call."""
        out = []
        for e in self._entries_in_order():
            op = str(e.func)
            # Two ids can name equal sites (e.g. two code objects on one line): merge them.
            sites = dict.fromkeys(self.sites.site(i) for i in e.sites)
            text = self._text(e)
            out.append(RecordedSignature(
                id=signature_id(op, text),
                op=op,
                kind=e.kind,
                signature=text,
                device=_device_of(e),
                calls=e.calls,
                phases=tuple(name for name, bit in _PHASE_BITS if e.phases & bit),
                sites=tuple(sites),
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
        return dict(sorted((info.name, n) for info, n in self._view_calls.items()))

    def release(self) -> None:
        """Drop every captured input (the signatures stay)."""
        for e in self._entries.values():
            self._text(e)
            e.snapshot = None
        self._held.clear()
        self.captured_bytes = 0

    @staticmethod
    def _text(e: _Entry) -> str:
        """The signature text, worked out from the snapshot the first time it is asked for.

        The snapshot rebuilds the first call's arguments with the same dtypes,
        shapes, strides, layouts and devices, so the text is the one the call
        itself would give; the hot path is spared ``describe()``.
        """
        if e.text is None:
            if e.snapshot is not None:
                args, kwargs = e.snapshot.arguments()
                e.text = signature_text(args, kwargs)
            else:
                e.text = ""
        return e.text

    def classify(self, **options: Any) -> "Report":
        """Replay every signature and build a :class:`~opaudit.report.Report`.

        Keyword options are those of :func:`opaudit.pipeline.build_report`.
        """
        from opaudit.pipeline import build_report

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
