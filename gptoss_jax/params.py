"""THE declaration of gpt-oss's parameters: every parameter's path, shape, dtype, logical axes and initializer.

This file is the only place that spells a parameter's shape. Everything else is derived from it:

* the NNX modules (:mod:`gptoss_jax.model`, :mod:`gptoss_jax.layers`) create each ``nnx.Param`` from its spec
  subtree (:func:`gptoss_jax.layers.param`), with the logical axes attached as flax's ``out_sharding`` metadata
  (as MaxText / ``nnx.Param(..., sharding=axes)`` do), so a model knows its own axes;
* shardings: :mod:`gptoss_jax.sharding` maps the logical axes to mesh axes (its RULES table);
* the checkpoint item plan (:mod:`gptoss_jax.checkpoint`), the loaders and the converters read the storage tree.

Why the specs are the source and the modules follow (rather than specs derived from the modules with
``nnx.eval_shape``): loaders, converters and the sharding plan need the tree — per layer, int4 parts included —
before any model exists and without tracing one (a converter never builds a model; ``eval_shape`` of a 36-layer
int4 model would trace its random init and quantization just to learn shapes), and the int4 storage layout
(packed / scales / zeros / perm) is a fact of the checkpoint format that belongs next to :class:`QuantSpec`.

Two views of one tree:

* the **storage tree** (:func:`param_specs`) — one subtree per layer, ``layers.{i}.…`` with int layer indices. It is
  what checkpoints, converters and the Hugging Face name table (:mod:`gptoss_jax.hf_loader`) speak, item by item.
* the **model tree** (:func:`model_specs`) — the pure-dict form of the Flax NNX model's state
  (``nnx.state(model, nnx.Param).to_pure_dict()``): the same leaves, but the layers stacked along a leading
  ``layers`` axis (``layers.attn.q_proj.weight [L, embed, q]``) so the model runs them under one ``lax.scan``.
  :func:`stack_layers` / :func:`unstack_layers` convert between the two; loaders fill the stacked arrays layer by
  layer (:class:`gptoss_jax.checkpoint.StackedTreeBuilder`) instead of stacking whole copies.

Quantized (W4A16) weights — the attention projections and the experts, or the subset named by
:attr:`QuantSpec.modules` — are a dict ``{"packed", "scales"[, "zeros"][, "perm"]}`` in the layout of
:mod:`gptoss_jax.kernels.int4_layout` instead of one array.

    embed.embedding                             [vocab, embed]
    layers.{i}.input_norm.scale                 [embed]                               init ones
    layers.{i}.attn.{q,k,v}_proj.weight         [embed, q_heads*head_dim | kv_heads*head_dim]
    layers.{i}.attn.{q,k,v}_proj.bias
    layers.{i}.attn.o_proj.weight               [q_heads*head_dim, embed]
    layers.{i}.attn.o_proj.bias                 [embed]
    layers.{i}.attn.sinks                       [q_heads]
    layers.{i}.post_attn_norm.scale             [embed]                               init ones
    layers.{i}.mlp.router.weight                [embed, experts]
    layers.{i}.mlp.router.bias                  [experts]
    layers.{i}.mlp.experts.gate_up              [experts, embed, 2*mlp]  (even columns gate, odd columns up)
    layers.{i}.mlp.experts.gate_up_bias         [experts, 2*mlp]
    layers.{i}.mlp.experts.down                 [experts, mlp, embed]
    layers.{i}.mlp.experts.down_bias            [experts, embed]
    norm.scale                                  [embed]                               init ones
    lm_head.weight                              [embed, vocab]

Every other parameter is initialised N(0, 0.02²) — biases and sinks too, so no term of a random model's forward
pass is trivially zero.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import GptOssConfig

# Logical axis names used in specs; `sharding.py` owns their mapping to mesh axes.
VOCAB = "vocab"
EMBED = "embed"
Q_HEADS = "q_heads"  # flattened q_heads*head_dim
KV_HEADS = "kv_heads"  # flattened kv_heads*head_dim
HEADS = "heads"  # one entry per query head (sinks)
EXPERTS = "experts"
MLP = "mlp"
EXPERT_EMBED = "expert_embed"  # the hidden dim as seen by experts (inputs of gate_up, outputs of down)
GROUPS = "groups"  # quantization groups along the input dim
PACKED = "packed"  # packed input dim (K / 8)
LAYERS = "layers"  # the stacked-layers dim of the model tree (never split: the scan walks it)

QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up", "down")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How the 4-bit weights of a checkpoint are stored (see gptoss_jax.kernels.int4_layout)."""
    group_size: int | None = 64  # None: per channel (one group spanning the whole input dim)
    symmetric: bool = True
    scale_dtype: str = "bfloat16"
    # Which of QUANTIZED_MODULES are int4; the others are plain 16/32-bit weights (mixed precision, e.g. a GPTQ /
    # AutoRound release that quantized the experts only). Metadata written before this field means all of them.
    modules: tuple[str, ...] = QUANTIZED_MODULES
    # Modules stored with an input-row permutation "perm" (activation order, GPTQ desc_act / compressed-tensors
    # actorder group: x @ W = x[..., perm] @ W_stored, applied by layers.linear / grouped_linear). Usually empty.
    act_order: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "act_order", tuple(m for m in QUANTIZED_MODULES if m in self.act_order))
        bad = [m for m in self.modules if m not in QUANTIZED_MODULES]
        if bad:
            raise ValueError(f"unknown quantized module(s) {bad}; expected some of {QUANTIZED_MODULES}")
        object.__setattr__(self, "modules", tuple(m for m in QUANTIZED_MODULES if m in self.modules))

    def quantizes(self, module: str) -> bool:
        return module in self.modules

    def group_for(self, in_dim: int) -> int:
        g = in_dim if self.group_size is None else self.group_size
        if in_dim % g:
            raise ValueError(f"quantization group size {g} does not divide input dim {in_dim}")
        return g

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modules"] = list(self.modules)
        d["act_order"] = list(self.act_order)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        return cls(group_size=d.get("group_size"), symmetric=bool(d.get("symmetric", True)),
                   scale_dtype=str(d.get("scale_dtype", "bfloat16")),
                   modules=tuple(d.get("modules", QUANTIZED_MODULES)), act_order=tuple(d.get("act_order", ())))


