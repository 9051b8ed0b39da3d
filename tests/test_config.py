import json

import chex
import pytest

from gptoss_jax.config import ConfigError, GptOssConfig, preset_names

HUB_120B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "num_local_experts": 128, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}


def test_reads_hub_style_120b_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_120B))
    c = GptOssConfig.from_json(tmp_path)
    assert (c.hidden_size, c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok) == (2880, 36, 128, 4)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.kv_groups) == (64, 8, 64, 8)
    assert c.rope.theta == 150000.0 and c.rope.factor == 32.0 and c.rope.truncate is False
    assert c.rope.original_max_position_embeddings == 4096
    assert c.layer_types[0] == "sliding_attention" and c.layer_types[1] == "full_attention"
    assert c.sliding_window == 128 and c.eos_token_ids == (200002,) and c.swiglu_limit == 7.0


def test_reads_transformers5_style_and_roundtrips():
    c = GptOssConfig.from_preset("gpt-oss-120b")
    d = c.to_hf_dict()
    assert "rope_parameters" in d and "rope_scaling" not in d and d["rope_parameters"]["rope_theta"] == 150000.0
    assert GptOssConfig.from_hf_dict(d) == c


def test_transformers5_dict_matches_transformers_own_config():
    transformers = pytest.importorskip("transformers")
    hf = transformers.GptOssConfig()  # transformers' defaults are gpt-oss-120b
    d = hf.to_dict()
    c = GptOssConfig.from_hf_dict({k: v for k, v in d.items() if k in HUB_120B or k in (
        "rope_parameters", "swiglu_alpha")}, source="transformers default")
    assert c == GptOssConfig.from_preset("gpt-oss-120b").replace(eos_token_ids=c.eos_token_ids,
                                                                  pad_token_id=c.pad_token_id)


@pytest.mark.parametrize("name", ["gpt-oss-120b", "gpt-oss-20b", "tiny", "tiny-320"])
def test_presets(name):
    c = GptOssConfig.from_preset(name)
    chex.assert_equal(len(c.layer_types), c.num_hidden_layers)
    assert name in preset_names()


def test_20b_preset_differs_only_in_layers_and_experts():
    a, b = GptOssConfig.from_preset("gpt-oss-120b"), GptOssConfig.from_preset("gpt-oss-20b")
    assert b == a.replace(num_hidden_layers=24, num_local_experts=32, layer_types=b.layer_types)


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 7}, "multiple of num_key_value_heads"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types has 3 entries"),
    ({"layer_types": ["sliding_attention", "chunked"] * 18}, "layer_types entries"),
    ({"hidden_size": -1}, "hidden_size must be a positive integer"),
    ({"num_experts_per_tok": 300}, "exceeds num_local_experts"),
    ({"head_dim": 63}, "head_dim must be even"),
    ({"model_type": "llama"}, "model_type"),
    ({"hiddden_size": 10}, "unknown fields ['hiddden_size']"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "wobble": 1}}, "unknown rope fields"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear'"),
    ({"rope_parameters": {"rope_type": "yarn"}}, "both rope_parameters and rope_scaling"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
])
def test_rejects_broken_config_with_clear_message(tmp_path, change, message):
    d = dict(HUB_120B)
    d.update(change)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        GptOssConfig.from_json(tmp_path)
    assert message in str(e.value)
    assert "config.json" in str(e.value)


def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        GptOssConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GptOssConfig.from_json(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        GptOssConfig.from_preset("gpt-oss-9000b")
