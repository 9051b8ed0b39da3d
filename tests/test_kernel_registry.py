"""The kernels' contract: the implementation registry (supports / auto fallback / clear refusals), the typed tilings,
the GPTOSS_KERNELS override, and a hypothesis property over random shapes and group sizes: every implementation,
in interpret mode, either matches the float64 reference or refuses the call up front with UnsupportedCallError;
auto mode always succeeds (on CPU, and when lowering for tpu / cuda). Includes the case
shared/cases/tpu-kernel-group-not-multiple-of-8 (group size 20 on K = 320)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jax import export

from gptoss_jax.kernels import (GpuTiling, MatmulCall, TpuTiling, UnsupportedCallError, clamped_swiglu,
                            clamped_swiglu_parts, dense_matmul, grouped_matmul, quantize, registry)
from gptoss_jax.kernels import _gpu, _tpu
from gptoss_jax.kernels.reference import dequantize_f64, grouped_matmul_f64, max_rel_err, swiglu_f64

F32_TOL = 1e-5
KERNELS = ("tpu", "gpu")
TRITON = "__gpu$xla.gpu.triton"


def _int4(rng, e, k, n, group, sym):
    w = rng.standard_normal((e, k, n)).astype(np.float32)
    return jax.tree.map(jnp.asarray, quantize(w, group_size=group, symmetric=sym))


def _call(m=4, k=256, n=512, e=4, group=32, sym=False, dtype="float32", epilogue=None, op="grouped"):
    return MatmulCall(op, m, k, n, e, group, sym, dtype, epilogue, False)


# --------------------------------------------------------------------------------------------------- epilogue
def test_one_swiglu_for_numpy_and_jax(rng):
    """The same function gives the float64 reference (numpy) and the jnp epilogue; the public interleaved form
    splits gate = even, up = odd; clamping: gate only from above, up both sides."""
    h = rng.standard_normal((7, 12)) * 8
    gate, up = h[:, 0::2], h[:, 1::2]
    ref = np.minimum(gate, 7) * (np.clip(up, -7, 7) + 1) / (1 + np.exp(-1.702 * np.minimum(gate, 7)))
    np.testing.assert_allclose(swiglu_f64(h), ref, rtol=1e-12)
    y32 = clamped_swiglu_parts(jnp.asarray(gate, jnp.float32), jnp.asarray(up, jnp.float32))
    np.testing.assert_allclose(np.asarray(y32), ref, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(clamped_swiglu(jnp.asarray(h, jnp.float32))), ref, rtol=2e-6, atol=2e-6)
    # very negative gates: exp overflows to inf, the product is an exact (signed) zero, never NaN
    big = np.array([[-1e4, 3.0]])
    assert swiglu_f64(big)[0, 0] == 0 and np.isfinite(np.asarray(clamped_swiglu(jnp.asarray(big, jnp.float32)))).all()
    with pytest.raises(ValueError, match="even"):
        clamped_swiglu(jnp.zeros((2, 5)))


# ---------------------------------------------------------------------------------------------------- tilings
def test_tpu_tiling_resolution():
    t = _tpu.resolve_tiling(None, 4, 2880, 5760, 32, jnp.bfloat16, swiglu=True)
    assert t == TpuTiling(tm=16, tk=2880, tn=512)  # no 128-multiple divides 2880: one K step; 5760: partial tile
    # N = 2880: no multiple of 128 divides it either -> 512 with a partial last tile
    assert _tpu.resolve_tiling(None, 300, 4096, 2880, 64, jnp.float32) == TpuTiling(tm=128, tk=512, tn=512)
    assert _tpu.resolve_tiling({"tk": 128}, 8, 512, 256, 256, jnp.float32).tk == 128  # dict, group 256 > tk
    for bad, match in [(dict(tm=12), "tm=12"), (dict(tk=96), "tk=96"), (dict(tn=200), "tn=200")]:
        with pytest.raises(ValueError, match=match):
            _tpu.resolve_tiling(bad, 8, 512, 512, 32, jnp.float32)
    with pytest.raises(ValueError, match="multiple of 8"):
        _tpu.resolve_tiling(None, 8, 320, 256, 20, jnp.float32)
    with pytest.raises(ValueError, match="unknown field"):
        TpuTiling.coerce(dict(bm=16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.tm = 8


def test_gpu_tiling_resolution():
    t = _gpu.resolve_tiling(None, 4, 2880, 5760, 32, 128)
    chex.assert_equal((t.bm, t.bk, t.bn, t.num_warps, t.num_stages), (16, 64, 128, 4, 4))  # bk: 2880 = 64 * 45
    assert t.splits >= 1 and isinstance(t.splits, int)
    assert _gpu.resolve_tiling(None, 512, 256, 256, 64, 2).bm == 64  # many rows per group: bigger tiles
    assert _gpu.resolve_tiling(GpuTiling(bk=128, splits=1), 16, 512, 256, 16, 2) == GpuTiling(16, 128, 128, 1, 4, 4)
    assert _gpu.resolve_tiling(dict(bk=128), 16, 512, 256, 256, 2).bk == 128
    with pytest.raises(ValueError, match="power of two"):
        _gpu.resolve_tiling(dict(bn=96), 4, 256, 256, 32, 2)
    with pytest.raises(ValueError, match="nests with the group size 24"):
        _gpu.resolve_tiling(None, 4, 240, 64, 24, 1)
    with pytest.raises(ValueError, match="no power-of-two divisor"):
        _gpu.resolve_tiling(None, 4, 2888, 64, None, 1)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['meta'\]"):  # the removed experimental path
        GpuTiling.coerce(dict(meta="kernel"))


# --------------------------------------------------------------------------------------------------- registry
def test_registry_order_and_platforms():
    assert tuple(registry.REGISTRY) == ("xla", "tpu", "gpu")
    assert registry.REGISTRY["tpu"].supported_on("tpu") and not registry.REGISTRY["tpu"].supported_on("cuda")
    assert registry.REGISTRY["gpu"].supported_on("cuda") and not registry.REGISTRY["gpu"].supported_on("cpu")
    assert all(registry.REGISTRY["xla"].supported_on(p) for p in ("cpu", "cuda", "rocm", "tpu"))
    call = _call()
    assert [registry.select(call, p).name for p in ("cpu", "tpu", "cuda", "rocm")] == ["xla", "tpu", "gpu", "xla"]
    # float weights: the GPU kernel is explicit-only (never compiled and timed on a GPU); dense int4 on cuda: the
    # small-M kernel (tests/test_gpu_dense.py covers its M bound)
    assert registry.select(_call(group=None), "cuda").name == "xla"
    assert registry.select(_call(op="dense", e=1), "cuda").name == "gpu"
    assert registry.select(_call(op="dense", e=1, m=256), "cuda").name == "xla"
    assert registry.select(_call(op="dense", e=1), "tpu").name == "tpu"
    # unsupported group size: auto falls back to the base op on every platform
    odd = _call(k=320, n=256, group=20)
    assert [registry.select(odd, p).name for p in ("tpu", "cuda")] == ["xla", "xla"]
    # a tiling of another backend is ignored in auto mode; a bad tiling of this backend falls back
    assert registry.select(call, "tpu", GpuTiling(bm=16)).name == "tpu"
    assert registry.select(call, "tpu", TpuTiling(tk=96)).name == "xla"


def test_explicit_unsupported_raises_clear_error(rng):
    """Case tpu-kernel-group-not-multiple-of-8: group 20 on K = 320. The kernels refuse up front with a ValueError
    naming the shapes and the group size; auto (and xla) compute the product."""
    k, n, e = 320, 256, 2
    w = _int4(rng, e, k, n, 20, False)
    x = jnp.asarray(rng.standard_normal((12, k)), jnp.float32)
    gs = jnp.array([7, 5], jnp.int32)
    ref = grouped_matmul_f64(np.asarray(x, np.float64), dequantize_f64(w), np.asarray(gs))
    for impl in KERNELS:
        for interpret in (True, None):
            with pytest.raises(UnsupportedCallError, match=r"x \[12, 320\].*w \[2, 320, 256\].*group size 20"):
                grouped_matmul(x, w, gs, implementation=impl, interpret=interpret)
        assert not registry.REGISTRY[impl].supports(registry.MatmulCall.of("grouped", x, w))
    assert issubclass(UnsupportedCallError, ValueError)
    for impl in (None, "xla"):
        y = grouped_matmul(x, w, gs, implementation=impl, out_dtype=jnp.float32)
        assert max_rel_err(y, ref) <= F32_TOL
    with pytest.raises(UnsupportedCallError, match="tn=200"):
        grouped_matmul(x, _int4(rng, e, k, n, 32, True), gs, implementation="tpu", tiling=TpuTiling(tn=200))
    with pytest.raises(ValueError, match="takes a TpuTiling"):
        grouped_matmul(x, w, gs, implementation="tpu", tiling=GpuTiling())
    with pytest.raises(ValueError, match="bias must be"):
        dense_matmul(x, w[0], jnp.zeros((3,)))


def test_env_override(monkeypatch, rng):
    e, k, n = 2, 256, 256
    w = _int4(rng, e, k, n, 32, True)
    args = (jax.ShapeDtypeStruct((4, k), jnp.float32), w, jax.ShapeDtypeStruct((e,), jnp.int32))

    def tpu_text():  # a fresh jit each time: the override is read when the function is traced
        f = jax.jit(lambda x_, w_, g_: grouped_matmul(x_, w_, g_))
        return export.export(f, platforms=["tpu"])(*args).mlir_module()

    assert "tpu_custom_call" in tpu_text()
    monkeypatch.setenv("GPTOSS_KERNELS", "xla")
    assert "tpu_custom_call" not in tpu_text()
    monkeypatch.setenv("GPTOSS_KERNELS", "gpu")  # forced: compiled for cuda, interpreted (plain XLA ops) elsewhere
    text = tpu_text()
    assert "tpu_custom_call" not in text and TRITON not in text and "callback" not in text
    monkeypatch.setenv("GPTOSS_KERNELS", "tpu")
    jaxpr = str(jax.make_jaxpr(lambda x_, g_: grouped_matmul(x_, w, g_))(jnp.ones((4, k)), jnp.array([2, 2])))
    assert "pallas_call" in jaxpr
    monkeypatch.setenv("GPTOSS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="GPTOSS_KERNELS"):
        grouped_matmul(jnp.ones((4, k)), w, jnp.array([2, 2]))


# (m, e, k, n, group, sym, epilogue) -> the implementations that must run it (the others must refuse it)
UNUSUAL = {
    "K144-no-128-tile-g8-N40": ((10, 3, 144, 40, 8, False, None), {"tpu", "gpu"}),
    "g24-K240-swiglu": ((9, 2, 240, 256, 24, True, "swiglu"), {"tpu"}),
    "g20-K320-case": ((12, 2, 320, 256, 20, False, None), set()),
    "g1-K64": ((5, 2, 64, 128, 1, False, None), {"gpu"}),
}


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_unusual_shapes_run_or_refuse(rng, name):
    """Group sizes that are not multiples of 8 or of any power of two, K without a 128-multiple tile, tiny N:
    each kernel (interpret mode) matches the float64 reference or refuses up front; auto always computes it."""
    (m, e, k, n, g, sym, epi), runs = UNUSUAL[name]
    w = _int4(rng, e, k, n, g, sym)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    gs = rng.multinomial(m, np.ones(e) / e).astype(np.int32)
    ref = grouped_matmul_f64(np.asarray(x, np.float64), dequantize_f64(w), gs, None, epi)
    for impl in KERNELS:
        call = MatmulCall.of("grouped", x, w, None, epi)
        assert registry.REGISTRY[impl].supports(call) == (impl in runs)
        if impl in runs:
            y = grouped_matmul(x, w, jnp.asarray(gs), epilogue=epi, implementation=impl, interpret=True)
            assert max_rel_err(y, ref) <= F32_TOL, impl
        else:
            with pytest.raises(UnsupportedCallError, match=f"group size {g}"):
                grouped_matmul(x, w, jnp.asarray(gs), epilogue=epi, implementation=impl, interpret=True)
    assert max_rel_err(grouped_matmul(x, w, jnp.asarray(gs), epilogue=epi), ref) <= F32_TOL


# ------------------------------------------------------------------------------------------ property (hypothesis)
@st.composite
def matmul_cases(draw):
    k = 8 * draw(st.integers(1, 40))
    divisors = [d for d in range(1, k + 1) if k % d == 0]
    # half the draws from the multiples of 8 (what the kernels can run), half from every divisor (odd ones too)
    group = draw(st.one_of(st.sampled_from([d for d in divisors if d % 8 == 0]), st.sampled_from(divisors)))
    dense = draw(st.booleans())
    e = 1 if dense else draw(st.integers(1, 4))
    swiglu = not dense and draw(st.booleans())
    n = draw(st.integers(1, 160)) * (2 if swiglu else 1)
    m = draw(st.integers(1, 24))
    return dict(m=m, k=k, n=n, e=e, group=group, sym=draw(st.booleans()), dense=dense,
                epilogue="swiglu" if swiglu else None, bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))


@pytest.mark.slow  # ~1 min: 20 examples, each running both kernels in interpret mode
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=matmul_cases())
def test_every_implementation_matches_or_refuses(case):
    """Random (M, K, N, E, group size dividing K — odd ones included —, sym/asym, dense/grouped, swiglu, bias):
    each implementation in interpret mode matches the float64 reference (fp32, rel err <= 1e-5) or raises
    UnsupportedCallError before tracing; auto always succeeds, on CPU and lowered for tpu and cuda."""
    rng = np.random.default_rng(case["seed"])
    m, k, n, e, g = case["m"], case["k"], case["n"], case["e"], case["group"]
    w = _int4(rng, e, k, n, g, case["sym"])
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    x64 = np.asarray(x, np.float64)
    bias = jnp.asarray(rng.standard_normal((e, n)), jnp.float32) if case["bias"] else None
    b64 = None if bias is None else np.asarray(bias, np.float64)
    if case["dense"]:
        wd = jax.tree.map(lambda a: a[0], w)
        ref = x64 @ dequantize_f64(wd)[...] + (0 if b64 is None else b64[0])
        b1 = None if bias is None else bias[0]

        def run(impl, interpret=None):
            return dense_matmul(x, wd, b1, implementation=impl, interpret=interpret)
    else:
        # sum(group_sizes) = M, or M - 1 (a trailing row -> zeros), or M + 2 (the last groups clipped at M)
        gs = rng.multinomial(m + int(rng.choice([-1, 0, 2])), np.ones(e) / e).astype(np.int32)
        ref = grouped_matmul_f64(x64, dequantize_f64(w), gs, b64, case["epilogue"])

        def run(impl, interpret=None):
            return grouped_matmul(x, w, jnp.asarray(gs), bias=bias, epilogue=case["epilogue"], implementation=impl,
                                  interpret=interpret)
    for impl in ("xla", *KERNELS):
        try:
            y = run(impl, interpret=None if impl == "xla" else True)
        except UnsupportedCallError as err:
            assert impl != "xla" and f"x [{m}, {k}]" in str(err) and f"group size {g}" in str(err), err
            event(f"{impl} refused")
            continue
        chex.assert_shape(y, ref.shape)
        err = max_rel_err(y, ref) if np.any(ref) else float(np.max(np.abs(np.asarray(y))))
        assert err <= F32_TOL, (impl, case, err)
        event(f"{impl} ran")
    y = run(None)
    assert max_rel_err(y, ref) <= F32_TOL if np.any(ref) else not np.any(np.asarray(y))
    # auto lowers for the kernel platforms too (kernel or fallback, never an error)
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (x, bias))
    f = jax.jit(lambda x_, b_: (dense_matmul(x_, wd, None if b_ is None else b_[0]) if case["dense"] else
                                grouped_matmul(x_, w, jnp.asarray(gs), bias=b_, epilogue=case["epilogue"])))
    for platform in ("tpu", "cuda"):
        export.export(f, platforms=[platform],
                      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*spec)
