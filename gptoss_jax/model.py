"""gpt-oss in Flax NNX, top to bottom.

    tokens ─ embed ─┬─ [ RMSNorm ─ attention (GQA, YaRN RoPE, sinks, sliding window on some layers) ─ + ]
                    │  [ RMSNorm ─ MoE (biased router, top-k, clamped SwiGLU experts)             ─ + ]  × layers
                    └─ RMSNorm ─ lm_head ─ logits

The numerical reference is transformers' ``GptOssForCausalLM``. Weights are either 16/32-bit arrays or 4-bit
:class:`~gptoss_jax.kernels.int4_layout.Int4Tensor` s (attention projections and experts); the matmuls that see them go
through :mod:`gptoss_jax.layers`, so this file stays the same for both. No shape is spelled here: every parameter's
shape, dtype, logical axes and initializer is declared once, in :mod:`gptoss_jax.params` (``model_specs``), and each
module builds its ``nnx.Param`` s from its subtree of that declaration (``layers.param`` / ``layers.weight``).

A forward call processes ``T`` new tokens per sequence at positions ``start[b] + t``; the first ``lengths[b]`` of
them are real and the rest padding. With a KV cache (see :mod:`gptoss_jax.kv_cache`) the new tokens also attend to
the cached ones, and the cache comes back updated: prefill and decode are the same function.

The decoder layers are one :class:`DecoderLayer` whose parameters are stacked along a leading layer axis, run under
one ``jax.lax.scan`` over blocks of ``p`` layers (``p = params.layer_period(config)``: 2 for gpt-oss, a sliding and
a full-attention layer), so compile time does not grow with depth. Each block position has its own KV cache stack
(ring buffers of ``window`` slots for sliding layers, see :mod:`gptoss_jax.kv_cache`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax import layers, sharding
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kv_cache import LayerCache, update_stacked_cache
from gptoss_jax.moe_parallel import MoEParallel, attention_forward, local_experts_forward, moe_forward
from gptoss_jax.params import QuantSpec, layer_period, model_specs, stack_layers
from gptoss_jax.rope import apply_rope, rope_cos_sin, yarn_inv_freq
from gptoss_jax.kernels.attention import attention as pallas_attention
from gptoss_jax.kernels import decode_attention_update, rms_norm, router_top_k


class RMSNorm(nnx.Module):
    """x · rsqrt(mean(x²) + eps) · scale, computed in float32 and cast back."""

    def __init__(self, spec: dict, eps: float, *, rngs: nnx.Rngs):
        self.scale = layers.param(spec["scale"], rngs)
        self.eps = eps

    def __call__(self, x, layer=None):
        """x [..., H] → same shape and dtype. layer: None, or this layer's index when the scale arrives stacked over
        all layers (read in place). On cuda at decode sizes one Pallas launch (gptoss_jax.kernels rms_norm)."""
        return rms_norm(x, self.scale[...], self.eps, layer=layer)


class Attention(nnx.Module):
    """Grouped-query attention with per-head sink logits; sliding-window or full causal."""

    def __init__(self, config: GptOssConfig, spec: dict, *, rngs: nnx.Rngs, parallel=None):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.parallel = parallel  # the mesh plan: int4 projections run per device under shard_map (static)
        self.q_proj = layers.Linear(spec["q_proj"], rngs=rngs)
        self.k_proj = layers.Linear(spec["k_proj"], rngs=rngs)
        self.v_proj = layers.Linear(spec["v_proj"], rngs=rngs)
        self.o_proj = layers.Linear(spec["o_proj"], rngs=rngs)
        # One learned logit per query head, appended as an extra softmax column that carries no value.
        self.sinks = layers.param(spec["sinks"], rngs)

    def __call__(self, x, cos, sin, positions, valid, cache: LayerCache | None, attend_to_cache: bool,
                 window: int | None, layer=None, block=None):
        """window: the sliding window of this layer (None: full causal attention). layer: None, or this layer's
        index when the projection weights arrive stacked over all layers (the scan, see GptOss). cache: this block
        position's KV cache stacked over blocks (k, v [L/p, B, S, KV, D]) with `block` the index of this layer in
        it; the updated stacked cache comes back (a decode step writes one slot per row in place)."""
        b, t, _ = x.shape
        par = self.parallel
        if par is None:  # q, k, v in one launch where the kernels allow it (int4 on cuda at decode sizes)
            q, k, v = layers.linears(x, (self.q_proj, self.k_proj, self.v_proj), layer=layer)
        else:
            q, k, v = (p(x, parallel=par, split_out=True, layer=layer) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k, v = (a.reshape(b, t, self.num_kv_heads, self.head_dim) for a in (k, v))
        sinks = self.sinks[...]  # [L, H] read in place when the layers are stacked (the scan), else [H]
        sink_layer = layer if sinks.ndim == 2 else None
        if t == 1 and cache is not None and attend_to_cache and par is None:
            # Decode: RoPE, the cache write and attention as one op (on cuda one Pallas launch instead of ~10
            # small kernels; elsewhere the same steps as below, gptoss_jax.kernels.decode_attention_update).
            out, ck, cv, cp = decode_attention_update(
                q[:, 0], k[:, 0], v[:, 0], cos[:, 0], sin[:, 0], positions[:, 0], valid[:, 0], cache.k, cache.v,
                cache.pos, sinks, window, block=block, sink_layer=sink_layer)
            return self.o_proj(out.reshape(b, t, -1), layer=layer), LayerCache(ck, cv, cp)
        sinks = sinks if sink_layer is None else sinks[sink_layer]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        key_pos = jnp.where(valid, positions, -1)  # -1 marks a key nobody may see (padding)
        new_cache = None if cache is None else update_stacked_cache(cache, block, k, v, positions, valid)
        at = None  # attend to the (stacked) cache at index `at` instead of to explicit keys
        if cache is not None and attend_to_cache and (t == 1 or window is None):
            # The new keys are already in the cache. Decode: the slot the new key overwrote held position p - S,
            # which the query at p never sees (S = window on sliding layers). Full-attention layers hold every
            # position in its own slot (slot = position), so a prefill chunk may attend over the updated cache too.
            # The cache is read in place (the kernels take the block index), never copied per layer.
            keys, values, key_pos, at = new_cache.k, new_cache.v, new_cache.pos, block
        elif cache is not None and attend_to_cache:
            # A prefill chunk on a sliding layer: its ring buffer may overwrite keys the chunk's first queries need,
            # so attend over the old cache (small: window slots) and the new keys.
            old = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, block, 0, keepdims=False), cache)
            keys = jnp.concatenate([old.k.astype(k.dtype), k], axis=1)
            values = jnp.concatenate([old.v.astype(v.dtype), v], axis=1)
            key_pos = jnp.concatenate([old.pos, key_pos], axis=1)
        else:
            keys, values = k, v
        if at is None and keys.dtype != q.dtype:  # a cache in another dtype (the kernels convert tiles as they read)
            keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        if par is None:
            out = attention(q, keys, values, positions, key_pos, sinks, window, layer=at)
        else:  # on a mesh: per device under shard_map (a Pallas kernel is not auto-partitioned)
            out = attention_forward(q, keys, values, positions, key_pos, sinks, window, par, layer=at)
        return self.o_proj(out.reshape(b, t, -1), parallel=par, layer=layer), new_cache


def attention(q, k, v, q_pos, k_pos, sinks, window: int | None, layer=None):
    """softmax([q·kᵀ/√d + mask, sink]) minus the sink column, times v.

    q [B,T,H,D]; k, v [B,S,KV,D]; q_pos [B,T]; k_pos [B,S] (-1: invisible). Query head h uses KV head h // (H/KV).
    A query at position p sees keys at positions p-window+1 … p (sliding) or 0 … p (full).
    layer: None, or the index into k, v, k_pos stacked over cache blocks ([L/p, B, S, KV, D], [L/p, B, S]).
    Implemented in :func:`gptoss_jax.kernels.attention.attention` (jnp reference / flash kernels, chosen by backend).
    """
    return pallas_attention(q, k, v, q_pos, k_pos, sinks, window, layer=layer)


class Router(nnx.Module):
    """Linear scores with bias over all experts; top-k; softmax over the k chosen logits only."""

    def __init__(self, config: GptOssConfig, spec: dict, *, rngs: nnx.Rngs):
        self.top_k = config.num_experts_per_tok
        self.weight = layers.param(spec["weight"], rngs)  # [H, E], always 16/32-bit
        self.bias = layers.param(spec["bias"], rngs)

    def __call__(self, x, layer=None):
        """x [N, H] → (expert ids int32 [N, k], weights float32 [N, k]). layer: None, or this layer's index when
        the router's arrays arrive stacked over all layers (read in place). The op picks XLA (a dot with float32
        accumulation, lax.top_k, softmax) or, on cuda at decode sizes, two Pallas kernels (gptoss_jax.kernels
        router_top_k)."""
        return router_top_k(x, self.weight[...], self.bias[...], self.top_k, layer=layer)


class Experts(nnx.Module):
    """E independent MLPs: x → gate_up (+bias) → clamped SwiGLU → down (+bias), on rows grouped by expert.

    gate_up is fused [E, H, 2I] with gate in the even and up in the odd columns (as the checkpoints store it).
    """

    def __init__(self, config: GptOssConfig, spec: dict, *, rngs: nnx.Rngs):
        self.num_experts, self.alpha, self.limit = config.num_local_experts, config.swiglu_alpha, config.swiglu_limit
        self.gate_up = layers.weight(spec["gate_up"], rngs)  # [E, H, 2I], int4 or 16-bit
        self.gate_up_bias = layers.param(spec["gate_up_bias"], rngs)
        self.down = layers.weight(spec["down"], rngs)  # [E, I, H]
        self.down_bias = layers.param(spec["down_bias"], rngs)

    def __call__(self, x_sorted, group_sizes, layer=None):
        """x_sorted [M, H], rows grouped by expert with group_sizes [E] → [M, H].

        The clamped SwiGLU runs fused into the gate_up matmul's epilogue (gptoss_jax.kernels.clamped_swiglu):
        gate = even columns, up = odd columns; gate = min(gate, limit); up = clip(up, -limit, limit);
        h = (up + 1) · gate · sigmoid(alpha · gate).
        """
        h = layers.grouped_linear(x_sorted, self.gate_up, group_sizes, self.gate_up_bias[...],
                                  swiglu=(self.alpha, self.limit), layer=layer)
        return layers.grouped_linear(h, self.down, group_sizes, self.down_bias[...], layer=layer)

    def routed_eligible(self, rows: int) -> bool:
        """Whether :meth:`routed` can run ``rows`` rows in auto mode on cuda (static; layers.routed_eligible)."""
        return layers.routed_eligible(self.gate_up, rows) and layers.routed_eligible(self.down, rows)

    def routed(self, x, expert_ids, rows, layer=None, interpret=False, combine_weights=None):
        """x [N, H] tokens, expert_ids int32 [R] (an id outside [0, E): zero row), rows int32 [R] or an int k (row r
        is token r // k) → [R, H]: the same MLPs without grouping the rows, straight from the router's ids (the
        row-wise GPU kernel, decode sizes). combine_weights [N, k] (R = N·k): the tokens' weighted sums over
        their k rows, [N, H] float32, the combine done by the down kernel."""
        h = layers.routed_linear(x, self.gate_up, expert_ids, rows, self.gate_up_bias[...],
                                 swiglu=(self.alpha, self.limit), layer=layer, interpret=interpret)
        return layers.routed_linear(h, self.down, expert_ids, None, self.down_bias[...], layer=layer,
                                    interpret=interpret, combine_weights=combine_weights)


class MoE(nnx.Module):
    """Each token goes to its top-k experts; expert outputs are summed with the router weights.

    Tokens are grouped by expert (a stable sort of the N·k assignments) so the experts run as two grouped matmuls
    that touch only the experts that received tokens — the call sites where the int4 kernels plug in.
    """

    def __init__(self, config: GptOssConfig, spec: dict, *, rngs: nnx.Rngs, parallel=None):
        self.router = Router(config, spec["router"], rngs=rngs)
        self.experts = Experts(config, spec["experts"], rngs=rngs)
        # Experts split over a mesh (a gptoss_jax.moe_parallel.MoEParallel), or None for one device. Static.
        self.parallel = parallel

    def __call__(self, x, layer=None):
        """layer: None, or this layer's index when the expert arrays arrive stacked over all layers."""
        b, t, h = x.shape
        experts, weights = self.router(x.reshape(b * t, h), layer)  # [N, k] each
        if self.parallel is not None:  # experts split over a mesh: tokens go to them (gptoss_jax.moe_parallel)
            k = experts.shape[-1]
            return moe_forward(self.experts, x, experts.reshape(b, t, k), weights.reshape(b, t, k), self.parallel,
                               layer=layer)
        # One device: the one-shard case of the sharded code (all experts local).
        out = local_experts_forward(self.experts, x.reshape(b * t, h), experts, weights, layer=layer)
        return out.astype(x.dtype).reshape(b, t, h)


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MoE blocks, each added to the residual stream. Built from the layers' spec subtree:
    in the model every parameter is stacked over the layers (leading axis L, see GptOss)."""

    def __init__(self, config: GptOssConfig, spec: dict, *, rngs: nnx.Rngs, moe_parallel=None):
        self.input_norm = RMSNorm(spec["input_norm"], config.rms_norm_eps, rngs=rngs)
        self.attn = Attention(config, spec["attn"], rngs=rngs, parallel=moe_parallel)
        self.post_attn_norm = RMSNorm(spec["post_attn_norm"], config.rms_norm_eps, rngs=rngs)
        self.mlp = MoE(config, spec["mlp"], rngs=rngs, parallel=moe_parallel)

    def __call__(self, x, cos, sin, positions, valid, cache, attend_to_cache, window, layer=None, block=None):
        attn_out, cache = self.attn(self.input_norm(x, layer), cos, sin, positions, valid, cache, attend_to_cache,
                                    window, layer, block)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x, layer), layer)
        return x, cache


class GptOss(nnx.Module):
    """gpt-oss for causal LM. `dtype` is the compute and parameter dtype (bf16 default, fp32 selectable).

    moe_parallel: a :class:`gptoss_jax.moe_parallel.MoEParallel` to run the experts split over a mesh (built by
    :func:`gptoss_jax.sharding.build_model` / ``shard_model``), or None for one device.
    """

    def __init__(self, config: GptOssConfig, *, dtype=jnp.bfloat16, quant: QuantSpec | None = None,
                 rngs: nnx.Rngs | None = None, moe_parallel=None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        c = config
        self.config, self.dtype, self.quant = c, jnp.dtype(dtype), quant
        self.moe_parallel = moe_parallel
        spec = model_specs(c, dtype=dtype, quant=quant)  # every shape, dtype and logical axis: gptoss_jax.params
        self.embed = layers.Embed(spec["embed"], rngs=rngs)
        # One DecoderLayer with every parameter stacked over the layers (leading axis L): see the module docstring.
        self.layers = DecoderLayer(c, spec["layers"], rngs=rngs, moe_parallel=moe_parallel)
        self.norm = RMSNorm(spec["norm"], c.rms_norm_eps, rngs=rngs)
        self.lm_head = layers.Linear(spec["lm_head"], rngs=rngs)
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
        x, new_cache = self._decoder_layers(x, cos, sin, positions, valid, cache, attend_to_cache)
        if logits_for == "last":
            last = jnp.maximum(lengths - 1, 0)
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)
        x = self.norm(x)
        logits = self.lm_head(x, out_dtype=jnp.float32)
        return logits, new_cache

    def _decoder_layers(self, x, cos, sin, positions, valid, cache, attend_to_cache):
        """The L layers as a lax.scan over L/p blocks of p layers (p = layer_period); cache: p stacked caches.

        The matmul weights (attention projections, experts) stay whole, stacked over layers, and each layer's
        matmuls read their slice in place from its index (the kernels offset their weight ids): slicing them as
        scan inputs would copy every layer's weights on every step, since a Pallas kernel cannot read a dynamic
        slice of its operand in place (the router, the norms and the sinks too: their decode kernels on cuda)."""
        c = self.config
        p = layer_period(c)
        blocks = c.num_hidden_layers // p
        windows = [c.sliding_window if c.is_sliding(j) else None for j in range(p)]
        graphdef, whole, sliced = nnx.split(self.layers, _read_in_place, ...)
        sliced = jax.tree.map(lambda a: a.reshape(blocks, p, *a.shape[1:]), sliced)  # layer b·p + j → [b, j]

        def block(carry, xs):
            x, cache = carry
            block_index, block_state = xs
            new = []
            for j in range(p):
                layer = nnx.merge(graphdef, whole, jax.tree.map(lambda a, j=j: a[j], block_state))
                x, layer_cache = layer(x, cos, sin, positions, valid, None if cache is None else cache[j],
                                       attend_to_cache, windows[j], block_index * p + j, block_index)
                new.append(layer_cache)
            return (x, None if cache is None else tuple(new)), None

        # The KV cache is a loop carry, not a scanned input/output: each layer writes its new entries into the
        # stacked cache in place and attention reads it there (scanned outputs would copy every layer's cache on
        # every step).
        xs = (jnp.arange(blocks, dtype=jnp.int32), sliced)
        (x, new_cache), _ = jax.lax.scan(block, (x, None if cache is None else tuple(cache)), xs)
        return x, new_cache


_IN_PLACE = ("q_proj", "k_proj", "v_proj", "o_proj", "sinks", "experts", "router", "input_norm", "post_attn_norm")


def _read_in_place(path, value) -> bool:
    """nnx filter: parameters the layers read in place from the stacked arrays (see GptOss._decoder_layers)."""
    return any(part in _IN_PLACE for part in path)


# ------------------------------------------------------------------------------------------------ building
def abstract_model(config: GptOssConfig, *, dtype=jnp.bfloat16, quant: QuantSpec | None = None, moe_parallel=None):
    """The model with ShapeDtypeStruct leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: GptOss(config, dtype=dtype, quant=quant, rngs=nnx.Rngs(0),
                                         moe_parallel=moe_parallel))


