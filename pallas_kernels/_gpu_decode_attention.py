"""One decode step of gpt-oss attention on NVIDIA GPUs in one Pallas launch (Triton lowering): RoPE on the new
query and key, the KV-cache write, and flash-decoding attention with sinks over the cache.

Why one launch: at decode each of these is a few kilobytes of work, and as separate XLA kernels they cost ~1-2 µs of
launch and ramp each. The batch-1 step of gpt-oss-120b spent ≈ 9 kernels per layer around the attention kernel
(rope of q and of k as select/concatenate fusions, q padded to the kernel's 16-row tile, three dynamic-update-slices
for the cache's k, v and positions, the key-block range as a reduce + concatenate, the output slice): ≈ 0.4 ms of a
3.5 ms step (docs/BENCHMARKS.md). Here a program (row b, KV head h, split s) does all of it:

1. loads the G query heads of KV head h ([G, D], padded to a 16-row tile with masked loads: Triton's smallest dot)
   and the new key / value of KV head h, and applies the rotary embedding (rotate-half, float32, rounded to the
   activation dtype: ``gptoss_jax.rope.apply_rope``) to both — the two halves of D are loaded as two tiles, so the
   rotation needs no register shuffles and the scores are two dots of D/2;
2. starts the online softmax with the new key itself (split 0 of a valid row: the key the step writes), so the
   cache is read as it was before the write and the slot being written is masked out — no program waits on
   another's write;
3. loops over its share of the key blocks that may hold a visible key: blocks ``[0, p // block_k]`` while the
   query position ``p`` is below the slot count S (slot = position on full-attention layers; a ring buffer that has
   not wrapped), else all of them; masks inside a block come from the stored positions exactly as in
   :func:`gptoss_jax.kernels.attention.attention_reference` (0 ≤ k_pos ≤ p, k_pos > p − window);
4. normalizes with the sink (one split: ``out = acc / (l + exp(sink − m))`` after rescaling to ``max(m, sink)``) and
   stores the G rows of ``out [B, H, D]``; several splits (caches of more than one key block) store float32
   partials that one XLA expression merges;
5. split 0 of a valid row writes the roped key and the value into slot ``p mod S`` of the cache, and KV head 0 the
   position: the cache operands are aliased to the outputs (``input_output_aliases``), so the write is in place.

Semantics: those of ``gptoss_jax.kv_cache.update_stacked_cache`` (T = 1) followed by attention over the updated
cache (:func:`reference_decode_attention_update`, the base op the tests compare against). Invalid rows
(``valid = 0``: padding, finished requests) write nothing and attend to the cache as it is. Positions must be ≥ 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common
from ._gpu import AVAILABLE, pltriton

BLOCK_K = 128  # keys per loop step (as the flash decode kernel)
MIN_ROWS = 16  # Triton's smallest dot: the G query heads of a KV head are padded to this many rows
# Caches of more than one key block split the key range over up to TARGET_PROGRAMS programs (flash-decoding), at
# least MIN_BLOCKS_PER_SPLIT blocks each: one program walks its blocks serially at ~2 us per block (measured on an
# H200: 17 us per full-attention layer for 9 blocks unsplit, batch 1), while the split costs float32 partials and
# one XLA merge kernel (~1.5 us).
MIN_BLOCKS_PER_SPLIT = 1
TARGET_PROGRAMS = 1024
NUM_WARPS = 4
NUM_STAGES = 2
_NEG = -1e30  # finite "minus infinity" for running maxima
AUTO_MAX_ROWS = 4096  # auto mode (cuda) takes the kernel for decode batches up to this many rows
ENV_VAR = "GPTOSS_DECODE_ATTENTION_MAX_ROWS"  # overrides AUTO_MAX_ROWS at trace time ("0": never; A/B benches)


def auto_max_rows() -> int:
    """Rows up to which auto mode takes the kernel on cuda: ``GPTOSS_DECODE_ATTENTION_MAX_ROWS`` or AUTO_MAX_ROWS."""
    return _common.env_limit(ENV_VAR, AUTO_MAX_ROWS)


def why_not(h: int, kv: int, d: int) -> str | None:
    """None when the kernel runs H query heads, KV key/value heads of head_dim D, else the reason."""
    if not AVAILABLE:
        return "jax.experimental.pallas.triton is not available"
    if kv < 1 or h % kv:
        return f"{h} query heads are not a multiple of {kv} KV heads"
    if d % 2 or (d // 2) & (d // 2 - 1) or d // 2 < 16:
        return f"head_dim {d}: D/2 must be a power of two >= 16 (two dot tiles of D/2)"
    return None


def _splits(s: int, bn: int, b: int, kv: int, splits: int | None) -> int:
    nk = _common.cdiv(s, bn)
    if splits is not None:
        return max(1, min(int(splits), nk))
    return max(1, min(nk // MIN_BLOCKS_PER_SPLIT, _common.cdiv(TARGET_PROGRAMS, b * kv)))  # 1 for one block


def decode_attention_update_gpu(q, k, v, cos, sin, positions, valid, k_cache, v_cache, pos_cache, sinks,
                                window: int | None, *, block, sink_layer=None, splits: int | None = None,
                                block_k: int | None = None, interpret: bool = False):
    """RoPE + KV-cache write + attention for one new token per row (module docstring), one launch.

    q [B, H, D], k, v [B, KV, D]: the new token's projections before RoPE (any float dtype; q.dtype is the compute
    dtype). cos, sin [B, D/2] float32 (attention factor included: ``gptoss_jax.rope.rope_cos_sin``). positions int32
    [B] (≥ 0); valid bool/int [B]. k_cache, v_cache [NB, B, S, KV, D], pos_cache int32 [NB, B, S]: a KV cache
    stacked over blocks, of which block ``block`` (int32 scalar) is this layer's. sinks [H] or [L, H] with
    ``sink_layer``. window: sliding window (None: full causal). splits / block_k: override the launch shape.

    Returns (out [B, H, D] in q.dtype, k_cache, v_cache, pos_cache updated in place). Raises ValueError when
    :func:`why_not` gives a reason."""
    b, h, d = q.shape
    nb, _, s, kv, _ = k_cache.shape
    reason = why_not(h, kv, d)
    if reason is not None:
        raise ValueError(reason)
    g = h // kv
    half = d // 2
    bm = max(MIN_ROWS, _common.pow2_at_least(g))
    bn = min(block_k or BLOCK_K, max(16, _common.pow2_at_least(s)))
    nsplit = _splits(s, bn, b, kv, splits)
    qd = q.dtype
    cd = k_cache.dtype
    prec = jax.lax.Precision.HIGHEST if jnp.dtype(qd) == jnp.float32 else None
    scale = d ** -0.5
    f32 = jnp.float32
    sinks2 = sinks.astype(f32)[None] if sink_layer is None else sinks.astype(f32)
    sl = jnp.reshape(jnp.asarray(0 if sink_layer is None else sink_layer, jnp.int32), (1,))
    blk = jnp.reshape(jnp.asarray(block, jnp.int32), (1,))
    # Rows of the last KV head's tile past H are masked; the interpreter clamps out-of-range slices instead of
    # masking as Triton does, so there (and when H itself is below one tile) the operands are padded.
    pad_rows = interpret or h < bm
    s_full = s % bn == 0
    q_in, h_out = q, h
    if pad_rows:
        q_in = jnp.pad(q, ((0, 0), (0, bm), (0, 0)))
        sinks2 = jnp.pad(sinks2, ((0, 0), (0, bm)))
        h_out = h + bm
    kc, vc, pc = k_cache, v_cache, pos_cache.astype(jnp.int32)
    if interpret and not s_full:
        sp = _common.cdiv(s, bn) * bn - s
        kc = jnp.pad(kc, ((0, 0), (0, 0), (0, sp), (0, 0), (0, 0)))
        vc = jnp.pad(vc, ((0, 0), (0, 0), (0, sp), (0, 0), (0, 0)))
        pc = jnp.pad(pc, ((0, 0), (0, 0), (0, sp)), constant_values=-1)
    nk = _common.cdiv(s, bn)
    partial = nsplit > 1

    def kernel(blk_ref, sl_ref, pos_ref, ok_ref, cos_ref, sin_ref, q_ref, kn_ref, vn_ref, sink_ref,
               kc_ref, vc_ref, pc_ref, kc_out, vc_out, pc_out, *o_refs):
        bi, hh, sp_ = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        li, sli = blk_ref[0], sl_ref[0]
        p = pos_ref[bi]
        ok = ok_ref[bi] != 0
        slot = jax.lax.rem(p, s)  # positions are >= 0
        rows = jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
        rmask = rows < g
        cv = cos_ref[bi, :]  # [D/2]
        sv = sin_ref[bi, :]
        c, sn = cv[None, :], sv[None, :]
        r0 = hh * g
        q1 = pltriton.load(q_ref.at[bi, pl.ds(r0, bm), pl.ds(0, half)], mask=rmask[:, None], other=0).astype(f32)
        q2 = pltriton.load(q_ref.at[bi, pl.ds(r0, bm), pl.ds(half, half)], mask=rmask[:, None], other=0).astype(f32)
        # rotate-half RoPE in float32, rounded to the activation dtype (gptoss_jax.rope.apply_rope)
        r1 = (q1 * c - q2 * sn).astype(qd)
        r2 = (q2 * c + q1 * sn).astype(qd)
        k1 = kn_ref[bi, hh, pl.ds(0, half)].astype(f32)
        k2 = kn_ref[bi, hh, pl.ds(half, half)].astype(f32)
        kr1 = (k1 * cv - k2 * sv).astype(qd).astype(cd)  # [D/2]: as stored in the cache
        kr2 = (k2 * cv + k1 * sv).astype(qd).astype(cd)
        vn = vn_ref[bi, hh, :].astype(cd)  # [D]
        # The new key's own score (the query always sees its own position), from the values the cache will hold.
        s_new = (jnp.sum(r1.astype(f32) * kr1.astype(qd).astype(f32)[None, :], axis=1)
                 + jnp.sum(r2.astype(f32) * kr2.astype(qd).astype(f32)[None, :], axis=1)) * scale  # [bm]
        first = jnp.logical_and(sp_ == 0, ok)
        m0 = jnp.where(first, s_new, _NEG)
        l0 = jnp.where(first, jnp.ones((bm,), f32), jnp.zeros((bm,), f32))
        acc0 = jnp.where(first, jnp.broadcast_to(vn.astype(qd).astype(f32)[None, :], (bm, d)), jnp.zeros((bm, d), f32))

        hi = jnp.where(p < s, p // bn + 1, nk)
        per = (hi + nsplit - 1) // nsplit
        j0 = sp_ * per
        j1 = jnp.minimum(j0 + per, hi)

        def body(j, carry):
            m, l, acc = carry
            off = j * bn
            slots = off + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
            smask = None if (s_full or interpret) else slots < s
            kmask = None if smask is None else smask[:, None]

            def ld(ref, mask, other=0):
                return pltriton.load(ref) if mask is None else pltriton.load(ref, mask=mask, other=other)

            kt1 = ld(kc_ref.at[li, bi, pl.ds(off, bn), hh, pl.ds(0, half)], kmask).astype(qd)
            kt2 = ld(kc_ref.at[li, bi, pl.ds(off, bn), hh, pl.ds(half, half)], kmask).astype(qd)
            vt = ld(vc_ref.at[li, bi, pl.ds(off, bn), hh, :], kmask).astype(qd)
            kp = ld(pc_ref.at[li, bi, pl.ds(off, bn)], smask, -1)
            dims = (((1,), (1,)), ((), ()))
            sc = (jax.lax.dot_general(r1, kt1, dims, precision=prec, preferred_element_type=f32)
                  + jax.lax.dot_general(r2, kt2, dims, precision=prec, preferred_element_type=f32)) * scale
            vis = (kp >= 0) & (kp <= p) & jnp.logical_not(jnp.logical_and(ok, slots == slot))
            if window is not None:
                vis &= kp > p - window
            if not s_full:
                vis &= slots < s
            sc = jnp.where(vis[None, :], sc, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(sc, axis=1))
            pr = jnp.exp(sc - m_new[:, None])
            alpha = jnp.exp(m - m_new)
            l = l * alpha + jnp.sum(pr, axis=1)
            acc = acc * alpha[:, None] + jnp.dot(pr.astype(qd), vt, precision=prec, preferred_element_type=f32)
            return m_new, l, acc

        m, l, acc = jax.lax.fori_loop(j0, j1, body, (m0, l0, acc0))
        if partial:
            o_ref, m_ref, l_ref = o_refs
            o_ref[bi, hh, sp_, :, :] = acc
            m_ref[bi, hh, sp_, :] = m
            l_ref[bi, hh, sp_, :] = l
        else:
            (o_ref,) = o_refs
            sk = pltriton.load(sink_ref.at[sli, pl.ds(r0, bm)], mask=rmask, other=0)
            top = jnp.maximum(m, sk)
            a = jnp.exp(m - top)
            den = l * a + jnp.exp(sk - top)
            pltriton.store(o_ref.at[bi, pl.ds(r0, bm), :], (acc * (a / den)[:, None]).astype(o_ref.dtype),
                           mask=rmask[:, None])

        # The cache write (after this program's reads; other programs mask this slot out, so order does not matter)
        @pl.when(first)
        def _write():
            kc_out[li, bi, slot, hh, pl.ds(0, half)] = kr1
            kc_out[li, bi, slot, hh, pl.ds(half, half)] = kr2
            vc_out[li, bi, slot, hh, :] = vn

        @pl.when(jnp.logical_and(first, hh == 0))
        def _write_pos():
            pltriton.store(pc_out.at[li, bi, pl.ds(slot, 1)], jnp.full((1,), p, jnp.int32))

    cache_shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (kc, vc, pc)]
    if partial:
        o_shapes = [jax.ShapeDtypeStruct((b, kv, nsplit, bm, d), f32), jax.ShapeDtypeStruct((b, kv, nsplit, bm), f32),
                    jax.ShapeDtypeStruct((b, kv, nsplit, bm), f32)]
    else:
        o_shapes = [jax.ShapeDtypeStruct((b, h_out, d), qd)]
    args = [blk, sl, positions.astype(jnp.int32).reshape(b), valid.astype(jnp.int32).reshape(b),
            cos.astype(f32).reshape(b, half), sin.astype(f32).reshape(b, half), q_in, k, v, sinks2, kc, vc, pc]
    kwargs = {}
    if not interpret:
        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    res = pl.pallas_call(kernel, out_shape=tuple(cache_shapes + o_shapes), grid=(b, kv, nsplit),
                         input_output_aliases={10: 0, 11: 1, 12: 2}, interpret=interpret,
                         name="decode_attention_update", **kwargs)(*args)
    kc, vc, pc = res[:3]
    if interpret and not s_full:
        kc, vc, pc = kc[:, :, :s], vc[:, :, :s], pc[:, :, :s]
    if partial:
        acc, m, l = res[3:]
        sk = jnp.pad(jax.lax.dynamic_index_in_dim(sinks2, sl[0], 0, keepdims=False)[:h].reshape(kv, g),
                     ((0, 0), (0, bm - g)))
        top = jnp.maximum(jnp.max(m, axis=2), sk[None])  # [B, KV, bm]
        a = jnp.exp(m - top[:, :, None])
        num = jnp.sum(acc * a[..., None], axis=2)
        den = jnp.sum(l * a, axis=2) + jnp.exp(sk[None] - top)
        out = (num / den[..., None])[:, :, :g].reshape(b, h, d).astype(qd)
    else:
        out = res[3][:, :h] if pad_rows else res[3]
    return out, kc, vc, pc.astype(pos_cache.dtype)


def reference_decode_attention_update(q, k, v, cos, sin, positions, valid, k_cache, v_cache, pos_cache, sinks,
                                      window: int | None, *, block, sink_layer=None, attention_fn=None):
    """The base op (same arguments and result as :func:`decode_attention_update_gpu`): RoPE on q and k
    (``gptoss_jax.rope.apply_rope``), the decode write of ``gptoss_jax.kv_cache.update_stacked_cache`` (T = 1; an
    invalid row writes out of bounds: dropped), then attention over the updated cache block (``attention_fn``:
    :func:`gptoss_jax.kernels.attention.attention` by default, any implementation)."""
    from .attention import attention  # noqa: PLC0415

    attention_fn = attention if attention_fn is None else attention_fn
    b, h, d = q.shape
    half = d // 2

    def rope(x):
        x32 = x.astype(jnp.float32)
        c, s_ = cos.astype(jnp.float32)[:, None, :], sin.astype(jnp.float32)[:, None, :]
        x1, x2 = x32[..., :half], x32[..., half:]
        return jnp.concatenate([x1 * c - x2 * s_, x2 * c + x1 * s_], axis=-1).astype(x.dtype)

    qr, kr = rope(q), rope(k)
    slots = k_cache.shape[2]
    pos = positions.astype(jnp.int32).reshape(b)
    slot = jnp.where(valid.reshape(b).astype(bool), pos % slots, slots)
    rows = jnp.arange(b)
    k_cache = k_cache.at[block, rows, slot].set(kr.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[block, rows, slot].set(v.astype(v_cache.dtype), mode="drop")
    pos_cache = pos_cache.at[block, rows, slot].set(pos.astype(pos_cache.dtype), mode="drop")
    sk = sinks if sink_layer is None else sinks[sink_layer]
    out = attention_fn(qr[:, None], k_cache, v_cache, pos[:, None], pos_cache, sk, window, layer=block)
    return out[:, 0], k_cache, v_cache, pos_cache
