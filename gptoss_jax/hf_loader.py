"""Loading unquantized Hugging Face gpt-oss checkpoints (bf16 / fp16 / fp32 safetensors) into the model.

Tensors stream one at a time from memory-mapped safetensors, are transposed to our [in, out] layout, cast and put
on device into their shardings, so host memory never holds more than one tensor beyond the device copy.

Hugging Face names and their transpose rules come from the one name table, :mod:`gptoss_jax.hf_names`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from gptoss_jax import hf_names
from gptoss_jax.config import GptOssConfig
from gptoss_jax.hf_names import hf_to_param_path, param_path_to_hf
from gptoss_jax.model import build_model
from gptoss_jax.params import (ParamSpec, StackedTreeBuilder, iter_specs, model_specs, param_specs, path_str,
                               unstack_layers)
from gptoss_jax.safetensors_io import Checkpoint, CheckpointError, require_finite


def get_path(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def check_config_against_tensors(config: GptOssConfig, ckpt: Checkpoint, where: str) -> None:
    """CheckpointError naming config.json if its layer count or the embedding / router shapes disagree with the
    safetensors headers (a config claiming 10^6 layers fails here in milliseconds, not after gigabytes)."""
    layers = {li for n in ckpt.keys() if (li := hf_names.layer_of(n)) is not None}
    if layers != set(range(config.num_hidden_layers)):
        raise CheckpointError(f"{where}: num_hidden_layers is {config.num_hidden_layers} but the safetensors hold "
                              f"tensors of {len(layers)} layer(s)")
    for name, want, fields in (
            (hf_names.EMBED_NAME, (config.vocab_size, config.hidden_size), "vocab_size, hidden_size"),
            (hf_names.router_weight(0), (config.num_local_experts, config.hidden_size),
             "num_local_experts, hidden_size")):
        if name in ckpt and tuple(ckpt.info(name)[1]) != want:
            raise CheckpointError(f"{where}: {fields} = {want} but {ckpt.file_of(name)} stores {name!r} with shape "
                                  f"{tuple(ckpt.info(name)[1])}")


def load_hf_params(path: str | Path, config: GptOssConfig, *, dtype=jnp.bfloat16,
                   sharding_of: Callable[[tuple, ParamSpec], Any] | None = None) -> dict:
    """Reads every tensor of an unquantized HF gpt-oss checkpoint into the model tree (layers stacked).

    Each tensor is read (memory-mapped), transposed to our [in, out] layout, cast, and placed straight into its
    sharding — `sharding_of(model_path, spec)` (default: the first device) — inside the stacked arrays
    (:class:`gptoss_jax.params.StackedTreeBuilder`), so neither the host nor one device ever holds a second copy.
    Raises CheckpointError naming the file and tensor for dtype/shape mismatches, missing or unexpected tensors.
    """
    with Checkpoint(path) as ckpt:  # config.json's sizes against the headers before any per-layer table is built
        check_config_against_tensors(config, ckpt, str(Path(path) / "config.json"))
    storage_specs = dict(iter_specs(param_specs(config, dtype=dtype)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    builder = StackedTreeBuilder(model_specs(config, dtype=dtype), sharding_of or (lambda p, s: device))
    seen: set = set()
    unexpected = []
    with Checkpoint(path) as ckpt:
        for name in ckpt.keys():
            mapped = hf_to_param_path(name)
            if mapped is None:
                unexpected.append(name)
                continue
            ppath, transpose = mapped
            spec: ParamSpec | None = storage_specs.get(ppath)
            if spec is None:
                unexpected.append(name)
                continue
            host = ckpt.get(name)
            if host.dtype.kind not in "f" and host.dtype != np.dtype(jnp.bfloat16):
                raise CheckpointError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {host.dtype}; an "
                                      f"unquantized checkpoint needs float tensors (quantized checkpoints go "
                                      f"through gptoss-convert)")
            if transpose:
                host = np.swapaxes(host, -1, -2)
            if tuple(host.shape) != spec.shape:
                raise CheckpointError(f"{ckpt.file_of(name)}: tensor {name!r} has shape "
                                      f"{tuple(np.swapaxes(host, -1, -2).shape) if transpose else host.shape}, "
                                      f"config.json implies {spec.shape if not transpose else spec.shape[::-1]}")
            host = np.ascontiguousarray(host).astype(spec.dtype)
            require_finite(host, f"{ckpt.file_of(name)}: tensor {name!r}")  # NaN/Inf would make every logit NaN
            builder.put(ppath, jax.device_put(host, builder.layer_sharding(ppath)))
            del host
            seen.add(ppath)
    missing = [path_str(p) for p in storage_specs if p not in seen]
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not match config.json: missing parameters "
                              f"{[param_path_to_hf(tuple(int(x) if x.isdigit() else x for x in m.split('.'))) for m in missing][:20]}"
                              f"{' …' if len(missing) > 20 else ''}; unexpected tensors {unexpected[:20]}"
                              f"{' …' if len(unexpected) > 20 else ''}")
    return builder.tree()


def save_hf_checkpoint(params: dict, config: GptOssConfig, path: str | Path, *, dtype=None,
                       max_shard_bytes: int | None = None) -> None:
    """Writes our parameter tree as a Hugging Face gpt-oss checkpoint (config.json + safetensors, optionally
    sharded with an index). Used to make test and demo checkpoints that transformers can read."""
    import json

    from gptoss_jax.safetensors_io import write_sharded

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))

    if params["layers"] and not all(isinstance(k, int) for k in params["layers"]):
        params = unstack_layers(params)  # a model tree: write layer by layer

    def tensors():
        for t in hf_names.hf_tensors(config):
            a = np.asarray(get_path(params, t.path))
            if dtype is not None:
                a = a.astype(dtype)
            yield t.name, (np.swapaxes(a, -1, -2) if t.transpose else a)

    write_sharded(tensors(), path, max_shard_bytes=max_shard_bytes)


def load_hf_model(path: str | Path, *, dtype=jnp.bfloat16, config: GptOssConfig | None = None,
                  sharding_of=None, moe_parallel=None):
    """The GptOss model of an unquantized HF folder, placed straight into `sharding_of`'s shardings."""
    path = Path(path)
    config = config or GptOssConfig.from_json(path if path.is_dir() else path.parent)
    params = load_hf_params(path, config, dtype=dtype, sharding_of=sharding_of)
    return build_model(config, params, dtype=dtype, moe_parallel=moe_parallel)
