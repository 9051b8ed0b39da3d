"""Operands stacked over layers with a layer index (`layer=`), as the scanned model passes them: every
implementation equals the same call on the layer's own slice, for grouped and dense, int4 sym/asym and float."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.kernels import dense_matmul, grouped_matmul, int4_layout


@pytest.mark.parametrize("impl", ["xla", "gpu", "tpu"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_grouped_layer_index_equals_slice(rng, impl, symmetric):
    L, E, K, N, M = 3, 4, 128, 256, 10
    w = int4_layout.quantize(rng.normal(size=(L, E, K, N)).astype(np.float32), group_size=32, symmetric=symmetric)
    bias = jnp.asarray(rng.normal(size=(L, E, N)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(M, K)).astype(np.float32))
    gs = jnp.array([3, 0, 5, 2], jnp.int32)
    kw = dict(implementation=impl, interpret=None if impl == "xla" else True, out_dtype=jnp.float32,
              epilogue="swiglu")
    for layer in (0, 2):
        one = jax.tree.map(lambda a: a[layer], w)
        want = np.asarray(grouped_matmul(x, one, gs, bias=bias[layer], **kw))
        got = np.asarray(jax.jit(lambda li: grouped_matmul(x, w, gs, bias=bias, layer=li, **kw))(layer))
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "gpu", "tpu"])
def test_dense_layer_index_equals_slice(rng, impl):
    L, K, N, M = 3, 256, 128, 5
    w = int4_layout.quantize(rng.normal(size=(L, K, N)).astype(np.float32), group_size=64, symmetric=False)
    bias = jnp.asarray(rng.normal(size=(L, N)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(M, K)).astype(np.float32))
    kw = dict(implementation=impl, interpret=None if impl == "xla" else True, out_dtype=jnp.float32)
    for layer in (1, 2):
        want = np.asarray(dense_matmul(x, jax.tree.map(lambda a: a[layer], w), bias[layer], **kw))
        got = np.asarray(dense_matmul(x, w, bias, layer=jnp.int32(layer), **kw))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_float_weights_and_auto(rng):
    L, E, K, N, M = 2, 3, 64, 32, 7
    w = jnp.asarray(rng.normal(size=(L, E, K, N)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(M, K)).astype(np.float32))
    gs = jnp.array([2, 4, 1], jnp.int32)
    want = np.asarray(grouped_matmul(x, w[1], gs, out_dtype=jnp.float32))
    np.testing.assert_allclose(np.asarray(grouped_matmul(x, w, gs, layer=1, out_dtype=jnp.float32)), want,
                               rtol=1e-5, atol=1e-5)
