"""Whole-step reproducibility: run the user's step K times from identical state and compare.

Each run re-executes the script from scratch (a fresh module load, the same seed),
so the model, the optimizer and the inputs start from the same state every time.
The recorder's dispatch mode (:class:`~opaudit.engine.mode.Interception`) hands every
op to a tracer here that digests its inputs and outputs in execution order; after the step, the entry's return value and every parameter's
value and gradient are kept. Run 1 is then compared with each later run:

* the **root cause** is the first op whose outputs differ although all its
  inputs were identical, pinned to the user's source line (backward ops to the
  forward line that created them);
* every other op whose outputs differ is counted as downstream damage;
* if the runs took different op sequences, the check reports where they first
  part instead of failing; ops that compute nothing (views, allocations,
  profiler ``record_function`` markers, which a DataLoader's workers make land
  at different places) do not count;
* return values, gradients, parameters, buffers and optimizer state that differ
  are listed: those reachable from the module's globals, and every parameter,
  module and optimizer the traced step used (``def main(): model = ...``).

The check runs once with ``torch.use_deterministic_algorithms(False)`` and once
with ``True`` (``warn_only=True``, so ops without a deterministic implementation
still run): together they answer "does deterministic mode make my step
reproducible?". Global flags and RNG states are restored afterwards.

A step that calls ``torch.compile``d code is checked as it runs compiled: the
dispatch mode would make Dynamo run it eagerly (see :mod:`opaudit.engine.compiled`),
so once the first traced run shows compiled code, every run is made without it
(:class:`Untraced`) and only the final tensors are compared; in deterministic
mode ``torch._inductor.config.deterministic`` is on as well.

One module of about 650 lines, over the usual 500: the tracer, the run records
(``_Run``, ``_Step``), the comparison and the summary share private records that
nothing else uses (what collectives and compiled steps add lives in
:mod:`opaudit.flows.runcheck_collectives` and :mod:`opaudit.flows.runcheck_compiled`).
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from opaudit.aten.ops import OpKind, is_collective, op_kind, written_args
from opaudit.aten.tensors import difference, digest, flat_tensors, nested_leaves, same_bits
from opaudit.data.report import RunCheck
from opaudit.engine import loader
from opaudit.engine.compiled import compiles_so_far
from opaudit.engine.mode import Interception
from opaudit.engine.replay import preserved_state
from opaudit.engine.sites import PHASE_BITS, SiteTracker
from opaudit.engine.window import Window, finalize, run_window
from opaudit.flows.runcheck_collectives import aligned_calls, settle, summary
from opaudit.flows.runcheck_compiled import InductorDeterministic, Untraced, compiled_names

DEFAULT, DETERMINISTIC = "default", "deterministic"
MODES = (DEFAULT, DETERMINISTIC)
"""The determinism settings a step is checked under, in report order."""

DEFAULT_RUNS = 2

_MAX_DEPTH = 3
"""How deep containers and user objects in the module's globals are searched for models."""

_UNINITIALIZED = ("uninitialized",)
"""Input digest of a tensor straight out of ``empty``: its garbage bits say nothing about the run."""

_END = "<end of run>"

_SET_DATA = frozenset(getattr(torch.ops.aten.set_, name) for name in
                      ("source_Storage", "source_Storage_storage_offset", "source_Tensor"))
"""``set_`` onto existing data: the target's bits are no longer uninitialized."""

WHOLE_RUN = Window(steps=None)
"""The whole script, or one call of the entry function."""


class RunCheckError(Exception):
    """The check cannot be set up: fewer than two runs, or an unknown mode."""


# -- tracing ----------------------------------------------------------------
class _Step(NamedTuple):
    """One dispatched op of one run; ``ins``/``outs`` are ``None`` where not compared."""

    func: Any
    where: tuple[int, int] | None
    """``SiteTracker.current()``: phase bit and site id; ``None`` for view ops."""
    ins: tuple | None
    outs: tuple | None