def quant_for(quant: QuantSpec | None, module: str) -> QuantSpec | None:
    """The QuantSpec of one of QUANTIZED_MODULES (its act_order narrowed to that module), or None where that module
    is a plain 16/32-bit weight."""
    if quant is None or not quant.quantizes(module):
        return None
    return quant if quant.act_order == ((module,) if module in quant.act_order else ()) else dataclasses.replace(
        quant, act_order=(module,) if module in quant.act_order else ())


# How a fresh (random) model fills a parameter: see ParamSpec.init and init_value.
NORMAL = "normal"  # N(0, INIT_STD²)
ONES = "ones"  # RMSNorm scales
INT4 = "int4"  # a part of an int4 weight: layers.Int4Weight quantizes one NORMAL draw of the logical [..., K, N]
INITS = (NORMAL, ONES, INT4)
INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: shape, dtype, one logical axis name (or None) per dim, and how a random model fills it."""
    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]
    init: str = NORMAL  # one of INITS

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)
        assert self.init in INITS, self.init

    def abstract(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, jnp.dtype(self.dtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * jnp.dtype(self.dtype).itemsize


def init_value(spec: ParamSpec, key) -> jax.Array:
    """A fresh value for a NORMAL or ONES spec (`key`: a jax PRNG key, unused for ONES). INT4 parts are made
    together by :class:`gptoss_jax.layers.Int4Weight`; asking for one alone is a ValueError."""
    if spec.init == ONES:
        return jnp.ones(spec.shape, spec.dtype)
    if spec.init == NORMAL:
        return (INIT_STD * jax.random.normal(key, spec.shape, jnp.float32)).astype(spec.dtype)
    raise ValueError(f"a {spec.init!r} spec is filled with its int4 weight, not alone")


def is_int4(spec) -> bool:
    """Whether a spec subtree is one int4 weight ({"packed", "scales"[, "zeros"][, "perm"]})."""
    return isinstance(spec, dict) and "packed" in spec


def int4_logical_shape(spec: dict) -> tuple[int, ...]:
    """The unpacked [..., K, N] shape of an int4 weight spec (its packed part is [..., K/8, N])."""
    *lead, k8, n = spec["packed"].shape
    return (*lead, 8 * k8, n)


def _weight_spec(lead: tuple[int, ...], lead_axes: tuple[str, ...], k: int, n: int, k_axis: str, n_axis: str,
                 dtype, quant: QuantSpec | None):
    if quant is None:
        return ParamSpec((*lead, k, n), dtype, (*lead_axes, k_axis, n_axis))
    g = quant.group_for(k)
    if k % 8:
        raise ValueError(f"int4 weights need an input dim divisible by 8, got {k}")
    spec = {
        "packed": ParamSpec((*lead, k // 8, n), jnp.int32, (*lead_axes, None, n_axis), INT4),
        "scales": ParamSpec((*lead, k // g, n), jnp.dtype(quant.scale_dtype), (*lead_axes, None, n_axis), INT4),
    }
    if not quant.symmetric:
        spec["zeros"] = ParamSpec((*lead, k // g, n), jnp.uint8, (*lead_axes, None, n_axis), INT4)
    if quant.act_order:  # set by quant_for for an act-order module only
        spec["perm"] = ParamSpec((*lead, k), jnp.int32, (*lead_axes, None), INT4)
    return spec


def param_specs(config: GptOssConfig, *, dtype=jnp.bfloat16, quant: QuantSpec | None = None) -> dict[str, Any]:
    """The storage tree: the nested dict of ParamSpec describing every parameter of the model (``layers.{i}``).

    dtype: the dtype of every 16/32-bit parameter; quant: which weights are int4 and how (None: none).
    Raises ValueError when `quant` cannot split an input dim (group size, K % 8)."""
    c = config
    e, h, i, v = c.num_local_experts, c.hidden_size, c.intermediate_size, c.vocab_size

    def linear(k, n, k_axis, n_axis, module):
        return {"weight": _weight_spec((), (), k, n, k_axis, n_axis, dtype, quant_for(quant, module)),  # mixed prec.
                "bias": ParamSpec((n,), dtype, (n_axis,))}

    def norm():
        return {"scale": ParamSpec((h,), dtype, (EMBED,), ONES)}

    def layer():
        return {
            "input_norm": norm(),
            "attn": {
                "q_proj": linear(h, c.q_dim, EMBED, Q_HEADS, "q_proj"),
                "k_proj": linear(h, c.kv_dim, EMBED, KV_HEADS, "k_proj"),
                "v_proj": linear(h, c.kv_dim, EMBED, KV_HEADS, "v_proj"),
                "o_proj": linear(c.q_dim, h, Q_HEADS, EMBED, "o_proj"),
                # one learned logit per query head, an extra softmax column that carries no value
                "sinks": ParamSpec((c.num_attention_heads,), dtype, (HEADS,)),
            },
            "post_attn_norm": norm(),
            "mlp": {
                "router": {"weight": ParamSpec((h, e), dtype, (EMBED, None)),
                           "bias": ParamSpec((e,), dtype, (None,))},
                "experts": {
                    "gate_up": _weight_spec((e,), (EXPERTS,), h, 2 * i, EXPERT_EMBED, MLP, dtype,
                                            quant_for(quant, "gate_up")),  # mixed precision
                    "gate_up_bias": ParamSpec((e, 2 * i), dtype, (EXPERTS, MLP)),
                    "down": _weight_spec((e,), (EXPERTS,), i, h, MLP, EXPERT_EMBED, dtype,
                                         quant_for(quant, "down")),  # mixed precision
                    "down_bias": ParamSpec((e, h), dtype, (EXPERTS, EXPERT_EMBED)),
                },
            },
        }

    return {
        "embed": {"embedding": ParamSpec((v, h), dtype, (VOCAB, EMBED))},
        "layers": {li: layer() for li in range(c.num_hidden_layers)},
        "norm": norm(),
        "lm_head": {"weight": ParamSpec((h, v), dtype, (EMBED, VOCAB))},
    }


def model_specs(config: GptOssConfig, *, dtype=jnp.bfloat16, quant: QuantSpec | None = None) -> dict[str, Any]:
    """The model tree's specs: :func:`param_specs` with the layers stacked along a leading ``layers`` axis."""
    storage = param_specs(config, dtype=dtype, quant=quant)
    n = config.num_hidden_layers
    stacked = jax.tree.map(lambda s: dataclasses.replace(s, shape=(n, *s.shape), axes=(LAYERS, *s.axes)),
                           storage["layers"][0], is_leaf=is_spec)
    return {**storage, "layers": stacked}


