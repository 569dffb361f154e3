"""What kind of op an overload is: the one place that decides what gets replayed.

Every recorded op falls in exactly one :class:`OpKind`. Only ``COMPUTE`` and
``RANDOM`` ops are replayed; the others are accounted for in the report with the
reason given here, never dropped.
"""

from __future__ import annotations

import enum
import functools

import torch


class OpKind(str, enum.Enum):
    """How opaudit treats an op overload."""

    COMPUTE = "compute"
    """Does arithmetic or copies data: replayed and classified."""
    RANDOM = "random"
    """Draws from the RNG (tagged ``nondeterministic_seeded``): replayed with the RNG state restored."""
    VIEW = "view"
    """Metadata, view or annotation only, no arithmetic: counted in the summary, not replayed."""
    UNINITIALIZED = "uninitialized"
    """Returns uninitialized memory: its bits are meaningless by definition."""
    SIDE_EFFECT = "side_effect"
    """Has effects outside its outputs (collectives, printing, streams): not replayed."""


# Ops that only read or rewrite tensor metadata. Their schemas do not all mark them
# as views (``_unsafe_view`` returns a fresh tensor, ``set_`` writes metadata in
# place), so they are named here. An op that can allocate or raise is not metadata:
# ``resize_`` and ``resize_as_`` grow storage (uninitialized memory, filled under
# deterministic mode) and raise for quantized tensors, so they are replayed.
_METADATA_OPS = frozenset({
    "aten::size", "aten::sym_size", "aten::stride", "aten::sym_stride", "aten::numel",
    "aten::sym_numel", "aten::dim", "aten::storage_offset", "aten::sym_storage_offset",
    "aten::is_contiguous", "aten::sym_is_contiguous", "aten::is_strides_like_format",
    "aten::is_non_overlapping_and_dense", "aten::_unsafe_view", "aten::lift_fresh",
    "aten::lift", "aten::set_", "aten::_reshape_alias",
    "aten::squeeze_", "aten::unsqueeze_", "aten::t_", "aten::transpose_", "aten::as_strided_",
    "aten::swapaxes_", "aten::swapdims_", "aten::_version", "aten::is_same_size",
    "aten::_has_compatible_shallow_copy_type", "aten::requires_grad_", "aten::retain_grad",
    "aten::_nested_tensor_size", "aten::prim_layout", "aten::_is_zerotensor",
    "aten::is_conj", "aten::is_neg", "aten::_conj", "aten::_neg_view", "aten::resolve_conj",
    "aten::resolve_neg",
})

# Ops whose output is whatever was in memory. Under deterministic mode they look
# "fixed" only because ``fill_uninitialized_memory`` fills them.
_UNINITIALIZED_OPS = frozenset({
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
    "aten::new_empty_strided", "aten::empty_permuted", "aten::_empty_affine_quantized",
    "aten::_empty_per_channel_affine_quantized", "aten::empty_quantized",
})

# Ops whose result depends on their tensor arguments' dtype, shape and device only,
# never on their values: captured without values (no memory charged to the budget).
_SHAPE_ONLY_OPS = frozenset({
    "aten::new_zeros", "aten::new_ones", "aten::new_full", "aten::zeros_like", "aten::ones_like",
    "aten::full_like", "aten::rand_like", "aten::randn_like", "aten::randint_like",
})

# Ops with effects beyond their outputs; replaying them would repeat the effect.
_SIDE_EFFECT_OPS = frozenset({
    "aten::record_stream", "aten::_print", "aten::_assert_async", "aten::_assert_scalar",
    "aten::_functional_assert_async", "aten::_functional_sym_constrain_range",
    "aten::sym_constrain_range", "aten::sym_constrain_range_for_size",
})
# Whole namespaces that talk to other processes.
_SIDE_EFFECT_NAMESPACES = {
    "c10d": "collective", "_c10d_functional": "collective", "c10d_functional": "collective",
    "_dtensor": "collective", "_c10d_functional_autograd": "collective",
}
# Bookkeeping namespaces: annotations with no tensor math, counted like views.
_ANNOTATION_NAMESPACES = frozenset({"profiler"})

# Ops backed by cuDNN on CUDA, replayed under each cudnn.deterministic / benchmark setting.
CUDNN_OPS = frozenset({
    "aten::convolution", "aten::_convolution", "aten::convolution_backward",
    "aten::cudnn_convolution", "aten::cudnn_convolution_transpose", "aten::_cudnn_rnn",
    "aten::_cudnn_rnn_backward", "aten::cudnn_batch_norm", "aten::cudnn_batch_norm_backward",
    "aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::_native_batch_norm_legit",
    "aten::_native_batch_norm_legit_functional", "aten::_batch_norm_with_update",
    "aten::batch_norm_backward", "aten::_cudnn_ctc_loss", "aten::cudnn_grid_sampler",
    "aten::cudnn_grid_sampler_backward", "aten::cudnn_affine_grid_generator",
    "aten::_thnn_fused_lstm_cell", "aten::_thnn_fused_gru_cell", "aten::lstm", "aten::gru", "aten::rnn_tanh",
})


