"""Round trips per source format: a tiny random gpt-oss in transformers -> quantized source checkpoint -> gptoss-convert
with DEFAULT options -> checkpoint.load_model(dtype=fp32) -> logits equal transformers running the dequantized weights
(fp32, ≤ 1e-4 relative; issue 12 accepts 1e-3) with 100 % top-1 agreement, for bf16, fp16 and fp32 sources: the
default conversion is lossless (every non-int4 tensor keeps its source dtype).

The int4 model (quant=QuantSpec, matmuls through gptoss_jax.kernels) is checked in every case; the plain fp32 model built
from int4_layout.dequantize of the loaded arrays in one case per format.
"""

import copy
import json

import chex
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gptoss_jax.convert import packing
from gptoss_jax.testing import writers
from gptoss_jax.convert.converter import convert
from gptoss_jax import checkpoint, testing
from gptoss_jax.config import GptOssConfig, default_layer_types
from gptoss_jax.model import build_model
from gptoss_jax.params import unstack_layers
from gptoss_jax.safetensors_io import Checkpoint
from gptoss_jax.kernels import int4_layout

TOL = 1e-4
_MODELS = {}


def tiny_config(hidden: int) -> GptOssConfig:
    preset = {256: "tiny", 320: "tiny-320"}[hidden]
    return GptOssConfig.from_preset(preset).replace(num_hidden_layers=2, layer_types=default_layer_types(2))


def fresh_model(hidden: int):
    """A float32 transformers model (cached per hidden size; copied because writers update it in place)."""
    if hidden not in _MODELS:
        _MODELS[hidden] = testing.random_hf_model(tiny_config(hidden), seed=hidden)
    return copy.deepcopy(_MODELS[hidden])


def check_logits(model, dst, config, what):
    """fp32-loaded logits of the converted checkpoint vs transformers fp32 on the source's dequantized weights:
    ≤ TOL relative L2 and the same top-1 token everywhere."""
    ids = np.random.default_rng().integers(0, config.vocab_size, size=(2, 11))
    ref = testing.hf_logits(model, ids)
    logits, _ = checkpoint.load_model(dst, dtype="float32")(jnp.asarray(ids))
    chex.assert_shape(logits, (2, 11, config.vocab_size))
    chex.assert_type(logits, jnp.float32)
    err = testing.rel_err(logits, ref)
    assert err <= TOL, f"{what}: int4 model rel err {err}"
    # same top-1 everywhere, except at a float32 near-tie of the reference (the ids are fresh random draws: a run in
    # CI met one), where our pick must be within 1e-4 of the reference's top logit (relative to the logits' scale)
    ours, ref_top = np.argmax(np.asarray(logits), -1), np.argmax(ref, -1)
    gap = np.take_along_axis(ref, ref_top[..., None], -1)[..., 0] - np.take_along_axis(ref, ours[..., None], -1)[..., 0]
    assert np.all((ours == ref_top) | (gap <= 1e-4 * np.max(np.abs(ref)))), f"{what}: top-1 differs"
    return err


def dequantized_params(params, quant):
    def walk(d):
        if isinstance(d, dict) and "packed" in d:
            k = d["packed"].shape[-2] * 8
            t = int4_layout.Int4Tensor(d["packed"], d["scales"], d.get("zeros"), quant.group_for(k))
            w = int4_layout.dequantize(t, jnp.float32)
            if "perm" in d:  # act-order: stored rows are W[perm]; put them back (W[perm[j]] = stored[j])
                inv = jnp.argsort(d["perm"], axis=-1)
                w = jnp.take_along_axis(w, inv[..., None], axis=-2)
            return w
        if isinstance(d, dict):
            return {key: walk(v) for key, v in d.items()}
        return d
    return walk(params)


def run_round_trip(tmp_path, fmt, hidden, group, symmetric, *, check_dequantized=False, dtype="bfloat16",
                   **writer_kw):
    config = tiny_config(hidden)
    model = fresh_model(hidden)
    src, dst = tmp_path / "src", tmp_path / "dst"
    writers.write_source(config, model, src, fmt, group=group, symmetric=symmetric, dtype=dtype, **writer_kw)
    rtn = {} if fmt not in ("hf", "mxfp4") else {"group_size": group or "channel", "symmetric": symmetric}
    convert(src, dst, **rtn)

    meta = checkpoint.read_metadata(dst)
    assert meta["source"]["format"] == fmt
    assert meta["quantization"]["group_size"] == group and meta["quantization"]["symmetric"] == symmetric
    assert meta["dtype"] == dtype and meta["tensor_dtypes"] == {} and meta["dtype_cast"] is None  # lossless
    check_logits(model, dst, config, f"{fmt} hidden={hidden} group={group} symmetric={symmetric} {dtype}")
    ids = np.random.default_rng().integers(0, config.vocab_size, size=(2, 11))
    ref = testing.hf_logits(model, ids)

    if check_dequantized:
        cfg, quant, params = checkpoint.load_params(dst, dtype="float32")
        fp32 = build_model(cfg, dequantized_params(params, quant), dtype=jnp.float32, quant=None)
        err = testing.rel_err(fp32(jnp.asarray(ids))[0], ref)
        assert err <= TOL, f"{fmt}: dequantized fp32 model rel err {err}"
    return src, dst


