"""gpt-oss in Flax NNX, top to bottom.

    tokens ─ embed ─┬─ [ RMSNorm ─ attention (GQA, YaRN RoPE, sinks, sliding window on some layers) ─ + ]
                    │  [ RMSNorm ─ MoE (biased router, top-k, clamped SwiGLU experts)             ─ + ]  × layers
                    └─ RMSNorm ─ lm_head ─ logits

The numerical reference is transformers' ``GptOssForCausalLM``. Weights are either 16/32-bit arrays or 4-bit
:class:`~pallas_kernels.int4_layout.Int4Tensor` s (attention projections and experts); the matmuls that see them go
through :mod:`gptoss_jax.layers`, so this file stays the same for both.

A forward call processes ``T`` new tokens per sequence at positions ``start[b] + t``; the first ``lengths[b]`` of
them are real and the rest padding. With a KV cache (see :mod:`gptoss_jax.kv_cache`) the new tokens also attend to
the cached ones, and the cache comes back updated: prefill and decode are the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax import layers
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kv_cache import LayerCache, update_layer_cache
from gptoss_jax.params import QuantSpec, quant_for
from gptoss_jax.rope import apply_rope, rope_cos_sin, yarn_inv_freq


class RMSNorm(nnx.Module):
    """x · rsqrt(mean(x²) + eps) · scale, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * x32).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with per-head sink logits; sliding-window or full causal."""

    def __init__(self, config: GptOssConfig, layer_idx: int, *, dtype, quant: QuantSpec | None, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.window = c.sliding_window if c.is_sliding(layer_idx) else None
        qf = lambda module: quant_for(quant, module)  # noqa: E731 — mixed precision: int4 or 16-bit per module
        self.q_proj = layers.Linear(c.hidden_size, c.q_dim, dtype=dtype, quant=qf('q_proj'), rngs=rngs)
        self.k_proj = layers.Linear(c.hidden_size, c.kv_dim, dtype=dtype, quant=qf('k_proj'), rngs=rngs)
        self.v_proj = layers.Linear(c.hidden_size, c.kv_dim, dtype=dtype, quant=qf('v_proj'), rngs=rngs)
        self.o_proj = layers.Linear(c.q_dim, c.hidden_size, dtype=dtype, quant=qf('o_proj'), rngs=rngs)
        # One learned logit per query head, appended as an extra softmax column that carries no value.
        self.sinks = nnx.Param(0.02 * jax.random.normal(rngs.params(), (c.num_attention_heads,), dtype))

    def __call__(self, x, cos, sin, positions, valid, cache: LayerCache | None, attend_to_cache: bool):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        key_pos = jnp.where(valid, positions, -1)  # -1 marks a key nobody may see (padding)
        new_cache = None if cache is None else update_layer_cache(cache, k, v, positions, valid)
        if cache is not None and attend_to_cache and t == 1:
            # Decode: the new key is already in the cache. The slot it overwrote held position p - S, which the query
            # at p never sees (S = window on sliding layers), so attending over the updated cache alone is exact.
            keys, values, key_pos = new_cache.k.astype(k.dtype), new_cache.v.astype(v.dtype), new_cache.pos
        elif cache is not None and attend_to_cache:
            keys = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)
            values = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
            key_pos = jnp.concatenate([cache.pos, key_pos], axis=1)
        else:
            keys, values = k, v
        out = attention(q, keys, values, positions, key_pos, self.sinks[...], self.window)
        return self.o_proj(out.reshape(b, t, -1)), new_cache


def attention(q, k, v, q_pos, k_pos, sinks, window: int | None):
    """softmax([q·kᵀ/√d + mask, sink]) minus the sink column, times v.

    q [B,T,H,D]; k, v [B,S,KV,D]; q_pos [B,T]; k_pos [B,S] (-1: invisible). Query head h uses KV head h // (H/KV).
    A query at position p sees keys at positions p-window+1 … p (sliding) or 0 … p (full).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32,
                        precision=layers.precision_for(q.dtype))
    logits = logits * (d ** -0.5)
    visible = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B,T,S]
    if window is not None:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - window
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    sink = sinks.astype(jnp.float32).reshape(1, kv, h // kv, 1, 1)
    top = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)  # finite: the sink is always there
    p = jnp.exp(logits - top)
    p = p / (jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink - top))
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                     precision=layers.precision_for(v.dtype))
    return out.reshape(b, t, h, d).astype(q.dtype)


class Router(nnx.Module):
    """Linear scores with bias over all experts; top-k; softmax over the k chosen logits only."""

    def __init__(self, config: GptOssConfig, *, dtype, rngs: nnx.Rngs):
        self.top_k = config.num_experts_per_tok
        e, h = config.num_local_experts, config.hidden_size
        self.weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), (h, e), dtype))
        self.bias = nnx.Param(0.02 * jax.random.normal(rngs.params(), (e,), dtype))

    def __call__(self, x):
        logits = jnp.dot(x.astype(jnp.float32), self.weight[...].astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST) + self.bias[...].astype(jnp.float32)
        top_logits, experts = jax.lax.top_k(logits, self.top_k)
        return experts, jax.nn.softmax(top_logits, axis=-1)