_PLAIN = (bool, int, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _value_key(x: Any) -> Any:
    """A non-tensor argument as something that compares equal across runs."""
    if isinstance(x, _PLAIN):
        return x
    if isinstance(x, (float, complex)):
        return repr(x)  # NaN != NaN, but its repr is stable
    # Generators, script objects...: their repr holds an address, which differs run to run.
    return type(x).__name__


@dataclass(frozen=True)
class _ArgRoles:
    """Which arguments of an overload are write-only (``out=``) and which it writes."""

    out_kwargs: frozenset[str]
    written_pos: tuple[bool, ...]
    written_kw: frozenset[str]


_ROLES: dict[Any, _ArgRoles] = {}


def _roles(func: Any) -> _ArgRoles:
    roles = _ROLES.get(func)
    if roles is None:
        pos, kw = written_args(func)
        outs = frozenset(a.name for a in func._schema.arguments if getattr(a, "is_out", False))
        roles = _ROLES[func] = _ArgRoles(outs, pos, kw)
    return roles


class _Tracer:
    """Digests the inputs and outputs of every op run inside ``with _Tracer(root):``.

    The dispatch mode is the recorder's: it only intercepts, and this tracer's
    ``_on_call`` hands back the callable that runs the op and digests its outputs.
    """

    def __init__(self, root: str | None) -> None:
        self.sites = SiteTracker(root)
        self.steps: list[_Step] = []
        # Tensors straight out of ``empty``: their garbage bits differ run to run and
        # say nothing, until an op writes them.
        self._uninitialized: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # Most inputs are an earlier op's outputs: their digest is reused while the
        # tensor's version counter and its storage's write count are unchanged. The
        # write count catches writes through another alias (``p.data``), which has a
        # version counter of its own.
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._writes: dict[int, int] = {}
        self.leaves: dict[int, torch.Tensor] = {}
        """Parameters and other leaf tensors that require grad, as ops first used them."""
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        """Optimizers whose ``step`` ran, in order."""
        self.modules: list[tuple[str, torch.nn.Module]] = []
        """Modules called during the step, with their qualified names (set on exit)."""
        self._hook: Any = None
        # A script that turns strict mode on itself still runs to the end: the refused op runs with warn_only.
        self._interception = Interception(self._on_call, self.sites, on_alert=lambda func: None)

    def __enter__(self) -> _Tracer:
        from torch.optim import optimizer as optim_module

        self._hook = optim_module.register_optimizer_step_post_hook(self._optimizer_stepped)
        self._interception.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.modules = self.sites.modules()
            self._interception.__exit__(*exc)
        finally:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None

    def _optimizer_stepped(self, opt: Any, *_: Any) -> None:
        self.optimizers.setdefault(id(opt), opt)

    def _on_call(self, func: Any, args: tuple, kwargs: dict | None) -> Callable[..., Any]:
        kind = op_kind(func)[0]
        if kind is OpKind.VIEW:
            # No arithmetic, nothing to digest; kept so that the op sequence and its
            # numbering match the audit's.
            self.steps.append(_Step(func, None, None, None))
            if func in _SET_DATA and args and isinstance(args[0], torch.Tensor):
                # ``empty`` then ``set_`` onto real data: how a DataLoader batch
                # arrives from a worker's shared memory. Its bits mean something now.
                self._uninitialized.pop(args[0], None)
            return func
        where = self.sites.current()
        roles = _roles(func)
        leaves = nested_leaves(args, [])
        if kwargs:
            nested_leaves([v for k, v in kwargs.items() if k not in roles.out_kwargs], leaves)
        for x in leaves:
            if isinstance(x, torch.Tensor) and (type(x) is torch.nn.Parameter or x.requires_grad and x.is_leaf):
                self.leaves.setdefault(id(x), x)
        with _disable_current_modes(), torch.no_grad():
            ins = self._digests(leaves)
        return functools.partial(self._run_op, func, kind, roles, where, ins)

    def _run_op(self, func: Any, kind: OpKind, roles: _ArgRoles, where: tuple[int, int], ins: tuple,
                *args: Any, **kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        if kind is OpKind.SIDE_EFFECT and is_collective(func):
            settle(func, result)
        with _disable_current_modes(), torch.no_grad():
            written = _written(roles, args, kwargs)
            if kind is OpKind.UNINITIALIZED:
                for t in nested_leaves(result, []):
                    if isinstance(t, torch.Tensor):
                        self._uninitialized[t] = True
                outs = None
            else:
                writes = self._writes
                for t in written:
                    self._uninitialized.pop(t, None)
                    if t._base is not None:
                        # Written through a view (DDP fills its gradient buckets so): the base's bits mean
                        # something now too.
                        self._uninitialized.pop(t._base, None)
                    ptr = _storage_ptr(t)
                    if ptr is not None:
                        writes[ptr] = writes.get(ptr, 0) + 1
                leaves = nested_leaves(result, [])
                seen = {id(x) for x in leaves}
                outs = self._digests(leaves + [t for t in written if id(t) not in seen])
        self.steps.append(_Step(func, where, ins, outs))
        return result

    def _digests(self, leaves: list) -> tuple:
        """One digest per leaf; a tensor that appears twice is digested once."""
        out = []
        seen: dict[int, tuple] = {}
        for x in leaves:
            if not isinstance(x, torch.Tensor):
                out.append(_value_key(x))
                continue
            d = seen.get(id(x))
            if d is None:
                d = seen[id(x)] = self._digest(x)
            out.append(d)
        return tuple(out)

    def _digest(self, t: torch.Tensor) -> tuple:
        if len(self._uninitialized) and t in self._uninitialized:
            return _UNINITIALIZED
        ptr = _storage_ptr(t)
        if ptr is None or t.is_inference():
            return _safe_digest(t)  # no storage or no version counter: nothing to key a reuse on
        stamp = (t._version, ptr, self._writes.get(ptr, 0))
        known = self._known.get(t)
        if known is not None and known[0] == stamp:
            return known[1]
        d = _safe_digest(t)
        self._known[t] = (stamp, d)
        return d


def _written(roles: _ArgRoles, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Tensors an op wrote to: in-place ``self``, ``out=``, foreach lists."""
    found: list[Any] = []
    for i, w in enumerate(roles.written_pos):
        if w and i < len(args):
            nested_leaves(args[i], found)
    for k in roles.written_kw:
        if k in kwargs:
            nested_leaves(kwargs[k], found)
    return [t for t in found if isinstance(t, torch.Tensor)]


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - sparse, nested, functional or fake tensors have none
        return None


def _safe_digest(t: torch.Tensor) -> tuple:
    try:
        return digest(t)
    except Exception as e:  # noqa: BLE001 - meta, fake or exotic tensors: compare what can be compared
        return ("undigestable", type(t).__name__, str(t.dtype), tuple(t.shape), type(e).__name__)


# -- one run ------------------------------------------------------------------
@dataclass(frozen=True)
class _Run:
    """What one run left behind: its op trace and its final tensors."""

    steps: tuple[_Step, ...]
    state: dict[str, Any]
    """``return value[i]``, ``grad of model.x``, ``value of model.x`` → tensor or scalar."""
    sites: SiteTracker
    """Resolves the site ids in ``steps``."""
    error: str | None = None
    """Why the run stopped early (the user's code raised), if it did."""
    compiled: tuple[str, ...] = ()
    """The ``torch.compile``d modules and functions the run called (``module MLP``)."""
    compiles: int = 0
    """Graphs Dynamo compiled during the run."""

    def op_fields(self, i: int) -> dict[str, Any]:
        """Report fields of op ``i`` (0-based): number, op, site and phase."""
        step = self.steps[i]
        fields: dict[str, Any] = {"index": i + 1, "op": str(step.func)}
        if step.where is not None:
            phase, site = _PHASE_NAMES.get(step.where[0], ""), self.sites.site(step.where[1])
            fields.update(where=site.location, function=site.function, module=site.module, phase=phase)
        return fields

    def location(self, i: int) -> str:
        """``file:line (phase)`` of op ``i``, or ``""``."""
        if i >= len(self.steps) or self.steps[i].where is None:
            return ""
        f = self.op_fields(i)
        return f"{f['where']} ({f['phase']})"


_PHASE_NAMES = {bit: name for name, bit in PHASE_BITS}


def _execute(target: loader.Target, mode: str, seed: int | None, *, keep_errors: bool,
             window: Window = WHOLE_RUN, compiled: bool = False) -> _Run:
    """Run the target once, from a fresh module load, under ``mode``, tracing ``window``'s steps.

    With ``keep_errors``, the user's code failing ends the run early with its
    error recorded instead of raising. With ``compiled``, the window runs
    untraced (:class:`Untraced`), so that ``torch.compile``d code runs compiled.
    """
    torch.use_deterministic_algorithms(mode == DETERMINISTIC, warn_only=True)
    tracer: Any = Untraced(target.root) if compiled else _Tracer(target.root)
    watch = tracer.compiled if compiled else tracer._interception.compiled
    result: Any = None
    compiles = compiles_so_far()
    with loader.sandboxed(target):
        try:
            prepared = loader.prepare(target, seed)
            loader.require_no_arguments(target, prepared)
            namespace = prepared.namespace
            recorded, result = run_window(prepared, lambda: tracer, window, target.entry)
        except (loader.UserCodeError, loader.ScriptExitError) as e:
            if not keep_errors:
                raise
            return _Run(tuple(tracer.steps), {}, tracer.sites, error=str(e), compiled=compiled_names(watch),
                        compiles=compiles_so_far() - compiles)
    with _disable_current_modes(), torch.no_grad():
        state = _final_state(result if target.entry is not None else None, namespace, tracer)
    if recorded.stopped is not None and target.entry is None:
        finalize(namespace)
    names = compiled_names(watch)
    watch.release()
    return _Run(tuple(tracer.steps), state, tracer.sites, compiled=names, compiles=compiles_so_far() - compiles)


def _final_state(result: Any, namespace: dict[str, Any], tracer: _Tracer | Untraced | None = None) -> dict[str, Any]:
    """Copies of the return value and of every parameter, gradient, buffer and optimizer state reachable.

    Reachable from the module's globals, and (with ``tracer``) used by the traced
    step itself: the modules it called, the parameters its ops read, the
    optimizers that stepped. A model built inside ``main()`` is gone from the
    globals by the end, but the tracer saw it.
    """
    state: dict[str, Any] = {}
    leaves = flat_tensors(result)
    for i, x in enumerate(leaves):
        state["return value" if len(leaves) == 1 else f"return value[{i}]"] = _copy(x)
    names: dict[int, str] = {}
    for path, t, is_param in _tensors(namespace, tracer):
        names[id(t)] = path
        if is_param:
            state[f"grad of {path}"] = _copy(t.grad)
        state[f"value of {path}"] = _copy(t)
    for oi, opt in enumerate(tracer.optimizers.values() if tracer is not None else ()):
        for p, slots in list(opt.state.items()):
            if not isinstance(slots, dict):
                continue
            owner = names.get(id(p), f"optimizer {oi} parameter")
            for key, v in slots.items():
                if isinstance(v, torch.Tensor):
                    state[f"optimizer state {key} of {owner}"] = _copy(v)
    return state


def _copy(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def _tensors(namespace: dict[str, Any], tracer: _Tracer | Untraced | None = None
             ) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """``(path, tensor, is_parameter)`` for the models and optimizers in the module's globals,
    then for those the traced step used.

    Parameters come from every ``nn.Module`` (by its attribute path and parameter
    name) and every optimizer's param groups, plus leaf tensors that require grad;
    buffers come from the modules. Each tensor is listed once, under the first path
    that reaches it; globals are searched in definition order, then the modules the
    step called (``Net.conv1.weight``), the optimizers that stepped and the leaf
    tensors its ops read.
    """
    seen_tensors: set[Any] = set()
    seen_objects: set[int] = set()
    module_name = namespace.get("__name__")

    def take(path: str, t: Any, is_param: bool) -> Iterator[tuple[str, torch.Tensor, bool]]:
        if not isinstance(t, torch.Tensor):
            return
        # By what it holds, not by Python object: autograd can hand an op another
        # Python tensor over a parameter's own memory.
        ptr = _storage_ptr(t)
        key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) if ptr else id(t)
        if key not in seen_tensors:
            seen_tensors.add(key)
            yield path, t, is_param

    def visit(obj: Any, path: str, depth: int) -> Iterator[tuple[str, torch.Tensor, bool]]:
        if id(obj) in seen_objects:
            return
        if isinstance(obj, torch.nn.Module):
            seen_objects.add(id(obj))
            for name, p in obj.named_parameters():
                yield from take(f"{path}.{name}", p, True)
            for name, b in obj.named_buffers():
                yield from take(f"{path}.{name}", b, False)
        elif isinstance(obj, torch.optim.Optimizer):
            seen_objects.add(id(obj))
            for gi, group in enumerate(obj.param_groups):
                for pi, p in enumerate(group.get("params", ())):
                    yield from take(f"{path}.param_groups[{gi}].params[{pi}]", p, True)
        elif isinstance(obj, torch.Tensor):
            if obj.requires_grad and obj.is_leaf:
                yield from take(path, obj, True)
        elif depth >= _MAX_DEPTH:
            return
        elif isinstance(obj, (list, tuple)):
            seen_objects.add(id(obj))
            for i, x in enumerate(obj):
                yield from visit(x, f"{path}[{i}]", depth + 1)
        elif isinstance(obj, dict):
            seen_objects.add(id(obj))
            for k, x in list(obj.items()):
                if isinstance(k, (str, int)):
                    yield from visit(x, f"{path}[{k!r}]", depth + 1)
        elif module_name is not None and type(obj).__module__ == module_name and hasattr(obj, "__dict__"):
            # An instance of a class the user's script defines (a Trainer holding the model).
            seen_objects.add(id(obj))
            for k, x in list(vars(obj).items()):
                yield from visit(x, f"{path}.{k}", depth + 1)

    for name, value in list(namespace.items()):
        if not name.startswith("__"):
            yield from visit(value, name, 0)
    if tracer is None:
        return
    for qualified, mod in tracer.modules:
        for name, p in mod.named_parameters(recurse=False):
            yield from take(f"{qualified}.{name}", p, True)
        for name, b in mod.named_buffers(recurse=False):
            yield from take(f"{qualified}.{name}", b, False)
    for oi, opt in enumerate(tracer.optimizers.values()):
        yield from visit(opt, f"optimizer {oi}", 0)
    for i, t in enumerate(tracer.leaves.values()):
        yield from take(f"leaf tensor {i} {list(t.shape)}", t, True)


# -- comparing runs -----------------------------------------------------------
@dataclass(frozen=True)
class _Comparison:
    """How one later run differs from run 1."""

    run: int
    """1-based number of the later run."""
    split: int | None
    """0-based op position where the sequences part, if they do."""
    split_info: dict[str, Any] | None
    differing: frozenset[int]
    """0-based positions, before any split, of ops whose outputs differ."""
    root: int | None
    """First of ``differing`` whose inputs were identical."""
    mismatches: tuple[tuple[str, str], ...]
    """``(key, description)`` of the final tensors that differ."""
    error: str | None
    """Why the later run stopped early, if it did."""
    collectives: tuple[tuple[int, bool, bool], ...] = ()
    """``(position in run 1, inputs differ, outputs differ)`` of each collective call before any split."""


def _compare(first: _Run, other: _Run, run: int) -> _Comparison:
    a, b = first.steps, other.steps
    # The path is the sequence of ops that compute. Views, profiler markers and
    # allocations compute nothing, and a DataLoader's workers make them land at
    # different places (``record_function`` markers; ``empty`` + ``set_`` as each
    # batch arrives from shared memory): they neither split the path nor shift the alignment.
    ca = [i for i, s in enumerate(a) if s.outs is not None]
    cb = [i for i, s in enumerate(b) if s.outs is not None]
    n = min(len(ca), len(cb))
    split = next((j for j in range(n) if a[ca[j]].func is not b[cb[j]].func), None)
    if split is None and len(ca) != len(cb):
        split = n
    split_info = None
    if split is not None:
        ia = ca[split] if split < len(ca) else len(a)
        ib = cb[split] if split < len(cb) else len(b)
        split_info = {
            "index": ia + 1,
            "runs": [1, run],
            "ops": [str(a[ia].func) if ia < len(a) else _END, str(b[ib].func) if ib < len(b) else _END],
            "where": [first.location(ia), other.location(ib)],
        }
    differing: set[int] = set()
    root = None
    for j in range(n if split is None else split):
        sa, sb = a[ca[j]], b[cb[j]]
        if sa.outs == sb.outs:
            continue
        differing.add(ca[j])
        if root is None and sa.ins == sb.ins:
            root = ca[j]
    # A run that raised has no final state to compare; its error says enough.
    mismatches = () if other.error else _state_mismatches(first.state, other.state, run)
    stop = n if split is None else split
    return _Comparison(run, split, split_info, frozenset(differing), root, mismatches, other.error,
                       aligned_calls([(i, a[i]) for i in ca[:stop]], [b[j] for j in cb[:stop]]))


def _state_mismatches(a: dict[str, Any], b: dict[str, Any], run: int) -> tuple[tuple[str, str], ...]:
    """``(key, description)`` for every return value, gradient or tensor that differs."""
    out = []
    for key, x in a.items():
        if key not in b:
            out.append((key, f"{key} (missing in run {run})"))
            continue
        y = b[key]
        if (x is None) != (y is None):
            out.append((key, f"{key} (None in run {1 if x is None else run} only)"))
        elif x is not None and not same_bits(x, y):
            out.append((key, f"{key} ({_how_far(x, y)}; run {run} vs run 1)"))
    out += [(key, f"{key} (only in run {run})") for key in b if key not in a]
    return tuple(out)


def _how_far(x: Any, y: Any) -> str:
    d = difference(x, y)
    if d.elements == 1:
        return f"|diff| {d.max_abs_diff:.3g}"
    return f"{d.elements_differing} of {d.elements} elements, max |diff| {d.max_abs_diff:.3g}"


def _summarise(mode: str, runs: int, first: _Run, comparisons: list[_Comparison],
               compiles: int | None = None, inductor_deterministic: bool | None = None) -> RunCheck:
    differing = frozenset().union(*(c.differing for c in comparisons))
    mismatches: dict[str, str] = {}
    for c in comparisons:
        for key, text in c.mismatches:
            mismatches.setdefault(key, text)  # each tensor once, as the first run that differed saw it
    roots = [c.root for c in comparisons if c.root is not None]
    root_cause = None
    if roots or differing:
        # Without a root, no traced op turned identical inputs into different
        # outputs: the difference came in from outside the ops (Python or NumPy
        # values, files, uninitialized memory); the first op that saw it is shown.
        i = min(roots) if roots else min(differing)
        root_cause = {**first.op_fields(i), "inputs_identical": bool(roots),
                      "downstream": sum(1 for j in differing if j > i)}
        if min(differing) < i:
            # Data from outside the ops already differed before the root cause.
            earlier = first.op_fields(min(differing))
            root_cause["first_difference"] = {k: earlier[k] for k in ("index", "op", "where") if k in earlier}
    splits = [c for c in comparisons if c.split is not None]
    path_split = min(splits, key=lambda c: (c.split, c.run)).split_info if splits else None
    error = "; ".join(f"run {c.run}: {c.error}" for c in comparisons if c.error) or None
    return RunCheck(
        mode=mode, runs=runs, ops=len(first.steps), differing_ops=len(differing),
        reproducible=not (differing or mismatches or path_split or error),
        root_cause=root_cause, path_split=path_split, mismatches=tuple(mismatches.values()), error=error,
        compared=len(first.state),
        collectives=summary(first.steps, first.location, [c.collectives for c in comparisons], root_cause),
        compiled=first.compiled if compiles is not None else (),
        compiles=compiles, inductor_deterministic=inductor_deterministic,
    )


# -- public -------------------------------------------------------------------
def run_check(
    target: loader.Target,
    mode: str = DEFAULT,
    runs: int = DEFAULT_RUNS,
    *,
    seed: int | None = 0,
    on_run: Callable[[str, int, int], None] | None = None,
    window: Window = WHOLE_RUN,
    compiled: bool | None = None,
) -> RunCheck:
    """Run ``target`` ``runs`` times from identical state under ``mode`` and compare the bits.

    ``mode`` is ``"default"`` (deterministic algorithms off) or ``"deterministic"``
    (on, with ``warn_only=True``). ``on_run(mode, i, runs)`` is called before run
    ``i`` (1-based). The user's code failing in the first run raises the loader's
    :class:`~opaudit.engine.loader.UserCodeError` or :class:`~opaudit.engine.loader.ScriptExitError`;
    a later run failing where the first did not is reported in ``RunCheck.error``.
    ``seed=None`` leaves the RNG unseeded, so ops that draw from it differ run to run.
    ``window`` picks the steps traced (the audit's own window, so a long script is
    stopped after it); by default the whole script, or one call of the entry.
    ``compiled=True`` checks a step that calls ``torch.compile``d code as it runs
    compiled (no dispatch mode: final tensors only; in deterministic mode with
    ``torch._inductor.config.deterministic`` on); ``None`` finds out from the
    first run, which is traced.
    """
    if mode not in MODES:
        raise RunCheckError(f"unknown mode {mode!r} (expected one of: {', '.join(MODES)})")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
        raise RunCheckError(f"a run check needs at least 2 runs, got {runs!r}")
    with preserved_state(), InductorDeterministic(mode == DETERMINISTIC and bool(compiled)) as inductor:
        if on_run is not None:
            on_run(mode, 1, runs)
        first = _execute(target, mode, seed, keep_errors=False, window=window, compiled=bool(compiled))
        if first.compiled and not compiled:
            # The traced run ran compiled code eagerly: check the step as it really runs, compiled.
            return run_check(target, mode, runs, seed=seed, on_run=on_run, window=window, compiled=True)
        compiles = first.compiles
        comparisons = []
        for k in range(2, runs + 1):
            if on_run is not None:
                on_run(mode, k, runs)
            other = _execute(target, mode, seed, keep_errors=True, window=window, compiled=bool(compiled))
            compiles += other.compiles
            comparisons.append(_compare(first, other, k))
            del other
            gc.collect()  # the previous run's model and optimizer, before the next run builds its own
    if not compiled:
        return _summarise(mode, runs, first, comparisons)
    return _summarise(mode, runs, first, comparisons, compiles=compiles, inductor_deterministic=inductor)


def run_checks(
    target: loader.Target,
    runs: int = DEFAULT_RUNS,
    *,
    seed: int | None = 0,
    modes: Iterable[str] = MODES,
    on_run: Callable[[str, int, int], None] | None = None,
    window: Window = WHOLE_RUN,
) -> tuple[RunCheck, ...]:
    """:func:`run_check` under each of ``modes`` (default and deterministic), in that order.

    Whether the step runs compiled code is found out once, in the first mode.
    """
    out: list[RunCheck] = []
    compiled: bool | None = None
    for mode in modes:
        out.append(run_check(target, mode, runs, seed=seed, on_run=on_run, window=window, compiled=compiled))
        compiled = bool(out[-1].compiled)
    return tuple(out)
