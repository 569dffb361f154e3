"""Stress inputs: OpInfo's samples scaled up, with colliding indices, so that races show.

OpInfo samples are tiny (around 5 elements), and nondeterminism from parallel
accumulation or atomics only shows at scale with colliding indices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from opaudit.flows.catalog.config import SweepConfig
from opaudit.flows.catalog.select import opinfo_name

STRESS_CALL_S = 0.1
"""A stress sample whose forward takes longer than this is dropped for a smaller one."""


PROBE_FRACTION = 64
"""A tiled stress candidate is first timed at this fraction of its size."""


STRESS_TRIAL_BUDGET_S = 2.0
"""Time spent trying stress candidates for one op and dtype before settling for fewer."""


COLLISION_VALUES = 4
"""Distinct values left in an index argument of a stress sample."""


def tensor_leaves(obj: Any) -> list[Any]:
    import torch
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def numel(sample: Any) -> int:
    return sum(t.numel() for t in tensor_leaves((sample.input, sample.args, sample.kwargs)))


def map_sample(sample: Any, fn: Callable[[Any], Any]) -> Any:
    """A new SampleInput with ``fn`` applied to every tensor."""
    import torch
    from torch.testing._internal.opinfo.core import SampleInput
    from torch.utils._pytree import tree_map

    def leaf(x: Any) -> Any:
        return fn(x) if isinstance(x, torch.Tensor) else x

    return SampleInput(tree_map(leaf, sample.input), args=tree_map(leaf, tuple(sample.args)),
                       kwargs=tree_map(leaf, dict(sample.kwargs)),
                       output_process_fn_grad=sample.output_process_fn_grad, name=sample.name)


def clone_tensor(t: Any) -> Any:
    c = t.detach().clone()
    return c.requires_grad_(t.requires_grad) if t.requires_grad else c


_SIZE_CONSTANTS = {"XS": 3, "S": 5, "M": 10, "L": 20}


@contextlib.contextmanager
def _scaled_sizes(factor: float) -> Iterator[None]:
    """OpInfo's sample functions size tensors with the module constants ``S``, ``M``, ``L``;
    scale them for the duration (restored afterwards)."""
    patched = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith("torch.testing._internal"):
            continue
        for k, v in _SIZE_CONSTANTS.items():
            if type(getattr(mod, k, None)) is int and getattr(mod, k) == v:
                setattr(mod, k, max(v, int(round(v * factor))))
                patched.append((mod, k, v))
    try:
        yield
    finally:
        for mod, k, v in patched:
            setattr(mod, k, v)


def _collide(t: Any, gen: Any) -> Any:
    """The same index tensor with its values redrawn from a few of its own (still valid) values."""
    import torch

    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8) or t.numel() < 2:
        return t
    # A few of the tensor's own values: valid wherever the original was.
    pool = torch.unique(t.detach().flatten()[:4096].cpu())[:COLLISION_VALUES]
    picks = torch.randint(len(pool), tuple(t.shape), generator=gen)
    return pool[picks].to(device=t.device, dtype=t.dtype)


def _with_collisions(sample: Any, float_op: bool, gen: Any) -> Any:
    """Index arguments redrawn with heavy collisions. The input itself is only touched when the
    op is swept for a floating dtype (then an integer input is an index, as in ``embedding``)."""
    new = map_sample(sample, lambda t: _collide(t, gen))
    if not float_op:
        from torch.testing._internal.opinfo.core import SampleInput

        new = SampleInput(sample.input, args=new.args, kwargs=new.kwargs,
                          output_process_fn_grad=sample.output_process_fn_grad, name=sample.name)
    return new


_INDEX_DTYPES = ("int64", "int32", "int16", "int8", "uint8")


def is_index(t: Any) -> bool:
    return str(t.dtype).replace("torch.", "") in _INDEX_DTYPES and t.dim() >= 1 and t.shape[0] > 0


def _index_tensor(sample: Any, float_op: bool) -> Any | None:
    """The first integer tensor that indexes: among the arguments, or the input itself when the
    op is swept for a floating dtype (``embedding``'s input is its index)."""
    leaves = tensor_leaves((sample.args, sample.kwargs))
    if float_op:
        leaves = tensor_leaves(sample.input) + leaves
    return next((t for t in leaves if is_index(t)), None)


@dataclass(frozen=True)
class Candidate:
    """A stress sample not built yet: a sample and how many times to tile it along dim 0."""

    sample: Any
    size0: int
    """Tensors whose dim 0 has this size are tiled; 0 for the sample as it is."""
    reps: int
    numel: int

    def build(self) -> Any:
        if not self.size0:
            return self.sample
        size0, reps = self.size0, self.reps

        def grow(t: Any) -> Any:
            if t.dim() == 0 or t.shape[0] != size0:
                return t
            g = t.detach().repeat(reps, *([1] * (t.dim() - 1)))
            return g.requires_grad_(t.requires_grad) if t.requires_grad else g

        return map_sample(self.sample, grow)


def tile(sample: Any, size0: int, target: int, cap: int) -> Candidate | None:
    """Plan to repeat along dim 0 every tensor whose dim 0 is ``size0`` (a batch, or an index
    and the values that go with it) until the sample holds about ``target`` elements. An index
    tiled this way repeats each of its values: collisions by construction."""
    leaves = tensor_leaves((sample.input, sample.args, sample.kwargs))
    group = sum(t.numel() for t in leaves if t.dim() > 0 and t.shape[0] == size0)
    rest = sum(t.numel() for t in leaves) - group
    if group == 0 or size0 == 0:
        return None
    reps = max(2, target // group)
    while reps > 2 and rest + group * reps > cap:
        reps //= 2
    if rest + group * reps > cap:
        return None
    return Candidate(sample, size0, reps, rest + group * reps)


def opinfo_samples(op: Any, device: str, dtype: Any, grad: bool, n: int) -> list[Any]:
    """OpInfo's first ``n`` samples, seeded as OpInfo's own tests seed them."""
    import torch

    # ``op.sample_inputs`` wraps this in an iterator that walks the stack to find the
    # calling test (tens of ms per call), which a sweep has no use for.
    torch.manual_seed(0)
    return list(itertools.islice(op.sample_inputs_func(op, device, dtype, grad), n))


def _scaled_samples(op: Any, device: str, dtype: Any, grad: bool, base: list[Any], cfg: SweepConfig) -> list[Any]:
    """OpInfo's samples regenerated with the size constants scaled so that the largest comes
    near ``stress_elements``. The scale is set from how each sample grows when the constants
    double (a 3-d sample grows 8x), so no sample overshoots."""
    target, cap = cfg.stress_elements, 4 * cfg.stress_elements
    sizes = [numel(s) for s in base]
    try:
        with _scaled_sizes(2):
            doubled = [numel(s) for s in opinfo_samples(op, device, dtype, grad, cfg.max_samples)]
    except Exception:  # a sampler that breaks when scaled simply is not scaled
        return []
    if len(doubled) != len(sizes):
        return []
    limits = []
    for a, b in zip(sizes, doubled):
        if a > 0 and b > a:
            exponent = max(1, round(math.log2(b / a)))
            limits.append((target / a) ** (1 / exponent))
    factor = min(limits) if limits else 0.0
    if factor < 2:
        return []
    try:
        with _scaled_sizes(min(factor, 200_000.0)):
            return [s for s in opinfo_samples(op, device, dtype, grad, cfg.max_samples) if numel(s) <= cap]
    except Exception:
        return []


def _index_along_rows(device: str, dtype: Any, grad: bool, target: int) -> list[Any]:
    """``(input [n, n], dim=0, index [n] with 4 distinct rows, source [n, n])``."""
    import torch
    from torch.testing import make_tensor
    from torch.testing._internal.opinfo.core import SampleInput

    n = max(2, int(math.sqrt(target / 2)))
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(0, COLLISION_VALUES, (n,), generator=gen).to(device)
    make = functools.partial(make_tensor, device=device, dtype=dtype, requires_grad=grad)
    return [SampleInput(make((n, n)), args=(0, index, make((n, n))))]


# OpInfo samples that no generic transformation turns into colliding writes along the
# kernel's parallel dimension: their only 2-d samples index along the last dimension.
# Named here, one sampler each, so the list of hand-made inputs stays visible.
STRESS_EXTRAS: dict[str, Callable[[str, Any, bool, int], list[Any]]] = {
    "index_copy": _index_along_rows,
    "index_add": _index_along_rows,
}


def stress_candidates(op: Any, device: str, dtype: Any, grad: bool, base: list[Any], cfg: SweepConfig) -> list[Any]:
    """Stress samples to try, best first: the named extras, index arguments tiled (many
    colliding indices into data of realistic size), then the scaled samples, then inputs
    tiled along dim 0."""
    target, cap = cfg.stress_elements, 4 * cfg.stress_elements
    float_op = dtype.is_floating_point or dtype.is_complex
    scaled = _scaled_samples(op, device, dtype, grad, base, cfg)
    extra = STRESS_EXTRAS.get(opinfo_name(op))
    extras = [Candidate(s, 0, 1, numel(s)) for s in extra(device, dtype, grad, target)] if extra else []
    by_index: list[Candidate] = []
    for s in scaled + base:
        idx = _index_tensor(s, float_op)
        if idx is not None:
            c = tile(s, idx.shape[0], target, cap)
            if c is not None:
                by_index.append(c)
    plain = [Candidate(s, 0, 1, n) for s in scaled if (n := numel(s)) >= target // 100]
    by_input = []
    for s in base:
        inp = s.input
        if hasattr(inp, "dim") and inp.dim() > 0:
            c = tile(s, inp.shape[0], target, cap)
            if c is not None:
                by_input.append(c)
    out: list[Candidate] = list(extras)
    for group in (by_index, plain, by_input):
        out += sorted(group, key=lambda c: c.numel, reverse=True)
    return out


def _trial(call: Callable[[], Any], device: str, cap: int) -> float | None:
    """Seconds an unrecorded forward takes (the faster of two runs, so that a busy machine
    sways the choice of stress samples less), infinite when its output exceeds ``cap``
    elements, ``None`` if it fails."""
    import torch

    best = math.inf
    for _ in range(2):
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = call()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        except Exception:
            return None
        # An expand-like op turns a stress input into an output far larger than the input;
        # its gradient alone would dominate the sweep.
        if sum(t.numel() for t in tensor_leaves(out)) > cap:
            return math.inf
        del out
        if best > STRESS_CALL_S:
            break
    return best


def fit(cand: Candidate, call_of: Callable[[Any], Callable[[], Any]], float_op: bool, gen: Any, device: str,
         cap: int) -> Any | None:
    """The candidate with colliding indices, tiled as far as its forward stays within
    :data:`STRESS_CALL_S`; ``None`` if it fails or is too slow even small.

    A tiled candidate starts at a fraction of its size and grows: an op whose time grows
    with dim 0 (an RNN over a sequence) would otherwise run for minutes at full size.
    """
    def attempt(reps: int) -> tuple[Any, float]:
        s = dataclasses.replace(cand, reps=reps).build() if cand.size0 else cand.sample
        for variant in (_with_collisions(s, float_op, gen), s):
            t = _trial(call_of(variant), device, cap)
            if t is not None:
                return variant, t
        return None, math.inf  # the collided indices broke it, and so did the original

    if not cand.size0 or cand.reps < 4 * PROBE_FRACTION:
        sample, t = attempt(cand.reps)
        return sample if t <= STRESS_CALL_S else None
    reps = cand.reps // PROBE_FRACTION
    sample, t = attempt(reps)
    if sample is None or t > STRESS_CALL_S:
        return None
    while reps < cand.reps:
        # Aim at half the limit from the last timing; at least double, at most the plan.
        bigger = min(cand.reps, max(2 * reps, int(reps * STRESS_CALL_S / 2 / max(t, 1e-6))))
        grown, t_grown = attempt(bigger)
        if grown is None or t_grown > STRESS_CALL_S:
            break
        sample, t, reps = grown, t_grown, bigger
    return sample


def sample_mode(sample: Any) -> str:
    """Plain arguments, tensor dtypes and ranks: what selects the kernel, whatever the sizes."""
    import torch
    from torch.utils._pytree import tree_flatten

    leaves = tree_flatten((sample.input, sample.args, sample.kwargs))[0]
    return repr([(x.dtype, x.dim()) if isinstance(x, torch.Tensor) else x for x in leaves])


def sample_shapes(sample: Any) -> str:
    """Shapes and plain arguments: two candidates equal here would record the same signatures."""
    import torch
    from torch.utils._pytree import tree_flatten

    leaves = tree_flatten((sample.input, sample.args, sample.kwargs))[0]
    return repr([tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in leaves])
