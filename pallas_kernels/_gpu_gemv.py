"""Row-wise int4 GEMV for decode on NVIDIA GPUs in Pallas, Triton lowering: one output row per program, no tensor
cores, no routing metadata.

Why a second small-M kernel next to ``_gpu_dense`` / ``_gpu_grouped``: at decode a row meets each weight once, so the
op is a GEMV bound by streaming the packed words. Two costs dominated the batch-1 step on an H200
(docs/BENCHMARKS.md): (1) the MoE's routing plumbing — a stable sort of the N·k assignments, a bincount, the group
metadata, a row gather and an un-sort scatter: ~15 tiny XLA kernels per layer around two grouped matmuls; (2) the
dequantization itself: integer nibbles converted to bf16 for a 16-row tensor-core dot whose 15 padding rows are
wasted, with the int→float conversions on the slow conversion pipe.

This kernel takes, per output row ``r``, the weight it multiplies (``wids[r]``: an expert id, or the layer for
stacked dense weights; ``-1``: the row is zero, e.g. an expert held by another shard) and the x row it reads
(``xrows[r]``: the token of an (token, expert) assignment is ``r // k``), so the MoE runs straight from the router's
top-k ids — nothing is sorted. Rows routed to the same expert read its weights once each (fine at decode sizes:
a batch-8 step of the 120b model sends 32 rows to ~28 distinct experts of 128).

Dequantization without conversion instructions: a code ``q`` (4 bits) OR-ed into the mantissa of the float32
``2^23`` (bits ``0x4B000000``) is the float ``2^23 + q`` exactly, so ``(bits(q | 0x4B000000) - (2^23 + z))`` is
``q - z`` exactly with one integer OR and one float subtract (the "magic number" conversion of
`LOP3/PRMT`-style int4 kernels, e.g. FasterTransformer / Marlin). The products with x are float32 FMAs into a
``[groups, group/8, bn]`` accumulator (x is read in place, in its own dtype: plane ``j`` of a group is a
stride-8 load); each K step multiplies its partial sum by the scale row once per group
(``acc += part · s``), and the accumulator is reduced to ``[bn]`` once at the end. Exact for any input: bf16 x is
exact in float32, and the accumulation is float32 as in the other kernels.

Three dequantization modes (``GemvTiling.dequant``; ops per int32 word of 8 nibbles, per column):

* ``"exact"``: ``((w >> 4j) & 0xF) | 0x4B000000`` minus ``2^23 + z`` is ``q - z`` exactly; then one FMA with x:
  7 shifts + 8 LOP3 + 8 FADD + 8 FMA.
* ``"fold"`` (default): the code shifted to mantissa bits 19..22 of 1.0 is ``1 + q/16`` exactly; the FMA takes it
  as is and the zero point leaves once per group, ``(sum x·(1 + q/16) − (1 + z/16)·sum x)·16·s``: 8 shifts + 8 LOP3
  + 8 FMA (+ the per-row sum of x). The subtraction of two group sums of terms of size ``|x|`` rounds to ~1e-7
  relative of ``sum |x|``, not of the result.
* ``"mant"``: nibbles 0..4 are masked *in place* (no shift) into the mantissa of 1.0:
  ``(w & (0xF << 4p)) | 0x3F800000`` is the float ``1 + q·2^(4p-23)`` exactly (mantissa bits 4p..4p+3, p <= 4);
  minus ``1 + z·2^(4p-23)`` (exact: an integer z <= 15 times a power of two, 24 significant bits at most) it is
  ``(q - z)·2^(4p-23)`` exactly (Sterbenz: both operands in [1, 2)); the FMA multiplies it by
  ``x_j·2^(23-4p)``, an exact power-of-two scaling of the x plane done once per loaded x value, so each product is
  ``x_j·(q - z)`` rounded once — the same float32 operations as "exact", bit for bit. Nibbles 5..7 (bits 20..31
  overlap the exponent) reach positions p = 2, 3, 4 by one shift of the word by 12 (arithmetic is fine: the smeared
  sign bits land in 20..31, which the masks drop). Per word: 1 shift + 8 LOP3 + 8 FADD + 8 FMA, i.e. 9 integer ops
  instead of 16 (Hopper: 64 int32 vs 128 fp32 ops/clk/SM) for one more fp op per nibble than "fold" — 25
  instructions per word against 24, so it can win only where the integer pipe, not instruction issue, limits. The
  zero point sits in the subtrahend (5 FMAs per group and column; constants when symmetric, z = 8): applying it
  once per group through ``sum x`` as "fold" does would keep the same per-nibble subtract (of 1.0; without it the
  ``x·2^(23-4p)`` term swamps ``x·q``) and add the sum of x. Valid for ``|x| < 2^104`` (x·2^23 must stay finite in
  float32; activations are many orders below).

Layout (``int4_layout``): ``packed [W, K/8, N]`` int32, word row ``kw`` holds K rows ``8·kw + j`` in nibble ``j``;
viewed (a free reshape) as ``[W, K/g, g/8, N]`` so a K step loads whole quantization groups as a 3-D tile; x is
viewed as ``[M, K/g, g/8, 8]`` and nibble plane ``j`` of group ``G`` reads column ``j`` of it (every 8th) (no permuted
copy of x, no conversion kernel before the launch).

Grid = (R rows, N tiles of all weights, K splits); every program writes a float32 partial ``[splits, R, N]`` and one
XLA fusion sums the splits, adds each row's bias, applies the SwiGLU epilogue and casts (``rowwise_int4_gpu``).
Several weights with the same K (q, k, v) run in one launch as in ``_gpu_dense`` (static N-tile ranges).
Requires ``g/8`` a power of two (group sizes 16, 32, 64, 128, 256, ...); ``why_not`` says why not otherwise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from . import _common
from ._gpu import AVAILABLE, pltriton
from .swiglu import clamped_swiglu_parts, split_interleaved

MAGIC = 0x4B000000  # float32 bits of 2^23: OR a 4-bit code into the mantissa to get 2^23 + code
MAGIC_F = float(2 ** 23)
ONE = 0x3F800000  # float32 bits of 1.0: a code in mantissa bits 19..22 gives 1 + code/16
FOLD_MASK = 0xF << 19
MANT_POSITIONS = 5  # "mant": nibbles 0..4 sit in mantissa bits 0..19 in place; 5..7 reach them by one shift by 12
DEQUANT_MODES = ("fold", "exact", "mant")
STEP_WORDS = 32  # word rows (K/8) per K step when groups are smaller: [32, bn] int32 = 16 KB at bn = 128
TARGET_PROGRAMS = 1024
INTERPRET_TARGET_PROGRAMS = 2
# Auto mode (cuda) uses the row-wise path for the MoE when a call has at most this many (token, expert) rows, and
# for dense int4 projections at most this many rows. Chosen on an H200 (bench/bench_gemv.py, docs/BENCHMARKS.md).
AUTO_MAX_ROWS = 16
AUTO_MAX_DENSE_ROWS = 1
ENV_VAR = "GPTOSS_GEMV_MAX_ROWS"  # "MOE,DENSE" overrides both limits at trace time ("0,0": never; bisecting/benches)


def auto_limits() -> tuple[int, int]:
    """(MoE rows, dense rows) up to which auto mode takes this kernel on cuda; ``GPTOSS_GEMV_MAX_ROWS`` overrides."""
    import os  # noqa: PLC0415

    value = (os.environ.get(ENV_VAR) or "").strip()
    if not value:
        return AUTO_MAX_ROWS, AUTO_MAX_DENSE_ROWS
    try:
        moe, dense = (int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"{ENV_VAR}={value!r}: expected two integers 'MOE,DENSE', e.g. '16,1'") from None
    return moe, dense


@dataclasses.dataclass(frozen=True)
class GemvTiling:
    """Launch shape of the row-wise kernel. bn: output columns per program (power of two >= 16). splits: split-K
    factor (None: about TARGET_PROGRAMS programs). num_warps / num_stages: Triton launch parameters. step_words: K/8
    word rows per K step (power of two; whole groups). dequant (module docstring): "fold" (3 integer/float ops
    per nibble, zero point applied once per group, ~1e-7 relative rounding), "exact" (q − z exactly per nibble, one
    more op) or "mant" (the results of "exact" bit for bit with 9 integer ops per word instead of 16: nibbles masked
    in place into the mantissa of 1.0, x pre-scaled by 2^(23-4p); requires |x| < 2^104). ValueError from the
    kernel (why_not) for any other value."""

    bn: int = 128
    splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    step_words: int = STEP_WORDS
    dequant: str = "fold"

    @classmethod
    def coerce(cls, tiling) -> "GemvTiling":
        return _common.coerce_tiling(cls, tiling, "gemv")


TILING_ENV_VAR = "GPTOSS_GEMV_TILING"  # JSON: GemvTiling fields for every role, or {role: fields} (tuning runs)
ROLES = ("gate_up", "down", "qkv", "o")  # the decode matmuls this kernel runs (default tiling per role)
# Per-role defaults, chosen on an H200 from the kernel times in the batch-1 decode profile of the 120b model
# (bench/run_probe.sh stage T, docs/BENCHMARKS.md): q+k+v (M = 1, 8 MB) gains from 4x more, narrower programs
# (535 -> 301 us per step), o from 8 warps (245 -> 230); gate_up and down were slower with every candidate tried.
# An empty entry is GemvTiling().
ROLE_TILINGS: dict = {"gate_up": {}, "down": {}, "qkv": {"bn": 32, "num_warps": 2}, "o": {"num_warps": 8}}


def default_tiling(role: str | None = None) -> GemvTiling:
    """The tiling a call of ``role`` (one of ROLES; None: the plain GemvTiling()) runs with: ROLE_TILINGS[role],
    overridden by ``GPTOSS_GEMV_TILING`` (read at trace time): a JSON object of GemvTiling fields (every role) or
    of {role: fields}. Raises ValueError for a malformed value."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415

    fields = dict(ROLE_TILINGS.get(role, {})) if role else {}
    value = (os.environ.get(TILING_ENV_VAR) or "").strip()
    if value:
        try:
            given = json.loads(value)
            if not isinstance(given, dict):
                raise TypeError("not an object")
            if any(k in ROLES for k in given):
                bad = [k for k in given if k not in ROLES]
                if bad:
                    raise TypeError(f"unknown roles {bad} (roles: {list(ROLES)})")
                given = given.get(role, {}) if role else {}
            fields.update(given)
            return GemvTiling.coerce(fields)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{TILING_ENV_VAR}={value!r}: expected a JSON object of GemvTiling fields, or of "
                             f"{{role: fields}} ({e})") from None
    return GemvTiling.coerce(fields) if fields else GemvTiling()


