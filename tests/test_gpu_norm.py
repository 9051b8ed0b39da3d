"""The decode RMSNorm kernel (gptoss_jax.kernels._gpu_norm) and its op (rms_norm): against float64, in Pallas'
interpreter on CPU (the kernel body Triton compiles on the GPU), the XLA op bit for bit where the model ran it
before, and the lowering for cuda."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.kernels import UnsupportedCallError, rms_norm
from gptoss_jax.kernels import _gpu_norm


def _ref(x, scale, eps):
    x = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    s = np.asarray(jnp.asarray(scale).astype(jnp.float32), np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * s


@pytest.mark.parametrize("dtype,h", [(jnp.float32, 256), (jnp.bfloat16, 200), (jnp.float32, 2880)])
def test_rms_norm_kernel_matches_float64(dtype, h):
    rng = np.random.default_rng(h)
    x = jnp.asarray(rng.standard_normal((3, 1, h)) * 3, dtype)
    scale = jnp.asarray(rng.standard_normal((h,)), dtype)
    y = rms_norm(x, scale, 1e-5, implementation="gpu", interpret=True)
    ref = _ref(x, scale, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    yf = np.asarray(y.astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(yf))
    tol = 1e-5 if dtype == jnp.float32 else 8e-3  # bf16: one rounding of the output
    assert np.max(np.abs(yf - ref)) <= tol * np.max(np.abs(ref))
    xla = rms_norm(x, scale, 1e-5, implementation="xla")
    assert np.max(np.abs(np.asarray(xla.astype(jnp.float32), np.float64) - ref)) <= tol * np.max(np.abs(ref))


def test_rms_norm_reads_stacked_layers_in_place():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 128)), jnp.float32)
    scale = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    f = jax.jit(lambda x_, s_, l_: rms_norm(x_, s_, 1e-6, layer=l_, implementation="gpu", interpret=True))
    for layer in (0, 2):
        y = f(x, scale, jnp.int32(layer))
        np.testing.assert_allclose(np.asarray(y), _ref(x, scale[layer], 1e-6), rtol=2e-6, atol=2e-6)
    # the XLA op with a layer index equals the op on that layer's row, bit for bit
    np.testing.assert_array_equal(np.asarray(rms_norm(x, scale, 1e-6, layer=jnp.int32(1), implementation="xla")),
                                  np.asarray(rms_norm(x, scale[1], 1e-6, implementation="xla")))


def test_rms_norm_errors_and_lowering():
    with pytest.raises(ValueError, match=r"scale must be \[64\]"):
        rms_norm(jnp.ones((2, 64)), jnp.ones((32,)), 1e-5)
    with pytest.raises(UnsupportedCallError, match="hidden size"):
        rms_norm(jnp.ones((1, _gpu_norm.MAX_HIDDEN + 1)), jnp.ones((_gpu_norm.MAX_HIDDEN + 1,)), 1e-5,
                 implementation="gpu")
    spec = jax.ShapeDtypeStruct

    def lower(n, platform):
        f = jax.jit(lambda x, s, l_: rms_norm(x, s, 1e-5, layer=l_))
        return f.trace(spec((n, 2880), jnp.bfloat16), spec((4, 2880), jnp.bfloat16), spec((), jnp.int32)).lower(
            lowering_platforms=(platform,)).as_text()

    assert lower(1, "cuda").count("__gpu$xla.gpu.triton") == 1
    assert "__gpu$xla.gpu.triton" not in lower(1, "cpu")
    assert "__gpu$xla.gpu.triton" not in lower(_gpu_norm.AUTO_MAX_ROWS + 1, "cuda")


def test_auto_limits_env_overrides(monkeypatch):
    from gptoss_jax.kernels import _gpu_router
    spec = jax.ShapeDtypeStruct
    low = lambda: jax.jit(lambda x, s: rms_norm(x, s, 1e-5)).trace(  # noqa: E731
        spec((1, 64), jnp.float32), spec((64,), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in low()
    for mod, var in ((_gpu_norm, "GPTOSS_NORM_MAX_ROWS"), (_gpu_router, "GPTOSS_ROUTER_MAX_TOKENS")):
        monkeypatch.setenv(var, "0")
        assert (mod.auto_max_rows if mod is _gpu_norm else mod.auto_max_tokens)() == 0
        monkeypatch.setenv(var, "many")
        with pytest.raises(ValueError, match=var):
            (mod.auto_max_rows if mod is _gpu_norm else mod.auto_max_tokens)()
        monkeypatch.delenv(var)
    monkeypatch.setenv("GPTOSS_NORM_MAX_ROWS", "0")
    assert "__gpu$xla.gpu.triton" not in low()
