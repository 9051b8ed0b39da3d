"""The project's own checkpoint format: a folder of Orbax PyTree checkpoints plus config and metadata.

Layout (written by ``gptoss-convert`` through :class:`CheckpointWriter`, or by :func:`save_params`)::

    DST/
      config.json                 Hugging Face gpt-oss config (what GptOssConfig.from_json reads)
      tokenizer.json, ...         tokenizer files copied from the source, when there were any
      params/<item>/              one Orbax PyTree checkpoint per item: "embed", "layers.<i>" (attention, norms,
                                  router, expert biases), "layers.<i>.gate_up", "layers.<i>.down", "head" (norm,
                                  lm_head)
      gptoss_checkpoint.json      metadata, written last: its presence with "complete": true marks a finished folder;
                                  "files" records the size and SHA-256 of every other file of the folder

The parameter tree is exactly ``params.param_specs(config, dtype=..., quant=...)``: the attention projections and
the experts are int4 dicts ``{packed, scales[, zeros]}`` (layout of :mod:`gptoss_jax.kernels.int4_layout`), everything
else is 16-bit. Items are saved one at a time, so a writer never holds more than one item in host memory, and
restored one at a time straight into the requested shardings (each device reads only its part of each array), so a
reader never builds a host copy of the whole model.

A writer works in ``DST.tmp-<random>`` and renames it to ``DST`` only after the metadata is written; an interrupted
write leaves no loadable folder at ``DST`` (SIGINT / SIGTERM are held while Orbax writes an item, then the folder is
removed; a SIGKILLed run's folder is removed by the next run, see :mod:`gptoss_jax.fsutil`).

Integrity (docs/RELIABILITY.md): loading always checks the metadata's types, that every recorded file exists with its
recorded size, that no unrecorded file sits under ``params/``, that config.json, the metadata and the stored arrays
agree; with ``verify=True`` (the default) it also checks every file's SHA-256 (≈1 GB/s per core in memory, 0.55 GB/s
measured from the page cache on a loaded 2-core VM: 1-2 minutes of one core for gpt-oss-120b's 65 GB, spread over up
to 8 threads). ``gptoss-jax verify CKPT`` does the same alone.
"""

from __future__ import annotations

import dataclasses
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

from gptoss_jax import fsutil, sharding
from gptoss_jax.config import ConfigError, GptOssConfig
from gptoss_jax.jsoncheck import field, read_json_object
from gptoss_jax.model import build_model
from gptoss_jax.params import (QUANTIZED_MODULES, QuantSpec, StackedTreeBuilder, iter_specs, model_specs,
                               param_specs, path_str, unstack_layers)
from gptoss_jax.safetensors_io import CheckpointError
from gptoss_jax.kernels.int4_layout import LAYOUT_VERSION

METADATA_FILE = "gptoss_checkpoint.json"
PARAMS_DIR = "params"
CHECKPOINT_FORMAT = "gptoss-jax-orbax"
CHECKPOINT_VERSION = 2  # 2: "files" (size + SHA-256 of every file) in the metadata
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
INT4_KEYS = ("packed", "scales", "zeros", "perm")  # leaves of an int4 weight dict (never cast)
FLOAT_DTYPE_NAMES = ("bfloat16", "float16", "float32")


