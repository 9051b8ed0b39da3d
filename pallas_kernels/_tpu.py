"""Grouped (ragged) int4 / float matmul for TPU: Pallas Mosaic, megablox-like.

Grid = (N tiles ["parallel"], work items ["arbitrary"], K tiles ["arbitrary"]); the work-item metadata from
``_common.make_group_meta`` is scalar-prefetched into SMEM and drives the BlockSpec index maps, so each step DMAs
the x tile of its m-tile and the packed int4 tile of its expert. Only experts that received rows appear in the item
list; the virtual "rows past sum(group_sizes)" group and idle items keep the previous step's weight/K block index,
so the pipeline issues no new weight DMA for them.

In-kernel int4 unpack without a sublane interleave: a packed tile ``[tk/8, tn]`` yields 8 planes
``q_j = (w >> 4j) & 15`` holding rows ``8*kw + j``. Concatenating the planes gives rows in (j, kw) order, so x is
permuted the same way once outside the kernel (``_permute_k``: a cheap transpose of the activations, not the
weights). A scale/zero row ``kw // (g/8)`` applies to all 8 planes (g is a multiple of 8), so the [tk/g, tn] scale
tile is expanded to [tk/8, tn] once per step and reused by every plane.

Tested on CPU with Pallas' TPU interpret mode (``pltpu.InterpretParams``); not yet run on a real TPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common
from .swiglu import clamped_swiglu_parts

try:
    from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
    pltpu = None


def _compiler_params(**kw):
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class TpuTiling:
    """Block shape of the TPU kernel. ``None`` fields are chosen by :func:`resolve_tiling`.

    tm: rows of x per block (multiple of 8; 16 for 16-bit inputs is the bf16 sublane tile).
    tk: K per step; divides K, a multiple of 128 or all of K, and nests with the group size.
    tn: output columns per block (before the SwiGLU halving); a multiple of 128 or all of N (with SwiGLU a multiple
        of 256 or all of N, so the halved output block stays lane-dense).
    """

    tm: int | None = None
    tk: int | None = None
    tn: int | None = None

    @classmethod
    def coerce(cls, tiling) -> "TpuTiling":
        """A TpuTiling from None, a TpuTiling or a mapping with fields tm/tk/tn (ValueError otherwise)."""
        return _common.coerce_tiling(cls, tiling, "tpu")


def _pick_tk(k: int, group_size: int | None, target: int) -> int:
    """A K tile that divides K, is a multiple of 128 (x tile lanes; packed rows tk/8 on sublanes) or all of K,
    and nests with the group size."""
    def ok(t):
        if k % t or (t % 128 and t != k):
            return False
        if group_size is None:
            return True
        return t % group_size == 0 or group_size % t == 0
    cands = [t for t in range(128, min(k, target) + 1, 128) if ok(t)]
    return max(cands) if cands else k


def _pick_tn(n: int, target: int, align: int = 128) -> int:
    d = _common.largest_divisor(n, target, align)
    if d is not None:
        return d
    if n <= target:
        return n  # full dim (e.g. 576)
    return max(align, target // align * align)  # partial last tile; out-of-range columns are dropped on store


def resolve_tiling(tiling, m, k, n, group_size, dtype, swiglu=False) -> TpuTiling:
    """The complete TpuTiling for x [m, k] @ w [.., k, n] (group_size None = float weights).

    Raises ValueError (with the reason) when the shapes / tiling cannot run on this kernel: an int4 group size that
    is not a multiple of 8 (one scale row is broadcast over the 8 nibble planes of a packed word row), a tile that
    does not divide K or nest with the group, or tiles that break Mosaic's (8, 128) block rule."""
    t = TpuTiling.coerce(tiling)
    if group_size is not None and group_size % 8:
        raise ValueError(f"int4 group size {group_size} is not a multiple of 8 (the TPU kernel broadcasts one "
                         "scale row over the 8 nibble planes of a packed word row)")
    sub = 16 if jnp.dtype(dtype).itemsize < 4 else 8
    tm = t.tm if t.tm is not None else (sub if m <= 64 else 128)
    tk = t.tk if t.tk is not None else _pick_tk(k, group_size, 1024 if m <= 64 else 512)
    # swiglu halves the output tile: keep it lane-dense (multiple of 128)
    tn = t.tn if t.tn is not None else _pick_tn(n, 512, 256 if swiglu else 128)
    if tm <= 0 or tm % 8:
        raise ValueError(f"tm={tm} must be a positive multiple of 8")
    if tk <= 0 or k % tk or (tk % 128 and tk != k):
        raise ValueError(f"tk={tk} must divide K={k} and be a multiple of 128 or all of K")
    if group_size is not None and not (tk % group_size == 0 or group_size % tk == 0):
        raise ValueError(f"tk={tk} does not nest with the group size {group_size} (K={k})")
    if tn <= 0 or (tn % 128 and tn != n):
        raise ValueError(f"tn={tn} must be a multiple of 128 or all of N={n}")
    if swiglu and (tn % 2 or (tn % 256 and tn != n)):
        raise ValueError(f"tn={tn} with the swiglu epilogue must be a multiple of 256 or all of N={n}")
    return TpuTiling(tm, tk, tn)