@pytest.mark.parametrize("hidden,group,symmetric,dtype", [
    (256, 32, True, "float16"), (256, 64, False, "bfloat16"), (256, 128, True, "float32"),
    (256, 128, False, "float16"), (256, None, False, "bfloat16"),
    (320, 32, False, "bfloat16"), (320, 64, True, "float16"), (320, None, True, "float32"),
])
def test_compressed_tensors_round_trip(tmp_path, hidden, group, symmetric, dtype):
    run_round_trip(tmp_path, "compressed-tensors", hidden, group, symmetric, dtype=dtype,
                   check_dequantized=(hidden, group) == (256, 64))


@pytest.mark.parametrize("hidden,group,fused,dtype", [(256, 64, False, "float16"), (256, 128, True, "bfloat16"),
                                                      (320, 32, False, "float32"), (320, None, False, "float16")])
def test_awq_round_trip(tmp_path, hidden, group, fused, dtype):
    run_round_trip(tmp_path, "awq", hidden, group, False, fused_gate_up=fused, dtype=dtype,
                   check_dequantized=(hidden, group) == (256, 64))


@pytest.mark.parametrize("hidden,group,symmetric,dtype", [(256, 64, False, "bfloat16"), (320, 32, True, "float16"),
                                                          (256, None, True, "float32")])
def test_hf_round_trip(tmp_path, hidden, group, symmetric, dtype):
    run_round_trip(tmp_path, "hf", hidden, group, symmetric, dtype=dtype,
                   check_dequantized=(hidden, group) == (256, 64))


@pytest.mark.parametrize("hidden,group,symmetric", [(256, 64, True), (320, 32, False)])
def test_mxfp4_round_trip(tmp_path, hidden, group, symmetric):
    run_round_trip(tmp_path, "mxfp4", hidden, group, symmetric, check_dequantized=hidden == 256)


@pytest.mark.parametrize("fmt,symmetric,dtype", [("compressed-tensors", True, "float16"), ("awq", False, "bfloat16")])
def test_16bit_attention_stays_16bit(tmp_path, fmt, symmetric, dtype):
    """Mixed precision: a quantized source whose ignore list keeps self_attn 16-bit converts with attention stored
    16-bit in the source dtype (no RTN), run through the 16-bit path; the metadata records the int4 modules."""
    _, dst = run_round_trip(tmp_path, fmt, 256, 64, symmetric, dtype=dtype, quantize_attention=False)
    meta = checkpoint.read_metadata(dst)
    assert meta["requantized"] == []
    assert meta["quantization"]["modules"] == ["gate_up", "down"]
    _, quant, params = checkpoint.load_params(dst)
    params = unstack_layers(params)  # storage view: layers.{i}
    assert quant.modules == ("gate_up", "down")
    q = params["layers"][1]["attn"]["q_proj"]["weight"]
    chex.assert_shape(q, (256, tiny_config(256).q_dim))
    chex.assert_type(q, jnp.dtype(dtype))
    assert isinstance(params["layers"][1]["mlp"]["experts"]["gate_up"], dict)
    attention = {r["group"]: r for r in meta["modules"]}["attention"]
    assert "kept as is" in attention["conversion"] and "int4" not in attention["source"]


