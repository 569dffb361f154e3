"""What a run leaves behind: its return value, parameters, gradients, buffers and optimizer state, and how
two runs' states differ."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from opaudit.aten.bitwise import difference, flat_tensors, same_bits
from opaudit.engine.tracer import Tracer, storage_ptr
from opaudit.flows.runcheck.compiled import Untraced

_MAX_DEPTH = 3
"""How deep containers and user objects in the module's globals are searched for models."""


def final_state(result: Any, namespace: dict[str, Any], tracer: Tracer | Untraced | None = None,
                keep: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Copies of the return value and of every parameter, gradient, buffer and optimizer state reachable.

    Reachable from the module's globals, and (with ``tracer``) used by the traced
    step itself: the modules it called, the parameters its ops read, the
    optimizers that stepped. A model built inside ``main()`` is gone from the
    globals by the end, but the tracer saw it. ``keep`` turns each value (a tensor,
    ``None`` or a scalar) into what is kept instead of a copy (a digest).
    """
    _copy = keep or _clone
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


def _clone(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def _tensors(namespace: dict[str, Any], tracer: Tracer | Untraced | None = None
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
        if not isinstance(t, torch.Tensor) or t.is_meta:  # a meta tensor (a model built on "meta") holds no bits
            return
        # By what it holds, not by Python object: autograd can hand an op another
        # Python tensor over a parameter's own memory.
        ptr = storage_ptr(t)
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
def state_mismatches(a: dict[str, Any], b: dict[str, Any], run: int) -> tuple[tuple[str, str], ...]:
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