# ------------------------------------------------------------------------------- per-tensor dtypes (lossless)
# A converted checkpoint keeps every non-int4 tensor in its source dtype. The metadata's "dtype" is the dtype most of
# those bytes have; "tensor_dtypes" {path: dtype} lists every tensor stored in another one.
def _leaves(tree: Mapping, prefix: tuple = ()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def apply_tensor_dtypes(specs: Mapping, tensor_dtypes: Mapping[str, str]) -> dict:
    """A copy of a spec tree whose tensors named in `tensor_dtypes` (path_str -> dtype name) have that dtype."""
    out = {}
    for k, v in specs.items():
        if isinstance(v, Mapping):
            out[k] = apply_tensor_dtypes(v, {p[len(str(k)) + 1:]: d for p, d in tensor_dtypes.items()
                                             if p.startswith(f"{k}.")})
        elif str(k) in tensor_dtypes:
            out[k] = dataclasses.replace(v, dtype=jnp.dtype(tensor_dtypes[str(k)]))
        else:
            out[k] = v
    return out


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


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _check_item(name: str, tree, specs, where: str) -> None:
    """Raises CheckpointError if a tree's leaves differ from the specs in keys, shape or dtype."""
    spec_leaves = dict(iter_specs(specs))
    got = {}
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{where}: item {name!r} has no readable Orbax metadata (got {type(tree).__name__})")

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
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise CheckpointError(f"{where}: item {name!r} tensor {path_str(p)} has no shape / dtype in its metadata")
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
        self.dst = fsutil.check_destination(dst, force=force)
        self.config = config
        self.dtype = dtype_name(dtype)
        self.quant = quant
        self.force = force
        self.specs = param_specs(config, dtype=jnp.dtype(self.dtype), quant=quant)
        self.tmp = fsutil.make_temp_dir(self.dst)
        self.left_behind: Path | None = None
        try:
            (self.tmp / PARAMS_DIR).mkdir()
            (self.tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        except BaseException:  # not yet inside a `with`: clean up here
            fsutil.remove_tree(self.tmp)
            raise
        self.items: list[str] = []
        self.tensor_dtypes: dict[str, str] = {}  # non-int4 tensors written in a dtype other than self.dtype
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
        self._adopt_float_dtypes(name, tree)
        _check_item(name, tree, select_item(self.specs, name), str(self.dst))
        _move_to_cpu_arrays(tree)
        save_args = jax.tree.map(lambda _: self._save_args(), tree)
        target = self.tmp / PARAMS_DIR / name
        # Orbax finishes an item on background threads: hold Ctrl-C / SIGTERM until it is done, so abort() never
        # races a thread that recreates files in the folder it removes.
        with fsutil.deferred_signals():
            try:
                self._ckpt().save(target, tree, save_args=save_args)
            except Exception as e:  # noqa: BLE001 — Orbax/TensorStore report disk full etc. as ValueError
                raise CheckpointError(f"{target}: could not write item {name!r} ({_one_line(e)})") from None
        self.items.append(name)
        _release_freed_memory()

    def _adopt_float_dtypes(self, name: str, tree: Mapping) -> None:
        """Records non-int4 leaves given in another float dtype than the checkpoint's (lossless conversion)."""
        changed = False
        for full, leaf in _leaves(_rooted(name, tree)):
            if full[-1] in INT4_KEYS or not hasattr(leaf, "dtype"):
                continue
            got = np.dtype(leaf.dtype).name
            if got != self.dtype and got in FLOAT_DTYPE_NAMES:
                self.tensor_dtypes[path_str(full)] = got
                changed = True
        if changed:
            self.specs = apply_tensor_dtypes(param_specs(self.config, dtype=jnp.dtype(self.dtype), quant=self.quant),
                                             self.tensor_dtypes)

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
            "tensor_dtypes": dict(sorted(self.tensor_dtypes.items())),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **dict(metadata or {}),
            "files": fsutil.file_digests(self.tmp, exclude=(METADATA_FILE, METADATA_FILE + ".partial")),
            "complete": True,
        }
        tmp_meta = self.tmp / (METADATA_FILE + ".partial")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, self.tmp / METADATA_FILE)
        with fsutil.deferred_signals():
            fsutil.check_destination(self.dst, force=self.force)  # DST may have appeared meanwhile
            (self.tmp / fsutil.OWNER_FILE).unlink()
            if os.path.lexists(self.dst):
                old = self.dst.parent / f"{self.dst.name}.old-{secrets.token_hex(4)}"
                os.replace(self.dst, old)
                fsutil.mark_owned(old)  # a kill before the rmtree below leaves it to the next run's cleanup
                os.replace(self.tmp, self.dst)
                fsutil.remove_tree(old)
            else:
                os.replace(self.tmp, self.dst)
            self._done = True
        return self.dst

    def abort(self) -> None:
        """Removes the temporary folder; `left_behind` names it if it could not be removed."""
        if not self._done and not fsutil.remove_tree(self.tmp):
            self.left_behind = self.tmp

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
    """The metadata of a finished checkpoint, every field type-checked; CheckpointError naming the file and field
    for a folder that is not one (or not finished, or of another version)."""
    path = fsutil.user_path(path)
    meta_path = path / METADATA_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not meta_path.exists():
        raise CheckpointError(f"{path}: no {METADATA_FILE}; not a gptoss-jax checkpoint, or its conversion did not "
                              f"finish (rerun gptoss-convert)")
    meta = read_json_object(meta_path, error=CheckpointError)
    w = str(meta_path)
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("complete") is not True:
        raise CheckpointError(f"{meta_path}: not a completed {CHECKPOINT_FORMAT} checkpoint")
    if field(meta, "layout_version", w, "int", error=CheckpointError) != LAYOUT_VERSION:
        raise CheckpointError(f"{meta_path}: int4 layout version {meta.get('layout_version')} but this gptoss-jax "
                              f"reads version {LAYOUT_VERSION}; reconvert the checkpoint")
    if field(meta, "checkpoint_version", w, "int", error=CheckpointError) != CHECKPOINT_VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint version {meta.get('checkpoint_version')} is not "
                              f"{CHECKPOINT_VERSION}; reconvert the checkpoint")
    if field(meta, "dtype", w, "str", error=CheckpointError) not in ("bfloat16", "float16", "float32"):
        raise CheckpointError(f"{meta_path}: field 'dtype' must be bfloat16, float16 or float32, got "
                              f"{meta['dtype']!r}")
    q = field(meta, "quantization", w, "object", nullable=True, error=CheckpointError)
    if q is not None:
        kw = dict(error=CheckpointError, prefix="quantization.")
        if field(q, "scheme", w, "str", default="int4", **kw) != "int4":
            raise CheckpointError(f"{meta_path}: quantization.scheme {q['scheme']!r} is not 'int4'")
        field(q, "group_size", w, "int", nullable=True, minimum=1, **kw)
        field(q, "symmetric", w, "bool", **kw)
        if field(q, "scale_dtype", w, "str", **kw) not in ("bfloat16", "float16", "float32"):
            raise CheckpointError(f"{meta_path}: quantization.scale_dtype {q['scale_dtype']!r} is not bfloat16, "
                                  f"float16 or float32")
        for key in ("modules", "act_order"):  # optional (older metadata has neither): lists of module names
            names = field(q, key, w, "str_list", default=None, **kw)
            bad = [m for m in names or () if m not in QUANTIZED_MODULES]
            if bad:
                raise CheckpointError(f"{meta_path}: quantization.{key} names unknown module(s) {bad}; expected "
                                      f"some of {list(QUANTIZED_MODULES)}")
    items = field(meta, "items", w, "str_list", error=CheckpointError)
    if len(set(items)) != len(items):
        raise CheckpointError(f"{meta_path}: field 'items' lists an item twice")
    for name in items:
        try:
            _parse(name)
        except ValueError:
            raise CheckpointError(f"{meta_path}: field 'items' has an unknown item {name!r}") from None
    files = field(meta, "files", w, "object", error=CheckpointError)
    for rel, info in files.items():
        parts = rel.split("/")
        if not rel or rel.startswith("/") or any(x in ("", ".", "..") for x in parts) or "\\" in rel:
            raise CheckpointError(f"{meta_path}: field 'files' names {rel!r}, not a plain path inside the folder")
        if not isinstance(info, Mapping):
            raise CheckpointError(f"{meta_path}: field 'files.{rel}' must be an object")
        field(info, "size", w, "int", minimum=0, error=CheckpointError, prefix=f"files.{rel}.")
        digest = field(info, fsutil.DIGEST, w, "str", error=CheckpointError, prefix=f"files.{rel}.")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CheckpointError(f"{meta_path}: field 'files.{rel}.sha256' is not a SHA-256 hex digest")
    if "config.json" not in files:
        raise CheckpointError(f"{meta_path}: field 'files' does not record config.json")
    return meta