# Ops whose nondeterminism depends on the values of an index argument: they write
# (or accumulate, or scatter) to positions an index tensor names, so whether two
# writes race depends on whether the indices collide. One call with no duplicate
# index says nothing about the next call's; the recorder keeps several captures per
# signature for these (``Recorder(captures_per_signature=...)``).
VALUE_DEPENDENT_OPS = frozenset({
    "aten::index_put", "aten::index_put_", "aten::_index_put_impl", "aten::_index_put_impl_",
    "aten::_unsafe_index_put", "aten::put", "aten::put_",
    "aten::index_add", "aten::index_add_", "aten::index_copy", "aten::index_copy_",
    "aten::index_reduce", "aten::index_reduce_",
    "aten::scatter", "aten::scatter_", "aten::scatter_add", "aten::scatter_add_",
    "aten::scatter_reduce", "aten::scatter_reduce_",
    "aten::embedding_dense_backward", "aten::embedding_backward", "aten::_embedding_bag_backward",
    "aten::_embedding_bag_dense_backward", "aten::_embedding_bag_per_sample_weights_backward",
    "aten::bincount", "aten::histc", "aten::max_unpool2d", "aten::max_unpool3d",
})


@functools.cache
def op_kind(func: torch._ops.OpOverload) -> tuple[OpKind, str]:
    """The kind of ``func`` and, for ops not replayed, why."""
    name = func._schema.name
    ns = name.split("::", 1)[0]
    if ns in _SIDE_EFFECT_NAMESPACES:
        return OpKind.SIDE_EFFECT, _SIDE_EFFECT_NAMESPACES[ns]
    if name in _SIDE_EFFECT_OPS:
        return OpKind.SIDE_EFFECT, "side effects"
    if name in _UNINITIALIZED_OPS:
        return OpKind.UNINITIALIZED, "returns uninitialized memory"
    if name in _METADATA_OPS or ns in _ANNOTATION_NAMESPACES or getattr(func, "is_view", False):
        return OpKind.VIEW, "view or metadata"
    if torch.Tag.nondeterministic_seeded in getattr(func, "tags", ()):
        return OpKind.RANDOM, "draws from the RNG"
    return OpKind.COMPUTE, ""


@functools.cache
def is_collective(func: torch._ops.OpOverload) -> bool:
    """True for ops that talk to other processes (c10d, functional collectives)."""
    return _SIDE_EFFECT_NAMESPACES.get(func._schema.name.split("::", 1)[0]) == "collective"


def values_matter(func: torch._ops.OpOverload) -> bool:
    """False for ops whose result does not depend on the values of their tensor arguments
    (``empty_like``, ``new_zeros``): their inputs are captured as dtype, shape and device only."""
    name = func._schema.name
    return name not in _SHAPE_ONLY_OPS and name not in _UNINITIALIZED_OPS


@functools.cache
def written_args(func: torch._ops.OpOverload) -> tuple[tuple[bool, ...], frozenset[str]]:
    """Which positional arguments and keyword names the op writes to (schema ``Tensor(a!)``).

    In-place c10d collectives (``allreduce_``...) write their first argument
    (from another thread, once the work completes) without saying so in their schema.
    """
    pos, kw = [], set()
    name = func._schema.name
    c10d_inplace = name.startswith("c10d::") and name.endswith("_")
    for i, a in enumerate(func._schema.arguments):
        w = bool(a.alias_info is not None and a.alias_info.is_write) or (c10d_inplace and i == 0)
        if a.kwarg_only:
            if w:
                kw.add(a.name)
        else:
            pos.append(w)
    return tuple(pos), frozenset(kw)


ALERT_TEXT = "does not have a deterministic implementation"
"""What ``torch.use_deterministic_algorithms(True)``'s error says for an op without a deterministic kernel."""
CUBLAS_TEXT = "CUBLAS_WORKSPACE_CONFIG"
"""What its error says when cuBLAS needs a fixed workspace."""


def is_determinism_alert(message: str) -> bool:
    """True when an error message is strict deterministic mode refusing an op."""
    return ALERT_TEXT in message or CUBLAS_TEXT in message


def value_dependent(func: torch._ops.OpOverload) -> bool:
    """True for ops whose nondeterminism depends on index collisions (:data:`VALUE_DEPENDENT_OPS`)."""
    return func._schema.name in VALUE_DEPENDENT_OPS


def is_cudnn_op(func: torch._ops.OpOverload) -> bool:
    """True for ops that cuDNN can back on CUDA."""
    return func._schema.name in CUDNN_OPS
