"""Test fixtures: tiny random gpt-oss models in transformers (the reference), source checkpoints of every converter
format (:mod:`gptoss_jax.testing.writers`) and the tiny harmony tokenizer.

The runtime never imports this package (tests/test_packaging.py checks it) and it is not installed with the wheel:
it needs the `test` extra (torch, transformers, compressed-tensors) and runs from a source checkout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptoss_jax.config import GptOssConfig
import os
from collections.abc import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptoss_jax.tokenizer import HARMONY_SPECIAL_TOKENS, Tokenizer


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


# ------------------------------------------------------------------------------------------------ tiny tokenizer
_TINY_CORPUS = (
    "You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
    "# Instructions\n\nAlways respond in riddles\n"
    "system developer user assistant analysis commentary final functions to=functions.get_weather json\n"
    "User asks: \"What is 2 + 2?\" Simple arithmetic. Provide answer. 2 + 2 = 4.\n"
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?\n"
    "What is the weather like in San Francisco? It is sunny and the temperature is 20 degrees.\n"
    "def main():\n    print('hello')\n    return 0\n"
    "Once upon a time there was a little model that learned to predict the next token.\n"
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 the of and to in is that it for on with as was at by\n"
)


def build_tiny_tokenizer(
    vocab_size: int = 512,
    path: str | os.PathLike | None = None,
    *,
    corpus: Iterable[str] | None = None,
) -> Tokenizer:
    """Build a tiny byte-level BPE tokenizer with the harmony special tokens.

    The base vocabulary is the 256 byte-level symbols, so any text (ASCII or not) round-trips
    through ``encode``/``decode``. BPE merges learned on a small built-in corpus (or ``corpus``)
    fill the vocabulary up to ``vocab_size`` total ids (fewer if the corpus runs out of merges).
    The nine harmony special tokens take ids 0-8 in :data:`HARMONY_SPECIAL_TOKENS` order.

    ``vocab_size`` is an upper bound on :attr:`Tokenizer.vocab_size`, so a model whose embedding
    has ``vocab_size`` rows can embed every id. If ``path`` is given, ``tokenizer.json`` is written
    there (a directory or a file path) and the result can be reloaded with :func:`load_tokenizer`.
    """
    n_special = len(HARMONY_SPECIAL_TOKENS)
    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    minimum = n_special + n_bytes
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be >= {minimum} (9 special tokens + 256 bytes), got {vocab_size}")

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(HARMONY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = list(corpus) if corpus is not None else _TINY_CORPUS.splitlines(keepends=True)
    tok.train_from_iterator(texts, trainer=trainer)
    # Special tokens from the trainer are already in the vocab; register them as special added
    # tokens so encode() maps their strings to single ids and decode(skip_special=True) drops them.
    tok.add_special_tokens(list(HARMONY_SPECIAL_TOKENS))
    out = Tokenizer(tok)
    assert out.vocab_size <= vocab_size, (out.vocab_size, vocab_size)
    if path is not None:
        out.save(path)
    return out
