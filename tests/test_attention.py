"""gptoss_jax.kernels.attention: every implementation against a float64 numpy reference (and the jnp reference).

fp32: max |y - ref| / max |ref| ≤ 1e-5. bf16: within 2× the jnp reference's own bf16 error (+1e-3). The GPU
(Triton) and TPU (Mosaic) kernels run in Pallas interpret mode on CPU with small tiles so several key blocks,
row blocks and splits are exercised; shapes stay small because the interpreter is slow.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_jax.kernels import attention as A
from gptoss_jax.kernels.reference import attention_f64, max_rel_err

SMALL_GPU = dict(block_rows=16, block_k=16)
SMALL_TPU = dict(block_rows=16, block_k=128)


def _inputs(rng, b, t, s, h, kv, d, dtype=jnp.float32, sink_scale=1.0):
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, s, kv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, s, kv, d)), dtype)
    sinks = jnp.asarray(sink_scale * rng.standard_normal(h), jnp.float32)
    return q, k, v, sinks


def _prefill_positions(b, t, lengths, start=0):
    """Self-attention over T new tokens at start..start+T-1, right padding past lengths[b] (k_pos -1)."""
    pos = np.tile(np.arange(start, start + t, dtype=np.int32)[None], (b, 1))
    kpos = np.where(np.arange(t)[None] < np.asarray(lengths)[:, None], pos, -1).astype(np.int32)
    return jnp.asarray(pos), jnp.asarray(kpos)


def _run(impl, q, k, v, qp, kp, sinks, window):
    if impl == "xla":
        return A.attention(q, k, v, qp, kp, sinks, window, implementation="xla")
    if impl == "chunked":
        return A.attention_chunked(q, k, v, qp, kp, sinks, window, q_chunk=8, k_chunk=16)
    if impl == "gpu":
        return A.attention(q, k, v, qp, kp, sinks, window, implementation="gpu", interpret=True, tiling=SMALL_GPU)
    return A.attention(q, k, v, qp, kp, sinks, window, implementation="tpu", interpret=True, tiling=SMALL_TPU)


def _check(y, q, ref, tol):
    chex.assert_shape(y, q.shape)
    chex.assert_type(y, q.dtype)
    err = max_rel_err(y, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"
    return err


# -------------------------------------------------------------------------------------------- prefill, float32
CASES = [  # (H, KV, window, sink scale): GQA groups 8 / 2 / 1, windows shorter and longer than T, sinks ±5 and small
    (8, 1, None, 5.0),
    (4, 2, 7, 0.1),
    (2, 2, 64, 5.0),
]


@pytest.mark.parametrize("impl", ["xla", "chunked", "gpu", "tpu"])
@pytest.mark.parametrize("h,kv,window,sink_scale", CASES)
def test_prefill_fp32_matches_float64(impl, h, kv, window, sink_scale, rng):
    b, t, d = 2, 40, 16
    q, k, v, sinks = _inputs(rng, b, t, t, h, kv, d, sink_scale=sink_scale)
    qp, kp = _prefill_positions(b, t, lengths=[t, 23])  # row 1: 17 padding keys
    ref = attention_f64(q, k, v, qp, kp, sinks, window)
    _check(_run(impl, q, k, v, qp, kp, sinks, window), q, ref, 1e-5)


@pytest.mark.parametrize("impl", ["chunked", "gpu", "tpu"])
def test_kernels_match_jnp_reference_with_cache_and_large_sinks(impl, rng):
    """Chunked prefill shape: T new tokens at positions 30.. attend to a 30-token cache + themselves; sinks ±5 by
    sign so some rows are dominated by the sink."""
    b, t, h, kv, d, window = 2, 12, 4, 2, 16, 9
    q, k, v, _ = _inputs(rng, b, t, 30 + t, h, kv, d)
    sinks = jnp.asarray([5.0, -5.0, 5.0, -5.0], jnp.float32)
    qp = jnp.tile(jnp.arange(30, 30 + t, dtype=jnp.int32)[None], (b, 1))
    kp = jnp.tile(jnp.arange(30 + t, dtype=jnp.int32)[None], (b, 1)).at[1, 35:].set(-1).at[1, 30:].set(
        jnp.where(jnp.arange(t) < 5, jnp.arange(30, 30 + t), -1))
    want = A.attention_reference(q, k, v, qp, kp, sinks, window)
    ref = attention_f64(q, k, v, qp, kp, sinks, window)
    y = _run(impl, q, k, v, qp, kp, sinks, window)
    assert max_rel_err(want, ref) <= 1e-5
    _check(y, q, ref, 1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-5, rtol=0)


def test_query_that_sees_nothing_returns_zero(rng):
    """A query whose keys are all invisible attends only to its sink: output exactly 0, never NaN."""
    q, k, v, sinks = _inputs(rng, 1, 4, 4, 2, 1, 16)
    qp = jnp.arange(4, dtype=jnp.int32)[None]
    kp = jnp.full((1, 4), -1, jnp.int32)
    for impl in ("xla", "chunked", "gpu", "tpu"):
        y = np.asarray(_run(impl, q, k, v, qp, kp, sinks, None))
        assert np.all(y == 0), impl


# ----------------------------------------------------------------------------------------------- prefill, bf16
@pytest.mark.parametrize("impl", ["chunked", "gpu", "tpu"])
def test_prefill_bf16_within_reference_bf16_error(impl, rng):
    b, t, h, kv, d, window = 2, 40, 8, 2, 16, 11
    q, k, v, sinks = _inputs(rng, b, t, t, h, kv, d, dtype=jnp.bfloat16, sink_scale=2.0)
    qp, kp = _prefill_positions(b, t, lengths=[t, 31])
    ref = attention_f64(q, k, v, qp, kp, sinks, window)
    ref_err = max_rel_err(A.attention_reference(q, k, v, qp, kp, sinks, window), ref)
    assert 0 < ref_err < 2e-2
    _check(_run(impl, q, k, v, qp, kp, sinks, window), q, ref, 2 * ref_err + 1e-3)


# ----------------------------------------------------------------------------------------------------- decode
def _ring_cache(rng, b, slots, kv, d, last_pos, dtype=jnp.float32):
    """A sliding-window ring buffer of `slots` slots after writing positions 0..last_pos[b] (slot = pos % slots):
    wrapped when last_pos >= slots, partly empty (-1) otherwise."""
    k = jnp.asarray(rng.standard_normal((b, slots, kv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, slots, kv, d)), dtype)
    kp = np.full((b, slots), -1, np.int32)
    for bi, last in enumerate(last_pos):
        for p in range(max(0, last - slots + 1), last + 1):
            kp[bi, p % slots] = p
    return k, v, jnp.asarray(kp)


@pytest.mark.parametrize("impl", ["xla", "gpu", "tpu"])
@pytest.mark.parametrize("h,kv", [(8, 1), (4, 2), (2, 2)])
def test_decode_over_wrapped_ring_buffer(impl, h, kv, rng):
    b, d, window = 3, 16, 24
    k, v, kp = _ring_cache(rng, b, window, kv, d, last_pos=[50, 23, 7])  # wrapped twice / exactly full / partly
    q = jnp.asarray(rng.standard_normal((b, h, d)), jnp.float32)
    sinks = jnp.asarray(5 * rng.standard_normal(h), jnp.float32)
    qp = jnp.asarray([50, 23, 7], jnp.int32)
    ref = attention_f64(q[:, None], k, v, qp[:, None], kp, sinks, window)[:, 0]
    kw = {} if impl == "xla" else dict(interpret=True, tiling=dict(block_k=16) if impl == "gpu" else None)
    y = A.decode_attention(q, k, v, qp, kp, sinks, window, implementation=impl, **kw)
    _check(y, q, ref, 1e-5)


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_decode_reads_only_filled_slots(impl, rng):
    """A full-attention cache of 512 slots with 40 / 150 filled: key blocks past the fill hold NaN, so the result is
    finite only if those blocks are never read; it must equal the reference on the filled part. bf16 inputs."""
    b, s, h, kv, d = 2, 512, 8, 2, 16
    filled = [40, 150]
    q, k, v, sinks = _inputs(rng, b, 1, s, h, kv, d, dtype=jnp.bfloat16, sink_scale=3.0)
    kp = np.full((b, s), -1, np.int32)
    for bi, n in enumerate(filled):
        kp[bi, :n] = np.arange(n)
    kp = jnp.asarray(kp)
    qp = jnp.asarray([[f - 1] for f in filled], jnp.int32)
    ref = attention_f64(q, k, v, qp, kp, sinks, None)
    ref_err = max_rel_err(A.attention_reference(q, k, v, qp, kp, sinks, None), ref)
    block = 128
    nan_from = jnp.asarray([-(-n // block) * block for n in filled])[:, None, None, None]
    poison = jnp.arange(s)[None, :, None, None] >= nan_from
    k_nan, v_nan = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    y = A.attention(q, k_nan, v_nan, qp, kp, sinks, None, implementation=impl, interpret=True,
                    tiling=dict(block_k=block))
    _check(y, q, ref, 2 * ref_err + 1e-3)


def test_xla_decode_reads_only_filled_chunks(rng):
    """The xla path over a 16,384-slot cache with 300 / 5000 filled: chunks past the fill hold NaN (so they must not
    be read); the result equals the float64 reference on the filled part."""
    b, s, h, kv, d = 2, 16384, 4, 2, 16
    filled = [300, 5000]
    q, k, v, sinks = _inputs(rng, b, 1, s, h, kv, d, sink_scale=3.0)
    kp = jnp.asarray(np.where(np.arange(s)[None] < np.asarray(filled)[:, None], np.arange(s)[None], -1), jnp.int32)
    qp = jnp.asarray([[f - 1] for f in filled], jnp.int32)
    ref = attention_f64(q, k, v, qp, kp, sinks, None)
    poison = jnp.arange(s)[None, :, None, None] >= 2 * A.XLA_DECODE_K_CHUNK  # beyond every row's filled chunks
    y = A.attention(q, jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v), qp, kp, sinks, None,
                    implementation="xla")
    _check(y, q, ref, 1e-5)


def test_model_decode_path_matches_reference_over_real_cache(rng):
    """The model's KV cache (gptoss_jax.kv_cache) after a prefill + a decode write: sliding-layer ring buffer that
    wrapped and a full-layer cache, through decode_attention on every implementation."""
    from gptoss_jax.kv_cache import LayerCache, update_layer_cache

    b, kv, d, h, window, slots_full = 2, 2, 16, 4, 8, 64
    t = 21
    kk = jnp.asarray(rng.standard_normal((b, t, kv, d)), jnp.float32)
    vv = jnp.asarray(rng.standard_normal((b, t, kv, d)), jnp.float32)
    pos = jnp.tile(jnp.arange(t, dtype=jnp.int32)[None], (b, 1))
    valid = jnp.arange(t)[None] < jnp.asarray([[t], [13]])
    sinks = jnp.asarray(rng.standard_normal(h), jnp.float32)
    for slots, window_ in ((window, window), (slots_full, None)):
        cache = LayerCache(jnp.zeros((b, slots, kv, d)), jnp.zeros((b, slots, kv, d)),
                           jnp.full((b, slots), -1, jnp.int32))
        cache = update_layer_cache(cache, kk, vv, pos, valid)
        qpos = jnp.asarray([t - 1, 12], jnp.int32)
        q = jnp.asarray(rng.standard_normal((b, h, d)), jnp.float32)
        ref = attention_f64(q[:, None], cache.k, cache.v, qpos[:, None], cache.pos, sinks, window_)[:, 0]
        for impl in ("xla", "gpu", "tpu"):
            kw = {} if impl == "xla" else dict(interpret=True)
            y = A.decode_attention(q, cache.k, cache.v, qpos, cache.pos, sinks, window_, implementation=impl, **kw)
            _check(y, q, ref, 1e-5)


# ---------------------------------------------------------------------------------------------- block ranges
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_key_block_ranges_cover_every_visible_key(data):
    """Property: for random positions (sorted or ring-like, with holes), every visible (query, key) pair lies in a
    key block inside its query block's [lo, hi) range, and lo = hi when the block sees nothing."""
    qb, kb = data.draw(st.sampled_from([1, 4, 8])), data.draw(st.sampled_from([4, 8]))
    nq, nk = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    window = data.draw(st.one_of(st.none(), st.integers(1, 20)))
    start = data.draw(st.integers(0, 30))
    q_pos = np.arange(start, start + nq * qb, dtype=np.int32)[None]
    k_list = data.draw(st.lists(st.integers(-1, 60), min_size=nk * kb, max_size=nk * kb))
    k_pos = np.asarray(k_list, np.int32)[None]
    lo, hi = (np.asarray(a)[0] for a in A.key_block_ranges(jnp.asarray(q_pos), jnp.asarray(k_pos), window, qb, kb))
    vis = np.asarray(A.visible_mask(jnp.asarray(q_pos), jnp.asarray(k_pos), window))[0]  # [T, S]
    for i in range(nq):
        blocks = np.nonzero(vis[i * qb:(i + 1) * qb].reshape(qb, nk, kb).any(axis=(0, 2)))[0]
        assert lo[i] <= hi[i]
        if blocks.size:
            assert lo[i] <= blocks.min() and blocks.max() < hi[i]


