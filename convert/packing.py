"""Bit-level translation of source 4-bit encodings into the project's int4 layout (:mod:`gptoss_jax.kernels.int4_layout`).

Every function here is exact: codes, zero points and scales come out bit for bit as the source stored them (the
round-trip tests check this on the functions directly). Shapes follow the source conventions:

* compressed-tensors ``pack-quantized``: ``weight_packed`` int32 ``[out, ceil(in/8)]``; element ``j`` of a row at
  bits ``4·(j % 8)`` of word ``j // 8``, stored as the signed value + 8. Zero points int32 ``[ceil(out/8), groups]``
  packed the same way along dim 0. Scales ``[out, groups]``.
* AutoAWQ GEMM: ``qweight`` int32 ``[in, out/8]``; nibble ``i`` of word ``c`` holds output column
  ``8c + AWQ_ORDER[i]``; ``qzeros`` int32 ``[in/group, out/8]`` in the same order (unsigned); ``scales``
  ``[in/group, out]``.
* MXFP4 (the official gpt-oss release): ``blocks`` uint8 ``[..., out, in/32, 16]`` (two E2M1 values per byte, low
  nibble first) and ``scales`` uint8 ``[..., out, in/32]`` (E8M0: 2^(s − 127); 255 is NaN).

Our layout is input-major: a weight ``W[K, N]`` is used as ``x @ W``; int4 codes are packed along K.
"""

from __future__ import annotations

import sys

import numpy as np

from gptoss_jax.kernels import int4_layout

_LITTLE_ENDIAN = sys.byteorder == "little"

VALUES_PER_WORD = 8
NIBBLE_SHIFTS = np.arange(VALUES_PER_WORD, dtype=np.uint32) * 4

# AutoAWQ GEMM: nibble i of a packed word holds column AWQ_ORDER[i] of the 8 columns it covers.
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])

# E2M1 (fp4) values by nibble code, and the E8M0 exponent bias of MXFP4 block scales.
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
E8M0_BIAS = 127
_E2M1_BYTE_PAIRS = np.stack([E2M1_VALUES[np.arange(256) & 0xF], E2M1_VALUES[np.arange(256) >> 4]], axis=-1)
E8M0_NAN = 255
MXFP4_BLOCK = 32


def _words_to_nibbles_last(words: np.ndarray, count: int) -> np.ndarray:
    """int32 [..., W] -> uint8 codes [..., count]: element j at bits 4·(j % 8) of word j // 8."""
    words = np.ascontiguousarray(words)
    if _LITTLE_ENDIAN:  # byte b of a word holds elements 2b (low nibble) and 2b + 1 (high nibble)
        b = words.view(np.uint8).reshape(*words.shape, 4)
        nib = np.empty((*words.shape, VALUES_PER_WORD), np.uint8)
        np.bitwise_and(b, 0xF, out=nib[..., 0::2])
        np.right_shift(b, 4, out=nib[..., 1::2])
    else:
        u = words.view(np.uint32)
        nib = ((u[..., :, None] >> NIBBLE_SHIFTS) & np.uint32(0xF)).astype(np.uint8)
    nib = nib.reshape(*words.shape[:-1], words.shape[-1] * VALUES_PER_WORD)
    return nib[..., :count]


