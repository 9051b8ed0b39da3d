"""Weight containers and the two matmul call sites (dense and grouped) shared by 16-bit and int4 weights.

A weight is either an ``nnx.Param`` holding an array ``[..., K, N]`` or an :class:`Int4Weight` module holding the
packed int4 layout of :mod:`gptoss_jax.kernels.int4_layout`. :func:`linear` and :func:`grouped_linear` accept both and
route int4 weights to the Pallas kernels (``gptoss_jax.kernels.dense_matmul`` / ``grouped_matmul``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.moe_parallel import dense_int4_forward
from gptoss_jax.params import QuantSpec
from gptoss_jax.kernels import dense_matmul, dense_matmul_fused, grouped_matmul, int4_layout
from gptoss_jax.kernels.int4_layout import Int4Tensor


def precision_for(dtype):
    """float32 paths must stay float32 (no tf32/bf16 passes on GPU/TPU): the fp32 model is checked to 1e-4."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class Int4Weight(nnx.Module):
    """A 4-bit weight [..., K, N]: packed codes, group scales and (asymmetric only) zero points."""

    def __init__(self, value, quant: QuantSpec):
        t = int4_layout.quantize(value, group_size=quant.group_for(value.shape[-2]), symmetric=quant.symmetric,
                                 scale_dtype=jnp.dtype(quant.scale_dtype))
        self.group_size = t.group_size
        self.packed = nnx.Param(t.packed)
        self.scales = nnx.Param(t.scales)
        if t.zeros is not None:
            self.zeros = nnx.Param(t.zeros)
        if quant.act_order:  # act-order source: input rows were put in group order at conversion (identity here)
            k = value.shape[-2]
            self.perm = nnx.Param(jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (*value.shape[:-2], k)))

    def tensor(self) -> Int4Tensor:
        zeros = self.zeros[...] if hasattr(self, "zeros") else None
        return Int4Tensor(self.packed[...], self.scales[...], zeros, self.group_size)


def weight(shape, *, dtype, quant: QuantSpec | None, rngs: nnx.Rngs, std: float = 0.02):
    """A randomly initialised weight of logical `shape` [..., K, N], 4-bit when `quant` is given."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    if quant is None:
        return nnx.Param(value.astype(dtype))
    return Int4Weight(value, quant)


def operand(w):
    """The array or Int4Tensor behind a weight container."""
    return w.tensor() if isinstance(w, Int4Weight) else w[...]


def input_perm(w):
    """int32 [..., K] input-row order of an act-order int4 weight (x @ W = x[..., perm] @ W_stored), else None."""
    return w.perm[...] if isinstance(w, Int4Weight) and hasattr(w, "perm") else None


def _at_layer(a, layer):
    """Layer `layer` of an array stacked over layers (a dynamic slice), or `a` itself when layer is None."""
    return a if a is None or layer is None else jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)


def linear(x, w, bias=None, *, out_dtype=None, parallel=None, split_out: bool = False, layer=None):
    """x [..., K] @ W [K, N] (+ bias), float32 accumulation.

    parallel: the mesh plan (gptoss_jax.moe_parallel.MoEParallel) when the model runs on a mesh: int4 weights then
    go through the kernel per device under shard_map (columns split over the head axes when `split_out`).
    layer: None, or the index into W / bias stacked over layers ([L, K, N], [L, N]; the scanned model passes them
    whole): int4 weights are read in place by the kernels (no per-layer copy), 16-bit ones sliced."""
    out_dtype = out_dtype or x.dtype
    perm = _at_layer(input_perm(w), layer)
    if perm is not None:  # act-order (GPTQ desc_act): the stored rows are in group order
        x = jnp.take(x, perm, axis=-1)
    w = operand(w)
    if not isinstance(w, Int4Tensor):
        w, bias, layer = _at_layer(w, layer), _at_layer(bias, layer), None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if isinstance(w, Int4Tensor) and parallel is not None:
        y = dense_int4_forward(x2, w, bias, parallel, split_out=split_out, layer=layer)
    elif isinstance(w, Int4Tensor):
        y = dense_matmul(x2, w, bias, out_dtype=jnp.float32, layer=layer)
    else:
        y = jnp.dot(x2, w.astype(x.dtype), preferred_element_type=jnp.float32, precision=precision_for(x.dtype))
        if bias is not None:
            y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype).reshape(*lead, y.shape[-1])


def linears(x, modules, *, layer=None):
    """``[m(x, layer=layer) for m in modules]`` for Linear modules sharing the input (q, k, v projections), as one
    kernel launch when every weight is int4 without act-order (``gptoss_jax.kernels.dense_matmul_fused``; on cuda
    at decode sizes). Weights stay separate parameters. Single device only (no mesh plan)."""
    ws = [m.weight for m in modules]
    if not all(isinstance(w, Int4Weight) and input_perm(w) is None for w in ws):
        return [m(x, layer=layer) for m in modules]
    biases = [m.bias[...] if hasattr(m, "bias") else None for m in modules]
    x2 = x.reshape(-1, x.shape[-1])
    ys = dense_matmul_fused(x2, [operand(w) for w in ws], biases, out_dtype=jnp.float32, layer=layer)
    return [y.astype(x.dtype).reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


def grouped_linear(x, w, group_sizes, bias=None, *, swiglu: tuple[float, float] | None = None, layer=None):
    """Rows of x [M, K] grouped by expert (group_sizes [E]) @ their expert's W [E, K, N] (+ bias [E, N]).

    swiglu=(alpha, limit) applies gpt-oss's clamped SwiGLU in the matmul's epilogue (output [M, N/2]), so the
    [M, N] gate_up activations never round-trip through memory. layer: None, or the index into W / bias stacked
    over layers ([L, E, K, N], [L, E, N]), read in place by every implementation.
    """
    epilogue = {} if swiglu is None else dict(epilogue="swiglu", swiglu_alpha=swiglu[0], swiglu_limit=swiglu[1])
    perm = _at_layer(input_perm(w), layer)
    if perm is not None:  # act-order: each expert reads its rows' features in its own stored order
        expert_of_row = jnp.repeat(jnp.arange(perm.shape[0]), group_sizes, total_repeat_length=x.shape[0])
        x = jnp.take_along_axis(x, perm[expert_of_row], axis=1)
    return grouped_matmul(x, operand(w), group_sizes, bias=bias, out_dtype=x.dtype, layer=layer, **epilogue)


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, dtype, quant: QuantSpec | None, rngs: nnx.Rngs,
                 bias: bool = True):
        self.weight = weight((in_features, out_features), dtype=dtype, quant=quant, rngs=rngs)
        if bias:
            self.bias = nnx.Param(0.02 * jax.random.normal(rngs.params(), (out_features,), dtype))

    def __call__(self, x, *, out_dtype=None, parallel=None, split_out: bool = False, layer=None):
        bias = self.bias[...] if hasattr(self, "bias") else None
        return linear(x, self.weight, bias, out_dtype=out_dtype, parallel=parallel, split_out=split_out, layer=layer)


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (vocab_size, dim), dtype))

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0)
