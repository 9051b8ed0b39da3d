"""The one-launch decode attention kernel (RoPE + KV-cache write + attention with sinks), in Pallas' interpreter on
CPU, against a float64 numpy reference, and the op that binds it (``gptoss_jax.kernels.decode_attention_update``)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_jax.kernels import _gpu_decode_attention as gda
from gptoss_jax.kernels import decode_attention_update
from gptoss_jax.kernels.reference import decode_attention_update_f64
from gptoss_jax.kernels.registry import UnsupportedCallError

pytestmark = pytest.mark.skipif(not gda.AVAILABLE, reason="Pallas Triton backend missing")


def _problem(seed, *, b=3, h=16, kv=2, d=64, s=48, nb=3, window=None, dtype=jnp.bfloat16, cache_dtype=None,
             invalid_rows=(1,), fill="ring"):
    """Random q/k/v, cos/sin and a stacked cache whose slots hold positions consistent with the ring (slot =
    position mod S) below each row's new position; some rows' caches partly empty, one row stale (a longer earlier
    request) when fill == "stale"."""
    rng = np.random.default_rng(seed)
    cache_dtype = dtype if cache_dtype is None else cache_dtype
    q = jnp.asarray(rng.normal(size=(b, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, kv, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, kv, d)), dtype)
    positions = rng.integers(0, 3 * s, size=b).astype(np.int32)
    positions[0] = min(positions[0], s - 1)  # one row whose ring has not wrapped
    ang = positions[:, None] * (1.0 / 10000 ** (np.arange(d // 2) / (d // 2)))
    cos, sin = (np.cos(ang) * 1.1).astype(np.float32), (np.sin(ang) * 1.1).astype(np.float32)
    kc = jnp.asarray(rng.normal(size=(nb, b, s, kv, d)), cache_dtype)
    vc = jnp.asarray(rng.normal(size=(nb, b, s, kv, d)), cache_dtype)
    pc = np.full((nb, b, s), -1, np.int32)
    for blk in range(nb):
        for r in range(b):
            p = int(positions[r])
            for slot in range(s):
                newest = p - 1 - ((p - 1 - slot) % s)  # newest position < p landing in slot
                if newest >= 0 and rng.random() > 0.1:
                    pc[blk, r, slot] = newest
            if fill == "stale" and r == 0:
                pc[blk, r, p % s:] = np.arange(p % s, s) + s  # positions of a longer earlier request: invisible
    valid = np.ones(b, bool)
    valid[list(i for i in invalid_rows if i < b)] = False
    return dict(q=q, k=k, v=v, cos=jnp.asarray(cos), sin=jnp.asarray(sin), positions=jnp.asarray(positions),
                valid=jnp.asarray(valid), k_cache=kc, v_cache=vc, pos_cache=jnp.asarray(pc))


def _check(pr, window, *, block=1, sink_layer=None, splits=None, block_k=None, seed=0):
    rng = np.random.default_rng(seed + 99)
    h = pr["q"].shape[1]
    sinks = jnp.asarray(rng.normal(size=(h,) if sink_layer is None else (4, h)), jnp.float32)
    out, kc, vc, pc = gda.decode_attention_update_gpu(
        pr["q"], pr["k"], pr["v"], pr["cos"], pr["sin"], pr["positions"], pr["valid"], pr["k_cache"], pr["v_cache"],
        pr["pos_cache"], sinks, window, block=jnp.int32(block), sink_layer=sink_layer, splits=splits,
        block_k=block_k, interpret=True)
    chex.assert_shape(out, pr["q"].shape)
    chex.assert_type(out, pr["q"].dtype)
    chex.assert_trees_all_equal_shapes_and_dtypes((kc, vc, pc), (pr["k_cache"], pr["v_cache"], pr["pos_cache"]))
    names = ("q", "k", "v", "cos", "sin", "positions", "valid", "k_cache", "v_cache", "pos_cache")
    ref, rkc, rvc, rpc = decode_attention_update_f64(*(pr[n] for n in names), sinks, window, block, sink_layer,
                                                     compute_dtype=pr["q"].dtype, cache_dtype=pr["k_cache"].dtype)
    got = np.asarray(out.astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(got))
    tol = 2e-5 if pr["q"].dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got, ref, atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(pc), rpc)
    ctol = 1e-6 if pr["k_cache"].dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(kc.astype(jnp.float32)), rkc, atol=ctol, rtol=ctol)
    np.testing.assert_array_equal(np.asarray(vc.astype(jnp.float32)), rvc)
    return out


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_matches_float64(window, dtype):
    _check(_problem(0, dtype=dtype, window=window), window)


@pytest.mark.parametrize("splits", [2, 3])
def test_kernel_split_keys_match_float64(splits):
    # several programs per (row, KV head): float32 partials merged by XLA
    _check(_problem(1, s=64), None, splits=splits, block_k=16)


def test_kernel_slots_not_a_multiple_of_the_key_block():
    _check(_problem(2, s=40), 16, block_k=16)


def test_kernel_stacked_sinks_gqa_wide_group_and_stale_slots():
    # G = 16 query heads per KV head (a whole 16-row tile), sinks stacked over layers and read in place, a row whose
    # slots past its position hold a longer earlier request's keys (invisible by position)
    _check(_problem(3, h=32, kv=2, fill="stale", b=2), None, sink_layer=3)


def test_kernel_small_group_and_cache_in_float32():
    # G = 2 (rows padded to 16 in the tile), a float32 cache under bf16 activations
    _check(_problem(4, h=4, kv=2, cache_dtype=jnp.float32, invalid_rows=()), 8)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), s=st.sampled_from([16, 24, 32, 64]), window=st.sampled_from([None, 8, 40]),
       b=st.integers(1, 3), splits=st.sampled_from([None, 2]))
def test_kernel_property(seed, s, window, b, splits):
    _check(_problem(seed, s=s, b=b, nb=2, h=8, kv=2, invalid_rows=(seed % 3,)), window, block=seed % 2,
           splits=splits, block_k=16, seed=seed)


def test_op_auto_on_cpu_is_the_reference_and_gpu_interpret_agrees():
    pr = _problem(5)
    sinks = jnp.asarray(np.random.default_rng(5).normal(size=(16,)), jnp.float32)
    args = [pr[n] for n in ("q", "k", "v", "cos", "sin", "positions", "valid", "k_cache", "v_cache", "pos_cache")]
    auto = decode_attention_update(*args, sinks, 16, block=jnp.int32(2))
    base = gda.reference_decode_attention_update(*args, sinks, 16, block=jnp.int32(2))
    for a, r in zip(jax.tree.leaves(auto), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
    gpu = decode_attention_update(*args, sinks, 16, block=jnp.int32(2), implementation="gpu", interpret=True)
    np.testing.assert_allclose(np.asarray(gpu[0].astype(jnp.float32)), np.asarray(base[0].astype(jnp.float32)),
                               atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(np.asarray(gpu[3]), np.asarray(base[3]))


def test_op_rejects_bad_shapes_with_one_line_errors():
    pr = _problem(6)
    args = [pr[n] for n in ("q", "k", "v", "cos", "sin", "positions", "valid", "k_cache", "v_cache", "pos_cache")]
    sinks = jnp.zeros((16,), jnp.float32)
    bad = list(args)
    bad[1] = pr["k"][:, :1]
    with pytest.raises(ValueError, match="k, v"):
        decode_attention_update(*bad, sinks, None, block=0)
    with pytest.raises(ValueError, match="sinks"):
        decode_attention_update(*args, sinks[:3], None, block=0)
    q = jnp.zeros((3, 16, 24), jnp.bfloat16)  # head_dim 24: D/2 = 12 is no power of two
    kv = jnp.zeros((3, 2, 24), jnp.bfloat16)
    kc = jnp.zeros((2, 3, 16, 2, 24), jnp.bfloat16)
    with pytest.raises(UnsupportedCallError, match="head_dim"):
        decode_attention_update(q, kv, kv, pr["cos"][:, :12], pr["sin"][:, :12], pr["positions"], pr["valid"], kc,
                                kc, pr["pos_cache"][:2, :, :16], sinks, None, block=0, implementation="gpu")


def test_kernel_lowers_to_one_triton_call_for_cuda():
    from jax import export

    pr = _problem(7, b=2, h=64, kv=8, s=256)
    sinks = jnp.zeros((64,), jnp.float32)

    def f(q, k, v, cos, sin, positions, valid, kc, vc, pc):
        return gda.decode_attention_update_gpu(q, k, v, cos, sin, positions, valid, kc, vc, pc, sinks, 128,
                                               block=jnp.int32(1))

    args = [pr[n] for n in ("q", "k", "v", "cos", "sin", "positions", "valid", "k_cache", "v_cache", "pos_cache")]
    exp = export.export(jax.jit(f), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    text = exp.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "decode_attention_update" in text
    assert "stablehlo.scatter" not in text and "dynamic_update_slice" not in text
