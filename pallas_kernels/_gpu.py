"""Grouped (ragged) int4 / float matmul for NVIDIA GPUs in Pallas, Triton lowering.

Why Triton and not Mosaic GPU (the default Pallas GPU backend since jax 0.9):
* The op is dominated by decode: a batch-1 step sends 4 rows to 4 of 128 experts, so every touched expert is a
  [1..16, K] x [K, N] product — a GEMV that is purely HBM bound (2880 x 5760 int4 = 8.3 MB per expert). What matters
  is streaming the packed words of the touched experts at full bandwidth with enough CTAs in flight; tensor-core
  shape is irrelevant. Mosaic GPU's building blocks (TMA + wgmma) want 64-row warpgroup tiles and its mixed-type
  Hopper matmul in jax (hopper_mixed_type_matmul_mgpu) supports int8 x bf16 only, so an int4 path there means
  writing the nibble unpack into a warp-specialised TMA pipeline — not verifiable without the GPU.
* The Triton lowering gives pointer-level masked loads (ragged groups, N = 2880 partial tiles) and lets us unpack
  8 nibbles per 32-bit word with shifts in registers; it runs in Pallas' interpret mode on CPU, which is how this
  file is tested, and (only) its lowering can be checked on CPU with ``jax.jit(...).trace(...).lower(
  lowering_platforms=("cuda",))``.
* Measured on H100 (docs/BENCHMARKS.md): this kernel against XLA's bf16 ``ragged_dot`` and the dequantize-all XLA
  baseline; see there for the numbers that back this choice.

Kernel structure: grid = (work items, N tiles); a work item is one (group, m-tile) pair from
``_common.make_group_meta``; idle items return at once, the virtual group (rows past sum(group_sizes)) stores zeros
without touching weights, so only experts that received rows are read. Each program loops over K in ``bk`` steps:
load x [bm, bk] (rows of other groups masked to 0), packed words [bk/8, bn] of its expert, unpack to [bk, bn] codes,
subtract the zero point, and either multiply the f32 partial product by the scale row (``group_size % bk == 0``:
one scale row per K step, the cheap path) or dequantize per element (``bk % group_size == 0``).
Accumulation is float32; f32 inputs use ``Precision.HIGHEST`` = an IEEE f32 dot (Triton's DEFAULT is TF32), so
fp32 models keep full precision.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common
from .swiglu import clamped_swiglu_parts, split_interleaved

try:  # jax >= 0.4.3x; Triton lowering is deprecated in 0.11 but still present.
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

AVAILABLE = pltriton is not None

@dataclasses.dataclass(frozen=True)
class GpuTiling:
    """Launch shape of the GPU kernel. ``None`` fields are chosen by :func:`resolve_tiling`.

    bm: rows per program (power of two). bk: K per loop step (power of two >= 16 dividing K, nesting with the group
    size; cut to the largest such). bn: output columns per program (power of two; before the SwiGLU halving).
    splits: split-K factor (>= 1; None = auto, ~TARGET_PROGRAMS programs with >= MIN_K_STEPS steps each).
    num_warps, num_stages: Triton launch parameters.

    Defaults (bm from the mean rows per active group, see :func:`default_tiling`): bn = 128, measured on H200
    (jax 0.11.2, docs/BENCHMARKS.md): bn=128 beat bn=64 and bn=32 at batch 1 (gate_up 55.8 vs 68.5 vs 73.9 us) and
    batch 64 (848 vs 1096 vs 1220 us; down 477 vs 574 us).
    """

    bm: int | None = None
    bk: int | None = None
    bn: int | None = None
    splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    @classmethod
    def coerce(cls, tiling) -> "GpuTiling":
        """A GpuTiling from None, a GpuTiling or a mapping of its field names (ValueError otherwise)."""
        return _common.coerce_tiling(cls, tiling, "gpu")


DEFAULT_TILING = GpuTiling(bm=16, bk=128, bn=128, num_warps=4, num_stages=4)


def _unstack2(y):
    """[..., 2] -> two arrays (Triton: tt.split)."""
    if hasattr(jax.lax, "unstack"):
        return jax.lax.unstack(y, axis=-1)
    return y[..., 0], y[..., 1]


def _load(ref, mask=None, other=None):
    return pltriton.load(ref, mask=mask, other=other)


def _store(ref, val, mask=None):
    return pltriton.store(ref, val, mask=mask)


def default_tiling(m: int, k: int, n: int, group_size: int | None, num_groups: int) -> GpuTiling:
    rows = m / max(1, min(num_groups, m))  # mean rows per group when every group can be hit
    if rows > 32:
        return dataclasses.replace(DEFAULT_TILING, bm=64, bk=64, bn=128, num_stages=3)
    if rows > 16:
        return dataclasses.replace(DEFAULT_TILING, bm=32)
    return DEFAULT_TILING


def _pow2(v: int) -> bool:
    return isinstance(v, int) and v > 0 and v & (v - 1) == 0


def resolve_tiling(tiling, m, k, n, group_size, num_groups, interpret=False) -> GpuTiling:
    """The complete GpuTiling (splits included) for x [m, k] @ w [num_groups, k, n] (group_size None = float).

    Raises ValueError (with the reason) when K has no power-of-two step >= 16 that nests with the group size, or
    an explicit field is not a power of two / not positive (Triton block shapes are powers of two)."""
    t = GpuTiling.coerce(tiling)
    d = default_tiling(m, k, n, group_size, num_groups)
    t = GpuTiling(*(getattr(d, f.name) if getattr(t, f.name) is None else getattr(t, f.name)
                    for f in dataclasses.fields(GpuTiling)))
    for name in ("bm", "bk", "bn"):
        if not _pow2(getattr(t, name)):
            raise ValueError(f"{name}={getattr(t, name)} must be a power of two (Triton block shape)")
    if t.splits is not None and (not isinstance(t.splits, int) or t.splits < 1):
        raise ValueError(f"splits={t.splits} must be a positive int")
    bk = _common.pow2_divisor(k, t.bk, minimum=16)
    if bk is None:
        raise ValueError(f"K={k} has no power-of-two divisor >= 16 (the K step)")
    if group_size is not None and not (group_size % bk == 0 or bk % group_size == 0):
        # make bk divide the group: the largest power of two >= 16 dividing both
        bk2 = _common.pow2_divisor(group_size, bk, minimum=16)
        if bk2 is None or k % bk2:
            raise ValueError(f"no power-of-two K step >= 16 nests with the group size {group_size} (K={k})")
        bk = bk2
    w_items = _common.num_work_items(m, t.bm, num_groups)
    splits = resolve_splits(t.splits, w_items, _common.cdiv(n, t.bn), k // bk,
                            target=INTERPRET_TARGET_PROGRAMS if interpret else TARGET_PROGRAMS)
    return dataclasses.replace(t, bk=bk, splits=splits)


# Split-K: decode steps have few (group, N-tile) programs, each streaming all of K through a latency-bound loop
# (measured on H200, jax 0.11.2: 2880->512 with one work item took 41 us for 0.9 MB, i.e. ~0.9 us per K step).
# Splitting K fills the machine: aim for TARGET_PROGRAMS programs with at least MIN_K_STEPS K steps each.
TARGET_PROGRAMS = 1024
MIN_K_STEPS = 4


INTERPRET_TARGET_PROGRAMS = 2  # interpret mode (CPU tests): keep the grid small, still exercise split-K


def resolve_splits(splits, w_items, tiles_n, tiles_k, target=TARGET_PROGRAMS) -> int:
    if splits is None:
        want = _common.cdiv(target, max(1, w_items * tiles_n))
        splits = max(1, min(want, tiles_k // MIN_K_STEPS))
    splits = max(1, min(int(splits), tiles_k))
    kps = _common.cdiv(tiles_k, splits)
    return _common.cdiv(tiles_k, kps)


def supports(x_shape, w_shape, group_size, tiling=None) -> bool:
    """Whether the kernel handles these shapes (else auto mode falls back to XLA): K needs a power-of-two step
    >= 16 that nests with the quantization group."""
    if not AVAILABLE:
        return False
    try:
        resolve_tiling(tiling, max(1, x_shape[0]), x_shape[1], w_shape[-1], group_size, w_shape[0])
    except ValueError:
        return False
    return True


def grouped_matmul_gpu(x, packed, scales, zeros, group_size, group_sizes, bias, *, epilogue, alpha, limit,
                       out_dtype, tiling=None, interpret=False, id_offset=None):
    """x [M, K]; packed int32 [E, K/8, N] (int4) or float weights [E, K, N] when scales is None.

    id_offset: None, or an int32 scalar added to every weight / bias id — group g reads packed[id_offset + g], so
    operands stacked over layers (flattened [L·E, ...]) are read in place for layer id_offset / E."""
    m, k = x.shape
    e = group_sizes.shape[0]
    quant = scales is not None
    n = packed.shape[-1]
    t = resolve_tiling(tiling, m, k, n, group_size if quant else None, e, interpret=bool(interpret))
    bm, bk, bn, splits = t.bm, t.bk, t.bn, t.splits
    cdt = x.dtype
    # Triton maps DEFAULT/HIGH precision of f32 dots to TF32 (measured: 5e-4 relative error on H200); HIGHEST
    # gives an IEEE f32 dot.
    prec = jax.lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None
    swiglu = epilogue == "swiglu"
    if swiglu and (n % 2 or bn % 2):
        raise ValueError("swiglu epilogue needs even N and bn")
    n_out = n // 2 if swiglu else n
    w_items = _common.num_work_items(m, bm, e)
    meta = _common.make_group_meta(group_sizes, m, bm)
    weight_ids = meta.weight_ids if id_offset is None else meta.weight_ids + id_offset
    meta_arr = jnp.stack([meta.group_ids, meta.m_tiles, meta.row_starts, meta.row_ends, weight_ids,
                          meta.is_real])
    tiles_n = _common.cdiv(n, bn)
    tiles_k = k // bk
    kps = _common.cdiv(tiles_k, splits)  # K tiles per split
    split = splits > 1
    # With split-K the kernel writes float32 partial sums [splits, M, N]; the sum, bias and epilogue then run as one
    # small XLA fusion (see the end of this function).
    fused_epilogue = not split
    per_element_scale = quant and group_size < bk
    has_zeros = quant and zeros is not None
    has_bias = bias is not None

    def kernel(*refs):
        refs = list(refs)
        meta_ref, x_ref, p_ref = refs[:3]
        pos = 3
        s_ref = z_ref = b_ref = None
        if quant:
            s_ref = refs[pos]; pos += 1
            if has_zeros:
                z_ref = refs[pos]; pos += 1
        if has_bias and fused_epilogue:
            b_ref = refs[pos]; pos += 1
        o_ref = refs[pos]

        item = pl.program_id(0)
        nt = pl.program_id(1)
        sp = pl.program_id(2)
        m_tile = meta_ref[1, item]
        rs = meta_ref[2, item]
        re = meta_ref[3, item]
        wid = meta_ref[4, item]
        real = meta_ref[5, item]
        row0 = m_tile * bm
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
        rmask = jnp.logical_and(rows >= rs, rows < re)
        n0 = nt * bn
        cols = n0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
        cmask = cols < n

        def store(y):
            if split:
                omask = jnp.logical_and(rmask[:, None], cmask[None, :])
                _store(o_ref.at[sp, pl.ds(row0, bm), pl.ds(n0, bn)], y, mask=omask)
            elif swiglu:
                y3 = y.reshape(bm, bn // 2, 2)
                gate, up = _unstack2(y3)
                y = clamped_swiglu_parts(gate, up, alpha, limit)
                ocols = nt * (bn // 2) + jax.lax.broadcasted_iota(jnp.int32, (bn // 2,), 0)
                omask = jnp.logical_and(rmask[:, None], (ocols < n_out)[None, :])
                _store(o_ref.at[pl.ds(row0, bm), pl.ds(nt * (bn // 2), bn // 2)], y.astype(o_ref.dtype), mask=omask)
            else:
                omask = jnp.logical_and(rmask[:, None], cmask[None, :])
                _store(o_ref.at[pl.ds(row0, bm), pl.ds(n0, bn)], y.astype(o_ref.dtype), mask=omask)

        @pl.when(jnp.logical_and(re > rs, real == 0))
        def _zero():
            store(jnp.zeros((bm, bn), jnp.float32))

        @pl.when(jnp.logical_and(re > rs, real != 0))
        def _compute():
            shifts = (jax.lax.broadcasted_iota(jnp.int32, (1, 8, 1), 1) * 4)

            def body(kt, acc):
                k0 = kt * bk
                xt = _load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], mask=rmask[:, None], other=0)
                if not quant:
                    wt = _load(p_ref.at[wid, pl.ds(k0, bk), pl.ds(n0, bn)], mask=cmask[None, :], other=0)
                    return acc + jnp.dot(xt, wt.astype(cdt), precision=prec, preferred_element_type=jnp.float32)
                words = _load(p_ref.at[wid, pl.ds(k0 // 8, bk // 8), pl.ds(n0, bn)], mask=cmask[None, :],
                              other=0)
                q = (words[:, None, :] >> shifts) & 0xF  # [bk/8, 8, bn]; row 8*kw + j
                q = q.reshape(bk, bn)
                if per_element_scale:
                    ng = bk // group_size
                    s = _load(s_ref.at[wid, pl.ds(k0 // group_size, ng), pl.ds(n0, bn)], mask=cmask[None, :],
                              other=0).astype(jnp.float32)
                    if has_zeros:
                        z = _load(z_ref.at[wid, pl.ds(k0 // group_size, ng), pl.ds(n0, bn)], mask=cmask[None, :],
                                  other=0).astype(jnp.int32)
                    else:
                        z = jnp.full((ng, bn), 8, jnp.int32)
                    qf = q.reshape(ng, group_size, bn).astype(jnp.float32)
                    wdq = (qf - z[:, None, :].astype(jnp.float32)) * s[:, None, :]
                    wdq = wdq.reshape(bk, bn).astype(cdt)
                    return acc + jnp.dot(xt, wdq, precision=prec, preferred_element_type=jnp.float32)
                grow = k0 // group_size
                s = _load(s_ref.at[wid, pl.ds(grow, 1), pl.ds(n0, bn)], mask=cmask[None, :],
                          other=0).astype(jnp.float32)
                if has_zeros:
                    z = _load(z_ref.at[wid, pl.ds(grow, 1), pl.ds(n0, bn)], mask=cmask[None, :],
                              other=0).astype(jnp.int32)
                else:
                    z = jnp.full((1, bn), 8, jnp.int32)
                wq = (q - z).astype(cdt)  # exact small integers in [-15, 15]
                part = jnp.dot(xt, wq, precision=prec, preferred_element_type=jnp.float32)
                return acc + part * s

            k_lo = sp * kps
            k_hi = jnp.minimum(k_lo + kps, tiles_k)
            acc = jax.lax.fori_loop(k_lo, k_hi, body, jnp.zeros((bm, bn), jnp.float32))
            if has_bias and fused_epilogue:
                b = _load(b_ref.at[pl.ds(wid, 1), pl.ds(n0, bn)], mask=cmask[None, :], other=0)
                acc = acc + b.astype(jnp.float32)
            store(acc)

    m_pad = m
    if interpret:
        # The interpreter clamps out-of-range dynamic slices instead of masking pointers as Triton does, so pad
        # rows/columns to whole tiles there (the kernel still masks against the true m and n).
        m_pad = _common.cdiv(m, bm) * bm
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
        n_pad = tiles_n * bn - n
        if n_pad:
            pad3 = ((0, 0), (0, 0), (0, n_pad))
            packed = jnp.pad(packed, pad3)
            if quant:
                scales = jnp.pad(scales, pad3)
                zeros = None if zeros is None else jnp.pad(zeros, pad3)
            if has_bias and fused_epilogue:
                bias = jnp.pad(bias, ((0, 0), (0, n_pad)))
    args = [meta_arr, x, packed]
    if quant:
        args.append(scales)
        if has_zeros:
            args.append(zeros)
    if has_bias and fused_epilogue:
        args.append(bias)
    n_out_alloc = (tiles_n * bn // 2 if swiglu else tiles_n * bn) if interpret else n_out
    kwargs = {}
    if not interpret:
        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
    out = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((splits, m_pad, tiles_n * bn if interpret else n), jnp.float32) if split
                   else jax.ShapeDtypeStruct((m_pad, n_out_alloc), out_dtype)),
        grid=(w_items, tiles_n, splits),
        interpret=interpret,
        name="int4_grouped_matmul" if quant else "grouped_matmul",
        **kwargs,
    )(*args)
    if split:
        y = jnp.sum(out, axis=0)[:m, :n]
        rg = _common.row_group_ids(group_sizes, m)
        if has_bias:
            off = 0 if id_offset is None else id_offset
            y = y + jnp.take(bias, jnp.minimum(rg, e - 1) + off, axis=0).astype(jnp.float32)
        if swiglu:
            y = clamped_swiglu_parts(*split_interleaved(y), alpha, limit)
        return jnp.where((rg < e)[:, None], y, 0.0).astype(out_dtype)
    if out.shape != (m, n_out):
        out = out[:m, :n_out]
    return out
