"""The one table between Hugging Face gpt-oss tensor names and our parameter paths.

Used by the Hugging Face loader (:mod:`gptoss_jax.hf_loader`), every converter source
(:mod:`gptoss_jax.convert.sources`) and the test writers (:mod:`gptoss_jax.testing.writers`); nothing else spells a
Hugging Face name.

Names are those of transformers' ``models/gpt_oss/modeling_gpt_oss.py`` (``GptOssForCausalLM``; shapes in HF's
own layout)::

    model.embed_tokens.weight                           nn.Embedding          [vocab, hidden]
    model.layers.{i}.input_layernorm.weight             GptOssRMSNorm         [hidden]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight    nn.Linear(bias=True)  [out, in]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.bias                            [out]
    model.layers.{i}.self_attn.sinks                    nn.Parameter          [heads]
    model.layers.{i}.post_attention_layernorm.weight    GptOssRMSNorm         [hidden]
    model.layers.{i}.mlp.router.weight / .bias          GptOssTopKRouter      [experts, hidden] / [experts]
    model.layers.{i}.mlp.experts.gate_up_proj           GptOssExperts         [experts, hidden, 2*intermediate]
    model.layers.{i}.mlp.experts.gate_up_proj_bias                            [experts, 2*intermediate]
    model.layers.{i}.mlp.experts.down_proj                                    [experts, intermediate, hidden]
    model.layers.{i}.mlp.experts.down_proj_bias                               [experts, hidden]
    model.norm.weight                                   GptOssRMSNorm         [hidden]
    lm_head.weight                                      nn.Linear(bias=False) [vocab, hidden]

Our paths are the storage tree of :func:`gptoss_jax.params.param_specs` (``layers.{i}.attn.q_proj.weight`` ...).

Rules:

* **transpose** — ``nn.Linear`` stores its weight [out, in]; ours is [in, out] (``y = x @ W``), so the attention
  projections, the router and the head swap their last two dims. ``GptOssExperts`` holds its weights as plain
  parameters already [experts, in, out]: no transpose.
* **fuse / split** — ``GptOssExperts`` fuses gate and up in one tensor with interleaved columns
  (``gate, up = gate_up[..., ::2], gate_up[..., 1::2]``); ours is the same fused [E, hidden, 2*intermediate].
  Quantized releases split the experts into per-expert linears, named by the quantizer (:data:`EXPERT_LAYOUTS`):
  llm-compressor / AutoRound ``experts.{e}.gate_proj`` (the even columns) and ``experts.{e}.up_proj`` (the odd
  columns), a per-expert fused ``experts.{e}.gate_up_proj``, or GPTQModel's ``experts.gate_up.{e}``.
* **suffixes** — quantized releases keep these module names and replace ``.weight`` by their own tensors
  (``.weight_packed``, ``.qweight``, MXFP4's ``_blocks`` ...); those suffixes belong to each format's reader.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

from gptoss_jax.config import GptOssConfig

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_WEIGHTS = ("gate_up", "down")  # our names of the stacked expert weights

LAYER_PREFIX = "model.layers."
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor. For a per-layer entry `hf` and `path` are relative to ``model.layers.{i}.`` and
    ``layers.{i}``. transpose: HF stores [out, in] (``nn.Linear``) and we store [in, out]. group: the module group
    the converter's plan reports it under (embed, attention, router, experts, norms, lm_head)."""
    hf: str
    path: tuple[str, ...]
    transpose: bool
    group: str


GLOBAL_ENTRIES: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", ("embed", "embedding"), False, "embed"),
    Entry("model.norm.weight", ("norm", "scale"), False, "norms"),
    Entry("lm_head.weight", ("lm_head", "weight"), True, "lm_head"),
)
LAYER_ENTRIES: tuple[Entry, ...] = (  # in the order of the storage tree
    Entry("input_layernorm.weight", ("input_norm", "scale"), False, "norms"),
    *(e for proj in ATTN_PROJ for e in (
        Entry(f"self_attn.{proj}.weight", ("attn", proj, "weight"), True, "attention"),
        Entry(f"self_attn.{proj}.bias", ("attn", proj, "bias"), False, "attention"))),
    Entry("self_attn.sinks", ("attn", "sinks"), False, "attention"),
    Entry("post_attention_layernorm.weight", ("post_attn_norm", "scale"), False, "norms"),
    Entry("mlp.router.weight", ("mlp", "router", "weight"), True, "router"),
    Entry("mlp.router.bias", ("mlp", "router", "bias"), False, "router"),
    *(e for which in EXPERT_WEIGHTS for e in (
        Entry(f"mlp.experts.{which}_proj", ("mlp", "experts", which), False, "experts"),
        Entry(f"mlp.experts.{which}_proj_bias", ("mlp", "experts", f"{which}_bias"), False, "experts"))),
)
EMBED_NAME = GLOBAL_ENTRIES[0].hf
NORM_NAME = GLOBAL_ENTRIES[1].hf
LM_HEAD_NAME = GLOBAL_ENTRIES[2].hf

