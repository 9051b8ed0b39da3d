"""Bit-exactness of the source-format decoders in gptoss_jax.convert.packing against the formats' own writers."""

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from gptoss_jax.convert import packing
from gptoss_jax.testing import writers
from gptoss_jax.kernels import int4_layout


@pytest.mark.parametrize("out,inp", [(24, 64), (13, 40), (8, 8)])
def test_ct_weight_codes_equal_package_values(rng, out, inp):
    signed = rng.integers(-8, 8, size=(out, inp), dtype=np.int8)
    packed = pack_to_int32(torch.from_numpy(signed), 4).numpy()
    assert packed.shape == (out, -(-inp // 8)) and packed.dtype == np.int32
    codes = packing.ct_codes(packed, inp)
    np.testing.assert_array_equal(codes.astype(np.int16) - 8, signed)
    # the package's own unpacker agrees
    np.testing.assert_array_equal(unpack_from_int32(torch.from_numpy(packed), 4, torch.Size([out, inp])).numpy(),
                                  signed)
    # our layout holds the same words, input-major
    ours = packing.ct_packed_to_ours(packed)
    assert ours.shape == (inp // 8, out)
    np.testing.assert_array_equal(int4_layout.unpack(ours), (signed.astype(np.int16) + 8).T.astype(np.uint8))
    np.testing.assert_array_equal(ours, int4_layout.pack((signed.astype(np.int16) + 8).T.astype(np.uint8)))
    np.testing.assert_array_equal(packing.ct_pack_rows(codes), packed)


@pytest.mark.parametrize("out,groups", [(24, 3), (13, 5), (7, 1)])
def test_ct_zero_points_equal_package_values(rng, out, groups):
    signed = rng.integers(-8, 8, size=(out, groups), dtype=np.int8)
    packed = pack_to_int32(torch.from_numpy(signed), 4, packed_dim=0).numpy()
    assert packed.shape == (-(-out // 8), groups)
    zeros = packing.ct_zero_points(packed, out)
    assert zeros.dtype == np.uint8 and zeros.shape == (out, groups)
    np.testing.assert_array_equal(zeros.astype(np.int16) - 8, signed)


@pytest.mark.parametrize("rows,out", [(16, 64), (5, 8), (32, 320)])
def test_awq_unpack_matches_documented_order(rng, rows, out):
    codes = rng.integers(0, 16, size=(rows, out), dtype=np.int64)
    words = np.zeros((rows, out // 8), np.int64)
    for nibble, column in enumerate([0, 2, 4, 6, 1, 3, 5, 7]):  # the documented AutoAWQ GEMM order
        words |= codes[:, column::8] << (4 * nibble)
    words = words.astype(np.uint32).view(np.int32)
    np.testing.assert_array_equal(packing.awq_unpack(words), codes.astype(np.uint8))
    np.testing.assert_array_equal(packing.awq_pack(codes.astype(np.uint8)), words)
    if rows % 8 == 0:
        np.testing.assert_array_equal(int4_layout.unpack(packing.awq_to_ours(words)), codes.astype(np.uint8))


def test_awq_writer_round_trips_exactly(rng):
    w = rng.standard_normal((48, 64)) * 0.05  # [out, in]
    tensors, deq = writers.awq_quantize_linear(w, 32)
    codes = packing.awq_unpack(tensors["qweight"]).astype(np.float64)  # [in, out]
    zeros = packing.awq_unpack(tensors["qzeros"]).astype(np.float64)  # [in/g, out]
    scales = tensors["scales"].astype(np.float64)
    recon = (codes - np.repeat(zeros, 32, axis=0)) * np.repeat(scales, 32, axis=0)
    np.testing.assert_array_equal(recon.T, deq)


def test_mxfp4_dequantize_equals_float64_reference(rng):
    blocks = rng.integers(0, 256, size=(3, 5, 4, 16), dtype=np.uint8)
    scales = rng.integers(0, 255, size=(3, 5, 4), dtype=np.uint8)  # every finite E8M0 exponent range
    scales.flat[:3] = [0, 127, 254]
    got = packing.mxfp4_dequantize(blocks, scales, np.float64)
    ref = writers.mxfp4_reference(blocks, scales)
    assert got.shape == (3, 5, 128)
    np.testing.assert_array_equal(got, ref)
    # every E2M1 code, by hand: byte 0x21 holds 0.5 (low nibble 1) then 1.0 (high nibble 2)
    one = np.zeros((1, 1, 16), np.uint8)
    one[0, 0, 0] = 0x21
    one[0, 0, 1] = 0xF8  # -0 (low 8), -6 (high 15)
    v = packing.mxfp4_dequantize(one, np.full((1, 1), 128, np.uint8))
    np.testing.assert_array_equal(v[0, :4], [1.0, 2.0, -0.0, -12.0])
    assert np.signbit(v[0, 2])


def test_mxfp4_nan_scale_gives_nan(rng):
    blocks = rng.integers(0, 256, size=(2, 1, 16), dtype=np.uint8)
    scales = np.array([[255], [127]], np.uint8)
    v = packing.mxfp4_dequantize(blocks, scales)
    assert np.all(np.isnan(v[0])) and np.all(np.isfinite(v[1]))


def test_rtn_reference_matches_int4_layout_quantize(rng):
    """The writers' float64 transcription of the RTN rule equals what the converter stores (int4_layout)."""
    import ml_dtypes
    w = rng.standard_normal((2, 64, 24)) * 0.1
    for group, sym in ((32, True), (64, False), (None, True)):
        t = int4_layout.quantize(w, group_size=group, symmetric=sym, scale_dtype=ml_dtypes.bfloat16)
        np.testing.assert_array_equal(int4_layout.dequantize(t, np.float64),
                                      writers.rtn_reference(w, group, sym))


def test_fast_pack_equals_int4_layout_pack(rng):
    for shape in ((64, 24), (3, 16, 5), (8, 1)):
        codes = rng.integers(0, 16, size=shape, dtype=np.uint8)
        np.testing.assert_array_equal(packing.pack_k(codes), int4_layout.pack(codes))


@pytest.mark.parametrize("group,symmetric", [(32, True), (32, False), (64, False), (128, True)])
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16", "float32"])
def test_fast_rtn_is_bit_identical_to_int4_layout_quantize(rng, group, symmetric, scale_dtype):
    import ml_dtypes
    sdt = np.dtype(ml_dtypes.bfloat16) if scale_dtype == "bfloat16" else np.dtype(scale_dtype)
    w = rng.standard_normal((128, 40)) * 0.03
    w[:group, 0] = 0.0  # an all-zero group (scale 1)
    w[:, 1] = np.round(w[:, 1] * 64) / 64  # dyadic values: exact ties w / s = x.5 occur
    w[:, 2] = np.abs(w[:, 2])  # one-signed columns
    got = packing.rtn_quantize(w, group, symmetric, sdt)
    want = int4_layout.quantize(w, group_size=group, symmetric=symmetric, scale_dtype=sdt)
    np.testing.assert_array_equal(got["packed"], want.packed)
    assert got["scales"].dtype == want.scales.dtype
    np.testing.assert_array_equal(got["scales"].view(np.uint8), np.asarray(want.scales).view(np.uint8))
    if symmetric:
        assert "zeros" not in got and want.zeros is None
    else:
        np.testing.assert_array_equal(got["zeros"], want.zeros)


def test_fast_rtn_rejects_non_finite(rng):
    w = rng.standard_normal((64, 8))
    for bad in (np.nan, np.inf, -np.inf):
        w2 = w.copy()
        w2[5, 3] = bad
        with pytest.raises(ValueError, match="non-finite"):
            packing.rtn_quantize(w2, 32, False, np.float32)
    with pytest.raises(ValueError, match="does not divide"):
        packing.rtn_quantize(w, 48, True, np.float32)
