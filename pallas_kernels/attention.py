"""Attention for gpt-oss: grouped-query attention with learned per-head sinks, causal + sliding-window masks
computed from positions, in three implementations behind one function.

Semantics (the contract every implementation is tested against; the numerical source is transformers'
``GptOssAttention`` / ``eager_attention_forward`` and OpenAI's gpt-oss reference ``sdpa`` with sinks):

* ``q [B, T, H, D]``, ``k, v [B, S, KV, D]``; query head ``h`` uses KV head ``h // (H / KV)`` (GQA, group size
  ``G = H / KV``).
* ``q_pos [B, T]`` int32 and ``k_pos [B, S]`` int32 are absolute token positions; ``k_pos = -1`` marks a key nobody
  may see (padding or an empty KV-cache slot). A query at position ``p`` sees keys with ``0 <= k_pos <= p`` and, when
  ``window`` is not None, ``k_pos > p - window``. Masks come from positions only, so KV-cache ring buffers (slot =
  position mod window) and right-padding need no special cases.
* ``softmax([q·kᵀ · D^-0.5, sink_h])`` with the sink column dropped, times ``v``; ``sinks [H]`` is one learned
  logit per head. A query that sees no key returns 0. Accumulation is float32; the output is ``q.dtype``.
* Float32 inputs use ``Precision.HIGHEST`` (IEEE f32 dots, no TF32/bf16 passes).

Implementations (``implementation=``):

* ``"xla"``: jnp. Decode (``T == 1``) over more than ``XLA_DECODE_K_CHUNK`` slots loops over only the key chunks
  that hold a visible slot. Otherwise small problems (``T · S`` at most ``DIRECT_MAX_SCORES``) materialize the scores
  (:func:`attention_reference`); larger ones run :func:`attention_chunked`, a flash-style loop in jnp: query chunks
  (``lax.map``) × key chunks (``lax.while_loop`` over only the key chunks that some query of the chunk can see)
  with an online softmax, so memory is O(T) and a sliding window costs O(T · window).
* ``"gpu"``: Pallas kernel, Triton lowering (:func:`flash_attention_gpu`), see its docstring.
* ``"tpu"``: Pallas Mosaic TPU kernel (:func:`flash_attention_tpu`), see its docstring. jax's splash attention
  (``jax.experimental.pallas.ops.tpu.splash_attention``, jax 0.10) does take sinks, but its masks are static
  (numpy ``Mask`` objects fixed at trace time, plus segment ids): it cannot express per-row, runtime
  position-based masks such as a KV-cache ring buffer or right-padded rows of different lengths, so we use our own.
* ``None``: auto, from the kernels' registry table ``registry.AUTO_ORDER["attention"]`` per lowering platform,
  bound with ``jax.lax.platform_dependent`` like the matmuls (``GPTOSS_KERNELS`` overrides): the GPU kernel on
  cuda (measured on an H200), xla on tpu (the TPU kernel never ran on a TPU) and everywhere else. ``pallas_call``
  is not auto-partitioned, so a bare call with several devices keeps "xla"; the model on a mesh calls attention per device
  under ``shard_map`` (:func:`gptoss_jax.moe_parallel.attention_forward`: rows like the batch, heads over the head
  axes) with :func:`per_device_implementation`, so the kernel runs there too.

Sinks in the kernels: a kernel that keeps each row's running max ``m`` and normalizer ``l`` applies the sink
exactly at the end: ``out = acc / (l + exp(sink - m))`` (the same as ``acc / l · 1 / (1 + exp(sink - L))`` with
``L = m + log l``), computed after rescaling to ``max(m, sink)`` so nothing overflows.

Decode (``T == 1``) goes through the same functions; the GPU kernel then splits the cache over many programs
(flash-decoding: partial ``acc, m, l`` per split, merged by a small XLA expression), and every implementation
reads only the key blocks that hold a visible slot (``key_block_ranges``), so a short request in a long
``max_seq_len`` cache does not pay for the allocated length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common

IMPLEMENTATIONS = ("xla", "tpu", "gpu")

# The xla path materializes scores directly up to this many (T·S) per batch row and head, else it runs the chunked
# loop. 2**20 keeps every model test (and short prompts) on the exact old code path.
DIRECT_MAX_SCORES = 1 << 20
XLA_Q_CHUNK = 512
XLA_K_CHUNK = 512
# Decode (T = 1) over more slots than this reads only the chunks holding visible slots (few, large chunks: each loop
# step has a fixed cost). Not tuned on a GPU.
XLA_DECODE_K_CHUNK = 4096


_NEG = -1e30  # finite "minus infinity" for running maxima (exp(-inf - -inf) would be nan)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ----------------------------------------------------------------------------------------------------- reference
def visible_mask(q_pos, k_pos, window: int | None):
    """bool [B, T, S]: which keys each query sees (0 <= k_pos <= q_pos, and k_pos > q_pos - window)."""
    kp, qp = k_pos[:, None, :], q_pos[:, :, None]
    vis = (kp >= 0) & (kp <= qp)
    if window is not None:
        vis &= kp > qp - window
    return vis


def attention_reference(q, k, v, q_pos, k_pos, sinks, window: int | None):
    """softmax([q·kᵀ/√d + mask, sink]) minus the sink column, times v — all scores materialized [B,KV,G,T,S].

    Shapes and semantics: module docstring. Returns [B, T, H, D] in q.dtype.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32,
                        precision=_precision(q.dtype))
    logits = logits * (d ** -0.5)
    visible = visible_mask(q_pos, k_pos, window)  # [B,T,S]
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    sink = sinks.astype(jnp.float32).reshape(1, kv, h // kv, 1, 1)
    top = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)  # finite: the sink is always there
    p = jnp.exp(logits - top)
    p = p / (jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink - top))
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                     precision=_precision(v.dtype))
    return out.reshape(b, t, h, d).astype(q.dtype)