_BY_HF_GLOBAL = {e.hf: e for e in GLOBAL_ENTRIES}
_BY_HF_LAYER = {e.hf: e for e in LAYER_ENTRIES}
_BY_PATH_GLOBAL = {e.path: e for e in GLOBAL_ENTRIES}
_BY_PATH_LAYER = {e.path: e for e in LAYER_ENTRIES}

# Per-expert linears of quantized releases: layout -> ((module relative to the layer, our weight, our columns)).
# gate_proj / up_proj hold the even / odd columns of the fused gate_up (GptOssExperts' interleaving).
_ALL = slice(None)
EXPERT_LAYOUTS: dict[str, tuple[tuple[str, str, slice], ...]] = {
    "split": (("mlp.experts.{e}.gate_proj", "gate_up", slice(0, None, 2)),
              ("mlp.experts.{e}.up_proj", "gate_up", slice(1, None, 2)),
              ("mlp.experts.{e}.down_proj", "down", _ALL)),
    "fused": (("mlp.experts.{e}.gate_up_proj", "gate_up", _ALL), ("mlp.experts.{e}.down_proj", "down", _ALL)),
    "gptqmodel": (("mlp.experts.gate_up.{e}", "gate_up", _ALL), ("mlp.experts.down.{e}", "down", _ALL)),
}
_EXPERT_MODULE_RES = tuple((re.compile("^" + re.escape(t).replace(r"\{e\}", r"\d+") + "$"), which)
                           for layout in EXPERT_LAYOUTS.values() for t, which, _ in layout)


def is_format_specific(entry: Entry) -> bool:
    """True for the tensors a quantized release stores in its own way: the attention projections' weights (int4
    with format suffixes, or 16-bit) and the experts (per-expert linears, MXFP4 blocks ...). Every other entry is a
    plain 16/32-bit tensor in every format."""
    return entry.group == "experts" or (entry.path[-1] == "weight" and entry.path[-2] in ATTN_PROJ)


def layer_prefix(layer: int | str) -> str:
    """``model.layers.{layer}.`` (layer may be a pattern such as ``*`` for quantization configs' module lists)."""
    return f"{LAYER_PREFIX}{layer}."


def layer_of(name: str) -> int | None:
    """The layer index of a per-layer HF tensor or module name, None for the others."""
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def attn_module(layer: int | str, proj: str) -> str:
    """The HF module of an attention projection (one of :data:`ATTN_PROJ`): ``model.layers.{i}.self_attn.{proj}``;
    its tensors are ``.weight`` [out, in] and ``.bias`` (or a quantized format's suffixes)."""
    return f"{layer_prefix(layer)}self_attn.{proj}"


def router_weight(layer: int | str) -> str:
    return f"{layer_prefix(layer)}mlp.router.weight"


def expert_param(layer: int, which: str) -> str:
    """The stacked HF expert parameter of our `which` ("gate_up" or "down"): ``model.layers.{i}.mlp.experts.
    {which}_proj`` [E, in, out]; its bias is this name + ``_bias`` (:func:`expert_bias`)."""
    return f"{layer_prefix(layer)}mlp.experts.{which}_proj"


def expert_bias(layer: int, which: str) -> str:
    return expert_param(layer, which) + "_bias"


def expert_dims(config: GptOssConfig, which: str) -> tuple[int, int]:
    """(in, out) of one expert's fused weight `which`: gate_up (hidden, 2*intermediate), down (intermediate,
    hidden)."""
    h, i = config.hidden_size, config.intermediate_size
    return (h, 2 * i) if which == "gate_up" else (i, h)


def attn_dims(config: GptOssConfig, proj: str) -> tuple[int, int]:
    """(out, in) of an attention projection, as nn.Linear stores it."""
    c = config
    return {"q_proj": (c.q_dim, c.hidden_size), "k_proj": (c.kv_dim, c.hidden_size),
            "v_proj": (c.kv_dim, c.hidden_size), "o_proj": (c.hidden_size, c.q_dim)}[proj]


