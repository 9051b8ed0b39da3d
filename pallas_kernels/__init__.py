"""Kernels for gptoss-jax: int4 layout and matmul ops (dense + grouped/MoE), with a registry of implementations."""

from ._gpu import GpuTiling
from ._tpu import TpuTiling
from .int4_layout import (LAYOUT_VERSION, Int4LayoutError, Int4Tensor, dequantize, from_unsigned, pack, quantize,
                          to_unsigned, unpack, validate)
from .ops import IMPLEMENTATIONS, default_implementation, dense_matmul, grouped_matmul
from .registry import AUTO_ORDER, REGISTRY, MatmulCall, UnsupportedCallError
from .swiglu import clamped_swiglu, clamped_swiglu_parts

__all__ = [
    "LAYOUT_VERSION", "Int4LayoutError", "Int4Tensor", "dequantize", "from_unsigned", "pack", "quantize",
    "to_unsigned", "unpack", "validate", "IMPLEMENTATIONS", "clamped_swiglu", "clamped_swiglu_parts",
    "default_implementation", "dense_matmul", "grouped_matmul", "GpuTiling", "TpuTiling", "AUTO_ORDER", "REGISTRY",
    "MatmulCall", "UnsupportedCallError",
]
