"""Public matmul ops for gptoss-jax (tokamax style: one function, ``implementation=`` switch, pure-jnp base op).

``dense_matmul``   x [M, K] @ W [K, N] (+ bias) — attention projections.
``grouped_matmul`` megablox-style ragged matmul over experts, optional fused clamped-SwiGLU epilogue — MoE experts.

``W`` is a float array or an :class:`~gptoss_jax.kernels.int4_layout.Int4Tensor`. Implementations live in
:mod:`gptoss_jax.kernels.registry`: ``"xla"`` (the base op, ``_xla.py``), ``"tpu"`` (Pallas Mosaic, ``_tpu.py``),
``"gpu"`` (Pallas Triton, ``_gpu.py``).

Selection follows the platform being **lowered for** (``jax.lax.platform_dependent``), not
``jax.default_backend()`` (a caller that knows its platform may trace only that branch: ``_common.tracing_for``,
which the generation engine uses):

* ``implementation=None`` (auto): for each of tpu / cuda, the first implementation of ``registry.AUTO_ORDER`` that
  supports the call is compiled (never interpreted); every other platform runs "xla". So ``jax.export(...,
  platforms=["tpu"])`` on a CPU host emits Mosaic kernels while the same function runs "xla" on CPU.
* ``implementation="tpu"|"gpu"``: that kernel or :class:`~gptoss_jax.kernels.registry.UnsupportedCallError` (a
  ValueError naming the call) up front. With ``interpret=None`` it is compiled when lowering for its platform and
  runs in Pallas' generic interpreter elsewhere (no host callbacks, so the function still exports for the kernel's
  platform); ``interpret=True`` forces interpret mode (for tpu the more faithful TPU interpreter,
  ``pltpu.InterpretParams()``, which the kernel tests use), ``False`` forces compiled mode.
* The environment variable ``GPTOSS_KERNELS`` (``xla`` / ``tpu`` / ``gpu``; ``auto`` or empty = auto), read at trace
  time, acts as an explicit implementation whenever ``implementation`` is None (debugging / bisecting).

All paths accumulate in float32, add the bias in float32, apply the epilogue in float32 and cast once to
``out_dtype`` (default ``x.dtype``). Float32 inputs use ``Precision.HIGHEST`` / IEEE dots (no TF32).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from . import _common, _gpu_dense, _gpu_gemv, _gpu_norm, _gpu_router, registry
from .int4_layout import Int4Tensor, validate
from .registry import MatmulCall, UnsupportedCallError
from .swiglu import SWIGLU_ALPHA, SWIGLU_LIMIT, clamped_swiglu

IMPLEMENTATIONS = tuple(registry.REGISTRY)
ENV_VAR = "GPTOSS_KERNELS"

__all__ = ["IMPLEMENTATIONS", "SWIGLU_ALPHA", "SWIGLU_LIMIT", "UnsupportedCallError", "clamped_swiglu",
           "default_implementation", "dense_matmul", "dense_matmul_fused", "grouped_matmul", "rms_norm",
           "routed_matmul", "router_top_k"]


def _env_override() -> str | None:
    value = (os.environ.get(ENV_VAR) or "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in registry.REGISTRY:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {(*registry.REGISTRY, 'auto')}")
    return value


def default_implementation() -> str:
    """The implementation auto mode uses when lowering for ``jax.default_backend()`` ("tpu", "gpu" or "xla"; the
    ``GPTOSS_KERNELS`` override if set). Informational: a call's choice also depends on its shapes (an unsupported
    call falls back to "xla") and follows the platform being lowered for."""
    forced = _env_override()
    if forced:
        return forced
    backend = jax.default_backend()
    platform = "cuda" if backend == "gpu" else backend
    order = registry.AUTO_ORDER["grouped"].get(platform, ("xla",))
    return next(n for n in order if registry.REGISTRY[n].supported_on(platform))


# ------------------------------------------------------------------------------------------------------- dispatch
def _check_grouped_args(x, w, group_sizes, bias, epilogue):
    if x.ndim != 2:
        raise ValueError(f"grouped_matmul: x must be [M, K], got {x.shape}")
    if isinstance(w, Int4Tensor):
        validate(w, name="grouped_matmul weight")
    if len(w.shape) != 3:
        raise ValueError(f"grouped_matmul: w must be [E, K, N], got {tuple(w.shape)}")
    e, k, n = w.shape
    if x.shape[1] != k:
        raise ValueError(f"grouped_matmul: x K={x.shape[1]} does not match w K={k}")
    if group_sizes.shape != (e,):
        raise ValueError(f"grouped_matmul: group_sizes must be [{e}], got {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"grouped_matmul: group_sizes must be integer, got {group_sizes.dtype}")
    if bias is not None and tuple(bias.shape) != (e, n):
        raise ValueError(f"grouped_matmul: bias must be [{e}, {n}], got {bias.shape}")
    if epilogue not in (None, "swiglu"):
        raise ValueError(f"grouped_matmul: unknown epilogue {epilogue!r} (None or 'swiglu')")
    if epilogue == "swiglu" and n % 2:
        raise ValueError(f"grouped_matmul: the swiglu epilogue needs an even N, got {n}")


def _layer_view(a):
    """The abstract per-layer view of a stacked operand (leading layer axis dropped), for argument checks."""
    if a is None:
        return None
    if isinstance(a, Int4Tensor):
        return Int4Tensor(*(None if t is None else jax.ShapeDtypeStruct(t.shape[1:], t.dtype)
                            for t in (a.packed, a.scales, a.zeros)), a.group_size)
    return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)


def _dispatch(call: MatmulCall, x, w, group_sizes, bias, *, epilogue, alpha, limit, out_dtype, implementation,
              tiling, interpret, layer=None):
    kw = dict(epilogue=epilogue, alpha=alpha, limit=limit, out_dtype=out_dtype)
    if layer is not None:
        # Stacked operands (leading layer axis) and the layer index: every implementation reads layer `layer` in
        # place — the kernels by offsetting their weight ids, XLA by a dynamic slice fused into its consumers — so
        # a scan over layers never copies a layer's weights out of the stacked arrays.
        kw["layer"] = jnp.asarray(layer, jnp.int32)
    name = implementation if implementation is not None else _env_override()
    if name is not None:
        impl = registry.get(name)
        t = registry.check_explicit(impl, call, tiling)
        if interpret is not None or "*" in impl.platforms:
            return impl.run(call, x, w, group_sizes, bias, tiling=t, interpret=interpret, **kw)

        # Compiled when lowering for the kernel's own platform, interpreted on every other one.
        def compiled(x_, w_, gs_, b_):
            return impl.run(call, x_, w_, gs_, b_, tiling=t, interpret=False, **kw)

        def interpreted(x_, w_, gs_, b_):
            # "portable": an interpreter without host callbacks (see _tpu._interpret_arg), so that the function
            # still lowers for the kernel's own platform.
            return impl.run(call, x_, w_, gs_, b_, tiling=t, interpret="portable", **kw)

        return _common.platform_switch(x, w, group_sizes, bias, default=interpreted,
                                          **{p: compiled for p in impl.platforms})

    branches = {}
    for platform in registry.KERNEL_PLATFORMS:
        impl = registry.select(call, platform, tiling)
        if impl.name != "xla":
            branches[platform] = _bind(impl, call, impl.tiling_for(tiling, strict=False), kw)
    base = _bind(registry.REGISTRY["xla"], call, None, kw)
    if not branches:
        return base(x, w, group_sizes, bias)
    return _common.platform_switch(x, w, group_sizes, bias, default=base, **branches)


def _bind(impl, call, tiling, kw):
    def fn(x_, w_, gs_, b_):
        return impl.run(call, x_, w_, gs_, b_, tiling=tiling, interpret=False, **kw)
    return fn


def grouped_matmul(x, w, group_sizes, *, bias=None, epilogue: str | None = None,
                   swiglu_alpha: float = SWIGLU_ALPHA, swiglu_limit: float = SWIGLU_LIMIT,
                   implementation: str | None = None, tiling: Any = None, out_dtype=None,
                   interpret: Any = None, layer=None):
    """Ragged (megablox) matmul: rows [off_e, off_e + group_sizes[e]) of x times w[e]; rows >= sum -> 0.

    Args:
      x: [M, K] activations, rows sorted by group.
      w: [E, K, N] float array or Int4Tensor.
      group_sizes: int [E].
      bias: optional [E, N]; every row gets its group's bias.
      epilogue: None or "swiglu" (output [M, N/2]: clamped SwiGLU of even=gate / odd=up columns, see
        :mod:`gptoss_jax.kernels.swiglu`).
      implementation: None (auto, per lowering platform), "xla", "tpu" or "gpu" (see the module docstring).
      tiling: ``TpuTiling`` / ``GpuTiling`` (or a dict of their fields); None = defaults. In auto mode a tiling of
        one backend is ignored by the others.
      out_dtype: default x.dtype.
      interpret: for "tpu"/"gpu": None = compiled on their platform, interpreted elsewhere; True / False forces.
      layer: None, or an int32 scalar (traced) when ``w`` and ``bias`` are stacked over layers ([L, E, K, N],
        [L, E, N]): layer ``layer`` is used, read in place (a scan over layers copies no weights).

    Returns:
      [M, N] (or [M, N/2] with swiglu) in out_dtype.

    Raises:
      ValueError: bad shapes / dtypes / epilogue / implementation name;
      UnsupportedCallError (a ValueError): an explicit implementation does not support the call.
    """
    wv, bv = (w, bias) if layer is None else (_layer_view(w), _layer_view(bias))
    _check_grouped_args(x, wv, group_sizes, bv, epilogue)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if implementation is not None:
        registry.get(implementation)
    group_sizes = group_sizes.astype(jnp.int32)
    if x.shape[0] == 0:
        n_out = wv.shape[2] // 2 if epilogue == "swiglu" else wv.shape[2]
        return jnp.zeros((0, n_out), out_dtype)
    call = MatmulCall.of("grouped", x, wv, bv, epilogue)
    return _dispatch(call, x, w, group_sizes, bias, epilogue=epilogue, alpha=swiglu_alpha, limit=swiglu_limit,
                     out_dtype=out_dtype, implementation=implementation, tiling=tiling, interpret=interpret,
                     layer=layer)


def dense_matmul(x, w, bias=None, *, implementation: str | None = None, tiling: Any = None, out_dtype=None,
                 interpret: Any = None, layer=None):
    """x [M, K] @ w [K, N] (+ bias [N]) -> [M, N] in out_dtype (default x.dtype); w a float array or Int4Tensor.

    ``implementation``, ``tiling``, ``interpret`` and ``layer`` (w [L, K, N], bias [L, N] stacked over layers) as
    in :func:`grouped_matmul` (kernels run the call as one group). Raises ValueError on mismatched shapes,
    UnsupportedCallError for an explicit implementation that does not support the call."""
    stacked_w, stacked_b = w, bias
    if layer is not None:
        w, bias = _layer_view(w), _layer_view(bias)
    if x.ndim != 2 or len(w.shape) != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"dense_matmul: x {x.shape} and w {tuple(w.shape)} do not match")
    if isinstance(w, Int4Tensor):
        validate(w, name="dense_matmul weight")
    if bias is not None and tuple(bias.shape) != (w.shape[1],):
        raise ValueError(f"dense_matmul: bias must be [{w.shape[1]}], got {tuple(bias.shape)}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if implementation is not None:
        registry.get(implementation)
    if x.shape[0] == 0:
        return jnp.zeros((0, w.shape[1]), out_dtype)
    call = MatmulCall.of("dense", x, w, bias)
    gs = jnp.full((1,), x.shape[0], jnp.int32)
    return _dispatch(call, x, stacked_w, gs, stacked_b, epilogue=None, alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT,
                     out_dtype=out_dtype, implementation=implementation, tiling=tiling, interpret=interpret,
                     layer=layer)


def dense_matmul_fused(x, ws, biases=None, *, implementation: str | None = None, tiling: Any = None,
                       out_dtype=None, interpret: Any = None, layer=None) -> tuple:
    """``tuple(dense_matmul(x, w_i, b_i) for each weight)``, as ONE kernel launch where possible (q, k, v).

    x [M, K]; ws: a sequence of weights [K, N_i] (float or Int4Tensor; [L, K, N_i] with ``layer``); biases: None or
    a sequence of None / [N_i] ([L, N_i]). Returns a tuple of [M, N_i] in out_dtype (default x.dtype), each equal to
    the separate ``dense_matmul`` call (float32 accumulation, bias in float32, one cast).

    On cuda, auto mode runs every weight in one launch of the small-M int4 kernel (``_gpu_dense``) when all weights
    are int4 with the same K and M <= ``_gpu_dense.AUTO_MAX_M``; the weights stay separate arrays (nothing is
    concatenated or copied). Everywhere else, and for any call that kernel refuses, it is the separate calls.
    ``implementation="gpu"`` forces the fused kernel (UnsupportedCallError if it cannot run the call; interpreted
    off cuda, as in :func:`grouped_matmul`); ``"xla"`` / ``"tpu"`` make the separate calls with that implementation.

    Raises ValueError for mismatched shapes (naming the weight's index) and UnsupportedCallError as above.
    """
    ws = list(ws)
    if not ws:
        raise ValueError("dense_matmul_fused: ws is empty")
    biases = [None] * len(ws) if biases is None else list(biases)
    if len(biases) != len(ws):
        raise ValueError(f"dense_matmul_fused: {len(biases)} biases for {len(ws)} weights")
    views = ws if layer is None else [_layer_view(w) for w in ws]
    for i, (w, b) in enumerate(zip(views, biases if layer is None else [_layer_view(b) for b in biases])):
        if x.ndim != 2 or len(w.shape) != 2 or x.shape[1] != w.shape[0]:
            raise ValueError(f"dense_matmul_fused: x {x.shape} and ws[{i}] {tuple(w.shape)} do not match")
        if b is not None and tuple(b.shape) != (w.shape[1],):
            raise ValueError(f"dense_matmul_fused: biases[{i}] must be [{w.shape[1]}], got {tuple(b.shape)}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    name = _chosen(implementation)

    def separate(impl, interp=interpret):
        return tuple(dense_matmul(x, w, b, implementation=impl, tiling=tiling, out_dtype=out_dtype, interpret=interp,
                                  layer=layer) for w, b in zip(ws, biases))

    int4 = all(isinstance(w, Int4Tensor) for w in ws)
    t = registry.REGISTRY["gpu"].tiling_for(tiling, strict=name == "gpu")
    reason = _gpu_dense.why_not(x.shape[0], x.shape[1], views, t) if int4 else "the fused kernel takes int4 weights"
    if name is not None and name != "gpu":
        return separate(name)
    if x.shape[0] == 0:
        return tuple(jnp.zeros((0, w.shape[1]), out_dtype) for w in views)
    lay = None if layer is None else jnp.asarray(layer, jnp.int32)

    def fused(interp):
        def fn(x_):
            for w in ws:
                validate(w, name="dense_matmul_fused weight")
            if _gpu_gemv.dense_eligible(x.shape[0], x.shape[1], views):
                return _gpu_gemv.dense_rowwise_gpu(x_.astype(x.dtype), ws, biases, out_dtype=out_dtype, layer=lay,
                                                   interpret=interp)
            return _gpu_dense.dense_int4_gpu(x_.astype(x.dtype), ws, biases, out_dtype=out_dtype, tiling=t,
                                             interpret=interp, layer=lay)
        return fn

    if name == "gpu":
        if reason is not None:
            shapes = ", ".join(f"[{w.shape[0]}, {w.shape[1]}]" for w in views)
            raise UnsupportedCallError(f"implementation='gpu' does not support dense_matmul_fused x "
                                       f"[{x.shape[0]}, {x.shape[1]}] {x.dtype}, ws {shapes}: {reason}")
        if interpret is not None:
            return fused(bool(interpret))(x)
        return _common.platform_switch(x, default=fused(True), cuda=fused(False))
    if reason is not None or x.shape[0] > _gpu_dense.AUTO_MAX_M:
        return separate(None)
    return _common.platform_switch(x, default=lambda x_: separate(None), cuda=fused(False))


def _chosen(implementation: str | None) -> str | None:
    """The explicit implementation (argument, else ``GPTOSS_KERNELS``), checked against the registry; None = auto."""
    name = implementation if implementation is not None else _env_override()
    if name is not None:
        registry.get(name)
    return name


def _decode_kernel_or_base(x, name, reason, auto_ok: bool, kernel, base, interpret, what: str):
    """The binding the decode-only GPU kernels share (routed_matmul, router_top_k, rms_norm): ``kernel(interp)``
    builds the Pallas call, ``base`` the fallback. "gpu": the kernel (UnsupportedCallError naming ``what`` when
    ``reason``), compiled on cuda and interpreted elsewhere unless ``interpret`` says; another explicit name, a
    reason or ``not auto_ok``: ``base``; auto: the kernel on cuda, ``base`` elsewhere."""
    if name == "gpu":
        if reason is not None:
            raise UnsupportedCallError(f"implementation='gpu' does not support {what}: {reason}")
        if interpret is not None:
            return kernel(bool(interpret))(x)
        return _common.platform_switch(x, default=kernel(True), cuda=kernel(False))
    if name is not None or reason is not None or not auto_ok:
        return base(x)
    return _common.platform_switch(x, default=base, cuda=kernel(False))


def routed_matmul(x, w, expert_ids, *, rows=None, bias=None, epilogue: str | None = None,
                  swiglu_alpha: float = SWIGLU_ALPHA, swiglu_limit: float = SWIGLU_LIMIT,
                  implementation: str | None = None, tiling: Any = None, out_dtype=None, interpret: Any = None,
                  layer=None, combine_weights=None):
    """MoE matmul straight from the router: row r = x[rows[r]] @ w[expert_ids[r]] (+ bias[expert_ids[r]]).

    Args:
      x: [M, K] activations (tokens; not sorted).
      w: [E, K, N] float array or Int4Tensor ([L, E, K, N] with ``layer``).
      expert_ids: int [R], one expert per output row; an id outside [0, E) gives a zero row (an assignment to an
        expert another shard holds).
      rows: int [R], the x row of each output row; or a Python int k: row r reads ``x[r // k]`` (the token of a
        (token, expert) assignment of the router's flattened top-k; R = M·k; the kernel computes it, no index
        array); default ``range(R)`` (then R must equal M).
      bias, epilogue, swiglu_alpha, swiglu_limit, out_dtype, layer: as in :func:`grouped_matmul`.
      implementation: None (auto), "xla", "tpu" or "gpu". "gpu" is the row-wise int4 GEMV kernel
        (``_gpu_gemv``, int4 weights whose group size / 8 is a power of two; interpreted off cuda unless
        ``interpret`` says otherwise). Every other implementation — and auto mode, except on cuda for int4 calls with
        at most ``_gpu_gemv.auto_limits()[0]`` rows — sorts the rows by expert and runs :func:`grouped_matmul` with
        that implementation, then un-sorts: the same result, more kernels.

      combine_weights: None, or float [T, k] with R = T·k (no epilogue): the MoE combine — returns each token's
        weighted sum over its k rows, ``sum_j combine_weights[t, j] · row(t·k + j)``, as float32 [T, N] (the GPU
        kernel applies the weights to its partial sums: no [R, N] rows are written).

    Returns:
      [R, N] (or [R, N/2] with swiglu) in out_dtype (default x.dtype); with combine_weights [T, N] float32.

    Raises:
      ValueError: bad shapes or arguments; UnsupportedCallError: "gpu" cannot run the call.
    """
    wv, bv = (w, bias) if layer is None else (_layer_view(w), _layer_view(bias))
    ids = jnp.asarray(expert_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"routed_matmul: expert_ids must be an int vector [R], got {ids.dtype} {ids.shape}")
    r = ids.shape[0]
    if rows is None:
        if x.shape[0] != r:
            raise ValueError(f"routed_matmul: without rows, x needs one row per id: x {x.shape}, {r} ids")
        rows = 1
    if isinstance(rows, int) and not isinstance(rows, bool):
        if rows < 1 or r != x.shape[0] * rows:
            raise ValueError(f"routed_matmul: rows={rows} (row r reads x[r // {rows}]) needs R = M · {rows}; got "
                             f"x {x.shape}, {r} ids")
        row_div = rows
        rows = jnp.arange(r, dtype=jnp.int32) // row_div  # for the sorted path (the kernel computes it itself)
    else:
        row_div = None
        rows = jnp.asarray(rows, jnp.int32)
    if rows.shape != (r,):
        raise ValueError(f"routed_matmul: rows must be [{r}], got {rows.shape}")
    e = wv.shape[0]
    _check_grouped_args(x, wv, jax.ShapeDtypeStruct((e,), jnp.int32), bv, epilogue)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    ids = ids.astype(jnp.int32)
    if combine_weights is not None:
        combine_weights = jnp.asarray(combine_weights, jnp.float32)
        if epilogue is not None or combine_weights.ndim != 2 or combine_weights.size != r:
            raise ValueError(f"routed_matmul: combine_weights must be [T, k] with T·k = {r} rows and no epilogue, "
                             f"got {tuple(combine_weights.shape)} (epilogue {epilogue!r})")
    name = _chosen(implementation)
    swiglu = dict(epilogue=epilogue, alpha=swiglu_alpha, limit=swiglu_limit)

    def combined(y):  # the combine on rows (paths without the kernel's)
        if combine_weights is None:
            return y
        t_, k_ = combine_weights.shape
        return jnp.sum(y.astype(jnp.float32).reshape(t_, k_, -1) * combine_weights[..., None], axis=1)

    def kernel(interp):
        def fn(x_):
            return _gpu_gemv.routed_int4_gpu(x_, w, ids, rows if row_div is None else row_div, bias,
                                             out_dtype=out_dtype, layer=layer, tiling=tiling,
                                             combine_weights=combine_weights,
                                             interpret=interp, **swiglu)
        return fn

    def sorted_path(impl):
        def fn(x_):
            live = jnp.logical_and(ids >= 0, ids < e)
            key = jnp.where(live, ids, e)
            order = jnp.argsort(key, stable=True)
            sizes = jnp.bincount(key, length=e + 1)[:e].astype(jnp.int32)
            y = grouped_matmul(x_[rows[order]], w, sizes, bias=bias, epilogue=epilogue, swiglu_alpha=swiglu_alpha,
                               swiglu_limit=swiglu_limit, implementation=impl, out_dtype=out_dtype, interpret=interpret, layer=layer)
            return combined(jnp.zeros_like(y).at[order].set(y))  # rows past the groups (dead ids): zeros
        return fn

    int4 = isinstance(w, Int4Tensor)
    reason = _gpu_gemv.why_not(wv.shape[1], [wv.group_size], tiling) if int4 else "the kernel takes int4 weights"
    return _decode_kernel_or_base(x, name, reason, r <= _gpu_gemv.auto_limits()[0], kernel, sorted_path(name),
                                  interpret, f"routed_matmul x {tuple(x.shape)}, w {tuple(wv.shape)}")


def _router_xla(x, w, bias, k: int):
    """The base op: XLA dot (bf16 x bf16 with float32 accumulation — the products are exact in float32 — else a
    float32 HIGHEST dot), bias in float32, ``lax.top_k``, softmax over the k logits."""
    if x.dtype == w.dtype == jnp.bfloat16:
        logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
    else:
        logits = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    top, ids = jax.lax.top_k(logits + bias.astype(jnp.float32), k)
    return ids.astype(jnp.int32), jax.nn.softmax(top, axis=-1)


def router_top_k(x, w, bias, k: int, *, layer=None, implementation: str | None = None, tiling: Any = None,
                 interpret: Any = None):
    """The MoE router: logits = x W + b (float32), the k largest per token, softmax over those k logits
    (transformers' ``GptOssTopKRouter``; float64 reference ``reference.router_top_k_f64``).

    Args:
      x: [N, H] activations. w: [H, E] float router weight ([L, H, E] with ``layer``); bias: [E] ([L, E]).
      k: experts per token (static). layer: None, or an int32 scalar: w / bias are stacked over layers and this
        layer is read in place.
      implementation: None (auto: on cuda, for at most ``_gpu_router.auto_max_tokens()`` (16) tokens, the two Pallas
        kernels of ``_gpu_router`` — logits as a split-K GEMV, then top-k + softmax — else the XLA base op), "xla",
        "gpu" (the kernels; interpreted off cuda unless ``interpret`` says otherwise) or "tpu" (= "xla": TPU runs
        the XLA op). ``GPTOSS_KERNELS`` acts as ``implementation`` when None.
      tiling: ``_gpu_router.RouterTiling`` (or a dict of its fields) for "gpu".

    Returns:
      (ids int32 [N, k]: descending logits, ties to the lower expert id; weights float32 [N, k], rows sum to 1).

    Raises:
      ValueError: bad shapes; UnsupportedCallError: "gpu" cannot run the call.
    """
    wv = w if layer is None else _layer_view(w)
    bv = bias if layer is None else _layer_view(bias)
    if x.ndim != 2 or wv.ndim != 2 or x.shape[1] != wv.shape[0] or bv.shape != (wv.shape[1],):
        raise ValueError(f"router_top_k: expected x [N, H], w [H, E], bias [E] (stacked [L, ...] with layer), got "
                         f"x {tuple(x.shape)}, w {tuple(w.shape)}, bias {tuple(bias.shape)}")
    h, e = wv.shape
    if not 1 <= k <= e:
        raise ValueError(f"router_top_k: k={k} must be in [1, {e}]")
    name = _chosen(implementation)

    def base(x_):
        if layer is None:
            return _router_xla(x_, w, bias, k)
        return _router_xla(x_, w[layer], bias[layer], k)

    def kernel(interp):
        def fn(x_):
            return _gpu_router.router_top_k_gpu(x_, w, bias, k, layer=layer, tiling=tiling, interpret=interp)
        return fn

    reason = _gpu_router.why_not(h, e, k, tiling)
    return _decode_kernel_or_base(x, name, reason, x.shape[0] <= _gpu_router.auto_max_tokens(), kernel, base,
                                  interpret, f"router_top_k x {tuple(x.shape)}, w {tuple(wv.shape)}, k={k}")


def _rms_norm_xla(x, scale, eps: float):
    """The base op: float32 inside, cast back to x.dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * x32).astype(x.dtype)


def rms_norm(x, scale, eps: float, *, layer=None, implementation: str | None = None, interpret: Any = None):
    """RMSNorm: x · rsqrt(mean(x², -1) + eps) · scale, float32 inside, in x.dtype (transformers' GptOssRMSNorm).

    Args:
      x: [..., H]. scale: [H] ([L, H] with ``layer``, an int32 scalar: that layer's row, read in place). eps: float.
      implementation: None (auto: on cuda, for at most ``_gpu_norm.auto_max_rows()`` rows (16), the one-launch Pallas
        kernel of ``_gpu_norm``, else the XLA op), "xla", "gpu" (the kernel; interpreted off cuda unless
        ``interpret`` says otherwise) or "tpu" (= "xla"). ``GPTOSS_KERNELS`` acts as ``implementation`` when None.

    Returns: x's shape and dtype. Raises: ValueError for mismatched shapes; UnsupportedCallError when "gpu" cannot
    run the call.
    """
    sv = scale if layer is None else _layer_view(scale)
    h = x.shape[-1]
    if sv.shape != (h,):
        raise ValueError(f"rms_norm: scale must be [{h}] ([L, {h}] with layer), got {tuple(scale.shape)}")
    name = _chosen(implementation)
    rows = math.prod(x.shape[:-1])

    def base(x_):
        return _rms_norm_xla(x_, scale if layer is None else scale[layer], eps)

    def kernel(interp):
        def fn(x_):
            y = _gpu_norm.rms_norm_gpu(x_.reshape(rows, h), scale, eps, layer=layer, interpret=interp)
            return y.reshape(x_.shape)
        return fn

    reason = _gpu_norm.why_not(h)
    return _decode_kernel_or_base(x, name, reason, 0 < rows <= _gpu_norm.auto_max_rows(), kernel, base, interpret,
                                  f"rms_norm x {tuple(x.shape)}")



def decode_attention_update(q, k, v, cos, sin, positions, valid, k_cache, v_cache, pos_cache, sinks,
                            window: int | None = None, *, block, sink_layer=None, implementation: str | None = None,
                            interpret: Any = None, splits: int | None = None):
    """One decode step of gpt-oss attention: RoPE on the new query and key, the KV-cache write, and GQA attention
    with sinks over the updated cache (``_gpu_decode_attention``; semantics of ``gptoss_jax.rope.apply_rope`` +
    ``gptoss_jax.kv_cache.update_stacked_cache`` (T = 1) + :func:`gptoss_jax.kernels.attention.attention`).

    Args:
      q: [B, H, D] the new token's queries before RoPE; k, v: [B, KV, D] its keys (before RoPE) and values.
      cos, sin: float32 [B, D/2] rotary factors of each row's position (attention factor included).
      positions: int32 [B] (or [B, 1]) each row's position, ≥ 0; valid: bool [B] (or [B, 1]), False = write nothing.
      k_cache, v_cache: [NB, B, S, KV, D], pos_cache: int32 [NB, B, S] — a KV cache stacked over blocks;
        ``block`` (int32 scalar, may be traced) picks this layer's.
      sinks: [H] per-head sink logits, or [L, H] with ``sink_layer`` (int32 scalar: read in place).
      window: sliding window in tokens, None = full causal.
      implementation: None (auto: on cuda the one-launch Pallas kernel, for at most ``GPTOSS_DECODE_ATTENTION_MAX_ROWS``
        rows (4096); elsewhere, or with several devices, the base op: RoPE, scatter, then ``attention``), "xla" / "tpu" (the base op with that attention), "gpu" (the kernel;
        interpreted off cuda unless ``interpret`` says). ``GPTOSS_KERNELS`` acts as ``implementation`` when None.
      splits: the kernel's key-range split count (None: by cache length).

    Returns: (out [B, H, D] in q.dtype, k_cache, v_cache, pos_cache) — the caches updated (in place when donated or
    a loop carry).

    Raises: ValueError naming the argument for inconsistent shapes; UnsupportedCallError when "gpu" cannot run it.
    """
    from . import _gpu_decode_attention as gda  # noqa: PLC0415
    from .attention import attention  # noqa: PLC0415

    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"decode_attention_update: q must be [B, H, D] and k, v [B, KV, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, h, d = q.shape
    kv = k.shape[1]
    if h % kv:
        raise ValueError(f"decode_attention_update: {h} query heads are not a multiple of {kv} KV heads (k, v)")
    if k_cache.ndim != 5 or v_cache.shape != k_cache.shape or k_cache.shape[1] != b or k_cache.shape[3:] != (kv, d):
        raise ValueError(f"decode_attention_update: k_cache, v_cache must be [NB, {b}, S, {kv}, {d}]; got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if tuple(pos_cache.shape) != tuple(k_cache.shape[:3]):
        raise ValueError(f"decode_attention_update: pos_cache must be {tuple(k_cache.shape[:3])}, got "
                         f"{tuple(pos_cache.shape)}")
    if tuple(cos.shape) != (b, d // 2) or tuple(sin.shape) != (b, d // 2):
        raise ValueError(f"decode_attention_update: cos, sin must be [{b}, {d // 2}]; got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    positions, valid = jnp.reshape(positions, (-1,)), jnp.reshape(valid, (-1,))
    if positions.shape != (b,) or valid.shape != (b,):
        raise ValueError(f"decode_attention_update: positions and valid must be [{b}]; got {tuple(positions.shape)}, "
                         f"{tuple(valid.shape)}")
    if tuple(sinks.shape[-1:]) != (h,) or sinks.ndim != (1 if sink_layer is None else 2):
        raise ValueError(f"decode_attention_update: sinks must be [{h}] ([L, {h}] with sink_layer), got "
                         f"{tuple(sinks.shape)}")
    window = None if window is None else int(window)
    name = _chosen(implementation)
    if name is None and jax.device_count() > 1:
        name = "xla"  # pallas_call is not auto-partitioned (as attention's own rule)
    args = (k, v, cos, sin, positions, valid, k_cache, v_cache, pos_cache, sinks, window)

    def base(q_):
        fn = attention if name is None else functools.partial(attention, implementation=name)
        return gda.reference_decode_attention_update(q_, *args, block=block, sink_layer=sink_layer, attention_fn=fn)

    def kernel(interp):
        def fn(q_):
            return gda.decode_attention_update_gpu(q_, *args, block=block, sink_layer=sink_layer, splits=splits,
                                                   interpret=interp)
        return fn

    return _decode_kernel_or_base(q, name, gda.why_not(h, kv, d), b <= gda.auto_max_rows(), kernel, base, interpret,
                                  f"decode_attention_update q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