def build_model(config: GptOssConfig, params: dict, *, dtype=jnp.bfloat16, quant: QuantSpec | None = None,
                moe_parallel=None) -> GptOss:
    """The model around an existing parameter tree (pure dict of arrays, no random init).

    params: the model tree (layers stacked, :func:`gptoss_jax.params.model_specs`) or the storage tree
    (``layers.{i}``, stacked here — a copy). Arrays keep their placement (shardings)."""
    if params["layers"] and all(isinstance(k, int) for k in params["layers"]):
        params = stack_layers(params)
    graphdef, state = nnx.split(abstract_model(config, dtype=dtype, quant=quant, moe_parallel=moe_parallel))
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    # the rotary constant is not a parameter: recompute it rather than leave an abstract leaf
    model.inv_freq = nnx.Variable(jnp.asarray(yarn_inv_freq(config)[0], jnp.float32))
    return model


def params_of(model: GptOss) -> dict:
    """The model tree of a model (pure dict; layers stacked, :func:`gptoss_jax.params.model_specs`)."""
    return nnx.state(model, nnx.Param).to_pure_dict()


def shard_model(model, mesh: Mesh, *, moe_strategy: str = "auto", dispatch_min_tokens: int | None = None,
                rules=sharding.RULES):
    """A copy of `model` with its parameters on their shardings and its MoE layers run under shard_map.

    moe_strategy: "replicated" (decode-friendly: tokens replicated over the expert axes, local experts, psum),
    "dispatch" (tokens sent to the shards owning their experts with a ragged all-to-all and back), or "auto"
    (dispatch once a call has at least `dispatch_min_tokens` tokens). Loading with a mesh
    (:func:`gptoss_jax.load`) places each tensor straight into its sharding instead; this is for in-memory models.
    """
    sharding.validate_mesh_shape(model.config, dict(mesh.shape), rules)
    specs = model_specs(model.config, dtype=model.dtype, quant=model.quant)
    sharded = sharding.shard_params(params_of(model), mesh, specs, rules=rules)
    parallel = MoEParallel.from_rules(mesh, rules, strategy=moe_strategy, dispatch_min_tokens=dispatch_min_tokens)
    return build_model(model.config, sharded, dtype=model.dtype, quant=model.quant, moe_parallel=parallel)


def unshard_model(model):
    """A copy of `model` running the single-device MoE code (parameters stay where they are)."""
    return build_model(model.config, params_of(model), dtype=model.dtype, quant=model.quant)
