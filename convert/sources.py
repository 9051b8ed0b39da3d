"""Readers of the four source formats. Each turns one layer (or the embeddings / head) of a memory-mapped
safetensors checkpoint into the project's parameter tree (``params.param_specs`` with the int4 QuantSpec).

Before anything is converted, :meth:`Source.problems` compares every tensor's name, shape and dtype (headers only)
with what config.json and the quantization scheme imply, so bad input fails fast with the file and tensor named.

Formats (see docs/CONVERTER.md):

* ``compressed-tensors`` — llm-compressor's pack-quantized W4A16 (group or channel, symmetric or asymmetric).
* ``awq`` — AutoAWQ GEMM (asymmetric, unsigned zeros).
* ``gptq`` — AutoGPTQ / GPTQModel (v1 or v2 zero points, symmetric or asymmetric, act-order g_idx).
* ``auto-round`` — Intel AutoRound in its auto_gptq / gptqmodel / auto_awq packings.
* ``hf`` — unquantized bf16 / fp16 / fp32; quantized here with round-to-nearest.
* ``mxfp4`` — the official release; dequantized exactly, then quantized with round-to-nearest.

Hugging Face module names, paths, transposes and the expert split / fuse rules come from the one name table,
:mod:`gptoss_jax.hf_names`; each reader adds only its format's own tensor suffixes (``.weight_packed``, ``.qweight``,
``_blocks`` ...).

Quantized sources keep their exact codes, zero points and scales; the linears they left 16-bit (e.g. attention in a
release that quantized the experts only) stay 16-bit (QuantSpec.modules). Every other tensor keeps its source dtype
unless --dtype asks for a cast.
"""

from __future__ import annotations

from gptoss_jax.errors import GptOssError

import dataclasses
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from gptoss_jax import hf_names
from gptoss_jax.convert import packing
from gptoss_jax.config import GptOssConfig
from gptoss_jax.hf_names import ATTN_PROJ
from gptoss_jax.params import QuantSpec
from gptoss_jax.safetensors_io import Checkpoint, require_finite
from gptoss_jax.kernels import int4_layout

FORMATS = ("compressed-tensors", "awq", "gptq", "auto-round", "hf", "mxfp4")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32))
INT_DTYPES = tuple(np.dtype(t) for t in (np.int32, np.int64, np.int16, np.int8, np.uint8))


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
    if method == "gptq":
        return "gptq"
    if method in ("auto-round", "autoround", "intel/auto-round"):
        return "auto-round"
    raise ConvertError(f"{source}: quantization_config.quant_method {q.get('quant_method')!r} is not supported "
                       f"(supported: compressed-tensors, awq, gptq, auto-round, mxfp4, or none for unquantized)")


def _owned(a: np.ndarray, dtype) -> np.ndarray:
    """A C-contiguous copy in `dtype` that owns its memory (never a view of the memory-mapped file, whose pages the
    caller then drops from the resident set)."""
    return np.array(a, dtype=dtype, order="C", copy=True)


