"""The decode router kernels (gptoss_jax.kernels._gpu_router) and their op (router_top_k): ids, order and softmax
weights against the float64 reference, in Pallas' interpreter on CPU (the kernel bodies Triton compiles on the
GPU; bench/bench_router.py repeats the check compiled on an H200), and the lowering for cuda."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_jax.kernels import UnsupportedCallError, router_top_k
from gptoss_jax.kernels import _gpu_router
from gptoss_jax.kernels.reference import router_top_k_f64


def _f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _check(x, w, b, k, ids, wts, tol):
    ref_ids, ref_w, logits = router_top_k_f64(_f64(x), _f64(w), _f64(b), k)
    ids, wts = np.asarray(ids), np.asarray(wts)
    assert ids.shape == ref_ids.shape and ids.dtype == np.int32 and wts.dtype == np.float32
    assert np.all(np.isfinite(wts))
    # near-ties (within float32 summation noise) may order either way; everything else must match exactly
    srt = np.sort(logits, axis=-1)[:, ::-1]
    gaps = np.min(np.abs(np.diff(srt[:, :k + 1], axis=-1)), axis=-1)
    clear = gaps > 1e-4 * np.max(np.abs(logits))
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(ids[clear], ref_ids[clear])
    assert np.max(np.abs(wts[clear] - ref_w[clear])) <= tol
    np.testing.assert_allclose(wts.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("dtype,h,e,k", [
    (jnp.float32, 256, 32, 4),  # whole K chunks, E a power of two (the gpt-oss-20b shape, narrower)
    (jnp.bfloat16, 200, 20, 3),  # a partial K chunk, E and k not powers of two: masked columns and slots
    (jnp.float32, 96, 8, 8),  # k = E
])
def test_router_kernels_match_float64(dtype, h, e, k):
    rng = np.random.default_rng(h + e)
    x = jnp.asarray(rng.standard_normal((5, h)), dtype)
    w = jnp.asarray(rng.standard_normal((h, e)) * 0.2, dtype)
    b = jnp.asarray(rng.standard_normal((e,)) * 0.5, dtype)
    ids, wts = router_top_k(x, w, b, k, implementation="gpu", interpret=True)
    _check(x, w, b, k, ids, wts, 1e-6)
    xi, xw = router_top_k(x, w, b, k, implementation="xla")  # the base op agrees
    _check(x, w, b, k, xi, xw, 1e-6)


def test_router_kernels_read_stacked_layers_in_place():
    rng = np.random.default_rng(7)
    layers, h, e, k = 3, 128, 16, 4
    x = jnp.asarray(rng.standard_normal((2, h)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((layers, h, e)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((layers, e)), jnp.float32)
    f = jax.jit(lambda x_, w_, b_, l_: router_top_k(x_, w_, b_, k, layer=l_, implementation="gpu", interpret=True))
    for layer in (0, 2):
        ids, wts = f(x, w, b, jnp.int32(layer))
        _check(x, w[layer], b[layer], k, ids, wts, 1e-6)


def test_router_ties_go_to_the_lower_expert_id_like_lax_top_k():
    h, e, k = 64, 16, 4
    x = jnp.ones((1, h), jnp.float32)
    w = jnp.zeros((h, e), jnp.float32)
    b = jnp.asarray([0, 3, 1, 3, 3, 0, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0], jnp.float32)  # four experts tie at 3
    ids, wts = router_top_k(x, w, b, k, implementation="gpu", interpret=True)
    xi, _ = router_top_k(x, w, b, k, implementation="xla")
    assert np.asarray(ids).tolist() == np.asarray(xi).tolist() == [[1, 3, 4, 7]]
    np.testing.assert_allclose(np.asarray(wts), 0.25, rtol=1e-6)


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 4), st.sampled_from([32, 100, 160]), st.sampled_from([4, 12, 32]), st.integers(1, 4),
       st.integers(0, 2**31 - 1))
def test_router_kernels_property(n, h, e, k, seed):
    """Any token count, hidden size (whole and partial K chunks), expert count and k: equals float64."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((h, e)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((e,)), jnp.float32)
    ids, wts = router_top_k(x, w, b, min(k, e), implementation="gpu", interpret=True,
                            tiling=_gpu_router.RouterTiling(kc=16))
    ref_ids, ref_w, logits = router_top_k_f64(_f64(x), _f64(w), _f64(b), min(k, e))
    srt = np.sort(logits, axis=-1)[:, ::-1]
    if np.min(np.abs(np.diff(srt[:, :min(k, e) + 1], axis=-1))) > 1e-4 * np.max(np.abs(logits)):
        np.testing.assert_array_equal(np.asarray(ids), ref_ids)
        assert np.max(np.abs(np.asarray(wts) - ref_w)) <= 1e-6


def test_router_top_k_errors_name_the_argument():
    x, w, b = jnp.ones((2, 64)), jnp.ones((64, 8)), jnp.ones((8,))
    with pytest.raises(ValueError, match="k=9"):
        router_top_k(x, w, b, 9)
    with pytest.raises(ValueError, match="bias"):
        router_top_k(x, w, jnp.ones((7,)), 2)
    with pytest.raises(ValueError, match="x \\(2, 32\\)"):
        router_top_k(jnp.ones((2, 32)), w, b, 2)
    with pytest.raises(UnsupportedCallError, match="kc=3"):
        router_top_k(x, w, b, 2, implementation="gpu", tiling={"kc": 3})


def test_router_kernels_lower_to_triton_for_cuda_and_xla_elsewhere():
    """Auto mode at decode sizes: two Triton calls when lowering for cuda, no sort; the XLA op (a sort for top-k)
    for cpu and above AUTO_MAX_TOKENS tokens."""
    h, e, layers = 2880, 128, 2
    spec = jax.ShapeDtypeStruct

    def lower(n, platform):
        f = jax.jit(lambda x, w, b, l_: router_top_k(x, w, b, 4, layer=l_))
        return f.trace(spec((n, h), jnp.bfloat16), spec((layers, h, e), jnp.bfloat16), spec((layers, e), jnp.float32),
                       spec((), jnp.int32)).lower(lowering_platforms=(platform,)).as_text()

    cuda = lower(1, "cuda")
    assert cuda.count("__gpu$xla.gpu.triton") == 2 and "sort" not in cuda
    assert "__gpu$xla.gpu.triton" not in lower(1, "cpu")
    assert "__gpu$xla.gpu.triton" not in lower(_gpu_router.AUTO_MAX_TOKENS + 1, "cuda")


def test_router_tiling_env_override(monkeypatch):
    monkeypatch.setenv(_gpu_router.TILING_ENV_VAR, '{"kc": 64, "top_k_warps": 8}')
    assert _gpu_router.default_tiling() == _gpu_router.RouterTiling(kc=64, top_k_warps=8)
    for bad in ("{kc: 64}", '{"bn": 16}', "[1]"):
        monkeypatch.setenv(_gpu_router.TILING_ENV_VAR, bad)
        with pytest.raises(ValueError, match=_gpu_router.TILING_ENV_VAR):
            _gpu_router.default_tiling()
