"""Grouped (ragged, MoE) int4 matmul for NVIDIA GPUs in Pallas, Triton lowering, over nibble planes.

The decode-oriented successor of ``_gpu.py``'s int4 path (which stays for float weights and for group sizes this
kernel refuses). It shares the K loop of the dense kernel (``_gpu_dense.accumulate``):

* no nibble interleave: the 8 planes ``q_j = (w >> 4j) & 15`` of a ``[bk/8, bn]`` word tile are multiplied by the
  matching columns of x, permuted once outside the kernel (``xp[m, j, kw] = x[m, 8·kw + j]``);
* wider loads: 256 K rows per step (``[32, bn]`` words = 16 KB at bn = 128), with a masked K tail, so K = 2880
  needs no 64-row steps;
* scales once per K step when the step lies in one quantization group, else broadcast per element;
* split-K over all the K steps the machine needs: grid = (work items, N tiles, K splits), every program writes a
  float32 partial ``[splits, M, N]``, and one XLA fusion sums them, adds each row's group bias, applies the SwiGLU
  epilogue and zeroes the rows past ``sum(group_sizes)``.

Work items come from ``_common.make_group_meta`` (a (group, m-tile) pair with rows; only touched experts are read);
the virtual group's items (rows past the groups) store zero partials without reading weights; idle items return.
``id_offset`` selects layer ``id_offset / E`` of operands stacked over layers (flattened to ``[L·E, ...]``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common
from ._gpu import AVAILABLE, GpuTiling, pltriton
from ._gpu_dense import MIN_BK, Plan, accumulate, scale_mode
from .swiglu import clamped_swiglu_parts, split_interleaved

DEFAULT_BK = 256
TARGET_PROGRAMS = 1024
INTERPRET_TARGET_PROGRAMS = 2


def default_tiling(m: int, num_groups: int) -> GpuTiling:
    rows = m / max(1, min(num_groups, m))  # mean rows per group when every group can be hit
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64
    return GpuTiling(bm=bm, bk=DEFAULT_BK, bn=128, splits=None, num_warps=4, num_stages=3)


def resolve_tiling(tiling, m, k, n, group_size, num_groups, weight_bytes: float = 0.0,
                   interpret: bool = False) -> GpuTiling:
    """The complete tiling for x [m, k] @ w [num_groups, k, n] int4 (group size ``group_size``); ValueError with the
    reason when the group size is not a multiple of 8 or no power-of-two K step >= 128 nests with it."""
    t = GpuTiling.coerce(tiling)
    d = default_tiling(m, num_groups)
    t = GpuTiling(*(getattr(d, f.name) if getattr(t, f.name) is None else getattr(t, f.name)
                    for f in dataclasses.fields(GpuTiling)))
    for name in ("bm", "bk", "bn"):
        v = getattr(t, name)
        if not (isinstance(v, int) and v > 0 and v & (v - 1) == 0):
            raise ValueError(f"{name}={v} must be a power of two (Triton block shape)")
    if t.bm < 16 or t.bn < 16:
        raise ValueError(f"bm={t.bm} and bn={t.bn} must be >= 16 (Triton's smallest dot)")
    if t.splits is not None and (not isinstance(t.splits, int) or t.splits < 1):
        raise ValueError(f"splits={t.splits} must be a positive int")
    if group_size is None:
        raise ValueError("the nibble-plane kernel takes int4 weights only")
    bk = t.bk
    if bk < MIN_BK:
        raise ValueError(f"bk={bk} is below {MIN_BK} (each nibble plane's dot needs K >= 16)")
    while bk >= MIN_BK and scale_mode(k, group_size, bk // 8) is None:
        bk //= 2
    if bk < MIN_BK:
        raise ValueError(f"no K step >= {MIN_BK} nests with the group size {group_size} (K={k}; the group size "
                         "must be a multiple of 8)")
    items = _common.num_work_items(m, t.bm, num_groups)
    tiles_n = _common.cdiv(n, t.bn)
    tiles_k = _common.cdiv(k // 8, bk // 8)
    splits = t.splits
    if splits is None:
        # programs that do work: at decode one item per touched group, not the static bound of the grid
        active = min(items, max(1, min(num_groups, m)))
        target = INTERPRET_TARGET_PROGRAMS if interpret else TARGET_PROGRAMS
        splits = _common.cdiv(target, active * tiles_n)
        if weight_bytes:  # f32 partials [S, M, N] stay well below the weight bytes read
            splits = min(splits, max(1, int(weight_bytes / (4 * 4 * m * n))))
    splits = max(1, min(int(splits), tiles_k))
    kps = _common.cdiv(tiles_k, splits)
    return dataclasses.replace(t, bk=bk, splits=_common.cdiv(tiles_k, kps))


def why_not(m, k, n, group_size, num_groups, tiling=None) -> str | None:
    if not AVAILABLE:
        return "jax.experimental.pallas.triton is not available"
    try:
        resolve_tiling(tiling, max(1, m), k, n, group_size, num_groups)
    except ValueError as err:
        return str(err)
    return None


def grouped_int4_gpu(x, packed, scales, zeros, group_size, group_sizes, bias, *, epilogue, alpha, limit, out_dtype,
                     tiling=None, interpret=False, id_offset=None):
    """x [M, K]; packed int32 [W, K/8, N], scales [W, K/g, N], zeros uint8 or None; group_sizes int32 [E] (W = E, or
    L·E with ``id_offset`` = layer · E); bias None or [W, N] -> [M, N] (or [M, N/2] with ``epilogue="swiglu"``)."""
    m, k = x.shape
    e = group_sizes.shape[0]
    n = packed.shape[-1]
    # touched experts' bytes at most (decode): bounds the split-K partials
    per_expert = (packed.size * 4 + scales.size * scales.dtype.itemsize
                  + (0 if zeros is None else zeros.size)) / packed.shape[0]
    t = resolve_tiling(tiling, m, k, n, group_size, e, per_expert * min(e, m), interpret=bool(interpret))
    bm, bk, bn, splits = t.bm, t.bk, t.bn, t.splits
    bkw, kw_total = bk // 8, k // 8
    cdt = x.dtype
    prec = jax.lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None
    tiles_n = _common.cdiv(n, bn)
    tiles_k = _common.cdiv(kw_total, bkw)
    kps = _common.cdiv(tiles_k, splits)
    kw_x = tiles_k * bkw if interpret else kw_total
    plan = Plan(bm, bn, bkw, kw_total, kw_x, k, cdt, prec)
    mode = scale_mode(k, group_size, bkw)
    has_z = zeros is not None
    w_items = _common.num_work_items(m, bm, e)
    meta = _common.make_group_meta(group_sizes, m, bm)
    weight_ids = meta.weight_ids if id_offset is None else meta.weight_ids + id_offset
    meta_arr = jnp.stack([meta.m_tiles, meta.row_starts, meta.row_ends, weight_ids, meta.is_real])

    def kernel(*refs):
        meta_ref, x_ref, p_ref, s_ref = refs[:4]
        z_ref = refs[4] if has_z else None
        o_ref = refs[-1]
        item, nt, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        m_tile, rs, re = meta_ref[0, item], meta_ref[1, item], meta_ref[2, item]
        wid, real = meta_ref[3, item], meta_ref[4, item]
        row0 = m_tile * bm
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
        rmask = jnp.logical_and(rows >= rs, rows < re)
        n0 = nt * bn
        cols = n0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
        cmask = cols < n
        omask = jnp.logical_and(rmask[:, None], cmask[None, :])
        dst = o_ref.at[sp, pl.ds(row0, bm), pl.ds(n0, bn)]

        @pl.when(jnp.logical_and(re > rs, real == 0))
        def _zero():
            pltriton.store(dst, jnp.zeros((bm, bn), jnp.float32), mask=omask)

        @pl.when(jnp.logical_and(re > rs, real != 0))
        def _compute():
            k_lo = sp * kps
            k_hi = jnp.minimum(k_lo + kps, tiles_k)
            acc = accumulate(x_ref, p_ref, s_ref, z_ref, wid, row0, rmask, n0, cmask, k_lo, k_hi, plan,
                             group_size=group_size, has_zeros=has_z, mode=mode)
            pltriton.store(dst, acc, mask=omask)

    xp = jnp.swapaxes(x.reshape(m, kw_total, 8), 1, 2)  # [M, 8, K/8]: xp[m, j, kw] = x[m, 8 kw + j]
    m_rows = m
    if interpret:
        # The interpreter clamps out-of-range dynamic slices instead of masking pointers as Triton does: pad to whole
        # tiles there (the kernel still masks against the true sizes).
        m_rows = _common.cdiv(m, bm) * bm
        kw_pad = tiles_k * bkw
        xp = jnp.pad(xp, ((0, m_rows - m), (0, 0), (0, kw_pad - kw_total)))
        npad = tiles_n * bn - n
        packed = jnp.pad(packed, ((0, 0), (0, kw_pad - kw_total), (0, npad)))
        g_pad = max(_common.cdiv(kw_pad, group_size // 8), scales.shape[1]) - scales.shape[1]
        scales = jnp.pad(scales, ((0, 0), (0, g_pad), (0, npad)))
        zeros = None if zeros is None else jnp.pad(zeros, ((0, 0), (0, g_pad), (0, npad)))
    xp = xp.reshape(xp.shape[0], -1)
    args = [meta_arr, xp, packed, scales] + ([zeros] if has_z else [])
    kwargs = {}
    if not interpret:
        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, m_rows, tiles_n * bn if interpret else n), jnp.float32),
        grid=(w_items, tiles_n, splits),
        interpret=interpret,
        name="int4_grouped_matmul_planes",
        **kwargs,
    )(*args)
    # One fusion: sum the K splits, add each row's group bias, SwiGLU, zero the rows past sum(group_sizes), cast.
    y = (jnp.sum(out, axis=0) if splits > 1 else out[0])[:m, :n]
    rg = _common.row_group_ids(group_sizes, m)
    if bias is not None:
        off = 0 if id_offset is None else id_offset
        y = y + jnp.take(bias, jnp.minimum(rg, e - 1) + off, axis=0).astype(jnp.float32)
    if epilogue == "swiglu":
        y = clamped_swiglu_parts(*split_interleaved(y), alpha, limit)
    return jnp.where((rg < e)[:, None], y, 0.0).astype(out_dtype)
