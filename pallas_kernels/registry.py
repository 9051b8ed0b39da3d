"""Registry of matmul implementations (tokamax style): the XLA base op plus one small class per Pallas backend.

Each implementation has a name, the lowering platforms it compiles for (``supported_on``), a typed tiling
(``tiling_cls``) and ``supports(call, tiling)`` / ``why_not(call, tiling)``, a static check of one call's shapes
(a :class:`MatmulCall`) made before anything is traced, so an unsupported call never reaches the kernel.

Auto mode walks :data:`AUTO_ORDER` for each lowering platform and takes the first implementation that supports the
call; ``ops`` then binds the choices with ``jax.lax.platform_dependent``, so the platform being *lowered for*
decides (a CPU host exporting for TPU gets the Mosaic kernel), not ``jax.default_backend()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from . import _gpu, _gpu_dense, _gpu_gemv, _gpu_grouped, _tpu, _xla
from .int4_layout import Int4Tensor


class UnsupportedCallError(ValueError):
    """An explicitly requested implementation cannot run this call (shape, group size, tiling); the message names
    the implementation, the call's shapes and the reason. Auto mode never raises it: it falls back instead."""


@dataclasses.dataclass(frozen=True)
class MatmulCall:
    """Static description of one matmul call (all that ``supports`` may look at).

    op: "dense" (x [m, k] @ w [k, n]) or "grouped" (w [num_groups, k, n]). group_size: the int4 group size, None
    for float weights. dtype: the compute dtype (x's for int4 weights). epilogue: None or "swiglu".
    """

    op: str
    m: int
    k: int
    n: int
    num_groups: int
    group_size: int | None
    symmetric: bool
    dtype: str
    epilogue: str | None = None
    has_bias: bool = False

    @classmethod
    def of(cls, op: str, x, w, bias=None, epilogue=None) -> "MatmulCall":
        int4 = isinstance(w, Int4Tensor)
        shape = tuple(w.shape)
        e = 1 if op == "dense" else shape[0]
        return cls(op, int(x.shape[0]), int(x.shape[1]), int(shape[-1]), int(e),
                   int(w.group_size) if int4 else None, bool(int4 and w.zeros is None),
                   jnp.dtype(_xla.compute_dtype(x, w)).name, epilogue, bias is not None)

    def describe(self) -> str:
        if self.group_size is None:
            wdesc = "float weights"
        else:
            wdesc = f"int4 group size {self.group_size} ({'sym' if self.symmetric else 'asym'})"
        wshape = f"[{self.k}, {self.n}]" if self.op == "dense" else f"[{self.num_groups}, {self.k}, {self.n}]"
        epi = f", epilogue={self.epilogue}" if self.epilogue else ""
        return f"{self.op}_matmul x [{self.m}, {self.k}] {self.dtype}, w {wshape} {wdesc}{epi}"


class Implementation:
    """One way to compute the op. Subclasses set name / platforms / tiling_cls and implement why_not and run."""

    name: ClassVar[str]
    platforms: ClassVar[tuple[str, ...]]  # lowering platforms it compiles for ("*" = any)
    tiling_cls: ClassVar[type | None] = None

    def supported_on(self, platform: str) -> bool:
        """Whether the implementation compiles for this lowering platform ("cpu", "cuda", "rocm", "tpu")."""
        return "*" in self.platforms or platform in self.platforms

    def why_not(self, call: MatmulCall, tiling=None) -> str | None:
        """None when the call is supported, else the reason (one line)."""
        return None

    def supports(self, call: MatmulCall, tiling=None) -> bool:
        return self.why_not(call, tiling) is None

    def auto_eligible(self, call: MatmulCall) -> bool:
        """Whether auto mode may pick it for this call (beyond ``supports``): a measured or validation choice."""
        return True

    def tiling_for(self, tiling, strict: bool):
        """This backend's typed tiling from ``tiling`` (None / typed / dict). ``strict`` (explicit implementation):
        a tiling of another backend or with unknown fields raises ValueError; otherwise such a tiling is ignored
        (auto mode: a GpuTiling says nothing about the TPU kernel)."""
        if self.tiling_cls is None or tiling is None:
            if strict and tiling is not None:
                raise ValueError(f"implementation {self.name!r} takes no tiling, got {tiling!r}")
            return None
        if isinstance(tiling, Mapping) or isinstance(tiling, self.tiling_cls):
            try:
                return self.tiling_cls.coerce(tiling)
            except (ValueError, TypeError):
                if strict:
                    raise
                return None
        if strict:
            raise ValueError(f"implementation {self.name!r} takes a {self.tiling_cls.__name__}, got "
                             f"{type(tiling).__name__}")
        return None

    def run(self, call: MatmulCall, x, w, group_sizes, bias, *, epilogue, alpha, limit, out_dtype, tiling,
            interpret, layer=None):
        """layer: None, or the index into w / bias stacked over layers (ops.grouped_matmul's `layer`)."""
        raise NotImplementedError


