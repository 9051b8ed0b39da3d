"""Where every array of gpt-oss lives on a device mesh: THE sharding-rules table, the mesh builder, and helpers.

The mesh has three named axes:

* ``data``   — batch rows (activations, KV cache); parameters are replicated over it.
* ``expert`` — MoE experts; nothing else is split over it except the vocabulary.
* ``tensor`` — attention heads (query heads, KV heads and their sinks together), and by default experts too.

Every parameter already carries logical axis names (declared once in :mod:`gptoss_jax.params`, and attached to the
model's ``nnx.Param`` s as ``out_sharding`` metadata); activations and the KV cache use the extra names below.
:data:`RULES` maps each logical name to mesh axes, so changing the strategy is an edit of that one table — e.g.
``EXPERTS: EXPERT`` keeps experts off the tensor axis (replicating them over it), ``VOCAB: None`` replicates the
embedding and lm_head. The MoE shard_map (:mod:`gptoss_jax.moe_parallel`) reads the same table to know
which mesh axes split the experts and which split the tokens.

Typical use (one host or many)::

    maybe_initialize_distributed()                   # no-op unless JAX_COORDINATOR_ADDRESS is set
    mesh = make_mesh(*parse_mesh_arg("1,4,1"), config=config)
    model = gptoss_jax.model.shard_model(model, mesh)  # params onto their shardings, MoE under shard_map
    cache = shard_cache(init_cache(config, batch, max_len), mesh)

or, with a converted Orbax checkpoint, :func:`restore_params` reads each device's part only.
"""

from __future__ import annotations

from gptoss_jax.errors import GptOssError

import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptoss_jax import params as P_
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kv_cache import LayerCache

DATA, EXPERT, TENSOR = "data", "expert", "tensor"
MESH_AXES = (DATA, EXPERT, TENSOR)

# Logical names of activation and cache dims (parameter names come from gptoss_jax.params).
BATCH = "batch"
SEQ = "seq"
CACHE_SLOTS = "cache_slots"
CACHE_KV_HEADS = "cache_kv_heads"  # the KV-head dim of k/v cache arrays [B, S, KV, D]
HEAD_DIM = "head_dim"
ACT_EMBED = "act_embed"
ACT_VOCAB = "act_vocab"  # the vocab dim of logits

MeshAxes = str | tuple[str, ...] | None

# ---------------------------------------------------------------------------------------------- THE rules table
RULES: dict[str, MeshAxes] = {
    # parameters
    P_.VOCAB: (EXPERT, TENSOR),  # embedding rows / lm_head columns over every model-parallel device
    P_.EMBED: None,
    P_.Q_HEADS: TENSOR,  # q_proj columns, o_proj rows: whole heads (head_dim is the minor part of the flat dim)
    P_.KV_HEADS: TENSOR,  # k/v_proj columns — query head h uses KV head h // groups, so contiguous splits agree
    P_.HEADS: TENSOR,  # sinks travel with their query heads
    P_.EXPERTS: (EXPERT, TENSOR),  # each (expert, tensor) device owns E / (n_expert · n_tensor) whole experts
    P_.MLP: None,  # experts stay whole: the int4 grouped kernel runs per shard on whole expert matrices
    P_.EXPERT_EMBED: None,
    P_.LAYERS: None,  # the stacked-layers axis: the scan walks it, every device holds its part of every layer
    # activations and KV cache
    BATCH: DATA,
    SEQ: None,
    CACHE_SLOTS: None,
    CACHE_KV_HEADS: TENSOR,  # the cache is split like the k/v heads that fill it
    HEAD_DIM: None,
    ACT_EMBED: None,
    ACT_VOCAB: (EXPERT, TENSOR),
}

# Dims whose split must divide exactly; for any other dim a non-dividing split falls back to replication.
_MUST_DIVIDE = {P_.EXPERTS, P_.Q_HEADS, P_.KV_HEADS, P_.HEADS, CACHE_KV_HEADS, BATCH}


class ShardingError(GptOssError, ValueError):
    """A mesh or sharding that cannot hold the model (names the axis, the sizes and the tensor)."""


def mesh_axes_of(logical: str | None, rules: Mapping[str, MeshAxes] = RULES) -> tuple[str, ...]:
    """The mesh axes a logical axis is split over (empty: replicated)."""
    if logical is None:
        return ()
    if logical not in rules:
        raise ShardingError(f"logical axis {logical!r} has no entry in the sharding rules table")
    value = rules[logical]
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _axes_size(mesh_shape: Mapping[str, int], axes: Sequence[str]) -> int:
    return math.prod(mesh_shape.get(a, 1) for a in axes)


