"""GPTQ (AutoGPTQ / GPTQModel) and AutoRound sources: checkpoints written by the formats' documented packing
(gptoss_jax.testing.writers.gptq_quantize_linear: loops over the documented bit positions, v1 / v2 zero points, act-order g_idx)
-> gptoss-convert with default options -> fp32 logits vs transformers on the dequantized weights (≤ 1e-4, 100 %
top-1).

Real int4 gpt-oss releases of these tools quantize the experts only: their attention must stay 16-bit.
"""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.convert import packing
from gptoss_jax.testing import writers
from gptoss_jax.convert.converter import convert, inspect
from gptoss_jax.convert.sources import ConvertError, act_order_perm
from gptoss_jax import checkpoint
from gptoss_jax.params import unstack_layers
from test_convert_roundtrip import fresh_model, run_round_trip, tiny_config


def _attention_is_16bit(dst, dtype):
    meta = checkpoint.read_metadata(dst)
    assert meta["quantization"]["modules"] == ["gate_up", "down"] and meta["requantized"] == []
    _, quant, params = checkpoint.load_params(dst)
    params = unstack_layers(params)  # storage view: layers.{i}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        w = params["layers"][0]["attn"][proj]["weight"]
        assert not isinstance(w, dict), proj
        chex.assert_type(w, jnp.dtype(dtype))
    assert set(params["layers"][0]["mlp"]["experts"]["gate_up"]) >= {"packed", "scales"}


@pytest.mark.parametrize("group,symmetric,v2,dtype", [(32, True, False, "float16"), (64, False, False, "bfloat16"),
                                                      (128, False, True, "float32"), (None, True, True, "bfloat16")])
def test_gptq_experts_only(tmp_path, group, symmetric, v2, dtype):
    """GPTQModel layout (experts.gate_up.{i} interleaved, experts.down.{i}), v1 and v2 zero points."""
    _, dst = run_round_trip(tmp_path, "gptq", 256, group, symmetric, dtype=dtype, quantize_attention=False,
                            gptq_v2=v2)
    _attention_is_16bit(dst, dtype)
    plan = {r["group"]: r for r in checkpoint.read_metadata(dst)["modules"]}
    assert "fused from per-expert linears (gptqmodel)" in plan["experts"]["conversion"]
    assert "act-order" not in plan["experts"]["conversion"]  # g_idx stored but trivial (i // group)
    assert plan["attention"] == {"group": "attention", "source": {"float16": "fp16", "bfloat16": "bf16",
                                                                  "float32": "fp32"}[dtype],
                                 "conversion": "kept as is (lossless)"}


def test_gptq_all_modules_and_act_order_on_down(tmp_path):
    """Attention quantized too (int4 everywhere); act-order (a scattered g_idx) on every expert's down_proj is
    applied exactly by permuting K, absorbed into gate_up's column order."""
    src, dst = run_round_trip(tmp_path, "gptq", 256, 32, False, act_order=("down",), check_dequantized=True)
    meta = checkpoint.read_metadata(dst)
    assert meta["quantization"]["modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up", "down"]
    experts = {r["group"]: r for r in meta["modules"]}["experts"]["conversion"]
    assert "act-order g_idx applied exactly by permuting K (down: absorbed into gate_up's columns)" in experts
    assert meta["quantization"]["act_order"] == []


@pytest.mark.parametrize("packing_format,symmetric,dtype", [("auto_round:auto_gptq", True, "bfloat16"),
                                                            ("auto_round:gptqmodel", False, "float16"),
                                                            ("auto_round:auto_awq", False, "bfloat16")])
def test_auto_round_experts_only(tmp_path, packing_format, symmetric, dtype):
    """AutoRound layout (experts.{i}.gate_proj = even, up_proj = odd columns of gate_up) in its three packings."""
    _, dst = run_round_trip(tmp_path, "auto-round", 256, 64 if dtype == "bfloat16" else 32, symmetric, dtype=dtype,
                            quantize_attention=False, packing=packing_format)
    _attention_is_16bit(dst, dtype)