def quant_of(meta: Mapping[str, Any]) -> QuantSpec | None:
    q = meta.get("quantization")
    return None if q is None else QuantSpec.from_dict(q)


def verify_checkpoint(path: str | os.PathLike, *, digests: bool = True) -> tuple[dict, GptOssConfig]:
    """Checks a converted checkpoint before anything is allocated; returns (metadata, config).

    Always: the metadata's fields (read_metadata); every file it records exists with its recorded size and no
    unrecorded file sits under params/; config.json parses and describes exactly the items the metadata lists (the
    layer count is compared before any per-layer table is built, so a config claiming 10^6 layers fails fast).
    With `digests`: every recorded file's SHA-256 (threads; ≈1 GB/s per core measured, so ~65 s of one core for
    gpt-oss-120b). Raises CheckpointError naming the file at fault.
    """
    path = fsutil.user_path(path)
    meta = read_metadata(path)
    meta_path = path / METADATA_FILE
    fsutil.verify_files(path, meta["files"], where=str(meta_path), digests=digests, strict_under=(PARAMS_DIR,),
                        error=CheckpointError)
    items = meta["items"]
    layers = sorted({_parse(n)[0] for n in items if _parse(n)[0] is not None})
    try:
        raw = read_json_object(path / "config.json", error=CheckpointError)
        declared = raw.get("num_hidden_layers")
        if isinstance(declared, int) and declared != len(layers):
            raise CheckpointError(f"{path / 'config.json'}: num_hidden_layers is {declared} but {meta_path} lists "
                                  f"{len(layers)} layer(s)")
        config = GptOssConfig.from_hf_dict(raw, source=str(path / "config.json"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    plan = item_names(config)
    if sorted(plan) != sorted(items):
        missing = [n for n in plan if n not in items]
        extra = [n for n in items if n not in plan]
        raise CheckpointError(f"{meta_path}: items disagree with config.json: missing {missing[:8]}, unexpected "
                              f"{extra[:8]}")
    for name in plan:
        if not (path / PARAMS_DIR / name).is_dir():
            raise CheckpointError(f"{path / PARAMS_DIR / name}: missing item folder")
    try:
        quant = quant_of(meta)
        specs = param_specs(config, dtype=jnp.dtype(meta["dtype"]), quant=quant)
    except ValueError as e:
        raise CheckpointError(f"{meta_path}: quantization {meta.get('quantization')} does not fit config.json "
                              f"({e})") from None
    # The stored arrays of the first layer and of the global items must be the ones the metadata describes (a
    # metadata edit such as "quantization": null must not make int4 codes load as 16-bit weights). Every other item
    # is checked the same way when it is restored (load_params).
    import orbax.checkpoint as ocp

    stored_specs = apply_tensor_dtypes(specs, meta.get("tensor_dtypes", {}))
    checkpointer = ocp.PyTreeCheckpointer()
    for name in plan:
        if _parse(name)[0] in (None, 0):
            item_dir = path / PARAMS_DIR / name
            _check_item(name, _item_tree_metadata(checkpointer, item_dir), select_item(stored_specs, name),
                        str(item_dir))
    return meta, config


def _item_tree_metadata(checkpointer, item_dir: Path):
    """The stored tree metadata of one Orbax item, or CheckpointError naming the folder."""
    try:
        stored_meta = checkpointer.metadata(item_dir)
        stored_tree = getattr(stored_meta, "item_metadata", stored_meta)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
    except Exception as e:  # noqa: BLE001 — orbax raises many types for unreadable folders
        raise CheckpointError(f"{item_dir}: unreadable Orbax checkpoint ({_one_line(e)})") from None
    if stored_tree is None:
        raise CheckpointError(f"{item_dir}: unreadable Orbax checkpoint (no metadata)")
    return stored_tree


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


def load_params(path: str | os.PathLike, *, shardings: Shardings = None, dtype=None, verify: bool = True,
                checked: tuple[Mapping, GptOssConfig] | None = None) -> tuple[GptOssConfig, QuantSpec | None, dict]:
    """Restores (config, quant, params) from a checkpoint, item by item, straight into device arrays.

    params is the model tree (layers stacked, :func:`gptoss_jax.params.model_specs`); each layer item is restored
    into the layer slice's sharding and written into the stacked arrays in place
    (:class:`gptoss_jax.params.StackedTreeBuilder`), so no second copy of the model is ever held.
    `shardings`: None (first device), one ``jax.sharding.Sharding`` for all leaves, a tree shaped like the model
    tree, or a callable ``(model-tree path, ParamSpec) -> Sharding`` (e.g. :func:`gptoss_jax.sharding.sharding_rule`).
    `dtype` casts the 16-bit tensors (not the int4 codes, scales or zero points) while reading; default: the dtype
    each tensor in the dtype it was written in (the metadata's "dtype", or its entry in
    "tensor_dtypes": a lossless conversion keeps source dtypes per tensor; a stacked leaf whose layers were stored in
    different dtypes takes the widest). `verify`: also check every file's SHA-256 (structure, sizes and
    config/metadata/array agreement are always checked; see verify_checkpoint). `checked`: (metadata, config) from
    a verify_checkpoint call the caller already made (not repeated). Raises CheckpointError naming the file at fault.
    """
    import orbax.checkpoint as ocp

    path = fsutil.user_path(path)
    meta, config = verify_checkpoint(path, digests=verify) if checked is None else checked
    quant = quant_of(meta)
    stored = jnp.dtype(meta["dtype"])
    target = stored if dtype is None else jnp.dtype(dtype_name(dtype))
    stored_specs = apply_tensor_dtypes(param_specs(config, dtype=stored, quant=quant), meta.get("tensor_dtypes", {}))
    # one dtype per model-tree leaf: the load dtype for 16-bit tensors when given, else the stored dtype (the widest
    # over the layers of a stacked leaf); int4 codes, scales, zero points and act-order permutations keep theirs
    kept: dict[tuple, Any] = {}
    for spath, sspec in iter_specs(stored_specs):
        mpath = ("layers", *spath[2:]) if spath[0] == "layers" else spath
        kept[mpath] = jnp.promote_types(kept[mpath], sspec.dtype) if mpath in kept else jnp.dtype(sspec.dtype)

    def dtype_of(model_path, spec):
        if model_path[-1] in INT4_KEYS or dtype is None:
            return kept[model_path]
        return target

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
        stored_tree = _item_tree_metadata(checkpointer, item_dir)
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
            raise CheckpointError(f"{item_dir}: could not restore ({_one_line(e)})") from None
        for rel, value in _leaves(tree):
            builder.put((*prefix, *rel), value)
        del tree
    return config, quant, builder.tree()


def restore_params(path: str | os.PathLike, mesh, *, dtype=None, rules=None, verify: bool = True):
    """(config, quant, params) restored straight into the shardings of the rules table on `mesh`: each process reads
    only what its devices hold, item by item. Checks the mesh against the config first (clear error before any
    reading)."""
    path = fsutil.user_path(path)
    rules = sharding.RULES if rules is None else rules
    checked = verify_checkpoint(path, digests=verify)
    sharding.validate_mesh_shape(checked[1], dict(mesh.shape), rules)
    return load_params(path, shardings=sharding.sharding_rule(mesh, rules=rules), dtype=dtype, checked=checked)


def _leaves(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def load_model(path: str | os.PathLike, *, dtype=None, shardings: Shardings = None, moe_parallel=None,
               verify: bool = True, checked: tuple[Mapping, GptOssConfig] | None = None):
    """The GptOss model of a checkpoint, its int4 weights kept packed (quant from the metadata).

    shardings, verify, checked: as for :func:`load_params`; moe_parallel: the MoE mesh plan (None: one device)."""
    path = fsutil.user_path(path)
    checked = verify_checkpoint(path, digests=verify) if checked is None else checked
    meta = checked[0]
    compute = jnp.dtype(dtype_name(dtype)) if dtype is not None else jnp.dtype(meta["dtype"])
    # the compute dtype is the load dtype: every non-int4 tensor is cast to it while reading
    config, quant, params = load_params(path, shardings=shardings, dtype=compute, checked=checked)
    return build_model(config, params, dtype=compute, quant=quant, moe_parallel=moe_parallel)


def host_dtype(name: str):
    """numpy dtype for a canonical dtype name (bfloat16 through ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


__all__ = ["CheckpointWriter", "apply_tensor_dtypes", "save_params", "read_metadata", "verify_checkpoint", "load_params",
           "load_model",
           "item_names",
           "select_item",
           "quant_of", "METADATA_FILE", "dtype_name", "host_dtype"]