# ---------------------------------------------------------------------------------------------------- the mesh
def validate_mesh_shape(config: GptOssConfig, mesh_shape: Mapping[str, int],
                        rules: Mapping[str, MeshAxes] = RULES) -> None:
    """Raises ShardingError when the model cannot be split this way (experts or heads not divisible)."""
    for name, size in mesh_shape.items():
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ShardingError(f"mesh axis {name!r} must be a positive integer, got {size!r}")
    checks = [
        (P_.EXPERTS, config.num_local_experts, "num_local_experts"),
        (P_.HEADS, config.num_attention_heads, "num_attention_heads"),
        (P_.KV_HEADS, config.num_key_value_heads, "num_key_value_heads"),
    ]
    for logical, count, field in checks:
        axes = mesh_axes_of(logical, rules)
        n = _axes_size(mesh_shape, axes)
        if count % n:
            sizes = ", ".join(f"{a}={mesh_shape.get(a, 1)}" for a in axes)
            raise ShardingError(f"{field}={count} is not divisible by the mesh axes {axes} it is split over "
                                f"({sizes}, {n} shards); pick a mesh whose {'·'.join(axes)} divides {count}")


def make_mesh(data: int | None = None, expert: int | None = None, tensor: int | None = None, *,
              devices: Sequence[Any] | None = None, config: GptOssConfig | None = None,
              rules: Mapping[str, MeshAxes] = RULES) -> Mesh:
    """A ("data", "expert", "tensor") mesh.

    Unset sizes default to: tensor 1, data 1, expert = whatever uses the remaining devices. The product may be
    smaller than the number of devices (the first ones are used, e.g. to benchmark 2 of 4 GPUs); larger is an
    error. With `config`, checks that experts and heads divide their axes (:func:`validate_mesh_shape`).
    Across hosts `devices` defaults to all global devices (call :func:`maybe_initialize_distributed` first).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    tensor = 1 if tensor is None else tensor
    if data is None and expert is None:
        data = 1
    for name, v in ((DATA, data), (EXPERT, expert), (TENSOR, tensor)):
        if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
            raise ShardingError(f"mesh axis {name!r} must be a positive integer, got {v!r}")
    if expert is None:
        if n % (data * tensor):
            raise ShardingError(f"{n} devices cannot be split as data={data} × tensor={tensor} × expert")
        expert = n // (data * tensor)
    if data is None:
        if n % (expert * tensor):
            raise ShardingError(f"{n} devices cannot be split as expert={expert} × tensor={tensor} × data")
        data = n // (expert * tensor)
    shape = {DATA: int(data), EXPERT: int(expert), TENSOR: int(tensor)}
    if config is not None:
        validate_mesh_shape(config, shape, rules)
    need = math.prod(shape.values())
    if need > n:
        raise ShardingError(f"mesh data={data} × expert={expert} × tensor={tensor} needs {need} devices but only "
                            f"{n} are present ({jax.default_backend()}: {[d.id for d in devices]})")
    if need < n and jax.process_count() > 1:
        raise ShardingError(f"a multi-host mesh must use every device ({n}), got {need}")
    axis_types = (jax.sharding.AxisType.Auto,) * 3  # GSPMD propagation outside the MoE shard_map
    return jax.make_mesh((shape[DATA], shape[EXPERT], shape[TENSOR]), MESH_AXES, axis_types=axis_types,
                         devices=devices[:need])


def parse_mesh_arg(text: str | None) -> tuple[int | None, int | None, int | None]:
    """`--mesh` value → (data, expert, tensor) for :func:`make_mesh`.

    Accepts "D,E,T" (e.g. "1,4,2"), "data=2,expert=4" (missing keys: defaults), "" / "auto" / None (all defaults).
    """
    if text is None or text.strip().lower() in ("", "auto"):
        return (None, None, None)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if all("=" in p for p in parts):
            values: dict[str, int] = {}
            for p in parts:
                key, value = (s.strip() for s in p.split("=", 1))
                if key not in MESH_AXES:
                    raise ShardingError(f"--mesh {text!r}: unknown axis {key!r}; axes are {MESH_AXES}")
                values[key] = int(value)
            return (values.get(DATA), values.get(EXPERT), values.get(TENSOR))
        if len(parts) != 3:
            raise ShardingError(f"--mesh {text!r}: expected data,expert,tensor (three integers, e.g. 1,4,2)")
        d, e, t = (int(p) for p in parts)
    except ValueError as e:
        if isinstance(e, ShardingError):
            raise
        raise ShardingError(f"--mesh {text!r}: sizes must be integers (data,expert,tensor, e.g. 1,4,2)") from None
    for name, v in zip(MESH_AXES, (d, e, t)):
        if v < 1:
            raise ShardingError(f"--mesh {text!r}: {name} must be >= 1")
    return (d, e, t)


# -------------------------------------------------------------------------------------------- specs and shardings
def spec_for(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None, *,
             rules: Mapping[str, MeshAxes] = RULES, name: str = "array") -> P:
    """PartitionSpec for an array with these logical axes.

    With `shape` and `mesh`, checks divisibility: experts / heads / batch must divide (ShardingError naming `name`),
    other dims that don't divide are replicated instead.
    """
    used: dict[str, str] = {}
    entries = []
    for i, logical in enumerate(logical_axes):
        axes = mesh_axes_of(logical, rules)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)  # size-1 axes add nothing
        for a in axes:
            if a in used:
                raise ShardingError(f"{name}: mesh axis {a!r} would split both {used[a]!r} and {logical!r}; "
                                    f"fix the sharding rules table")
            used[a] = logical
        if axes and shape is not None and mesh is not None:
            n = _axes_size(mesh.shape, axes)
            if shape[i] % n:
                if logical in _MUST_DIVIDE:
                    raise ShardingError(f"{name}: dim {i} ({logical}) has size {shape[i]}, not divisible by mesh "
                                        f"axes {axes} ({n} shards)")
                axes = ()
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def param_partition_specs(specs, mesh: Mesh | None = None, *, rules: Mapping[str, MeshAxes] = RULES):
    """The param_specs tree → the same tree of PartitionSpec."""
    out: dict = {}
    for path, s in P_.iter_specs(specs):
        _set(out, path, spec_for(s.axes, s.shape, mesh, rules=rules, name=P_.path_str(path)))
    return out


def shardings_for(specs, mesh: Mesh, *, rules: Mapping[str, MeshAxes] = RULES):
    """The param_specs tree → the same tree of NamedSharding on `mesh`."""
    out: dict = {}
    for path, s in P_.iter_specs(specs):
        _set(out, path, NamedSharding(mesh, spec_for(s.axes, s.shape, mesh, rules=rules, name=P_.path_str(path))))
    return out


param_shardings = shardings_for


def activation_sharding(mesh: Mesh, *logical_axes: str | None, shape=None,
                        rules: Mapping[str, MeshAxes] = RULES) -> NamedSharding:
    """e.g. activation_sharding(mesh, BATCH, SEQ) for tokens [B, T]; (BATCH, SEQ, ACT_VOCAB) for logits."""
    return NamedSharding(mesh, spec_for(logical_axes, shape, mesh, rules=rules, name="activation"))


def cache_shardings(cache, mesh: Mesh, *, rules: Mapping[str, MeshAxes] = RULES):
    """Shardings for a KV cache (tuple of stacked LayerCache, :mod:`gptoss_jax.kv_cache`): k/v [L/p,B,S,KV,D] split
    like batch and KV heads; pos [L/p,B,S]."""
    def one(c):
        kv = NamedSharding(mesh, spec_for((P_.LAYERS, BATCH, CACHE_SLOTS, CACHE_KV_HEADS, HEAD_DIM), c.k.shape, mesh,
                                          rules=rules, name="kv_cache.k"))
        pos = NamedSharding(mesh, spec_for((P_.LAYERS, BATCH, CACHE_SLOTS), c.pos.shape, mesh, rules=rules,
                                           name="kv_cache.pos"))
        return LayerCache(kv, kv, pos)

    return tuple(one(c) for c in cache)


def shard_cache(cache, mesh: Mesh, *, rules: Mapping[str, MeshAxes] = RULES):
    return to_global(cache, cache_shardings(cache, mesh, rules=rules))


def to_global(tree, shardings):
    """device_put that also works across processes (every process passes the same host values)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sh):
        if isinstance(x, jax.Array) and x.sharding == sh:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])
    return jax.tree.map(one, tree, shardings)


