"""Round trips per source format: a tiny random gpt-oss in transformers -> quantized source checkpoint -> gptoss-convert
-> checkpoint.load_model -> logits equal transformers running the dequantized weights (fp32, ≤ 1e-4 relative).

The int4 model (quant=QuantSpec, matmuls through pallas_kernels) is checked in every case; the plain fp32 model built
from int4_layout.dequantize of the loaded arrays in one case per format.
"""

import copy
import json

import chex
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from convert import packing, writers
from convert.converter import convert
from gptoss_jax import checkpoint, testing
from gptoss_jax.config import GptOssConfig, default_layer_types
from gptoss_jax.model import build_model
from gptoss_jax.params import unstack_layers
from gptoss_jax.safetensors_io import Checkpoint
from pallas_kernels import int4_layout

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


def dequantized_params(params, quant):
    def walk(d):
        if isinstance(d, dict) and "packed" in d:
            k = d["packed"].shape[-2] * 8
            t = int4_layout.Int4Tensor(d["packed"], d["scales"], d.get("zeros"), quant.group_for(k))
            return int4_layout.dequantize(t, jnp.float32)
        if isinstance(d, dict):
            return {key: walk(v) for key, v in d.items()}
        return d
    return walk(params)


def run_round_trip(tmp_path, fmt, hidden, group, symmetric, *, check_dequantized=False, **writer_kw):
    config = tiny_config(hidden)
    model = fresh_model(hidden)
    src, dst = tmp_path / "src", tmp_path / "dst"
    writers.write_source(config, model, src, fmt, group=group, symmetric=symmetric, **writer_kw)
    rtn = {} if fmt in ("compressed-tensors", "awq") else {"group_size": group or "channel", "symmetric": symmetric}
    convert(src, dst, **rtn)

    meta = checkpoint.read_metadata(dst)
    assert meta["source"]["format"] == fmt
    assert meta["quantization"]["group_size"] == group and meta["quantization"]["symmetric"] == symmetric
    ids = np.random.default_rng().integers(0, config.vocab_size, size=(2, 11))
    ref = testing.hf_logits(model, ids)

    int4_model = checkpoint.load_model(dst, dtype="float32")
    logits, _ = int4_model(jnp.asarray(ids))
    chex.assert_shape(logits, (2, 11, config.vocab_size))
    err = testing.rel_err(logits, ref)
    assert err <= TOL, f"{fmt} hidden={hidden} group={group} symmetric={symmetric}: int4 model rel err {err}"

    if check_dequantized:
        cfg, quant, params = checkpoint.load_params(dst, dtype="float32")
        fp32 = build_model(cfg, dequantized_params(params, quant), dtype=jnp.float32, quant=None)
        err = testing.rel_err(fp32(jnp.asarray(ids))[0], ref)
        assert err <= TOL, f"{fmt}: dequantized fp32 model rel err {err}"
    return src, dst


@pytest.mark.parametrize("hidden,group,symmetric", [
    (256, 32, True), (256, 64, False), (256, 128, True), (256, 128, False), (256, None, False),
    (320, 32, False), (320, 64, True), (320, None, True),
])
def test_compressed_tensors_round_trip(tmp_path, hidden, group, symmetric):
    run_round_trip(tmp_path, "compressed-tensors", hidden, group, symmetric,
                   check_dequantized=(hidden, group) == (256, 64))


@pytest.mark.parametrize("hidden,group,fused", [(256, 64, False), (256, 128, True), (320, 32, False),
                                                (320, None, False)])
def test_awq_round_trip(tmp_path, hidden, group, fused):
    run_round_trip(tmp_path, "awq", hidden, group, False, fused_gate_up=fused,
                   check_dequantized=(hidden, group) == (256, 64))


@pytest.mark.parametrize("hidden,group,symmetric", [(256, 64, False), (320, 32, True), (256, None, True)])
def test_hf_round_trip(tmp_path, hidden, group, symmetric):
    run_round_trip(tmp_path, "hf", hidden, group, symmetric, check_dequantized=(hidden, group) == (256, 64))


@pytest.mark.parametrize("hidden,group,symmetric", [(256, 64, True), (320, 32, False)])
def test_mxfp4_round_trip(tmp_path, hidden, group, symmetric):
    run_round_trip(tmp_path, "mxfp4", hidden, group, symmetric, check_dequantized=hidden == 256)


@pytest.mark.parametrize("fmt,symmetric", [("compressed-tensors", True), ("awq", False)])
def test_unquantized_attention_is_requantized(tmp_path, fmt, symmetric):
    """A source whose ignore list keeps self_attn 16-bit still converts: attention is RTN-quantized at the source's
    group size and symmetry, and the metadata says so."""
    _, dst = run_round_trip(tmp_path, fmt, 256, 64, symmetric, quantize_attention=False)
    assert checkpoint.read_metadata(dst)["requantized"] == ["attention projections"]


def test_codes_scales_and_zeros_are_bit_exact(tmp_path):
    """The converted int4 arrays hold exactly the source's codes, zero points and scales (compressed-tensors and
    AWQ, including re-fused gate/up)."""
    config = tiny_config(256)
    for fmt in ("compressed-tensors", "awq"):
        src, dst = tmp_path / f"{fmt}-src", tmp_path / f"{fmt}-dst"
        writers.write_source(config, fresh_model(256), src, fmt, group=32, symmetric=False)
        convert(src, dst)
        _, quant, params = checkpoint.load_params(dst)
        assert quant.scale_dtype == ("bfloat16" if fmt == "compressed-tensors" else "float16")
        layer = unstack_layers(params)["layers"][1]
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
    assert meta["quantization"] == {"scheme": "int4", "group_size": 64, "symmetric": True, "scale_dtype": "bfloat16"}
    shards = [f for f in meta["source"]["files"] if f["name"].endswith(".safetensors")]
    assert len(shards) > 1
    import hashlib
    for f in shards:
        data = (src / f["name"]).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    _, _, params = checkpoint.load_params(dst)
    assert params["embed"]["embedding"].dtype == jnp.float16
    assert params["layers"]["attn"]["q_proj"]["weight"]["scales"].dtype == jnp.dtype(ml_dtypes.bfloat16)
    assert json.loads((dst / "config.json").read_text())["hidden_size"] == 256
