"""The run-check of a step that calls ``torch.compile``d code: run it compiled, and say so.

Under the run-check's dispatch mode Dynamo would run compiled code eagerly (see
:mod:`opaudit.engine.compiled`), so that is not what the user's step runs. Once a
traced run shows compiled code, :mod:`opaudit.flows.runcheck` makes every run
with :class:`Untraced` in the tracer's place (no dispatch mode: only the final
tensors are compared), and, in deterministic mode, inside
:class:`InductorDeterministic`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from opaudit.engine.compiled import CompiledWatch
from opaudit.engine.sites import SiteTracker


class Untraced:
    """Stands in for :class:`_Tracer` around a compiled step: no dispatch mode, so compiled code runs compiled.

    It only notes what the final-state comparison needs: the optimizers that
    stepped and the compiled modules called (``modules``), and which compiled
    callables ran (``compiled``). ``steps`` and ``leaves`` stay empty: no op is seen.
    """

    def __init__(self, root: str | None) -> None:
        self.sites = SiteTracker(root)
        self.steps: list[Any] = []
        self.leaves: dict[int, torch.Tensor] = {}
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        self.modules: list[tuple[str, torch.nn.Module]] = []
        self.compiled = CompiledWatch(eager=False, root=root)
        self._hook: Any = None

    def __enter__(self) -> Untraced:
        from torch.optim import optimizer as optim_module

        self._hook = optim_module.register_optimizer_step_post_hook(self._optimizer_stepped)
        self.compiled.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.compiled.__exit__(*exc)
            self.modules = [(type(m).__name__, m) for m in self.compiled.subjects() if isinstance(m, torch.nn.Module)]
        finally:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None

    def _optimizer_stepped(self, opt: Any, *_: Any) -> None:
        self.optimizers.setdefault(id(opt), opt)


def compiled_names(watch: CompiledWatch) -> tuple[str, ...]:
    """``module MLP``, ``function step``: the compiled callables ``watch`` saw called."""
    return tuple(f"{c.kind} {c.name}" for c in watch.ran())


class InductorDeterministic:
    """``torch._inductor.config.deterministic`` on while entered (when ``on``), restored after.

    Yields the setting the runs saw, or ``None`` when Inductor is not loaded and
    was not asked for (an eager step: nothing is imported).
    """

    def __init__(self, on: bool) -> None:
        self.on = on
        self._config: Any = None
        self._saved: Any = None

    def __enter__(self) -> bool | None:
        if self.on:
            import torch._inductor.config as config
        else:
            config = sys.modules.get("torch._inductor.config")
            if config is None:
                return None
        self._config = config
        self._saved = config.deterministic
        if self.on:
            config.deterministic = True
        return bool(config.deterministic)

    def __exit__(self, *exc: Any) -> None:
        if self._config is not None:
            self._config.deterministic = self._saved