def constrain(x, mesh: Mesh | None, *logical_axes: str | None, rules: Mapping[str, MeshAxes] = RULES):
    """Sharding-constraint hook for activations (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, activation_sharding(mesh, *logical_axes, shape=x.shape,
                                                                   rules=rules))


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _tree_like(params, shardings):
    """Match the shardings tree (param_specs layout) to a params tree that may hold fewer / extra leaves."""
    if isinstance(params, Mapping):
        return {k: _tree_like(v, shardings[k]) for k, v in params.items()}
    return shardings


# ------------------------------------------------------------------------------------------------ the model
def shard_params(params, mesh: Mesh, specs, *, rules: Mapping[str, MeshAxes] = RULES):
    """device_put a parameter tree (pure dict) onto its shardings.

    Across processes, leaves that are not yet global arrays must hold the same values on every process: each
    process then places the shards of its own devices (from a host copy — prefer :func:`restore_params`)."""
    return to_global(params, _tree_like(params, shardings_for(specs, mesh, rules=rules)))


# ------------------------------------------------------------------------------------------- restore from Orbax
def sharding_rule(mesh: Mesh, *, rules: Mapping[str, MeshAxes] = RULES):
    """A callable (param path, ParamSpec) -> NamedSharding, the form checkpoint.load_params accepts."""
    def sharding_of(path: tuple, spec: P_.ParamSpec) -> NamedSharding:
        return NamedSharding(mesh, spec_for(spec.axes, spec.shape, mesh, rules=rules, name=P_.path_str(path)))
    return sharding_of


def restore_orbax_tree(path, specs, shardings, *, concurrent_gb: int = 4):
    """Orbax restore of a params tree saved with ``ocp.StandardCheckpointer`` (layer keys as str or int).

    Every leaf is restored as a jax.Array with its target sharding, so each process reads only the stored chunks
    that overlap its devices' shards (chunks = the shards the writer had; write from a sharded layout). At most
    `concurrent_gb` GB are read at a time, bounding the transient host memory."""
    import orbax.checkpoint as ocp
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), specs, shardings,
                          is_leaf=P_.is_spec)
    target = _str_keys(target)
    handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=concurrent_gb)
    with ocp.Checkpointer(handler) as ckptr:
        restored = ckptr.restore(os.path.abspath(os.fspath(path)), args=ocp.args.StandardRestore(target))
    return _int_layer_keys(restored)


def _str_keys(tree):
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _int_layer_keys(tree):
    if isinstance(tree, Mapping):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_layer_keys(v) for k, v in tree.items()}
    return tree


# ------------------------------------------------------------------------------------------------- multi-host
# JAX's own variables (what jax.distributed.initialize documents); no private namespace.
_ENV_COORDINATOR = ("JAX_COORDINATOR_ADDRESS",)
_ENV_NUM_PROCESSES = ("JAX_NUM_PROCESSES",)
_ENV_PROCESS_ID = ("JAX_PROCESS_ID",)


def _env(names) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, *, local_device_ids=None) -> bool:
    """Calls jax.distributed.initialize when a coordinator is given (argument or environment); else does nothing.

    Environment (JAX's own names): JAX_COORDINATOR_ADDRESS "host:port", JAX_NUM_PROCESSES, JAX_PROCESS_ID. Must
    run before anything touches jax devices.
    Returns True when this process is (now) part of a multi-process job. Calling it twice is harmless.
    """
    coordinator = coordinator or _env(_ENV_COORDINATOR)
    if num_processes is None and _env(_ENV_NUM_PROCESSES) is not None:
        num_processes = int(_env(_ENV_NUM_PROCESSES))
    if process_id is None and _env(_ENV_PROCESS_ID) is not None:
        process_id = int(_env(_ENV_PROCESS_ID))
    if jax.distributed.is_initialized():
        return True
    if coordinator is None:
        if num_processes not in (None, 1):
            raise ShardingError(f"num_processes={num_processes} but no coordinator address: set "
                                f"JAX_COORDINATOR_ADDRESS=host:port")
        return False
    if num_processes is None or process_id is None:
        raise ShardingError(f"coordinator {coordinator!r} given but num_processes={num_processes}, "
                            f"process_id={process_id}: set JAX_NUM_PROCESSES and JAX_PROCESS_ID")
    if not 0 <= process_id < num_processes:
        raise ShardingError(f"process_id {process_id} is outside [0, {num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    return True


def describe(mesh: Mesh) -> str:
    return " × ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names) + f" ({mesh.devices.size} devices)"
