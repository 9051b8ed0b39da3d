"""dense_matmul / grouped_matmul: every implementation against a float64 numpy reference built from the exact int4
codes, on fresh random data (the `rng` fixture). "gpu" (Triton lowering) and "tpu" (Mosaic) run in Pallas
interpret mode on CPU; the TPU interpreter is slow, so the kernels run on a representative subset and the 120b-sized
shapes are marked slow. bf16 tolerances are judged against the bf16-vs-f64 error of the XLA reference itself."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gptoss_jax.kernels import clamped_swiglu, default_implementation, dense_matmul, grouped_matmul
from gptoss_jax.kernels.reference import dequantize_f64, grouped_matmul_f64, max_rel_err, swiglu_f64
from gptoss_jax.kernels import int4_layout as L

KERNELS = ["gpu", "tpu"]
ALL = ["xla", *KERNELS]
F32_TOL = 2e-5
HAS_GPU = any(d.platform == "gpu" for d in jax.devices()) if jax.default_backend() != "cpu" else False


# ---------------------------------------------------------------------------------------------------- helpers
def make_int4(rng, e, k, n, group, sym, scale_dtype=np.float32):
    """Random int4 weights with random codes, scales (and zero points): a numpy Int4Tensor."""
    g = k if group == "channel" else group
    q = rng.integers(0, 16, size=(e, k, n), dtype=np.uint8)
    s = (rng.random((e, k // g, n)) * 0.02 + 0.005).astype(scale_dtype)
    z = None if sym else rng.integers(0, 16, size=(e, k // g, n), dtype=np.uint8)
    return L.from_unsigned(q, s, z, group_size=g)


def group_sizes(rng, m, e, kind):
    if kind == "random":  # some experts empty, all rows used
        p = rng.random(e) * (rng.random(e) > 0.3)
        if p.sum() == 0:
            p[0] = 1
        gs = rng.multinomial(m, p / p.sum())
    elif kind == "one":  # all tokens in one expert, the others never touched
        gs = np.zeros(e, np.int64)
        gs[rng.integers(e)] = m
    elif kind == "tail":  # rows past sum(group_sizes) must come out as zeros
        gs = rng.multinomial(max(m - 3, 0), np.ones(e) / e)
        gs[rng.integers(e)] = 0
    elif kind == "empty":
        gs = np.zeros(e, np.int64)
    elif kind == "overfull":  # sum(group_sizes) > M: the group crossing M is clipped, later groups get no rows
        gs = rng.multinomial(m + int(rng.integers(1, 9)), np.ones(e) / e)
    else:
        raise ValueError(kind)
    return gs.astype(np.int32)


def inputs(rng, m, k, dtype):
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    return x, np.asarray(x.astype(jnp.float32)).astype(np.float64)


def run_grouped(impl, x, w, gs, **kw):
    """grouped_matmul with implementation=impl; kernels run in interpret mode (tpu: the TPU interpreter)."""
    wj = jax.tree.map(jnp.asarray, w)
    if impl != "xla":
        kw.setdefault("interpret", True)
    return grouped_matmul(x, wj, jnp.asarray(gs), implementation=impl, **kw)


def check(impl, y, ref, dtype, tol_ref, shape, out_dtype=None):
    chex.assert_shape(y, shape)
    chex.assert_type(y, out_dtype or dtype)
    err = max_rel_err(y, ref)
    tol = F32_TOL if dtype == jnp.float32 else 2 * tol_ref + 1e-3
    assert err <= tol, f"{impl}: rel err {err:.3e} > tol {tol:.3e}"
    return err


# ---------------------------------------------------------------------------------------------------- reference
def test_clamped_swiglu_matches_numpy(rng):
    h = rng.standard_normal((5, 16)) * 6
    np.testing.assert_allclose(np.asarray(clamped_swiglu(jnp.asarray(h, jnp.float32))), swiglu_f64(h), rtol=1e-5,
                               atol=1e-5)
    chex.assert_shape(clamped_swiglu(jnp.zeros((2, 8), jnp.bfloat16)), (2, 4))


def test_default_implementation_and_errors(rng):
    assert default_implementation() == {"tpu": "tpu", "gpu": "gpu"}.get(jax.default_backend(), "xla")
    x = jnp.ones((2, 64), jnp.float32)
    w = jnp.ones((2, 64, 8), jnp.float32)
    with pytest.raises(ValueError):
        grouped_matmul(x, w, jnp.array([1, 1], jnp.int32), implementation="cuda")
    with pytest.raises(ValueError):
        grouped_matmul(x, w, jnp.array([1, 1, 0], jnp.int32))
    with pytest.raises(ValueError):
        grouped_matmul(x, w, jnp.array([1, 1], jnp.int32), epilogue="gelu")
    with pytest.raises(ValueError):
        dense_matmul(x, jnp.ones((32, 8)))


@pytest.mark.parametrize("m", [1, 3, 64, 300])
@pytest.mark.parametrize("k,n,group,sym", [(256, 512, 32, False), (320, 576, 64, True), (256, 576, "channel", False),
                                           (320, 512, 32, True)])
def test_grouped_xla_matches_f64(rng, m, k, n, group, sym):
    e = 6
    w = make_int4(rng, e, k, n, group, sym)
    gs = group_sizes(rng, m, e, "random" if m > 3 else "tail")
    x, x64 = inputs(rng, m, k, jnp.float32)
    ref = grouped_matmul_f64(x64, dequantize_f64(w), gs)
    check("xla", run_grouped("xla", x, w, gs), ref, jnp.float32, 0, (m, n))


@pytest.mark.slow
@pytest.mark.parametrize("m,k,n", [(300, 2880, 5760), (64, 2880, 2880)])
def test_grouped_xla_120b_shapes(rng, m, k, n):
    e = 8
    w = make_int4(rng, e, k, n, 32, False, ml_dtypes.bfloat16)
    gs = group_sizes(rng, m, e, "random")
    x, x64 = inputs(rng, m, k, jnp.float32)
    check("xla", run_grouped("xla", x, w, gs), grouped_matmul_f64(x64, dequantize_f64(w), gs), jnp.float32, 0, (m, n))


def test_xla_int4_reads_only_present_experts(rng):
    """The xla path must never build a dequantized [E, K, N] copy when fewer than E experts can be present."""
    e, k, n, m = 16, 256, 512, 3
    w = jax.tree.map(jnp.asarray, make_int4(rng, e, k, n, 32, False))
    x = jnp.ones((m, k), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x_, w_, g_: grouped_matmul(x_, w_, g_, implementation="xla"))(
        x, w, jnp.array([1] * m + [0] * (e - m), jnp.int32))
    shapes = []

    def walk(jp):
        for eqn in jp.eqns:
            for v in eqn.outvars:
                if hasattr(v.aval, "shape"):
                    shapes.append((tuple(v.aval.shape), v.aval.dtype))
            for p in eqn.params.values():
                for q in (p if isinstance(p, (list, tuple)) else [p]):
                    if hasattr(q, "eqns"):
                        walk(q)
                    elif hasattr(getattr(q, "jaxpr", None), "eqns"):
                        walk(q.jaxpr)

    walk(jaxpr.jaxpr)
    big = [s for s, dt in shapes if len(s) == 3 and s[0] == e and s[1] * s[2] >= k * n and
           jnp.issubdtype(dt, jnp.floating)]
    assert not big, f"full dequantized expert tensor built: {big}"
    # ... but it does dequantize the (at most M) present experts
    assert any(s == (m, k, n) for s, dt in shapes if jnp.issubdtype(dt, jnp.floating))
    # and the int4 words it touches are gathered for M experts only
    assert not any(s == (e, k, n) for s, _ in shapes)


# ---------------------------------------------------------------------------------------------------- kernels
# (m, e, k, n, group, sym, gs kind, dtype, bias, epilogue)
CASES = {
    "decode-asym-g32-empty-experts": (3, 5, 256, 512, 32, False, "random", jnp.float32, True, None),
    "sym-g64-K320-N576-tail-rows": (64, 4, 320, 576, 64, True, "tail", jnp.bfloat16, False, None),
    "channel-asym-one-expert": (100, 4, 256, 512, "channel", False, "one", jnp.bfloat16, True, None),
    "swiglu-bias-bf16": (16, 6, 256, 512, 32, True, "random", jnp.bfloat16, True, "swiglu"),
    "swiglu-f32-g128": (9, 3, 256, 576, 128, False, "tail", jnp.float32, True, "swiglu"),
    "no-rows-at-all": (5, 3, 256, 512, 64, False, "empty", jnp.bfloat16, True, None),
    "overfull-groups-f32": (13, 4, 256, 512, 32, False, "overfull", jnp.float32, True, "swiglu"),
}


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_kernels_interpret(rng, impl, case):
    m, e, k, n, group, sym, kind, dtype, use_bias, epi = CASES[case]
    w = make_int4(rng, e, k, n, group, sym, np.float32 if dtype == jnp.float32 else ml_dtypes.bfloat16)
    gs = group_sizes(rng, m, e, kind)
    x, x64 = inputs(rng, m, k, dtype)
    bias = jnp.asarray(rng.standard_normal((e, n)) * 0.5, dtype) if use_bias else None
    b64 = None if bias is None else np.asarray(bias.astype(jnp.float32)).astype(np.float64)
    ref = grouped_matmul_f64(x64, dequantize_f64(w), gs, b64, epi)
    y_xla = run_grouped("xla", x, w, gs, bias=bias, epilogue=epi)
    err_xla = max_rel_err(y_xla, ref) if np.any(ref) else 0.0
    y = run_grouped(impl, x, w, gs, bias=bias, epilogue=epi)
    nout = n // 2 if epi else n
    if not np.any(ref):
        chex.assert_shape(y, (m, nout))
        assert np.all(np.asarray(y.astype(jnp.float32)) == 0)
        return
    check(impl, y, ref, dtype, err_xla, (m, nout))
    # all implementations agree with each other (within the same bf16 budget)
    agree = max_rel_err(y, np.asarray(y_xla.astype(jnp.float32)).astype(np.float64))
    assert agree <= (F32_TOL if dtype == jnp.float32 else 2 * err_xla + 2e-3)
    total = int(gs.sum())
    assert np.all(np.asarray(y[total:].astype(jnp.float32)) == 0)


@pytest.mark.parametrize("impl", ALL)
def test_grouped_float_weights(rng, impl):
    m, e, k, n = 10, 3, 256, 576
    w = rng.standard_normal((e, k, n)).astype(np.float32) * 0.05
    gs = np.array([4, 0, 5], np.int32)  # 1 trailing row
    x, x64 = inputs(rng, m, k, jnp.float32)
    y = grouped_matmul(x, jnp.asarray(w), jnp.asarray(gs), implementation=impl)
    check(impl, y, grouped_matmul_f64(x64, w.astype(np.float64), gs), jnp.float32, 0, (m, n))


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("quant", ["int4-asym-g32", "float"])
def test_dense_matmul(rng, impl, quant):
    m, k, n = 5, 320, 576
    if quant == "float":
        w = jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32)
        w64 = np.asarray(w).astype(np.float64)
    else:
        wt = make_int4(rng, 1, k, n, 32, False)[0]
        w64 = dequantize_f64(wt)
        w = jax.tree.map(jnp.asarray, wt)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        x, x64 = inputs(rng, m, k, dtype)
        ref = x64 @ w64 + np.asarray(bias, np.float64)
        y_xla = dense_matmul(x, w, bias.astype(dtype), implementation="xla")
        err_xla = max_rel_err(y_xla, ref)
        y = dense_matmul(x, w, bias.astype(dtype), implementation=impl)  # interpret=None: interpreted off-platform
        check(impl, y, ref, dtype, err_xla, (m, n))


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_grouped_kernels_120b_gate_up(rng, impl):
    """gpt-oss-120b expert shape 2880 -> 5760 (N not a multiple of 128) with the fused swiglu epilogue."""
    m, e, k, n = 24, 6, 2880, 5760
    w = make_int4(rng, e, k, n, 32, False, ml_dtypes.bfloat16)
    gs = group_sizes(rng, m, e, "tail")
    x, x64 = inputs(rng, m, k, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((e, n)) * 0.5, jnp.bfloat16)
    ref = grouped_matmul_f64(x64, dequantize_f64(w), gs, np.asarray(bias.astype(jnp.float32)).astype(np.float64), "swiglu")
    err_xla = max_rel_err(run_grouped("xla", x, w, gs, bias=bias, epilogue="swiglu"), ref)
    check(impl, run_grouped(impl, x, w, gs, bias=bias, epilogue="swiglu"), ref, jnp.bfloat16, err_xla, (m, n // 2))


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_grouped_kernels_120b_down_f32(rng, impl):
    m, e, k, n = 12, 5, 2880, 2880
    w = make_int4(rng, e, k, n, 64, True)
    gs = group_sizes(rng, m, e, "random")
    x, x64 = inputs(rng, m, k, jnp.float32)
    check(impl, run_grouped(impl, x, w, gs), grouped_matmul_f64(x64, dequantize_f64(w), gs), jnp.float32, 0, (m, n))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_kernel_compiled(rng, dtype):
    m, e, k, n = 64, 8, 2880, 5760
    w = make_int4(rng, e, k, n, 32, False, ml_dtypes.bfloat16)
    gs = group_sizes(rng, m, e, "tail")
    x, x64 = inputs(rng, m, k, dtype)
    ref = grouped_matmul_f64(x64, dequantize_f64(w), gs, None, "swiglu")
    err_xla = max_rel_err(run_grouped("xla", x, w, gs, epilogue="swiglu"), ref)
    y = run_grouped("gpu", x, w, gs, epilogue="swiglu", interpret=False)
    check("gpu", y, ref, dtype, err_xla, (m, n // 2))


def test_tiling_override_and_partial_tiles(rng):
    """Explicit tilings with partial N tiles (576 = 4.5 x 128) and several K steps agree with the reference."""
    m, e, k, n = 20, 3, 512, 576
    w = make_int4(rng, e, k, n, 64, False)
    gs = group_sizes(rng, m, e, "random")
    x, x64 = inputs(rng, m, k, jnp.float32)
    ref = grouped_matmul_f64(x64, dequantize_f64(w), gs)
    check("gpu", run_grouped("gpu", x, w, gs, tiling=dict(bm=16, bk=32, bn=128, splits=1)), ref, jnp.float32, 0,
          (m, n))
    # split-K: float32 partial sums reduced outside the kernel, bias + swiglu applied there
    bias = jnp.asarray(rng.standard_normal((e, n)), jnp.float32)
    ref_s = grouped_matmul_f64(x64, dequantize_f64(w), gs, np.asarray(bias, np.float64), "swiglu")
    check("gpu", run_grouped("gpu", x, w, gs, bias=bias, epilogue="swiglu", tiling=dict(bk=64, bn=64, splits=3)),
          ref_s, jnp.float32, 0, (m, n // 2))
    check("tpu", run_grouped("tpu", x, w, gs, tiling=dict(tm=8, tk=128, tn=256)), ref, jnp.float32, 0, (m, n))


def test_group_metadata_covers_every_row_once(rng):
    from gptoss_jax.kernels import _common
    for _ in range(5):
        e = int(rng.integers(1, 9))
        m = int(rng.integers(1, 70))
        tm = int(rng.choice([8, 16]))
        gs = group_sizes(rng, m, e, str(rng.choice(["random", "tail", "one", "empty", "overfull"])))
        meta = jax.tree.map(np.asarray, jax.jit(_common.make_group_meta, static_argnums=(1, 2))(jnp.asarray(gs), m, tm))
        owner = np.full(m, -1)
        n_items = int(meta.num_items)
        for i in range(meta.group_ids.shape[0]):
            rs, re = int(meta.row_starts[i]), int(meta.row_ends[i])
            if i >= n_items:
                assert rs == re
                continue
            assert int(meta.m_tiles[i]) * tm <= rs < re <= (int(meta.m_tiles[i]) + 1) * tm
            assert np.all(owner[rs:re] == -1)
            owner[rs:re] = int(meta.group_ids[i])
            if int(meta.is_real[i]):
                assert gs[int(meta.weight_ids[i])] > 0
        want = np.concatenate([np.repeat(np.arange(e), gs), np.full(max(0, m - gs.sum()), e)])[:m]
        np.testing.assert_array_equal(owner, want)
        # weights of untouched experts are never read
        assert set(np.asarray(meta.weight_ids)[np.asarray(meta.is_real) == 1]) <= set(np.nonzero(gs)[0])


@pytest.mark.parametrize("impl", ALL)
def test_zero_rows(impl):
    w = jnp.ones((3, 256, 64), jnp.float32)
    y = grouped_matmul(jnp.zeros((0, 256), jnp.bfloat16), w, jnp.zeros((3,), jnp.int32), epilogue="swiglu",
                       implementation=impl)
    chex.assert_shape(y, (0, 32))
    chex.assert_type(y, jnp.bfloat16)


def test_gpu_supports_guards_shapes():
    from gptoss_jax.kernels import _gpu
    assert _gpu.supports((4, 2880), (128, 2880, 5760), 32)
    assert _gpu.supports((4, 2880), (128, 2880, 5760), 2880)
    assert not _gpu.supports((4, 2888), (1, 2888, 64), None)  # 2888 = 8 * 361: no pow2 tile >= 16
    assert not _gpu.supports((4, 240), (1, 240, 64), 24)  # group 24 nests with no pow2 tile >= 16
