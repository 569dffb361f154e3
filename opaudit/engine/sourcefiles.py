"""Which source files are the user's, and how reports name them.

A site is the innermost frame of the user's own code: torch's, opaudit's (not its
examples), the standard library's and installed libraries' files are internal
(:func:`is_internal`); code generated at run time is told apart from what the user
wrote (:func:`is_generated`); a report shows a file relative to where the user
works (:func:`relative_path`).
"""

from __future__ import annotations

import os
import sys
import sysconfig
import tempfile

import torch


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
    # This file is opaudit/engine/sourcefiles.py: the package root is two levels up.
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
