"""The small-M dense int4 GPU kernel (pallas_kernels/_gpu_dense.py) and dense_matmul_fused (q, k, v in one launch).

The kernel runs in Pallas' interpret mode on CPU against the float64 numpy reference built from the exact int4
codes, on fresh random inputs: sym / asym, group sizes 32 / 64 / 128 / per channel (the K step in "step" and
"expand" scale modes), a masked K tail (K = 320, 2880 is not a multiple of the 256-row step), partial N tiles,
bias, layer-stacked operands read in place (`layer=`), several weights with different N and group sizes in one
launch. Lowering for cuda / tpu is checked by jax.export from the CPU host."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from gptoss_jax.kernels import (GpuTiling, Int4Tensor, MatmulCall, UnsupportedCallError, dense_matmul,
                                dense_matmul_fused, registry)
from gptoss_jax.kernels import _gpu_dense
from gptoss_jax.kernels import int4_layout as L
from gptoss_jax.kernels.reference import dequantize_f64, max_rel_err

F32_TOL = 2e-5
TRITON = "__gpu$xla.gpu.triton"
MOSAIC = "tpu_custom_call"


def make_int4(rng, lead, k, n, group, sym):
    g = k if group == "channel" else group
    q = rng.integers(0, 16, size=(*lead, k, n), dtype=np.uint8)
    s = (rng.random((*lead, k // g, n)) * 0.02 + 0.005).astype(np.float32)
    z = None if sym else rng.integers(0, 16, size=(*lead, k // g, n), dtype=np.uint8)
    return jax.tree.map(jnp.asarray, L.from_unsigned(q, s, z, group_size=g))


def ref_f64(x, w, b, layer=None):
    wd = dequantize_f64(w)
    b64 = None if b is None else np.asarray(b, np.float64)
    if layer is not None:
        wd, b64 = wd[layer], None if b64 is None else b64[layer]
    y = np.asarray(x.astype(jnp.float32), np.float64) @ wd
    return y if b64 is None else y + b64


# (M, K, [(N, group)], sym, layers): scale modes "expand" (g < bk) and "step" (g >= bk, channel), K tails, N tails
CASES = [
    (1, 320, [(96, 32), (40, 64)], False, None),  # K tail: 40 word rows in 16-row steps; two weights
    (3, 512, [(200, "channel")], True, None),  # one group per column: "step"
    (17, 1024, [(64, 128), (130, 32), (16, 256)], False, 3),  # M > bm tile, three weights, stacked over layers
    (64, 256, [(48, 64)], True, 2),
]


@pytest.mark.parametrize("case", CASES, ids=[f"m{c[0]}-k{c[1]}" for c in CASES])
def test_dense_kernel_interpret_matches_f64(rng, case):
    m, k, wspecs, sym, layers = case
    lead = () if layers is None else (layers,)
    ws = [make_int4(rng, lead, k, n, g, sym) for n, g in wspecs]
    bs = [jnp.asarray(rng.standard_normal((*lead, n)), jnp.float32) if i % 2 == 0 else None
          for i, (n, _) in enumerate(wspecs)]
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    layer = None if layers is None else int(rng.integers(layers))
    tiling = None if k % 256 == 0 else dict(bk=128)
    ys = dense_matmul_fused(x, ws, bs, implementation="gpu", interpret=True, tiling=tiling,
                            layer=None if layer is None else jnp.int32(layer))
    assert len(ys) == len(ws)
    for y, w, b, (n, _) in zip(ys, ws, bs, wspecs):
        chex.assert_shape(y, (m, n))
        chex.assert_type(y, jnp.float32)
        assert max_rel_err(y, ref_f64(x, w, b, layer)) <= F32_TOL
    # one weight through dense_matmul's explicit gpu path runs the same kernel
    y0 = dense_matmul(x, ws[0], bs[0], implementation="gpu", interpret=True, tiling=tiling,
                      layer=None if layer is None else jnp.int32(layer))
    assert max_rel_err(y0, ref_f64(x, ws[0], bs[0], layer)) <= F32_TOL


def test_dense_kernel_bf16_within_xla_error(rng):
    """bf16 activations: the kernel's error is at most twice the XLA path's own bf16 error (+1e-3)."""
    m, k = 4, 2880  # the 120b hidden size: a K tail with the default 256-row step
    w = make_int4(rng, (), k, 192, 32, False)
    b = jnp.asarray(rng.standard_normal(192), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    ref = ref_f64(x, w, b.astype(jnp.float32))
    y = dense_matmul(x, w, b, implementation="gpu", interpret=True)
    e_xla = max_rel_err(dense_matmul(x, w, b, implementation="xla"), ref)
    chex.assert_type(y, jnp.bfloat16)
    assert max_rel_err(y, ref) <= 2 * e_xla + 1e-3


def test_tiling_resolution():
    t = _gpu_dense.resolve_tiling(None, 1, 2880, [4096, 512, 512], [32, 32, 32])
    assert (t.bm, t.bk, t.bn) == (16, 256, 128) and t.splits == 12  # 360 word rows = 12 steps of 32 (last: 8)
    assert _gpu_dense.resolve_tiling(None, 64, 4096, [2880], [32]).bm == 64
    # the K step halves until every group nests with it; group 24 (3 word rows) never does
    assert _gpu_dense.resolve_tiling(None, 4, 2880, [64], [2880]).bk == 256
    assert _gpu_dense.scale_mode(2880, 64, 32) == "expand" and _gpu_dense.scale_mode(4096, 512, 32) == "step"
    assert _gpu_dense.why_not(4, 144, [_gpu_dense.WeightSpec((144, 40), 24)]) is not None
    assert "K=256" in _gpu_dense.why_not(4, 256, [_gpu_dense.WeightSpec((320, 40), 32)])
    with pytest.raises(ValueError, match="bk=64"):
        _gpu_dense.resolve_tiling(dict(bk=64), 4, 256, [64], [32])


def test_registry_auto_on_cuda_picks_dense_kernel_at_decode_sizes():
    for m, want in ((1, "gpu"), (_gpu_dense.AUTO_MAX_M, "gpu"), (_gpu_dense.AUTO_MAX_M + 1, "xla"), (2048, "xla")):
        assert registry.select(MatmulCall("dense", m, 2880, 4096, 1, 32, False, "bfloat16"), "cuda").name == want
    # float weights and unsupported groups keep XLA
    assert registry.select(MatmulCall("dense", 4, 2880, 4096, 1, None, False, "bfloat16"), "cuda").name == "xla"
    assert registry.select(MatmulCall("dense", 4, 320, 256, 1, 20, False, "float32"), "cuda").name == "xla"


def test_fused_auto_on_cpu_equals_separate_calls_and_errors(rng):
    k = 256
    ws = [make_int4(rng, (), k, n, 64, sym) for n, sym in ((128, False), (32, True), (32, False))]
    bs = [jnp.asarray(rng.standard_normal(w.shape[1]), jnp.float32) for w in ws]
    x = jnp.asarray(rng.standard_normal((2, k)), jnp.float32)
    ys = jax.jit(dense_matmul_fused)(x, ws, bs)
    for y, w, b in zip(ys, ws, bs):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(dense_matmul(x, w, b, implementation="xla")))
        assert max_rel_err(y, ref_f64(x, w, b)) <= F32_TOL
    odd = make_int4(rng, (), 320, 64, 20, False)  # group 20: not a multiple of 8
    x320 = jnp.asarray(rng.standard_normal((2, 320)), jnp.float32)
    with pytest.raises(UnsupportedCallError, match=r"dense_matmul_fused x \[2, 320\].*group size"):
        dense_matmul_fused(x320, [odd], implementation="gpu")
    y = dense_matmul_fused(x320, [odd])[0]  # auto falls back
    assert max_rel_err(y, ref_f64(x320, odd, None)) <= F32_TOL
    with pytest.raises(ValueError, match=r"ws\[1\]"):
        dense_matmul_fused(x, [ws[0], make_int4(rng, (), 320, 8, 32, True)])
    with pytest.raises(ValueError, match=r"biases\[0\] must be \[128\]"):
        dense_matmul_fused(x, ws, [jnp.zeros(3)] + bs[1:])


def _spec(lead, k, n, g, sym):
    return Int4Tensor(jax.ShapeDtypeStruct((*lead, k // 8, n), jnp.int32),
                      jax.ShapeDtypeStruct((*lead, k // g, n), jnp.bfloat16),
                      None if sym else jax.ShapeDtypeStruct((*lead, k // g, n), jnp.uint8), g)


def _export(fn, platform, *args):
    exp = export.export(jax.jit(fn), platforms=[platform],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    return exp.mlir_module()


def _count(text, target):
    return text.count(f"@{target}(") + text.count(f'call_target_name = "{target}"')


def test_export_fused_qkv_120b_widths_stacked():
    """q/k/v of the 120b model stacked over 36 layers (g32 asym), batch-1 decode: ONE Triton kernel for cuda;
    three Mosaic kernels for tpu (separate calls there); o_proj alone: one Triton kernel."""
    nl, h = 36, 2880
    ws = [_spec((nl,), h, n, 32, False) for n in (4096, 512, 512)]
    bs = [jax.ShapeDtypeStruct((nl, n), jnp.bfloat16) for n in (4096, 512, 512)]
    x = jax.ShapeDtypeStruct((1, h), jnp.bfloat16)
    lay = jax.ShapeDtypeStruct((), jnp.int32)
    fn = lambda x_, ws_, bs_, l_: dense_matmul_fused(x_, ws_, bs_, layer=l_)  # noqa: E731
    assert _count(_export(fn, "cuda", x, ws, bs, lay), TRITON) == 1
    assert _count(_export(fn, "tpu", x, ws, bs, lay), MOSAIC) == 3
    o = _spec((nl,), 4096, h, 32, False)
    fo = lambda x_, w_, l_: dense_matmul(x_, w_, layer=l_)  # noqa: E731
    assert _count(_export(fo, "cuda", jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16), o, lay), TRITON) == 1


def test_grouped_int4_default_runs_the_nibble_plane_kernel():
    """int4 grouped calls with default tilings take _gpu_grouped (so tests/test_kernels.py's gpu cases check it);
    bk < 128 tilings and group sizes that are not multiples of 8 keep _gpu.py."""
    gpu = registry.REGISTRY["gpu"]
    call = MatmulCall("grouped", 12, 2880, 5760, 128, 32, False, "bfloat16", "swiglu", True)
    assert gpu._planes_kernel(call) and gpu.supports(call)
    assert not gpu._planes_kernel(call, GpuTiling(bk=64)) and gpu.supports(call, GpuTiling(bk=64))
    odd = MatmulCall("grouped", 12, 144, 40, 2, 1, False, "float32")  # group 1: only _gpu.py
    assert not gpu._planes_kernel(odd) and gpu.supports(odd)
