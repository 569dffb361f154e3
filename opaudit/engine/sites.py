"""Where an op came from: the user's source line, the module running, and the phase.

Shared by the recorder and the whole-step run-check: both ask :class:`SiteTracker`
for the site of the op being dispatched.

Phases are what a user would call the part of the run an op belongs to:

* ``setup``: everything before the first forward: inputs and datasets made up
  front, the model's construction (its parameters' initialisation), whether or
  not a module has been built yet;
* ``data``: in a ``DataLoader`` (creating its iterator, ``next()`` on it: sampler,
  dataset ``__getitem__``, collate), and everything its worker processes run;
* ``forward``: from the first op inside an ``nn.Module`` call or recording an
  autograd node on, everything no other phase claims;
* ``backward``: run by the autograd engine, and the gradient seed ``backward()`` makes for it;
* ``optimizer``: inside ``optimizer.step()`` but not inside its closure (a closure's
  forward and backward are forward and backward: Lightning and LBFGS pass one).

Which ops came before the first forward is known only once it comes: until then
they carry a provisional bit, named ``setup`` if a forward came and ``forward``
if none did (plain tensor code that calls no module and records no autograd
node: its ops are its forward). A recording that opens mid-run (inside an
optimizer step: a window after ``--start-step K``; a training framework's
callback) did not see the run start: there only a module's construction is ``setup``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import torch

from opaudit.data.site import Site

SETUP, DATA, FORWARD, BACKWARD, OPTIMIZER = "setup", "data", "forward", "backward", "optimizer"
FORWARD_BIT, BACKWARD_BIT, OPTIMIZER_BIT, SETUP_BIT, DATA_BIT = 1, 2, 4, 8, 16
BEFORE_FORWARD_BIT = 32
"""Provisional: before the first forward, outside a module's construction (see :meth:`SiteTracker.phase_names`)."""
# The hot path keeps phases as bits of one int; ``phase_names()`` turns them into
# names, in the order of a step.
PHASE_BITS = ((SETUP, SETUP_BIT), (DATA, DATA_BIT), (FORWARD, FORWARD_BIT), (BACKWARD, BACKWARD_BIT),
              (OPTIMIZER, OPTIMIZER_BIT))

_get_seq_nr: Callable[[], int] | None = getattr(torch._C._autograd, "_get_sequence_nr", None)
_graph_task_id = torch._C._current_graph_task_id
_current_node = torch._C._current_autograd_node
# ``loss.backward()`` makes its gradient seed (``ones_like``) here, before the engine runs.
_GRAD_SEED_CODE: Any = getattr(getattr(torch.autograd, "_make_grads", None), "__code__", None)
# Where Python hands over to the autograd engine (``backward()``, ``autograd.grad``): the frames
# above it are the code that asked for the gradients, not what the engine runs.
_ENGINE_ENTRY = frozenset(id(fn.__code__) for fn in (
    getattr(torch.autograd.graph, "_engine_run_backward", None), torch.autograd.backward, torch.autograd.grad)
    if fn is not None)
_CHECKPOINT_FILE = os.path.join(os.path.dirname(torch.__file__), "utils", "checkpoint.py")


def _site_packages() -> set[str]:
    """Every folder installed packages live in: this environment's and any other on ``sys.path``."""
    import site

    dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    try:
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    except AttributeError:  # an old virtualenv's site module
        pass
    dirs.update(p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages"))
    return {os.path.abspath(d) + os.sep for d in dirs if d}


def _internal_roots() -> tuple[tuple[str, ...], str]:
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    # This file is opaudit/engine/sites.py: the package root is two levels up.
    pkg_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    stdlib = {sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "platstdlib")}
    # Installed libraries (transformers, lightning...) are not the user's code wherever the
    # environment puts them. (Inside a virtual environment ``platstdlib`` already covers its
    # own site-packages; one shared through a ``.pth`` file or ``PYTHONPATH`` needs naming.)
    return (torch_dir, pkg_dir, *sorted(stdlib | _site_packages())), os.path.join(pkg_dir, "examples") + os.sep


_INTERNAL_PREFIXES, _EXAMPLES_DIR = _internal_roots()
_TORCH_GENERATED = ("<frozen", "<eval_with_key")
"""Code objects with these names are Python's frozen modules and ``torch.fx``'s generated forwards."""
_INTERACTIVE = ("<stdin", "<console", "<ipython-input")
_TEMP_DIRS = tuple(sorted({os.path.join(d, "") for d in (tempfile.gettempdir(), os.path.realpath(tempfile.gettempdir()))}))