def _permute_k(x, tk):
    """x[:, blk*tk + 8*kw + j] -> position blk*tk + j*(tk/8) + kw (matches the concatenated nibble planes)."""
    m, k = x.shape
    return x.reshape(m, k // tk, tk // 8, 8).swapaxes(2, 3).reshape(m, k)


def grouped_matmul_tpu(x, packed, scales, zeros, group_size, group_sizes, bias, *, epilogue, alpha, limit,
                       out_dtype, tiling=None, interpret=False, id_offset=None):
    """x [M, K]; packed int32 [E, K/8, N] (or float [E, K, N]); id_offset as in _gpu.grouped_matmul_gpu (weights and
    bias of group g are read at index id_offset + g: operands stacked over layers are read in place)."""
    m, k = x.shape
    e, _, n = packed.shape
    quant = scales is not None
    cdt = x.dtype
    swiglu = epilogue == "swiglu"
    t = resolve_tiling(tiling, m, k, n, group_size if quant else None, cdt, swiglu)
    tm, tk, tn = t.tm, t.tk, t.tn
    n_out = n // 2 if swiglu else n
    tn_out = tn // 2 if swiglu else tn
    tiles_n = _common.cdiv(n, tn)
    tiles_k = k // tk
    m_pad = _common.cdiv(m, tm) * tm
    meta = _common.make_group_meta(group_sizes, m, tm)
    w_items = meta.group_ids.shape[0]
    has_zeros = quant and zeros is not None
    has_bias = bias is not None
    prec = jax.lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None
    ng_total = k // group_size if quant else 0

    xk = _permute_k(x, tk) if quant else x
    if m_pad != m:
        xk = jnp.pad(xk, ((0, m_pad - m), (0, 0)))

    def k_eff(kk, real):
        return jnp.where(real != 0, kk, tiles_k - 1)

    def x_map(nn, i, kk, gid, mt, rs, re, wid, real):
        return mt[i], k_eff(kk, real[i])

    def w_map(nn, i, kk, gid, mt, rs, re, wid, real):
        return wid[i], k_eff(kk, real[i]), nn

    def s_map(nn, i, kk, gid, mt, rs, re, wid, real):
        return wid[i], 0, nn

    def b_map(nn, i, kk, gid, mt, rs, re, wid, real):
        return wid[i], 0, nn

    def o_map(nn, i, kk, gid, mt, rs, re, wid, real):
        return mt[i], nn

    in_specs = [pl.BlockSpec((tm, tk), x_map)]
    args = [xk]
    if quant:
        in_specs.append(pl.BlockSpec((None, tk // 8, tn), w_map))
        args.append(packed)
        in_specs.append(pl.BlockSpec((None, ng_total, tn), s_map))
        args.append(scales)
        if has_zeros:
            in_specs.append(pl.BlockSpec((None, ng_total, tn), s_map))
            args.append(zeros)
    else:
        in_specs.append(pl.BlockSpec((None, tk, tn), w_map))
        args.append(packed)
    if has_bias:
        in_specs.append(pl.BlockSpec((None, 1, tn), b_map))
        args.append(bias.reshape(e, 1, n))

    def kernel(gid_ref, mt_ref, rs_ref, re_ref, wid_ref, real_ref, *refs):
        refs = list(refs)
        x_ref, w_ref = refs[0], refs[1]
        pos = 2
        s_ref = z_ref = b_ref = None
        if quant:
            s_ref = refs[pos]; pos += 1
            if has_zeros:
                z_ref = refs[pos]; pos += 1
        if has_bias:
            b_ref = refs[pos]; pos += 1
        o_ref, acc_ref = refs[pos], refs[pos + 1]
        i = pl.program_id(1)
        kk = pl.program_id(2)
        real = real_ref[i]
        rs = rs_ref[i]
        re = re_ref[i]
        mt = mt_ref[i]

        @pl.when(kk == 0)
        def _init():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(real != 0)
        def _accumulate():
            xt = x_ref[...]
            if quant:
                words = w_ref[...]
                rows = tk // 8
                if tk >= group_size:
                    ng = tk // group_size
                    s = s_ref[pl.ds(kk * ng, ng), :].astype(jnp.float32)
                    z = (z_ref[pl.ds(kk * ng, ng), :].astype(jnp.float32) if has_zeros
                         else jnp.full((ng, tn), 8.0, jnp.float32))
                    rep = group_size // 8
                    if rep > 1:
                        s = jnp.broadcast_to(s[:, None, :], (ng, rep, tn)).reshape(rows, tn)
                        z = jnp.broadcast_to(z[:, None, :], (ng, rep, tn)).reshape(rows, tn)
                else:
                    row = (kk * tk) // group_size
                    s = s_ref[pl.ds(row, 1), :].astype(jnp.float32)
                    z = (z_ref[pl.ds(row, 1), :].astype(jnp.float32) if has_zeros
                         else jnp.full((1, tn), 8.0, jnp.float32))
                planes = []
                for j in range(8):
                    q = jnp.bitwise_and(jax.lax.shift_right_logical(words, jnp.int32(4 * j)), 15)
                    planes.append(((q.astype(jnp.float32) - z) * s).astype(cdt))
                wt = jnp.concatenate(planes, axis=0)
            else:
                wt = w_ref[...].astype(cdt)
            acc_ref[...] += jax.lax.dot_general(xt, wt, (((1,), (0,)), ((), ())), precision=prec,
                                                preferred_element_type=jnp.float32)

        @pl.when(jnp.logical_and(kk == tiles_k - 1, re > rs))
        def _store():
            y = acc_ref[...]
            if has_bias:
                y = y + b_ref[...].astype(jnp.float32)
            y = jnp.where(real != 0, y, 0.0)
            if swiglu:
                acc_ref[...] = y
                gate = acc_ref[:, pl.ds(0, tn // 2, stride=2)]
                up = acc_ref[:, pl.ds(1, tn // 2, stride=2)]
                y = clamped_swiglu_parts(gate, up, alpha, limit)
            rows_i = mt * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn_out), 0)
            mask = jnp.logical_and(rows_i >= rs, rows_i < re)
            o_ref[...] = jnp.where(mask, y.astype(o_ref.dtype), o_ref[...])

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n_out), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn_out), o_map),
            grid=(tiles_n, w_items, tiles_k),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=_compiler_params(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=_interpret_arg(interpret),
        name="int4_gmm_tpu" if quant else "gmm_tpu",
    )
    weight_ids = meta.weight_ids if id_offset is None else meta.weight_ids + id_offset
    out = call(meta.group_ids, meta.m_tiles, meta.row_starts, meta.row_ends, weight_ids, meta.is_real, *args)
    return out[:m] if m_pad != m else out


def _interpret_arg(interpret):
    """Pallas' ``interpret=`` for this kernel.

    True: the TPU interpreter (``pltpu.InterpretParams()``: TPU memory semantics, most faithful; it runs through
    ordered host callbacks). "portable": Pallas' generic interpreter (plain jaxpr, no callbacks), used when the kernel
    is interpreted on a non-TPU platform inside ``jax.lax.platform_dependent``: a branch with ordered host-callback
    effects would stop the same function from lowering for TPU. False / InterpretParams: as given."""
    if interpret == "portable":
        return True
    if interpret is True:
        params = getattr(pltpu, "InterpretParams", None)
        return params() if params is not None else True
    return interpret
