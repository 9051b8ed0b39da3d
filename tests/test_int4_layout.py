"""The int4 layout (pallas_kernels/int4_layout.py): bit-exact packing, round trips, quantize/dequantize, validation."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gptoss_jax.kernels import int4_layout as L


def _codes(rng, shape):
    return rng.integers(0, 16, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(8, 5), (64, 576), (3, 320, 7), (2, 2, 16, 3)])
def test_pack_unpack_roundtrip_bit_exact(rng, shape):
    q = _codes(rng, shape)
    p = L.pack(q)
    chex.assert_shape(p, (*shape[:-2], shape[-2] // 8, shape[-1]))
    chex.assert_type(p, np.int32)
    np.testing.assert_array_equal(L.unpack(p), q)
    # jnp path produces the same words and the same codes
    pj = L.pack(jnp.asarray(q))
    chex.assert_type(pj, jnp.int32)
    np.testing.assert_array_equal(np.asarray(pj), p)
    np.testing.assert_array_equal(np.asarray(L.unpack(pj)), q)


def test_bit_positions(rng):
    """Row k's code is in bits 4*(k % 8) of word k // 8 (low nibble first)."""
    q = _codes(rng, (16, 3))
    w = L.pack(q).view(np.uint32)
    for k in range(16):
        np.testing.assert_array_equal((w[k // 8] >> np.uint32(4 * (k % 8))) & 0xF, q[k])


def test_all_bit_patterns_survive(rng):
    """Every code in every nibble position, including 0xF in the sign nibble of the int32 word."""
    q = np.tile(np.arange(16, dtype=np.uint8)[:, None], (1, 8)).reshape(16, 8)  # [16, 8]
    q = np.concatenate([q, 15 * np.ones((8, 8), np.uint8)], axis=0)
    p = L.pack(q)
    assert (p < 0).any()  # top nibble 0xF sets the sign bit
    np.testing.assert_array_equal(L.unpack(p), q)
    np.testing.assert_array_equal(np.asarray(L.unpack(jnp.asarray(p))), q)


@pytest.mark.parametrize("scale_dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_from_to_unsigned_roundtrip(rng, scale_dtype, symmetric):
    e, k, n, g = 2, 64, 24, 32
    q = _codes(rng, (e, k, n))
    s = (rng.random((e, k // g, n)) + 0.1).astype(scale_dtype)
    z = None if symmetric else _codes(rng, (e, k // g, n))
    t = L.from_unsigned(q, s, z, group_size=g)
    L.validate(t)
    assert t.shape == (e, k, n) and t.symmetric == symmetric and t.num_groups == k // g
    q2, s2, z2 = L.to_unsigned(t)
    np.testing.assert_array_equal(q2, q)
    assert s2.dtype == np.dtype(scale_dtype)
    np.testing.assert_array_equal(s2.view(np.uint8), s.view(np.uint8))  # bit-exact scales
    if symmetric:
        assert z2 is None
    else:
        np.testing.assert_array_equal(z2, z)
    # indexing the expert dim keeps a valid tensor
    L.validate(t[1])
    np.testing.assert_array_equal(L.to_unsigned(t[1])[0], q[1])


@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_formula(rng, symmetric):
    k, n, g = 64, 10, 32
    q = _codes(rng, (k, n))
    s = (rng.random((k // g, n)) + 0.5).astype(np.float32)
    z = None if symmetric else _codes(rng, (k // g, n))
    t = L.from_unsigned(q, s, z, group_size=g)
    zz = 8.0 if symmetric else np.repeat(z.astype(np.float64), g, axis=0)
    want = (q.astype(np.float64) - zz) * np.repeat(s.astype(np.float64), g, axis=0)
    np.testing.assert_allclose(L.dequantize(t), want, rtol=1e-6)
    tj = jax.tree.map(jnp.asarray, t)
    np.testing.assert_allclose(np.asarray(L.dequantize(tj, jnp.float32)), want, rtol=1e-6)


@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_error_bound(rng, group_size, symmetric):
    k, n = 256, 48
    w = rng.standard_normal((2, k, n))
    t = L.quantize(w, group_size=group_size, symmetric=symmetric)
    g = k if group_size is None else group_size
    assert t.group_size == g
    wd = L.dequantize(t, np.float64)
    s = np.repeat(t.scales.astype(np.float64), g, axis=-2)
    # round-to-nearest: error <= scale/2 except where symmetric clipping at -8..7 cannot happen (absmax/7 scale)
    assert np.all(np.abs(wd - w) <= s * 0.5 + 1e-12)
    assert np.all(np.isfinite(wd))


def test_quantize_jnp_matches_numpy(rng):
    w = rng.standard_normal((64, 16)).astype(np.float32)
    tn = L.quantize(w.astype(np.float64), group_size=32, symmetric=False)
    tj = L.quantize(jnp.asarray(w), group_size=32, symmetric=False)
    dn = L.dequantize(tn, np.float64)
    dj = np.asarray(L.dequantize(tj, jnp.float32)).astype(np.float64)
    np.testing.assert_allclose(dj, dn, atol=np.max(np.abs(dn)) * 0.2)  # same scheme; f32 vs f64 rounding only


def test_validate_rejects_bad_tensors(rng):
    q = _codes(rng, (64, 8))
    s = np.ones((2, 8), np.float32)
    good = L.from_unsigned(q, s, group_size=32)
    with pytest.raises(L.Int4LayoutError):
        L.validate(L.Int4Tensor(good.packed.astype(np.int64), s, None, 32))
    with pytest.raises(L.Int4LayoutError):
        L.validate(L.Int4Tensor(good.packed, np.ones((3, 8), np.float32), None, 32))
    with pytest.raises(L.Int4LayoutError):
        L.validate(L.Int4Tensor(good.packed, s, np.ones((2, 8), np.int32), 32))
    with pytest.raises(L.Int4LayoutError):
        L.validate(L.Int4Tensor(good.packed, s.astype(np.float64), None, 32))
    with pytest.raises(L.Int4LayoutError):
        L.from_unsigned(q, s, group_size=24)
    with pytest.raises(L.Int4LayoutError):
        L.from_unsigned(q.astype(np.int32) + 1, s, group_size=32)  # 16 is out of range
    with pytest.raises(L.Int4LayoutError):
        L.pack(_codes(rng, (12, 3)))


def test_int4tensor_is_a_pytree_with_static_group(rng):
    t = L.quantize(rng.standard_normal((2, 64, 8)), group_size=32, symmetric=False)
    leaves, treedef = jax.tree.flatten(t)
    assert len(leaves) == 3
    t2 = jax.tree.unflatten(treedef, leaves)
    assert t2.group_size == 32
    out = jax.jit(lambda tt: L.dequantize(tt, jnp.float32))(jax.tree.map(jnp.asarray, t))
    chex.assert_shape(out, (2, 64, 8))
    chex.assert_type(out, jnp.float32)
