"""The row-wise int4 GEMV kernel (gptoss_jax.kernels._gpu_gemv) and the op that exposes it (routed_matmul): every
variant against the float64 reference, in Pallas' interpreter on CPU (the same kernel body Triton compiles on the
GPU; bench/bench_gemv.py repeats the checks compiled on an H200)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_jax.kernels import (Int4Tensor, UnsupportedCallError, dense_matmul, dense_matmul_fused, from_unsigned,
                                quantize, routed_matmul)
from gptoss_jax.kernels import _gpu_gemv
from gptoss_jax.kernels.int4_layout import unpack
from gptoss_jax.kernels.reference import dequantize_f64, max_rel_err, routed_matmul_f64

ALPHA, LIMIT = 1.702, 7.0


def _int4(rng, lead, k, n, g, sym):
    w = rng.standard_normal((*lead, k, n)).astype(np.float32)
    t = quantize(w, group_size=g, symmetric=sym)
    return Int4Tensor(jnp.asarray(t.packed), jnp.asarray(t.scales), None if t.zeros is None else jnp.asarray(t.zeros),
                      g)


def _f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("g,sym,dtype,epilogue,dequant", [
    (32, False, jnp.float32, None, "fold"),
    (32, False, jnp.float32, "swiglu", "exact"),
    (64, True, jnp.bfloat16, None, "exact"),
    (32, True, jnp.bfloat16, "swiglu", "fold"),
    (16, False, jnp.float32, "swiglu", "fold"),  # 8 groups per K step, K tail masked
    (64, True, jnp.float32, None, "fold"),
    (256, False, jnp.float32, None, "fold"),  # one group per step
    (32, False, jnp.float32, "swiglu", "mant"),
    (64, True, jnp.bfloat16, None, "mant"),
    (16, False, jnp.float32, None, "mant"),  # 8 groups per K step, K tail masked
    (256, True, jnp.float32, "swiglu", "mant"),
])
def test_routed_kernel_matches_float64(g, sym, dtype, epilogue, dequant):
    rng = np.random.default_rng(g + sym)
    e, k, n = 5, 768, 96  # 96 columns: a partial N tile (bn 128)
    w = _int4(rng, (e,), k, n, g, sym)
    b = jnp.asarray(rng.standard_normal((e, n)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, k)), dtype)
    ids = np.array([4, 0, -1, 2, 7, 4], np.int32)  # -1 and 7 (>= E) are dead rows: zeros
    rows = np.array([0, 0, 1, 1, 2, 2], np.int32)
    y = routed_matmul(x, w, jnp.asarray(ids), rows=jnp.asarray(rows), bias=b, epilogue=epilogue,
                      swiglu_alpha=ALPHA, swiglu_limit=LIMIT, implementation="gpu", interpret=True,
                      tiling=_gpu_gemv.GemvTiling(dequant=dequant, step_words=64 if g == 16 else 32))
    ref = routed_matmul_f64(_f64(x), dequantize_f64(w), ids, rows, _f64(b), epilogue, ALPHA, LIMIT)
    assert y.shape == ref.shape and y.dtype == dtype
    assert np.all(np.asarray(y[2].astype(jnp.float32)) == 0) and np.all(np.asarray(y[4].astype(jnp.float32)) == 0)
    # the sorted grouped path (what other platforms run) agrees; bf16 is judged against that path's own bf16 error
    yx = routed_matmul(x, w, jnp.asarray(ids), rows=jnp.asarray(rows), bias=b, epilogue=epilogue,
                       swiglu_alpha=ALPHA, swiglu_limit=LIMIT, implementation="xla")
    if dtype == jnp.float32:
        assert max_rel_err(y, ref) <= 1e-5 and max_rel_err(yx, ref) <= 1e-5
    else:
        assert max_rel_err(yx, ref) <= 0.05
        assert max_rel_err(y, ref) <= 2 * max_rel_err(yx, ref) + 1e-3


@pytest.mark.parametrize("bn,step_words", [(64, 16), (32, 8)])
def test_routed_kernel_whole_tiles_without_masks_matches_float64(bn, step_words):
    """N a multiple of bn and K a multiple of the K step: the kernel is traced without load / store masks."""
    rng = np.random.default_rng(bn)
    e, k, n, g = 3, 512, 128, 32
    w = _int4(rng, (e,), k, n, g, False)
    x = jnp.asarray(rng.standard_normal((2, k)), jnp.float32)
    ids = np.array([2, -1, 0, 1], np.int32)
    rows = np.array([0, 0, 1, 1], np.int32)
    y = routed_matmul(x, w, jnp.asarray(ids), rows=jnp.asarray(rows), epilogue="swiglu", swiglu_alpha=ALPHA,
                      swiglu_limit=LIMIT, implementation="gpu", interpret=True,
                      tiling=_gpu_gemv.GemvTiling(bn=bn, step_words=step_words))
    ref = routed_matmul_f64(_f64(x), dequantize_f64(w), ids, rows, None, "swiglu", ALPHA, LIMIT)
    assert max_rel_err(y, ref) <= 1e-5 and np.all(np.asarray(y[1]) == 0)


def test_routed_kernel_reads_stacked_layers_in_place():
    rng = np.random.default_rng(1)
    layers, e, k, n = 3, 4, 256, 64
    w = _int4(rng, (layers, e), k, n, 32, False)
    b = jnp.asarray(rng.standard_normal((layers, e, n)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, k)), jnp.float32)
    ids = np.array([3, 1, 0, 2], np.int32)
    for layer in (0, 2):
        y = jax.jit(lambda x_, w_, b_, l_: routed_matmul(x_, w_, jnp.asarray(ids), bias=b_, layer=l_,
                                                        implementation="gpu", interpret=True))(x, w, b, layer)
        wl = jax.tree.map(lambda a: a[layer], w)
        ref = routed_matmul_f64(_f64(x), dequantize_f64(wl), ids, None, _f64(b[layer]))
        assert max_rel_err(y, ref) <= 1e-5


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 5), st.sampled_from([16, 32, 64]), st.integers(1, 3), st.booleans(), st.integers(0, 2**31 - 1),
       st.sampled_from(_gpu_gemv.DEQUANT_MODES))
def test_routed_kernel_property(rows_n, g, kgroups_steps, sym, seed, dequant):
    """Any number of rows, group sizes, K lengths (whole and partial K steps), N and dequantization mode: equals the
    float64 reference."""
    rng = np.random.default_rng(seed)
    e = 3
    k = g * max(1, (kgroups_steps * 256) // g - 1)  # K not a multiple of the 256-row step
    n = int(rng.integers(1, 5)) * 16
    w = _int4(rng, (e,), k, n, g, sym)
    x = jnp.asarray(rng.standard_normal((rows_n, k)), jnp.float32)
    ids = rng.integers(-1, e, rows_n).astype(np.int32)
    y = routed_matmul(x, w, jnp.asarray(ids), implementation="gpu", interpret=True,
                      tiling=_gpu_gemv.GemvTiling(dequant=dequant))
    ref = routed_matmul_f64(_f64(x), dequantize_f64(w), ids)
    assert np.all(np.isfinite(np.asarray(y)))
    assert np.max(np.abs(np.asarray(y) - ref)) <= 1e-5 * max(1.0, float(np.max(np.abs(ref))))


def test_dense_rowwise_for_one_row_matches_float64():
    """At M = 1 the dense int4 projections take the row-wise kernel (q/k/v in one launch, o alone)."""
    rng = np.random.default_rng(2)
    layers, k = 2, 512
    ws = [_int4(rng, (layers,), k, n, 32, sym) for n, sym in ((256, False), (64, True), (64, False))]
    bs = [jnp.asarray(rng.standard_normal((layers, w.shape[-1])), jnp.float32) for w in ws]
    x = jnp.asarray(rng.standard_normal((1, k)), jnp.float32)
    assert _gpu_gemv.dense_eligible(1, k, ws) and not _gpu_gemv.dense_eligible(2, k, ws)
    ys = dense_matmul_fused(x, ws, bs, layer=jnp.int32(1), implementation="gpu", interpret=True)
    for y, w, b in zip(ys, ws, bs):
        wl = jax.tree.map(lambda a: a[1], w)
        assert max_rel_err(y, _f64(x) @ dequantize_f64(wl) + _f64(b[1])) <= 1e-5
    y = dense_matmul(x, ws[0], bs[0], layer=jnp.int32(0), implementation="gpu", interpret=True)
    w0 = jax.tree.map(lambda a: a[0], ws[0])
    assert max_rel_err(y, _f64(x) @ dequantize_f64(w0) + _f64(bs[0][0])) <= 1e-5


def test_routed_matmul_errors_name_the_argument():
    rng = np.random.default_rng(3)
    w = _int4(rng, (2,), 96, 32, 96 // 4, False)  # group 24: 24 / 8 = 3 is not a power of two
    x = jnp.ones((2, 96), jnp.float32)
    with pytest.raises(UnsupportedCallError, match="group size 24"):
        routed_matmul(x, w, jnp.array([0, 1]), implementation="gpu", interpret=True)
    assert routed_matmul(x, w, jnp.array([0, 1]), implementation="xla").shape == (2, 32)  # others still run it
    with pytest.raises(ValueError, match="expert_ids"):
        routed_matmul(x, w, jnp.array([[0, 1]]))
    with pytest.raises(ValueError, match="one row per id"):
        routed_matmul(x, w, jnp.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"rows must be \[3\]"):
        routed_matmul(x, w, jnp.array([0, 1, 1]), rows=jnp.array([0, 1]))
    with pytest.raises(ValueError, match="x K=64"):
        routed_matmul(jnp.ones((2, 64)), w, jnp.array([0, 1]))


def test_default_tiling_env_override(monkeypatch):
    monkeypatch.setenv(_gpu_gemv.TILING_ENV_VAR, '{"bn": 64, "dequant": "exact"}')
    assert _gpu_gemv.default_tiling() == _gpu_gemv.GemvTiling(bn=64, dequant="exact")
    for bad in ("{bn: 64}", '{"bm": 16}', "[1]"):
        monkeypatch.setenv(_gpu_gemv.TILING_ENV_VAR, bad)
        with pytest.raises(ValueError, match="GPTOSS_GEMV_TILING"):
            _gpu_gemv.default_tiling()
    monkeypatch.setenv(_gpu_gemv.TILING_ENV_VAR, '{"dequant": "fast"}')
    assert "dequant" in _gpu_gemv.why_not(256, [32])
    monkeypatch.setenv(_gpu_gemv.TILING_ENV_VAR, '{"dequant": "mant"}')
    assert _gpu_gemv.default_tiling().dequant == "mant" and _gpu_gemv.why_not(256, [32]) is None


def test_default_tiling_per_role(monkeypatch):
    """Each decode matmul (gate_up, down, qkv, o) has its own default; the env var sets all roles or some."""
    monkeypatch.delenv(_gpu_gemv.TILING_ENV_VAR, raising=False)
    monkeypatch.setattr(_gpu_gemv, "ROLE_TILINGS", {**_gpu_gemv.ROLE_TILINGS, "down": {"bn": 64, "splits": 2}})
    assert _gpu_gemv.default_tiling("down") == _gpu_gemv.GemvTiling(bn=64, splits=2)
    assert _gpu_gemv.default_tiling() == _gpu_gemv.GemvTiling()
    monkeypatch.setenv(_gpu_gemv.TILING_ENV_VAR, '{"o": {"num_warps": 2}, "down": {"bn": 32}}')
    assert _gpu_gemv.default_tiling("o").num_warps == 2
    assert _gpu_gemv.default_tiling("down") == _gpu_gemv.GemvTiling(bn=32, splits=2)  # env over the role default
    assert _gpu_gemv.default_tiling("qkv") == _gpu_gemv.GemvTiling.coerce(_gpu_gemv.ROLE_TILINGS["qkv"])
    monkeypatch.setenv(_gpu_gemv.TILING_ENV_VAR, '{"num_warps": 8}')
    assert all(_gpu_gemv.default_tiling(r).num_warps == 8 for r in _gpu_gemv.ROLES)
    monkeypatch.setenv(_gpu_gemv.TILING_ENV_VAR, '{"o": {}, "lm_head": {"bn": 64}}')
    with pytest.raises(ValueError, match="lm_head"):
        _gpu_gemv.default_tiling("o")


def test_auto_limits_env_override(monkeypatch):
    monkeypatch.setenv(_gpu_gemv.ENV_VAR, "0,0")
    assert _gpu_gemv.auto_limits() == (0, 0)
    monkeypatch.setenv(_gpu_gemv.ENV_VAR, "many")
    with pytest.raises(ValueError, match="GPTOSS_GEMV_MAX_ROWS"):
        _gpu_gemv.auto_limits()
    monkeypatch.delenv(_gpu_gemv.ENV_VAR)
    assert _gpu_gemv.auto_limits() == (_gpu_gemv.AUTO_MAX_ROWS, _gpu_gemv.AUTO_MAX_DENSE_ROWS)


@pytest.mark.parametrize("k,n,dequant", [
    (512, 256, "fold"), (480, 96, "fold"),  # whole tiles (no masks), partial N and K tiles
    (512, 256, "mant"), (480, 96, "mant"), (512, 256, "exact"), (512, 256, "mant-symmetric"),
])
def test_routed_kernel_lowers_to_triton_for_cuda(k, n, dequant):
    """The compiled (non-interpreted) kernel lowers from this CPU host for cuda: one Triton call."""
    e, g = 4, 32
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    sym = dequant.endswith("-symmetric")  # zeros None: the zero point 8 is a constant in the kernel
    dequant = dequant.removesuffix("-symmetric")

    def f(x, p, s, z, ids):
        return routed_matmul(x, Int4Tensor(p, s, None if sym else z, g), ids, implementation="gpu", interpret=False,
                             tiling=_gpu_gemv.GemvTiling(dequant=dequant))

    low = jax.jit(f).trace(spec((4, k), jnp.bfloat16), spec((e, k // 8, n), jnp.int32),
                           spec((e, k // g, n), jnp.bfloat16), spec((e, k // g, n), jnp.uint8),
                           spec((4,), jnp.int32)).lower(lowering_platforms=("cuda",))
    assert low.as_text().count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("first", [0, 3])
def test_routed_moe_equals_grouped_moe(first):
    """The MoE path the GPU takes at decode (routed_experts_forward: the row-wise kernel from the router's ids, here
    interpreted) equals the sorted grouped path CPU/TPU take, on a tiny int4 model's stacked experts — including a
    shard offset (`first`: ids outside the local range contribute nothing) and a layer index."""
    from flax import nnx

    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.model import GptOss
    from gptoss_jax.moe_parallel import local_experts_forward, routed_experts_forward
    from gptoss_jax.params import QuantSpec

    cfg = GptOssConfig.from_preset("tiny")
    model = GptOss(cfg, dtype=jnp.float32, quant=QuantSpec(group_size=32, symmetric=False, scale_dtype="float32"),
                   rngs=nnx.Rngs(7))
    experts = model.layers.mlp.experts
    rng = np.random.default_rng(first)
    n, k, e = 3, cfg.num_experts_per_tok, cfg.num_local_experts
    x = jnp.asarray(rng.standard_normal((n, cfg.hidden_size)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(e + first, k, replace=False) for _ in range(n)]), jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    assert experts.routed_eligible(n * k)
    for layer in (0, cfg.num_hidden_layers - 1):
        want = local_experts_forward(experts, x, ids, weights, first, layer=jnp.int32(layer))
        got = routed_experts_forward(experts, x, ids, weights, first, layer=jnp.int32(layer), interpret=True)
        assert got.shape == (n, cfg.hidden_size) and got.dtype == jnp.float32
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 0 and float(jnp.max(jnp.abs(got - want))) <= 1e-5 * scale


@pytest.mark.parametrize("dtype,sym", [(jnp.float32, False), (jnp.bfloat16, False), (jnp.float32, True),
                                       (jnp.bfloat16, True)])
def test_dequant_modes_large_x_every_code_match_float64(dtype, sym):
    """|x| ~ 1e4 (up to ~5e4) and every code 0..15 in every nibble position (nibble 7 holds the word's sign bit;
    5..7 take "mant"'s shifted path), zero points 0 and 15 present: each mode is within 1e-6 of the float64
    reference (float32 output, so only the kernel's own rounding counts), and "mant" gives "exact"'s results bit for
    bit (the same float32 products x·(q - z), module docstring)."""
    rng = np.random.default_rng(11 + sym)
    e, k, n, g = 2, 512, 48, 32  # 48 columns: a partial N tile (bn 128)
    q = rng.integers(0, 16, (e, k, n)).astype(np.uint8)
    for j in range(8):
        q[:, 8 * np.arange(16) + j, 0] = np.arange(16)  # codes 0..15 at nibble j in column 0
    zeros = None if sym else rng.integers(0, 16, (e, k // g, n)).astype(np.uint8)
    if zeros is not None:
        zeros[:, 0, :2] = (0, 15)
    scales = (rng.uniform(0.5, 2.0, (e, k // g, n)) * rng.choice([-1e-2, 1e-2], (e, k // g, n))).astype(np.float32)
    w = from_unsigned(jnp.asarray(q), jnp.asarray(scales), None if zeros is None else jnp.asarray(zeros),
                      group_size=g)
    codes = unpack(np.asarray(w.packed))  # the stored words' nibbles
    assert all(set(np.unique(codes[:, j::8])) == set(range(16)) for j in range(8))
    x = jnp.asarray(rng.standard_normal((3, k)) * 1e4, dtype)
    assert 2e4 < float(jnp.max(jnp.abs(x.astype(jnp.float32)))) < 1e5
    ids = np.array([1, 0, -1, 1], np.int32)
    rows = np.array([0, 1, 1, 2], np.int32)
    ref = routed_matmul_f64(_f64(x), dequantize_f64(w), ids, rows)
    ys = {}
    for dequant in _gpu_gemv.DEQUANT_MODES:
        y = routed_matmul(x, w, jnp.asarray(ids), rows=jnp.asarray(rows), out_dtype=jnp.float32,
                          implementation="gpu", interpret=True, tiling=_gpu_gemv.GemvTiling(dequant=dequant))
        assert y.dtype == jnp.float32 and y.shape == ref.shape
        ys[dequant] = np.asarray(y)
        assert max_rel_err(y, ref) <= 1e-6, (dequant, max_rel_err(y, ref))  # inf (fails) for NaN / inf
    assert np.array_equal(ys["mant"], ys["exact"]) and np.all(ys["mant"][2] == 0)


@pytest.mark.parametrize("stacked,with_bias,rows_k", [(False, True, 2), (True, False, 2), (True, True, 3)])
def test_routed_kernel_combine_weights_matches_float64(stacked, with_bias, rows_k):
    """The MoE combine in the kernel (combine_weights): each token's weighted sum over its k rows, biases weighted
    too, dead ids contributing nothing — against float64, and the sorted path agrees."""
    rng = np.random.default_rng(7 + rows_k)
    e, k, n, g, t = 4, 512, 96, 32, 3
    layers_n = 2
    w = _int4(rng, (layers_n, e) if stacked else (e,), k, n, g, False)
    b = jnp.asarray(rng.standard_normal((layers_n, e, n) if stacked else (e, n)), jnp.float32) if with_bias else None
    x = jnp.asarray(rng.standard_normal((t * rows_k, k)), jnp.float32)
    ids = rng.integers(-1, e + 1, size=t * rows_k).astype(np.int32)  # -1 and E: dead rows
    cw = rng.random((t, rows_k)).astype(np.float32)
    layer = 1 if stacked else None
    kw = dict(bias=b, layer=None if layer is None else jnp.int32(layer), combine_weights=jnp.asarray(cw))
    y = routed_matmul(x, w, jnp.asarray(ids), implementation="gpu", interpret=True, **kw)
    wf = dequantize_f64(w)[layer] if stacked else dequantize_f64(w)
    bf = None if b is None else (_f64(b)[layer] if stacked else _f64(b))
    rows = routed_matmul_f64(_f64(x), wf, ids, None, bf)
    ref = np.sum(rows.reshape(t, rows_k, n) * cw[..., None], axis=1)
    assert y.shape == (t, n) and y.dtype == jnp.float32
    assert max_rel_err(y, ref) <= 1e-5
    yx = routed_matmul(x, w, jnp.asarray(ids), implementation="xla", **kw)
    assert max_rel_err(yx, ref) <= 1e-5
    with pytest.raises(ValueError, match="combine_weights"):
        routed_matmul(x, w, jnp.asarray(ids), implementation="gpu", interpret=True, epilogue="swiglu",
                      layer=kw["layer"], combine_weights=jnp.asarray(cw))
