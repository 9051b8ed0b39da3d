"""The gpt-oss model configuration.

`GptOssConfig` is a frozen dataclass read from a Hugging Face ``config.json`` in both spellings seen in the wild:

* ``rope_theta`` + ``rope_scaling`` (the hub's gpt-oss-120b / 20b files, transformers 4.x), and
* ``rope_parameters`` with ``rope_theta`` inside (transformers 5).

Presets live in ``configs/<name>.json`` at the repository root (also packaged as ``gptoss_jax/presets``).
"""

from __future__ import annotations

from gptoss_jax.errors import GptOssError

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

SLIDING = "sliding_attention"
FULL = "full_attention"

# Keys of a Hugging Face gpt-oss config.json that carry no information for inference (or that we read elsewhere).
_IGNORED_HF_KEYS = frozenset(
    {
        "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache", "initializer_range",
        "output_router_logits", "router_aux_loss_coef", "hidden_act", "attention_dropout", "bos_token_id",
        "quantization_config", "experts_per_token", "num_experts", "tie_word_embeddings", "auto_map",
        "_name_or_path", "name_or_path", "return_dict", "output_hidden_states", "output_attentions",
        "pretraining_tp", "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "rope_scaling",
        "rope_theta", "rope_parameters", "layer_types", "swiglu_limit", "swiglu_alpha", "eos_token_id",
        "pad_token_id", "max_position_embeddings", "sliding_window", "is_encoder_decoder", "initial_context_length",
    }
)


# Sanity bounds checked before anything is sized from a config (a 1 KB config.json must not be able to make us
# allocate gigabytes): far above gpt-oss-120b (36 layers, 128 experts, 201088 vocab), within int32 indexing.
MAX_LAYERS = 4096
MAX_DIM = 2**31 - 1

# config.json field -> JSON kind (gptoss_jax.jsoncheck) and bounds; checked before the dataclass is built.
_HF_FIELD_TYPES = {
    **{k: ("int", 1, MAX_DIM) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                        "num_key_value_heads", "head_dim", "num_local_experts", "num_experts",
                                        "num_experts_per_tok", "experts_per_token", "max_position_embeddings",
                                        "initial_context_length")},
    "num_hidden_layers": ("int", 1, MAX_LAYERS),
    "sliding_window": ("int", 1, MAX_DIM),
    "rms_norm_eps": ("number", None, None),
    "swiglu_alpha": ("number", None, None),
    "swiglu_limit": ("number", None, None),
    "rope_theta": ("number", None, None),
    "attention_bias": ("bool", None, None),
    "tie_word_embeddings": ("bool", None, None),
    "layer_types": ("str_list", None, None),
    "eos_token_id": ("int_or_int_list", 0, MAX_DIM),
    "pad_token_id": ("int", 0, MAX_DIM),
    "bos_token_id": ("int", 0, MAX_DIM),
    "model_type": ("str", None, None),
    "rope_scaling": ("object", None, None),
    "rope_parameters": ("object", None, None),
    "quantization_config": ("object", None, None),
}


def check_hf_types(d: Mapping[str, Any], source: str) -> None:
    """ConfigError naming the file and field for any config.json field of the wrong JSON type or out of bounds
    (null is accepted where transformers writes it: optional ids, sliding_window, rope dicts)."""
    from gptoss_jax.jsoncheck import field
    for key, (kind, lo, hi) in _HF_FIELD_TYPES.items():
        field(d, key, source, kind, default=None, nullable=True, minimum=lo, maximum=hi, error=ConfigError)