def test_mixed_source_dtypes_are_kept_per_tensor(tmp_path):
    """A source mixing fp32 (router, sinks), fp16 (embeddings) and bf16 (the rest) converts losslessly: each tensor
    keeps its dtype (metadata tensor_dtypes), and fp32 logits match the source model."""
    import torch
    from safetensors.torch import load_file, save_file
    config = tiny_config(256)
    model = fresh_model(256)
    src, dst = tmp_path / "src", tmp_path / "dst"
    writers.write_source(config, model, src, "compressed-tensors", group=64, symmetric=True, dtype="float32")
    f = next(src.glob("*.safetensors"))
    tensors = load_file(f)
    sd = model.state_dict()
    for name in list(tensors):
        to = (torch.float16 if name == "model.embed_tokens.weight" else torch.float32 if (
            "router" in name or "sinks" in name) else torch.bfloat16 if tensors[name].dtype == torch.float32 else None)
        if to is not None and "weight_scale" not in name and ".experts." not in name:  # expert biases stay fp32
            tensors[name] = tensors[name].to(to)
            with torch.no_grad():
                sd[name].copy_(tensors[name].float())
    save_file(tensors, f)
    convert(src, dst)
    meta = checkpoint.read_metadata(dst)
    stored = {p: meta["tensor_dtypes"].get(p, meta["dtype"]) for p in (
        "embed.embedding", "layers.1.mlp.router.weight", "layers.0.attn.sinks", "norm.scale",
        "layers.0.mlp.experts.down_bias")}
    assert stored == {"embed.embedding": "float16", "layers.1.mlp.router.weight": "float32",
                      "layers.0.attn.sinks": "float32", "norm.scale": "bfloat16",
                      "layers.0.mlp.experts.down_bias": "float32"}
    assert len(set(stored.values())) == 3 and meta["tensor_dtypes"]
    _, _, params = checkpoint.load_params(dst)  # dtype=None: as stored
    params = unstack_layers(params)  # storage view: layers.{i}
    chex.assert_type([params["embed"]["embedding"], params["layers"][0]["mlp"]["router"]["bias"],
                      params["norm"]["scale"]], [jnp.float16, jnp.float32, jnp.bfloat16])
    check_logits(model, dst, config, "mixed-dtype source")


def test_dtype_option_casts_and_is_reported(tmp_path):
    """--dtype is an explicit cast: every non-int4 tensor is stored in it and inspect/metadata say so (lossy from
    fp32)."""
    from gptoss_jax.convert.converter import inspect
    from gptoss_jax.convert.sources import Options
    config = tiny_config(256)
    src, dst = tmp_path / "src", tmp_path / "dst"
    writers.write_source(config, fresh_model(256), src, "awq", group=64, dtype="float32")
    plan = {r["group"]: r for r in inspect(src, options=Options(dtype="bfloat16"))["modules"]}
    assert plan["router"]["source"] == "fp32" and "cast to bf16 (--dtype, lossy)" == plan["router"]["conversion"]
    plan = {r["group"]: r for r in inspect(src)["modules"]}
    assert plan["router"]["conversion"] == "kept as is (lossless)"
    assert plan["experts"]["source"].startswith("int4 awq (group 64") and "exactly" in plan["experts"]["conversion"]
    convert(src, dst, dtype="bf16")
    meta = checkpoint.read_metadata(dst)
    assert meta["dtype"] == "bfloat16" and meta["dtype_cast"] == "bfloat16" and meta["tensor_dtypes"] == {}
    from gptoss_jax import api
    assumed = api.load(dst, tokenizer=False).info()["assumed"]
    assert assumed == ["at conversion: --dtype bfloat16 cast every non-int4 tensor (possibly lossy)"]


def test_codes_scales_and_zeros_are_bit_exact(tmp_path):
    """The converted int4 arrays hold exactly the source's codes, zero points and scales (compressed-tensors and
    AWQ, including re-fused gate/up)."""
    config = tiny_config(256)
    for fmt in ("compressed-tensors", "awq"):
        src, dst = tmp_path / f"{fmt}-src", tmp_path / f"{fmt}-dst"
        writers.write_source(config, fresh_model(256), src, fmt, group=32, symmetric=False)
        convert(src, dst)
        _, quant, params = checkpoint.load_params(dst)
        params = unstack_layers(params)  # storage view: layers.{i}
        assert quant.scale_dtype == ("bfloat16" if fmt == "compressed-tensors" else "float16")
        layer = params["layers"][1]
        gate_up = layer["mlp"]["experts"]["gate_up"]
        down = layer["mlp"]["experts"]["down"]
        q = layer["attn"]["q_proj"]["weight"]
        with Checkpoint(src) as ck:
            for ex in (0, 5):
                for sub, cols in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
                    name = f"model.layers.1.mlp.experts.{ex}.{sub}"
                    codes, zeros, scales = source_arrays(ck, fmt, name)
                    got = int4_layout.unpack(np.asarray(gate_up["packed"][ex]))[:, cols]
                    np.testing.assert_array_equal(got, codes)
                    np.testing.assert_array_equal(np.asarray(gate_up["zeros"][ex])[:, cols], zeros)
                    assert_bits_equal(np.asarray(gate_up["scales"][ex])[:, cols], scales)
                codes, zeros, scales = source_arrays(ck, fmt, f"model.layers.1.mlp.experts.{ex}.down_proj")
                np.testing.assert_array_equal(int4_layout.unpack(np.asarray(down["packed"][ex])), codes)
                np.testing.assert_array_equal(np.asarray(down["zeros"][ex]), zeros)
                assert_bits_equal(np.asarray(down["scales"][ex]), scales)
            codes, zeros, scales = source_arrays(ck, fmt, "model.layers.1.self_attn.q_proj")
            np.testing.assert_array_equal(int4_layout.unpack(np.asarray(q["packed"])), codes)
            np.testing.assert_array_equal(np.asarray(q["zeros"]), zeros)
            assert_bits_equal(np.asarray(q["scales"]), scales)


