"""AWQ calibration (`gptoss-convert --awq`, gptoss_jax.convert.awq): on a tiny random gpt-oss with activation
outlier channels (a few RMSNorm channels ×10, as real LLMs have), AWQ int4's logits are closer to the fp32 model's
than RTN int4's at the same group size; the scale folding is exact in fp32 (folded unquantized model = original,
≤ 1e-5) and bit-exact in bf16 with power-of-two scales; experts are streamed layer by layer, one at a time; bad
input fails with one line."""

import json
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptoss_jax import checkpoint, testing
from gptoss_jax.config import GptOssConfig, default_layer_types
from gptoss_jax.convert import awq, cli
from gptoss_jax.testing import writers
from gptoss_jax.convert.converter import ConvertError, convert
from gptoss_jax.convert.sources import HFSource
from gptoss_jax.hf_loader import load_hf_params
from gptoss_jax.model import build_model
from gptoss_jax.params import QuantSpec, unstack_layers

CONFIG = GptOssConfig.from_preset("tiny").replace(num_hidden_layers=2, layer_types=default_layer_types(2))
OPTS = dict(samples=4, seq_len=64)


def byte_bpe(path: Path, vocab: int = 512) -> Tokenizer:
    """A byte-level BPE trained on the builtin calibration text (ids < the tiny model's vocab_size 1024)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([awq.BUILTIN_CALIB.read_text()], trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    return tok


def outlier_model(seed: int = 0):
    """Random fp32 transformers model whose RMSNorm scales have 8 channels ×10 (activation outliers)."""
    model = testing.random_hf_model(CONFIG, seed=seed)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[rng.choice(CONFIG.hidden_size, 8, replace=False)] *= 10
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq")
    model = outlier_model()
    model.save_pretrained(str(root / "src"))
    tok = byte_bpe(root / "src")
    held_out = awq.BUILTIN_CALIB.read_text()[-6000:]  # evaluation text: the end of the file
    ids = np.asarray(tok.encode(held_out).ids[:2 * 48]).reshape(2, 48)
    return root, model, ids


def logits_err(dst, model, ids) -> float:
    ref = testing.hf_logits(model, ids)
    logits, _ = checkpoint.load_model(dst, dtype="float32")(jnp.asarray(ids))
    chex.assert_shape(logits, ref.shape)
    assert np.all(np.isfinite(np.asarray(logits)))
    return testing.rel_err(logits, ref)


@pytest.mark.slow
@pytest.mark.parametrize("group,symmetric", [(32, False), (64, True)])
def test_awq_beats_rtn(source, tmp_path, group, symmetric):
    root, model, ids = source
    convert(root / "src", tmp_path / "rtn", group_size=group, symmetric=symmetric, hash_files=False)
    convert(root / "src", tmp_path / "awq", group_size=group, symmetric=symmetric, hash_files=False,
            awq=awq.AWQOptions(**OPTS))
    rtn, ours = logits_err(tmp_path / "rtn", model, ids), logits_err(tmp_path / "awq", model, ids)
    assert ours < 0.92 * rtn, f"AWQ rel err {ours:.4f} not below RTN's {rtn:.4f} (group {group})"
    meta = checkpoint.read_metadata(tmp_path / "awq")
    assert meta["quantization"]["group_size"] == group and meta["quantization"]["symmetric"] == symmetric
    rep = meta["awq"]
    assert rep["calibration"]["tokens"] == 4 * 64 and len(rep["layers"]) == CONFIG.num_hidden_layers
    for layer in rep["layers"]:  # fp32 source: scales are not rounded; the search never loses to alpha = 0 (RTN)
        assert layer["power_of_two_scales"] is False
        for part in ("qkv", "v_o", "moe"):
            assert 0 <= layer[part]["loss_vs_rtn"] <= 1.0
    print(f"group {group} sym {symmetric}: RTN {rtn:.4f} AWQ {ours:.4f}")


def float_layers(path):
    """The fp32 model tree of an HF folder, per layer (storage layout) as float64 numpy."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), unstack_layers(load_hf_params(path, CONFIG,
                                                                                         dtype=jnp.float32)))
    return params


