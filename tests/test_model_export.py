"""Whole-model export for accelerators from this CPU host: the strongest check a TPU-oriented project without a TPU
has. A 2-layer int4 gpt-oss at the 120b widths (hidden 2880, 64 query heads × 64, 8 KV heads, 128 experts,
intermediate 2880; a small vocabulary keeps the abstract arrays cheap) is exported with ``jax.export`` — its prefill
and its decode step, on one device and on an expert mesh — for ``platforms=["tpu"]`` (every int4 matmul must be a
Mosaic kernel) and ``["cuda"]`` (the grouped expert matmuls are Triton kernels; dense int4 on CUDA is the small-M
Triton kernel at decode sizes — q/k/v in one launch on one device — and XLA's dequantize + dot above M = 16, by
measurement, see gptoss_jax.kernels.registry.AUTO_ORDER). Nothing is allocated: the model and the cache are abstract
(``nnx.eval_shape``)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from jax import export
    from flax import nnx
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.kv_cache import init_cache
    from gptoss_jax.model import abstract_model
    from gptoss_jax.params import QuantSpec, layer_period
    from gptoss_jax import sharding

    platform, mesh_arg = sys.argv[1], sys.argv[2]
    config = GptOssConfig.from_preset("gpt-oss-120b").replace(num_hidden_layers=2, layer_types=(),
                                                               vocab_size=1024)
    quant = QuantSpec(group_size=32, symmetric=False)
    par = None
    if mesh_arg != "none":
        mesh = sharding.make_mesh(*sharding.parse_mesh_arg(mesh_arg), config=config)
        from gptoss_jax.moe_parallel import MoEParallel
        par = MoEParallel.from_rules(mesh, sharding.RULES, strategy="replicated")
    model = abstract_model(config, dtype=jnp.bfloat16, quant=quant, moe_parallel=par)
    graphdef, state = nnx.split(model)
    batch, prompt, max_len = 2, 16, 64
    cache = jax.eval_shape(lambda: init_cache(config, batch, max_len, jnp.bfloat16))
    S = jax.ShapeDtypeStruct

    def prefill(state, tokens, lengths, cache):
        m = nnx.merge(graphdef, state)
        return m(tokens, lengths=lengths, cache=cache, attend_to_cache=False, logits_for="last")

    def decode(state, tokens, start, cache):
        m = nnx.merge(graphdef, state)
        return m(tokens, start=start, cache=cache, logits_for="last")

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
    out = {"period": layer_period(config)}
    for name, fn, args in (
            ("prefill", prefill, (state, S((batch, prompt), jnp.int32), S((batch,), jnp.int32), cache)),
            ("decode", decode, (state, S((batch, 1), jnp.int32), S((batch,), jnp.int32), cache))):
        exp = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
        text = exp.mlir_module()
        out[name] = {"mosaic": text.count("tpu_custom_call"), "triton": text.count("__gpu$xla.gpu.triton"),
                     "scan_or_while": text.count("stablehlo.while"), "rowwise": text.count("int4_rowwise_gemv"),
                     "sort": text.count("stablehlo.sort"), "router": text.count("router_logits"),
                     "norm": text.count("rmsnorm_rows"), "attn_update": text.count("decode_attention_update")}
    print("RESULT " + json.dumps(out))
""")


def _export(platform: str, mesh: str) -> dict:
    import json
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, platform, mesh], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["none", "1,4,1"])
def test_export_int4_model_for_tpu(mesh):
    r = _export("tpu", mesh)
    p = r["period"]
    for fn in ("prefill", "decode"):
        # per traced block position: q, k, v, o (dense) + gate_up, down (grouped), all Mosaic; the layers are one
        # scan (a while loop), traced once per block position, not once per layer
        assert r[fn]["mosaic"] >= 6 * p, r
        assert r[fn]["triton"] == 0, r
        assert r[fn]["scan_or_while"] >= 1, r


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["none", "1,4,1"])
def test_export_int4_model_for_cuda(mesh):
    r = _export("cuda", mesh)
    p = r["period"]
    for fn in ("prefill", "decode"):
        assert r[fn]["triton"] >= 2 * p, r  # gate_up (+ fused SwiGLU) and down of each block position
        assert r[fn]["mosaic"] == 0, r
    # decode (2 rows): the dense int4 projections are kernels too — q/k/v fused (one device) or per shard, and o
    assert r["decode"]["triton"] >= 4 * p, r
    # decode (2 tokens x top-4 = 8 rows): the router's top-k is a kernel (router_top_k) and the MoE runs straight
    # from its ids (the row-wise kernel, gate_up and down): no sort at all; prefill (32 tokens) keeps lax.top_k
    # and the sorted grouped kernel
    assert r["decode"]["rowwise"] >= 2 * p and r["decode"]["router"] >= p and r["decode"]["sort"] == 0, r
    # the norms at decode: one launch each; prefill (32 rows) keeps XLA's, except the final norm of the last tokens
    assert r["decode"]["norm"] > r["prefill"]["norm"] > 0, r
    assert r["prefill"]["rowwise"] == 0 and r["prefill"]["router"] == 0 and r["prefill"]["sort"] > 0, r
    if mesh == "none":
        # decode on one device: RoPE + KV-cache write + attention are one kernel per block position (the export
        # also holds the other platforms' branches: the base op's scatters)
        assert r["decode"]["attn_update"] >= p, r
        assert r["prefill"]["attn_update"] == 0, r
