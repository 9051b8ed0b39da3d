"""The one definition of how gptoss-jax stores 4-bit weights (layout version 1).

A logical weight ``W[..., K, N]`` (input dim K, output dim N, used as ``x @ W``; leading dims are experts) is held as
an :class:`Int4Tensor`:

* ``packed``  int32 ``[..., K // 8, N]``: unsigned 4-bit codes ``q ∈ [0, 15]``; the code of row ``k`` is in bits
  ``4 * (k % 8)`` of word ``k // 8`` (low nibble first). Packing runs along K, the reduction dimension, so that a
  kernel tile ``[bk, bn]`` of W is the contiguous, N-major block ``packed[bk/8, bn]``: every load is as wide as the
  output tile (lane-dense on TPU, 16-byte coalesced on Hopper) and one 32-bit word yields 8 reduction rows with
  shifts and masks only.
* ``scales``  ``[..., K // group_size, N]`` in the source's float dtype (float16 / bfloat16 / float32, kept bit-exact).
* ``zeros``   uint8 ``[..., K // group_size, N]`` unsigned zero points in [0, 15], or ``None`` for symmetric
  quantization, where the zero point is the constant 8.

Dequantization: ``W[k, n] = (q[k, n] - zero[k // g, n]) * scale[k // g, n]``. Per-channel quantization is
``group_size == K``. K must be a multiple of 8 and of the group size; N is free (2880 = 90·32 needs no padding).

Kernels may precompute folded terms (``-zero * scale``) at load time; the checkpoint keeps the exact codes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LAYOUT_VERSION = 1
VALUES_PER_WORD = 8
SYMMETRIC_ZERO = 8


class Int4LayoutError(ValueError):
    """Arrays that do not form a valid int4 tensor."""


def _xp(a):
    return jnp if isinstance(a, jax.Array) or isinstance(a, jax.core.Tracer) else np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Tensor:
    packed: Any  # int32 [..., K // 8, N]
    scales: Any  # float [..., K // group_size, N]
    zeros: Any  # uint8 [..., K // group_size, N] or None (symmetric, zero point 8)
    group_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, kw, n = self.packed.shape
        return (*lead, kw * VALUES_PER_WORD, n)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def num_groups(self) -> int:
        return self.scales.shape[-2]

    @property
    def nbytes(self) -> int:
        total = self.packed.size * 4 + self.scales.size * self.scales.dtype.itemsize
        if self.zeros is not None:
            total += self.zeros.size
        return int(total)

    def __getitem__(self, idx) -> "Int4Tensor":
        """Indexes the leading (expert) dims only."""
        return Int4Tensor(self.packed[idx], self.scales[idx],
                          None if self.zeros is None else self.zeros[idx], self.group_size)


def validate(t: Int4Tensor, *, name: str = "weight") -> None:
    """Raises Int4LayoutError naming `name` if the arrays are inconsistent."""
    p, s, z, g = t.packed, t.scales, t.zeros, t.group_size
    if p.dtype != np.int32:
        raise Int4LayoutError(f"{name}: packed must be int32, got {p.dtype}")
    if p.ndim < 2:
        raise Int4LayoutError(f"{name}: packed must have >= 2 dims, got shape {p.shape}")
    k = p.shape[-2] * VALUES_PER_WORD
    if not isinstance(g, int) or g <= 0 or k % g:
        raise Int4LayoutError(f"{name}: group size {g} does not divide the input dim {k}")
    want = (*p.shape[:-2], k // g, p.shape[-1])
    if tuple(s.shape) != want:
        raise Int4LayoutError(f"{name}: scales shape {tuple(s.shape)} != expected {want}")
    if s.dtype not in (np.float16, np.float32, jnp.bfloat16):
        raise Int4LayoutError(f"{name}: scales dtype {s.dtype} is not float16/bfloat16/float32")
    if z is not None:
        if tuple(z.shape) != want:
            raise Int4LayoutError(f"{name}: zeros shape {tuple(z.shape)} != expected {want}")
        if z.dtype != np.uint8:
            raise Int4LayoutError(f"{name}: zeros must be uint8, got {z.dtype}")


def pack(q):
    """uint8 codes [..., K, N] in [0, 15] -> int32 words [..., K // 8, N] (row k in bits 4·(k % 8) of word k // 8)."""
    xp = _xp(q)
    *lead, k, n = q.shape
    if k % VALUES_PER_WORD:
        raise Int4LayoutError(f"input dim {k} is not a multiple of {VALUES_PER_WORD}")
    q = q.astype(xp.uint32).reshape(*lead, k // VALUES_PER_WORD, VALUES_PER_WORD, n)
    shifts = (xp.arange(VALUES_PER_WORD, dtype=xp.uint32) * 4).reshape(VALUES_PER_WORD, 1)
    words = (q << shifts).sum(axis=-2, dtype=xp.uint32)
    return words.view(xp.int32) if xp is np else jax.lax.bitcast_convert_type(words, jnp.int32)


def unpack(packed):
    """int32 words [..., K // 8, N] -> uint8 codes [..., K, N]."""
    xp = _xp(packed)
    words = packed.view(np.uint32) if xp is np else jax.lax.bitcast_convert_type(packed, jnp.uint32)
    *lead, kw, n = packed.shape
    shifts = (xp.arange(VALUES_PER_WORD, dtype=xp.uint32) * 4).reshape(VALUES_PER_WORD, 1)
    q = (words[..., :, None, :] >> shifts) & xp.uint32(0xF)
    return q.reshape(*lead, kw * VALUES_PER_WORD, n).astype(xp.uint8)


def from_unsigned(q, scales, zeros=None, *, group_size: int, name: str = "weight") -> Int4Tensor:
    """Builds an Int4Tensor from unsigned codes q [..., K, N] in [0, 15], scales and zero points [..., K//g, N]."""
    xp = _xp(q)
    if q.shape[-2] % group_size:
        raise Int4LayoutError(f"{name}: group size {group_size} does not divide the input dim {q.shape[-2]}")
    traced = isinstance(q, jax.core.Tracer)  # abstract models (eval_shape) carry no values to check
    qmax = int(q.max()) if q.size and not traced else 0
    if qmax > 15 or (q.size and not traced and int(q.min()) < 0):
        raise Int4LayoutError(f"{name}: codes must lie in [0, 15]")
    if zeros is not None:
        zeros = zeros.astype(xp.uint8)
    t = Int4Tensor(pack(q.astype(xp.uint8)), scales, zeros, int(group_size))
    validate(t, name=name)
    return t


def to_unsigned(t: Int4Tensor):
    """(codes uint8 [..., K, N], scales, zeros or None) — the exact stored values."""
    return unpack(t.packed), t.scales, t.zeros


def _expand_groups(a, group_size: int):
    xp = _xp(a)
    return xp.repeat(a, group_size, axis=-2)


def dequantize(t: Int4Tensor, dtype=np.float32):
    """Full dequantized copy [..., K, N]. Reference and conversion use only: the model never calls this on all
    experts at once."""
    xp = _xp(t.packed)
    q = unpack(t.packed).astype(xp.float32)
    z = SYMMETRIC_ZERO if t.zeros is None else _expand_groups(t.zeros.astype(xp.float32), t.group_size)
    s = _expand_groups(t.scales.astype(xp.float32), t.group_size)
    return ((q - z) * s).astype(dtype)


def quantize(w, *, group_size: int | None = 64, symmetric: bool = True, scale_dtype=np.float32,
             name: str = "weight") -> Int4Tensor:
    """Round-to-nearest int4 quantization of w [..., K, N] along K in groups (None: per channel, group = K).

    Symmetric: scale = absmax / 7, code = clip(round(w / scale), -8, 7) + 8.
    Asymmetric: scale = (max - min) / 15, zero = clip(round(-min / scale), 0, 15), code = clip(round(w/scale) + zero).
    Computed in float32 (float64 for numpy inputs); scales are stored rounded to `scale_dtype` and the codes are
    computed with the rounded scales, so dequantize() reproduces exactly what the codes mean.
    """
    xp = _xp(w)
    *lead, k, n = w.shape
    g = k if group_size is None else int(group_size)
    if g <= 0 or k % g:
        raise Int4LayoutError(f"{name}: group size {g} does not divide the input dim {k}")
    ftype = xp.float64 if xp is np else xp.float32
    wg = w.astype(ftype).reshape(*lead, k // g, g, n)
    if not isinstance(wg, jax.core.Tracer) and not bool(xp.all(xp.isfinite(wg))):
        raise Int4LayoutError(f"{name}: weight has non-finite values")
    if symmetric:
        scale = xp.max(xp.abs(wg), axis=-2) / 7.0
        scale = xp.where(scale == 0, 1.0, scale).astype(scale_dtype)
        s = scale.astype(ftype)[..., None, :]
        q = xp.clip(xp.round(wg / s), -8, 7) + SYMMETRIC_ZERO
        zeros = None
    else:
        lo = xp.minimum(xp.min(wg, axis=-2), 0.0)
        hi = xp.maximum(xp.max(wg, axis=-2), 0.0)
        scale = (hi - lo) / 15.0
        scale = xp.where(scale == 0, 1.0, scale).astype(scale_dtype)
        s = scale.astype(ftype)
        zeros = xp.clip(xp.round(-lo / s), 0, 15)
        q = xp.clip(xp.round(wg / s[..., None, :]) + zeros[..., None, :], 0, 15)
        zeros = zeros.astype(xp.uint8)
    q = q.reshape(*lead, k, n).astype(xp.uint8)
    return from_unsigned(q, scale, zeros, group_size=g, name=name)
