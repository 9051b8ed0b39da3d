"""Abstract parameter specs of gpt-oss: every parameter's path, shape, dtype and logical axes.

The parameter tree is the pure-dict form of the Flax NNX model's state (``nnx.state(model).to_pure_dict()``).
Layer indices are ints. The converter writes exactly this tree; the sharding rules map the logical axes to mesh axes.

Quantized (W4A16) weights — the attention projections and the experts — are a dict
``{"packed", "scales"[, "zeros"]}`` in the layout of :mod:`pallas_kernels.int4_layout` instead of one array.

    embed.embedding                             [vocab, embed]
    layers.{i}.input_norm.scale                 [embed]
    layers.{i}.attn.{q,k,v}_proj.weight         [embed, q_heads*head_dim | kv_heads*head_dim]
    layers.{i}.attn.{q,k,v}_proj.bias
    layers.{i}.attn.o_proj.weight               [q_heads*head_dim, embed]
    layers.{i}.attn.o_proj.bias                 [embed]
    layers.{i}.attn.sinks                       [q_heads]
    layers.{i}.post_attn_norm.scale             [embed]
    layers.{i}.mlp.router.weight                [embed, experts]
    layers.{i}.mlp.router.bias                  [experts]
    layers.{i}.mlp.experts.gate_up              [experts, embed, 2*mlp]  (even columns gate, odd columns up)
    layers.{i}.mlp.experts.gate_up_bias         [experts, 2*mlp]
    layers.{i}.mlp.experts.down                 [experts, mlp, embed]
    layers.{i}.mlp.experts.down_bias            [experts, embed]
    norm.scale                                  [embed]
    lm_head.weight                              [embed, vocab]
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

QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up", "down")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How the 4-bit weights of a checkpoint are stored (see pallas_kernels.int4_layout)."""
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


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]  # one logical axis name (or None) per dim

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)

    def abstract(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, jnp.dtype(self.dtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * jnp.dtype(self.dtype).itemsize


def _weight_spec(lead: tuple[int, ...], lead_axes: tuple[str, ...], k: int, n: int, k_axis: str, n_axis: str,
                 dtype, quant: QuantSpec | None):
    if quant is None:
        return ParamSpec((*lead, k, n), dtype, (*lead_axes, k_axis, n_axis))
    g = quant.group_for(k)
    if k % 8:
        raise ValueError(f"int4 weights need an input dim divisible by 8, got {k}")
    spec = {
        "packed": ParamSpec((*lead, k // 8, n), jnp.int32, (*lead_axes, None, n_axis)),
        "scales": ParamSpec((*lead, k // g, n), jnp.dtype(quant.scale_dtype), (*lead_axes, None, n_axis)),
    }
    if not quant.symmetric:
        spec["zeros"] = ParamSpec((*lead, k // g, n), jnp.uint8, (*lead_axes, None, n_axis))
    if quant.act_order:  # set by quant_for for an act-order module only
        spec["perm"] = ParamSpec((*lead, k), jnp.int32, (*lead_axes, None))
    return spec


def param_specs(config: GptOssConfig, *, dtype=jnp.bfloat16, quant: QuantSpec | None = None) -> dict[str, Any]:
    """The nested dict of ParamSpec describing every parameter of the model."""
    c = config
    e, h, i, v = c.num_local_experts, c.hidden_size, c.intermediate_size, c.vocab_size

    def linear(k, n, k_axis, n_axis, module):
        return {"weight": _weight_spec((), (), k, n, k_axis, n_axis, dtype, quant_for(quant, module)),  # mixed prec.
                "bias": ParamSpec((n,), dtype, (n_axis,))}

    def layer():
        return {
            "input_norm": {"scale": ParamSpec((h,), dtype, (EMBED,))},
            "attn": {
                "q_proj": linear(h, c.q_dim, EMBED, Q_HEADS, "q_proj"),
                "k_proj": linear(h, c.kv_dim, EMBED, KV_HEADS, "k_proj"),
                "v_proj": linear(h, c.kv_dim, EMBED, KV_HEADS, "v_proj"),
                "o_proj": linear(c.q_dim, h, Q_HEADS, EMBED, "o_proj"),
                "sinks": ParamSpec((c.num_attention_heads,), dtype, (HEADS,)),
            },
            "post_attn_norm": {"scale": ParamSpec((h,), dtype, (EMBED,))},
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
        "norm": {"scale": ParamSpec((h,), dtype, (EMBED,))},
        "lm_head": {"weight": ParamSpec((h, v), dtype, (EMBED, VOCAB))},
    }


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