class XlaMatmul(Implementation):
    """The base op (pure jnp: dequantize + dot / ragged_dot). Runs anywhere, supports every valid call."""

    name = "xla"
    platforms = ("*",)

    def run(self, call, x, w, group_sizes, bias, *, epilogue, alpha, limit, out_dtype, tiling, interpret,
            layer=None):
        if layer is not None:  # a dynamic slice XLA fuses into the dequantize / gather that reads it
            w, bias = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), (w, bias))
        if call.op == "dense":
            return _xla.dense_xla(x, w, bias, out_dtype)
        return _xla.grouped_xla(x, w, group_sizes, bias, epilogue, alpha, limit, out_dtype)


def _as_grouped(call, x, w, group_sizes, bias, layer=None):
    """Kernel operands: dense calls become one group of all M rows; int4 weights split into their arrays.

    With `layer` (operands stacked over layers) the layer axis is merged into the group axis — a free reshape — and
    the returned id offset (layer · groups) selects the layer's weights inside the kernel: nothing is copied."""
    if layer is not None:
        groups = 1 if call.op == "dense" else group_sizes.shape[0]
        flat = lambda a: None if a is None else a.reshape(-1, *a.shape[(1 if call.op == "dense" else 2):])  # noqa: E731
        if isinstance(w, Int4Tensor):
            w = Int4Tensor(flat(w.packed), flat(w.scales), flat(w.zeros), w.group_size)
        else:
            w = flat(w)
        bias = flat(bias)
        cdt = jnp.dtype(call.dtype)
        offset = (layer * groups).astype(jnp.int32)
        if isinstance(w, Int4Tensor):
            return x.astype(cdt), w.packed, w.scales, w.zeros, w.group_size, bias, offset
        return x.astype(cdt), w.astype(cdt), None, None, None, bias, offset
    if call.op == "dense":
        if isinstance(w, Int4Tensor):
            w = Int4Tensor(w.packed[None], w.scales[None], None if w.zeros is None else w.zeros[None], w.group_size)
        else:
            w = w[None]
        bias = None if bias is None else bias[None]
    cdt = jnp.dtype(call.dtype)
    if isinstance(w, Int4Tensor):
        return x.astype(cdt), w.packed, w.scales, w.zeros, w.group_size, bias, None
    return x.astype(cdt), w.astype(cdt), None, None, None, bias, None


class TpuMatmul(Implementation):
    """Pallas Mosaic TPU kernel (``_tpu.py``); tiling :class:`~gptoss_jax.kernels._tpu.TpuTiling`."""

    name = "tpu"
    platforms = ("tpu",)
    tiling_cls = _tpu.TpuTiling

    def why_not(self, call, tiling=None):
        if _tpu.pltpu is None:
            return "jax.experimental.pallas.tpu is not available"
        try:
            _tpu.resolve_tiling(tiling, call.m, call.k, call.n, call.group_size, call.dtype,
                                call.epilogue == "swiglu")
        except ValueError as err:
            return str(err)
        return None

    def run(self, call, x, w, group_sizes, bias, *, epilogue, alpha, limit, out_dtype, tiling, interpret,
            layer=None):
        xk, packed, scales, zeros, gsz, bias, off = _as_grouped(call, x, w, group_sizes, bias, layer)
        return _tpu.grouped_matmul_tpu(xk, packed, scales, zeros, gsz, group_sizes, bias, epilogue=epilogue,
                                       alpha=alpha, limit=limit, out_dtype=out_dtype, tiling=tiling,
                                       interpret=interpret, id_offset=off)


