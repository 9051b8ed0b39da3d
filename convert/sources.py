"""Readers of the four source formats. Each turns one layer (or the embeddings / head) of a memory-mapped
safetensors checkpoint into the project's parameter tree (``params.param_specs`` with the int4 QuantSpec).

Before anything is converted, :meth:`Source.problems` compares every tensor's name, shape and dtype (headers only)
with what config.json and the quantization scheme imply, so bad input fails fast with the file and tensor named.

Formats (see docs/CONVERTER.md):

* ``compressed-tensors`` — llm-compressor's pack-quantized W4A16 (group or channel, symmetric or asymmetric).
* ``awq`` — AutoAWQ GEMM (asymmetric, unsigned zeros).
* ``hf`` — unquantized bf16 / fp16 / fp32; quantized here with round-to-nearest.
* ``mxfp4`` — the official release; dequantized exactly, then quantized with round-to-nearest.

Quantized sources keep their exact codes, zero points and scales. Linear weights a quantized source left 16-bit
but our model stores in int4 (e.g. attention in a checkpoint whose ``ignore`` lists ``self_attn``) are quantized
with round-to-nearest at the source's group size and symmetry; metadata lists them under ``requantized``.
"""

from __future__ import annotations

from gptoss_jax.errors import GptOssError

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from convert import packing
from gptoss_jax.config import GptOssConfig
from gptoss_jax.params import QuantSpec
from gptoss_jax.safetensors_io import Checkpoint, require_finite
from pallas_kernels import int4_layout

FORMATS = ("compressed-tensors", "awq", "hf", "mxfp4")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32))
INT_DTYPES = tuple(np.dtype(t) for t in (np.int32, np.int64, np.int16, np.int8, np.uint8))
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