def stack_layers(tree: dict) -> dict:
    """Storage tree (``layers.{i}``) → model tree (leaves stacked on a leading layer axis). Copies every layer."""
    layers = tree["layers"]
    per_layer = [layers[i] for i in sorted(layers)]
    stack = np.stack if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(per_layer[0])) else jnp.stack
    return {**tree, "layers": jax.tree.map(lambda *xs: stack(xs), *per_layer)}


def unstack_layers(tree: dict) -> dict:
    """Model tree → storage tree (``layers.{i}`` holding views/slices of the stacked leaves)."""
    stacked = tree["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {**tree, "layers": {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)}}


def layer_period(config: GptOssConfig) -> int:
    """The shortest period p of the layer-type pattern (p divides the layer count): the model scans over blocks of
    p layers (2 for gpt-oss's alternating sliding / full attention), each block position with its own KV cache
    layout. A pattern without a shorter period gives p = num_hidden_layers (no scan, still correct)."""
    types, n = config.layer_types, config.num_hidden_layers
    for p in range(1, n + 1):
        if n % p == 0 and all(types[i] == types[i % p] for i in range(n)):
            return p
    return n


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def iter_specs(tree, prefix: tuple = ()) -> Iterator[tuple[tuple, ParamSpec]]:
    """Yields (path, spec) for every leaf, in a stable order."""
    for key in tree:
        value = tree[key]
        path = (*prefix, key)
        if isinstance(value, ParamSpec):
            yield path, value
        else:
            yield from iter_specs(value, path)


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def abstract_params(specs) -> Any:
    return jax.tree.map(lambda s: s.abstract(), specs, is_leaf=is_spec)


def count_parameters(config: GptOssConfig) -> int:
    """Number of logical (unquantized) parameters."""
    return sum(int(np.prod(s.shape)) for _, s in iter_specs(param_specs(config, dtype=jnp.float32)))


# ------------------------------------------------------------------------------------------------ loading stacks
def _without_leading_axis(sharding):
    """The sharding of one layer's slice of a stacked array (the layer axis is never split)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)
        if spec and spec[0] is not None:
            raise ValueError(f"the stacked-layers axis must not be split, got {sharding.spec}")
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    return sharding


_UPDATES: dict = {}


def _update_fn(sharding):
    """jit(buffer.at[i].set(x)) with the buffer donated: written in place on accelerators (no second copy)."""
    fn = _UPDATES.get(sharding)
    if fn is None:
        fn = jax.jit(lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0),
                     donate_argnums=0, out_shardings=sharding)
        _UPDATES[sharding] = fn
    return fn


class StackedTreeBuilder:
    """Builds the model tree (stacked layers) from storage-tree tensors arriving one at a time, on device.

    Each stacked leaf is allocated once, empty, in its final sharding; each layer's tensor is placed into the layer's
    slice of it (a donated in-place update) as it arrives, so loading never holds a second copy of the model.

    specs: :func:`model_specs` (the target shapes/dtypes); sharding_of(path, spec) -> Sharding for a model-tree path.
    dtype_of(path, spec) -> the dtype to store (default spec.dtype).
    """

    def __init__(self, specs, sharding_of, dtype_of=None):
        self.specs = dict(iter_specs(specs))
        self.sharding_of = sharding_of
        self.dtype_of = dtype_of or (lambda path, spec: jnp.dtype(spec.dtype))
        self._leaves: dict[tuple, Any] = {}
        self._filled: dict[tuple, set] = {}

    @staticmethod
    def model_path(storage_path: tuple) -> tuple[tuple, int | None]:
        """storage path ("layers", i, ...) → (("layers", ...), i); other paths unchanged with None."""
        if storage_path[0] == "layers":
            return ("layers", *storage_path[2:]), int(storage_path[1])
        return tuple(storage_path), None

    def layer_sharding(self, storage_path: tuple):
        """Where to place one storage-tree tensor before it goes into the tree (the layer slice's sharding)."""
        path, layer = self.model_path(storage_path)
        sharding = self.sharding_of(path, self.specs[path])
        return sharding if layer is None else _without_leading_axis(sharding)

    def put(self, storage_path: tuple, value) -> None:
        """Adds one tensor (host numpy or a jax array, ideally already in :meth:`layer_sharding`)."""
        path, layer = self.model_path(storage_path)
        spec = self.specs[path]
        dtype = self.dtype_of(path, spec)
        sharding = self.sharding_of(path, spec)
        if layer is None:
            self._leaves[path] = jax.device_put(value if isinstance(value, jax.Array) else np.asarray(value),
                                                sharding).astype(dtype)
            self._filled[path] = {None}
            return
        if path not in self._leaves:
            self._leaves[path] = jax.jit(lambda: jnp.zeros(spec.shape, dtype), out_shardings=sharding)()
            self._filled[path] = set()
        if not isinstance(value, jax.Array):
            value = jax.device_put(np.asarray(value), _without_leading_axis(sharding))
        self._leaves[path] = _update_fn(sharding)(self._leaves[path], value, np.int32(layer))
        self._filled[path].add(layer)

    def missing(self) -> list[str]:
        """Storage-tree paths not filled yet."""
        out = []
        for path, spec in self.specs.items():
            want = {None} if path[0] != "layers" else set(range(spec.shape[0]))
            for i in sorted(want - self._filled.get(path, set()), key=lambda x: -1 if x is None else x):
                out.append(path_str(path if i is None else ("layers", i, *path[1:])))
        return out

    def tree(self) -> dict:
        missing = self.missing()
        if missing:
            raise ValueError(f"parameters never loaded: {missing[:10]}{' …' if len(missing) > 10 else ''}")
        out: dict = {}
        for path, value in self._leaves.items():
            node = out
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
        return out
