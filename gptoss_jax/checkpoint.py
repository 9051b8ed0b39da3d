"""The project's own checkpoint format: a folder of Orbax PyTree checkpoints plus config and metadata.

Layout (written by ``gptoss-convert`` through :class:`CheckpointWriter`, or by :func:`save_params`)::

    DST/
      config.json                 Hugging Face gpt-oss config (what GptOssConfig.from_json reads)
      tokenizer.json, ...         tokenizer files copied from the source, when there were any
      params/<item>/              one Orbax PyTree checkpoint per item: "embed", "layers.<i>" (attention, norms,
                                  router, expert biases), "layers.<i>.gate_up", "layers.<i>.down", "head" (norm,
                                  lm_head)
      gptoss_checkpoint.json      metadata, written last: its presence with "complete": true marks a finished folder

The parameter tree is exactly ``params.param_specs(config, dtype=..., quant=...)``: the attention projections and
the experts are int4 dicts ``{packed, scales[, zeros]}`` (layout of :mod:`pallas_kernels.int4_layout`), everything
else is 16-bit. Items are saved one at a time, so a writer never holds more than one item in host memory, and
restored one at a time straight into the requested shardings (each device reads only its part of each array), so a
reader never builds a host copy of the whole model.

A writer works in ``DST.tmp-<random>`` and renames it to ``DST`` only after the metadata is written; an interrupted
write leaves no loadable folder at ``DST``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from gptoss_jax.config import GptOssConfig
from gptoss_jax import sharding
from gptoss_jax.model import build_model
from gptoss_jax.params import (ParamSpec, QuantSpec, StackedTreeBuilder, iter_specs, model_specs, param_specs, path_str,
                               unstack_layers)
from gptoss_jax.safetensors_io import CheckpointError
from pallas_kernels.int4_layout import LAYOUT_VERSION

METADATA_FILE = "gptoss_checkpoint.json"
PARAMS_DIR = "params"
CHECKPOINT_FORMAT = "gptoss-jax-orbax"
CHECKPOINT_VERSION = 1
CHUNK_BYTES = 64 << 20

DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}

# Anything accepted as `shardings`: one Sharding for every leaf, a tree shaped like the params, or a callable
# (path tuple, ParamSpec) -> Sharding (e.g. built from the logical axes by the sharding rules).
Shardings = Any


def dtype_name(dtype) -> str:
    """Canonical numpy name of a 16/32-bit float dtype ('bfloat16', 'float16', 'float32')."""
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    name = jnp.dtype(dtype).name
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"unsupported parameter dtype {dtype!r} (bfloat16, float16 or float32)")
    return name


# ------------------------------------------------------------------------------------------------------------ items
EXPERT_WEIGHTS = ("gate_up", "down")


def item_names(config: GptOssConfig) -> list[str]:
    """Every item, in write (and restore) order. Per layer: "layers.<i>" (attention, norms, router, expert biases),
    then "layers.<i>.gate_up" and "layers.<i>.down" — the expert weights are items of their own because they are
    most of a layer's bytes (1.1 GB and 0.6 GB for gpt-oss-120b), and writers hold one item at a time."""
    names = ["embed"]
    for i in range(config.num_hidden_layers):
        names += [f"layers.{i}", *(f"layers.{i}.{w}" for w in EXPERT_WEIGHTS)]
    return names + ["head"]


def _parse(name: str) -> tuple[int | None, str | None]:
    parts = name.split(".")
    if name in ("embed", "head"):
        return None, None
    if parts[0] != "layers" or len(parts) not in (2, 3) or not parts[1].isdigit() or (
            len(parts) == 3 and parts[2] not in EXPERT_WEIGHTS):
        raise ValueError(f"unknown checkpoint item {name!r}")
    return int(parts[1]), (parts[2] if len(parts) == 3 else None)


def select_item(tree: Mapping, name: str) -> dict:
    """The part of a parameter (or spec) tree that item `name` holds, as the dict that is saved."""
    if name == "embed":
        return {"embed": tree["embed"]}
    if name == "head":
        return {"norm": tree["norm"], "lm_head": tree["lm_head"]}
    layer_idx, weight = _parse(name)
    layer = tree["layers"][layer_idx]
    if weight is not None:
        return {weight: layer["mlp"]["experts"][weight]}
    mlp = layer["mlp"]
    experts = {k: v for k, v in mlp["experts"].items() if k not in EXPERT_WEIGHTS}
    return {**{k: v for k, v in layer.items() if k != "mlp"},
            "mlp": {**{k: v for k, v in mlp.items() if k != "experts"}, "experts": experts}}


