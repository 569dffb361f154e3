"""Runnable cases of one OpInfo entry or module: its samples (OpInfo's or stress ones) and how to record them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opaudit.data.catalog import OPINFO, STRESS
from opaudit.flows.catalog.config import SweepConfig
from opaudit.flows.catalog.select import FUNCTION, INPLACE
from opaudit.flows.catalog.stress import (
    STRESS_CALL_S,
    STRESS_TRIAL_BUDGET_S,
    clone_tensor,
    fit,
    map_sample,
    numel,
    opinfo_samples,
    sample_mode,
    sample_shapes,
    stress_candidates,
    tensor_leaves,
    tile,
)

MAX_GRAD_ELEMENTS = 16_000_000
"""Outputs larger than this (an expand of a stress input) get no backward."""


@dataclass
class Case:
    """One runnable sample: a callable making the output, and whether to run its backward."""

    call: Callable[[], Any]
    grad: bool
    label: str = ""


def sample_call(op: Any, sample: Any) -> Callable[[], Any]:
    def call() -> Any:
        out = op(sample.input, *sample.args, **sample.kwargs)
        return sample.output_process_fn_grad(out) if sample.output_process_fn_grad else out
    return call


def _cloned_call(op: Any, sample: Any) -> Callable[[], Any]:
    """A call on fresh copies (a trial must not mutate the sample an in-place op is recorded on)."""
    return lambda: sample_call(op, map_sample(sample, clone_tensor))()


def form_cases(op: Any, device: str, dtype: Any, cfg: SweepConfig, form: str) -> list[Case]:
    """OpInfo's own samples called in place (on a copy of the input) or with ``out=`` tensors.

    No gradient: autograd refuses ``out=``, and an in-place op on a leaf that requires
    grad. No stress inputs either: the scaled kernels are the function form's.
    """
    import torch
    from torch.utils._pytree import tree_map

    cases = []
    for i, s in enumerate(opinfo_samples(op, device, dtype, False, cfg.max_samples)):
        if form == INPLACE:
            # Written in place: a copy made before recording, so the sample stays as OpInfo made it.
            inp = s.input.detach().clone()

            def call(s: Any = s, inp: Any = inp) -> Any:
                return op.inplace_variant(inp, *s.args, **s.kwargs)
        else:
            try:
                with torch.no_grad():
                    result = op(s.input, *s.args, **s.kwargs)
                outs = tree_map(lambda t: torch.empty_like(t) if isinstance(t, torch.Tensor) else t, result)
                with torch.no_grad():
                    op(s.input, *s.args, **s.kwargs, out=outs)
            except Exception:  # a sample this form does not take is not a case
                continue

            def call(s: Any = s, outs: Any = outs) -> Any:
                return op(s.input, *s.args, **s.kwargs, out=outs)
        cases.append(Case(call, False, f"{form} sample {i}"))
    return cases


def opinfo_cases(op: Any, device: str, dtype: Any, cfg: SweepConfig, kind: str,
                 form: str = FUNCTION) -> tuple[list[Case], str]:
    """The cases of an OpInfo entry for one input kind: its samples, or stress samples built from them."""
    import torch

    if form != FUNCTION:
        if kind == OPINFO:
            return form_cases(op, device, dtype, cfg, form), ""
        return [], ""
    dtype_name = str(dtype).replace("torch.", "")
    grad = bool(op.supports_autograd) and dtype in op.supported_backward_dtypes(device.split(":")[0])
    base = opinfo_samples(op, device, dtype, grad, cfg.max_samples)
    if kind == OPINFO:
        return [Case(sample_call(op, s), grad, f"sample {i}") for i, s in enumerate(base)], ""
    gen = torch.Generator().manual_seed(cfg.seed)
    float_op = dtype.is_floating_point or dtype.is_complex
    cases: list[Case] = []
    # One stress sample per mode (the sample's plain arguments: ``accumulate=True``, a bool
    # mask instead of an index...), so a few samples cover an op's kernels, not one kernel
    # at several sizes.
    seen: set[str] = set()
    covered: set[str] = set()
    budget_end = time.monotonic() + STRESS_TRIAL_BUDGET_S
    for cand in stress_candidates(op, device, dtype, grad, base, cfg):
        if len(cases) >= cfg.stress_samples or time.monotonic() > budget_end:
            break
        shape, mode = sample_shapes(cand.sample) + repr(cand.size0), sample_mode(cand.sample)
        if shape in seen or mode in covered:
            continue
        seen.add(shape)
        sample = fit(cand, lambda v: _cloned_call(op, v), float_op, gen, device, 4 * cfg.stress_elements)
        if sample is not None:
            cases.append(Case(sample_call(op, sample), grad, f"stress {numel(sample)} elements"))
            covered.add(mode)
    note = "" if cases else f"no stress input ({dtype_name}: no sample scales to "\
                            f"{cfg.stress_elements:.0e} elements within {STRESS_CALL_S}s)"
    return cases, note


def module_cases(info: Any, device: str, dtype: Any, cfg: SweepConfig, kind: str,
                 form: str = FUNCTION) -> tuple[list[Case], str]:
    """The cases of a ``torch.nn`` module for one input kind: its inputs, or inputs tiled along dim 0."""
    import torch
    from torch.testing._internal.opinfo.core import SampleInput

    grad = dtype.is_floating_point or dtype.is_complex
    inputs = info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=grad, training=True)
    inputs = list(inputs)[: cfg.max_samples]
    gen = torch.Generator().manual_seed(cfg.seed)
    target, cap = cfg.stress_elements, 4 * cfg.stress_elements
    budget_end = time.monotonic() + STRESS_TRIAL_BUDGET_S
    cases = []
    for i, mi in enumerate(inputs):
        try:
            module = info.module_cls(*mi.constructor_input.args, **mi.constructor_input.kwargs)
            module = module.to(device=device, dtype=dtype).train()
        except Exception:  # a module that cannot be built has no sample here
            continue

        def call_of(s: Any, m: Any = module) -> Callable[[], Any]:
            return lambda: m(s.input, *s.args, **s.kwargs)

        fwd = list(mi.forward_input.args)
        if not fwd:
            continue
        sample = SampleInput(fwd[0], args=tuple(fwd[1:]), kwargs=dict(mi.forward_input.kwargs))
        if kind == STRESS:
            if len(cases) >= cfg.stress_samples or time.monotonic() > budget_end:
                break
            first = sample.input
            if not isinstance(first, torch.Tensor) or first.dim() == 0:
                continue
            # Dim 0 is the batch for most modules (the sequence for RNNs without batch_first).
            cand = tile(sample, first.shape[0], target, cap)
            fitted = fit(cand, call_of, grad, gen, device, cap) if cand is not None else None
            if fitted is None:
                continue
            sample = fitted
        cases.append(Case(call_of(sample), grad, f"{kind} {i}"))
    note = "" if cases or kind == OPINFO else "no stress input (module input does not tile along dim 0)"
    return cases, note


def run_case(rec: Any, case: Case, gen: Any, device: str) -> None:
    """Record the forward and, where it has one, the backward with a non-uniform gradient."""
    import torch

    with rec:
        out = case.call()
    if not case.grad:
        return
    outs = [t for t in tensor_leaves(out) if t.requires_grad and t.grad_fn is not None
            and (t.dtype.is_floating_point or t.dtype.is_complex)]
    if not outs or sum(t.numel() for t in outs) > MAX_GRAD_ELEMENTS:
        return
    # Non-uniform gradients: an all-ones gradient hides atomics whose order does not
    # matter when every addend is equal.
    grads = [torch.randn(tuple(t.shape), dtype=t.dtype, generator=gen).to(t.device) for t in outs]
    with rec:
        torch.autograd.backward(outs, grads)