def pack_k(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [..., K, N] in [0, 15] -> our packed int32 [..., K/8, N]; equals int4_layout.pack (tested) but
    works on bytes, a few times faster on large arrays."""
    *lead, k, n = codes.shape
    if not _LITTLE_ENDIAN or k % VALUES_PER_WORD:
        return int4_layout.pack(codes)
    c = np.asarray(codes, np.uint8).reshape(*lead, k // VALUES_PER_WORD, VALUES_PER_WORD, n)
    by = np.empty((*lead, k // VALUES_PER_WORD, n, 4), np.uint8)  # byte j of each word: rows 2j (low), 2j+1 (high)
    for j in range(4):
        np.bitwise_or(c[..., 2 * j, :], np.left_shift(c[..., 2 * j + 1, :], 4), out=by[..., j])
    return by.view(np.int32).reshape(*lead, k // VALUES_PER_WORD, n)


def rtn_quantize(w: np.ndarray, group_size: int, symmetric: bool, scale_dtype) -> dict:
    """Round-to-nearest int4 of w [K, N] along K: the rule of int4_layout.quantize, computed with the same float64
    operations in place (so codes, zeros and scales are bit-identical — tested), several times faster.
    Returns {"packed", "scales"[, "zeros"]}; raises ValueError on non-finite input."""
    k, n = w.shape
    g = group_size
    if g <= 0 or k % g:
        raise ValueError(f"group size {g} does not divide the input dim {k}")
    wg = np.asarray(w, np.float64).reshape(k // g, g, n)
    hi = wg.max(axis=1)
    lo = wg.min(axis=1)
    if not (np.all(np.isfinite(hi)) and np.all(np.isfinite(lo))):  # NaN / inf anywhere reach max or min
        raise ValueError("weight has non-finite values")
    if symmetric:
        scale = np.maximum(np.abs(hi), np.abs(lo)) / 7.0
    else:
        lo = np.minimum(lo, 0.0)
        hi = np.maximum(hi, 0.0)
        scale = (hi - lo) / 15.0
    scale = np.where(scale == 0, 1.0, scale).astype(scale_dtype)
    s = scale.astype(np.float64)
    q = np.divide(wg, s[:, None, :])
    np.rint(q, out=q)
    if symmetric:
        zeros = None
        np.clip(q, -8, 7, out=q)
        q += int4_layout.SYMMETRIC_ZERO
    else:
        zeros = np.clip(np.rint(-lo / s), 0, 15)
        q += zeros[:, None, :]
        np.clip(q, 0, 15, out=q)
        zeros = zeros.astype(np.uint8)
    out = {"packed": pack_k(q.reshape(k, n).astype(np.uint8)), "scales": scale}
    if zeros is not None:
        out["zeros"] = zeros
    return out


# ------------------------------------------------------------------------------------------------ compressed-tensors
def ct_codes(weight_packed: np.ndarray, in_features: int) -> np.ndarray:
    """compressed-tensors ``weight_packed`` [out, ceil(in/8)] -> unsigned codes [out, in] (= signed value + 8)."""
    return _words_to_nibbles_last(weight_packed, in_features)


def ct_packed_to_ours(weight_packed: np.ndarray) -> np.ndarray:
    """compressed-tensors ``weight_packed`` [out, in/8] -> our ``packed`` [in/8, out], with no unpacking.

    Both pack 8 consecutive input elements per word, low nibble first, as unsigned codes (signed value + 8), so the
    words are identical and only the axes swap. Requires in % 8 == 0 (no padding nibbles)."""
    return np.ascontiguousarray(np.asarray(weight_packed, dtype=np.int32).T)


def ct_zero_points(weight_zero_point: np.ndarray, out_features: int) -> np.ndarray:
    """compressed-tensors ``weight_zero_point`` [ceil(out/8), groups] (packed along dim 0) -> unsigned zero
    codes [out, groups] (= signed zero point + 8)."""
    return np.ascontiguousarray(_words_to_nibbles_last(np.asarray(weight_zero_point).T, out_features).T)


def ct_pack_rows(codes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ct_codes` (used by test writers): unsigned codes [rows, n] -> int32 [rows, ceil(n/8)]."""
    rows, n = codes.shape
    padded = np.zeros((rows, -(-n // VALUES_PER_WORD) * VALUES_PER_WORD), np.uint32)
    padded[:, :n] = codes
    grouped = padded.reshape(rows, -1, VALUES_PER_WORD)
    return (grouped << NIBBLE_SHIFTS).sum(axis=-1, dtype=np.uint32).view(np.int32)


# ------------------------------------------------------------------------------------------------------------ AutoAWQ
def awq_unpack(words: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM words [rows, out/8] -> unsigned codes [rows, out] in natural column order."""
    rows, w = words.shape
    words = np.ascontiguousarray(words)
    out = np.empty((rows, w, VALUES_PER_WORD), np.uint8)
    if _LITTLE_ENDIAN:
        # nibble i sits in byte i // 2 (low nibble for even i) and holds column AWQ_ORDER[i]: bytes 0-1 carry the
        # even columns (0, 2 | 4, 6), bytes 2-3 the odd ones (1, 3 | 5, 7)
        b = words.view(np.uint8).reshape(rows, w, 4)
        np.bitwise_and(b[..., 0:2], 0xF, out=out[..., 0::4])
        np.right_shift(b[..., 0:2], 4, out=out[..., 2::4])
        np.bitwise_and(b[..., 2:4], 0xF, out=out[..., 1::4])
        np.right_shift(b[..., 2:4], 4, out=out[..., 3::4])
    else:
        nib = _words_to_nibbles_last(words, w * VALUES_PER_WORD).reshape(rows, w, VALUES_PER_WORD)
        out[:, :, AWQ_ORDER] = nib  # nibble i -> column AWQ_ORDER[i]
    return out.reshape(rows, w * VALUES_PER_WORD)


def awq_pack(codes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`awq_unpack` (the documented AutoAWQ order; used by test writers)."""
    rows, n = codes.shape
    if n % VALUES_PER_WORD:
        raise ValueError(f"AutoAWQ packs 8 output columns per word; {n} columns is not a multiple of 8")
    grouped = codes.astype(np.uint32).reshape(rows, n // VALUES_PER_WORD, VALUES_PER_WORD)[:, :, AWQ_ORDER]
    return (grouped << NIBBLE_SHIFTS).sum(axis=-1, dtype=np.uint32).view(np.int32)


def awq_to_ours(qweight: np.ndarray) -> np.ndarray:
    """AutoAWQ ``qweight`` [in, out/8] -> our ``packed`` [in/8, out] (same codes, repacked along the input dim)."""
    return pack_k(awq_unpack(qweight))


# -------------------------------------------------------------------------------------------------------------- MXFP4
def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray, dtype=np.float64) -> np.ndarray:
    """MXFP4 ``blocks`` uint8 [..., out, in/32, 16] and ``scales`` uint8 [..., out, in/32] -> [..., out, in].

    Exact in float64 (and in float32 for the exponents real checkpoints use). Callers check scales for the E8M0 NaN
    code 255 first; here it would give NaN."""
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match "
                         f"([..., out, in/32, 16] and [..., out, in/32])")
    values = _E2M1_BYTE_PAIRS.astype(dtype)[blocks]  # [..., in/32, 16, 2]: (low, high) nibble of each byte
    values = values.reshape(*blocks.shape[:-1], MXFP4_BLOCK)
    # times 2^(s - 127): a power of two, so the product is exact (float64 covers every E8M0 exponent)
    values *= np.ldexp(np.ones(scales.shape, dtype), scales.astype(np.int32) - E8M0_BIAS)[..., None]
    values[scales == E8M0_NAN] = np.nan
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * MXFP4_BLOCK)


# --------------------------------------------------------------------------------------------------------------- GPTQ
def gptq_zeros(qzeros: np.ndarray, out_features: int, offset: int) -> np.ndarray:
    """GPTQ ``qzeros`` int32 [groups, out/8] (8 output columns per word, low nibble first) -> zero points
    [groups, out] as int16: the stored nibble plus `offset` (1 for the v1 "gptq" checkpoint format, which stores
    z − 1; 0 for "gptq_v2"). A v1 nibble 15 gives 16, which the caller rejects."""
    return _words_to_nibbles_last(qzeros, out_features).astype(np.int16) + offset
