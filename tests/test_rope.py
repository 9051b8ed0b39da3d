import json

import numpy as np
import pytest

from gptoss_jax.config import GptOssConfig
from gptoss_jax.rope import yarn_inv_freq


@pytest.mark.parametrize("preset", ["gpt-oss-120b", "tiny"])
def test_yarn_inv_freq_equals_transformers(preset):
    pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from gptoss_jax.testing import hf_config
    cfg = GptOssConfig.from_preset(preset)
    ref, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_config(cfg), "cpu")
    ours, scale = yarn_inv_freq(cfg)
    ref = ref.numpy()
    assert ours.shape == ref.shape == (cfg.head_dim // 2,)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
    assert abs(scale - ref_scale) < 1e-12
    assert abs(scale - (0.1 * np.log(32) + 1)) < 1e-12


def test_yarn_blends_interpolation_and_extrapolation():
    cfg = GptOssConfig.from_preset("gpt-oss-120b")
    inv, _ = yarn_inv_freq(cfg)
    base = 1.0 / (cfg.rope.theta ** (np.arange(0, 64, 2) / 64))
    assert np.isclose(inv[0], base[0], rtol=1e-6)  # highest frequency: extrapolated (unchanged)
    assert np.isclose(inv[-1], base[-1] / 32, rtol=1e-6)  # lowest frequency: interpolated by the factor
    assert np.all(np.diff(inv) < 0)


FULL_YARN = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False,
             "original_max_position_embeddings": 1024}


def _hub_dict(rope: dict | None, spelling: str, theta: float | None = 20000.0) -> dict:
    d = GptOssConfig.from_preset("tiny").to_hf_dict()
    d.pop("rope_parameters")
    d["max_position_embeddings"] = 8192
    if rope is not None and spelling == "rope_parameters":
        d["rope_parameters"] = {**rope, **({} if theta is None else {"rope_theta": theta})}
    else:
        if theta is not None:
            d["rope_theta"] = theta
        if rope is not None:
            d["rope_scaling"] = rope
    return d


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("drop", [(), ("truncate",), ("original_max_position_embeddings",), ("beta_fast",),
                                  ("beta_slow",), ("truncate", "original_max_position_embeddings", "beta_fast",
                                                   "beta_slow"), ("rope_type",), ("theta",), ("all",)])
def test_partial_rope_dict_follows_transformers_defaults(spelling, drop):
    """Case yarn-partial-rope-dict, the whole kind: whatever key a rope dict leaves out (or the whole dict), the
    inverse frequencies and attention factor equal those transformers computes from the same config.json, and every
    filled key is reported in RopeConfig.assumed."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = None if drop == ("all",) else {k: v for k, v in FULL_YARN.items() if k not in drop}
    d = _hub_dict(rope, spelling, theta=None if "theta" in drop else 20000.0)
    ours = GptOssConfig.from_hf_dict(d)
    hf_dict = json.loads(json.dumps(d))  # transformers fills the rope dict in place
    hf = transformers.GptOssConfig(**{k: v for k, v in hf_dict.items() if k not in ("architectures", "model_type")})
    rp = hf.rope_parameters
    ref, ref_scale = ROPE_INIT_FUNCTIONS[rp["rope_type"]](hf, "cpu") if rp["rope_type"] != "default" else (
        1.0 / (rp["rope_theta"] ** (np.arange(0, hf.head_dim, 2) / hf.head_dim)), 1.0)
    inv, scale = yarn_inv_freq(ours)
    assert ours.rope.rope_type == rp["rope_type"]
    np.testing.assert_allclose(inv, np.asarray(ref, np.float64), rtol=2e-6, atol=0)
    assert abs(scale - ref_scale) < 1e-12
    if rope is not None and rp["rope_type"] == "yarn":
        assert ours.rope.truncate == rp.get("truncate", True)
        assert ours.rope.original_max_position_embeddings == rp["original_max_position_embeddings"]
    missing = set(FULL_YARN) - set(rope or {}) | ({"rope_theta"} if "theta" in drop else set())
    if rope is not None and "rope_type" in drop:
        missing = {"rope_type"} | ({"rope_theta"} if "theta" in drop else set())  # plain RoPE: YaRN keys unused
    for key in missing:
        assert any(key in a for a in ours.rope.assumed), (key, ours.rope.assumed)
    if not missing:
        assert ours.rope.assumed == ()
