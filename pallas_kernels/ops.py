"""Public matmul ops for gptoss-jax (tokamax style: one function, ``implementation=`` switch, pure-jnp reference).

``dense_matmul``   x [M, K] @ W [K, N] (+ bias) — attention projections.
``grouped_matmul`` megablox-style ragged matmul over experts, optional fused clamped-SwiGLU epilogue — MoE experts.

``W`` is a float array or an :class:`~pallas_kernels.int4_layout.Int4Tensor`. Implementations:

* ``"xla"``: pure jnp reference. For an Int4Tensor it gathers only the (at most ``min(E, M)``) distinct experts
  that received rows, dequantizes those and runs ``jax.lax.ragged_dot`` over the compacted groups — it never builds
  a dequantized copy of all experts (unless every expert can be present, i.e. ``M >= E``).
* ``"tpu"``: Pallas Mosaic TPU kernel (``_tpu.py``), in interpret mode off-TPU when asked explicitly.
* ``"gpu"``: Pallas GPU kernel, Triton lowering (``_gpu.py`` says why), interpret mode off-GPU when asked.
* ``None``: by backend — tpu -> "tpu", gpu -> "gpu", else "xla". If a kernel does not support the shapes
  (e.g. K without a power-of-two divisor >= 16 on GPU), auto mode falls back to "xla". Exceptions on GPU:
  ``dense_matmul`` picks "xla" (measured faster, docs/BENCHMARKS.md), and ``grouped_matmul`` with float (16-bit)
  weights picks "xla" (that kernel variant was never compiled on a GPU).

All paths accumulate in float32, add the bias in float32, apply the epilogue in float32 and cast once to
``out_dtype`` (default ``x.dtype``). Float32 inputs use ``Precision.HIGHEST`` / IEEE dots (no TF32).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from . import _common
from .int4_layout import Int4Tensor, dequantize, validate

IMPLEMENTATIONS = ("xla", "tpu", "gpu")
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0

# Set GPTOSS_KERNELS=xla to force the reference everywhere (debugging / bisecting).
_FORCE = os.environ.get("GPTOSS_KERNELS") or None


def clamped_swiglu(h, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT):
    """gpt-oss SwiGLU on interleaved [.., 2F] -> [.., F]: gate = even, up = odd columns (computed in float32)."""
    return _swiglu_f32(h.astype(jnp.float32), alpha, limit).astype(h.dtype)


def _swiglu_f32(hf, alpha, limit):
    gate = hf[..., 0::2]
    up = hf[..., 1::2]
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1.0) * gate * jax.nn.sigmoid(alpha * gate)


def default_implementation() -> str:
    if _FORCE:
        return _FORCE
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "xla"


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _compute_dtype(x, w):
    if isinstance(w, Int4Tensor):
        return x.dtype
    return jnp.promote_types(x.dtype, w.dtype)


def _as_expert_int4(w: Int4Tensor) -> Int4Tensor:
    return Int4Tensor(w.packed[None], w.scales[None], None if w.zeros is None else w.zeros[None], w.group_size)


# ----------------------------------------------------------------------------------------------------------- xla
def _gather_experts(w, ids):
    if isinstance(w, Int4Tensor):
        return Int4Tensor(jnp.take(w.packed, ids, axis=0), jnp.take(w.scales, ids, axis=0),
                          None if w.zeros is None else jnp.take(w.zeros, ids, axis=0), w.group_size)
    return jnp.take(w, ids, axis=0)


def _grouped_xla(x, w, group_sizes, bias, epilogue, alpha, limit, out_dtype):
    m, _ = x.shape
    e = group_sizes.shape[0]
    cdt = _compute_dtype(x, w)
    group_sizes = group_sizes.astype(jnp.int32)
    g = min(e, m)
    if g < e:
        # Only experts with rows: compact them (order preserved, so rows stay sorted by compacted group).
        present = group_sizes > 0
        ids = jnp.nonzero(present, size=g, fill_value=0)[0].astype(jnp.int32)
        count = jnp.sum(present.astype(jnp.int32))
        sizes_c = jnp.where(jnp.arange(g) < count, jnp.take(group_sizes, ids), 0).astype(jnp.int32)
        wc = _gather_experts(w, ids)
    else:
        sizes_c, wc = group_sizes, w
    if isinstance(wc, Int4Tensor):
        wd = dequantize(wc, cdt)
    else:
        wd = wc.astype(cdt)
    y = jax.lax.ragged_dot(x.astype(cdt), wd, sizes_c, precision=_precision(cdt),
                           preferred_element_type=jnp.float32)
    rg = _common.row_group_ids(group_sizes, m)
    valid = rg < e
    if bias is not None:
        b = jnp.take(bias, jnp.minimum(rg, e - 1), axis=0).astype(jnp.float32)
        y = y + b
    if epilogue == "swiglu":
        y = _swiglu_f32(y, alpha, limit)
    y = jnp.where(valid[:, None], y, 0.0)
    return y.astype(out_dtype)


# ------------------------------------------------------------------------------------------------------- dispatch
def _check_args(x, w, group_sizes, bias, epilogue):
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got {x.shape}")
    if isinstance(w, Int4Tensor):
        validate(w, name="grouped_matmul weight")
    if len(w.shape) != 3:
        raise ValueError(f"w must be [E, K, N], got {w.shape}")
    e, k, n = w.shape
    if x.shape[1] != k:
        raise ValueError(f"x K={x.shape[1]} does not match w K={k}")
    if group_sizes.shape != (e,):
        raise ValueError(f"group_sizes must be [{e}], got {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError("group_sizes must be integer")
    if bias is not None and tuple(bias.shape) != (e, n):
        raise ValueError(f"bias must be [{e}, {n}], got {bias.shape}")
    if epilogue not in (None, "swiglu"):
        raise ValueError(f"unknown epilogue {epilogue!r}")
    if epilogue == "swiglu" and n % 2:
        raise ValueError("swiglu epilogue needs an even N")


def _kernel_operands(x, w):
    cdt = _compute_dtype(x, w)
    if isinstance(w, Int4Tensor):
        return x.astype(cdt), w.packed, w.scales, w.zeros, w.group_size
    return x.astype(cdt), w.astype(cdt), None, None, None


def grouped_matmul(x, w, group_sizes, *, bias=None, epilogue: str | None = None,
                   swiglu_alpha: float = SWIGLU_ALPHA, swiglu_limit: float = SWIGLU_LIMIT,
                   implementation: str | None = None, tiling: Any = None, out_dtype=None,
                   interpret: Any = None):
    """Ragged (megablox) matmul: rows [off_e, off_e + group_sizes[e]) of x times w[e]; rows >= sum -> 0.

    Args:
      x: [M, K] activations, rows sorted by group.
      w: [E, K, N] float array or Int4Tensor.
      group_sizes: int32 [E].
      bias: optional [E, N]; every row gets its group's bias.
      epilogue: None or "swiglu" (output [M, N/2]: clamped SwiGLU of even=gate / odd=up columns).
      implementation: None (by backend), "xla", "tpu" or "gpu".
      tiling: kernel tiling (dict; "tpu": tm/tk/tn, "gpu": bm/bk/bn/num_warps/num_stages); None = defaults.
      out_dtype: default x.dtype.
      interpret: for "tpu"/"gpu" off their hardware: True (or InterpretParams for tpu) to run in interpret mode;
        None = interpret automatically when the backend does not match.
    """
    _check_args(x, w, group_sizes, bias, epilogue)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    auto = implementation is None
    impl = default_implementation() if auto else implementation
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    group_sizes = group_sizes.astype(jnp.int32)
    if x.shape[0] == 0:
        n_out = w.shape[2] // 2 if epilogue == "swiglu" else w.shape[2]
        return jnp.zeros((0, n_out), out_dtype)
    if impl == "xla":
        return _grouped_xla(x, w, group_sizes, bias, epilogue, swiglu_alpha, swiglu_limit, out_dtype)
    xk, packed, scales, zeros, gsz = _kernel_operands(x, w)
    if impl == "gpu":
        from . import _gpu
        if auto and not isinstance(w, Int4Tensor):
            # The float-weight variant of the GPU kernel is tested in interpret mode only (never compiled and timed
            # on a GPU), so auto mode keeps XLA's ragged_dot (on the compacted experts) for 16-bit weights.
            return _grouped_xla(x, w, group_sizes, bias, epilogue, swiglu_alpha, swiglu_limit, out_dtype)
        if not _gpu.supports(x.shape, w.shape, gsz):
            if auto:
                return _grouped_xla(x, w, group_sizes, bias, epilogue, swiglu_alpha, swiglu_limit, out_dtype)
            raise ValueError(f"gpu kernel does not support x {x.shape}, w {w.shape}, group {gsz}")
        if interpret is None:
            interpret = jax.default_backend() not in ("gpu", "cuda")
        return _gpu.grouped_matmul_gpu(xk, packed, scales, zeros, gsz, group_sizes, bias, epilogue=epilogue,
                                       alpha=swiglu_alpha, limit=swiglu_limit, out_dtype=out_dtype, tiling=tiling,
                                       interpret=bool(interpret))
    from . import _tpu
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    return _tpu.grouped_matmul_tpu(xk, packed, scales, zeros, gsz, group_sizes, bias, epilogue=epilogue,
                                   alpha=swiglu_alpha, limit=swiglu_limit, out_dtype=out_dtype, tiling=tiling,
                                   interpret=interpret)


def dense_matmul(x, w, bias=None, *, implementation: str | None = None, tiling: Any = None, out_dtype=None,
                 interpret: Any = None):
    """x [M, K] @ w [K, N] (+ bias [N]); w a float array or Int4Tensor [K, N]."""
    if x.ndim != 2 or len(w.shape) != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"dense_matmul: x {x.shape} and w {tuple(w.shape)} do not match")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    impl = implementation or default_implementation()
    if implementation is None and impl == "gpu":
        # Measured on H200 (docs/BENCHMARKS.md): for the attention projections XLA's dequantize + dot (XLA fuses
        # the dequantization into its GEMM) is as fast or faster than the Pallas kernel at batch 1 and clearly
        # faster at batch 8..256 (e.g. q 2880->4096 at 64 tokens: 12.7 vs 22.2 us), so auto picks "xla" on GPU.
        impl = "xla"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "xla":
        cdt = _compute_dtype(x, w)
        wd = dequantize(w, cdt) if isinstance(w, Int4Tensor) else w.astype(cdt)
        y = jnp.dot(x.astype(cdt), wd, precision=_precision(cdt), preferred_element_type=jnp.float32)
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        return y.astype(out_dtype)
    w3 = _as_expert_int4(w) if isinstance(w, Int4Tensor) else w[None]
    b2 = None if bias is None else bias[None]
    gs = jnp.full((1,), x.shape[0], jnp.int32)
    return grouped_matmul(x, w3, gs, bias=b2, implementation=None if implementation is None else impl,
                          tiling=tiling, out_dtype=out_dtype, interpret=interpret)