def fold_model(params, ids, pow2: bool):
    """Runs calibrate_layer (clip off) over every layer and returns the folded unquantized tree and the scales."""
    quant = QuantSpec(64, False, "float32")
    x = params["embed"]["embedding"][ids].astype(np.float32)
    out = {**params, "layers": {}}
    for li, layer in params["layers"].items():
        experts = layer["mlp"]["experts"]
        rest = {**layer, "mlp": {"router": layer["mlp"]["router"],
                                 "experts": {k: experts[k] for k in ("gate_up_bias", "down_bias")}}}
        calls = []
        new_gu, new_dn = np.empty_like(experts["gate_up"]), np.empty_like(experts["down"])

        def expert(e, experts=experts, calls=calls):
            calls.append(e)
            return {"gate_up": experts["gate_up"][e].copy(), "down": experts["down"][e].copy()}

        def emit(e, gu, dn, new_gu=new_gu, new_dn=new_dn):
            new_gu[e], new_dn[e] = gu, dn

        res = awq.calibrate_layer(CONFIG, li, rest, expert, x, quant, awq.AWQOptions(clip=False, **OPTS),
                                  pow2=pow2, emit_expert=emit)
        assert all(calls.count(e) <= 2 for e in range(CONFIG.num_local_experts))  # statistics, then emit
        folded = res.layer
        folded["mlp"]["experts"].update(gate_up=new_gu, down=new_dn)
        out["layers"][li] = folded
        x = res.x_next
    return out, x


@pytest.mark.slow
def test_folding_exact_fp32(source):
    """Scales folded into the norms / v_proj / router / o_proj and the expert gate_up (no quantization, no clip):
    the fp32 model is unchanged (≤ 1e-5), and calibrate_layer's streamed hidden states equal the model's."""
    root, _, ids = source
    params = float_layers(root / "src")
    folded, x_last = fold_model(params, ids, pow2=False)
    assert not np.allclose(folded["layers"][0]["input_norm"]["scale"], params["layers"][0]["input_norm"]["scale"])
    f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    ref, _ = build_model(CONFIG, f32(params), dtype=jnp.float32)(jnp.asarray(ids))
    got, _ = build_model(CONFIG, f32(folded), dtype=jnp.float32)(jnp.asarray(ids))
    chex.assert_type(got, jnp.float32)
    assert testing.rel_err(got, ref) <= 1e-5
    # the hidden states streamed from layer to layer, through the final norm and head, give the model's logits
    h = np.asarray(x_last, np.float64)
    h = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + CONFIG.rms_norm_eps) * params["norm"]["scale"]
    assert testing.rel_err(h @ params["lm_head"]["weight"], ref) <= 1e-4


def test_folding_power_of_two_exact_in_bf16(source):
    """With 16-bit folded tensors the scales are powers of two: g / s and W_router · s round-trip exactly in bf16."""
    root, _, ids = source
    params = float_layers(root / "src")
    folded, _ = fold_model(params, ids, pow2=True)
    for li in params["layers"]:
        g, g2 = params["layers"][li]["post_attn_norm"]["scale"], folded["layers"][li]["post_attn_norm"]["scale"]
        s = g / g2
        assert np.all(np.exp2(np.round(np.log2(s))) == s), "scales are not powers of two"
        assert np.any(s != 1.0)
        bf = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float64)  # noqa: E731
        np.testing.assert_array_equal(bf(g2) * s, bf(g))
        r, r2 = params["layers"][li]["mlp"]["router"]["weight"], folded["layers"][li]["mlp"]["router"]["weight"]
        np.testing.assert_array_equal(bf(r2) / s[:, None], bf(r))


@pytest.mark.slow
def test_streams_experts_layer_by_layer(source, tmp_path, monkeypatch):
    """Bounded memory: each expert's weights are read one at a time (twice: statistics, then clip + RTN), layer
    after layer, and nothing is held over once the layer's expert items are written."""
    root, _, _ = source
    reads = []
    orig = HFSource.expert_weight_in_out

    def spy(self, li, which, e):
        reads.append((li, which, e))
        return orig(self, li, which, e)
    monkeypatch.setattr(HFSource, "expert_weight_in_out", spy)
    seen = {}
    orig_read = awq.AWQMixin.read_item

    def read_item(self, name):
        tree = orig_read(self, name)
        seen[name] = sorted(self.awq_pending)
        return tree
    monkeypatch.setattr(awq.AWQMixin, "read_item", read_item)
    convert(root / "src", tmp_path / "out", hash_files=False, awq=awq.AWQOptions(**OPTS))
    layers = [li for li, _, _ in reads]
    assert layers == sorted(layers), "experts of a later layer were read before an earlier layer finished"
    for li in range(CONFIG.num_hidden_layers):
        mine = [(w, e) for l_, w, e in reads if l_ == li]
        for e in range(CONFIG.num_local_experts):
            assert mine.count(("gate_up", e)) <= 2 and mine.count(("down", e)) <= 2
        assert seen[f"layers.{li}"] == ["down", "gate_up"] and seen[f"layers.{li}.down"] == []
    assert seen["head"] == []


