"""Dense int4 matmul for small M (decode) on NVIDIA GPUs in Pallas, Triton lowering; several weights in one launch.

Why: XLA's int4 dense path on cuda dequantizes a whole 16-bit (or f32) copy of each weight into HBM every step
before its GEMM reads it back (../shared/perf-notes.md: q/o_proj [2880, 4096] bf16, 23.6 MB each, per layer). At
decode (M = batch <= 64) the op is a GEMV bound by reading the packed words once; this kernel dequantizes in
registers and reads every packed word, scale and zero point exactly once.

Layout (``int4_layout``): ``packed [L, K/8, N]`` int32, word row ``kw`` holds K rows ``8·kw + j`` in nibble ``j``.
Instead of interleaving the 8 nibbles of a word tile back into K order (a ``[bk/8, 8, bn] -> [bk, bn]`` reshape,
a register shuffle in Triton) the kernel keeps the 8 *nibble planes* ``q_j = (w >> 4j) & 15`` (each ``[bk/8, bn]``)
and multiplies plane ``j`` by the matching columns of x, permuted once outside the kernel:
``xp[j, m, kw] = x[m, 8·kw + j]`` (x is [M, K], a few KB). Then ``y = sum_j xp[j] @ dequant(q_j)``.

Grid = (M tiles, N tiles of all weights, K splits). K is walked in steps of ``bk`` (``bk/8`` word rows, a power of
two >= 128 so every plane dot has K >= 16); K need not be a multiple of ``bk`` (the tail is masked), so 2880 uses
256-row steps. Scales: when a K step lies inside one quantization group (``group/8`` a multiple of ``bk/8``, or
one group per column) the f32 partial product is scaled once per step; otherwise (``bk/8`` a multiple of
``group/8``) the ``[bk/group, bn]`` scale / zero rows are broadcast to ``[bk/8, bn]`` and applied per element.
Group sizes that are not multiples of 8, or that do not nest with the K step, are refused (``why_not``).

Several weights with the same K (q, k and v projections) run as ONE launch: program ``nt`` of the N axis belongs
to weight ``i`` when ``t_i <= nt < t_i + tiles_i`` (static ranges, one ``pl.when`` branch per weight). Each
program writes a float32 partial ``[splits, M, sum(tiles_i · bn)]``; one XLA fusion sums the splits, adds the
biases and casts (``dense_int4_gpu``'s epilogue), so no weight is copied or concatenated.

Weights stacked over layers (``[L, K/8, N]``, ``layer`` traced) are read in place: the layer index is a kernel
operand and selects ``packed[layer]`` in the pointer arithmetic.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common
from ._gpu import AVAILABLE, GpuTiling, pltriton

# Auto mode uses this kernel for dense int4 calls with at most this many rows (decode). Measured on H200 (jax 0.11.2,
# docs/BENCHMARKS.md "Decode kernels"): q+k+v at M = 1: 30 us fused vs 81 us XLA, o 18 vs 39 us; M = 8: q+k+v
# 47 vs 45 us, o 21 vs 34 us; M = 64: q+k+v 70 vs 58 us (the split-K partials cap leaves too few programs), so XLA
# keeps M > 16.
AUTO_MAX_M = 16
DEFAULT_BK = 256  # K rows per step: 32 word rows x bn int32 = 16 KB per load at bn = 128
MIN_BK = 128  # bk / 8 >= 16: Triton's smallest dot K
TARGET_PROGRAMS = 1024  # enough CTAs in flight for 132 SMs (several per SM hide the load latency)
INTERPRET_TARGET_PROGRAMS = 2


class WeightSpec(NamedTuple):
    """What :func:`why_not` reads of a weight: its logical shape [..., K, N] and int4 group size (None = float)."""

    shape: tuple
    group_size: int | None


def default_tiling(m: int) -> GpuTiling:
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    return GpuTiling(bm=bm, bk=DEFAULT_BK, bn=128, splits=None, num_warps=4, num_stages=3)


def _pow2(v) -> bool:
    return isinstance(v, int) and v > 0 and v & (v - 1) == 0


def scale_mode(k: int, group_size: int, bkw: int) -> str | None:
    """"step" (one scale row per K step), "expand" (bk/group rows broadcast per element) or None (unsupported)."""
    if group_size % 8:
        return None
    gw = group_size // 8
    if group_size == k or gw % bkw == 0:
        return "step"
    if bkw % gw == 0:
        return "expand"
    return None


def resolve_tiling(tiling, m: int, k: int, ns, group_sizes, weight_bytes: float = 0.0,
                   interpret: bool = False) -> GpuTiling:
    """The complete tiling for x [m, k] times weights [k, n_i] (int4, group sizes ``group_sizes``).

    The K step is the largest power of two <= bk (>= 128) with which every group size nests; raises ValueError with
    the reason otherwise (group size not a multiple of 8, or no such step; explicit non-power-of-two blocks)."""
    t = GpuTiling.coerce(tiling)
    d = default_tiling(m)
    t = GpuTiling(*(getattr(d, f.name) if getattr(t, f.name) is None else getattr(t, f.name)
                    for f in dataclasses.fields(GpuTiling)))
    for name in ("bm", "bk", "bn"):
        if not _pow2(getattr(t, name)):
            raise ValueError(f"{name}={getattr(t, name)} must be a power of two (Triton block shape)")
    if t.bm < 16 or t.bn < 16:
        raise ValueError(f"bm={t.bm} and bn={t.bn} must be >= 16 (Triton's smallest dot)")
    if t.splits is not None and (not isinstance(t.splits, int) or t.splits < 1):
        raise ValueError(f"splits={t.splits} must be a positive int")
    if k % 8:
        raise ValueError(f"K={k} is not a multiple of 8")
    bk = t.bk
    if bk < MIN_BK:
        raise ValueError(f"bk={bk} is below {MIN_BK} (each nibble plane's dot needs K >= 16)")
    while bk >= MIN_BK and any(scale_mode(k, g, bk // 8) is None for g in group_sizes):
        bk //= 2
    if bk < MIN_BK:
        raise ValueError(f"no K step >= {MIN_BK} nests with the group size(s) {sorted(set(group_sizes))} (K={k}; the "
                         "group size must be a multiple of 8)")
    tiles_m = _common.cdiv(m, t.bm)
    tiles_n = sum(_common.cdiv(n, t.bn) for n in ns)
    tiles_k = _common.cdiv(k // 8, bk // 8)
    splits = t.splits
    if splits is None:
        target = INTERPRET_TARGET_PROGRAMS if interpret else TARGET_PROGRAMS
        splits = _common.cdiv(target, tiles_m * tiles_n)
        if weight_bytes:  # keep the f32 partials well below the weight bytes (M = 64: [S, 64, N] adds up)
            splits = min(splits, max(1, int(weight_bytes / (4 * 4 * m * sum(ns)))))
    splits = max(1, min(int(splits), tiles_k))
    kps = _common.cdiv(tiles_k, splits)
    return dataclasses.replace(t, bk=bk, splits=_common.cdiv(tiles_k, kps))


def why_not(m: int, k: int, weights, tiling=None) -> str | None:
    """None when the kernel runs x [m, k] times every weight (Int4Tensor or WeightSpec: shape [..., k, n] and
    group_size), else the reason (one line)."""
    if not AVAILABLE:
        return "jax.experimental.pallas.triton is not available"
    if any(getattr(w, "group_size", None) is None for w in weights):
        return "the dense GPU kernel takes int4 weights only"
    ks = {int(w.shape[-2]) for w in weights}
    if ks != {k}:
        return f"every weight needs K={k}, got {sorted(ks)}"
    try:
        resolve_tiling(tiling, max(1, m), k, [int(w.shape[-1]) for w in weights], [w.group_size for w in weights])
    except ValueError as err:
        return str(err)
    return None


def _load(ref, mask=None, other=None):
    return pltriton.load(ref, mask=mask, other=other)


def _store(ref, val, mask=None):
    return pltriton.store(ref, val, mask=mask)


class Plan(NamedTuple):
    """Static shape of the K loop shared by the dense and grouped nibble-plane kernels."""

    bm: int  # rows per program
    bn: int  # columns per program
    bkw: int  # word rows (K / 8) per K step
    kw_total: int  # word rows of the weight (K / 8)
    kw_x: int  # columns per nibble plane of the permuted x ([M, 8 · kw_x])
    k: int
    cdt: object  # compute dtype of the dots
    prec: object  # dot precision (HIGHEST for f32)


def accumulate(x_ref, p_ref, s_ref, z_ref, wid, row0, rmask, n0, cmask, k_lo, k_hi, plan: Plan, *, group_size,
               has_zeros, mode):
    """f32 [bm, bn] = sum over K steps [k_lo, k_hi) of x rows [row0, row0 + bm) (masked by rmask) times the
    dequantized weight ``wid`` columns [n0, n0 + bn) (masked by cmask), one dot per nibble plane (module docstring).

    x_ref: [M, 8 · kw_x] permuted x; p_ref / s_ref / z_ref: [W, K/8, N] / [W, K/g, N] (z_ref None: symmetric)."""
    bm, bn, bkw, kw_total, kw_x, k, cdt, prec = plan
    g, has_z = group_size, has_zeros
    gw = g // 8

    def body(kt, acc):
        kw0 = kt * bkw
        kws = kw0 + jax.lax.broadcasted_iota(jnp.int32, (bkw,), 0)
        kmask = kws < kw_total
        words = _load(p_ref.at[wid, pl.ds(kw0, bkw), pl.ds(n0, bn)],
                      mask=jnp.logical_and(kmask[:, None], cmask[None, :]), other=0)
        xmask = jnp.logical_and(rmask[:, None], kmask[None, :])
        if mode == "step":  # one scale row per K step: scale the f32 partial product once
            srow = 0 if g == k else kw0 // gw
            s = _load(s_ref.at[wid, pl.ds(srow, 1), pl.ds(n0, bn)], mask=cmask[None, :],
                      other=0).astype(jnp.float32)
            if has_z:
                z = _load(z_ref.at[wid, pl.ds(srow, 1), pl.ds(n0, bn)], mask=cmask[None, :],
                          other=0).astype(jnp.int32)
            else:
                z = jnp.full((1, bn), 8, jnp.int32)
            part = jnp.zeros((bm, bn), jnp.float32)
            for j in range(8):
                xj = _load(x_ref.at[pl.ds(row0, bm), pl.ds(j * kw_x + kw0, bkw)], mask=xmask, other=0)
                qj = ((words >> (4 * j)) & 0xF) - z  # exact small integers in [-15, 15]
                part = part + jnp.dot(xj, qj.astype(cdt), precision=prec, preferred_element_type=jnp.float32)
            return acc + part * s
        # "expand": bk / g scale (and zero) rows broadcast to [bk/8, bn], applied per element as q·s − z·s
        ng = bkw // gw
        gmask = (kw0 // gw + jax.lax.broadcasted_iota(jnp.int32, (ng,), 0)) < kw_total // gw
        smask = jnp.logical_and(gmask[:, None], cmask[None, :])
        s = _load(s_ref.at[wid, pl.ds(kw0 // gw, ng), pl.ds(n0, bn)], mask=smask, other=0).astype(jnp.float32)
        s = jnp.broadcast_to(s[:, None, :], (ng, gw, bn)).reshape(bkw, bn)
        if has_z:
            z = _load(z_ref.at[wid, pl.ds(kw0 // gw, ng), pl.ds(n0, bn)], mask=smask, other=0).astype(jnp.float32)
            zs = jnp.broadcast_to(z[:, None, :], (ng, gw, bn)).reshape(bkw, bn) * s
        else:
            zs = 8.0 * s
        for j in range(8):
            xj = _load(x_ref.at[pl.ds(row0, bm), pl.ds(j * kw_x + kw0, bkw)], mask=xmask, other=0)
            qj = ((words >> (4 * j)) & 0xF).astype(jnp.float32)
            acc = acc + jnp.dot(xj, (qj * s - zs).astype(cdt), precision=prec, preferred_element_type=jnp.float32)
        return acc

    return jax.lax.fori_loop(k_lo, k_hi, body, jnp.zeros((bm, bn), jnp.float32))


def dense_int4_gpu(x, weights, biases, *, out_dtype, tiling=None, interpret=False, layer=None):
    """x [M, K] @ each int4 weight ([K, N_i], or [L, K, N_i] with ``layer``) + bias_i -> tuple of [M, N_i].

    weights: a sequence of Int4Tensor with the same K (group sizes and sym/asym may differ). biases: a sequence of
    None / [N_i] (or [L, N_i]). Accumulation float32, output cast once to ``out_dtype``. The compute dtype is x's
    (f32 dots use Precision.HIGHEST: IEEE, no TF32)."""
    weights = list(weights)
    biases = list(biases) if biases is not None else [None] * len(weights)
    m, k = x.shape
    stacked = layer is not None
    ns = [int(w.shape[-1]) for w in weights]
    wbytes = sum(w.nbytes / (w.packed.shape[0] if stacked else 1) for w in weights)
    t = resolve_tiling(tiling, m, k, ns, [w.group_size for w in weights], wbytes, interpret=bool(interpret))
    bm, bk, bn, splits = t.bm, t.bk, t.bn, t.splits
    bkw, kw_total = bk // 8, k // 8
    cdt = x.dtype
    prec = jax.lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None
    tiles_m = _common.cdiv(m, bm)
    tiles = [_common.cdiv(n, bn) for n in ns]
    starts = [sum(tiles[:i]) for i in range(len(tiles))]
    tiles_n = sum(tiles)
    tiles_k = _common.cdiv(kw_total, bkw)
    kps = _common.cdiv(tiles_k, splits)
    n_alloc = tiles_n * bn
    kw_x = tiles_k * bkw if interpret else kw_total  # columns per nibble plane of the permuted x
    plan = Plan(bm, bn, bkw, kw_total, kw_x, k, cdt, prec)
    specs = []  # per weight: (n, group_size, has_zeros, mode)
    for w, n in zip(weights, ns):
        specs.append((n, w.group_size, w.zeros is not None, scale_mode(k, w.group_size, bkw)))

    def kernel(*refs):
        layer_ref, x_ref = refs[0], refs[1]
        o_ref = refs[-1]
        wrefs, pos = [], 2
        for (_, _, has_z, _) in specs:
            wrefs.append((refs[pos], refs[pos + 1], refs[pos + 2] if has_z else None))
            pos += 3 if has_z else 2
        mt, nt, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        lid = layer_ref[0]
        row0 = mt * bm
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
        rmask = rows < m
        k_lo = sp * kps
        k_hi = jnp.minimum(k_lo + kps, tiles_k)

        def compute(i, local_nt):
            n, g, has_z, mode = specs[i]
            p_ref, s_ref, z_ref = wrefs[i]
            n0 = local_nt * bn
            cols = n0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
            cmask = cols < n
            acc = accumulate(x_ref, p_ref, s_ref, z_ref, lid, row0, rmask, n0, cmask, k_lo, k_hi, plan,
                             group_size=g, has_zeros=has_z, mode=mode)
            omask = jnp.logical_and(rmask[:, None], cmask[None, :])
            _store(o_ref.at[sp, pl.ds(row0, bm), pl.ds((starts[i] + local_nt) * bn, bn)], acc, mask=omask)

        _common.for_weight_tile(nt, starts, tiles, compute)

    # x permuted to nibble-plane order: xp[m, j, kw] = x[m, 8 kw + j] (a few KB; the weights are never touched),
    # flattened to [M, 8 · kw_x] so plane j starts at column j · kw_x.
    xp = jnp.swapaxes(x.reshape(m, kw_total, 8), 1, 2)
    lay = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    wargs = []
    for w in weights:
        arrs = [w.packed, w.scales] + ([w.zeros] if w.zeros is not None else [])
        if not stacked:  # a free leading axis: stacked and single weights share one kernel body
            arrs = [a[None] for a in arrs]
        wargs.append(arrs)
    m_rows = m
    if interpret:
        # The interpreter clamps out-of-range dynamic slices instead of masking pointers as Triton does: pad every
        # operand to whole tiles there (the kernel still masks against the true sizes).
        m_rows = tiles_m * bm
        kw_pad = tiles_k * bkw
        xp = jnp.pad(xp, ((0, m_rows - m), (0, 0), (0, kw_pad - kw_total)))
        for arrs, w, n in zip(wargs, weights, ns):
            npad = _common.cdiv(n, bn) * bn - n
            arrs[0] = jnp.pad(arrs[0], ((0, 0), (0, kw_pad - kw_total), (0, npad)))
            gw = w.group_size // 8
            g_pad = max(_common.cdiv(kw_pad, gw), arrs[1].shape[1]) - arrs[1].shape[1]
            for a in range(1, len(arrs)):
                arrs[a] = jnp.pad(arrs[a], ((0, 0), (0, g_pad), (0, npad)))
    xp = xp.reshape(xp.shape[0], -1)
    args = [lay, xp] + [a for arrs in wargs for a in arrs]
    kwargs = {}
    if not interpret:
        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, m_rows, n_alloc), jnp.float32),
        grid=(tiles_m, tiles_n, splits),
        interpret=interpret,
        name="int4_dense_matmul",
        **kwargs,
    )(*args)
    # One fusion: sum the K splits, add each bias, cast (XLA fuses the slices into it).
    y = jnp.sum(out, axis=0)[:m] if splits > 1 else out[0, :m]
    res = []
    for i, (n, b) in enumerate(zip(ns, biases)):
        yi = y[:, starts[i] * bn:starts[i] * bn + n]
        if b is not None:
            if stacked:
                b = jax.lax.dynamic_index_in_dim(b, layer, 0, keepdims=False)
            yi = yi + b.astype(jnp.float32)[None, :]
        res.append(yi.astype(out_dtype))
    return tuple(res)
