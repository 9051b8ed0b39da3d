"""Float64 numpy references for the kernels (used by tests/test_kernels.py and bench/bench_kernels.py).

Plain loops over groups, no JAX: the ground truth every implementation (xla, tpu, gpu) is checked against.
"""

from __future__ import annotations

import numpy as np

from .int4_layout import SYMMETRIC_ZERO, Int4Tensor, unpack
from .swiglu import SWIGLU_ALPHA, SWIGLU_LIMIT, clamped_swiglu_f64


def dequantize_f64(t: Int4Tensor) -> np.ndarray:
    """W = (q - zero) * scale in float64, [..., K, N] (zero = 8 when symmetric)."""
    q = unpack(np.asarray(t.packed)).astype(np.float64)
    s = np.repeat(np.asarray(t.scales).astype(np.float32).astype(np.float64), t.group_size, axis=-2)
    z = SYMMETRIC_ZERO if t.zeros is None else np.repeat(np.asarray(t.zeros).astype(np.float64), t.group_size,
                                                         axis=-2)
    return (q - z) * s


def swiglu_f64(h, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT):
    """gpt-oss clamped SwiGLU on interleaved columns (gate = even, up = odd) in float64: the shared epilogue
    (:mod:`gptoss_jax.kernels.swiglu`) evaluated with numpy."""
    return clamped_swiglu_f64(h, alpha, limit)


def grouped_matmul_f64(x, weights, group_sizes, bias=None, epilogue: str | None = None,
                       alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT):
    """Rows [off_e, off_e + group_sizes[e]) of x times weights[e] (+ bias[e]); rows past the groups are 0.

    `weights` is indexable by expert id (an [E, K, N] array, or a dict holding only the touched experts).
    """
    m = x.shape[0]
    n = next(np.shape(weights[e])[-1] for e, c in enumerate(group_sizes) if c) if np.any(group_sizes) else (
        np.shape(weights)[-1])
    y = np.zeros((m, n))
    off = 0
    for e, c in enumerate(group_sizes):
        c = int(c)
        if c:
            y[off:off + c] = x[off:off + c] @ weights[e] + (0 if bias is None else bias[e])
        off += c
    if epilogue == "swiglu":
        y = swiglu_f64(y, alpha, limit)
        y[off:] = 0
    return y



def routed_matmul_f64(x, weights, expert_ids, rows=None, bias=None, epilogue: str | None = None,
                      alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT):
    """Row r = x[rows[r]] @ weights[expert_ids[r]] (+ bias[expert_ids[r]]); rows whose id is outside [0, E) are 0.

    ``weights`` float64 [E, K, N] (e.g. :func:`dequantize_f64`); rows defaults to range(len(expert_ids))."""
    x = np.asarray(x, np.float64)
    ids = np.asarray(expert_ids)
    rows = np.arange(len(ids)) if rows is None else np.asarray(rows)
    e_count, n = np.shape(weights)[0], np.shape(weights)[-1]
    y = np.zeros((len(ids), n))
    for r, (e, xr) in enumerate(zip(ids, rows)):
        if 0 <= e < e_count:
            y[r] = x[xr] @ weights[e] + (0 if bias is None else np.asarray(bias, np.float64)[e])
    if epilogue == "swiglu":
        live = (ids >= 0) & (ids < e_count)
        y = np.where(live[:, None], swiglu_f64(y, alpha, limit), 0.0)
    return y

def router_top_k_f64(x, w, bias, k: int):
    """gpt-oss's router in float64 (transformers' GptOssTopKRouter): logits = x W + b [N, E]; the k largest per
    row (descending, ties to the lower expert id, as lax.top_k); softmax over those k logits.

    Returns (ids int [N, k], weights float64 [N, k], logits float64 [N, E])."""
    logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(bias, np.float64)
    ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, ids, axis=-1)
    ex = np.exp(top - top[:, :1])
    return ids, ex / ex.sum(-1, keepdims=True), logits


