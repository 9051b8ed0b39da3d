"""The implementation follows the platform being lowered for (jax.lax.platform_dependent), not the host backend:
from this CPU host, ``jax.export(..., platforms=["tpu"])`` of the public ops emits Mosaic kernels
(``tpu_custom_call``), ``platforms=["cuda"]`` emits Triton kernels (the ``__gpu$xla.gpu.triton`` custom call, allowed
explicitly in the export's safety checks), and on CPU the same functions lower to plain XLA. Includes the
gpt-oss-120b widths (hidden 2880, 64 heads x 64, 8 KV heads, 128 experts, intermediate 2880, int4 group 32/64) that
the whole-model export relies on. Only abstract shapes are used, so no 120b-sized array is built."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from gptoss_jax.kernels import Int4Tensor, MatmulCall, dense_matmul, grouped_matmul, registry

MOSAIC = "tpu_custom_call"
TRITON = "__gpu$xla.gpu.triton"
CUDA_CHECKS = [export.DisabledSafetyCheck.custom_call(TRITON)]


def int4_spec(e, k, n, group, sym, scale_dtype=jnp.bfloat16):
    """Abstract Int4Tensor ([E, K, N], or [K, N] when e is None)."""
    lead = () if e is None else (e,)
    s = jax.ShapeDtypeStruct
    return Int4Tensor(s((*lead, k // 8, n), jnp.int32), s((*lead, k // group, n), scale_dtype),
                      None if sym else s((*lead, k // group, n), jnp.uint8), group)


def exported_text(fn, platform, *args):
    checks = CUDA_CHECKS if platform == "cuda" else []
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args).mlir_module()


def custom_calls(text):
    return re.findall(r"custom_call @([\w$.]+)|call_target_name = \"([^\"]+)\"", text)


def count(text, target):
    return text.count(f"@{target}(") + text.count(f'call_target_name = "{target}"')


def grouped_fn(**kw):
    return lambda x, w, gs, b: grouped_matmul(x, w, gs, bias=b, **kw)


def dense_fn(**kw):
    return lambda x, w, b: dense_matmul(x, w, b, **kw)


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("platform,target", [("tpu", MOSAIC), ("cuda", TRITON)])
def test_export_grouped_swiglu_emits_kernel(platform, target, sym):
    e, k, n, m = 8, 256, 512, 12
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), int4_spec(e, k, n, 32, sym),
            jax.ShapeDtypeStruct((e,), jnp.int32), jax.ShapeDtypeStruct((e, n), jnp.bfloat16))
    text = exported_text(grouped_fn(epilogue="swiglu"), platform, *args)
    assert count(text, target) == 1, custom_calls(text)
    other = TRITON if target == MOSAIC else MOSAIC
    assert count(text, other) == 0


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_export_dense(sym):
    k, n, m = 320, 256, 5
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), int4_spec(None, k, n, 64, sym),
            jax.ShapeDtypeStruct((n,), jnp.bfloat16))
    assert count(exported_text(dense_fn(), "tpu", *args), MOSAIC) == 1
    # dense int4 on cuda at decode sizes: auto picks the small-M kernel (registry.AUTO_ORDER); prefill sizes: XLA.
    assert count(exported_text(dense_fn(), "cuda", *args), TRITON) == 1
    big = (jax.ShapeDtypeStruct((256, k), jnp.bfloat16), *args[1:])
    assert count(exported_text(dense_fn(), "cuda", *big), TRITON) == 0
    assert count(exported_text(dense_fn(implementation="gpu"), "cuda", *args), TRITON) == 1
    # an explicit kernel with interpret=None is compiled for its own platform (no interpreter callbacks)
    text = exported_text(dense_fn(implementation="tpu"), "tpu", *args)
    assert count(text, MOSAIC) == 1 and "callback" not in text


def test_cpu_lowering_is_xla_and_runs(rng):
    """Auto mode on the CPU host: no kernel custom call in the lowered module, and the result is the xla one."""
    e, k, n, m = 4, 256, 512, 6
    from gptoss_jax.kernels import quantize
    w = jax.tree.map(jnp.asarray, quantize(rng.standard_normal((e, k, n)).astype(np.float32), group_size=32,
                                           symmetric=False))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    gs = jnp.array([2, 0, 3, 1], jnp.int32)
    b = jnp.asarray(rng.standard_normal((e, n)), jnp.float32)
    f = jax.jit(grouped_fn(epilogue="swiglu"))
    text = f.lower(x, w, gs, b).as_text()
    assert MOSAIC not in text and TRITON not in text
    y = f(x, w, gs, b)
    y_xla = grouped_matmul(x, w, gs, bias=b, epilogue="swiglu", implementation="xla")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_xla))
    assert np.all(np.isfinite(np.asarray(y))) and np.any(np.asarray(y) != 0)


# gpt-oss-120b widths: (name, K, N, group, sym, epilogue). Experts: gate_up 2880 -> 5760 with SwiGLU, down 2880 ->
# 2880. Attention: q 2880 -> 64*64, k/v 2880 -> 8*64, o 4096 -> 2880.
GROUPED_120B = [("gate_up", 2880, 5760, 32, False, "swiglu"), ("down", 2880, 2880, 64, True, None),
                ("gate_up-g64", 2880, 5760, 64, True, "swiglu"), ("down-g32", 2880, 2880, 32, False, None)]
DENSE_120B = [("q", 2880, 4096, 32, False), ("kv", 2880, 512, 64, True), ("o", 4096, 2880, 32, False),
              ("o-g64", 4096, 2880, 64, True)]


@pytest.mark.parametrize("m", [4, 64])
def test_kernels_support_120b_shapes(m):
    """Both kernels accept every int4 matmul of the 120b model at decode and prefill-chunk sizes."""
    for _, k, n, g, sym, epi in GROUPED_120B:
        call = MatmulCall("grouped", m, k, n, 128, g, sym, "bfloat16", epi, True)
        assert registry.select(call, "tpu").name == "tpu", call
        assert registry.select(call, "cuda").name == "gpu", call
    for _, k, n, g, sym in DENSE_120B:
        call = MatmulCall("dense", m, k, n, 1, g, sym, "bfloat16", None, True)
        assert registry.select(call, "tpu").name == "tpu", call
        assert registry.REGISTRY["gpu"].supports(call), call


@pytest.mark.parametrize("platform,target", [("tpu", MOSAIC), ("cuda", TRITON)])
def test_export_120b_widths(platform, target):
    """One matmul per 120b projection (batch-1 decode: 4 rows over 128 experts) exports with its kernel."""
    e, m = 128, 4
    for name, k, n, g, sym, epi in GROUPED_120B:
        args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), int4_spec(e, k, n, g, sym),
                jax.ShapeDtypeStruct((e,), jnp.int32), jax.ShapeDtypeStruct((e, n), jnp.bfloat16))
        assert count(exported_text(grouped_fn(epilogue=epi), platform, *args), target) == 1, name
    impl = None if platform == "tpu" else "gpu"
    for name, k, n, g, sym in DENSE_120B:
        args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), int4_spec(None, k, n, g, sym),
                jax.ShapeDtypeStruct((n,), jnp.bfloat16))
        assert count(exported_text(dense_fn(implementation=impl), platform, *args), target) == 1, name


def test_export_unsupported_group_falls_back_to_xla():
    """Group 20 (not a multiple of 8; no power-of-two K step nests with it): both exports are plain XLA."""
    e, k, n, m = 2, 320, 256, 12
    args = (jax.ShapeDtypeStruct((m, k), jnp.float32), int4_spec(e, k, n, 20, False, jnp.float32),
            jax.ShapeDtypeStruct((e,), jnp.int32), jax.ShapeDtypeStruct((e, n), jnp.float32))
    for platform in ("tpu", "cuda"):
        text = exported_text(grouped_fn(), platform, *args)
        assert count(text, MOSAIC) == 0 and count(text, TRITON) == 0


@pytest.mark.parametrize("layer", [None, 1])
def test_attention_auto_follows_the_lowering_platform(layer):
    """Attention's auto mode is bound per lowering platform from registry.AUTO_ORDER["attention"]: from this CPU
    host an export for cuda holds the Triton flash kernel (decode and prefill, stacked cache too), an export for tpu
    the XLA path (the TPU kernel is not auto until it has run on a TPU), and CPU lowering is plain XLA."""
    from gptoss_jax.kernels import attention as A
    s = jax.ShapeDtypeStruct
    lead = () if layer is None else (3,)
    for t in (1, 64):
        args = (s((2, t, 8, 64), jnp.bfloat16), s((*lead, 2, 256, 2, 64), jnp.bfloat16),
                s((*lead, 2, 256, 2, 64), jnp.bfloat16), s((2, t), jnp.int32), s((*lead, 2, 256), jnp.int32),
                s((8,), jnp.float32))
        fn = lambda q, k, v, qp, kp, sk: A.attention(q, k, v, qp, kp, sk, 128, layer=layer)  # noqa: E731
        assert count(exported_text(fn, "cuda", *args), TRITON) >= 1
        tpu = exported_text(fn, "tpu", *args)
        assert count(tpu, MOSAIC) == 0 and count(tpu, TRITON) == 0
        assert TRITON not in jax.jit(fn).lower(*args).as_text()
    assert registry.AUTO_ORDER["attention"]["cuda"][0] == "gpu"
