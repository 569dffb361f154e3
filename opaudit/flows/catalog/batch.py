"""Per-op batch invariance for a catalog (``opaudit catalog --batch-invariance``).

Each probe runs one op family on the first ``b`` rows of a :data:`BATCH`-row
input, for every ``b`` in :data:`ROWS`, and on the whole input, through the
model check itself (:func:`opaudit.flows.batchinv.batch_invariance`): every aten
op a probe runs gets a verdict, and an op several probes run keeps the worst.
The row counts include those where this CPU's sgemm changes its blocking (1, 2,
7 of 256 give other bits; 4, 8 and 16 do not).

The probes cover the matmul family, reductions, normalisations,
softmax/log_softmax and ``scaled_dot_product_attention`` (prefill and a one-token
decode step), plus ``sigmoid`` on an odd row length, where ATen's vectorised
loop computes a tensor's last elements with the scalar formula.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from opaudit.data.catalog import BatchEntry
from opaudit.data.invariance import BATCH_INVARIANT, BATCH_VARIANT, OP_VERDICTS

BATCH = 256
"""Rows of a probe's full input."""
ROWS = (1, 2, 3, 4, 7, 8, 16, 64, 128)
"""Row counts compared with the full input's leading rows."""

BATCH_DTYPES = ("float32", "float64", "bfloat16", "float16")
"""The dtypes probed for a sweep of ``--dtypes all`` (the probes build floating inputs)."""


@dataclass(frozen=True)
class Probe:
    """One op family: ``build(device, dtype, generator)`` returns ``(forward, full input)``."""

    name: str
    aliases: tuple[str, ...]
    """Further names ``--ops`` globs match: torch and aten spellings."""
    build: Callable[[Any, Any, Any], tuple[Callable[[Any], Any], Any]]


def _randn(g: Any, device: Any, dtype: Any, *shape: int) -> Any:
    import torch

    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def _mm(d: Any, t: Any, g: Any) -> tuple:
    w = _randn(g, d, t, 256, 256)
    return (lambda x: x @ w), _randn(g, d, t, BATCH, 256)


def _linear(d: Any, t: Any, g: Any) -> tuple:
    import torch.nn.functional as F

    w, b = _randn(g, d, t, 256, 256), _randn(g, d, t, 256)
    return (lambda x: F.linear(x, w, b)), _randn(g, d, t, BATCH, 256)


def _bmm(d: Any, t: Any, g: Any) -> tuple:
    import torch

    w = _randn(g, d, t, BATCH, 32, 32)
    return (lambda x: torch.bmm(x, w[: x.shape[0]])), _randn(g, d, t, BATCH, 8, 32)


def _matmul_3d(d: Any, t: Any, g: Any) -> tuple:
    w = _randn(g, d, t, 64, 64)
    return (lambda x: x @ w), _randn(g, d, t, BATCH, 4, 64)


def _reduction(fn: Callable[[Any], Any]) -> Callable[[Any, Any, Any], tuple]:
    return lambda d, t, g: (fn, _randn(g, d, t, BATCH, 1024))


def _layer_norm(d: Any, t: Any, g: Any) -> tuple:
    import torch.nn.functional as F

    w, b = _randn(g, d, t, 1024), _randn(g, d, t, 1024)
    return (lambda x: F.layer_norm(x, (1024,), w, b)), _randn(g, d, t, BATCH, 1024)


def _rms_norm(d: Any, t: Any, g: Any) -> tuple:
    import torch.nn.functional as F

    w = _randn(g, d, t, 1024)
    return (lambda x: F.rms_norm(x, (1024,), w)), _randn(g, d, t, BATCH, 1024)


def _group_norm(d: Any, t: Any, g: Any) -> tuple:
    import torch.nn.functional as F

    return (lambda x: F.group_norm(x, 8)), _randn(g, d, t, BATCH, 32, 16)


def _batch_norm_eval(d: Any, t: Any, g: Any) -> tuple:
    import torch
    import torch.nn.functional as F

    mean, var = _randn(g, d, t, 64), _randn(g, d, t, 64).abs() + 0.5
    return (lambda x: F.batch_norm(x, mean, var, training=False)), _randn(g, d, t, BATCH, 64, 8) * torch.ones(
        (), dtype=t, device=d)


def _attention(q_len: int) -> Callable[[Any, Any, Any], tuple]:
    def build(d: Any, t: Any, g: Any) -> tuple:
        import torch.nn.functional as F

        q, kv = _randn(g, d, t, BATCH, 4, q_len, 32), _randn(g, d, t, BATCH, 2, 4, 16, 32)

        def attend(batch: Any) -> Any:
            q, kv = batch
            return F.scaled_dot_product_attention(q, kv[:, 0], kv[:, 1], is_causal=q_len > 1)

        return attend, (q, kv)

    return build


