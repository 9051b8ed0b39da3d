"""Rotary position embeddings with YaRN scaling (rotate-half, not interleaved), as gpt-oss uses them."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import GptOssConfig


def yarn_inv_freq(config: GptOssConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim/2] float32, attention factor applied to cos and sin).

    YaRN blends position interpolation (inv_freq / factor) for low frequencies with extrapolation (inv_freq) for high
    ones via a linear ramp between the correction dims of beta_fast and beta_slow rotations at the original context
    length; the ramp ends are not floored/ceiled when truncate=false (gpt-oss). Computed in float64.
    """
    r = config.rope
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    pos_freqs = r.theta ** exponents
    if r.rope_type == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(r.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(r.theta))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (r.factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    attention_factor = r.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(r.factor) + 1.0 if r.factor > 1 else 1.0
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions, inv_freq, scale: float):
    """positions [B,T] → cos, sin [B,T,head_dim/2] in float32, both multiplied by the attention factor."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x, cos, sin):
    """x [B,T,heads,D]: rotate-half over D: (x1·cos − x2·sin, x2·cos + x1·sin), in float32."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
