"""Test fixtures: tiny random gpt-oss models in transformers (the reference), source checkpoints of every converter
format (:mod:`gptoss_jax.testing.writers`) and the tiny harmony tokenizer.

The runtime never imports this package (tests/test_packaging.py checks it) and it is not installed with the wheel:
it needs the `test` extra (torch, transformers, compressed-tensors) and runs from a source checkout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptoss_jax.config import GptOssConfig
# The tiny tokenizer's builder still lives in the runtime because `gptoss-jax demo` builds one; tests take it from
# here so that it can move in once the demo ships a trained model's tokenizer.
from gptoss_jax.tokenizer import build_tiny_tokenizer


def hf_config(config: GptOssConfig, attn_implementation: str = "eager"):
    """transformers.GptOssConfig for our config (eager attention: the plain reference implementation)."""
    from transformers import GptOssConfig as HFConfig
    d = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    hfc = HFConfig(**d)
    hfc._attn_implementation = attn_implementation
    return hfc


def random_hf_model(config: GptOssConfig, seed: int = 0, std: float = 0.05):
    """A float32 transformers GptOssForCausalLM with every weight random (norms around 1, sinks around 0, biases
    nonzero), so no term of the forward pass is trivially zero."""
    import torch
    from transformers import GptOssForCausalLM
    torch.manual_seed(seed)
    model = GptOssForCausalLM(hf_config(config)).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "sinks" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "router" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))  # spread routing decisions
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def save_random_hf_checkpoint(config: GptOssConfig, path: str | Path, seed: int = 0, dtype=None,
                              max_shard_size: str | None = None):
    """Writes a random HF checkpoint (config.json + safetensors) and returns the float32 transformers model."""
    import torch
    model = random_hf_model(config, seed)
    to_save = model if dtype is None else random_hf_model(config, seed).to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    to_save.save_pretrained(str(path), **kwargs)
    del torch
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
