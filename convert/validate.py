"""Checks of a source checkpoint's config.json against its safetensors headers, run before any per-layer table is
built or any tensor is read, so that a config.json claiming sizes the files do not hold (10^6 layers, 10^6 experts)
fails in milliseconds with a one-line error instead of exhausting memory."""

from __future__ import annotations

import re

from gptoss_jax import hf_names
from gptoss_jax.convert.sources import ConvertError
from gptoss_jax.config import GptOssConfig
from gptoss_jax.safetensors_io import Checkpoint

_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.")  # the per-expert modules of hf_names.EXPERT_LAYOUTS "split"/"fused"
PER_EXPERT_FORMATS = ("compressed-tensors", "awq")


def check_config_against_headers(config: GptOssConfig, ckpt: Checkpoint, fmt: str, where: str) -> None:
    """ConvertError naming config.json if its layer count, expert count, vocab or hidden size disagree with the
    tensors the safetensors headers declare (tensors missing altogether are reported later, by Source.problems)."""
    layers, experts = set(), set()
    for name in ckpt.keys():
        if m := hf_names.LAYER_RE.match(name):
            layers.add(int(m.group(1)))
            if e := _EXPERT.match(m.group(2)):
                experts.add(int(e.group(1)))
    n = config.num_hidden_layers
    if layers != set(range(n)):
        raise ConvertError(f"{where}: num_hidden_layers is {n} but the safetensors hold tensors of "
                           f"{len(layers)} layer(s) (indices {_span(layers)})")
    e = config.num_local_experts
    if fmt in PER_EXPERT_FORMATS and experts != set(range(e)):
        raise ConvertError(f"{where}: num_local_experts is {e} but the safetensors hold {len(experts)} expert(s) "
                           f"(indices {_span(experts)})")
    checks = ((hf_names.router_weight(0), (e, config.hidden_size), "num_local_experts, hidden_size"),
              (hf_names.EMBED_NAME, (config.vocab_size, config.hidden_size), "vocab_size, hidden_size"))
    for name, want, fields in checks:
        if name in ckpt:
            _, shape = ckpt.info(name)
            if tuple(shape) != want:
                raise ConvertError(f"{where}: {fields} = {want} but {ckpt.file_of(name)} stores {name!r} with shape "
                                   f"{tuple(shape)}")


def _span(ids: set[int]) -> str:
    return "none" if not ids else f"{min(ids)}..{max(ids)}"


__all__ = ["check_config_against_headers"]
