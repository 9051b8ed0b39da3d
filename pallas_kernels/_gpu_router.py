"""The MoE router at decode on NVIDIA GPUs in Pallas (Triton lowering): logits, top-k and the softmax over the k
chosen logits in two launches.

Why: at batch 1 the router is a [1, H] x [H, E] product (H = 2880, E = 128 for gpt-oss-120b) followed by a top-4 of
128 values. XLA lowers it to ~6 kernels per layer on an H200 (the bf16 dot as a multiply fusion that writes the
[H, E] float32 products to HBM and a column reduce over them, the bias add, a sort for ``lax.top_k``, the index
plumbing, the softmax): ≈ 12 µs per layer, 0.4 ms of a 4.1 ms decode step (docs/BENCHMARKS.md). Here:

1. ``router_logits`` — grid (tokens, K chunks of ``kc`` rows): each program multiplies one chunk of x by the
   [kc, E] slab of the weight (float32 products and sums; bf16 inputs are exact in float32) and writes a float32
   partial ``[chunks, tokens, E]``. Many small programs so the 737 KB weight streams from every SM at once.
2. ``router_top_k`` — grid (tokens,): sums the partials, adds the bias, takes the top k by k rounds of
   max / lowest index of the max (the order and tie-breaking of ``lax.top_k``: descending, ties to the lower
   expert id), and the softmax over those k logits; writes ids int32 [tokens, k] and weights float32 [tokens, k].

The weight and bias may arrive stacked over layers ([L, H, E], [L, E]) with the layer index: the kernels read
that layer in place (a Pallas operand that is a dynamic slice would be copied first). The math is gpt-oss's router
(reference: ``GptOssTopKRouter`` in transformers' modeling_gpt_oss.py): logits = x W + b, top-k, softmax over the
top-k logits. Float64 reference: ``gptoss_jax.kernels.reference.router_top_k_f64``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common
from ._gpu import AVAILABLE, pltriton

AUTO_MAX_TOKENS = 16  # auto mode (cuda) takes these kernels for at most this many tokens (decode sizes)
ENV_VAR = "GPTOSS_ROUTER_MAX_TOKENS"  # overrides AUTO_MAX_TOKENS at trace time ("0": never; A/B benches)


def auto_max_tokens() -> int:
    """Tokens up to which auto mode takes the kernels on cuda: ``GPTOSS_ROUTER_MAX_TOKENS`` or AUTO_MAX_TOKENS."""
    return _common.env_limit(ENV_VAR, AUTO_MAX_TOKENS)


MAX_EXPERTS = 1024  # one row of logits lives in one program's registers


@dataclasses.dataclass(frozen=True)
class RouterTiling:
    """kc: K rows per program of the logits GEMV (power of two; H / kc programs per token). num_warps: Triton
    warps of the logits program; top_k_warps: of the top-k program (it reads the [H / kc, E] float32 partials)."""

    kc: int = 64  # in the 120b decode profile on an H200 (bench/run_probe.sh stage T): kc 64 + 8 top-k warps took
    num_warps: int = 4  # 161 us per step for both kernels vs 190 with kc 32 + 4 warps (fewer partials to sum)
    top_k_warps: int = 8

    @classmethod
    def coerce(cls, tiling) -> "RouterTiling":
        return _common.coerce_tiling(cls, tiling, "router")


TILING_ENV_VAR = "GPTOSS_ROUTER_TILING"  # JSON object of RouterTiling fields (tuning runs), read at trace time


def default_tiling() -> RouterTiling:
    """RouterTiling() with the fields of ``GPTOSS_ROUTER_TILING`` applied; ValueError for a malformed value."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415

    value = (os.environ.get(TILING_ENV_VAR) or "").strip()
    if not value:
        return RouterTiling()
    try:
        return RouterTiling.coerce(json.loads(value))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{TILING_ENV_VAR}={value!r}: expected a JSON object of RouterTiling fields ({e})") from None


def why_not(h: int, e: int, k: int, tiling=None) -> str | None:
    """None when the kernels run a router with hidden size h, e experts and top-k k, else the reason."""
    if not AVAILABLE:
        return "jax.experimental.pallas.triton is not available"
    if not 1 <= k <= e:
        return f"top-k {k} must be in [1, {e}]"
    if e > MAX_EXPERTS:
        return f"{e} experts: at most {MAX_EXPERTS}"
    t = default_tiling() if tiling is None else RouterTiling.coerce(tiling)
    if t.kc < 1 or t.kc & (t.kc - 1):
        return f"kc={t.kc} must be a power of two"
    return None