def _rooted(name: str, item: dict) -> dict:
    """Item dict placed at its position in the full tree (inverse of select_item)."""
    layer_idx, weight = _parse(name)
    if layer_idx is None:
        return item
    if weight is not None:
        return {"layers": {layer_idx: {"mlp": {"experts": item}}}}
    return {"layers": {layer_idx: item}}


def _deep_update(dst: dict, src: Mapping) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = dict(v) if isinstance(v, Mapping) else v


def _release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc keeps them otherwise), so resident memory tracks live data."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _copy_dicts(tree: Mapping) -> dict:
    return {k: _copy_dicts(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _move_to_cpu_arrays(tree: dict) -> None:
    """Replaces every numpy leaf of `tree` (in place) by a jax array on the host CPU device, dropping the numpy
    array as soon as it is copied. Orbax copies numpy leaves before writing (it must not see them mutate) but not
    jax arrays, so this keeps an item's peak at about two copies instead of three."""
    cpu = jax.local_devices(backend="cpu")[0]
    for key in list(tree):
        value = tree[key]
        if isinstance(value, dict):
            _move_to_cpu_arrays(value)
        elif not isinstance(value, jax.Array):
            tree[key] = None
            tree[key] = jax.device_put(np.asarray(value), cpu)
        del value


def _check_item(name: str, tree, specs, where: str) -> None:
    """Raises CheckpointError if a tree's leaves differ from the specs in keys, shape or dtype."""
    spec_leaves = dict(iter_specs(specs))
    got = {}

    def walk(t, prefix):
        for k, v in t.items():
            if isinstance(v, Mapping):
                walk(v, (*prefix, k))
            else:
                got[(*prefix, k)] = v
    walk(tree, ())
    missing = sorted(path_str(p) for p in spec_leaves if p not in got)
    extra = sorted(path_str(p) for p in got if p not in spec_leaves)
    if missing or extra:
        raise CheckpointError(f"{where}: item {name!r} does not match the model: missing {missing}, unexpected "
                              f"{extra}")
    for p, spec in spec_leaves.items():
        a = got[p]
        if tuple(a.shape) != tuple(spec.shape) or np.dtype(a.dtype) != np.dtype(spec.dtype):
            raise CheckpointError(f"{where}: item {name!r} tensor {path_str(p)} is {tuple(a.shape)} "
                                  f"{np.dtype(a.dtype).name}, expected {tuple(spec.shape)} {np.dtype(spec.dtype).name}")


# ----------------------------------------------------------------------------------------------------------- writer
class CheckpointWriter:
    """Writes a checkpoint item by item into ``DST.tmp-<random>``; :meth:`finish` writes the metadata last and
    renames the folder to ``DST``. Used as a context manager, any exception (Ctrl-C included) removes the temporary
    folder, so nothing loadable is left behind and a rerun starts clean.
    """

    def __init__(self, dst: str | os.PathLike, config: GptOssConfig, *, dtype="bfloat16",
                 quant: QuantSpec | None = None, force: bool = False):
        self.dst = Path(dst).expanduser().absolute()  # Orbax needs absolute paths
        if self.dst.exists() and not force:
            raise CheckpointError(f"{self.dst}: already exists (pass --force / force=True to overwrite)")
        self.config = config
        self.dtype = dtype_name(dtype)
        self.quant = quant
        self.force = force
        self.specs = param_specs(config, dtype=jnp.dtype(self.dtype), quant=quant)
        self.tmp = self.dst.parent / f"{self.dst.name}.tmp-{secrets.token_hex(4)}"
        self.tmp.mkdir(parents=True)
        (self.tmp / PARAMS_DIR).mkdir()
        (self.tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        self.items: list[str] = []
        self._plan = item_names(config)
        self._checkpointer = None
        self._done = False

    def _ckpt(self):
        if self._checkpointer is None:
            import orbax.checkpoint as ocp
            self._checkpointer = ocp.PyTreeCheckpointer()
        return self._checkpointer

    def write_item(self, name: str, tree: dict) -> None:
        """Saves one item (see item_names; `tree` is what select_item returns) after checking it against the
        parameter specs."""
        if name not in self._plan:
            raise ValueError(f"unknown checkpoint item {name!r}; expected one of {self._plan}")
        if name in self.items:
            raise ValueError(f"checkpoint item {name!r} written twice")
        _check_item(name, tree, select_item(self.specs, name), str(self.dst))
        _move_to_cpu_arrays(tree)
        save_args = jax.tree.map(lambda _: self._save_args(), tree)
        self._ckpt().save(self.tmp / PARAMS_DIR / name, tree, save_args=save_args)
        self.items.append(name)
        _release_freed_memory()

    @staticmethod
    def _save_args():
        import orbax.checkpoint as ocp
        # Chunks of at most CHUNK_BYTES: a sharded restore reads only the chunks overlapping each device's shard.
        return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES)

    def copy_file(self, src: str | os.PathLike, name: str | None = None) -> None:
        shutil.copyfile(src, self.tmp / (name or Path(src).name))

    def finish(self, metadata: Mapping[str, Any] | None = None) -> Path:
        """Writes the metadata (last) and moves the folder into place. Returns DST."""
        missing = [n for n in self._plan if n not in self.items]
        if missing:
            raise CheckpointError(f"{self.dst}: items never written: {missing}")
        meta = {
            "format": CHECKPOINT_FORMAT,
            "checkpoint_version": CHECKPOINT_VERSION,
            "layout_version": LAYOUT_VERSION,
            "dtype": self.dtype,
            "quantization": None if self.quant is None else {"scheme": "int4", **self.quant.to_dict()},
            "items": self.items,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **dict(metadata or {}),
            "complete": True,
        }
        tmp_meta = self.tmp / (METADATA_FILE + ".partial")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, self.tmp / METADATA_FILE)
        if self.dst.exists():
            if not self.force:
                raise CheckpointError(f"{self.dst}: appeared while converting; not overwriting without force")
            old = self.dst.parent / f"{self.dst.name}.old-{secrets.token_hex(4)}"
            os.replace(self.dst, old)
            os.replace(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dst)
        self._done = True
        return self.dst

    def abort(self) -> None:
        if not self._done:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def save_params(path: str | os.PathLike, params: dict, config: GptOssConfig, *, dtype="bfloat16",
                quant: QuantSpec | None = None, metadata: Mapping[str, Any] | None = None,
                force: bool = False, extra_files: Iterable[str | os.PathLike] = ()) -> Path:
    """Saves a whole parameter tree (arrays or numpy; the storage tree or the stacked model tree) as a checkpoint,
    item by item."""
    if params["layers"] and not all(isinstance(k, int) for k in params["layers"]):
        params = unstack_layers(params)
    with CheckpointWriter(path, config, dtype=dtype, quant=quant, force=force) as w:
        for name in item_names(config):
            w.write_item(name, _copy_dicts(select_item(params, name)))  # write_item moves leaves; keep `params`
        for f in extra_files:
            w.copy_file(f)
        return w.finish(metadata)


# ----------------------------------------------------------------------------------------------------------- reader
def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a finished checkpoint; CheckpointError for a folder that is not one (or not finished)."""
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not meta_path.exists():
        raise CheckpointError(f"{path}: no {METADATA_FILE}; not a gptoss-jax checkpoint, or its conversion did not "
                              f"finish (rerun gptoss-convert)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != CHECKPOINT_FORMAT or not meta.get("complete"):
        raise CheckpointError(f"{meta_path}: not a completed {CHECKPOINT_FORMAT} checkpoint")
    if meta.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(f"{meta_path}: int4 layout version {meta.get('layout_version')} but this gptoss-jax "
                              f"reads version {LAYOUT_VERSION}; reconvert the checkpoint")
    if meta.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint version {meta.get('checkpoint_version')} is not "
                              f"{CHECKPOINT_VERSION}; reconvert the checkpoint")
    return meta


def quant_of(meta: Mapping[str, Any]) -> QuantSpec | None:
    q = meta.get("quantization")
    return None if q is None else QuantSpec.from_dict(q)


def sharding_fn(shardings: Shardings):
    """Any accepted `shardings` form → a callable (model-tree path, ParamSpec) -> Sharding."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return lambda path, spec: device
    if isinstance(shardings, jax.sharding.Sharding):
        return lambda path, spec: shardings
    if callable(shardings):
        return shardings

    def from_tree(path, spec):
        node = shardings
        for key in path:
            node = node[key]
        return node
    return from_tree


def load_params(path: str | os.PathLike, *, shardings: Shardings = None, dtype=None, meta: Mapping | None = None,
                config: GptOssConfig | None = None) -> tuple[GptOssConfig, QuantSpec | None, dict]:
    """Restores (config, quant, params) from a checkpoint, item by item, straight into device arrays.

    params is the model tree (layers stacked, :func:`gptoss_jax.params.model_specs`); each layer item is restored
    into the layer slice's sharding and written into the stacked arrays in place
    (:class:`gptoss_jax.params.StackedTreeBuilder`), so no second copy of the model is ever held.
    `shardings`: None (first device), one ``jax.sharding.Sharding`` for all leaves, a tree shaped like the model
    tree, or a callable ``(model-tree path, ParamSpec) -> Sharding`` (e.g. :func:`gptoss_jax.sharding.sharding_rule`).
    `dtype` casts the 16-bit tensors (not the int4 codes, scales or zero points) while reading; default: the dtype
    the checkpoint was written in. `meta` / `config`: already read by the caller (read here otherwise).
    Raises CheckpointError naming the folder or item for anything missing, malformed or mismatched.
    """
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().absolute()  # Orbax needs absolute paths
    meta = read_metadata(path) if meta is None else meta
    config = GptOssConfig.from_json(path / "config.json") if config is None else config
    quant = quant_of(meta)
    stored = jnp.dtype(meta["dtype"])
    target = stored if dtype is None else jnp.dtype(dtype_name(dtype))
    stored_specs = param_specs(config, dtype=stored, quant=quant)

    def dtype_of(model_path, spec):
        return target if model_path[-1] not in ("packed", "scales", "zeros") else jnp.dtype(spec.dtype)

    builder = StackedTreeBuilder(model_specs(config, dtype=stored, quant=quant), sharding_fn(shardings), dtype_of)
    checkpointer = ocp.PyTreeCheckpointer()
    plan = item_names(config)
    missing = [n for n in plan if n not in meta.get("items", [])]
    if missing:
        raise CheckpointError(f"{path / METADATA_FILE}: items missing: {missing}")
    for name in plan:
        item_dir = path / PARAMS_DIR / name
        if not item_dir.is_dir():
            raise CheckpointError(f"{item_dir}: missing item folder")
        specs = select_item(stored_specs, name)
        layer_idx, weight = _parse(name)
        prefix = () if layer_idx is None else ("layers", layer_idx, "mlp", "experts") if weight else (
            "layers", layer_idx)
        try:
            stored_meta = checkpointer.metadata(item_dir)
            stored_tree = getattr(stored_meta, "item_metadata", stored_meta)
            stored_tree = getattr(stored_tree, "tree", stored_tree)
        except Exception as e:  # noqa: BLE001 — orbax raises many types for unreadable folders
            raise CheckpointError(f"{item_dir}: unreadable Orbax checkpoint ({type(e).__name__}: {e})") from None
        _check_item(name, stored_tree, specs, str(item_dir))

        restore_args = {}
        for rel, spec in iter_specs(specs):
            full = (*prefix, *rel)
            node = restore_args
            for key in rel[:-1]:
                node = node.setdefault(key, {})
            model_path, _ = builder.model_path(full)
            node[rel[-1]] = ocp.ArrayRestoreArgs(sharding=builder.layer_sharding(full), global_shape=spec.shape,
                                                 dtype=dtype_of(model_path, spec))
        try:
            tree = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{item_dir}: could not restore ({type(e).__name__}: {e})") from None
        for rel, value in _leaves(tree):
            builder.put((*prefix, *rel), value)
        del tree
    return config, quant, builder.tree()


def restore_params(path: str | os.PathLike, mesh, *, dtype=None, rules=None):
    """(config, quant, params) restored straight into the shardings of the rules table on `mesh`: each process reads
    only what its devices hold, item by item. Checks the mesh against the config first (clear error before any
    reading)."""
    path = Path(path).expanduser().absolute()
    rules = sharding.RULES if rules is None else rules
    config = GptOssConfig.from_json(path / "config.json")
    sharding.validate_mesh_shape(config, dict(mesh.shape), rules)
    return load_params(path, shardings=sharding.sharding_rule(mesh, rules=rules), dtype=dtype, config=config)


def _leaves(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def load_model(path: str | os.PathLike, *, dtype=None, shardings: Shardings = None, moe_parallel=None,
               meta: Mapping | None = None, config: GptOssConfig | None = None):
    """The GptOss model of a checkpoint, its int4 weights kept packed (quant from the metadata).

    shardings: as for :func:`load_params`; moe_parallel: the MoE mesh plan (None: one device)."""
    meta = read_metadata(path) if meta is None else meta
    config, quant, params = load_params(path, shardings=shardings, dtype=dtype, meta=meta, config=config)
    compute = jnp.dtype(dtype_name(dtype)) if dtype is not None else jnp.dtype(meta["dtype"])
    return build_model(config, params, dtype=compute, quant=quant, moe_parallel=moe_parallel)


def host_dtype(name: str):
    """numpy dtype for a canonical dtype name (bfloat16 through ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


__all__ = ["CheckpointWriter", "save_params", "read_metadata", "load_params", "load_model", "item_names",
           "select_item",
           "quant_of", "METADATA_FILE", "dtype_name", "host_dtype"]