def expert_linears(config: GptOssConfig, layer: int, expert: int,
                   layout: str) -> list[tuple[str, int, int, str, slice]]:
    """(HF module, out, in, our weight "gate_up" / "down", our columns) of each per-expert linear of `expert` in a
    quantized release's `layout` (a key of :data:`EXPERT_LAYOUTS`). out / in are nn.Linear's [out, in]."""
    out = []
    for template, which, cols in EXPERT_LAYOUTS[layout]:
        k, n = expert_dims(config, which)
        out.append((layer_prefix(layer) + template.format(e=expert), len(range(n)[cols]), k, which, cols))
    return out


def expert_module_weight(module: str) -> str | None:
    """Our expert weight ("gate_up" / "down") of a per-expert HF module name of any layout, or None."""
    m = LAYER_RE.match(module)
    rel = m.group(2) if m else module
    for pattern, which in _EXPERT_MODULE_RES:
        if pattern.match(rel):
            return which
    return None


def hf_to_param_path(name: str) -> tuple[tuple, bool] | None:
    """(our storage path, transpose?) of an unquantized HF tensor name; None if the name is not in the table."""
    if name in _BY_HF_GLOBAL:
        e = _BY_HF_GLOBAL[name]
        return e.path, e.transpose
    m = LAYER_RE.match(name)
    if m and m.group(2) in _BY_HF_LAYER:
        e = _BY_HF_LAYER[m.group(2)]
        return ("layers", int(m.group(1)), *e.path), e.transpose
    return None


def param_path_to_hf(path: tuple) -> str:
    """The HF tensor name of one of our storage paths (inverse of :func:`hf_to_param_path`); KeyError if none."""
    path = tuple(path)
    if path in _BY_PATH_GLOBAL:
        return _BY_PATH_GLOBAL[path].hf
    if len(path) > 2 and path[0] == "layers" and path[2:] in _BY_PATH_LAYER:
        return layer_prefix(int(path[1])) + _BY_PATH_LAYER[path[2:]].hf
    raise KeyError(f"no Hugging Face name for parameter {'.'.join(str(p) for p in path)}")


def entry_of(name: str) -> Entry | None:
    """The table entry of an unquantized HF tensor name (per-layer entries relative to their layer), or None."""
    if name in _BY_HF_GLOBAL:
        return _BY_HF_GLOBAL[name]
    m = LAYER_RE.match(name)
    return _BY_HF_LAYER.get(m.group(2)) if m else None


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of an unquantized HF gpt-oss checkpoint of a given config: its name, our storage path, the
    transpose rule, its shape as HF stores it and the entry's module group."""
    name: str
    path: tuple
    transpose: bool
    shape: tuple[int, ...]
    group: str


def hf_tensors(config: GptOssConfig) -> Iterator[HFTensor]:
    """Every tensor of an unquantized HF gpt-oss checkpoint of `config`, in our storage tree's order; shapes are
    derived from :func:`gptoss_jax.params.param_specs` (transposed back where HF stores [out, in])."""
    from gptoss_jax.params import iter_specs, param_specs  # params pulls in jax; the table itself does not need it
    for path, spec in iter_specs(param_specs(config)):
        name = param_path_to_hf(path)
        e = entry_of(name)
        shape = tuple(spec.shape)
        yield HFTensor(name, path, e.transpose, shape[:-2] + shape[:-3:-1] if e.transpose else shape, e.group)


def module_group(name: str) -> str:
    """The module group (embed, attention, router, experts, norms, lm_head) of any tensor name of a gpt-oss
    checkpoint, unquantized or with a quantized format's suffixes (``...self_attn.q_proj.qweight``: attention)."""
    if name in _BY_HF_GLOBAL:
        return _BY_HF_GLOBAL[name].group
    e = entry_of(name)
    if e is not None:
        return e.group
    rel = m.group(2) if (m := LAYER_RE.match(name)) else name
    if rel.startswith("self_attn."):
        return "attention"
    if rel.startswith("mlp.router."):
        return "router"
    if rel.endswith("layernorm.weight"):
        return "norms"
    return "experts"


__all__ = ["ATTN_PROJ", "EMBED_NAME", "EXPERT_LAYOUTS", "EXPERT_WEIGHTS", "Entry", "GLOBAL_ENTRIES", "HFTensor",
           "LAYER_ENTRIES", "LAYER_RE", "LM_HEAD_NAME", "NORM_NAME", "attn_dims", "attn_module", "entry_of",
           "expert_bias", "expert_dims", "expert_linears", "expert_module_weight", "expert_param", "hf_to_param_path",
           "hf_tensors", "is_format_specific", "layer_of", "layer_prefix", "module_group", "param_path_to_hf",
           "router_weight"]