class GpuMatmul(Implementation):
    """Pallas GPU kernels, Triton lowering; tiling :class:`~gptoss_jax.kernels._gpu.GpuTiling`.

    int4 weights run the nibble-plane kernels when they accept the call and tiling: dense calls ``_gpu_dense.py``
    (small-M GEMV, masked K tail, several weights per launch), grouped calls ``_gpu_grouped.py``; everything else
    (float weights, tilings with bk < 128, group sizes that are not multiples of 8) runs ``_gpu.py`` (dense calls
    as one group)."""

    name = "gpu"
    platforms = ("cuda",)
    tiling_cls = _gpu.GpuTiling

    @staticmethod
    def _dense_kernel(call, tiling=None) -> bool:
        if call.op != "dense" or call.group_size is None:
            return False
        spec = _gpu_dense.WeightSpec((call.k, call.n), call.group_size)
        return _gpu_dense.why_not(call.m, call.k, [spec], tiling) is None

    @staticmethod
    def _planes_kernel(call, tiling=None) -> bool:
        if call.op != "grouped" or call.group_size is None:
            return False
        return _gpu_grouped.why_not(call.m, call.k, call.n, call.group_size, call.num_groups, tiling) is None

    def why_not(self, call, tiling=None):
        if not _gpu.AVAILABLE:
            return "jax.experimental.pallas.triton is not available"
        if self._dense_kernel(call, tiling) or self._planes_kernel(call, tiling):
            return None
        try:
            t = _gpu.resolve_tiling(tiling, call.m, call.k, call.n, call.group_size, call.num_groups)
        except ValueError as err:
            return str(err)
        if call.epilogue == "swiglu" and t.bn % 2:
            return f"bn={t.bn} must be even with the swiglu epilogue"
        return None

    def auto_eligible(self, call):
        # Float weights: the kernel's float variant passes interpret tests and lowers to Triton, but was never
        # compiled and timed on a GPU, so auto keeps XLA for 16-bit weights. Dense int4: the small-M kernel only
        # (decode, M <= _gpu_dense.AUTO_MAX_M); at prefill sizes XLA's GEMM with the dequantization fused wins.
        if call.group_size is None:
            return False
        if call.op == "dense":
            return call.m <= _gpu_dense.AUTO_MAX_M and self._dense_kernel(call)
        return True

    def run(self, call, x, w, group_sizes, bias, *, epilogue, alpha, limit, out_dtype, tiling, interpret,
            layer=None):
        compiled_interp = interpret is not False and interpret is not None
        if call.op == "dense" and tiling is None and _gpu_gemv.dense_eligible(call.m, call.k, [w]):
            return _gpu_gemv.dense_rowwise_gpu(x.astype(call.dtype), [w], [bias], out_dtype=out_dtype, layer=layer,
                                               interpret=compiled_interp)[0]
        if self._dense_kernel(call, tiling):
            return _gpu_dense.dense_int4_gpu(x.astype(call.dtype), [w], [bias], out_dtype=out_dtype, tiling=tiling,
                                             interpret=compiled_interp, layer=layer)[0]
        xk, packed, scales, zeros, gsz, bias, off = _as_grouped(call, x, w, group_sizes, bias, layer)
        if self._planes_kernel(call, tiling):
            return _gpu_grouped.grouped_int4_gpu(xk, packed, scales, zeros, gsz, group_sizes, bias, epilogue=epilogue,
                                                 alpha=alpha, limit=limit, out_dtype=out_dtype, tiling=tiling,
                                                 interpret=compiled_interp, id_offset=off)
        return _gpu.grouped_matmul_gpu(xk, packed, scales, zeros, gsz, group_sizes, bias, epilogue=epilogue,
                                       alpha=alpha, limit=limit, out_dtype=out_dtype, tiling=tiling,
                                       interpret=compiled_interp, id_offset=off)


REGISTRY: dict[str, Implementation] = {impl.name: impl for impl in (XlaMatmul(), TpuMatmul(), GpuMatmul())}

# Ordered fallback per op and lowering platform; any platform not listed gets ("xla",).
# dense on cuda: the small-M int4 kernel (_gpu_dense) first — inside a decode step XLA's int4 dense path writes a
# dequantized 16-bit copy of the weight to HBM before its GEMM (../shared/perf-notes.md); GpuMatmul.auto_eligible
# limits it to int4 weights and M <= _gpu_dense.AUTO_MAX_M, so prefill keeps XLA.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "grouped": {"tpu": ("tpu", "xla"), "cuda": ("gpu", "xla")},
    "dense": {"tpu": ("tpu", "xla"), "cuda": ("gpu", "xla")},
    # attention (gptoss_jax.kernels.attention): GPU flash kernel measured on an H200 (jax 0.11.2, BENCHMARKS.md
    # "Attention": correct in bf16 and f32, faster than both xla paths in every row, e.g. 32k causal prefill 35.7 vs
    # 241 ms); the TPU kernel is interpret-tested only, never run on a TPU, so auto keeps xla there.
    "attention": {"tpu": ("xla",), "cuda": ("gpu", "xla")},
}
KERNEL_PLATFORMS = ("tpu", "cuda")  # lowering platforms where auto mode may pick a kernel


def get(name: str) -> Implementation:
    """The registered implementation ``name``; ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"implementation must be one of {tuple(REGISTRY)}, got {name!r}") from None


def select(call: MatmulCall, platform: str, tiling=None) -> Implementation:
    """Auto mode: the first implementation in AUTO_ORDER[call.op][platform] that compiles for ``platform``, is
    auto-eligible and supports the call (the XLA base op always does)."""
    for name in AUTO_ORDER[call.op].get(platform, ("xla",)):
        impl = REGISTRY[name]
        if (impl.supported_on(platform) and impl.auto_eligible(call)
                and impl.supports(call, impl.tiling_for(tiling, strict=False))):
            return impl
    return REGISTRY["xla"]


def check_explicit(impl: Implementation, call: MatmulCall, tiling) -> Any:
    """The typed tiling for an explicit implementation; UnsupportedCallError naming the call if it cannot run."""
    t = impl.tiling_for(tiling, strict=True)
    reason = impl.why_not(call, t)
    if reason is not None:
        raise UnsupportedCallError(f"implementation={impl.name!r} does not support {call.describe()}: {reason}")
    return t