class ConfigError(GptOssError, ValueError):
    """A config.json (or preset) that cannot describe a gpt-oss model."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 150000.0
    rope_type: str = "yarn"  # "yarn" or "default"
    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False
    attention_factor: float | None = None  # None: 0.1 * ln(factor) + 1 (YaRN's default)
    # What config.json left out and was filled with transformers' default ("truncate=True (not in rope_scaling)", ...);
    # reported by `gptoss-convert inspect` and `gptoss-jax info`. Not part of equality.
    assumed: tuple[str, ...] = dataclasses.field(default=(), compare=False)


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 131072
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    eos_token_ids: tuple[int, ...] = (200002,)
    pad_token_id: int | None = 199999

    def __post_init__(self):
        n = self.num_hidden_layers
        if not (isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_LAYERS):
            raise ConfigError(f"num_hidden_layers must be an integer in [1, {MAX_LAYERS}], got {n!r}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers))
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ----------------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                     "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        need(self.num_experts_per_tok <= self.num_local_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts ({self.num_local_experts})")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        need(not bad, f"layer_types entries must be {SLIDING!r} or {FULL!r}, got {bad}")
        need(isinstance(self.sliding_window, int) and self.sliding_window > 0,
             f"sliding_window must be a positive integer, got {self.sliding_window!r}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        need(self.rope.rope_type in ("yarn", "default"),
             f"rope type {self.rope.rope_type!r} is not supported (gpt-oss uses 'yarn')")
        need(self.rope.theta > 0, f"rope_theta must be positive, got {self.rope.theta}")
        if self.rope.rope_type == "yarn":
            need(self.rope.factor >= 1, f"rope factor must be >= 1, got {self.rope.factor}")
            need(self.rope.original_max_position_embeddings > 0, "original_max_position_embeddings must be positive")

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def replace(self, **changes) -> "GptOssConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str = "config.json") -> "GptOssConfig":
        """Reads a Hugging Face gpt-oss config dict (either rope spelling). `source` names it in errors."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: must hold a JSON object, got {type(d).__name__}")
        d = dict(d)
        check_hf_types(d, source)
        model_type = d.get("model_type", "gpt_oss")
        if model_type != "gpt_oss":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'gpt_oss'")
        known = {f.name for f in dataclasses.fields(cls)} | _IGNORED_HF_KEYS
        unknown = sorted(k for k in d if k not in known)
        if unknown:
            raise ConfigError(f"{source}: unknown fields {unknown}")

        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in d and f.name not in ("rope", "layer_types", "eos_token_ids"):
                kw[f.name] = d[f.name]
        if "num_experts_per_tok" not in d and "experts_per_token" in d:
            kw["num_experts_per_tok"] = d["experts_per_token"]
        if "num_local_experts" not in d and "num_experts" in d:
            kw["num_local_experts"] = d["num_experts"]
        if d.get("sliding_window") is not None:
            kw["sliding_window"] = d["sliding_window"]
        for key in ("max_position_embeddings", "swiglu_limit", "swiglu_alpha"):
            if d.get(key) is not None:
                kw[key] = d[key]
        if "pad_token_id" in d:
            kw["pad_token_id"] = d["pad_token_id"]
        eos = d.get("eos_token_id")
        if eos is not None:
            kw["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
            if not kw["eos_token_ids"]:
                raise ConfigError(f"{source}: eos_token_id is an empty list (give at least one id, or null)")
        if d.get("layer_types") is not None:
            kw["layer_types"] = tuple(d["layer_types"])
        if d.get("tie_word_embeddings"):
            raise ConfigError(f"{source}: tie_word_embeddings=true is not gpt-oss (its lm_head is untied)")
        kw["rope"] = _rope_from_hf(d, source)
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GptOssConfig":
        from gptoss_jax.jsoncheck import read_json_object
        path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        if path.is_dir():
            path = path / "config.json"
        return cls.from_hf_dict(read_json_object(path, error=ConfigError), source=str(path))

    @classmethod
    def from_preset(cls, name: str) -> "GptOssConfig":
        path = preset_path(name)
        return cls.from_json(path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers-5 style config.json dict (also read by transformers 4.55+)."""
        rope = {
            "rope_type": self.rope.rope_type,
            "rope_theta": self.rope.theta,
        }
        if self.rope.rope_type == "yarn":
            rope.update(factor=self.rope.factor, beta_fast=self.rope.beta_fast, beta_slow=self.rope.beta_slow,
                        original_max_position_embeddings=self.rope.original_max_position_embeddings,
                        truncate=self.rope.truncate)
            if self.rope.attention_factor is not None:
                rope["attention_factor"] = self.rope.attention_factor
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "swiglu_alpha": self.swiglu_alpha,
            "swiglu_limit": self.swiglu_limit,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": False,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
        }


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """gpt-oss alternates sliding / full attention, starting with sliding at layer 0."""
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


def _rope_from_hf(d: Mapping[str, Any], source: str) -> RopeConfig:
    """The rotary config of a Hugging Face config dict, every missing key filled as transformers fills it.

    Reference: transformers ``PreTrainedConfig.standardize_rope_params`` and ``_compute_yarn_parameters``
    (modeling_rope_utils.py) and ``GptOssConfig.__post_init__``: no rope dict at all gives gpt-oss's
    {yarn, factor 32, beta 32/1, truncate False, original 4096}; a rope dict without ``rope_type`` is plain RoPE
    ("default"); in a YaRN dict a missing ``truncate`` is True, ``original_max_position_embeddings`` is
    ``max_position_embeddings``, ``beta_fast``/``beta_slow`` are 32/1, ``attention_factor`` is 0.1·ln(factor)+1, a
    missing ``rope_theta`` is the top-level one or 150000. Each filled key is listed in ``RopeConfig.assumed``.
    """
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    assumed: list[str] = []
    if params is not None and scaling is not None:
        raise ConfigError(f"{source}: has both rope_parameters and rope_scaling; keep one")
    if params is not None or scaling is not None:
        field_name = "rope_parameters" if params is not None else "rope_scaling"
        raw = params if params is not None else scaling
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: {field_name} must be an object")
        p = dict(raw)
        from gptoss_jax.jsoncheck import field
        for key, kind in (("rope_type", "str"), ("type", "str"), ("original_max_position_embeddings", "int"),
                          ("truncate", "bool")):  # types first: a wrong type is named, not a crash below
            field(p, key, source, kind, default=None, nullable=True, minimum=1 if kind == "int" else None,
                  error=ConfigError, prefix=field_name + ".")
        if "rope_theta" not in p:
            if d.get("rope_theta") is not None:
                p["rope_theta"] = d["rope_theta"]
            else:
                p["rope_theta"] = 150000.0
                assumed.append(f"rope_theta=150000.0 (not in config.json; transformers' GptOssConfig default)")
        if "rope_type" not in p and "type" not in p:
            assumed.append(f"rope_type='default' (not in {field_name}; transformers' default: plain RoPE, "
                           f"no YaRN)")
        rope_type = p.pop("rope_type", p.pop("type", "default"))
        if rope_type == "yarn":
            if p.get("factor") is None:
                raise ConfigError(f"{source}: {field_name} of type yarn has no factor")
            yarn_defaults = (("truncate", True), ("original_max_position_embeddings", d.get(
                "max_position_embeddings") or GptOssConfig.max_position_embeddings), ("beta_fast", 32.0),
                ("beta_slow", 1.0))
            for key, value in yarn_defaults:
                if p.get(key) is None:
                    p[key] = value
                    assumed.append(f"{key}={value!r} (not in {field_name}; transformers' default)")
    else:
        # Neither spelling: transformers' GptOssConfig defaults (YaRN, factor 32).
        p = {"rope_theta": d.get("rope_theta", 150000.0), "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
             "truncate": False, "original_max_position_embeddings": 4096}
        rope_type = "yarn"
        assumed.append("rope_type='yarn', factor=32, beta_fast=32, beta_slow=1, truncate=False, "
                       "original_max_position_embeddings=4096 (no rope_parameters / rope_scaling in config.json; "
                       "transformers' GptOssConfig defaults)")
    known = {"rope_theta", "factor", "beta_fast", "beta_slow", "original_max_position_embeddings", "truncate",
             "attention_factor"}
    unknown = sorted(k for k in p if k not in known)
    if unknown:
        raise ConfigError(f"{source}: unknown rope fields {unknown}")
    kw = {}
    for key, field in (("rope_theta", "theta"), ("factor", "factor"), ("beta_fast", "beta_fast"),
                       ("beta_slow", "beta_slow"), ("original_max_position_embeddings",
                                                    "original_max_position_embeddings"),
                       ("truncate", "truncate"), ("attention_factor", "attention_factor")):
        if p.get(key) is not None:
            kw[field] = p[key]
    for numeric in ("theta", "factor", "beta_fast", "beta_slow", "attention_factor"):
        if numeric in kw:
            if isinstance(kw[numeric], bool) or not isinstance(kw[numeric], (int, float)) or not math.isfinite(
                    kw[numeric]):
                raise ConfigError(f"{source}: rope field {numeric} must be a finite number, got {kw[numeric]!r}")
            kw[numeric] = float(kw[numeric])
    if "truncate" in kw and not isinstance(kw["truncate"], bool):
        raise ConfigError(f"{source}: rope field truncate must be true or false, got {kw['truncate']!r}")
    if rope_type == "default":
        # transformers ignores YaRN keys for plain RoPE (with a warning); so do we
        kw = {"theta": kw["theta"]}
    return RopeConfig(rope_type=rope_type, assumed=tuple(assumed), **kw)


def preset_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "presets", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("no presets folder found (configs/ or gptoss_jax/presets)")


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.json"))


def preset_path(name: str) -> Path:
    path = preset_dir() / f"{name}.json"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; known presets: {preset_names()}")
    return path