def max_rel_err(y, ref) -> float:
    """max |y - ref| / max |ref| in float64; non-finite y never passes (inf)."""
    y = np.asarray(np.asarray(y).astype(np.float32), np.float64)
    if not np.all(np.isfinite(y)):
        return float("inf")
    return float(np.max(np.abs(y - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def attention_f64(q, k, v, q_pos, k_pos, sinks, window=None):
    """GQA attention with sinks in float64 (gptoss_jax.kernels.attention's contract): q [B,T,H,D], k, v [B,S,KV,D],
    q_pos [B,T], k_pos [B,S] (-1 invisible), sinks [H] → [B,T,H,D] float64. Query head h uses KV head h // (H/KV);
    a query at p sees 0 <= k_pos <= p (and k_pos > p - window); softmax over [q·k/√D, sink] without the sink column.
    """
    q, k, v = (np.asarray(np.asarray(a).astype(np.float32), np.float64) for a in (q, k, v))
    q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
    sinks = np.asarray(np.asarray(sinks).astype(np.float32), np.float64)
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        vis = (k_pos[bi][None, :] >= 0) & (k_pos[bi][None, :] <= q_pos[bi][:, None])
        if window is not None:
            vis &= k_pos[bi][None, :] > q_pos[bi][:, None] - window
        for hh in range(h):
            s = q[bi, :, hh] @ k[bi, :, hh // g].T / np.sqrt(d)  # [T, S]
            s = np.where(vis, s, -np.inf)
            top = np.maximum(s.max(axis=1, initial=-np.inf), sinks[hh])[:, None]
            p = np.exp(s - top)
            p = p / (p.sum(axis=1, keepdims=True) + np.exp(sinks[hh] - top))
            out[bi, :, hh] = p @ v[bi, :, hh // g]
    return out


def decode_attention_update_f64(q, k, v, cos, sin, positions, valid, k_cache, v_cache, pos_cache, sinks, window,
                                block: int, sink_layer=None, compute_dtype=None, cache_dtype=None):
    """One decode step in float64 (``gptoss_jax.kernels.decode_attention_update``'s contract): RoPE (rotate-half,
    float32 as ``gptoss_jax.rope.apply_rope``, rounded to ``compute_dtype`` and then the cache's ``cache_dtype``, as
    the model stores keys), the write of each valid row's key, value and position into slot ``position mod S`` of
    cache block ``block``, then :func:`attention_f64` over that block with the key/value rounded to
    ``compute_dtype`` (as the kernels read them). Shapes as the op; dtypes are ml_dtypes/jnp dtypes or None (no
    rounding). Returns (out [B, H, D], k_cache, v_cache, pos_cache) as float64 / int arrays."""
    import ml_dtypes  # noqa: F401,PLC0415  (registers bfloat16 with numpy)

    def rnd(x, dtype):
        return x if dtype is None else np.asarray(np.asarray(x, np.float32).astype(dtype).astype(np.float32),
                                                  np.float64)

    f = lambda a: np.asarray(np.asarray(a).astype(np.float32), np.float64)  # noqa: E731
    q, k, v, kc, vc = f(q), f(k), f(v), f(k_cache).copy(), f(v_cache).copy()
    pc = np.asarray(pos_cache).copy()
    cos32, sin32 = np.asarray(cos, np.float32)[:, None, :], np.asarray(sin, np.float32)[:, None, :]
    half = q.shape[-1] // 2

    def rope(x):
        x = x.astype(np.float32)
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos32 - x2 * sin32, x2 * cos32 + x1 * sin32], axis=-1).astype(np.float64)

    qr = rnd(rope(q), compute_dtype)
    kr = rnd(rnd(rope(k), compute_dtype), cache_dtype)
    pos, ok = np.asarray(positions).reshape(-1), np.asarray(valid).reshape(-1).astype(bool)
    s = kc.shape[2]
    for r in np.nonzero(ok)[0]:
        kc[block, r, pos[r] % s] = kr[r]
        vc[block, r, pos[r] % s] = rnd(v[r], cache_dtype)
        pc[block, r, pos[r] % s] = pos[r]
    sk = np.asarray(sinks) if sink_layer is None else np.asarray(sinks)[sink_layer]
    out = attention_f64(qr[:, None], rnd(kc[block], compute_dtype), rnd(vc[block], compute_dtype), pos[:, None],
                        pc[block], sk, window)
    return out[:, 0], kc, vc, pc