def is_internal(filename: str) -> bool:
    """Whether ``filename`` is torch's, opaudit's (not its examples), the stdlib's or an installed
    library's: never a user site."""
    if filename.startswith("<"):
        return filename.startswith(_TORCH_GENERATED)
    if filename.startswith(_EXAMPLES_DIR):
        return False
    return filename.startswith(_INTERNAL_PREFIXES)


def is_generated(filename: str, homes: tuple[str, ...] = ()) -> bool:
    """Whether user-side code from ``filename`` was generated at run time rather than written by the user.

    ``exec``/``compile()``d source (``<string>``), a file that no longer exists,
    or one in the temp folder (torch_geometric writes its ``propagate`` functions
    there and imports them) — unless it lies under one of ``homes`` (the audited
    script's folder, the working directory), which hold the user's own files
    even when those are in the temp folder themselves.
    """
    if filename.startswith("<"):
        return not filename.startswith(_INTERACTIVE)
    path = os.path.abspath(filename)
    if any(h and path.startswith(os.path.join(h, "")) for h in homes):
        return False
    return path.startswith(_TEMP_DIRS) or not os.path.exists(path)


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


def _compiled_original(mod: torch.nn.Module) -> torch.nn.Module | None:
    """The module a ``torch.compile`` wrapper (Dynamo's ``OptimizedModule``) holds, else ``None``.

    Told by its class name and ``_orig_mod``, so that Dynamo is never imported to ask.
    """
    inner = getattr(mod, "_orig_mod", None) if type(mod).__name__ == "OptimizedModule" else None
    return inner if isinstance(inner, torch.nn.Module) else None


def _internal_code(code: Any) -> bool:
    r = _INTERNAL_CODE[id(code)] = is_internal(code.co_filename)
    _KEPT_CODE.append(code)
    if code.co_filename == _CHECKPOINT_FILE:
        _CHECKPOINT_CODE.add(id(code))
    return r


_CHECKPOINT_CODE: set[int] = set()
"""Ids of ``torch.utils.checkpoint``'s code objects met so far (kept alive by ``_KEPT_CODE``)."""


# The ``data`` phase. ``DataLoader`` has no hook to say "loading now", so while a
# tracker is started, its two entry points are wrapped: creating the iterator
# (which draws the loader's base seed and forks the workers) and ``next()`` on it
# (sampler, fetch, collate). The originals are put back when the last tracker stops.
_DATA_TRACKERS: list["SiteTracker"] = []
_DATA_ORIGINALS: list[tuple[type, str, Any]] = []


