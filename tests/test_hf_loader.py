import json
import tracemalloc

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.config import GptOssConfig
from gptoss_jax.hf_loader import load_hf_model, load_hf_params, save_hf_checkpoint
from gptoss_jax.model import params_of
from gptoss_jax.params import abstract_params, model_specs
from gptoss_jax.safetensors_io import CheckpointError

torch = pytest.importorskip("torch")
testing = pytest.importorskip("gptoss_jax.testing")

CFG = GptOssConfig.from_preset("tiny").replace(num_hidden_layers=2, layer_types=())


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    hf = testing.save_random_hf_checkpoint(CFG, path, seed=3, max_shard_size="600KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 2
    return path, hf


def test_sharded_checkpoint_loads_and_matches(sharded, rng):
    path, hf = sharded
    model = load_hf_model(path, dtype=jnp.float32)
    chex.assert_trees_all_equal_shapes_and_dtypes(params_of(model),
                                                  abstract_params(model_specs(CFG, dtype=jnp.float32)))
    ids = rng.integers(0, CFG.vocab_size, (1, 20))
    ours, _ = model(jnp.asarray(ids))
    assert testing.rel_err(ours, testing.hf_logits(hf, ids)) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(tmp_path, dtype, rng):
    hf32 = testing.save_random_hf_checkpoint(CFG, tmp_path, seed=4, dtype=dtype)
    from transformers import GptOssForCausalLM
    # the exact stored values, computed in fp32 (from_pretrained recomputes the rotary buffers in fp32)
    ref_model = GptOssForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    model = load_hf_model(tmp_path, dtype=jnp.float32)
    ids = rng.integers(0, CFG.vocab_size, (1, 12))
    assert testing.rel_err(model(jnp.asarray(ids))[0], testing.hf_logits(ref_model, ids)) <= 1e-4
    del hf32


def test_roundtrip_through_our_writer(tmp_path, sharded):
    path, hf = sharded
    params = load_hf_params(path, CFG, dtype=jnp.float32)
    save_hf_checkpoint(params, CFG, tmp_path / "again", max_shard_bytes=400_000)
    again = load_hf_params(tmp_path / "again", CFG, dtype=jnp.float32)
    chex.assert_trees_all_equal(params, again)


def test_loading_streams_one_tensor_at_a_time(tmp_path):
    cfg = CFG.replace(num_hidden_layers=8, layer_types=())
    testing.save_random_hf_checkpoint(cfg, tmp_path, seed=5)
    total = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    load_hf_params(tmp_path, cfg, dtype=jnp.float32)  # warm-up: imports and jax caches stay out of the measurement
    tracemalloc.start()
    load_hf_params(tmp_path, cfg, dtype=jnp.float32)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # On the CPU backend device buffers may alias host memory, so part of the result itself is traced; a loader that
    # built a whole host copy first would still show a peak of at least the checkpoint's size.
    assert peak < total / 2, (peak, total)


def _rewrite(path, drop=None, add=None, reshape=None):
    from safetensors.numpy import load_file, save_file
    f = next(path.glob("*.safetensors"))
    tensors = load_file(str(f))
    if drop:
        tensors.pop(drop)
    if add:
        tensors[add] = np.zeros(3, np.float32)
    if reshape:
        tensors[reshape] = tensors[reshape][..., :-1].copy()
    save_file(tensors, str(f))


@pytest.mark.parametrize("kind, message", [
    ("drop", "missing parameters ['model.layers.1.self_attn.sinks']"),
    ("add", "unexpected tensors ['model.layers.0.mlp.extra']"),
    ("reshape", "tensor 'model.layers.0.self_attn.k_proj.weight' has shape"),
])
def test_mismatched_checkpoint_names_the_tensor(tmp_path, kind, message):
    testing.save_random_hf_checkpoint(CFG, tmp_path, seed=6)
    _rewrite(tmp_path, **{"drop": {"drop": "model.layers.1.self_attn.sinks"},
                          "add": {"add": "model.layers.0.mlp.extra"},
                          "reshape": {"reshape": "model.layers.0.self_attn.k_proj.weight"}}[kind])
    with pytest.raises(CheckpointError) as e:
        load_hf_params(tmp_path, CFG, dtype=jnp.float32)
    assert message in str(e.value)


def test_missing_shard_and_truncated_file(tmp_path, sharded):
    import shutil
    path, _ = sharded
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    data = (copy / victim).read_bytes()
    (copy / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not fit its shape|truncated"):
        load_hf_params(copy, CFG)
    (copy / victim).unlink()
    with pytest.raises(CheckpointError, match=f"missing: \\['{victim}'\\]"):
        load_hf_params(copy, CFG)


@pytest.mark.parametrize("drop", ["truncate", "original_max_position_embeddings"])
def test_partial_yarn_dict_logits_match_transformers(tmp_path, drop, rng):
    """Case yarn-partial-rope-dict: a hub-style config.json (rope_theta + rope_scaling) whose YaRN dict leaves a key
    out loads with transformers' default for it, so logits over 300 positions (past the changed ramp) still match
    transformers.from_pretrained on the same folder."""
    from transformers import AutoModelForCausalLM
    cfg = CFG.replace(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, sliding_window=8)
    testing.save_random_hf_checkpoint(cfg, tmp_path, seed=5)
    d = json.loads((tmp_path / "config.json").read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    rope.pop(drop)
    d["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    model = load_hf_model(tmp_path, dtype=jnp.float32)
    assert any(a.startswith(drop) for a in model.config.rope.assumed)
    ids = rng.integers(0, cfg.vocab_size, (1, 300))
    ours, _ = model(jnp.asarray(ids))
    assert testing.rel_err(ours, testing.hf_logits(hf, ids)) <= 1e-4