def router_top_k_gpu(x, w, bias, k: int, *, layer=None, tiling=None, interpret: bool = False):
    """Top-k experts of each token and their softmax weights (module docstring).

    x [N, H] (any float dtype); w [H, E] and bias [E] (or [L, H, E] and [L, E] with ``layer``, an int32 scalar,
    read in place). Returns (ids int32 [N, k], descending logits, ties to the lower id; weights float32 [N, k],
    summing to 1). Raises ValueError when :func:`why_not` gives a reason."""
    stacked = layer is not None
    n, h = x.shape
    e = int(w.shape[-1])
    t = default_tiling() if tiling is None else RouterTiling.coerce(tiling)
    reason = why_not(h, e, k, t)
    if reason is not None:
        raise ValueError(reason)
    kc = t.kc
    chunks = _common.cdiv(h, kc)
    be = _common.pow2_at_least(e)  # expert columns per program (masked past e)
    sp = _common.pow2_at_least(chunks)  # partial rows the top-k program loads (masked past `chunks`)
    kp = _common.pow2_at_least(k)
    f32 = jnp.float32
    k_full, e_full = h % kc == 0, e == be
    lid = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    w3 = w if stacked else w[None]
    b2 = bias if stacked else bias[None]
    if interpret:
        # The interpreter clamps out-of-range dynamic slices instead of masking as Triton does: pad to whole tiles.
        x = jnp.pad(x, ((0, 0), (0, chunks * kc - h)))
        w3 = jnp.pad(w3, ((0, 0), (0, chunks * kc - h), (0, be - e)))
        b2 = jnp.pad(b2, ((0, 0), (0, be - e)))

    def _load(ref, mask):
        return pltriton.load(ref) if mask is None else pltriton.load(ref, mask=mask, other=0)

    def logits_kernel(l_ref, x_ref, w_ref, o_ref):
        r, c = pl.program_id(0), pl.program_id(1)
        k0 = c * kc
        kmask = None if k_full else (k0 + jax.lax.broadcasted_iota(jnp.int32, (kc,), 0)) < h
        cmask = None if e_full else jax.lax.broadcasted_iota(jnp.int32, (be,), 0) < e
        m2 = None
        if kmask is not None or cmask is not None:
            m2 = jnp.ones((kc, be), bool)
            m2 = m2 if kmask is None else jnp.logical_and(m2, kmask[:, None])
            m2 = m2 if cmask is None else jnp.logical_and(m2, cmask[None, :])
        xv = _load(x_ref.at[r, pl.ds(k0, kc)], kmask).astype(f32)
        wv = _load(w_ref.at[l_ref[0], pl.ds(k0, kc), pl.ds(0, be)], m2).astype(f32)
        pltriton.store(o_ref.at[c, r, pl.ds(0, be)], jnp.sum(xv[:, None] * wv, axis=0))

    kwargs = {} if interpret else {"compiler_params": pltriton.CompilerParams(num_warps=t.num_warps, num_stages=1)}
    partial = pl.pallas_call(
        logits_kernel,
        out_shape=jax.ShapeDtypeStruct((sp, n, be), f32),
        grid=(n, chunks),
        interpret=interpret,
        name="router_logits",
        **kwargs,
    )(lid, x, w3)

    def top_k_kernel(l_ref, p_ref, b_ref, ids_ref, wt_ref):
        r = pl.program_id(0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (be,), 0)
        smask = jax.lax.broadcasted_iota(jnp.int32, (sp,), 0) < chunks
        parts = pltriton.load(p_ref.at[pl.ds(0, sp), r, pl.ds(0, be)], mask=jnp.broadcast_to(smask[:, None], (sp, be)),
                              other=0)
        bias_v = _load(b_ref.at[l_ref[0], pl.ds(0, be)], None if e_full else cols < e).astype(f32)
        v = jnp.sum(parts, axis=0) + bias_v
        if not e_full:
            v = jnp.where(cols < e, v, -jnp.inf)
        slot = jax.lax.broadcasted_iota(jnp.int32, (kp,), 0)
        ids = jnp.zeros((kp,), jnp.int32)
        vals = jnp.full((kp,), -jnp.inf, f32)
        for j in range(k):  # k rounds: the max, then the lowest expert id holding it (lax.top_k's order)
            m = jnp.max(v)
            idx = jnp.min(jnp.where(v == m, cols, be))
            ids = jnp.where(slot == j, idx, ids)
            vals = jnp.where(slot == j, m, vals)
            v = jnp.where(cols == idx, -jnp.inf, v)
        ex = jnp.exp(vals - jnp.max(vals))  # vals[0] is the max; padding slots (-inf) give 0
        wts = ex / jnp.sum(ex)
        kmask = None if kp == k else slot < k
        pltriton.store(ids_ref.at[r, pl.ds(0, kp)], ids, mask=kmask)
        pltriton.store(wt_ref.at[r, pl.ds(0, kp)], wts, mask=kmask)

    kwargs = {} if interpret else {"compiler_params": pltriton.CompilerParams(num_warps=t.top_k_warps,
                                                                              num_stages=1)}
    ids, wts = pl.pallas_call(
        top_k_kernel,
        out_shape=(jax.ShapeDtypeStruct((n, kp), jnp.int32), jax.ShapeDtypeStruct((n, kp), f32)),
        grid=(n,),
        interpret=interpret,
        name="router_top_k",
        **kwargs,
    )(lid, partial, b2)
    if kp != k:
        ids, wts = ids[:, :k], wts[:, :k]
    return ids, wts