def test_causal_prefill_skips_the_upper_triangle_and_outside_the_window():
    t, qb, kb = 256, 32, 32
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    lo, hi = A.key_block_ranges(pos, pos, None, qb, kb)
    np.testing.assert_array_equal(np.asarray(lo)[0], 0)
    np.testing.assert_array_equal(np.asarray(hi)[0], np.arange(1, t // qb + 1))
    lo, hi = A.key_block_ranges(pos, pos, 32, qb, kb)
    assert np.all(np.asarray(hi - lo) <= 2)  # a 32-token window touches at most 2 key blocks of 32


# --------------------------------------------------------------------------------------------- memory / errors
def test_xla_long_prompt_memory_is_linear():
    """16k tokens on CPU: the xla path's compiled temporaries stay far below one [T, S] float32 score matrix
    (1 GiB per head) — the chunked loop holds one [q_chunk, k_chunk] block per head."""
    t, h, kv, d = 16384, 4, 1, 16
    q = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
    k = jax.ShapeDtypeStruct((1, t, kv, d), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, t), jnp.int32)
    sinks = jax.ShapeDtypeStruct((h,), jnp.float32)
    fn = jax.jit(lambda *a: A.attention(*a, 128, implementation="xla"))
    mem = fn.lower(q, k, k, pos, pos, sinks).compile().memory_analysis()
    if mem is None:
        pytest.skip("no memory analysis on this backend")
    assert mem.temp_size_in_bytes < 256 * 2**20, mem.temp_size_in_bytes


def test_bad_arguments_raise_one_line_errors(rng):
    q, k, v, sinks = _inputs(rng, 1, 4, 4, 4, 2, 16)
    pos = jnp.arange(4, dtype=jnp.int32)[None]
    with pytest.raises(ValueError, match="sinks"):
        A.attention(q, k, v, pos, pos, sinks[:3], None)
    with pytest.raises(ValueError, match="implementation"):
        A.attention(q, k, v, pos, pos, sinks, None, implementation="cuda")
    with pytest.raises(ValueError, match="KV heads"):
        A.attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), pos, pos, sinks, None)
    with pytest.raises(ValueError, match="k_pos"):
        A.attention(q, k, v, pos, pos[:, :3], sinks, None)
    with pytest.raises(ValueError, match="window"):
        A.attention(q, k, v, pos, pos, sinks, 0)


