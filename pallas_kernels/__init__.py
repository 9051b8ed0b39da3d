"""Kernels for gptoss-jax: int4 layout, matmul ops (dense + grouped/MoE) and attention (sinks, sliding window)."""

from .int4_layout import (LAYOUT_VERSION, Int4LayoutError, Int4Tensor, dequantize, from_unsigned, pack, quantize,
                          to_unsigned, unpack, validate)
from .ops import (IMPLEMENTATIONS, clamped_swiglu, default_implementation, dense_matmul, grouped_matmul)
from .attention import decode_attention, flash_attention  # noqa: E402  (pallas_kernels.attention stays the module)

__all__ = [
    "LAYOUT_VERSION", "Int4LayoutError", "Int4Tensor", "dequantize", "from_unsigned", "pack", "quantize",
    "to_unsigned", "unpack", "validate", "IMPLEMENTATIONS", "clamped_swiglu", "default_implementation",
    "dense_matmul", "grouped_matmul", "flash_attention", "decode_attention",
]
