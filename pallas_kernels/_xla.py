"""The XLA implementation: the base op every kernel is checked against and falls back to (pure jnp).

For an Int4Tensor, ``grouped_xla`` gathers only the (at most ``min(E, M)``) distinct experts that received rows,
dequantizes those and runs ``jax.lax.ragged_dot`` over the compacted groups: it never builds a dequantized copy of
all experts (unless every expert can be present, i.e. ``M >= E``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _common
from .int4_layout import Int4Tensor, dequantize
from .swiglu import clamped_swiglu_parts, split_interleaved


def precision(dtype):
    """HIGHEST for float32 (no TF32 / bf16 passes on an fp32 path), default otherwise."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def compute_dtype(x, w):
    """int4 weights are dequantized to x's dtype; float weights promote with x."""
    if isinstance(w, Int4Tensor):
        return x.dtype
    return jnp.promote_types(x.dtype, w.dtype)


def _gather_experts(w, ids):
    if isinstance(w, Int4Tensor):
        return Int4Tensor(jnp.take(w.packed, ids, axis=0), jnp.take(w.scales, ids, axis=0),
                          None if w.zeros is None else jnp.take(w.zeros, ids, axis=0), w.group_size)
    return jnp.take(w, ids, axis=0)


def grouped_xla(x, w, group_sizes, bias, epilogue, alpha, limit, out_dtype):
    """x [M, K], w [E, K, N] (float or Int4Tensor), group_sizes int32 [E] -> [M, N] or [M, N/2] (swiglu)."""
    m, _ = x.shape
    e = group_sizes.shape[0]
    cdt = compute_dtype(x, w)
    group_sizes = group_sizes.astype(jnp.int32)
    g = min(e, m)
    if g < e:
        # Only experts with rows: compact them (order preserved, so rows stay sorted by compacted group).
        present = group_sizes > 0
        ids = jnp.nonzero(present, size=g, fill_value=0)[0].astype(jnp.int32)
        count = jnp.sum(present.astype(jnp.int32))
        sizes_c = jnp.where(jnp.arange(g) < count, jnp.take(group_sizes, ids), 0).astype(jnp.int32)
        wc = _gather_experts(w, ids)
    else:
        sizes_c, wc = group_sizes, w
    wd = dequantize(wc, cdt) if isinstance(wc, Int4Tensor) else wc.astype(cdt)
    y = jax.lax.ragged_dot(x.astype(cdt), wd, sizes_c, precision=precision(cdt),
                           preferred_element_type=jnp.float32)
    rg = _common.row_group_ids(group_sizes, m)
    valid = rg < e
    if bias is not None:
        y = y + jnp.take(bias, jnp.minimum(rg, e - 1), axis=0).astype(jnp.float32)
    if epilogue == "swiglu":
        y = clamped_swiglu_parts(*split_interleaved(y), alpha, limit)
    y = jnp.where(valid[:, None], y, 0.0)
    return y.astype(out_dtype)


def dense_xla(x, w, bias, out_dtype):
    """x [M, K] @ w [K, N] (float or Int4Tensor) + bias [N] -> [M, N] in out_dtype (float32 accumulation)."""
    cdt = compute_dtype(x, w)
    wd = dequantize(w, cdt) if isinstance(w, Int4Tensor) else w.astype(cdt)
    y = jnp.dot(x.astype(cdt), wd, precision=precision(cdt), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)