def _data_entry(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        me = threading.get_ident()
        mine = [t for t in _DATA_TRACKERS if t._thread == me]
        for t in mine:
            t.in_data += 1
        try:
            return original(*args, **kwargs)
        finally:
            for t in mine:
                t.in_data = max(0, t.in_data - 1)
    return wrapper


def _watch_data(tracker: "SiteTracker") -> None:
    if not _DATA_TRACKERS:
        from torch.utils.data import dataloader

        for cls, name in ((dataloader.DataLoader, "__iter__"), (dataloader._BaseDataLoaderIter, "__next__")):
            original = cls.__dict__[name]
            _DATA_ORIGINALS.append((cls, name, original))
            setattr(cls, name, _data_entry(original))
    _DATA_TRACKERS.append(tracker)


def _unwatch_data(tracker: "SiteTracker") -> None:
    if tracker in _DATA_TRACKERS:
        _DATA_TRACKERS.remove(tracker)
    if not _DATA_TRACKERS:
        while _DATA_ORIGINALS:
            cls, name, original = _DATA_ORIGINALS.pop()
            setattr(cls, name, original)


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


def phase_names(bits: int, forward_seen: bool) -> tuple[str, ...]:
    """The phases in ``bits``, in step order, for a run that did (``forward_seen``) or did not reach a forward
    (see :meth:`SiteTracker.phase_names`)."""
    if bits & BEFORE_FORWARD_BIT:
        bits = (bits & ~BEFORE_FORWARD_BIT) | (SETUP_BIT if forward_seen else FORWARD_BIT)
    return tuple(name for name, bit in PHASE_BITS if bits & bit)


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
        self._generated_code: dict[int, bool] = {}
        """``is_generated()`` per user-side code object, by ``id(code)``."""
        self._node_sites: dict[int, int] = {}
        self._checkpointed: dict[str, int] = {}
        """Module name → the site its ops had in a checkpointed forward (the first seen), for their recomputation."""
        self._forward_modules: dict[tuple[int, int], str] = {}
        """``(id(code), line)`` → the module a forward op on that line ran in (its first), for checkpointing's
        recomputation, which calls the wrapped function without the module that called ``checkpoint()``."""
        self._last_nr = _get_seq_nr() if _get_seq_nr else -1
        self.in_optimizer = 0
        """``optimizer.step()`` calls under way, less those whose closure is running."""
        self.in_data = 0
        """``DataLoader`` calls under way (see :func:`_watch_data`); inherited by forked workers."""
        self.forward_seen = False
        """Whether an op has run inside an ``nn.Module`` call or recorded an autograd node
        (outside model construction): from then on nothing is ``setup``."""
        self.built = False
        """Whether an op has run while an ``nn.Module`` was being constructed: from then
        until the first forward, the ops are ``setup`` (in a recording that opened mid-run)."""
        self.opens_mid_run = False
        """Set by whoever starts the recording in the middle of a run (a training framework's callback):
        the run's start, and its first forward, are not recorded."""
        self.mid_run = False
        """This recording opened mid-run: :attr:`opens_mid_run`, or inside an optimizer step (a step
        window's post hook) (see :meth:`start`)."""
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
        inner = _compiled_original(root)
        if inner is not None:
            # ``torch.compile(model)``'s wrapper: named as the model it wraps, which runs under it.
            names.setdefault(id(root), (root, type(inner).__name__))
            root = inner
        for child_name, child in root.named_modules(prefix=type(root).__name__):
            if id(child) not in names:
                names[id(child)] = (child, child_name)
        entry = names.get(id(mod))
        return entry[1] if entry is not None and entry[0] is mod else type(mod).__name__

    def modules(self) -> list[tuple[str, torch.nn.Module]]:
        """``(qualified name, module)`` of every module named while recording (until :meth:`stop`)."""
        return [(name, mod) for mod, name in self._names.values()]

    def _opt_pre(self, _opt: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if threading.get_ident() != self._thread:
            return None
        self.in_optimizer += 1
        # ``step(closure)``: the closure runs the step's forward and backward, which
        # are labelled as such, so it runs with the optimizer phase suspended.
        if callable(kwargs.get("closure")):
            return args, {**kwargs, "closure": self._outside_optimizer(kwargs["closure"])}
        if len(args) > 1 and callable(args[1]):
            return (args[0], self._outside_optimizer(args[1]), *args[2:]), kwargs
        return None

    def _outside_optimizer(self, closure: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(closure)
        def run(*a: Any, **k: Any) -> Any:
            saved, self.in_optimizer = self.in_optimizer, 0
            try:
                return closure(*a, **k)
            finally:
                self.in_optimizer = saved
        return run

    def _opt_post(self, *_: Any) -> None:
        if threading.get_ident() == self._thread:
            self.in_optimizer = max(0, self.in_optimizer - 1)

    def start(self) -> None:
        """Install the global optimizer hooks and the ``DataLoader`` wrappers (for the phases)."""
        from torch.optim import optimizer as optim_module

        self._thread = threading.get_ident()
        self.forward_seen = self.built = False
        self.mid_run = self.opens_mid_run or _inside_optimizer_step(sys._getframe(1))
        # Nodes the code made before the recording started are not this recording's.
        self._last_nr = _get_seq_nr() if _get_seq_nr else -1
        _watch_data(self)
        self._handles.append(optim_module.register_optimizer_step_pre_hook(self._opt_pre))
        self._handles.append(optim_module.register_optimizer_step_post_hook(self._opt_post))

    def stop(self) -> None:
        """Remove every hook installed by :meth:`start`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        _unwatch_data(self)
        self._names.clear()
        self._last = self._last_bare = (None, -1, -1)
        self._last_node = (None, -1)

    # -- sites --------------------------------------------------------------
    def site(self, site_id: int) -> Site:
        """The :class:`Site` behind an id returned by :meth:`current`."""
        return self._site_list[site_id]

    def frame_site(self, f: Any) -> Site:
        """The site of a call made in frame ``f``: its innermost user frame, and the module being called."""
        return self._site_list[self._site_id(f)]

    def add_site(self, site: Site) -> int:
        """Id of ``site`` (one seen elsewhere, e.g. in a child process), registering it if new."""
        key = ("site", site)
        site_id = self._site_ids.get(key)
        if site_id is None:
            site_id = self._site_ids[key] = len(self._site_list)
            self._site_list.append(site)
        return site_id

    def _generated(self, code: Any) -> bool:
        r = self._generated_code.get(id(code))
        if r is None:
            # The code object is kept alive by ``_KEPT_CODE`` (it was classified as not internal first).
            r = self._generated_code[id(code)] = is_generated(code.co_filename, (self.root or "", self.cwd))
        return r

    def _path(self, filename: str) -> str:
        path = self._paths.get(filename)
        if path is None:
            path = self._paths[filename] = relative_path(filename, self.root, self.cwd)
        return path

    def _site_id(self, f: Any, with_module: bool = True, in_backward: bool = False) -> int:
        """Id of the site of the innermost user frame at or above ``f``, and of the innermost module.

        When that frame runs generated code (see :func:`is_generated`), the site
        keeps it and adds, as its ``caller``, the nearest frame of the user's own files above it.
        ``in_backward``: ``f`` is Python run by the autograd engine (a custom
        ``backward()``, a hook, checkpointing's recomputation): the walk stops at
        the engine's entry, the frames above it being the code that called
        ``backward()``, and returns ``-1`` when no user frame lies below it. The
        site is marked ``recomputed`` when ``torch.utils.checkpoint`` ran it.
        """
        if not in_backward:
            last_f, last_line, last_site = self._last if with_module else self._last_bare
            if f is last_f and (last_line < 0 or f.f_lineno == last_line):
                return last_site
        f0 = f
        internal = _INTERNAL_CODE
        user = mod = caller = None
        generated = checkpointed = recomputed = False
        while f is not None:
            code = f.f_code
            r = internal.get(id(code))
            if r is None:
                r = _internal_code(code)
            if not r:
                if user is None:
                    user = f
                    generated = self._generated(code)
                elif generated and caller is None and not self._generated(code):
                    caller = f
                if (not generated or caller is not None) and (mod is not None or not with_module) and not in_backward:
                    break
            elif in_backward and id(code) in _ENGINE_ENTRY:
                break
            elif with_module and mod is None and id(code) in _MODULE_CALL:
                mod = f
                if user is not None and (not generated or caller is not None) and not in_backward:
                    break
            elif id(code) in _CHECKPOINT_CODE:
                recomputed = in_backward
                checkpointed = checkpointed or user is None
            f = f.f_back
        if in_backward and user is None and not recomputed:
            return -1
        module = ""
        if mod is not None:
            called = mod.f_locals.get("self")
            if isinstance(called, torch.nn.Module):
                module = self._name(called, mod)
        if recomputed and user is None:
            # Checkpointing recomputes library code (a module's own forward) with none of the user's
            # frames below it: the site is the one the same module's ops had in the checkpointed forward.
            site_id = self._checkpointed.get(module)
            if site_id is None:
                return -1
            return self._variant(site_id, recomputed=True)
        line = user.f_lineno if user is not None else 0
        if recomputed and not module and user is not None:
            # Checkpointing calls the function it wraps, not the module that called ``checkpoint()``:
            # the module is the one the same line ran in during the forward.
            module = self._forward_modules.get((id(user.f_code), line), "")
        key = (id(user.f_code) if user is not None else 0, line, module,
               id(caller.f_code) if caller is not None else 0, caller.f_lineno if caller is not None else 0, recomputed)
        site_id = self._site_ids.get(key)
        if site_id is None:
            if user is None:
                site = Site("<torch>", 0, "", module)
            else:
                from_user = None
                if caller is not None:
                    from_user = Site(self._path(caller.f_code.co_filename), caller.f_lineno, caller.f_code.co_name, "")
                site = Site(self._path(user.f_code.co_filename), line, user.f_code.co_name, module, from_user,
                            recomputed=recomputed)
                if module and not in_backward:
                    self._forward_modules.setdefault((id(user.f_code), line), module)
            site_id = self._site_ids[key] = len(self._site_list)
            self._site_list.append(site)
            if checkpointed and module and not in_backward:
                self._checkpointed.setdefault(module, site_id)
        if in_backward:
            return site_id
        if with_module:
            self._last = (f0, line if user is f0 else -1, site_id)
        else:
            self._last_bare = (f0, line if user is f0 else -1, site_id)
        return site_id

    def _variant(self, site_id: int, **changes: Any) -> int:
        """Id of the site ``site_id`` names with ``changes`` made to it (see :func:`dataclasses.replace`)."""
        key = ("variant", site_id, *sorted(changes.items()))
        derived = self._site_ids.get(key)
        if derived is None:
            derived = self._site_ids[key] = self.add_site(dataclasses.replace(self._site_list[site_id], **changes))
        return derived

    def _python_backward_site(self, f: Any, node: Any) -> int:
        """Site id of an op that Python code ran during backward, or ``-1`` if none of the user's did.

        Checkpointing's recomputation keeps the forward op's own line and module
        (marked ``recomputed``); an op of a custom ``backward()`` or a hook of the
        user's gets its own line, and the site of the forward op that created the
        node running it as ``node`` (its module too, when the line ran outside any module).
        """
        site_id = self._site_id(f, in_backward=True)
        if site_id < 0:
            return -1
        site = self._site_list[site_id]
        if site.recomputed or node is None:
            return site_id
        made = self._node_sites.get(node._sequence_nr())
        if made is None:
            return site_id
        origin = self._site_list[made]
        return self._variant(site_id, module=site.module or origin.module,
                             node=Site(origin.file, origin.line, origin.function, ""))

    def current(self) -> tuple[int, int]:
        """Phase bit and site id of the op being dispatched now.

        Called from the recording mode's ``__torch_dispatch__`` through
        ``Recorder._on_call``: the op's caller is three frames up.
        """
        if _graph_task_id() != -1:
            node = _current_node()
            try:
                f = sys._getframe(3)
            except ValueError:  # an engine thread with no Python below the op
                f = None
            # On the engine's thread the op of a C++ node is called straight from the engine's entry;
            # anything else between them is Python run by the engine.
            if f is not None and id(f.f_code) not in _ENGINE_ENTRY:
                site_id = self._python_backward_site(f, node)
                if site_id >= 0:
                    if _get_seq_nr is not None and _get_seq_nr() != self._last_nr:
                        # A node made here (reentrant checkpointing's recomputation, ``create_graph``)
                        # has its backward ops run by an inner engine call: they point back here.
                        self._last_nr = _get_seq_nr()
                        made = site_id
                        if self._site_list[site_id].recomputed:  # its backward ops are not recomputed
                            made = self._variant(site_id, recomputed=False)
                        self._node_sites[self._last_nr - 1] = made
                    return BACKWARD_BIT, site_id
            if node is not None and node is self._last_node[0]:
                return BACKWARD_BIT, self._last_node[1]
            site_id = None
            if node is not None:
                site_id = self._node_sites.get(node._sequence_nr())
            if site_id is None:
                site_id = self._site_id(sys._getframe(3), with_module=False)
            # Held, so that the next op of the same node gets the same Python object back.
            self._last_node = (node, site_id)
            return BACKWARD_BIT, site_id
        caller = sys._getframe(3)
        site_id = self._site_id(caller)
        if caller.f_code is _GRAD_SEED_CODE:
            return BACKWARD_BIT, site_id
        node = False
        if _get_seq_nr is not None:
            nr = _get_seq_nr()
            if nr != self._last_nr:
                # This op's autograd layer created node ``nr - 1``: remember its site
                # for the backward ops that node will run.
                self._last_nr = nr
                self._node_sites[nr - 1] = site_id
                node = True
        if self.in_data:
            return DATA_BIT, site_id
        if self.in_optimizer:
            return OPTIMIZER_BIT, site_id
        if not self.forward_seen:
            # Before the first forward (only then: the stack walk is not free). Whether the
            # rest is setup is known when a forward comes (see ``phase_names``).
            if _constructing(sys._getframe(3)):
                self.built = True
                return SETUP_BIT, site_id
            if node or self._site_list[site_id].module:
                self.forward_seen = True
            elif not self.mid_run:
                return BEFORE_FORWARD_BIT, site_id
            elif self.built:
                return SETUP_BIT, site_id
        return FORWARD_BIT, site_id

    def phase_names(self, bits: int) -> tuple[str, ...]:
        """The phases in ``bits`` (from :meth:`current`), in step order.

        The ops before the first forward are ``setup`` once a forward has run, and
        ``forward`` in a run that had none.
        """
        return phase_names(bits, self.forward_seen)


_CONSTRUCTION = frozenset({"__init__", "reset_parameters", "_reset_parameters"})


def _inside_optimizer_step(f: Any) -> bool:
    """Whether frame ``f`` runs inside ``optimizer.step()`` (a step window opens in its post hook)."""
    from torch.optim import optimizer as optim_module

    optimizer_file = optim_module.__file__
    while f is not None:
        if f.f_code.co_filename == optimizer_file:
            return True
        f = f.f_back
    return False


def _constructing(f: Any) -> bool:
    """Whether frame ``f`` runs inside an ``nn.Module``'s ``__init__`` (or ``reset_parameters``)."""
    while f is not None:
        if f.f_code.co_name in _CONSTRUCTION and isinstance(f.f_locals.get("self"), torch.nn.Module):
            return True
        f = f.f_back
    return False