@pytest.mark.gpu
def test_gpu_kernel_compiled(rng):
    if jax.default_backend() not in ("gpu", "cuda"):
        pytest.skip("needs a GPU (set GPTOSS_TEST_GPU=1)")
    b, t, h, kv, d = 1, 300, 64, 8, 64
    q, k, v, sinks = _inputs(rng, b, t, t, h, kv, d, dtype=jnp.bfloat16)
    qp, kp = _prefill_positions(b, t, [t])
    ref = attention_f64(q, k, v, qp, kp, sinks, 128)
    ref_err = max_rel_err(A.attention_reference(q, k, v, qp, kp, sinks, 128), ref)
    _check(A.attention(q, k, v, qp, kp, sinks, 128, implementation="gpu"), q, ref, 2 * ref_err + 1e-3)


@pytest.mark.parametrize("impl", ["xla", "gpu", "tpu"])
@pytest.mark.parametrize("t", [1, 5])
def test_layer_stacked_cache_equals_its_slice(impl, t):
    """attention(..., layer=i) over a cache stacked over layers [L,B,S,KV,D] equals attention over layer i alone
    (the GPU kernel reads it in place); other layers hold different values, so reading the wrong one fails."""
    rng = np.random.default_rng(11)
    L, b, s, h, kv, d = 3, 2, 48, 4, 2, 16
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((L, b, s, kv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((L, b, s, kv, d)), jnp.float32)
    sinks = jnp.asarray(rng.standard_normal(h), jnp.float32)
    qp = jnp.asarray(np.array([[30 + i for i in range(t)], [40 + i for i in range(t)]], np.int32))
    kp = np.tile(np.arange(s, dtype=np.int32), (L, b, 1))
    kp[:, 0, 35:] = -1  # row 0: a shorter fill
    kp = jnp.asarray(kp)
    kw = {} if impl == "xla" else dict(interpret=True, tiling=SMALL_GPU if impl == "gpu" else SMALL_TPU)
    for layer in (0, 2):
        want = attention_f64(q, k[layer], v[layer], qp, kp[layer], sinks, 8 if t == 1 else None)
        y = jax.jit(lambda q, k, v, kp, li: A.attention(q, k, v, qp, kp, sinks, 8 if t == 1 else None,
                                                        implementation=impl, layer=li, **kw))(
            q, k, v, kp, jnp.int32(layer))
        _check(y, q, want, 1e-5)