@dataclasses.dataclass
class Options:
    # None (default): lossless, every non-int4 tensor keeps its source dtype. "bfloat16" / "float16" / "float32":
    # every non-int4 tensor is cast to it (--dtype, an explicit and possibly lossy choice) and RTN scales use it.
    dtype: str | None = None
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
        self.out_dtype = None if options.dtype is None else _np_dtype(options.dtype)
        self.qconfig = dict(hf_config.get("quantization_config") or {})
        self.requantized: list[str] = []
        self.expected: dict[str, Expect] = {}
        self.kept: set[str] = set()  # source tensors stored as they are (16/32-bit), cast only under --dtype
        self.quant: QuantSpec = QuantSpec(options.group_size, options.symmetric, options.dtype or "bfloat16")
        self.scheme_problems: list[str] = []
        self.notes: list[str] = []  # what the conversion assumed or changed, for inspect and the metadata

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
        """A 16/32-bit tensor in its source dtype (lossless), or cast to --dtype when one was given; transposed
        [out, in] -> [in, out] if asked."""
        a = self.get(name)
        if transpose:
            a = a.T
        require_finite(a, self.where(name), ConvertError)  # before the cast: fp32 beyond the bf16 range stays found
        with np.errstate(over="ignore"):  # an overflow is reported just below, naming the tensor
            out = _owned(a, self.out_dtype or a.dtype)
        self.release(name)
        if a.dtype != out.dtype:  # a cast can overflow (fp32 -> fp16 beyond 65504)
            require_finite(out, f"{self.where(name)} (cast to {self.out_dtype.name})", ConvertError)
        return out

    def source_dtype(self, name: str) -> str:
        return np.dtype(self.ckpt.info(name)[0]).name

    def storage_dtype(self) -> str:
        """The checkpoint's main dtype: --dtype, else the source dtype holding most bytes of the kept tensors (the
        others are recorded per tensor)."""
        if self.options.dtype is not None:
            return self.options.dtype
        by_dtype: dict[str, int] = {}
        for name in self.kept:
            if name in self.ckpt:
                dt = self.source_dtype(name)
                by_dtype[dt] = by_dtype.get(dt, 0) + self.ckpt.nbytes_of(name)
        usable = {k: v for k, v in by_dtype.items() if k in ("bfloat16", "float16", "float32")}
        return max(usable, key=lambda k: (usable[k], k)) if usable else "bfloat16"

    def _float_kept(self, name: str, shape) -> None:
        self.expected[name] = _float(shape)
        self.kept.add(name)

    def _expect_common(self) -> None:
        """The tensors every format stores as plain 16/32-bit (embeddings, norms, sinks, biases, router, head)."""
        for t in hf_names.hf_tensors(self.config):
            if not hf_names.is_format_specific(hf_names.entry_of(t.name)):
                self._float_kept(t.name, t.shape)

    def attn_dims(self, proj: str) -> tuple[int, int]:
        """(out, in) of an attention projection, HF convention."""
        return hf_names.attn_dims(self.config, proj)

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

    def _read_global(self, name: str) -> dict:
        """{our path: array} of one global (not per-layer) tensor of the table."""
        e = hf_names.entry_of(name)
        return _nest(e.path, self.f16(name, transpose=e.transpose))

    def read_embed(self) -> dict:
        return self._read_global(hf_names.EMBED_NAME)["embed"]

    def read_head(self) -> dict:
        return {**self._read_global(hf_names.NORM_NAME), **self._read_global(hf_names.LM_HEAD_NAME)}

    def read_layer(self, li: int) -> dict:
        """Layer li's tree in the storage order; attention weights and experts through the format's readers."""
        p = hf_names.layer_prefix(li)
        tree: dict = {}
        for e in hf_names.LAYER_ENTRIES:
            if e.group == "experts":
                continue
            if hf_names.is_format_specific(e):  # an attention projection's weight
                proj = e.path[-2]
                value = self.attn_weight(hf_names.attn_module(li, proj), *self.attn_dims(proj))
            else:
                value = self.f16(p + e.hf, transpose=e.transpose)
            _set(tree, e.path, value)
        _set(tree, ("mlp", "experts"), self.read_expert_biases(li))
        return tree

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

    # ------------------------------------------------------------------------------------------- the plan
    MODULE_GROUPS = ("embed", "attention", "router", "experts", "norms", "lm_head")
    module_group = staticmethod(hf_names.module_group)

    def source_int4_description(self) -> str:
        """How this format stores its 4-bit weights (for the plan)."""
        return f"int4 ({self.format})"

    def int4_action(self, group: str) -> str:
        """What conversion does to a group's quantized source weights."""
        return "int4 codes, zero points and scales copied exactly"

    def module_plan(self) -> list[dict[str, str]]:
        """Per module group (embed, attention, router, experts, norms, lm_head): the source precision and what the
        conversion does to it. Headers only."""
        def short(dt):
            return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dt, dt)

        cast = self.options.dtype
        rows = []
        for group in self.MODULE_GROUPS:
            kept = sorted(n for n in self.kept if self.module_group(n) == group and n in self.ckpt)
            other = [n for n in self.expected if self.module_group(n) == group and n not in self.kept]
            kept_dtypes = sorted({self.source_dtype(n) for n in kept})
            source = []
            action = []
            if other:
                source.append(self.source_int4_description())
                action.append(self.int4_action(group))
            if kept_dtypes:
                extra = "" if not other else " biases, sinks" if group == "attention" else " biases"
                source.append("/".join(short(d) for d in kept_dtypes) + extra)
                what = extra.strip() + " " if extra else ""
                if cast is None:
                    action.append(f"{what}kept as is (lossless)")
                else:
                    narrower = any(np.dtype(_np_dtype(d)).itemsize > _np_dtype(cast).itemsize or (
                        d != cast and _np_dtype(d).itemsize == _np_dtype(cast).itemsize) for d in kept_dtypes)
                    action.append(f"{what}cast to {short(cast)} (--dtype" + (", lossy)" if narrower else ")"))
            rows.append({"group": group, "source": "; ".join(source) or "-", "conversion": "; ".join(action) or "-"})
        return rows

    # ---------------------------------------------------------------------------------- fused-expert assembly
    def _alloc_experts(self, k: int, n: int) -> dict:
        e = self.config.num_local_experts
        g = self.quant.group_for(k)
        d = {"packed": np.empty((e, k // 8, n), np.int32),
             "scales": np.empty((e, k // g, n), _np_dtype(self.quant.scale_dtype))}
        if not self.quant.symmetric:
            d["zeros"] = np.empty((e, k // g, n), np.uint8)
        c = self.config
        if "gate_up" in self.quant.act_order and (k, n) == (c.hidden_size, 2 * c.intermediate_size):
            d["perm"] = np.empty((e, k), np.int32)  # filled by the reader
        return d

    def _put_expert(self, dst: dict, e: int, src: dict, columns=slice(None)) -> None:
        for key in dst:
            if key != "perm":
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


def options_dtype_unset(source: "Source") -> bool:
    return source.options.dtype is None


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _nest(path: tuple, value) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _clip(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items) - n} more)" if len(items) > n else "")


# ------------------------------------------------------------------------------------------- unquantized HF (RTN)
class HFSource(Source):
    format = "hf"

    def __init__(self, *args):
        super().__init__(*args)
        c = self.config
        self._expect_common()
        for li in range(c.num_hidden_layers):
            for proj in ATTN_PROJ:
                self.expected[hf_names.attn_module(li, proj) + ".weight"] = _float(self.attn_dims(proj))
            for which in hf_names.EXPERT_WEIGHTS:
                self._float_kept(hf_names.expert_bias(li, which),
                                 (c.num_local_experts, hf_names.expert_dims(c, which)[1]))
            self._expect_expert_weights(li)
        if options_dtype_unset(self):
            # RTN scales in the source's own weight dtype (bf16 for MXFP4, whose values bf16 holds exactly)
            first = hf_names.expert_param(0, "gate_up")
            sd = self.source_dtype(first) if self.format == "hf" and first in self.ckpt else "bfloat16"
            self.quant = dataclasses.replace(self.quant, scale_dtype=sd if sd in (
                "bfloat16", "float16", "float32") else "bfloat16")
        self.validate_scheme()
        self.requantized = ["attention projections", "experts"]  # everything int4 is quantized here (RTN)

    def _expect_expert_weights(self, li: int) -> None:
        c = self.config
        for which in hf_names.EXPERT_WEIGHTS:  # GptOssExperts stores [E, in, out]
            self.expected[hf_names.expert_param(li, which)] = _float((c.num_local_experts,
                                                                      *hf_names.expert_dims(c, which)))

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

    def source_int4_description(self) -> str:
        first = hf_names.expert_param(0, "gate_up")
        return self.source_dtype(first) if first in self.ckpt else "16-bit"

    def int4_action(self, group: str) -> str:
        q = self.quant
        g = "channel" if q.group_size is None else f"group {q.group_size}"
        return f"round-to-nearest int4 ({g}, {'symmetric' if q.symmetric else 'asymmetric'}; lossy)"

    def expert_weight_in_out(self, li: int, which: str, e: int) -> tuple[np.ndarray, str]:
        """(float [in, out] weight of expert e, as an owned copy, and its source tensor name); the source pages of
        that expert are dropped from the resident set."""
        name = hf_names.expert_param(li, which)
        w = np.array(self.get(name)[e], dtype=np.float64)
        self.ckpt.release(name, e)
        return w, name

    def read_expert_biases(self, li: int) -> dict:
        return {f"{which}_bias": self.f16(hf_names.expert_bias(li, which)) for which in hf_names.EXPERT_WEIGHTS}

    def read_expert_weight(self, li: int, which: str) -> dict:
        dst = self._alloc_experts(*hf_names.expert_dims(self.config, which))

        def one(e):  # one expert per worker: bounded float64 working set
            w, name = self.expert_weight_in_out(li, which, e)
            self._put_expert(dst, e, self.rtn(w, f"{name}[{e}]"))
        self.for_each_expert(one)
        self.release_expert(li, which)
        return dst

    def release_expert(self, li: int, which: str) -> None:
        self.release(hf_names.expert_param(li, which))


# ------------------------------------------------------------------------------------------------------------- MXFP4
class MXFP4Source(HFSource):
    format = "mxfp4"

    def source_int4_description(self) -> str:
        return "MXFP4 (experts)"

    def int4_action(self, group: str) -> str:
        if group == "experts":
            return "dequantized exactly, then " + super().int4_action(group)
        return super().int4_action(group)

    def module_plan(self) -> list[dict[str, str]]:
        rows = super().module_plan()
        for r in rows:  # MXFP4 releases keep attention 16-bit; our int4 attention is RTN of it
            if r["group"] == "attention":
                dts = sorted({self.source_dtype(n) for n in self.expected
                              if self.module_group(n) == "attention" and n in self.ckpt})
                r["source"] = "/".join(dts)
                r["conversion"] = (HFSource.int4_action(self, r["group"]) + " for the projections; biases, sinks "
                                   + ("kept as is (lossless)" if self.options.dtype is None
                                      else f"cast to {self.options.dtype}"))
        return rows

    def _expect_expert_weights(self, li: int) -> None:
        c = self.config
        e = c.num_local_experts
        for which in hf_names.EXPERT_WEIGHTS:  # [E, out, in/32, 16] blocks and [E, out, in/32] scales
            k, n = hf_names.expert_dims(c, which)
            base = hf_names.expert_param(li, which)
            if k % packing.MXFP4_BLOCK:
                self.scheme_problems.append(f"config.json: MXFP4 needs the input dim of {which}_proj ({k}) to be a "
                                            f"multiple of 32")
            self.expected[base + "_blocks"] = _uint8((e, n, k // 32, 16))
            self.expected[base + "_scales"] = _uint8((e, n, k // 32))

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
        base = hf_names.expert_param(li, which)
        blocks, scales = self.get(base + "_blocks")[e], self.get(base + "_scales")[e]
        if np.any(scales == packing.E8M0_NAN):
            raise ConvertError(f"{self.where(base + '_scales')}: non-finite scale (E8M0 255) in expert {e}")
        w = packing.mxfp4_dequantize(blocks, scales, np.float64)  # [out, in], exact
        self.ckpt.release(base + "_blocks", e)
        return w.T, base + "_blocks"

    def release_expert(self, li, which):
        base = hf_names.expert_param(li, which)
        self.release(base + "_blocks")
        self.release(base + "_scales")


# --------------------------------------------------------------------------------------- already-quantized sources
def act_order_perm(g_idx: np.ndarray, group: int, inp: int, where: str) -> np.ndarray | None:
    """The input-row permutation that makes a GPTQ / compressed-tensors ``g_idx`` contiguous, or None when it
    already is (``g_idx[k] == k // group``: no activation reordering).

    ``g_idx[k]`` is the quantization group of input row k; with activation ordering (GPTQ ``desc_act``,
    compressed-tensors ``actorder: group``) the rows of a group are scattered. ``perm = argsort(g_idx)`` (stable)
    puts them in group order, and exactly: W[perm] has contiguous groups of `group` rows, and x @ W = x[..., perm]
    @ W[perm]. Raises ConvertError when g_idx is out of range or does not give every group `group` rows."""
    g_idx = np.asarray(g_idx).astype(np.int64).reshape(-1)
    groups = inp // group
    natural = np.arange(inp) // group
    if g_idx.shape != (inp,) or g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= groups:
        raise ConvertError(f"{where}: g_idx must hold {inp} group indices in [0, {groups})")
    if np.array_equal(g_idx, natural):
        return None
    perm = np.argsort(g_idx, kind="stable")
    if not np.array_equal(g_idx[perm], natural):
        raise ConvertError(f"{where}: g_idx does not give every group exactly {group} input rows")
    return perm


class StackedExpertsView:
    """GPTQModel's restacked save — ``mlp.experts.gate_up_proj.{qweight,qzeros,scales,g_idx}`` [E, ...] and
    ``mlp.experts.gate_up_proj_bias`` [E, N] (likewise ``down_proj``) — seen as the per-expert modules GPTQModel
    loads them back into, ``mlp.experts.gate_up.{i}.{qweight,...,bias}`` (its ``_repair_stacked_experts``). Every
    other tensor passes through. Implements the part of :class:`Checkpoint` the readers use."""

    def __init__(self, ckpt: Checkpoint, num_experts: int):
        self.base, self.root, self.files = ckpt, ckpt.root, ckpt.files
        self.virtual: dict[str, tuple[str, int]] = {}
        self.tensor_file: dict[str, str] = {}
        for name in ckpt.keys():
            stacked = self._stacked(name)
            shape = ckpt.info(name)[1]
            if stacked and len(shape) >= 2 and shape[0] == num_experts:
                li, which, suffix = stacked
                module = {w: m for w, m in zip(hf_names.EXPERT_WEIGHTS, hf_names.EXPERT_LAYOUTS["gptqmodel"])}
                for e in range(num_experts):
                    virtual = f"{hf_names.layer_prefix(li)}{module[which][0].format(e=e)}.{suffix}"
                    self.virtual[virtual] = (name, e)
                    self.tensor_file[virtual] = ckpt.tensor_file[name]
            else:
                self.tensor_file[name] = ckpt.tensor_file[name]

    @staticmethod
    def _stacked(name: str) -> tuple[int, str, str] | None:
        """(layer, our expert weight, tensor suffix) of a restacked ``{expert_param}.{suffix}`` or
        ``{expert_param}_bias`` (suffix "bias"), else None."""
        li = hf_names.layer_of(name)
        if li is None:
            return None
        for which in hf_names.EXPERT_WEIGHTS:
            base = hf_names.expert_param(li, which)
            if name == hf_names.expert_bias(li, which):
                return li, which, "bias"
            if name.startswith(base + ".") and re.fullmatch(r"\w+", name[len(base) + 1:]):
                return li, which, name[len(base) + 1:]
        return None

    def keys(self) -> list[str]:
        return list(self.tensor_file)

    def __contains__(self, name: str) -> bool:
        return name in self.tensor_file

    def file_of(self, name: str):
        return self.root / self.tensor_file[name]

    def info(self, name: str):
        if name in self.virtual:
            dtype, shape = self.base.info(self.virtual[name][0])
            return dtype, tuple(shape[1:])
        return self.base.info(name)

    def get(self, name: str) -> np.ndarray:
        if name in self.virtual:
            stacked, e = self.virtual[name]
            return self.base.get(stacked)[e]
        return self.base.get(name)

    def release(self, name: str, index: int | None = None) -> None:
        if name in self.virtual:
            self.base.release(*self.virtual[name])
        else:
            self.base.release(name, index)

    def nbytes_of(self, name: str) -> int:
        if name in self.virtual:
            stacked, _ = self.virtual[name]
            return self.base.nbytes_of(stacked) // self.base.info(stacked)[1][0]
        return self.base.nbytes_of(name)

    def nbytes(self) -> int:
        return self.base.nbytes()

    def close(self) -> None:
        self.base.close()


def _pair_columns(perm: np.ndarray) -> np.ndarray:
    """Columns of the fused gate_up (gate even, up odd) that feed intermediate unit perm[j], for every j."""
    return np.stack([2 * perm, 2 * perm + 1], axis=-1).reshape(-1)


class QuantizedSource(Source):
    """Shared logic of the 4-bit sources (compressed-tensors, AutoAWQ, GPTQ, AutoRound).

    * Exact codes, zero points and scales under one QuantSpec (group size, symmetry, scale dtype).
    * Mixed precision: an attention projection the source left 16-bit in every layer stays 16-bit (it is left out of
      ``QuantSpec.modules`` and runs through the 16-bit path); one left 16-bit in some layers only is quantized there
      with round-to-nearest at the source's scheme (listed under ``requantized``).
    * Per-expert linears are fused into our [E, K, N] layout; three layouts are read (``expert_layout``):
      ``split`` ``experts.{i}.gate_proj/up_proj/down_proj`` (gate/up = the even/odd columns of gate_up: llm-compressor,
      AutoRound), ``fused`` ``experts.{i}.gate_up_proj/down_proj`` (interleaved), ``gptqmodel``
      ``experts.gate_up.{i}/down.{i}`` (GPTQModel's gpt-oss definition; interleaved; also its restacked save
      ``experts.gate_up_proj.qweight`` [E, ...], read through :class:`StackedExpertsView`).
    * Activation order (a stored g_idx that is not ``k // group``) is applied exactly by permuting K at conversion
      (:func:`act_order_perm`). For an expert's down_proj the permutation of its input (the intermediate units) is
      absorbed into the column order of that expert's gate_up and gate_up bias, at no run-time cost. A linear whose
      input is the residual stream (attention, gate_up) keeps the permutation as "perm" (QuantSpec.act_order) and
      the model gathers its input features in that order (layers.linear / grouped_linear).
    """

    weight_suffix = ""  # the packed tensor's suffix: tells a 4-bit linear from a 16-bit one
    scale_suffix = ""
    g_idx_suffix = ""  # "" for formats without g_idx

    def __init__(self, *args):
        super().__init__(*args)
        if f"{hf_names.expert_param(0, 'gate_up')}.{self.weight_suffix}" in self.ckpt:
            self.ckpt = StackedExpertsView(self.ckpt, self.config.num_local_experts)  # GPTQModel restack
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
        self.expert_layout = self._detect_expert_layout()
        self._down_perms: dict[int, dict[int, np.ndarray]] = {}
        scale_dtypes = set()
        for li in range(c.num_hidden_layers):
            for proj in ATTN_PROJ:
                prefix = hf_names.attn_module(li, proj)
                out, inp = self.attn_dims(proj)
                quantized = self.is_quantized(prefix)
                self.attn_quantized[prefix] = quantized
                if quantized:
                    self.expect_linear(prefix, out, inp)
                    scale_dtypes.add(self.scale_dtype_of(prefix))
                else:
                    self._float_kept(prefix + ".weight", (out, inp))
            for ex in range(e):
                for prefix, out, inp, _, _ in self.expert_linears(li, ex):
                    self.expect_linear(prefix, out, inp)
                    self._float_kept(prefix + ".bias", (out,))
                    scale_dtypes.add(self.scale_dtype_of(prefix))
        scale_dtypes.discard(None)
        if len(scale_dtypes) > 1:
            scale_dtype = "float32"  # bf16 and fp16 both embed exactly in fp32
        elif scale_dtypes:
            scale_dtype = scale_dtypes.pop()
        else:
            scale_dtype = "float16"
        layers = range(c.num_hidden_layers)
        int4_attn = [proj for proj in ATTN_PROJ
                     if any(self.attn_quantized[hf_names.attn_module(li, proj)] for li in layers)]
        partial = [proj for proj in int4_attn
                   if not all(self.attn_quantized[hf_names.attn_module(li, proj)] for li in layers)]
        if partial:
            self.requantized.append(f"attention projections {partial} of the layers that store them 16-bit (RTN)")
        act_order = ()
        self.down_reordered = False
        if not self.scheme_problems:
            try:
                act_order = self.scan_act_order()
            except ConvertError as e:
                self.scheme_problems.append(str(e))
        self.quant = QuantSpec(self.scheme_group, self.scheme_symmetric, scale_dtype,
                               modules=(*int4_attn, "gate_up", "down"), act_order=act_order)
        for what, k in (("hidden_size", h), ("intermediate_size", i), ("q_dim (heads·head_dim)", c.q_dim)):
            if k % 8:
                self.scheme_problems.append(f"config.json: {what} {k} is not a multiple of 8 (int4 packing)")
            elif self.scheme_group is not None and k % self.scheme_group:
                self.scheme_problems.append(f"config.json / quantization_config: group size {self.scheme_group} "
                                            f"does not divide the input dim {what} = {k}")

    # ------------------------------------------------------------------------------------------- expert layouts
    def _detect_expert_layout(self) -> str:
        for layout in ("gptqmodel", "fused"):  # else split (gate_proj / up_proj)
            first = hf_names.expert_linears(self.config, 0, 0, layout)[0][0]
            if f"{first}.{self.weight_suffix}" in self.ckpt:
                return layout
        return "split"

    def expert_linears(self, li: int, ex: int) -> list[tuple[str, int, int, str, slice]]:
        """(source prefix, out, in, our weight "gate_up"/"down", our columns) of expert ex's linears
        (hf_names.expert_linears: gate_proj / up_proj are the even / odd columns of the fused gate_up)."""
        return hf_names.expert_linears(self.config, li, ex, self.expert_layout)

    # ------------------------------------------------------------------------------------------- activation order
    def g_idx_of(self, prefix: str) -> np.ndarray | None:
        name = f"{prefix}.{self.g_idx_suffix}"
        if not self.g_idx_suffix or name not in self.ckpt:
            return None
        g = np.array(self.get(name))
        self.release(name)
        return g

    def input_perm(self, prefix: str, inp: int) -> np.ndarray | None:
        g_idx = self.g_idx_of(prefix)
        if g_idx is None:
            return None
        return act_order_perm(g_idx, self.scheme_group or inp, inp, self.where(f"{prefix}.{self.g_idx_suffix}"))

    def ordered_linear(self, prefix: str, out: int, inp: int) -> tuple[dict, np.ndarray | None]:
        """(int4 dict with the input rows in group order, the permutation applied or None)."""
        d = self.linear(prefix, out, inp)
        perm = self.input_perm(prefix, inp)
        if perm is not None:
            d["packed"] = packing.pack_k(int4_layout.unpack(d["packed"])[perm])
        return d, perm

    def down_perm(self, li: int, ex: int) -> np.ndarray | None:
        """The act-order permutation of expert ex's down_proj input (absorbed into its gate_up columns)."""
        if li not in self._down_perms:
            i = self.config.intermediate_size
            self._down_perms = {li: {}}  # one layer at a time: items are written layer by layer
            for e in range(self.config.num_local_experts):
                prefix = self.expert_linears(li, e)[-1][0]
                perm = self.input_perm(prefix, i)
                if perm is not None:
                    self._down_perms[li][e] = perm
        return self._down_perms[li].get(ex)

    @staticmethod
    def module_of(prefix: str) -> str:
        """Our module (one of params.QUANTIZED_MODULES) of a source linear."""
        if hf_names.module_group(prefix) == "attention":
            return prefix.rsplit(".", 1)[1]
        return hf_names.expert_module_weight(prefix)

    def scan_act_order(self) -> tuple[str, ...]:
        """Modules with a non-trivial g_idx in some layer, other than down_proj (absorbed into gate_up's columns):
        they are stored with an input permutation "perm" (QuantSpec.act_order). Reads every g_idx (small)."""
        found: set[str] = set()
        if not self.g_idx_suffix:
            return ()
        suffix = "." + self.g_idx_suffix
        for name in list(self.expected):
            if not name.endswith(suffix) or name not in self.ckpt:
                continue
            prefix = name[: -len(suffix)]
            module = self.module_of(prefix)
            if module in found or (module == "down" and self.down_reordered):
                continue
            if self.input_perm(prefix, int(self.ckpt.info(name)[1][0])) is not None:
                if module == "down":
                    self.down_reordered = True  # absorbed into gate_up's columns, not stored
                else:
                    found.add(module)
        return tuple(sorted(found))

    # ---------------------------------------------------------------------------------------------- readers
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
        proj = prefix.rsplit(".", 1)[1]
        if not self.quant.quantizes(proj):
            return self.f16(prefix + ".weight", transpose=True)  # 16-bit in the source: kept 16-bit
        if self.attn_quantized[prefix]:
            d, perm = self.ordered_linear(prefix, out, inp)
        else:
            d, perm = self.dense_linear(prefix, out, inp), None
        if proj in self.quant.act_order:
            d["perm"] = (np.arange(inp) if perm is None else perm).astype(np.int32)
        return d

    def read_expert_biases(self, li: int) -> dict:
        c = self.config
        h, i, e = c.hidden_size, c.intermediate_size, c.num_local_experts
        gate_up_bias = down_bias = None
        for ex in range(e):
            for prefix, out, inp, which, cols in self.expert_linears(li, ex):
                b = self.f16(prefix + ".bias")
                if gate_up_bias is None:
                    gate_up_bias = np.empty((e, 2 * i), b.dtype)
                    down_bias = np.empty((e, h), b.dtype)
                (gate_up_bias if which == "gate_up" else down_bias)[ex, cols] = b
            perm = self.down_perm(li, ex)
            if perm is not None:
                gate_up_bias[ex] = gate_up_bias[ex, _pair_columns(perm)]
        return {"gate_up_bias": gate_up_bias, "down_bias": down_bias}

    def read_expert_weight(self, li: int, which: str) -> dict:
        c = self.config
        h, i = c.hidden_size, c.intermediate_size
        k, n = (h, 2 * i) if which == "gate_up" else (i, h)
        dst = self._alloc_experts(k, n)

        def one(ex):
            perms = []
            for prefix, out, inp, w, cols in self.expert_linears(li, ex):
                if w != which:
                    continue
                d, perm = self.ordered_linear(prefix, out, inp)  # a down perm is absorbed by gate_up (down_perm)
                self._put_expert(dst, ex, d, cols)
                perms.append((prefix, np.arange(inp) if perm is None else perm))
            if "perm" in dst:
                first = perms[0][1]
                for prefix, perm in perms[1:]:
                    if not np.array_equal(perm, first):  # (GPTQ derives both from the same input: never seen)
                        raise ConvertError(f"{self.where(prefix + '.' + self.g_idx_suffix)}: its g_idx orders the "
                                           f"input rows differently from {perms[0][0]}; the fused gate_up can hold "
                                           f"one order per expert")
                dst["perm"][ex] = first
            perm = self.down_perm(li, ex) if which == "gate_up" else None
            if perm is not None:
                for key in dst:
                    if key != "perm":
                        dst[key][ex] = dst[key][ex][:, _pair_columns(perm)]
        if which == "gate_up":
            self.down_perm(li, 0)  # read the layer's down g_idx once, before the threads
        self.for_each_expert(one)
        return dst

    def scheme_description(self) -> str:
        q = self.quant
        kept = [m for m in ATTN_PROJ if not q.quantizes(m)]
        return super().scheme_description() + (
            f"; {self.expert_layout} experts" + (f"; {', '.join(kept)} kept 16-bit" if kept else "") +
            ("; some attention requantized with RTN" if self.requantized else ""))

    def source_int4_description(self) -> str:
        g = "channel" if self.scheme_group is None else f"group {self.scheme_group}"
        return f"int4 {self.format} ({g}, {'symmetric' if self.scheme_symmetric else 'asymmetric'})"

    def int4_action(self, group: str) -> str:
        text = super().int4_action(group)
        if group == "experts" and self.expert_layout != "fused":
            text += f", fused from per-expert linears ({self.expert_layout})"
        stored = [m for m in self.quant.act_order if (m in ATTN_PROJ) == (group == "attention")]
        if stored or (group == "experts" and getattr(self, "down_reordered", False)):
            parts = [f"{', '.join(stored)}: input permutation stored"] if stored else []
            if group == "experts" and self.down_reordered:
                parts.append("down: absorbed into gate_up's columns")
            text += f"; act-order g_idx applied exactly by permuting K ({'; '.join(parts)})"
        if group == "attention" and self.requantized:
            text += "; " + "; ".join(self.requantized)
        return text

    # subclass hooks
    def is_quantized(self, prefix: str) -> bool:
        return f"{prefix}.{self.weight_suffix}" in self.ckpt

    def expect_linear(self, prefix: str, out: int, inp: int) -> None:
        raise NotImplementedError

    def linear(self, prefix: str, out: int, inp: int) -> dict:
        """The int4 dict of one linear in our layout ([K/8, N] packed, [K/g, N] scales[, zeros]), input rows in the
        source's order (ordered_linear applies a g_idx)."""
        raise NotImplementedError


class CompressedTensorsSource(QuantizedSource):
    format = "compressed-tensors"
    weight_suffix = "weight_packed"
    scale_suffix = "weight_scale"
    g_idx_suffix = "weight_g_idx"

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
            # actorder (null / "group" / "weight", alias "static") is not read: only a stored weight_g_idx tensor
            # reorders input rows ("weight" ordering changes no stored tensor), and that is handled per linear.
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

    def expect_linear(self, prefix, out, inp):
        groups = self.groups(inp)
        self.expected[prefix + ".weight_packed"] = _int32((out, -(-inp // 8)))
        self.expected[prefix + ".weight_scale"] = _float((out, groups))
        self.expected[prefix + ".weight_shape"] = _ints((2,))
        if not self.scheme_symmetric or prefix + ".weight_zero_point" in self.ckpt:
            self.expected[prefix + ".weight_zero_point"] = _int32((-(-out // 8), groups))
        if prefix + ".weight_g_idx" in self.ckpt:
            self.expected[prefix + ".weight_g_idx"] = _ints((inp,))

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
    weight_suffix = "qweight"
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
        self.scheme_symmetric = False  # GEMM checkpoints store zero points (8 for a symmetric quantizer)

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


class GPTQSource(QuantizedSource):
    """GPTQ (AutoGPTQ / GPTQModel packing), 4-bit, symmetric or asymmetric, optional act-order g_idx.

    Per linear: ``qweight`` int32 [in/8, out] (8 input rows per word, low nibble first: exactly our packing),
    ``qzeros`` int32 [groups, out/8] (8 output columns per word, low nibble first), ``scales`` [groups, out],
    ``g_idx`` int32 [in] (optional), ``bias``. W[in, out] = (q − z)·s. Zero points: ``checkpoint_format`` "gptq"
    (v1, the default) stores z − 1, "gptq_v2" stores z.
    """

    format = "gptq"
    weight_suffix = "qweight"
    scale_suffix = "scales"
    g_idx_suffix = "g_idx"
    zero_offset = 1

    def checkpoint_format(self) -> str:
        q = self.qconfig
        return str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()

    def validate_scheme(self) -> None:
        q = self.qconfig
        bad = self.scheme_problems
        bits, gs = q.get("bits"), q.get("group_size")
        fmt = self.checkpoint_format()
        if bits != 4:
            bad.append(f"config.json: quantization_config.bits {bits} is not supported (only 4)")
        if fmt not in ("gptq", "gptq_v2"):
            bad.append(f"config.json: quantization_config.checkpoint_format {fmt!r} is not supported "
                       f"(gptq, gptq_v2)")
        self.zero_offset = 1 if fmt == "gptq" else 0
        if gs in (-1, None, 0):
            self.scheme_group = None
        elif isinstance(gs, int) and not isinstance(gs, bool) and gs > 0:
            self.scheme_group = gs
        else:
            bad.append(f"config.json: quantization_config.group_size {gs!r} is not a positive integer or -1")
        self.scheme_symmetric = bool(q.get("sym", True))

    def expect_linear(self, prefix, out, inp):
        groups = self.groups(inp)
        if out % 8:
            self.scheme_problems.append(f"{prefix}: GPTQ packs 8 output columns per qzeros word; output dim {out} "
                                        f"is not a multiple of 8")
        self.expected[prefix + ".qweight"] = _int32((inp // 8, out))
        self.expected[prefix + ".qzeros"] = _int32((groups, out // 8))
        self.expected[prefix + ".scales"] = _float((groups, out))
        if prefix + ".g_idx" in self.ckpt:
            self.expected[prefix + ".g_idx"] = _ints((inp,))

    def linear(self, prefix, out, inp):
        sname, zname, wname = prefix + ".scales", prefix + ".qzeros", prefix + ".qweight"
        s = np.array(self.get(sname))
        self.check_scales(sname, s)
        zeros = packing.gptq_zeros(self.get(zname), out, self.zero_offset)
        if np.any(zeros > 15):
            raise ConvertError(f"{self.where(zname)}: zero point 16 (stored nibble 15 in the GPTQ v1 format, which "
                               f"cannot store zero point 0); if this checkpoint is v2, set "
                               f"quantization_config.checkpoint_format to 'gptq_v2'")
        d = {"packed": np.ascontiguousarray(np.asarray(self.get(wname), np.int32)),
             "scales": s.astype(_np_dtype(self.quant.scale_dtype))}
        if self.scheme_symmetric:
            if np.any(zeros != int4_layout.SYMMETRIC_ZERO):
                raise ConvertError(f"{self.where(zname)}: zero points other than {int4_layout.SYMMETRIC_ZERO} in a "
                                   f"symmetric (sym: true) checkpoint; is checkpoint_format "
                                   f"({self.checkpoint_format()!r}) right?")
        else:
            d["zeros"] = zeros.astype(np.uint8)
        for n in (wname, zname, sname):
            self.release(n)
        return d


AUTO_ROUND_PACKINGS = {"auto_round:auto_gptq": "gptq", "auto_round:gptqmodel": "gptq_v2",
                       "auto_round:auto_awq": "awq"}


def _auto_round_packing(qconfig: Mapping[str, Any]) -> str | None:
    return AUTO_ROUND_PACKINGS.get(str(qconfig.get("packing_format", "")).lower())


class AutoRoundGPTQSource(GPTQSource):
    """AutoRound (``quant_method: auto-round``) in a GPTQ packing: ``packing_format`` ``auto_round:auto_gptq``
    (v1 zeros) or ``auto_round:gptqmodel`` (v2 zeros). Config fields: bits, group_size, sym, packing_format."""

    format = "auto-round"

    def checkpoint_format(self) -> str:
        return _auto_round_packing(self.qconfig) or "?"


class AutoRoundAWQSource(AWQSource):
    """AutoRound (``quant_method: auto-round``) with ``packing_format: auto_round:auto_awq`` (AutoAWQ GEMM)."""

    format = "auto-round"


def _open_auto_round(ckpt, config, hf_config, options):
    q = hf_config.get("quantization_config") or {}
    packing_name = _auto_round_packing(q)
    if packing_name is None:
        raise ConvertError(f"config.json: AutoRound packing_format {q.get('packing_format')!r} is not supported "
                           f"(supported: {', '.join(AUTO_ROUND_PACKINGS)})")
    cls = AutoRoundAWQSource if packing_name == "awq" else AutoRoundGPTQSource
    return cls(ckpt, config, hf_config, options)


SOURCES: dict[str, Callable[..., Source]] = {
    "hf": HFSource, "mxfp4": MXFP4Source, "compressed-tensors": CompressedTensorsSource, "awq": AWQSource,
    "gptq": GPTQSource, "auto-round": _open_auto_round,
}


def open_source(ckpt: Checkpoint, config: GptOssConfig, hf_config: Mapping[str, Any], fmt: str,
                options: Options) -> Source:
    if fmt not in SOURCES:
        raise ConvertError(f"unknown format {fmt!r}; choose one of {list(SOURCES)}")
    return SOURCES[fmt](ckpt, config, hf_config, options)


__all__ = ["FORMATS", "ConvertError", "Options", "Source", "detect_format", "open_source"]