def _probes() -> tuple[Probe, ...]:
    import torch

    return (
        Probe("mm", ("torch.mm", "aten.mm*"), _mm),
        Probe("linear", ("nn.functional.linear", "aten.addmm*", "aten.linear*"), _linear),
        Probe("bmm", ("torch.bmm", "aten.bmm*"), _bmm),
        Probe("matmul", ("torch.matmul", "aten.matmul*", "aten.mm*"), _matmul_3d),
        Probe("mean", ("torch.mean", "aten.mean*"), _reduction(lambda x: x.mean(-1))),
        Probe("sum", ("torch.sum", "aten.sum*"), _reduction(lambda x: x.sum(-1))),
        Probe("var", ("torch.var", "aten.var*"), _reduction(lambda x: x.var(-1))),
        Probe("norm", ("linalg.vector_norm", "aten.linalg_vector_norm*"),
              _reduction(lambda x: torch.linalg.vector_norm(x, dim=-1))),
        Probe("layer_norm", ("nn.functional.layer_norm", "aten.native_layer_norm*"), _layer_norm),
        Probe("rms_norm", ("nn.functional.rms_norm", "aten.rms_norm*", "aten._fused_rms_norm*"), _rms_norm),
        Probe("group_norm", ("nn.functional.group_norm", "aten.native_group_norm*"), _group_norm),
        Probe("batch_norm", ("nn.functional.batch_norm", "aten._native_batch_norm_legit*"), _batch_norm_eval),
        Probe("softmax", ("torch.softmax", "aten._softmax*"), _reduction(lambda x: torch.softmax(x, -1))),
        Probe("log_softmax", ("torch.log_softmax", "aten._log_softmax*"),
              _reduction(lambda x: torch.log_softmax(x, -1))),
        Probe("scaled_dot_product_attention", ("nn.functional.scaled_dot_product_attention",
                                                "aten._scaled_dot_product*"), _attention(16)),
        Probe("scaled_dot_product_attention_decode", ("nn.functional.scaled_dot_product_attention",
                                                       "aten._scaled_dot_product*"), _attention(1)),
        Probe("sigmoid", ("torch.sigmoid", "aten.sigmoid*"),
              lambda d, t, g: (torch.sigmoid, _randn(g, d, t, BATCH, 63))),
    )


def select_probes(patterns: Iterable[str] = ()) -> tuple[Probe, ...]:
    """The probes whose name or an alias matches one of ``patterns`` (globs); every probe without patterns."""
    probes = _probes()
    patterns = [p for p in patterns if p]
    if not patterns:
        return probes
    return tuple(p for p in probes
                 if any(fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(pat, n)
                        for pat in patterns for n in (p.name, *p.aliases)))


def probe_batch_invariance(device: str, dtypes: Iterable[str], patterns: Iterable[str] = (),
                           threads: int | None = None) -> tuple[BatchEntry, ...]:
    """Run the selected probes for each dtype here and return one entry per (op, dtype), sorted.

    Global torch state (threads included) is restored afterwards.
    """
    import torch

    from opaudit.engine.globalstate import preserved_state
    from opaudit.flows.batchinv import batch_invariance

    found: dict[tuple[str, str], BatchEntry] = {}
    order = {v: k for k, v in enumerate(OP_VERDICTS)}
    with preserved_state():
        if threads:
            torch.set_num_threads(threads)
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for probe in select_probes(patterns):
                g = torch.Generator().manual_seed(0)
                forward, batch = probe.build(torch.device(device), dtype, g)
                result = batch_invariance(forward, batch, ROWS, remedies=False)
                for o in result.ops:
                    e = BatchEntry(op=o.op, dtype=dtype_name, verdict=o.verdict, probes=(probe.name,), batch=BATCH,
                                   rows=ROWS, variant_rows=o.variant_rows, max_abs_diff=o.max_abs_diff,
                                   signature=o.signature, reason=o.reason)
                    prev = found.get(e.key)
                    found[e.key] = e if prev is None else _merge(prev, e, order)
    return tuple(found[k] for k in sorted(found))


def _merge(a: BatchEntry, b: BatchEntry, order: dict[str, int]) -> BatchEntry:
    """The worse verdict (variant, then not comparable, then invariant), every probe and variant row count."""
    worse = a if order[a.verdict] <= order[b.verdict] else b
    diffs = [d for d in (a.max_abs_diff, b.max_abs_diff) if d is not None]
    return BatchEntry(
        op=a.op, dtype=a.dtype, verdict=worse.verdict, probes=tuple(dict.fromkeys(a.probes + b.probes)),
        batch=a.batch, rows=a.rows, variant_rows=tuple(sorted(set(a.variant_rows) | set(b.variant_rows))),
        max_abs_diff=max(diffs) if diffs else None, signature=a.signature,
        reason=worse.reason if worse.verdict not in (BATCH_VARIANT, BATCH_INVARIANT) else "",
    )
