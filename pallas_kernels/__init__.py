"""Kernels for gptoss-jax: int4 layout and matmul ops (dense + grouped/MoE)."""

from .int4_layout import (LAYOUT_VERSION, Int4LayoutError, Int4Tensor, dequantize, from_unsigned, pack, quantize,
                          to_unsigned, unpack, validate)
from .ops import (IMPLEMENTATIONS, clamped_swiglu, default_implementation, dense_matmul, grouped_matmul)

__all__ = [
    "LAYOUT_VERSION", "Int4LayoutError", "Int4Tensor", "dequantize", "from_unsigned", "pack", "quantize",
    "to_unsigned", "unpack", "validate", "IMPLEMENTATIONS", "clamped_swiglu", "default_implementation",
    "dense_matmul", "grouped_matmul",
]