def _pow2(v) -> bool:
    return isinstance(v, int) and v > 0 and v & (v - 1) == 0


def why_not(k: int, group_sizes, tiling=None) -> str | None:
    """None when the kernel runs weights with input dim ``k`` and these int4 group sizes, else the reason."""
    if not AVAILABLE:
        return "jax.experimental.pallas.triton is not available"
    if any(g is None for g in group_sizes):
        return "the row-wise kernel takes int4 weights only"
    if len(set(group_sizes)) != 1:
        return f"one group size per launch, got {sorted(set(group_sizes))}"
    g = group_sizes[0]
    if g % 8 or not _pow2(g // 8):
        return f"group size {g}: g/8 must be a power of two"
    if k % g:
        return f"group size {g} does not divide K={k}"
    t = default_tiling() if tiling is None else GemvTiling.coerce(tiling)
    if not _pow2(t.bn) or t.bn < 16:
        return f"bn={t.bn} must be a power of two >= 16"
    if not _pow2(t.step_words):
        return f"step_words={t.step_words} must be a power of two"
    if t.dequant not in DEQUANT_MODES:
        return f"dequant={t.dequant!r} must be one of {', '.join(map(repr, DEQUANT_MODES))}"
    return None


def dense_eligible(m: int, k: int, weights) -> bool:
    """Whether dense int4 calls with ``m`` rows take :func:`dense_rowwise_gpu` (at most ``auto_limits()[1]`` rows;
    weights: Int4Tensor s or specs with ``group_size``, same K)."""
    return m <= auto_limits()[1] and why_not(k, [getattr(w, "group_size", None) for w in weights]) is None


def _splits(t: GemvTiling, rows: int, tiles_n: int, steps: int, interpret: bool) -> int:
    if t.splits is not None:
        s = int(t.splits)
    else:
        target = INTERPRET_TARGET_PROGRAMS if interpret else TARGET_PROGRAMS
        s = _common.cdiv(target, max(1, rows * tiles_n))
    s = max(1, min(s, steps))
    return _common.cdiv(steps, _common.cdiv(steps, s))  # no empty split


def rowwise_int4_gpu(x, weights, wids, xrows, biases=None, *, out_dtype, epilogue=None, alpha=None, limit=None,
                     tiling=None, role=None, interpret=False, id_limit=None, id_offset=None, offset_scale=1,
                     combine_weights=None):
    """Row ``r`` of each output = ``x[xrows[r]] @ W_i[wids[r]] + bias_i[wids[r]]`` (zeros where ``wids[r] < 0``).

    x [M, K] (any float dtype; products and sums in float32); weights: Int4Tensor s with leading weight axis
    ``[W, K, N_i]`` (experts, or layers of a stacked dense weight), same K and group size; wids int32 [R]; xrows
    int32 [R], or a static int ``k``: row r reads ``x[r // k]`` (the token of the router's flattened top-k; computed
    in the kernel, no index array). With ``id_limit`` (static int) the ids are raw: ``wids[r]`` outside
    ``[0, id_limit)`` gives a zero row and a live id reads weight ``wids[r] + id_offset · offset_scale``
    (``id_offset`` an int32 scalar, e.g. the layer of experts stacked over layers) — computed in the kernel, so no
    XLA kernel prepares indices. biases: None or per weight None / ``[W, N_i]``. epilogue None or "swiglu" (one
    weight: output [R, N/2], gate = even, up = odd columns, gptoss_jax.kernels.swiglu). Returns a tuple of
    [R, N_i] in out_dtype.

    combine_weights (one weight, no epilogue): float32 [T, k] with R = T·k — the MoE combine in the kernel: each
    program scales its partial sum by its row's weight (and split 0 adds the row's bias times it), so one XLA
    reduction over (splits, k) gives the tokens' weighted sums: returns ([T, N] float32,) — no [R, N] rows, no
    separate multiply / reduce kernels after the launch."""
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    row_div = int(xrows) if isinstance(xrows, int) else None
    combining = combine_weights is not None
    has_cb = combining and biases[0] is not None
    if combining and (len(weights) != 1 or epilogue is not None or combine_weights.size != wids.shape[0]):
        raise ValueError("combine_weights: one weight, no epilogue, and one weight per row ([T, k], R = T·k)")
    m, k = x.shape
    r_rows = int(wids.shape[0])
    g = weights[0].group_size
    t = default_tiling(role) if tiling is None else GemvTiling.coerce(tiling)
    reason = why_not(k, [w.group_size for w in weights], t)
    if reason is not None:
        raise ValueError(reason)
    bn = t.bn
    gw = g // 8
    groups = k // g
    ng = max(1, t.step_words // gw)  # groups per K step
    steps = _common.cdiv(groups, ng)
    ns = [int(w.packed.shape[-1]) for w in weights]
    tiles = [_common.cdiv(n, bn) for n in ns]
    starts = [sum(tiles[:i]) for i in range(len(tiles))]
    tiles_n = sum(tiles)
    splits = _splits(t, r_rows, tiles_n, steps, bool(interpret))
    sps = _common.cdiv(steps, splits)  # K steps per split
    has_z = [w.zeros is not None for w in weights]
    exact = t.dequant == "exact"
    mant = t.dequant == "mant"
    f32 = jnp.float32
    n_full = all(n % bn == 0 for n in ns)  # no N tile runs past its weight: no column masks
    g_full = groups % ng == 0  # no K step runs past K: no group masks

    def _load(ref, mask):
        return pltriton.load(ref) if mask is None else pltriton.load(ref, mask=mask, other=0)

    def kernel(*refs):
        wid_ref, xrow_ref, off_ref, x_ref = refs[:4]
        o_ref = refs[-1]
        wrefs, pos = [], 4
        for hz in has_z:
            wrefs.append((refs[pos], refs[pos + 1], refs[pos + 2] if hz else None))
            pos += 3 if hz else 2
        if combining:
            cw_ref, cb_ref = refs[pos], (refs[pos + 1] if has_cb else None)
        r, nt, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        wid = wid_ref[r]
        if id_limit is not None:
            wid = jnp.where(jnp.logical_and(wid >= 0, wid < id_limit), wid + off_ref[0] * offset_scale, -1)
        xr = r // row_div if row_div is not None else xrow_ref[r]
        lo = sp * sps
        hi = jnp.minimum(lo + sps, steps)

        def compute(i, local_nt):
            p_ref, s_ref, z_ref = wrefs[i]
            n = ns[i]
            n0 = local_nt * bn
            cols = n0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
            cmask = None if n_full else cols < n
            dst = o_ref.at[sp, r, pl.ds((starts[i] + local_nt) * bn, bn)]

            @pl.when(wid < 0)
            def _zero():
                pltriton.store(dst, jnp.zeros((bn,), f32), mask=cmask)

            @pl.when(wid >= 0)
            def _compute():
                def body(st, acc):
                    g0 = st * ng
                    # masks only where a tile can run past the data (statically known): each costs predicates on
                    # every load, and this kernel is close to its instruction-issue limit
                    gmask = None if g_full else (
                        (g0 + jax.lax.broadcasted_iota(jnp.int32, (ng,), 0)) < groups)
                    m2 = m3 = None
                    if gmask is not None or cmask is not None:
                        m2 = jnp.ones((ng, bn), bool)
                        m2 = m2 if gmask is None else jnp.logical_and(m2, gmask[:, None])
                        m2 = m2 if cmask is None else jnp.logical_and(m2, cmask[None, :])
                        m3 = jnp.broadcast_to(m2[:, None, :], (ng, gw, bn))
                    words = _load(p_ref.at[wid, pl.ds(g0, ng), :, pl.ds(n0, bn)], m3)
                    s = _load(s_ref.at[wid, pl.ds(g0, ng), pl.ds(n0, bn)], m2).astype(f32)
                    z = None if z_ref is None else _load(z_ref.at[wid, pl.ds(g0, ng), pl.ds(n0, bn)], m2).astype(f32)
                    xm = None if gmask is None else jnp.broadcast_to(gmask[:, None, None], (ng, gw, 1))
                    xs = [_load(x_ref.at[xr, pl.ds(g0, ng), :, pl.ds(j, 1)], xm).astype(f32)
                          for j in range(8)]  # plane j: K rows 8·(G·gw + r) + j, [ng, gw, 1] (stride-8 loads)
                    part = jnp.zeros((ng, gw, bn), f32)
                    if mant:
                        # nibble at mantissa bits 4p..4p+3 (p <= 4) OR-ed into 1.0 is 1 + q·2^(4p-23); minus
                        # 1 + z·2^(4p-23) is (q - z)·2^(4p-23) exactly (Sterbenz: both in [1, 2)); times x·2^(23-4p)
                        # (exact power-of-two scaling, once per loaded x value) that is x·(q - z): the products and
                        # sums of "exact" mode, bit for bit, with one LOP3 per nibble and one shift per word.
                        # Nibbles 5..7 (bits 20..31 overlap the exponent) move to p = 2..4 with one shift by 12;
                        # arithmetic is fine: the smeared sign lands in bits 20..31, which the masks drop.
                        hi_words = words >> 12
                        zfs = [1.0 + 8.0 * 2.0 ** (4 * p - 23) if z is None else
                               (z * 2.0 ** (4 * p - 23) + 1.0)[:, None, :] for p in range(MANT_POSITIONS)]
                        for j in range(8):
                            p = j if j < MANT_POSITIONS else j - 3
                            code = ((words if j < MANT_POSITIONS else hi_words) & (0xF << (4 * p))) | ONE
                            d = jax.lax.bitcast_convert_type(code, f32) - zfs[p]
                            part = part + (xs[j] * 2.0 ** (23 - 4 * p)) * d
                        return acc + part * s[:, None, :]
                    if exact:
                        # 2^23 + q (code OR-ed into the mantissa of 2^23) minus 2^23 + z: q - z exactly
                        zf = (jnp.full((ng, bn), 8.0, f32) if z is None else z) + MAGIC_F
                        for j in range(8):
                            code = ((words >> (4 * j)) & 0xF) | MAGIC
                            part = part + xs[j] * (jax.lax.bitcast_convert_type(code, f32) - zf[:, None, :])
                        return acc + part * s[:, None, :]
                    # fold: 1 + q/16 (code shifted to the top of the mantissa of 1.0), so each nibble costs a shift,
                    # one LOP3 and one FMA; the zero point leaves once per group: sum x·(1 + q/16) − (1 + z/16)·sum x
                    # = sum x·(q − z)/16 (float32; terms of size |x|, so the rounding stays ~1e-7 relative).
                    sx = jnp.zeros((ng, gw, 1), f32)
                    for j in range(8):
                        sh = 19 - 4 * j
                        shifted = (words << sh) if sh >= 0 else (words >> -sh)
                        code = (shifted & FOLD_MASK) | ONE
                        part = part + xs[j] * jax.lax.bitcast_convert_type(code, f32)
                        sx = sx + xs[j]
                    zf = (jnp.full((ng, bn), 1.5, f32) if z is None else 1.0 + z * 0.0625)[:, None, :]
                    return acc + (part - sx * zf) * (s * 16.0)[:, None, :]

                acc = jax.lax.fori_loop(lo, hi, body, jnp.zeros((ng, gw, bn), f32))
                val = jnp.sum(jnp.sum(acc, axis=0), axis=0)
                if combining:  # the MoE combine: this row's router weight (and its bias once, in split 0)
                    cw = cw_ref[r]
                    if cb_ref is not None:
                        bias = _load(cb_ref.at[wid, pl.ds(n0, bn)], cmask).astype(f32)
                        val = val + jnp.where(sp == 0, bias, 0.0)
                    val = val * cw
                pltriton.store(dst, val, mask=cmask)

        _common.for_weight_tile(nt, starts, tiles, compute)

    # x as [M, K/g, g/8, 8] (a free reshape): nibble plane j of group G is column j
    xp = x.reshape(m, groups, gw, 8)
    wargs = []
    for w in weights:
        wn = w.packed.shape[0]
        arrs = [w.packed.reshape(wn, groups, gw, -1), w.scales] + ([w.zeros] if w.zeros is not None else [])
        wargs.append(arrs)
    n_alloc = tiles_n * bn
    gpad = steps * ng - groups if interpret else 0
    if interpret:
        # The interpreter clamps out-of-range dynamic slices instead of masking pointers as Triton does: pad every
        # operand to whole tiles there (the kernel still masks against the true sizes).
        xp = jnp.pad(xp, ((0, 0), (0, gpad), (0, 0), (0, 0)))
        for arrs, n in zip(wargs, ns):
            npad = _common.cdiv(n, bn) * bn - n
            arrs[0] = jnp.pad(arrs[0], ((0, 0), (0, gpad), (0, 0), (0, npad)))
            for a in range(1, len(arrs)):
                arrs[a] = jnp.pad(arrs[a], ((0, 0), (0, gpad), (0, npad)))
    # index operands a Pallas call needs even when unused: numpy constants (no XLA kernel computes them)
    xrows_arg = np.zeros((1,), np.int32) if row_div is not None else xrows.astype(jnp.int32)
    off_arg = (np.zeros((1,), np.int32) if id_offset is None
               else jnp.reshape(jnp.asarray(id_offset, jnp.int32), (1,)))
    args = [wids.astype(jnp.int32), xrows_arg, off_arg, xp] + [a for arrs in wargs for a in arrs]
    if combining:
        cb = biases[0]
        if cb is not None and interpret:
            cb = jnp.pad(cb, ((0, 0), (0, _common.cdiv(ns[0], bn) * bn - ns[0])))
        args += [combine_weights.astype(f32).reshape(-1)] + ([cb] if has_cb else [])
    kwargs = {}
    if not interpret:
        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, r_rows, n_alloc), f32),
        grid=(r_rows, tiles_n, splits),
        interpret=interpret,
        name="int4_rowwise_gemv",
        **kwargs,
    )(*args)
    if combining:  # one reduction over (splits, k): the tokens' weighted sums, biases included (by the kernel)
        t_rows = combine_weights.shape[0]
        y = out[:, :, :ns[0]].reshape(splits, t_rows, r_rows // t_rows, ns[0])
        return (jnp.sum(y, axis=(0, 2)),)
    # One fusion per weight: sum the K splits, add each row's bias, epilogue, cast (zero rows stay zero).
    y = jnp.sum(out, axis=0) if splits > 1 else out[0]
    if id_limit is not None:  # the ids as the kernel resolved them (XLA fuses this into the epilogue)
        wids = jnp.where(jnp.logical_and(wids >= 0, wids < id_limit),
                         wids + (0 if id_offset is None else jnp.asarray(id_offset, jnp.int32) * offset_scale), -1)
    live = (wids >= 0)[:, None]
    res = []
    for i, (n, b) in enumerate(zip(ns, biases)):
        yi = y[:, starts[i] * bn:starts[i] * bn + n]
        if b is not None:
            yi = yi + jnp.where(live, jnp.take(b, jnp.maximum(wids, 0), axis=0).astype(f32), 0.0)
        if epilogue == "swiglu":
            yi = jnp.where(live, clamped_swiglu_parts(*split_interleaved(yi), alpha, limit), 0.0)
        res.append(yi.astype(out_dtype))
    return tuple(res)



def _flat(a, layer_count_axis: bool):
    """[L, E, ...] -> [L·E, ...] (a free reshape) when stacked over layers, else a."""
    return a.reshape(-1, *a.shape[2:]) if layer_count_axis and a is not None else a


def routed_int4_gpu(x, w, expert_ids, rows, bias=None, *, out_dtype, epilogue=None, alpha=None, limit=None,
                    layer=None, tiling=None, interpret=False, combine_weights=None):
    """Row r = x[rows[r]] @ w[expert_ids[r]] (+ bias): the MoE straight from the router's ids (module docstring).

    w: Int4Tensor [E, K, N] (or [L, E, K, N] with ``layer``, read in place); expert_ids int32 [R] (ids outside
    [0, E) give zero rows); rows int32 [R], or an int k (row r reads x[r // k], see rowwise_int4_gpu); bias None or
    [E, N] ([L, E, N]). The ids go to the kernel as they are: range check and layer offset happen there.
    combine_weights: None, or float32 [T, k] (R = T·k): returns the tokens' weighted sums [T, N] float32 instead
    of the rows (rowwise_int4_gpu)."""
    stacked = layer is not None
    e = w.packed.shape[1 if stacked else 0]
    from .int4_layout import Int4Tensor  # noqa: PLC0415

    wf = Int4Tensor(_flat(w.packed, stacked), _flat(w.scales, stacked), _flat(w.zeros, stacked), w.group_size)
    return rowwise_int4_gpu(x, [wf], expert_ids.astype(jnp.int32), rows, [_flat(bias, stacked)], out_dtype=out_dtype,
                            epilogue=epilogue, alpha=alpha, limit=limit, tiling=tiling,
                            role="gate_up" if epilogue == "swiglu" else "down", interpret=interpret, id_limit=e,
                            id_offset=layer if stacked else None, offset_scale=e, combine_weights=combine_weights)[0]


def dense_rowwise_gpu(x, weights, biases, *, out_dtype, layer=None, tiling=None, interpret=False):
    """x [M, K] @ each int4 weight ([K, N_i], or [L, K, N_i] with ``layer``) + bias_i -> tuple of [M, N_i]: one
    launch, every row a GEMV (decode at batch 1; each row re-reads the weights, so only for tiny M)."""
    from .int4_layout import Int4Tensor  # noqa: PLC0415

    m = x.shape[0]
    stacked = layer is not None
    ws, bs = [], []
    for w, b in zip(weights, biases if biases is not None else [None] * len(weights)):
        if not stacked:
            w = Int4Tensor(w.packed[None], w.scales[None], None if w.zeros is None else w.zeros[None], w.group_size)
            b = None if b is None else b[None]
        ws.append(w)
        bs.append(b)
    # every row reads weight `layer` (0 when not stacked): constant ids, the layer as the kernel's id offset
    n_w = ws[0].packed.shape[0]
    return rowwise_int4_gpu(x, ws, np.zeros((m,), np.int32), 1, bs, out_dtype=out_dtype, tiling=tiling,
                            role="qkv" if len(ws) > 1 else "o", interpret=interpret, id_limit=n_w,
                            id_offset=layer if stacked else None)
