"""Kernels for gptoss-jax: int4 layout, matmul ops (dense + grouped/MoE) with a registry of implementations, and
attention (sinks, sliding window)."""

from ._gpu import GpuTiling
from ._tpu import TpuTiling
from .int4_layout import (LAYOUT_VERSION, Int4LayoutError, Int4Tensor, dequantize, from_unsigned, pack, quantize,
                          to_unsigned, unpack, validate)
from .ops import (IMPLEMENTATIONS, decode_attention_update, default_implementation, dense_matmul, dense_matmul_fused,
                  grouped_matmul, rms_norm, routed_matmul, router_top_k)
from .registry import AUTO_ORDER, REGISTRY, MatmulCall, UnsupportedCallError
from .swiglu import clamped_swiglu, clamped_swiglu_parts
from .attention import decode_attention, flash_attention  # noqa: E402  (gptoss_jax.kernels.attention stays the module)

__all__ = [
    "LAYOUT_VERSION", "Int4LayoutError", "Int4Tensor", "dequantize", "from_unsigned", "pack", "quantize",
    "to_unsigned", "unpack", "validate", "IMPLEMENTATIONS", "clamped_swiglu", "clamped_swiglu_parts",
    "default_implementation", "dense_matmul", "dense_matmul_fused", "grouped_matmul", "routed_matmul", "router_top_k",
    "rms_norm", "decode_attention_update", "GpuTiling",
    "TpuTiling", "AUTO_ORDER", "REGISTRY",
    "MatmulCall", "UnsupportedCallError", "flash_attention", "decode_attention",
]