def attention_chunked(q, k, v, q_pos, k_pos, sinks, window: int | None, *, q_chunk: int = XLA_Q_CHUNK,
                      k_chunk: int = XLA_K_CHUNK):
    """The same function as :func:`attention_reference` with O(T) memory: query chunks × key chunks, online softmax.

    Only key chunks that some query of the chunk may see are visited (``key_block_ranges``), so causal prefill
    does about half the work and a sliding window O(T · window). Peak extra memory per step is one
    [B, KV, G, q_chunk, k_chunk] score block.
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    q_chunk, k_chunk = min(q_chunk, t), min(k_chunk, s)
    tp, sp = _common.cdiv(t, q_chunk) * q_chunk, _common.cdiv(s, k_chunk) * k_chunk
    rc = q_chunk * g  # query rows per chunk: row r = t·G + g, the G heads of one KV head (as in the kernels)
    # Rows layout [B, KV, R, D]: measured on CPU, "bkrd,bskd->bkrs" ran ~4x faster than "btkgd,bskd->bkgts".
    qr, pos_r, sink_r = _to_rows(q, q_pos, sinks, kv, tp * g)
    kp = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    kpos_p = jnp.pad(k_pos, ((0, 0), (0, sp - s)), constant_values=-1)
    nq = tp // q_chunk
    # Every row of the batch runs the union of its rows' ranges (one loop for the batch).
    lo, hi = key_block_ranges(pos_r, kpos_p, window, rc, k_chunk)  # [B, nq]
    lo, hi = jnp.min(lo, axis=0), jnp.max(hi, axis=0)
    scale = d ** -0.5
    prec = _precision(q.dtype)

    def one_q_chunk(i):
        q_c = jax.lax.dynamic_slice_in_dim(qr, i * rc, rc, axis=2)  # [B, KV, rc, D]
        pos_c = jax.lax.dynamic_slice_in_dim(pos_r, i * rc, rc, axis=1)  # [B, rc]

        def body(j, carry):
            m, l, acc = carry
            k_c = jax.lax.dynamic_slice_in_dim(kp, j * k_chunk, k_chunk, axis=1)
            v_c = jax.lax.dynamic_slice_in_dim(vp, j * k_chunk, k_chunk, axis=1)
            kpos_c = jax.lax.dynamic_slice_in_dim(kpos_p, j * k_chunk, k_chunk, axis=1)
            sc = jnp.einsum("bkrd,bskd->bkrs", q_c, k_c, preferred_element_type=jnp.float32, precision=prec)
            vis = visible_mask(pos_c, kpos_c, window)[:, None]  # [B, 1, rc, Kc]
            sc = jnp.where(vis, sc * scale, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            p = jnp.exp(sc - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            l = l * alpha + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkrs,bskd->bkrd", p.astype(v.dtype), v_c, preferred_element_type=jnp.float32,
                            precision=prec)
            return m_new, l, acc * alpha[..., None] + pv

        init = (jnp.full((b, kv, rc), _NEG, jnp.float32), jnp.zeros((b, kv, rc), jnp.float32),
                jnp.zeros((b, kv, rc, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(lo[i], hi[i], body, init)
        sink = jax.lax.dynamic_slice_in_dim(sink_r, i * rc, rc, axis=1)[None]  # [1, KV, rc]
        top = jnp.maximum(m, sink)
        a = jnp.exp(m - top)
        return (acc * (a / (l * a + jnp.exp(sink - top)))[..., None]).astype(q.dtype)  # [B, KV, rc, D]

    out = jax.lax.map(one_q_chunk, jnp.arange(nq))  # [nq, B, KV, rc, D]
    out = jnp.transpose(out, (1, 2, 0, 3, 4)).reshape(b, kv, nq * rc, d)
    return _from_rows(out, b, t, h, d, kv)


# ------------------------------------------------------------------------------------------------ block ranges
def _pad_edge(x, n):
    """Pads [B, T] positions to [B, n] by repeating the last column (padded queries are sliced off later; edge
    values keep the per-block position ranges tight)."""
    t = x.shape[1]
    return x if n == t else jnp.pad(x, ((0, 0), (0, n - t)), mode="edge")


def key_block_ranges(q_pos, k_pos, window: int | None, q_block: int, k_block: int):
    """Per query block, the half-open range [lo, hi) of key blocks that may hold a visible key.

    q_pos [B, Tp] (Tp a multiple of q_block), k_pos [B, Sp] (a multiple of k_block) → lo, hi int32 [B, Tp/q_block].
    A key block is a candidate when it holds a valid key whose position can be seen by some query of the block
    (min valid position ≤ max query position, and max valid position > min query position − window). Key blocks
    between lo and hi that are not candidates are still visited (their keys are masked), so the range is exact for
    position-sorted keys (prefill, full-attention caches) and conservative for ring buffers. No candidate: lo = hi.
    """
    b, tp = q_pos.shape
    sp = k_pos.shape[1]
    nq, nk = tp // q_block, sp // k_block
    qb = q_pos.reshape(b, nq, q_block)
    qmin, qmax = jnp.min(qb, axis=-1), jnp.max(qb, axis=-1)  # [B, nq]
    kb = k_pos.reshape(b, nk, k_block)
    valid = kb >= 0
    big = jnp.iinfo(jnp.int32).max
    kmin = jnp.min(jnp.where(valid, kb, big), axis=-1)  # [B, nk]
    kmax = jnp.max(jnp.where(valid, kb, -1), axis=-1)
    cand = (kmax[:, None, :] >= 0) & (kmin[:, None, :] <= qmax[:, :, None])
    if window is not None:
        cand &= kmax[:, None, :] > qmin[:, :, None] - window
    idx = jnp.arange(nk, dtype=jnp.int32)
    lo = jnp.min(jnp.where(cand, idx, nk), axis=-1)
    hi = jnp.max(jnp.where(cand, idx + 1, 0), axis=-1)
    lo = jnp.minimum(lo, hi)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


# ------------------------------------------------------------------------------------------------ layouts (kernels)
def _to_rows(q, q_pos, sinks, kv, r_pad):
    b, t, h, d = q.shape
    g = h // kv
    r = t * g
    qr = jnp.transpose(q.reshape(b, t, kv, g, d), (0, 2, 1, 3, 4)).reshape(b, kv, r, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, r_pad - r), (0, 0)))
    pos_r = _pad_edge(jnp.repeat(q_pos.astype(jnp.int32), g, axis=1), r_pad)
    sink_r = jnp.tile(sinks.astype(jnp.float32).reshape(kv, 1, g), (1, t, 1)).reshape(kv, r)
    sink_r = jnp.pad(sink_r, ((0, 0), (0, r_pad - r)))
    return qr, pos_r, sink_r


def _from_rows(out_r, b, t, h, d, kv):
    g = h // kv
    out = out_r[:, :, :t * g].reshape(b, kv, t, g, d)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(b, t, h, d)


def _pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


# ----------------------------------------------------------------------------------------------------- gpu kernel
try:
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

GPU_AVAILABLE = pltriton is not None
# Prefill tiles: 128 query rows (16 tokens × 8 heads of one KV head at G = 8) × 64 keys, head_dim 64: the classic
# Triton flash-attention tile for D = 64 on Hopper/Ampere.
GPU_PREFILL_TILING = dict(block_rows=128, block_k=64, num_warps=4, num_stages=2)
# Decode: the G rows of one KV head padded to 16 (the smallest Triton dot), 128 keys per step, many splits.
GPU_DECODE_TILING = dict(block_rows=16, block_k=128, num_warps=4, num_stages=2, target_programs=1024)
INTERPRET_DECODE_TARGET_PROGRAMS = 4


def flash_attention_gpu(q, k, v, q_pos, k_pos, sinks, window: int | None, *, tiling: dict | None = None,
                        interpret: bool = False, layer=None):
    """Flash attention (online softmax) in Pallas with the Triton lowering.

    Layout: queries as rows r = t·G + g of one KV head ([B, KV, R, D], a cheap transpose of q), so one program
    multiplies a [block_rows, D] tile of the group's query rows with [block_k, D] key tiles read in place from the
    cache layout [B, S, KV, D] (strided loads, no copy of K/V). Grid = (B, KV, row blocks, splits). Each program
    loops over its share of [lo, hi) from :func:`key_block_ranges` (whole key blocks no query of the tile can see
    are skipped: causal upper triangle, beyond the sliding window, empty cache slots); masks inside a block come
    from positions. Prefill uses splits = 1 and normalizes (with the sink) in the kernel. Decode (T = 1: few row
    blocks) splits the key range over many programs (flash-decoding); each writes float32 partials (acc, m, l) and
    one XLA expression merges them with the sink.

    layer: None, or an int32 scalar: k, v [L, B, S, KV, D] and k_pos [L, B, S] are a KV cache stacked over layers
    and the kernel reads layer `layer` in place (the model's scan passes the whole cache: slicing it would copy it).
    """
    if layer is None:
        k, v, k_pos = k[None], v[None], k_pos[None]
        layer = 0
    b, t, h, d = q.shape
    s, kv = k.shape[2], k.shape[3]
    g = h // kv
    decode = t == 1
    tl = dict(GPU_DECODE_TILING if decode else GPU_PREFILL_TILING)
    if tiling:
        tl.update({kk: vv for kk, vv in dict(tiling).items() if vv is not None})
    rows = t * g
    bm = min(tl["block_rows"], _pow2_at_least(rows, 16))
    bn = min(tl["block_k"], _pow2_at_least(s, 16))
    if s % bn and (s & -s) >= 16:  # a smaller key tile that divides S beats padding (a copy of the whole cache)
        bn = s & -s
    r_pad = _common.cdiv(rows, bm) * bm
    s_pad = _common.cdiv(s, bn) * bn
    nr, nk = r_pad // bm, s_pad // bn
    if s_pad != s:  # padded slots are invisible (-1); only when S is not a multiple of the key tile (a copy)
        k = jnp.pad(k, ((0, 0), (0, 0), (0, s_pad - s), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, s_pad - s), (0, 0), (0, 0)))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, 0), (0, s_pad - s)), constant_values=-1)
    k_pos = k_pos.astype(jnp.int32)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    qr, pos_r, sink_r = _to_rows(q, q_pos, sinks, kv, r_pad)
    lo, hi = key_block_ranges(pos_r, jax.lax.dynamic_index_in_dim(k_pos, layer[0], 0, keepdims=False), window,
                              bm, bn)  # [B, nr]
    lohi = jnp.stack([lo, hi], axis=-1)  # [B, nr, 2]
    if decode:
        target = tl.get("target_programs", 1024)
        if interpret:
            target = INTERPRET_DECODE_TARGET_PROGRAMS
        splits = int(tl.get("splits") or max(1, min(nk, _common.cdiv(target, b * kv * nr))))
    else:
        splits = int(tl.get("splits") or 1)
    partial = splits > 1
    prec = _precision(q.dtype)
    scale = d ** -0.5

    def kernel(layer_ref, lohi_ref, pos_ref, sink_ref, q_ref, k_ref, v_ref, kpos_ref, *out_refs):
        bi, hh, i, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
        li = layer_ref[0]
        lo_ = lohi_ref[bi, i, 0]
        hi_ = lohi_ref[bi, i, 1]
        per = (hi_ - lo_ + splits - 1) // splits  # key blocks per split, from the *filled* range (runtime)
        j0 = lo_ + sp * per
        j1 = jnp.minimum(j0 + per, hi_)
        qt = q_ref[bi, hh, pl.ds(i * bm, bm), :]
        qp = pos_ref[bi, pl.ds(i * bm, bm)]

        def body(j, carry):
            m, l, acc = carry
            kt = k_ref[li, bi, pl.ds(j * bn, bn), hh, :].astype(qt.dtype)
            vt = v_ref[li, bi, pl.ds(j * bn, bn), hh, :].astype(qt.dtype)
            kp = kpos_ref[li, bi, pl.ds(j * bn, bn)]
            sc = jax.lax.dot_general(qt, kt, (((1,), (1,)), ((), ())), precision=prec,
                                     preferred_element_type=jnp.float32) * scale
            vis = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None])
            if window is not None:
                vis &= kp[None, :] > qp[:, None] - window
            sc = jnp.where(vis, sc, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(sc, axis=1))
            p = jnp.exp(sc - m_new[:, None])
            alpha = jnp.exp(m - m_new)
            l = l * alpha + jnp.sum(p, axis=1)
            acc = acc * alpha[:, None] + jnp.dot(p.astype(vt.dtype), vt, precision=prec,
                                                 preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full((bm,), _NEG, jnp.float32), jnp.zeros((bm,), jnp.float32), jnp.zeros((bm, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(j0, j1, body, init)
        if partial:
            o_ref, m_ref, l_ref = out_refs
            o_ref[bi, hh, sp, pl.ds(i * bm, bm), :] = acc
            m_ref[bi, hh, sp, pl.ds(i * bm, bm)] = m
            l_ref[bi, hh, sp, pl.ds(i * bm, bm)] = l
        else:
            (o_ref,) = out_refs
            sk = sink_ref[hh, pl.ds(i * bm, bm)]
            top = jnp.maximum(m, sk)
            a = jnp.exp(m - top)
            den = l * a + jnp.exp(sk - top)
            o_ref[bi, hh, pl.ds(i * bm, bm), :] = (acc * (a / den)[:, None]).astype(o_ref.dtype)

    if partial:
        out_shape = (jax.ShapeDtypeStruct((b, kv, splits, r_pad, d), jnp.float32),
                     jax.ShapeDtypeStruct((b, kv, splits, r_pad), jnp.float32),
                     jax.ShapeDtypeStruct((b, kv, splits, r_pad), jnp.float32))
    else:
        out_shape = jax.ShapeDtypeStruct((b, kv, r_pad, d), q.dtype)
    kwargs = {}
    if not interpret:
        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=tl["num_warps"], num_stages=tl["num_stages"])
    res = pl.pallas_call(kernel, out_shape=out_shape, grid=(b, kv, nr, splits), interpret=interpret,
                         name="flash_decode_attention" if partial else "flash_attention", **kwargs)(
        layer, lohi, pos_r, sink_r, qr, k, v, k_pos)
    if partial:
        acc, m, l = res
        out_r = _merge_splits(acc, m, l, sink_r[None, :, None, :])
    else:
        out_r = res
    return _from_rows(out_r, b, t, h, d, kv).astype(q.dtype)


def _merge_splits(acc, m, l, sink):
    """Flash-decoding merge: partials acc [B,KV,P,R,D], m, l [B,KV,P,R] and sink [1,KV,1,R] → out [B,KV,R,D]."""
    top = jnp.maximum(jnp.max(m, axis=2, keepdims=True), sink)  # [B,KV,1,R]
    a = jnp.exp(m - top)  # [B,KV,P,R]
    num = jnp.sum(acc * a[..., None], axis=2)
    den = jnp.sum(l * a, axis=2) + jnp.exp(sink - top)[:, :, 0]
    return num / den[..., None]


# ----------------------------------------------------------------------------------------------------- tpu kernel
TPU_TILING = dict(block_rows=128, block_k=128)


def flash_attention_tpu(q, k, v, q_pos, k_pos, sinks, window: int | None, *, tiling: dict | None = None,
                        interpret: Any = False):
    """Flash attention as a Pallas Mosaic TPU kernel (BlockSpecs, VMEM scratch for m / l / acc).

    Rows as in the GPU kernel (r = t·G + g per KV head). Grid = (B, KV, row blocks, key steps), the last axis
    "arbitrary" (sequential, carries the online softmax in VMEM scratch). The per-row-block key range [lo, hi) is
    scalar-prefetched: key step j reads key block min(lo + j, hi - 1) — steps past the range repeat the previous
    block index, so Pallas issues no DMA for them — and computes only while lo + j < hi. K/V are transposed to
    [B, KV, S, D] first (Mosaic block shapes need the last two dims to be tiles of (8, 128) or full). Decode
    (T = 1) runs the same kernel: only key blocks holding a visible slot are read.

    Tested in TPU interpret mode on CPU; never run on a real TPU.
    """
    from jax.experimental.pallas import tpu as pltpu

    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    tl = dict(TPU_TILING)
    if tiling:
        tl.update({kk: vv for kk, vv in dict(tiling).items() if vv is not None})
    rows = t * g
    bm = min(tl["block_rows"], _common.cdiv(rows, 8) * 8)
    bn = tl["block_k"] if s > tl["block_k"] else _common.cdiv(s, 128) * 128
    r_pad = _common.cdiv(rows, bm) * bm
    s_pad = _common.cdiv(s, bn) * bn
    nr, nk = r_pad // bm, s_pad // bn
    kt = jnp.pad(jnp.transpose(k, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, s_pad - s), (0, 0)))
    vt = jnp.pad(jnp.transpose(v, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, s_pad - s), (0, 0)))
    kpos = jnp.pad(k_pos.astype(jnp.int32), ((0, 0), (0, s_pad - s)), constant_values=-1)
    qr, pos_r, sink_r = _to_rows(q, q_pos, sinks, kv, r_pad)
    lo, hi = key_block_ranges(pos_r, kpos, window, bm, bn)
    lohi = jnp.stack([lo, hi], axis=-1).reshape(-1)  # flat [B·nr·2] (SMEM prefers 1-D)
    prec = _precision(q.dtype)
    scale = d ** -0.5

    def kblock(bi, i, j, lohi_ref):
        lo_ = lohi_ref[(bi * nr + i) * 2]
        hi_ = lohi_ref[(bi * nr + i) * 2 + 1]
        return jnp.maximum(jnp.minimum(lo_ + j, hi_ - 1), 0)

    def kernel(lohi_ref, pos_ref, sink_ref, q_ref, k_ref, v_ref, kpos_ref, o_ref, m_sc, l_sc, acc_sc):
        bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
        lo_ = lohi_ref[(bi * nr + i) * 2]
        hi_ = lohi_ref[(bi * nr + i) * 2 + 1]

        @pl.when(j == 0)
        def _init():
            m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        @pl.when(lo_ + j < hi_)
        def _step():
            qt = q_ref[...]  # [bm, D]
            sc = jax.lax.dot_general(qt, k_ref[...], (((1,), (1,)), ((), ())), precision=prec,
                                     preferred_element_type=jnp.float32) * scale  # [bm, bn]
            qp = pos_ref[...]  # [bm, 1]
            kp = kpos_ref[...]  # [1, bn]
            vis = (kp >= 0) & (kp <= qp)
            if window is not None:
                vis &= kp > qp - window
            sc = jnp.where(vis, sc, -jnp.inf)
            m = m_sc[...]  # [bm, 1]
            m_new = jnp.maximum(m, jnp.max(sc, axis=1, keepdims=True))
            p = jnp.exp(sc - m_new)
            alpha = jnp.exp(m - m_new)
            l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
            acc_sc[...] = acc_sc[...] * alpha + jnp.dot(p.astype(v_ref.dtype), v_ref[...], precision=prec,
                                                        preferred_element_type=jnp.float32)
            m_sc[...] = m_new

        @pl.when(j == pl.num_programs(3) - 1)
        def _finish():
            m, l = m_sc[...], l_sc[...]
            sk = sink_ref[...]  # [bm, 1]
            top = jnp.maximum(m, sk)
            a = jnp.exp(m - top)
            o_ref[...] = (acc_sc[...] * (a / (l * a + jnp.exp(sk - top)))).astype(o_ref.dtype)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kv, nr, nk),
        in_specs=[
            pl.BlockSpec((None, bm, 1), lambda bi, hh, i, j, lr: (bi, i, 0)),
            pl.BlockSpec((None, bm, 1), lambda bi, hh, i, j, lr: (hh, i, 0)),
            pl.BlockSpec((None, None, bm, d), lambda bi, hh, i, j, lr: (bi, hh, i, 0)),
            pl.BlockSpec((None, None, bn, d), lambda bi, hh, i, j, lr: (bi, hh, kblock(bi, i, j, lr), 0)),
            pl.BlockSpec((None, None, bn, d), lambda bi, hh, i, j, lr: (bi, hh, kblock(bi, i, j, lr), 0)),
            pl.BlockSpec((None, 1, bn), lambda bi, hh, i, j, lr: (bi, 0, kblock(bi, i, j, lr))),
        ],
        out_specs=pl.BlockSpec((None, None, bm, d), lambda bi, hh, i, j, lr: (bi, hh, i, 0)),
        scratch_shapes=[pltpu.VMEM((bm, 1), jnp.float32), pltpu.VMEM((bm, 1), jnp.float32),
                        pltpu.VMEM((bm, d), jnp.float32)],
    )
    if interpret is True:
        interpret = pltpu.InterpretParams()
    params_cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    out_r = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((b, kv, r_pad, d), q.dtype),
        compiler_params=params_cls(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="flash_attention_tpu",
    )(lohi, pos_r[:, :, None], sink_r[:, :, None], qr, kt, vt, kpos[:, None, :])
    return _from_rows(out_r, b, t, h, d, kv).astype(q.dtype)


# ------------------------------------------------------------------------------------------------------ dispatch
def _check(q, k, v, q_pos, k_pos, sinks, window):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention: q must be [B,T,H,D] and k, v [B,S,KV,D]; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    b, t, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k {k.shape} does not match q {q.shape} (batch, head_dim)")
    if h % k.shape[2]:
        raise ValueError(f"attention: {h} query heads are not a multiple of {k.shape[2]} KV heads")
    if q_pos.shape != (b, t) or k_pos.shape != (b, k.shape[1]):
        raise ValueError(f"attention: q_pos must be [{b},{t}] and k_pos [{b},{k.shape[1]}]; got {q_pos.shape}, "
                         f"{k_pos.shape}")
    if sinks.shape != (h,):
        raise ValueError(f"attention: sinks must be [{h}], got {sinks.shape}")
    if window is not None and (isinstance(window, bool) or int(window) < 1):
        raise ValueError(f"attention: window must be None or a positive int, got {window!r}")


def auto_choices() -> dict[str, str]:
    """Lowering platform → the implementation auto mode binds for it (``registry.AUTO_ORDER["attention"]``, the same
    ordered table as the matmuls'; platforms not listed get "xla")."""
    from . import registry

    out = {}
    for platform in registry.KERNEL_PLATFORMS:
        for name in registry.AUTO_ORDER["attention"].get(platform, ("xla",)):
            if name == "xla" or (name == "gpu" and GPU_AVAILABLE) or name == "tpu":
                out[platform] = name
                break
    return out


def per_device_implementation() -> str:
    """What a call that runs on one device (one device's part under shard_map) asks for: the ``GPTOSS_KERNELS``
    override if set, else "auto" (bound per lowering platform, :func:`auto_choices`)."""
    from .ops import _env_override

    return _env_override() or "auto"


def _run(impl, q, k, v, q_pos, k_pos, sinks, window, tiling, interpret, layer):
    if layer is not None and impl != "gpu":  # a slice (XLA fuses it into its consumers where it can)
        k, v, k_pos = (jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False) for a in (k, v, k_pos))
    if impl != "gpu" and k.dtype != q.dtype:  # a KV cache kept in another dtype; the GPU kernel converts its tiles
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    if impl == "xla":
        t, s = q.shape[1], k.shape[1]
        if t == 1 and s > XLA_DECODE_K_CHUNK:
            # Decode over a large cache: loop over only the key chunks that hold visible slots (runtime bounds), so
            # a short request does not read a long max_seq_len cache.
            return attention_chunked(q, k, v, q_pos, k_pos, sinks, window, q_chunk=1, k_chunk=XLA_DECODE_K_CHUNK)
        if t * s <= DIRECT_MAX_SCORES:
            return attention_reference(q, k, v, q_pos, k_pos, sinks, window)
        return attention_chunked(q, k, v, q_pos, k_pos, sinks, window)
    if impl == "gpu":
        if not GPU_AVAILABLE:
            raise ValueError("attention: the Pallas Triton backend is not available in this jax")
        if interpret is None:
            interpret = jax.default_backend() not in ("gpu", "cuda")
        return flash_attention_gpu(q, k, v, q_pos, k_pos, sinks, window, tiling=tiling, interpret=bool(interpret),
                                   layer=layer)
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    return flash_attention_tpu(q, k, v, q_pos, k_pos, sinks, window, tiling=tiling, interpret=interpret)


def _auto(q, k, v, q_pos, k_pos, sinks, window, tiling, layer):
    """Auto mode: each lowering platform gets its :func:`auto_choices` implementation, bound with
    ``jax.lax.platform_dependent`` (so a CPU host exporting for cuda gets the GPU kernel, compiled)."""
    stacked = layer is not None
    li = jnp.asarray(0 if layer is None else layer, jnp.int32)

    def bind(name):
        def fn(q_, k_, v_, qp_, kp_, s_, li_):
            return _run(name, q_, k_, v_, qp_, kp_, s_, window, tiling if name != "xla" else None,
                        None if name == "xla" else False, li_ if stacked else None)
        return fn

    branches = {platform: bind(name) for platform, name in auto_choices().items() if name != "xla"}
    if not branches:
        return bind("xla")(q, k, v, q_pos, k_pos, sinks, li)
    return _common.platform_switch(q, k, v, q_pos, k_pos, sinks, li, default=bind("xla"), **branches)


def attention(q, k, v, q_pos, k_pos, sinks, window: int | None = None, *, implementation: str | None = None,
              tiling: dict | None = None, interpret: Any = None, layer=None):
    """GQA attention with sinks and causal / sliding-window masks from positions (module docstring).

    Args:
      q: [B, T, H, D] queries (bf16 / f32). k, v: [B, S, KV, D] keys / values (a KV cache or the new tokens).
      q_pos: int32 [B, T] query positions. k_pos: int32 [B, S] key positions, -1 = invisible.
      sinks: [H] per-head sink logits. window: sliding window in tokens, None = full causal.
      implementation: None (auto: per lowering platform from ``registry.AUTO_ORDER["attention"]``, the
        ``GPTOSS_KERNELS`` override if set; a bare call with several devices keeps "xla"), "auto" (the same without
        the several-devices rule: one device's part under shard_map), "xla", "gpu" or "tpu".
      tiling: kernel tiles (gpu: block_rows, block_k, num_warps, num_stages, splits; tpu: block_rows, block_k).
      interpret: for an explicit "gpu"/"tpu" off their hardware; None = interpret when the backend does not match.
      layer: None, or an int32 scalar (may be traced): k, v are then [L, B, S, KV, D] and k_pos [L, B, S], a KV
        cache stacked over layers, and layer `layer` of them is attended to — read in place by the GPU kernel (the
        model's scan passes its whole cache), sliced by the other implementations.
    Returns: [B, T, H, D] in q.dtype.
    Raises: ValueError naming the argument for inconsistent shapes or an unknown implementation.
    """
    from .ops import _env_override

    if layer is not None:
        if k.ndim != 5 or k_pos.ndim != 3:
            raise ValueError(f"attention: with layer=, k, v must be [L,B,S,KV,D] and k_pos [L,B,S]; got k {k.shape}, "
                             f"k_pos {k_pos.shape}")
        _check(q, k[0], v[0], q_pos, k_pos[0], sinks, window)
    else:
        _check(q, k, v, q_pos, k_pos, sinks, window)
    window = None if window is None else int(window)
    q_pos = q_pos.astype(jnp.int32)
    k_pos = k_pos.astype(jnp.int32)
    impl = implementation
    if impl is None and jax.device_count() > 1:
        # pallas_call is not auto-partitioned: on a mesh XLA would have to gather q / k / v / the cache for it. The
        # model calls attention per device under shard_map (gptoss_jax.moe_parallel.attention_forward) with
        # implementation=per_device_implementation(); a bare call with several devices keeps xla.
        impl = "xla"
    if impl in (None, "auto"):
        impl = _env_override()
        if impl is None:
            return _auto(q, k, v, q_pos, k_pos, sinks, window, tiling, layer)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention: implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    return _run(impl, q, k, v, q_pos, k_pos, sinks, window, tiling, interpret, layer)


flash_attention = attention


def decode_attention(q, k, v, q_pos, k_pos, sinks, window: int | None = None, **kwargs):
    """One query token per row over a KV cache: q [B, H, D] or [B, 1, H, D], q_pos [B] or [B, 1], k, v [B, S, KV, D]
    (full-attention slots or a sliding-window ring buffer), k_pos [B, S] (-1 = empty slot) → [B, H, D] or
    [B, 1, H, D]. Only key blocks that hold a visible slot are read (see :func:`attention`, which this calls)."""
    squeeze = q.ndim == 3
    if squeeze:
        q = q[:, None]
    q_pos = jnp.asarray(q_pos).reshape(q.shape[0], 1)
    out = attention(q, k, v, q_pos, k_pos, sinks, window, **kwargs)
    return out[:, 0] if squeeze else out
