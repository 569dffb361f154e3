"""The phase of an op: the part of the run a user would say it belongs to.

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

:class:`PhaseTracker` holds what the phase is read from (the optimizer step and
``DataLoader`` calls under way, whether a forward has come); the site tracker
(:mod:`opaudit.engine.sites`) derives from it and decides each op's phase on its hot path.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch

SETUP, DATA, FORWARD, BACKWARD, OPTIMIZER = "setup", "data", "forward", "backward", "optimizer"
FORWARD_BIT, BACKWARD_BIT, OPTIMIZER_BIT, SETUP_BIT, DATA_BIT = 1, 2, 4, 8, 16
BEFORE_FORWARD_BIT = 32
"""Provisional: before the first forward, outside a module's construction (see :meth:`PhaseTracker.phase_names`)."""
# The hot path keeps phases as bits of one int; ``phase_names()`` turns them into
# names, in the order of a step.
PHASE_BITS = ((SETUP, SETUP_BIT), (DATA, DATA_BIT), (FORWARD, FORWARD_BIT), (BACKWARD, BACKWARD_BIT),
              (OPTIMIZER, OPTIMIZER_BIT))


# The ``data`` phase. ``DataLoader`` has no hook to say "loading now", so while a
# tracker is started, its two entry points are wrapped: creating the iterator
# (which draws the loader's base seed and forks the workers) and ``next()`` on it
# (sampler, fetch, collate). The originals are put back when the last tracker stops.
_DATA_TRACKERS: list[PhaseTracker] = []
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


def _watch_data(tracker: PhaseTracker) -> None:
    if not _DATA_TRACKERS:
        from torch.utils.data import dataloader

        for cls, name in ((dataloader.DataLoader, "__iter__"), (dataloader._BaseDataLoaderIter, "__next__")):
            original = cls.__dict__[name]
            _DATA_ORIGINALS.append((cls, name, original))
            setattr(cls, name, _data_entry(original))
    _DATA_TRACKERS.append(tracker)


def _unwatch_data(tracker: PhaseTracker) -> None:
    if tracker in _DATA_TRACKERS:
        _DATA_TRACKERS.remove(tracker)
    if not _DATA_TRACKERS:
        while _DATA_ORIGINALS:
            cls, name, original = _DATA_ORIGINALS.pop()
            setattr(cls, name, original)


def phase_names(bits: int, forward_seen: bool) -> tuple[str, ...]:
    """The phases in ``bits``, in step order, for a run that did (``forward_seen``) or did not reach a forward
    (see :meth:`PhaseTracker.phase_names`)."""
    if bits & BEFORE_FORWARD_BIT:
        bits = (bits & ~BEFORE_FORWARD_BIT) | (SETUP_BIT if forward_seen else FORWARD_BIT)
    return tuple(name for name, bit in PHASE_BITS if bits & bit)


class PhaseTracker:
    """What an op's phase is read from: the optimizer steps and ``DataLoader`` calls under way on the
    recording's thread, and whether the run has reached its first forward.

    :meth:`start` installs the global optimizer hooks and ``DataLoader`` wrappers that keep it up to date.
    """

    def __init__(self) -> None:
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
        _watch_data(self)
        self._handles.append(optim_module.register_optimizer_step_pre_hook(self._opt_pre))
        self._handles.append(optim_module.register_optimizer_step_post_hook(self._opt_post))

    def stop(self) -> None:
        """Remove every hook installed by :meth:`start`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        _unwatch_data(self)

    def phase_names(self, bits: int) -> tuple[str, ...]:
        """The phases in ``bits`` (from the site tracker's ``current()``), in step order.

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


def constructing(f: Any) -> bool:
    """Whether frame ``f`` runs inside an ``nn.Module``'s ``__init__`` (or ``reset_parameters``)."""
    while f is not None:
        if f.f_code.co_name in _CONSTRUCTION and isinstance(f.f_locals.get("self"), torch.nn.Module):
            return True
        f = f.f_back
    return False