def source_arrays(ck, fmt, prefix):
    """(codes [in, out], zeros [groups, out], scales [groups, out]) decoded straight from the source tensors."""
    if fmt == "compressed-tensors":
        out, inp = (int(x) for x in ck.get(prefix + ".weight_shape"))
        codes = packing.ct_codes(ck.get(prefix + ".weight_packed"), inp).T
        zeros = packing.ct_zero_points(ck.get(prefix + ".weight_zero_point"), out).T
        return codes, zeros, np.asarray(ck.get(prefix + ".weight_scale")).T
    return (packing.awq_unpack(ck.get(prefix + ".qweight")), packing.awq_unpack(ck.get(prefix + ".qzeros")),
            np.asarray(ck.get(prefix + ".scales")))


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    width = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    np.testing.assert_array_equal(a.view(width), b.view(width))


def test_tokenizer_files_and_metadata(tmp_path):
    config = tiny_config(256)
    src, dst = tmp_path / "src", tmp_path / "dst"
    writers.write_source(config, fresh_model(256), src, "compressed-tensors", group=64, symmetric=True,
                         max_shard_bytes=400_000)
    assert (src / "model.safetensors.index.json").exists()
    (src / "chat_template.jinja").write_text("{{ messages }}")
    convert(src, dst, dtype="fp16")
    for name in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja", "config.json"):
        assert (dst / name).is_file(), name
    meta = checkpoint.read_metadata(dst)
    assert meta["layout_version"] == int4_layout.LAYOUT_VERSION
    assert meta["dtype"] == "float16"
    assert meta["converter"]["name"] == "gptoss-convert" and meta["converter"]["version"]
    assert meta["quantization"] == {"scheme": "int4", "group_size": 64, "symmetric": True, "scale_dtype": "bfloat16",
                                    "modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up", "down"],
                                    "act_order": []}
    shards = [f for f in meta["source"]["files"] if f["name"].endswith(".safetensors")]
    assert len(shards) > 1
    import hashlib
    for f in shards:
        data = (src / f["name"]).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    _, _, params = checkpoint.load_params(dst)
    params = unstack_layers(params)  # storage view: layers.{i}
    assert params["embed"]["embedding"].dtype == jnp.float16
    assert params["layers"][0]["attn"]["q_proj"]["weight"]["scales"].dtype == jnp.dtype(ml_dtypes.bfloat16)
    assert json.loads((dst / "config.json").read_text())["hidden_size"] == 256


def test_actorder_spellings_without_g_idx_convert(tmp_path):
    """Case ct-actorder-weight-rejected, the whole kind: compressed-tensors' actorder null / "group" / "weight" /
    "static" (alias of "weight") in config.json changes nothing when no weight_g_idx is stored; every spelling is
    accepted and the "weight" conversion is the "null" one bit for bit."""
    from gptoss_jax.convert.converter import inspect
    config = tiny_config(256)
    src = tmp_path / "src"
    writers.write_source(config, fresh_model(256), src, "compressed-tensors", group=32, symmetric=True)
    base = json.loads((src / "config.json").read_text())
    for actorder in (None, "group", "weight", "static"):
        base["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = actorder
        (src / "config.json").write_text(json.dumps(base))
        assert inspect(src)["problems"] == [], actorder
        if actorder in (None, "weight"):
            convert(src, tmp_path / f"out-{actorder}", hash_files=False)
    _, _, a = checkpoint.load_params(tmp_path / "out-None")
    _, _, b = checkpoint.load_params(tmp_path / "out-weight")
    chex.assert_trees_all_equal(a, b)
    # actorder "group" with a stored weight_g_idx that is the identity grouping (k // group): read, checked, and no
    # reordering (the same checkpoint again)
    import torch
    from safetensors.torch import load_file, save_file
    base["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (src / "config.json").write_text(json.dumps(base))
    for f in src.glob("*.safetensors"):
        tensors = load_file(f)
        for name in [n for n in tensors if n.endswith(".weight_shape")]:
            inp = int(tensors[name][1])
            tensors[name.replace(".weight_shape", ".weight_g_idx")] = torch.arange(inp, dtype=torch.int32) // 32
        save_file(tensors, f)
    convert(src, tmp_path / "out-group", hash_files=False)
    _, quant, c = checkpoint.load_params(tmp_path / "out-group")
    assert quant.act_order == ()
    chex.assert_trees_all_equal(a, c)