class ConvertError(GptOssError, ValueError):
    """A source checkpoint (or option) the converter cannot handle; the message names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class Expect:
    shape: tuple[int, ...]
    dtypes: tuple[np.dtype, ...]
    what: str  # dtype description for messages


def _float(shape):
    return Expect(tuple(shape), FLOAT_DTYPES, "a float (bf16/fp16/fp32)")


def _int32(shape):
    return Expect(tuple(shape), (np.dtype(np.int32),), "int32")


def _uint8(shape):
    return Expect(tuple(shape), (np.dtype(np.uint8),), "uint8")


def _ints(shape):
    return Expect(tuple(shape), INT_DTYPES, "an integer type")


def check_quantization_config(q: Any, source: str) -> None:
    """ConvertError naming config.json and the field for any quantization_config field of the wrong JSON type (the
    fields the readers below use: compressed-tensors' config_groups / weights, AutoAWQ's bits / group_size ...)."""
    from gptoss_jax.jsoncheck import field

    def f(d, key, kind, prefix="quantization_config.", **kw):
        return field(d, key, source, kind, default=None, nullable=True, error=ConvertError, prefix=prefix, **kw)

    if not isinstance(q, Mapping):
        raise ConvertError(f"{source}: quantization_config must be an object, got {type(q).__name__}")
    for key, kind in (("quant_method", "str"), ("format", "str"), ("config_groups", "object"), ("ignore", "list"),
                      ("bits", "int"), ("w_bit", "int"), ("version", "str"), ("group_size", "int"),
                      ("q_group_size", "int"), ("zero_point", "bool"), ("modules_to_not_convert", "list")):
        f(q, key, kind)
    for gname, group in (q.get("config_groups") or {}).items():
        pre = f"quantization_config.config_groups.{gname}"
        if not isinstance(group, Mapping):
            raise ConvertError(f"{source}: {pre} must be an object, got {json_kind(group)}")
        for key, kind in (("format", "str"), ("weights", "object"), ("input_activations", "object"),
                          ("output_activations", "object"), ("targets", "list")):
            f(group, key, kind, prefix=pre + ".")
        w = group.get("weights") or {}
        for key, kind in (("num_bits", "int"), ("type", "str"), ("symmetric", "bool"), ("strategy", "str"),
                          ("group_size", "int")):
            f(w, key, kind, prefix=pre + ".weights.")
        if not (w.get("actorder") is None or isinstance(w.get("actorder"), (bool, str))):
            raise ConvertError(f"{source}: {pre}.weights.actorder must be a string, a boolean or null")


def json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def detect_format(hf_config: Mapping[str, Any], source: str = "config.json") -> str:
    """The source format from config.json's quantization_config (none: unquantized 'hf'); ConvertError for a
    quantization_config of the wrong shape."""
    q = hf_config.get("quantization_config")
    if not q:
        return "hf"
    check_quantization_config(q, source)
    method = str(q.get("quant_method", "")).lower().replace("_", "-")
    if method in ("compressed-tensors",):
        return "compressed-tensors"
    if method == "awq":
        return "awq"
    if method == "mxfp4":
        return "mxfp4"
    raise ConvertError(f"{source}: quantization_config.quant_method {q.get('quant_method')!r} is not supported "
                       f"(supported: compressed-tensors, awq, mxfp4, or none for unquantized)")


def _owned(a: np.ndarray, dtype) -> np.ndarray:
    """A C-contiguous copy in `dtype` that owns its memory (never a view of the memory-mapped file, whose pages the
    caller then drops from the resident set)."""
    return np.array(a, dtype=dtype, order="C", copy=True)


@dataclasses.dataclass
class Options:
    dtype: str = "bfloat16"  # 16-bit tensors (and RTN scales)
    group_size: int | None = 64  # RTN only (hf, mxfp4); None = per channel
    symmetric: bool = False  # RTN only
    group_size_given: bool = False
    symmetric_given: bool = False
    # Experts converted in parallel (numpy releases the GIL). Each RTN worker holds a few float64 copies of one
    # expert's gate_up (≈0.55 GB measured at gpt-oss-120b size), so 4 workers stay well inside an 8 GB budget.
    threads: int = dataclasses.field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))


class Source:
    """Base reader. Subclasses fill `expected`, `quant` and the weight readers."""

    format = ""

    def __init__(self, ckpt: Checkpoint, config: GptOssConfig, hf_config: Mapping[str, Any], options: Options):
        self.ckpt = ckpt
        self.config = config
        self.hf_config = hf_config
        self.options = options
        self.out_dtype = np.dtype(ml_dtypes.bfloat16) if options.dtype == "bfloat16" else np.dtype(options.dtype)
        self.qconfig = dict(hf_config.get("quantization_config") or {})
        self.requantized: list[str] = []
        self.expected: dict[str, Expect] = {}
        self.quant: QuantSpec = QuantSpec(options.group_size, options.symmetric, options.dtype)
        self.scheme_problems: list[str] = []

    # ---------------------------------------------------------------------------------------------- shared pieces
    def where(self, name: str) -> str:
        try:
            return f"{self.ckpt.file_of(name)}: tensor {name!r}"
        except KeyError:
            return f"{self.ckpt.root}: tensor {name!r}"

    def get(self, name: str) -> np.ndarray:
        if name not in self.ckpt:
            raise ConvertError(f"{self.ckpt.root}: tensor {name!r} is missing")
        return self.ckpt.get(name)

    def release(self, name: str) -> None:
        self.ckpt.release(name)

    def f16(self, name: str, transpose: bool = False) -> np.ndarray:
        """A 16-bit tensor, cast to the output dtype (transposed [out, in] -> [in, out] if asked)."""
        a = self.get(name)
        if transpose:
            a = a.T
        require_finite(a, self.where(name), ConvertError)  # before the cast: fp32 beyond the bf16 range stays found
        with np.errstate(over="ignore"):  # an overflow is reported just below, naming the tensor
            out = _owned(a, self.out_dtype)
        self.release(name)
        if a.dtype != out.dtype:  # a cast can overflow (fp32 -> fp16 beyond 65504)
            require_finite(out, f"{self.where(name)} (cast to {self.out_dtype.name})", ConvertError)
        return out

    def _expect_common(self) -> None:
        c = self.config
        h, e, v = c.hidden_size, c.num_local_experts, c.vocab_size
        ex = self.expected
        ex["model.embed_tokens.weight"] = _float((v, h))
        ex["model.norm.weight"] = _float((h,))
        ex["lm_head.weight"] = _float((v, h))
        for li in range(c.num_hidden_layers):
            p = f"model.layers.{li}."
            ex[p + "input_layernorm.weight"] = _float((h,))
            ex[p + "post_attention_layernorm.weight"] = _float((h,))
            ex[p + "self_attn.sinks"] = _float((c.num_attention_heads,))
            for proj, out in zip(ATTN_PROJ, (c.q_dim, c.kv_dim, c.kv_dim, h)):
                ex[p + f"self_attn.{proj}.bias"] = _float((out,))
            ex[p + "mlp.router.weight"] = _float((e, h))
            ex[p + "mlp.router.bias"] = _float((e,))

    def attn_dims(self, proj: str) -> tuple[int, int]:
        """(out, in) of an attention projection, HF convention."""
        c = self.config
        return {"q_proj": (c.q_dim, c.hidden_size), "k_proj": (c.kv_dim, c.hidden_size),
                "v_proj": (c.kv_dim, c.hidden_size), "o_proj": (c.hidden_size, c.q_dim)}[proj]

    def rtn(self, w_in_out: np.ndarray, name: str) -> dict:
        """Round-to-nearest int4 of a float weight [in, out] with this checkpoint's QuantSpec (packing.rtn_quantize:
        the rule of int4_layout.quantize, bit for bit)."""
        q = self.quant
        try:
            return packing.rtn_quantize(w_in_out, q.group_for(w_in_out.shape[-2]), q.symmetric,
                                        _np_dtype(q.scale_dtype))
        except ValueError as e:
            raise ConvertError(f"{self.where(name)}: {e}") from None

    def dense_linear(self, prefix: str, out: int, inp: int) -> dict:
        """A 16-bit HF linear [out, in] quantized with RTN (recorded as requantized)."""
        name = prefix + ".weight"
        w = self.get(name)
        d = self.rtn(np.asarray(w, np.float64).T, name)
        self.release(name)
        return d

    # --------------------------------------------------------------------------------------------- the interface
    def validate_scheme(self) -> None:
        """Fills scheme_problems from the quantization_config (bits, strategy, group size...)."""

    def problems(self) -> list[str]:
        """Every mismatch between the checkpoint's tensors and what config + scheme imply (headers only)."""
        out = list(self.scheme_problems)
        names = set(self.ckpt.keys())
        missing = sorted(n for n in self.expected if n not in names)
        unexpected = sorted(n for n in names if n not in self.expected)
        if missing:
            out.append(f"{self.ckpt.root}: {len(missing)} tensor(s) missing: {_clip(missing)}")
        if unexpected:
            out.append(f"{self.ckpt.root}: {len(unexpected)} unexpected tensor(s): "
                       f"{_clip([f'{n} (in {self.ckpt.tensor_file[n]})' for n in unexpected])}")
        for name, want in self.expected.items():
            if name not in names:
                continue
            dtype, shape = self.ckpt.info(name)
            if tuple(shape) != want.shape:
                out.append(f"{self.where(name)}: shape {tuple(shape)} but config.json implies {want.shape}")
            elif np.dtype(dtype) not in want.dtypes:
                out.append(f"{self.where(name)}: dtype {np.dtype(dtype).name}, expected {want.what}")
        return out

    def value_problems(self) -> list[str]:
        """Checks on small tensors' values (scales finite, ...); read from disk, cheap."""
        return []

    def read_embed(self) -> dict:
        return {"embedding": self.f16("model.embed_tokens.weight")}

    def read_head(self) -> dict:
        return {"norm": {"scale": self.f16("model.norm.weight")},
                "lm_head": {"weight": self.f16("lm_head.weight", transpose=True)}}

    def read_layer(self, li: int) -> dict:
        p = f"model.layers.{li}."
        attn = {}
        for proj in ATTN_PROJ:
            out, inp = self.attn_dims(proj)
            attn[proj] = {"weight": self.attn_weight(f"{p}self_attn.{proj}", out, inp),
                          "bias": self.f16(f"{p}self_attn.{proj}.bias")}
        attn["sinks"] = self.f16(p + "self_attn.sinks")
        experts = self.read_expert_biases(li)
        return {
            "input_norm": {"scale": self.f16(p + "input_layernorm.weight")},
            "attn": attn,
            "post_attn_norm": {"scale": self.f16(p + "post_attention_layernorm.weight")},
            "mlp": {"router": {"weight": self.f16(p + "mlp.router.weight", transpose=True),
                               "bias": self.f16(p + "mlp.router.bias")},
                    "experts": experts},
        }

    def read_item(self, name: str) -> dict:
        """The tree of one checkpoint item (gptoss_jax.checkpoint.item_names / select_item)."""
        if name == "embed":
            return {"embed": self.read_embed()}
        if name == "head":
            return self.read_head()
        parts = name.split(".")
        if len(parts) == 2:
            return self.read_layer(int(parts[1]))
        return {parts[2]: self.read_expert_weight(int(parts[1]), parts[2])}

    def attn_weight(self, prefix: str, out: int, inp: int) -> dict:
        raise NotImplementedError

    def read_expert_biases(self, li: int) -> dict:
        """{"gate_up_bias" [E, 2I], "down_bias" [E, H]} of layer li."""
        raise NotImplementedError

    def read_expert_weight(self, li: int, which: str) -> dict:
        """The int4 dict of layer li's stacked expert weight `which` ("gate_up" [E, H, 2I] or "down" [E, I, H])."""
        raise NotImplementedError

    def scheme_description(self) -> str:
        q = self.quant
        g = "channel" if q.group_size is None else f"group {q.group_size}"
        return f"int4 {g}, {'symmetric' if q.symmetric else 'asymmetric'}, scales {q.scale_dtype}"

    # ---------------------------------------------------------------------------------- fused-expert assembly
    def _alloc_experts(self, k: int, n: int) -> dict:
        e = self.config.num_local_experts
        g = self.quant.group_for(k)
        d = {"packed": np.empty((e, k // 8, n), np.int32),
             "scales": np.empty((e, k // g, n), _np_dtype(self.quant.scale_dtype))}
        if not self.quant.symmetric:
            d["zeros"] = np.empty((e, k // g, n), np.uint8)
        return d

    def _put_expert(self, dst: dict, e: int, src: dict, columns=slice(None)) -> None:
        for key in dst:
            dst[key][e][:, columns] = src[key]

    def for_each_expert(self, fn: Callable[[int], None]) -> None:
        """Runs fn(expert) for every expert, on `options.threads` threads; the first error is raised."""
        n = self.config.num_local_experts
        if self.options.threads <= 1 or n == 1:
            for e in range(n):
                fn(e)
            return
        with ThreadPoolExecutor(self.options.threads) as pool:
            try:
                for future in [pool.submit(fn, e) for e in range(n)]:
                    future.result()
            except BaseException:
                # Ctrl-C or an error: drop the queued experts so cleanup starts after the running ones only
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _clip(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items) - n} more)" if len(items) > n else "")


# ------------------------------------------------------------------------------------------- unquantized HF (RTN)
class HFSource(Source):
    format = "hf"

    def __init__(self, *args):
        super().__init__(*args)
        c = self.config
        self._expect_common()
        h, i, e = c.hidden_size, c.intermediate_size, c.num_local_experts
        for li in range(c.num_hidden_layers):
            p = f"model.layers.{li}."
            for proj in ATTN_PROJ:
                self.expected[p + f"self_attn.{proj}.weight"] = _float(self.attn_dims(proj))
            self.expected[p + "mlp.experts.gate_up_proj_bias"] = _float((e, 2 * i))
            self.expected[p + "mlp.experts.down_proj_bias"] = _float((e, h))
            self._expect_expert_weights(p)
        self.validate_scheme()
        self.requantized = ["attention projections", "experts"]  # everything int4 is quantized here (RTN)

    def _expect_expert_weights(self, p: str) -> None:
        c = self.config
        h, i, e = c.hidden_size, c.intermediate_size, c.num_local_experts
        self.expected[p + "mlp.experts.gate_up_proj"] = _float((e, h, 2 * i))
        self.expected[p + "mlp.experts.down_proj"] = _float((e, i, h))

    def validate_scheme(self) -> None:
        c = self.config
        g = self.quant.group_size
        for what, k in (("hidden_size", c.hidden_size), ("intermediate_size", c.intermediate_size),
                        ("q_dim (heads·head_dim)", c.q_dim)):
            if k % 8:
                self.scheme_problems.append(f"config.json: {what} {k} is not a multiple of 8 (int4 packing)")
            elif g is not None and k % g:
                self.scheme_problems.append(f"--group-size {g} does not divide the input dim {what} = {k}")

    def attn_weight(self, prefix, out, inp):
        return self.dense_linear(prefix, out, inp)

    def expert_weight_in_out(self, li: int, which: str, e: int) -> tuple[np.ndarray, str]:
        """(float [in, out] weight of expert e, as an owned copy, and its source tensor name); the source pages of
        that expert are dropped from the resident set."""
        name = f"model.layers.{li}.mlp.experts.{which}_proj"
        w = np.array(self.get(name)[e], dtype=np.float64)
        self.ckpt.release(name, e)
        return w, name

    def read_expert_biases(self, li: int) -> dict:
        p = f"model.layers.{li}.mlp.experts."
        return {"gate_up_bias": self.f16(p + "gate_up_proj_bias"), "down_bias": self.f16(p + "down_proj_bias")}

    def read_expert_weight(self, li: int, which: str) -> dict:
        c = self.config
        h, i = c.hidden_size, c.intermediate_size
        k, n = (h, 2 * i) if which == "gate_up" else (i, h)
        dst = self._alloc_experts(k, n)

        def one(e):  # one expert per worker: bounded float64 working set
            w, name = self.expert_weight_in_out(li, which, e)
            self._put_expert(dst, e, self.rtn(w, f"{name}[{e}]"))
        self.for_each_expert(one)
        self.release_expert(li, which)
        return dst

    def release_expert(self, li: int, which: str) -> None:
        self.release(f"model.layers.{li}.mlp.experts.{which}_proj")


# ------------------------------------------------------------------------------------------------------------- MXFP4
class MXFP4Source(HFSource):
    format = "mxfp4"

    def _expect_expert_weights(self, p: str) -> None:
        c = self.config
        h, i, e = c.hidden_size, c.intermediate_size, c.num_local_experts
        for which, (k, n) in (("gate_up_proj", (h, 2 * i)), ("down_proj", (i, h))):
            if k % packing.MXFP4_BLOCK:
                self.scheme_problems.append(f"config.json: MXFP4 needs the input dim of {which} ({k}) to be a "
                                            f"multiple of 32")
            self.expected[p + f"mlp.experts.{which}_blocks"] = _uint8((e, n, k // 32, 16))
            self.expected[p + f"mlp.experts.{which}_scales"] = _uint8((e, n, k // 32))

    def value_problems(self) -> list[str]:
        out = []
        for name in self.expected:
            if name.endswith("_scales") and name in self.ckpt:
                s = self.get(name)
                bad = int(np.count_nonzero(s == packing.E8M0_NAN))
                if bad:
                    out.append(f"{self.where(name)}: {bad} non-finite scale(s) (E8M0 NaN code 255)")
                self.release(name)
        return out

    def expert_weight_in_out(self, li, which, e):
        base = f"model.layers.{li}.mlp.experts.{which}_proj"
        blocks, scales = self.get(base + "_blocks")[e], self.get(base + "_scales")[e]
        if np.any(scales == packing.E8M0_NAN):
            raise ConvertError(f"{self.where(base + '_scales')}: non-finite scale (E8M0 255) in expert {e}")
        w = packing.mxfp4_dequantize(blocks, scales, np.float64)  # [out, in], exact
        self.ckpt.release(base + "_blocks", e)
        return w.T, base + "_blocks"

    def release_expert(self, li, which):
        base = f"model.layers.{li}.mlp.experts.{which}_proj"
        self.release(base + "_blocks")
        self.release(base + "_scales")


# --------------------------------------------------------------------------------------- already-quantized sources
class QuantizedSource(Source):
    """Shared logic of compressed-tensors and AWQ: exact codes, one QuantSpec, per-expert linears re-fused."""

    def __init__(self, *args):
        super().__init__(*args)
        self.scheme_group: int | None = None  # None: channel
        self.scheme_symmetric = False
        self.validate_scheme()
        if self.options.group_size_given or self.options.symmetric_given:
            self.scheme_problems.append(
                f"--group-size / --symmetric apply to hf and mxfp4 sources; this {self.format} checkpoint is "
                f"already quantized ({'channel' if self.scheme_group is None else f'group {self.scheme_group}'}, "
                f"{'symmetric' if self.scheme_symmetric else 'asymmetric'}) and keeps its scheme")
        self._expect_common()
        c = self.config
        h, i, e = c.hidden_size, c.intermediate_size, c.num_local_experts
        self.attn_quantized: dict[str, bool] = {}
        self.fused_gate_up: dict[int, bool] = {}
        scale_dtypes = set()
        for li in range(c.num_hidden_layers):
            p = f"model.layers.{li}."
            for proj in ATTN_PROJ:
                prefix = f"{p}self_attn.{proj}"
                out, inp = self.attn_dims(proj)
                quantized = self.is_quantized(prefix)
                self.attn_quantized[prefix] = quantized
                if quantized:
                    self.expect_linear(prefix, out, inp)
                    scale_dtypes.add(self.scale_dtype_of(prefix))
                else:
                    self.expected[prefix + ".weight"] = _float((out, inp))
            fused = self.is_quantized(f"{p}mlp.experts.0.gate_up_proj") and self.format == "awq"
            self.fused_gate_up[li] = fused
            for ex in range(e):
                ep = f"{p}mlp.experts.{ex}."
                mods = [("gate_up_proj", 2 * i, h)] if fused else [("gate_proj", i, h), ("up_proj", i, h)]
                for mod, out, inp in [*mods, ("down_proj", h, i)]:
                    self.expect_linear(ep + mod, out, inp)
                    self.expected[ep + mod + ".bias"] = _float((out,))
                    scale_dtypes.add(self.scale_dtype_of(ep + mod))
        scale_dtypes.discard(None)
        if len(scale_dtypes) > 1:
            scale_dtype = "float32"  # bf16 and fp16 both embed exactly in fp32
        elif scale_dtypes:
            scale_dtype = scale_dtypes.pop()
        else:
            scale_dtype = "float16"
        self.quant = QuantSpec(self.scheme_group, self.scheme_symmetric, scale_dtype)
        if any(not q for q in self.attn_quantized.values()):
            self.requantized.append("attention projections")
        for what, k in (("hidden_size", h), ("intermediate_size", i), ("q_dim (heads·head_dim)", c.q_dim)):
            if k % 8:
                self.scheme_problems.append(f"config.json: {what} {k} is not a multiple of 8 (int4 packing)")
            elif self.scheme_group is not None and k % self.scheme_group:
                self.scheme_problems.append(f"config.json / quantization_config: group size {self.scheme_group} "
                                            f"does not divide the input dim {what} = {k}")

    def groups(self, inp: int) -> int:
        g = self.scheme_group or inp
        return max(1, inp // g)

    def scale_dtype_of(self, prefix: str) -> str | None:
        name = prefix + "." + self.scale_suffix
        if name not in self.ckpt:
            return None
        dtype, _ = self.ckpt.info(name)
        return np.dtype(dtype).name

    def value_problems(self) -> list[str]:
        out = []
        for name in self.expected:
            if name.endswith("." + self.scale_suffix) and name in self.ckpt:
                s = self.get(name)
                if s.dtype.kind == "f" or s.dtype == np.dtype(ml_dtypes.bfloat16):
                    bad = int(np.count_nonzero(~np.isfinite(s.astype(np.float32))))
                    if bad:
                        out.append(f"{self.where(name)}: {bad} non-finite scale(s)")
                self.release(name)
        return out

    def check_scales(self, name: str, s: np.ndarray) -> None:
        if not np.all(np.isfinite(s.astype(np.float32))):
            raise ConvertError(f"{self.where(name)}: non-finite scales")

    def attn_weight(self, prefix, out, inp):
        if self.attn_quantized[prefix]:
            return self.linear(prefix, out, inp)
        return self.dense_linear(prefix, out, inp)

    def read_expert_biases(self, li: int) -> dict:
        c = self.config
        h, i, e = c.hidden_size, c.intermediate_size, c.num_local_experts
        p = f"model.layers.{li}.mlp.experts."
        gate_up_bias = np.empty((e, 2 * i), self.out_dtype)
        down_bias = np.empty((e, h), self.out_dtype)
        for ex in range(e):
            ep = f"{p}{ex}."
            if self.fused_gate_up[li]:
                gate_up_bias[ex] = self.f16(ep + "gate_up_proj.bias")
            else:
                gate_up_bias[ex, 0::2] = self.f16(ep + "gate_proj.bias")
                gate_up_bias[ex, 1::2] = self.f16(ep + "up_proj.bias")
            down_bias[ex] = self.f16(ep + "down_proj.bias")
        return {"gate_up_bias": gate_up_bias, "down_bias": down_bias}

    def read_expert_weight(self, li: int, which: str) -> dict:
        c = self.config
        h, i, e = c.hidden_size, c.intermediate_size, c.num_local_experts
        p = f"model.layers.{li}.mlp.experts."
        if which == "down":
            down = self._alloc_experts(i, h)
            self.for_each_expert(lambda ex: self._put_expert(down, ex, self.linear(f"{p}{ex}.down_proj", h, i)))
            return down
        gate_up = self._alloc_experts(h, 2 * i)

        def one(ex):
            ep = f"{p}{ex}."
            if self.fused_gate_up[li]:
                self._put_expert(gate_up, ex, self.linear(ep + "gate_up_proj", 2 * i, h))
            else:
                # gate_proj / up_proj are the even / odd columns of the fused gate_up: re-interleave exactly
                self._put_expert(gate_up, ex, self.linear(ep + "gate_proj", i, h), slice(0, None, 2))
                self._put_expert(gate_up, ex, self.linear(ep + "up_proj", i, h), slice(1, None, 2))
        self.for_each_expert(one)
        return gate_up

    def scheme_description(self) -> str:
        return super().scheme_description() + (
            "; attention requantized with RTN" if "attention projections" in self.requantized else "")

    # subclass hooks
    scale_suffix = ""

    def is_quantized(self, prefix: str) -> bool:
        raise NotImplementedError

    def expect_linear(self, prefix: str, out: int, inp: int) -> None:
        raise NotImplementedError

    def linear(self, prefix: str, out: int, inp: int) -> dict:
        raise NotImplementedError


class CompressedTensorsSource(QuantizedSource):
    format = "compressed-tensors"
    scale_suffix = "weight_scale"

    def validate_scheme(self) -> None:
        q = self.qconfig
        fmt = q.get("format")
        groups = q.get("config_groups") or {}
        bad = self.scheme_problems
        if not groups:
            bad.append("config.json: quantization_config has no config_groups")
            return
        schemes = set()
        for gname, group in groups.items():
            fmt_g = group.get("format") or fmt
            if fmt_g != "pack-quantized":
                bad.append(f"config.json: config_groups.{gname}: format {fmt_g!r} is not supported (pack-quantized)")
            w = group.get("weights") or {}
            if not w:
                bad.append(f"config.json: config_groups.{gname} quantizes no weights")
                continue
            if group.get("input_activations"):
                bad.append(f"config.json: config_groups.{gname}: activation quantization is not supported (W4A16)")
            bits, typ, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy")
            if bits != 4:
                bad.append(f"config.json: config_groups.{gname}: unsupported bits {bits} (only 4)")
            if typ != "int":
                bad.append(f"config.json: config_groups.{gname}: unsupported type {typ!r} (only int)")
            if w.get("actorder") not in (None, False, "static"):
                bad.append(f"config.json: config_groups.{gname}: activation ordering {w.get('actorder')!r} "
                           f"(g_idx) is not supported")
            if strategy == "group":
                gs = w.get("group_size")
                if not isinstance(gs, int) or gs <= 0:
                    bad.append(f"config.json: config_groups.{gname}: group strategy needs a positive group_size, "
                               f"got {gs!r}")
                    continue
                schemes.add((gs, bool(w.get("symmetric", True))))
            elif strategy == "channel":
                schemes.add((None, bool(w.get("symmetric", True))))
            else:
                bad.append(f"config.json: config_groups.{gname}: unsupported strategy {strategy!r} "
                           f"(group or channel)")
        if len(schemes) > 1:
            bad.append(f"config.json: config_groups mix schemes {sorted(schemes, key=str)} (group size, symmetric); "
                       f"gptoss-jax keeps one int4 scheme per checkpoint")
        if schemes:
            self.scheme_group, self.scheme_symmetric = sorted(schemes, key=str)[0]

    def is_quantized(self, prefix):
        return prefix + ".weight_packed" in self.ckpt

    def expect_linear(self, prefix, out, inp):
        groups = self.groups(inp)
        self.expected[prefix + ".weight_packed"] = _int32((out, -(-inp // 8)))
        self.expected[prefix + ".weight_scale"] = _float((out, groups))
        self.expected[prefix + ".weight_shape"] = _ints((2,))
        if not self.scheme_symmetric or prefix + ".weight_zero_point" in self.ckpt:
            self.expected[prefix + ".weight_zero_point"] = _int32((-(-out // 8), groups))

    def linear(self, prefix, out, inp):
        shape_name = prefix + ".weight_shape"
        shape = tuple(int(x) for x in self.get(shape_name))
        if shape != (out, inp):
            raise ConvertError(f"{self.where(shape_name)}: weight_shape {shape} but config.json implies "
                               f"{(out, inp)}")
        sname = prefix + ".weight_scale"
        s = np.array(self.get(sname))
        self.check_scales(sname, s)
        g = self.scheme_group or inp
        d = {"packed": packing.ct_packed_to_ours(self.get(prefix + ".weight_packed")),
             "scales": np.ascontiguousarray(s.T).astype(_np_dtype(self.quant.scale_dtype))}
        zname = prefix + ".weight_zero_point"
        if zname in self.ckpt:
            zeros = packing.ct_zero_points(self.get(zname), out)
            if self.scheme_symmetric:
                if np.any(zeros != int4_layout.SYMMETRIC_ZERO):
                    raise ConvertError(f"{self.where(zname)}: nonzero zero points in a symmetric scheme")
            else:
                d["zeros"] = np.ascontiguousarray(zeros.T)
            self.release(zname)
        for n in (prefix + ".weight_packed", sname):
            self.release(n)
        if inp % g:
            raise ConvertError(f"{self.where(prefix + '.weight_packed')}: group size {g} does not divide the input "
                               f"dim {inp}")
        return d


class AWQSource(QuantizedSource):
    format = "awq"
    scale_suffix = "scales"

    def validate_scheme(self) -> None:
        q = self.qconfig
        bad = self.scheme_problems
        bits = q.get("bits", q.get("w_bit"))
        version = str(q.get("version", "gemm")).lower()
        gs = q.get("group_size", q.get("q_group_size"))
        if bits != 4:
            bad.append(f"config.json: quantization_config.bits {bits} is not supported (only 4)")
        if version != "gemm":
            bad.append(f"config.json: AutoAWQ version {version!r} is not supported (gemm)")
        if q.get("zero_point", True) is False:
            bad.append("config.json: AutoAWQ zero_point=false is not supported (GEMM checkpoints carry zeros)")
        if gs in (-1, None, 0):
            self.scheme_group = None
        elif isinstance(gs, int) and gs > 0:
            self.scheme_group = gs
        else:
            bad.append(f"config.json: quantization_config.group_size {gs!r} is not a positive integer or -1")
        self.scheme_symmetric = False

    def is_quantized(self, prefix):
        return prefix + ".qweight" in self.ckpt

    def expect_linear(self, prefix, out, inp):
        groups = self.groups(inp)
        if out % 8:
            self.scheme_problems.append(f"{prefix}: AutoAWQ needs the output dim ({out}) to be a multiple of 8")
        self.expected[prefix + ".qweight"] = _int32((inp, out // 8))
        self.expected[prefix + ".qzeros"] = _int32((groups, out // 8))
        self.expected[prefix + ".scales"] = _float((groups, out))

    def linear(self, prefix, out, inp):
        sname = prefix + ".scales"
        s = np.array(self.get(sname))
        self.check_scales(sname, s)
        d = {"packed": packing.awq_to_ours(self.get(prefix + ".qweight")),
             "scales": s.astype(_np_dtype(self.quant.scale_dtype)),
             "zeros": packing.awq_unpack(self.get(prefix + ".qzeros"))}
        for n in (prefix + ".qweight", prefix + ".qzeros", sname):
            self.release(n)
        return d


SOURCES: dict[str, Callable[..., Source]] = {
    "hf": HFSource, "mxfp4": MXFP4Source, "compressed-tensors": CompressedTensorsSource, "awq": AWQSource,
}


def open_source(ckpt: Checkpoint, config: GptOssConfig, hf_config: Mapping[str, Any], fmt: str,
                options: Options) -> Source:
    if fmt not in SOURCES:
        raise ConvertError(f"unknown format {fmt!r}; choose one of {list(SOURCES)}")
    return SOURCES[fmt](ckpt, config, hf_config, options)


__all__ = ["FORMATS", "ConvertError", "Options", "Source", "detect_format", "open_source"]
