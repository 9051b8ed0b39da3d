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
