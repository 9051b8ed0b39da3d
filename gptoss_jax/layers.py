"""Weight containers built from their specs, and the two matmul call sites (dense and grouped) shared by 16-bit and
int4 weights.

Modules never spell a parameter's shape: :func:`param` / :func:`weight` build each one from its
:class:`~gptoss_jax.params.ParamSpec` (the declaration in :mod:`gptoss_jax.params`), filled as the spec's ``init``
says and carrying the spec's logical axes as flax's ``out_sharding`` metadata.

A weight is either an ``nnx.Param`` holding an array ``[..., K, N]`` or an :class:`Int4Weight` module holding the
packed int4 layout of :mod:`gptoss_jax.kernels.int4_layout`. :func:`linear` and :func:`grouped_linear` accept both and
route int4 weights to the Pallas kernels (``gptoss_jax.kernels.dense_matmul`` / ``grouped_matmul``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.moe_parallel import dense_int4_forward
from gptoss_jax.params import INIT_STD, ONES, ParamSpec, init_value, int4_logical_shape, is_int4
from gptoss_jax.kernels import (_gpu_gemv, dense_matmul, dense_matmul_fused, grouped_matmul, int4_layout, ops,
                                routed_matmul)
from gptoss_jax.kernels.int4_layout import Int4Tensor


def precision_for(dtype):
    """float32 paths must stay float32 (no tf32/bf16 passes on GPU/TPU): the fp32 model is checked to 1e-4."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def param(spec: ParamSpec, rngs: nnx.Rngs, value=None) -> nnx.Param:
    """An ``nnx.Param`` for `spec`: `value` (checked against the spec's shape and dtype) or a fresh one filled as
    ``spec.init`` says. The logical axes ride along as ``out_sharding`` metadata; eager sharding is off because they
    are logical names that :mod:`gptoss_jax.sharding` maps to mesh axes, not mesh axes themselves."""
    if value is None:
        value = init_value(spec, None if spec.init == ONES else rngs.params())
    if tuple(value.shape) != tuple(spec.shape) or jnp.dtype(value.dtype) != jnp.dtype(spec.dtype):
        raise ValueError(f"value {value.shape} {value.dtype} does not match its spec {spec.shape} {spec.dtype}")
    return nnx.Param(value, out_sharding=spec.axes, eager_sharding=False)


class Int4Weight(nnx.Module):
    """A 4-bit weight [..., K, N]: packed codes, group scales, (asymmetric only) zero points and (act-order only) the
    input-row permutation, as declared by its spec dict (``params._weight_spec``); group size, symmetry and scale
    dtype are read off the spec's shapes and dtypes. A random one is one N(0, 0.02²) draw, quantized round-to-nearest
    (:func:`gptoss_jax.kernels.int4_layout.quantize`); its perm is the identity."""

    def __init__(self, spec: dict, rngs: nnx.Rngs):
        *lead, k, n = shape = int4_logical_shape(spec)
        self.group_size = k // spec["scales"].shape[-2]
        value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
        t = int4_layout.quantize(value, group_size=self.group_size, symmetric="zeros" not in spec,
                                 scale_dtype=jnp.dtype(spec["scales"].dtype))
        self.packed = param(spec["packed"], rngs, t.packed)
        self.scales = param(spec["scales"], rngs, t.scales)
        if "zeros" in spec:
            self.zeros = param(spec["zeros"], rngs, t.zeros)
        if "perm" in spec:  # act-order source: input rows were put in group order at conversion (identity here)
            self.perm = param(spec["perm"], rngs, jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (*lead, k)))

    def tensor(self) -> Int4Tensor:
        zeros = self.zeros[...] if hasattr(self, "zeros") else None
        return Int4Tensor(self.packed[...], self.scales[...], zeros, self.group_size)


def weight(spec, rngs: nnx.Rngs):
    """A matmul weight [..., K, N] from its spec: an ``nnx.Param`` for a ParamSpec, an :class:`Int4Weight` for an
    int4 spec dict (mixed precision: which one is the spec's business, see ``params.QuantSpec.modules``)."""
    return Int4Weight(spec, rngs) if is_int4(spec) else param(spec, rngs)


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
    """x @ weight (+ bias); spec: {"weight": ParamSpec | int4 dict[, "bias": ParamSpec]}."""

    def __init__(self, spec: dict, *, rngs: nnx.Rngs):
        self.weight = weight(spec["weight"], rngs)
        if "bias" in spec:
            self.bias = param(spec["bias"], rngs)

    def __call__(self, x, *, out_dtype=None, parallel=None, split_out: bool = False, layer=None):
        bias = self.bias[...] if hasattr(self, "bias") else None
        return linear(x, self.weight, bias, out_dtype=out_dtype, parallel=parallel, split_out=split_out, layer=layer)


class Embed(nnx.Module):
    """Token ids → rows of the embedding table; spec: {"embedding": ParamSpec [vocab, embed]}."""

    def __init__(self, spec: dict, *, rngs: nnx.Rngs):
        self.embedding = param(spec["embedding"], rngs)

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0)


def routed_eligible(w, rows: int) -> bool:
    """Whether the MoE may run ``rows`` (token, expert) rows through :func:`routed_linear`'s row-wise GPU kernel in
    auto mode: int4 weights in the kernel's group sizes, no act-order, at most ``_gpu_gemv.auto_limits()[0]`` rows
    (decode), and no ``GPTOSS_KERNELS`` override naming another implementation. Static (shapes only)."""
    if not isinstance(w, Int4Weight) or input_perm(w) is not None or ops._env_override() not in (None, "gpu"):
        return False
    t = w.tensor()
    return rows <= _gpu_gemv.auto_limits()[0] and _gpu_gemv.why_not(t.shape[-2], [t.group_size]) is None


def routed_linear(x, w, expert_ids, rows=None, bias=None, *, swiglu: tuple[float, float] | None = None,
                  layer=None, interpret: bool = False, combine_weights=None):
    """Row r = x[rows[r]] @ W[expert_ids[r]] (+ bias) with the row-wise int4 GPU kernel (compiled: call it when
    lowering for cuda, see gptoss_jax.moe_parallel.local_experts_forward; ``interpret`` for tests). Ids outside
    [0, E) give zero rows. combine_weights [T, k]: the tokens' weighted sums [T, N] float32 instead of the rows
    (gptoss_jax.kernels.routed_matmul)."""
    epilogue = {} if swiglu is None else dict(epilogue="swiglu", swiglu_alpha=swiglu[0], swiglu_limit=swiglu[1])
    return routed_matmul(x, operand(w), expert_ids, rows=rows, bias=bias, out_dtype=x.dtype, layer=layer,
                         implementation="gpu", interpret=interpret, combine_weights=combine_weights, **epilogue)
