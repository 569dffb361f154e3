"""Where an op came from: the user's source line, the module running, and the phase.

Shared by the recorder and the whole-step run-check: both ask :class:`SiteTracker`
for the site of the op being dispatched. What the phases are, and what they are read
from, is :mod:`opaudit.engine.phases`; which files are the user's is
:mod:`opaudit.engine.sourcefiles`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from opaudit.data.site import Site
from opaudit.engine.phases import (
    BACKWARD_BIT,
    BEFORE_FORWARD_BIT,
    DATA_BIT,
    FORWARD_BIT,
    OPTIMIZER_BIT,
    SETUP_BIT,
    PhaseTracker,
    constructing,
)
from opaudit.engine.sourcefiles import is_generated, is_internal, relative_path

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


class SiteTracker(PhaseTracker):
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
        super().__init__()
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

    def start(self) -> None:
        """Install the global optimizer hooks and the ``DataLoader`` wrappers (for the phases)."""
        super().start()
        # Nodes the code made before the recording started are not this recording's.
        self._last_nr = _get_seq_nr() if _get_seq_nr else -1

    def stop(self) -> None:
        """Remove every hook installed by :meth:`start`."""
        super().stop()
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
            if constructing(sys._getframe(3)):
                self.built = True
                return SETUP_BIT, site_id
            if node or self._site_list[site_id].module:
                self.forward_seen = True
            elif not self.mid_run:
                return BEFORE_FORWARD_BIT, site_id
            elif self.built:
                return SETUP_BIT, site_id
        return FORWARD_BIT, site_id