@pytest.mark.slow
def test_mxfp4_source(tmp_path):
    """An MXFP4 source (bf16 norms and router) converts with --awq: power-of-two scales, loadable, finite."""
    model = testing.random_hf_model(CONFIG, seed=3)
    writers.write_source(CONFIG, model, tmp_path / "src", "mxfp4")
    byte_bpe(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", hash_files=False, awq=awq.AWQOptions(samples=2, seq_len=32))
    meta = checkpoint.read_metadata(tmp_path / "out")
    assert all(layer["power_of_two_scales"] for layer in meta["awq"]["layers"])
    logits, _ = checkpoint.load_model(tmp_path / "out", dtype="float32")(jnp.arange(20).reshape(2, 10))
    assert np.all(np.isfinite(np.asarray(logits)))


# ------------------------------------------------------------------------------------------------------ bad input
def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture
def hf_src(source, tmp_path):
    path = tmp_path / "src"
    shutil.copytree(source[0] / "src", path)
    return path


def test_bad_calib_file(hf_src, tmp_path, capsys):
    code, err = run_cli([hf_src, tmp_path / "o", "--awq", "--calib", tmp_path / "nope.txt"], capsys)
    assert code == 1 and len(err) == 1 and "nope.txt" in err[0] and "no such file" in err[0]
    (tmp_path / "empty.txt").write_text("  \n")
    code, err = run_cli([hf_src, tmp_path / "o", "--awq", "--calib", tmp_path / "empty.txt"], capsys)
    assert code == 1 and len(err) == 1 and "empty" in err[0]
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    code, err = run_cli([hf_src, tmp_path / "o", "--awq", "--calib", tmp_path / "bin.txt"], capsys)
    assert code == 1 and len(err) == 1 and "UTF-8" in err[0]
    assert not (tmp_path / "o").exists()


def test_missing_tokenizer(hf_src, tmp_path, capsys):
    (hf_src / "tokenizer.json").unlink()
    code, err = run_cli([hf_src, tmp_path / "o", "--awq"], capsys)
    assert code == 1 and len(err) == 1 and "tokenizer.json" in err[0]
    assert not (tmp_path / "o").exists()


def test_token_ids_outside_vocab(hf_src, tmp_path, capsys):
    cfg = json.loads((hf_src / "config.json").read_text())
    cfg["vocab_size"] = 300  # the BPE has 512 ids; the embeddings are resized to match config
    from safetensors.numpy import load_file, save_file
    t = load_file(str(hf_src / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        t[k] = np.ascontiguousarray(t[k][:300])
    save_file(t, str(hf_src / "model.safetensors"), metadata={"format": "pt"})
    (hf_src / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli([hf_src, tmp_path / "o", "--awq"], capsys)
    assert code == 1 and len(err) == 1 and "vocab_size 300" in err[0]


def test_awq_refuses_quantized_source(tmp_path, capsys):
    writers.synthetic_source(CONFIG, tmp_path / "ct", fmt="compressed-tensors")
    code, err = run_cli([tmp_path / "ct", tmp_path / "o", "--awq"], capsys)
    assert code == 1 and len(err) == 1 and "already quantized" in err[0]
    with pytest.raises(ConvertError, match="samples"):
        convert(tmp_path / "ct", tmp_path / "o2", fmt="hf", awq=awq.AWQOptions(samples=0))


@pytest.mark.parametrize("args,what", [(["--calib", "builtin"], "--calib needs --awq"),
                                       (["--awq", "--calib-samples", "0"], "--calib-samples must be"),
                                       (["--no-clip"], "--no-clip needs --awq")])
def test_usage_errors(tmp_path, capsys, args, what):
    with pytest.raises(SystemExit) as e:
        cli.main([str(tmp_path), str(tmp_path / "o"), *args])
    assert e.value.code == 2 and what in capsys.readouterr().err


def test_fake_quant_matches_rtn_packer():
    """The search's jnp quantizer is the converter's RTN rule (packing.rtn_quantize, dequantized)."""
    from gptoss_jax.kernels import int4_layout
    from gptoss_jax.convert import packing
    rng = np.random.default_rng()
    w = (rng.standard_normal((128, 24)) * rng.uniform(0.01, 2, (1, 24))).astype(np.float32)
    for sym in (False, True):
        for sd in ("float32", "bfloat16"):
            q = awq._Q(32, sym, sd)
            d = packing.rtn_quantize(w.astype(np.float64), 32, sym, awq._np_dtype(sd))
            codes = np.asarray(int4_layout.unpack(jnp.asarray(d["packed"]))).astype(np.float64)
            s = np.repeat(d["scales"].astype(np.float64), 32, axis=0)
            z = 8.0 if sym else np.repeat(d["zeros"].astype(np.float64), 32, axis=0)
            ref = (codes - z) * s
            got = np.asarray(awq.fake_quant(jnp.asarray(w), q), np.float64)
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