def test_v1_zero_offset_matters(tmp_path):
    """The same tensors read as v2 instead of v1 are a different model: the converter follows checkpoint_format
    (and a symmetric v1 checkpoint declared v2 is refused: its zero points are 7, not 8)."""
    import json
    config = tiny_config(256)
    src = tmp_path / "src"
    writers.write_source(config, fresh_model(256), src, "gptq", group=64, symmetric=True, quantize_attention=False)
    d = json.loads((src / "config.json").read_text())
    d["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (src / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConvertError, match="zero points other than 8"):
        convert(src, tmp_path / "dst")


@pytest.mark.parametrize("symmetric,quantize_attention", [(True, False), (False, True)])
def test_gptq_act_order_everywhere(tmp_path, symmetric, quantize_attention):
    """desc_act on every quantized linear (scattered g_idx): down_proj's order is absorbed into gate_up's columns;
    gate_up (and attention) keep theirs as an input permutation "perm" that the model applies; logits still match,
    through the int4 kernels and through the dequantized fp32 model."""
    _, dst = run_round_trip(tmp_path, "gptq", 256, 32, symmetric, quantize_attention=quantize_attention,
                            act_order=True, check_dequantized=not quantize_attention)
    meta = checkpoint.read_metadata(dst)
    want = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up"] if quantize_attention else ["gate_up"]
    assert meta["quantization"]["act_order"] == want
    _, _, params = checkpoint.load_params(dst)
    params = unstack_layers(params)  # storage view: layers.{i}
    perm = np.asarray(params["layers"][0]["mlp"]["experts"]["gate_up"]["perm"])
    chex.assert_shape(perm, (tiny_config(256).num_local_experts, 256))
    assert all(sorted(p) == list(range(256)) for p in perm) and not np.array_equal(perm[0], np.arange(256))
    assert "perm" not in params["layers"][0]["mlp"]["experts"]["down"]
    plan = {r["group"]: r["conversion"] for r in meta["modules"]}
    assert "(gate_up: input permutation stored; down: absorbed into gate_up's columns)" in plan["experts"]
    assert ("act-order" in plan["attention"]) == quantize_attention


def test_act_order_gate_and_up_orders_must_agree(tmp_path):
    """Split gate_proj / up_proj whose g_idx orders differ cannot share one fused gate_up: a one-line error naming
    the tensor, nothing written."""
    config = tiny_config(256)
    src = tmp_path / "src"
    writers.write_source(config, fresh_model(256), src, "auto-round", group=32, symmetric=True,
                         quantize_attention=False, act_order=("gate_up",))
    assert inspect(src)["problems"] == []
    with pytest.raises(ConvertError, match=r"experts\.0\.up_proj\.g_idx.*orders the input rows differently"):
        convert(src, tmp_path / "dst")
    assert not list(tmp_path.glob("dst*"))


def test_act_order_perm_properties():
    rng = np.random.default_rng(0)
    for inp, g in ((64, 8), (256, 32), (96, 96)):
        assert act_order_perm(np.arange(inp) // g, g, inp, "t") is None
        order = rng.permutation(inp)
        g_idx = np.empty(inp, np.int64)
        g_idx[order] = np.arange(inp) // g
        perm = act_order_perm(g_idx, g, inp, "t")
        if g < inp:
            assert perm is not None and np.array_equal(g_idx[perm], np.arange(inp) // g)
            w = rng.standard_normal((inp, 5))
            x = rng.standard_normal((3, inp))
            np.testing.assert_allclose(x[:, perm] @ w[perm], x @ w, rtol=1e-12)
    with pytest.raises(ConvertError, match="exactly 8 input rows"):
        act_order_perm(np.r_[np.zeros(9), np.ones(7)].astype(int), 8, 16, "t")
    with pytest.raises(ConvertError, match=r"\[0, 2\)"):
        act_order_perm(np.full(16, 2), 8, 16, "t")


def test_gptq_zero_unpacking_matches_documented_bits():
    rng = np.random.default_rng(1)
    z = rng.integers(0, 16, (3, 16))
    words = np.zeros((3, 2), np.int64)
    for j in range(8):
        words |= z[:, j::8] << (4 * j)
    words = words.astype(np.uint32).view(np.int32)
    np.testing.assert_array_equal(packing.gptq_zeros(words, 16, 0), z)
    np.testing.assert_array_equal(packing.gptq_zeros(words, 16, 1), z + 1)


def test_gptq_restacked_experts(tmp_path):
    """GPTQModel's restacked save (experts.gate_up_proj.qweight [E, in/8, 2I], gate_up_proj_bias [E, 2I], ...) reads
    as its per-expert modules, act-order included."""
    src, dst = run_round_trip(tmp_path, "gptq", 256, 32, False, quantize_attention=False, act_order=True,
                              stacked=True)
    from gptoss_jax.safetensors_io import Checkpoint
    with Checkpoint(src) as ck:
        assert "model.layers.0.mlp.experts.gate_up_proj.qweight" in ck
        assert "model.layers.0.mlp.experts.gate_up.0.qweight" not in ck
    _attention_is_16bit(dst, "bfloat16")
    assert checkpoint.read_metadata(dst)["quantization"]["act_order"] == ["gate_up"]
