"""Where an op came from: the user's source line, the module running, and the phase.

Shared by the recorder and the whole-step run-check: both ask :class:`SiteTracker`
for the site of the op being dispatched.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import threading
from collections.abc import Callable
from typing import Any

import torch

from opaudit.data.site import Site

FORWARD, BACKWARD, OPTIMIZER = "forward", "backward", "optimizer"
# The hot path keeps phases as bits of one int; ``signatures()`` turns them into names.
PHASE_BITS = ((FORWARD, 1), (BACKWARD, 2), (OPTIMIZER, 4))
FORWARD_BIT, BACKWARD_BIT, OPTIMIZER_BIT = 1, 2, 4

_get_seq_nr: Callable[[], int] | None = getattr(torch._C._autograd, "_get_sequence_nr", None)
_graph_task_id = torch._C._current_graph_task_id
_current_node = torch._C._current_autograd_node


def _internal_roots() -> tuple[tuple[str, ...], str]:
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    # This file is opaudit/engine/sites.py: the package root is two levels up.
    pkg_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    stdlib = {sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "platstdlib")}
    return (torch_dir, pkg_dir, *sorted(stdlib)), os.path.join(pkg_dir, "examples") + os.sep


_INTERNAL_PREFIXES, _EXAMPLES_DIR = _internal_roots()


def is_internal(filename: str) -> bool:
    """Whether ``filename`` is torch's, opaudit's (not its examples) or the stdlib's: never a user site."""
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
    r = _INTERNAL_CODE[id(code)] = is_internal(code.co_filename)
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

    def modules(self) -> list[tuple[str, torch.nn.Module]]:
        """``(qualified name, module)`` of every module named while recording (until :meth:`stop`)."""
        return [(name, mod) for mod, name in self._names.values()]

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
                return BACKWARD_BIT, self._last_node[1]
            site_id = None
            if node is not None:
                site_id = self._node_sites.get(node._sequence_nr())
            if site_id is None:
                site_id = self._site_id(sys._getframe(3), with_module=False)
            # Held, so that the next op of the same node gets the same Python object back.
            self._last_node = (node, site_id)
            return BACKWARD_BIT, site_id
        site_id = self._site_id(sys._getframe(3))
        if _get_seq_nr is not None:
            nr = _get_seq_nr()
            if nr != self._last_nr:
                # This op's autograd layer created node ``nr - 1``: remember its site
                # for the backward ops that node will run.
                self._last_nr = nr
                self._node_sites[nr - 1] = site_id
        return (OPTIMIZER_BIT if self.in_optimizer else FORWARD_BIT), site_id
