"""gptoss-jax: gpt-oss mixture-of-experts models in JAX / Flax NNX with 4-bit (W4A16) weights.

    import gptoss_jax
    model = gptoss_jax.load("path/to/checkpoint")          # converted (int4) or Hugging Face bf16 folder
    print(model.generate("The capital of France is", max_new_tokens=16, temperature=0).text)
    print(model.chat([{"role": "user", "content": "What is 2 + 2?"}], reasoning="low").final)

Exports are resolved lazily, so ``import gptoss_jax.config`` (and friends) stays cheap and free of import cycles.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "GptOssError": "gptoss_jax.errors",
    "GptOssConfig": "gptoss_jax.config",
    "ConfigError": "gptoss_jax.config",
    "GptOss": "gptoss_jax.model",
    "QuantSpec": "gptoss_jax.params",
    "load": "gptoss_jax.api",
    "InferenceModel": "gptoss_jax.api",
    "ScoreResult": "gptoss_jax.api",
    "ChatResult": "gptoss_jax.api",
    "LoadError": "gptoss_jax.api",
    "TokenizerMissingError": "gptoss_jax.api",
    "SamplingParams": "gptoss_jax.generate",
    "GenerationResult": "gptoss_jax.generate",
    "GenerationChunk": "gptoss_jax.generate",
    "GenerationStats": "gptoss_jax.generate",
    "GenerationError": "gptoss_jax.generate",
    "Message": "gptoss_jax.harmony",
    "Tokenizer": "gptoss_jax.tokenizer",
    "load_tokenizer": "gptoss_jax.tokenizer",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gptoss_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs
    from gptoss_jax.api import (ChatResult, InferenceModel, LoadError, ScoreResult,  # noqa: F401
                                TokenizerMissingError, load)
    from gptoss_jax.config import ConfigError, GptOssConfig  # noqa: F401
    from gptoss_jax.errors import GptOssError  # noqa: F401
    from gptoss_jax.generate import (GenerationChunk, GenerationError, GenerationResult,  # noqa: F401
                                     GenerationStats, SamplingParams)
    from gptoss_jax.harmony import Message  # noqa: F401
    from gptoss_jax.model import GptOss  # noqa: F401
    from gptoss_jax.params import QuantSpec  # noqa: F401
    from gptoss_jax.tokenizer import Tokenizer, load_tokenizer  # noqa: F401
