"""The gpt-oss clamped SwiGLU, written once for every implementation.

Source: gpt-oss reference ``gpt_oss/torch/model.py`` (``swiglu``) and transformers' ``GptOssExperts``:
``gate = min(gate, limit)``, ``up = clip(up, -limit, limit)``, ``out = (up + 1) * gate * sigmoid(alpha * gate)``,
with ``alpha = 1.702`` and ``limit = 7.0``; the fused gate_up projection interleaves its columns (gate = even,
up = odd).

:func:`clamped_swiglu_parts` takes gate and up **already split**, because each caller splits differently: the xla
path and the float64 reference slice ``h[..., 0::2]`` / ``h[..., 1::2]``, the TPU kernel reads strided lanes of its
float32 accumulator, the GPU kernel reshapes its tile to ``[bm, bn/2, 2]`` and unstacks. The array namespace
``xp`` is ``jax.numpy`` (also inside Pallas kernels: only ``minimum``, ``clip``, ``exp`` and arithmetic, which both
Mosaic and Triton lower) or ``numpy`` (the float64 reference).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


def clamped_swiglu_parts(gate, up, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT, xp=jnp):
    """Clamped SwiGLU of split gate / up arrays (same shape, any float dtype; compute in the caller's dtype).

    ``sigmoid(a * g)`` is written ``1 / (1 + exp(-a * g))``: for very negative gates ``exp`` overflows to inf and
    the product is an exact -0 (numpy callers silence the overflow warning, see :func:`clamped_swiglu_f64`).
    """
    gate = xp.minimum(gate, limit)
    up = xp.clip(up, -limit, limit)
    return (up + 1.0) * (gate / (1.0 + xp.exp(-alpha * gate)))


def split_interleaved(h):
    """[..., 2F] -> (gate [..., F], up [..., F]): gate = even, up = odd columns (numpy or jax arrays)."""
    return h[..., 0::2], h[..., 1::2]


def clamped_swiglu(h, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT):
    """gpt-oss SwiGLU on interleaved ``h`` [..., 2F] -> [..., F] in ``h.dtype`` (computed in float32).

    Raises ValueError when the last dim is odd."""
    if h.shape[-1] % 2:
        raise ValueError(f"clamped_swiglu: the last dim of h {tuple(h.shape)} must be even (gate/up interleaved)")
    gate, up = split_interleaved(h.astype(jnp.float32))
    return clamped_swiglu_parts(gate, up, alpha, limit).astype(h.dtype)


def clamped_swiglu_f64(h, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> np.ndarray:
    """Float64 numpy twin of :func:`clamped_swiglu` (the kernels' test reference)."""
    gate, up = split_interleaved(np.asarray(h, np.float64))
    with np.errstate(over="ignore"):
        return clamped_swiglu_parts(gate, up, alpha, limit, xp=np)