class Experts(nnx.Module):
    """E independent MLPs: x → gate_up (+bias) → clamped SwiGLU → down (+bias), on rows grouped by expert.

    gate_up is fused [E, H, 2I] with gate in the even and up in the odd columns (as the checkpoints store it).
    """

    def __init__(self, config: GptOssConfig, *, dtype, quant: QuantSpec | None, rngs: nnx.Rngs):
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.alpha, self.limit = e, config.swiglu_alpha, config.swiglu_limit
        self.gate_up = layers.weight((e, h, 2 * i), dtype=dtype, quant=quant_for(quant, "gate_up"), rngs=rngs)
        self.gate_up_bias = nnx.Param(0.02 * jax.random.normal(rngs.params(), (e, 2 * i), dtype))
        self.down = layers.weight((e, i, h), dtype=dtype, quant=quant_for(quant, "down"), rngs=rngs)
        self.down_bias = nnx.Param(0.02 * jax.random.normal(rngs.params(), (e, h), dtype))

    def __call__(self, x_sorted, group_sizes):
        """x_sorted [M, H], rows grouped by expert with group_sizes [E] → [M, H].

        The clamped SwiGLU runs fused into the gate_up matmul's epilogue (pallas_kernels.clamped_swiglu):
        gate = even columns, up = odd columns; gate = min(gate, limit); up = clip(up, -limit, limit);
        h = (up + 1) · gate · sigmoid(alpha · gate).
        """
        h = layers.grouped_linear(x_sorted, self.gate_up, group_sizes, self.gate_up_bias[...],
                                  swiglu=(self.alpha, self.limit))
        return layers.grouped_linear(h, self.down, group_sizes, self.down_bias[...])


class MoE(nnx.Module):
    """Each token goes to its top-k experts; expert outputs are summed with the router weights.

    Tokens are grouped by expert (a stable sort of the N·k assignments) so the experts run as two grouped matmuls
    that touch only the experts that received tokens — the call sites where the int4 kernels plug in.
    """

    def __init__(self, config: GptOssConfig, *, dtype, quant: QuantSpec | None, rngs: nnx.Rngs):
        self.router = Router(config, dtype=dtype, rngs=rngs)
        self.experts = Experts(config, dtype=dtype, quant=quant, rngs=rngs)
        # Set by gptoss_jax.sharding.shard_model: experts split over a mesh (see gptoss_jax.moe_parallel).
        self.parallel = None

    def __call__(self, x):
        if self.parallel is not None:
            from gptoss_jax.moe_parallel import moe_forward
            return moe_forward(self, x, self.parallel)
        b, t, h = x.shape
        x = x.reshape(b * t, h)
        experts, weights = self.router(x)  # [N, k]
        k = experts.shape[-1]
        flat_experts = experts.reshape(-1)
        order = jnp.argsort(flat_experts, stable=True)  # assignment rows sorted by expert
        group_sizes = jnp.bincount(flat_experts, length=self.experts.num_experts).astype(jnp.int32)
        y_sorted = self.experts(x[order // k], group_sizes)  # [N·k, H]
        y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(b * t, k, h)
        out = jnp.einsum("nkh,nk->nh", y.astype(jnp.float32), weights)
        return out.astype(x.dtype).reshape(b, t, h)


class DecoderLayer(nnx.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int, *, dtype, quant, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.attn = Attention(config, layer_idx, dtype=dtype, quant=quant, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = MoE(config, dtype=dtype, quant=quant, rngs=rngs)

    def __call__(self, x, cos, sin, positions, valid, cache, attend_to_cache):
        attn_out, cache = self.attn(self.input_norm(x), cos, sin, positions, valid, cache, attend_to_cache)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x))
        return x, cache


class GptOss(nnx.Module):
    """gpt-oss for causal LM. `dtype` is the compute and parameter dtype (bf16 default, fp32 selectable)."""

    def __init__(self, config: GptOssConfig, *, dtype=jnp.bfloat16, quant: QuantSpec | None = None,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        c = config
        self.config, self.dtype, self.quant = c, jnp.dtype(dtype), quant
        self.embed = layers.Embed(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(c, i, dtype=dtype, quant=quant, rngs=rngs)
                                for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.lm_head = layers.Linear(c.hidden_size, c.vocab_size, dtype=dtype, quant=None, bias=False, rngs=rngs)
        inv_freq, self.rope_scale = yarn_inv_freq(c)
        self.inv_freq = nnx.Variable(jnp.asarray(inv_freq, jnp.float32))  # a constant, not a parameter

    def __call__(self, tokens, *, start=None, lengths=None, cache=None, attend_to_cache: bool = True,
                 logits_for: str = "all"):
        """tokens [B,T] int → (logits [B,T,V] float32, updated cache or None).

        start [B]: position of tokens[:, 0] (default 0). lengths [B]: how many of the T tokens are real (default T).
        attend_to_cache=False skips reading the (known empty) cache during a first prefill.
        logits_for="last" returns only each row's last real token's logits [B,1,V].
        """
        b, t = tokens.shape
        start = jnp.zeros((b,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        offsets = jnp.arange(t, dtype=jnp.int32)
        positions = start[:, None] + offsets[None, :]
        valid = offsets[None, :] < lengths[:, None]
        cos, sin = rope_cos_sin(positions, self.inv_freq[...], self.rope_scale)

        x = self.embed(tokens)
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, cos, sin, positions, valid, None if cache is None else cache[i],
                                   attend_to_cache)
            if cache is not None:
                new_cache.append(layer_cache)
        if logits_for == "last":
            last = jnp.maximum(lengths - 1, 0)
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)
        x = self.norm(x)
        logits = self.lm_head(x, out_dtype=jnp.float32)
        return logits, (tuple(new_cache) if cache is not None else None)
