"""RMSNorm for decode on NVIDIA GPUs in Pallas (Triton lowering): one launch per norm instead of two.

Why: XLA lowers ``x · rsqrt(mean(x²) + eps) · scale`` to a reduce kernel and a separate elementwise kernel (it does
not fuse a reduction with a consumer that re-reads the reduction's input). At batch 1 each is ~1.3 µs of launch
and ramp for 5.7 KB of data, and gpt-oss-120b runs 73 norms per decode step (two per layer and the final one):
≈ 0.2 ms of a 3.6 ms step (docs/BENCHMARKS.md). Here one program per row loads the row once, reduces in float32,
scales and stores. The scale may arrive stacked over layers ([L, H]) with the layer index: read in place (a
dynamic slice as a Pallas operand would be copied first). Math: gpt-oss's RMSNorm (transformers' GptOssRMSNorm:
float32 inside, cast back to the input dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common
from ._gpu import AVAILABLE, pltriton

AUTO_MAX_ROWS = 16  # auto mode (cuda) takes this kernel for at most this many rows (decode sizes)
ENV_VAR = "GPTOSS_NORM_MAX_ROWS"  # overrides AUTO_MAX_ROWS at trace time ("0": never; A/B benches, bisecting)


def auto_max_rows() -> int:
    """Rows up to which auto mode takes the kernel on cuda: ``GPTOSS_NORM_MAX_ROWS`` or AUTO_MAX_ROWS."""
    return _common.env_limit(ENV_VAR, AUTO_MAX_ROWS)


MAX_HIDDEN = 16384  # one row lives in one program's registers


def why_not(h: int) -> str | None:
    """None when the kernel runs rows of h features, else the reason."""
    if not AVAILABLE:
        return "jax.experimental.pallas.triton is not available"
    if h > MAX_HIDDEN:
        return f"hidden size {h}: at most {MAX_HIDDEN}"
    return None


def rms_norm_gpu(x, scale, eps: float, *, layer=None, interpret: bool = False):
    """x [N, H] (any float dtype) → x · rsqrt(mean(x², -1) + eps) · scale in x.dtype (float32 inside).

    scale [H] (or [L, H] with ``layer``, an int32 scalar, read in place). Raises ValueError when :func:`why_not`
    gives a reason."""
    n, h = x.shape
    reason = why_not(h)
    if reason is not None:
        raise ValueError(reason)
    bh = _common.pow2_at_least(h)
    full = bh == h
    lid = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    s2 = scale if layer is not None else scale[None]
    if interpret and not full:
        # The interpreter clamps out-of-range dynamic slices instead of masking as Triton does: pad to the block.
        x = jnp.pad(x, ((0, 0), (0, bh - h)))
        s2 = jnp.pad(s2, ((0, 0), (0, bh - h)))
    out_dtype = x.dtype
    f32 = jnp.float32

    def kernel(l_ref, x_ref, s_ref, o_ref):
        r = pl.program_id(0)
        mask = None if full else jax.lax.broadcasted_iota(jnp.int32, (bh,), 0) < h
        kw = {} if mask is None else {"mask": mask, "other": 0}
        v = pltriton.load(x_ref.at[r, pl.ds(0, bh)], **kw).astype(f32)
        s = pltriton.load(s_ref.at[l_ref[0], pl.ds(0, bh)], **kw).astype(f32)
        inv = jax.lax.rsqrt(jnp.sum(v * v) / h + eps)
        pltriton.store(o_ref.at[r, pl.ds(0, bh)], (s * (v * inv)).astype(out_dtype), mask=mask)

    kwargs = {} if interpret else {"compiler_params": pltriton.CompilerParams(num_warps=4, num_stages=1)}
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, bh if interpret and not full else h), out_dtype),
        grid=(n,),
        interpret=interpret,
        name="rmsnorm_rows",
        **kwargs,
    )(lid, x, s2)
    return out[:, :h] if out.shape[1] != h else out
