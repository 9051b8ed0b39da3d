"""Writers of source checkpoints in each input format, for tests and benchmarks (needs torch; compressed-tensors for
that format). Tensor and module names come from the one name table, :mod:`gptoss_jax.hf_names`.

They are deliberately independent of the converter's readers: compressed-tensors sources are quantized and packed
with the compressed-tensors package itself (``calculate_qparams`` / ``quantize`` / ``pack_to_int32``), AutoAWQ, GPTQ
and AutoRound sources are packed by loops over the documented bit positions (no GPTQ / AutoRound packer installs on
CPU quickly), MXFP4 sources are random E2M1 bytes and E8M0 scales.

``write_source(config, model, path, fmt, ...)`` writes a source checkpoint from a float32 transformers model and
updates the model *in place* to the weights the source really stores (16-bit tensors rounded to `dtype`, quantized
weights dequantized), so the model is then the exact reference for logits. The unquantized ``hf`` and ``mxfp4``
formats are quantized by the converter (round-to-nearest); for them the reference weights are computed by
:func:`rtn_reference`, a float64 transcription of the documented rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from gptoss_jax import hf_names

AWQ_DOCUMENTED_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


# ----------------------------------------------------------------------------------------------- quantizers (refs)
def rtn_reference(w_in_out: np.ndarray, group: int | None, symmetric: bool, scale_dtype=ml_dtypes.bfloat16):
    """Dequantized float64 [in, out] of the converter's documented round-to-nearest rule (int4_layout.quantize)."""
    w = np.asarray(w_in_out, np.float64)
    k, n = w.shape[-2:]
    g = k if group is None else group
    wg = w.reshape(*w.shape[:-2], k // g, g, n)
    if symmetric:
        s = np.abs(wg).max(axis=-2) / 7.0
        s = np.where(s == 0, 1.0, s).astype(scale_dtype).astype(np.float64)[..., None, :]
        q = np.clip(np.round(wg / s), -8, 7)
        deq = q * s
    else:
        lo = np.minimum(wg.min(axis=-2), 0.0)
        hi = np.maximum(wg.max(axis=-2), 0.0)
        s = (hi - lo) / 15.0
        s = np.where(s == 0, 1.0, s).astype(scale_dtype).astype(np.float64)
        z = np.clip(np.round(-lo / s), 0, 15)[..., None, :]
        s = s[..., None, :]
        q = np.clip(np.round(wg / s) + z, 0, 15)
        deq = (q - z) * s
    return deq.reshape(w.shape)


def ct_quantize_linear(w_out_in: np.ndarray, group: int | None, symmetric: bool, scale_dtype=None):
    """compressed-tensors pack-quantized tensors of one linear [out, in] with the package's own quantizer and packer.
    Returns ({suffix: torch tensor}, dequantized float64 [out, in])."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    scale_dtype = scale_dtype or torch.bfloat16
    args = ct_args(group, symmetric)
    w = torch.as_tensor(np.asarray(w_out_in, np.float32))
    out, inp = w.shape
    g = inp if group is None else group
    wg = w.reshape(out, inp // g, g)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)  # [out, groups]
    scale = scale.to(scale_dtype)
    zp = zp.to(torch.int8)
    q = quantize(w, scale.float(), zp, args, dtype=torch.int8)
    deq = dequantize(q, scale.float(), zp, args, dtype=torch.float32)
    tensors = {"weight_packed": pack_to_int32(q, 4), "weight_scale": scale,
               "weight_shape": torch.tensor([out, inp], dtype=torch.int64)}
    if not symmetric:
        tensors["weight_zero_point"] = pack_to_int32(zp, 4, packed_dim=0).contiguous()
    return tensors, deq.double().numpy()


def ct_args(group: int | None, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs
    if group is None:
        return QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="channel")
    return QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group)


def ct_quantization_config(group: int | None, symmetric: bool, ignore: list[str]) -> dict:
    """config.json's quantization_config as the compressed-tensors package serializes it."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    scheme = QuantizationScheme(targets=["Linear"], weights=ct_args(group, symmetric))
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                             quantization_status="compressed", ignore=ignore)
    d = json.loads(cfg.model_dump_json())
    d["quant_method"] = "compressed-tensors"
    return d


def awq_quantize_linear(w_out_in: np.ndarray, group: int | None):
    """AutoAWQ GEMM tensors of one linear (asymmetric RTN, fp16 scales), packed by a loop over the documented order.
    Returns ({suffix: np array}, dequantized float64 [out, in])."""
    w = np.asarray(w_out_in, np.float64).T  # [in, out]
    inp, out = w.shape
    g = inp if group is None else group
    wg = w.reshape(inp // g, g, out)
    lo, hi = wg.min(axis=1), wg.max(axis=1)
    scales = ((hi - lo) / 15.0).astype(np.float16)
    scales = np.where(scales == 0, np.float16(1.0), scales)
    s = scales.astype(np.float64)
    zeros = np.clip(np.round(-lo / s), 0, 15).astype(np.int64)
    q = np.clip(np.round(wg / s[:, None, :]) + zeros[:, None, :], 0, 15).astype(np.int64)
    deq = ((q - zeros[:, None, :]) * s[:, None, :]).reshape(inp, out)
    q = q.reshape(inp, out)

    def pack(codes):  # [rows, out] -> int32 [rows, out/8]: nibble i holds column 8c + order[i]
        words = np.zeros((codes.shape[0], out // 8), np.int64)
        for i, col in enumerate(AWQ_DOCUMENTED_ORDER):
            words |= codes[:, col::8] << (4 * i)
        return words.astype(np.uint32).view(np.int32)

    return {"qweight": pack(q), "qzeros": pack(zeros), "scales": scales}, deq.T


def gptq_quantize_linear(w_out_in: np.ndarray, group: int | None, symmetric: bool, *, act_order: bool = False,
                         v2: bool = False, rng: np.random.Generator | None = None):
    """GPTQ tensors of one linear by the documented format (AutoGPTQ / GPTQModel), rounding to nearest with GPTQ's
    quantizer rule (asymmetric: scale = (max − min)/15 with min ≤ 0 ≤ max, zero = round(−min/scale); symmetric:
    scale = 2·absmax/15, zero = 8), fp16 scales.

    Packing, written out here by loops over the documented bit positions (independent of the converter):
    ``qweight`` int32 [in/8, out], input row 8r + j at bits 4j of word r; ``qzeros`` int32 [groups, out/8], column
    8c + j at bits 4j of word c, storing z − 1 (v1 "gptq") or z ("gptq_v2"); ``scales`` fp16 [groups, out];
    ``g_idx`` int32 [in]. act_order: the groups are formed over a random permutation of the input rows (as GPTQ's
    desc_act does with its Hessian order), so g_idx is a scattered assignment. Returns (tensors, dequantized float64
    [out, in])."""
    w = np.asarray(w_out_in, np.float64).T  # [in, out]
    inp, out = w.shape
    g = inp if group is None else group
    if act_order:
        order = (rng or np.random.default_rng(0)).permutation(inp)
        g_idx = np.empty(inp, np.int64)
        g_idx[order] = np.arange(inp) // g
    else:
        g_idx = np.arange(inp) // g
    groups = inp // g
    scales = np.empty((groups, out), np.float16)
    zeros = np.empty((groups, out), np.int64)
    for gi in range(groups):
        rows = w[g_idx == gi]
        lo, hi = np.minimum(rows.min(axis=0), 0), np.maximum(rows.max(axis=0), 0)
        if symmetric:
            s = 2 * np.maximum(-lo, hi) / 15
            z = np.full(out, 8)
        else:
            s = (hi - lo) / 15
        s = np.where(s == 0, 1.0, s).astype(np.float16)
        if not symmetric:
            z = np.clip(np.round(-lo / s.astype(np.float64)), 0, 15).astype(np.int64)
        scales[gi], zeros[gi] = s, z
    s_rows, z_rows = scales.astype(np.float64)[g_idx], zeros[g_idx]
    q = np.clip(np.round(w / s_rows) + z_rows, 0, 15).astype(np.int64)
    deq = (q - z_rows) * s_rows
    qweight = np.zeros((inp // 8, out), np.int64)
    for j in range(8):
        qweight |= q[j::8] << (4 * j)
    stored = (zeros - (0 if v2 else 1)) & 0xF
    qzeros = np.zeros((groups, out // 8), np.int64)
    for j in range(8):
        qzeros |= stored[:, j::8] << (4 * j)
    tensors = {"qweight": qweight.astype(np.uint32).view(np.int32), "qzeros": qzeros.astype(np.uint32).view(np.int32),
               "scales": scales, "g_idx": g_idx.astype(np.int32)}
    return tensors, deq.T


def mxfp4_random(rng: np.random.Generator, lead: tuple, out: int, inp: int):
    """Random MXFP4 blocks uint8 [*lead, out, in/32, 16] and E8M0 scales [*lead, out, in/32] (exponents near 2^-5)."""
    blocks = rng.integers(0, 256, size=(*lead, out, inp // 32, 16), dtype=np.uint8)
    scales = rng.integers(127 - 8, 127 - 3, size=(*lead, out, inp // 32), dtype=np.uint8)
    return blocks, scales


def mxfp4_reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float64 [*lead, out, in] by the documented rule: table[nibble] · 2^(scale − 127), low nibble first."""
    table = np.array(E2M1, np.float64)
    lo, hi = table[blocks & 0xF], table[blocks >> 4]
    vals = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    vals = vals * np.power(2.0, scales.astype(np.float64) - 127.0)[..., None]
    return vals.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


# ---------------------------------------------------------------------------------------------------- the writer
def _round_(model, torch_dtype) -> None:
    import torch
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch_dtype).float())


def _module(tensor_name: str) -> str:
    """The module of a `.weight` tensor (quantization configs list modules, not tensors)."""
    return tensor_name.removesuffix(".weight")


TORCH_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def _save_tensors(tensors: dict, path: Path, max_shard_bytes: int | None) -> None:
    import torch

    from gptoss_jax.safetensors_io import write_sharded
    write_sharded(((k, v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)))
                   for k, v in tensors.items()), path, max_shard_bytes=max_shard_bytes)


def write_source(config, model, path, fmt: str, *, group: int | None = 64, symmetric: bool = False,
                 quantize_attention: bool = True, fused_gate_up: bool = False, max_shard_bytes: int | None = None,
                 seed: int = 0, tokenizer: bool = True, dtype: str = "bfloat16", act_order: bool | tuple = False,
                 packing: str = "auto_round:auto_gptq", gptq_v2: bool = False,
                 stacked: bool = False) -> dict[str, Any]:
    """Writes `model` (float32 transformers GptOssForCausalLM of `config`) as a `fmt` source checkpoint at `path`
    and sets the model's weights to what the converted checkpoint must hold (see module docstring).

    group / symmetric: the source scheme (compressed-tensors, awq) or the RTN scheme the test will ask the
    converter for (hf, mxfp4). dtype: the dtype of every unquantized tensor ("bfloat16", "float16", "float32").
    quantize_attention=False leaves attention 16-bit in a quantized source (experts-only releases): the converter
    keeps it as it is. gptq: GPTQModel's gpt-oss layout (experts.gate_up.{i} interleaved, experts.down.{i}),
    act_order / gptq_v2 as in gptq_quantize_linear; stacked: GPTQModel's restacked save (experts.gate_up_proj.qweight
    [E, ...], experts.gate_up_proj_bias [E, N]); auto-round: AutoRound's (experts.{i}.gate_proj = even columns,
    up_proj = odd columns, down_proj) in `packing` (auto_round:auto_gptq / auto_round:gptqmodel /
    auto_round:auto_awq). Returns the config.json dict written."""
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tdt = getattr(torch, TORCH_DTYPES[dtype])
    _round_(model, tdt)
    c = config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors: dict[str, Any] = {}
    hf = c.to_hf_dict()

    def keep16(name):
        tensors[name] = sd[name].to(tdt)

    quantized_src = fmt in ("compressed-tensors", "awq", "gptq", "auto-round")
    # the converter's RTN scales: the source weights' dtype for hf, bf16 for mxfp4
    rtn_scale_dtype = np.dtype(ml_dtypes.bfloat16) if fmt == "mxfp4" or dtype == "bfloat16" else np.dtype(dtype)

    act_modules = (*hf_names.ATTN_PROJ, *hf_names.EXPERT_WEIGHTS) if act_order is True else (
        tuple(act_order or ()))

    def quantize_linear(w_out_in, module=""):
        if fmt == "compressed-tensors":
            return ct_quantize_linear(w_out_in, group, symmetric)
        if fmt == "awq" or (fmt == "auto-round" and packing == "auto_round:auto_awq"):
            return awq_quantize_linear(w_out_in, group)
        v2 = gptq_v2 if fmt == "gptq" else packing == "auto_round:gptqmodel"
        return gptq_quantize_linear(w_out_in, group, symmetric, act_order=module in act_modules, v2=v2, rng=rng)

    new_sd: dict[str, torch.Tensor] = {}
    for name in sd:
        entry = hf_names.entry_of(name)
        if entry.group == "experts":
            continue
        is_attn_w = hf_names.is_format_specific(entry)  # an attention projection's weight
        if is_attn_w and quantized_src and quantize_attention:
            prefix = name[: -len(".weight")]
            ts, deq = quantize_linear(sd[name].double().numpy(), prefix.rsplit(".", 1)[1])
            for suffix, t in ts.items():
                tensors[f"{prefix}.{suffix}"] = t
            new_sd[name] = torch.from_numpy(deq).float()
        elif is_attn_w and not quantized_src:
            keep16(name)
            new_sd[name] = torch.from_numpy(rtn_reference(sd[name].double().numpy().T, group, symmetric,
                                                          rtn_scale_dtype).T).float()
        else:  # (also 16-bit attention of a quantized source: the converter keeps it exactly)
            keep16(name)

    e = c.num_local_experts
    layout = "gptqmodel" if fmt == "gptq" else "fused" if fused_gate_up else "split"
    for li in range(c.num_hidden_layers):
        gu_name, down_name = (hf_names.expert_param(li, which) for which in hf_names.EXPERT_WEIGHTS)
        gate_up = sd[gu_name].double().numpy()  # [E, H, 2I]
        down = sd[down_name].double().numpy()  # [E, I, H]
        weights = {"gate_up": gate_up, "down": down}
        biases = {which: sd[hf_names.expert_bias(li, which)] for which in hf_names.EXPERT_WEIGHTS}
        new_gu, new_down = np.empty_like(gate_up), np.empty_like(down)
        if fmt == "hf":
            tensors[gu_name] = sd[gu_name].to(tdt)
            tensors[down_name] = sd[down_name].to(tdt)
            new_gu = rtn_reference(gate_up, group, symmetric, rtn_scale_dtype)
            new_down = rtn_reference(down, group, symmetric, rtn_scale_dtype)
        elif fmt == "mxfp4":
            for which, name in zip(hf_names.EXPERT_WEIGHTS, (gu_name, down_name)):
                k, n = hf_names.expert_dims(c, which)
                blocks, scales = mxfp4_random(rng, (e,), n, k)
                tensors[name + "_blocks"] = blocks
                tensors[name + "_scales"] = scales
                exact = np.swapaxes(mxfp4_reference(blocks, scales), -1, -2)  # [E, in, out]
                ref = rtn_reference(exact, group, symmetric)
                if which == "gate_up":
                    new_gu = ref
                else:
                    new_down = ref
        else:  # per-expert linears in the quantizer's layout (GPTQModel: gate_up.{i} / down.{i}; AutoRound and
            # llm-compressor: {i}.gate_proj / up_proj = even / odd columns, down_proj; or {i}.gate_up_proj)
            new = {"gate_up": new_gu, "down": new_down}
            for ex in range(e):
                for prefix, _, _, which, cols in hf_names.expert_linears(c, li, ex, layout):
                    ts, deq = quantize_linear(weights[which][ex][:, cols].T, which)
                    for suffix, t in ts.items():
                        tensors[f"{prefix}.{suffix}"] = t
                    tensors[f"{prefix}.bias"] = biases[which][ex][cols].to(tdt)
                    new[which][ex][:, cols] = deq.T
        if fmt == "gptq" and stacked:  # GPTQModel restack: gate_up.{i}.S -> gate_up_proj.S [E, ...]
            for which, name in zip(hf_names.EXPERT_WEIGHTS, (gu_name, down_name)):
                modules = [[m for m, _, _, w, _ in hf_names.expert_linears(c, li, ex, layout) if w == which][0]
                           for ex in range(e)]
                for suffix in ("qweight", "qzeros", "scales", "g_idx"):
                    tensors[f"{name}.{suffix}"] = np.stack([tensors.pop(f"{m}.{suffix}") for m in modules])
                tensors[hf_names.expert_bias(li, which)] = torch.stack([tensors.pop(f"{m}.bias") for m in modules])
        if fmt in ("hf", "mxfp4"):
            for which in hf_names.EXPERT_WEIGHTS:
                tensors[hf_names.expert_bias(li, which)] = biases[which].to(tdt)
        new_sd[gu_name] = torch.from_numpy(new_gu).float()
        new_sd[down_name] = torch.from_numpy(new_down).float()

    model.load_state_dict({**sd, **new_sd})

    ignore = [_module(hf_names.LM_HEAD_NAME)] + [_module(hf_names.router_weight(li))
                                                 for li in range(c.num_hidden_layers)]
    if not quantize_attention:
        ignore.append("re:.*self_attn.*")
    if fmt == "compressed-tensors":
        hf["quantization_config"] = ct_quantization_config(group, symmetric, ignore)
    elif fmt == "awq":
        hf["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": -1 if group is None else group,
                                     "zero_point": True, "version": "gemm", "modules_to_not_convert": ignore}
    elif fmt == "gptq":
        hf["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": -1 if group is None else group,
                                     "sym": symmetric, "desc_act": bool(act_order),
                                     "checkpoint_format": "gptq_v2" if gptq_v2 else "gptq",
                                     "meta": {"quantizer": ["gptqmodel:test-writer"]}}
    elif fmt == "auto-round":
        hf["quantization_config"] = {"quant_method": "auto-round", "bits": 4, "data_type": "int",
                                     "group_size": -1 if group is None else group, "sym": symmetric,
                                     "packing_format": packing, "autoround_version": "test-writer",
                                     "block_name_to_quantize": hf_names.LAYER_PREFIX.rstrip(".")}
    elif fmt == "mxfp4":
        # as the official release writes it: model.layers.*.self_attn, model.layers.*.mlp.router, model.embed_tokens,
        # lm_head
        hf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            _module(hf_names.attn_module("*", "q_proj")).rsplit(".", 1)[0], _module(hf_names.router_weight("*")),
            _module(hf_names.EMBED_NAME), _module(hf_names.LM_HEAD_NAME)]}
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    if tokenizer:
        (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192}))
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": hf["eos_token_id"]}))
    _save_tensors(tensors, path, max_shard_bytes)
    return hf


def synthetic_source(config, path, *, fmt: str = "compressed-tensors", group: int | None = 64,
                     symmetric: bool = True, seed: int = 0) -> None:
    """A random source checkpoint of any size without building a model (benchmarks): random codes / values, one
    shard per layer written in turn, so the writer never holds more than one layer. Values are random but valid
    (finite scales, in-range codes), so every format converts."""
    import torch
    from safetensors.torch import save_file

    if fmt not in ("compressed-tensors", "awq", "hf", "mxfp4"):
        raise ValueError(f"unknown format {fmt!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    c = config
    e = c.num_local_experts

    def f16(*shape):
        return torch.from_numpy(rng.standard_normal(shape, np.float32) * 0.02).to(torch.bfloat16)

    def words(*shape):
        return torch.from_numpy(rng.integers(0, 2**32, shape, dtype=np.uint32).view(np.int32))

    def scales(*shape, dtype=torch.bfloat16):
        return torch.from_numpy(rng.uniform(1e-3, 1e-2, shape).astype(np.float32)).to(dtype)

    def linear(prefix, out, inp, t):
        g = inp if group is None else group
        if fmt == "compressed-tensors":
            t[prefix + ".weight_packed"] = words(out, inp // 8)
            t[prefix + ".weight_scale"] = scales(out, inp // g)
            t[prefix + ".weight_shape"] = torch.tensor([out, inp])
            if not symmetric:
                t[prefix + ".weight_zero_point"] = words(-(-out // 8), inp // g)
        elif fmt == "awq":
            t[prefix + ".qweight"] = words(inp, out // 8)
            t[prefix + ".qzeros"] = words(inp // g, out // 8)
            t[prefix + ".scales"] = scales(inp // g, out, dtype=torch.float16)
        else:
            t[prefix + ".weight"] = f16(out, inp)

    weight_map = {}

    def flush(t, name):
        save_file(t, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})

    def experts(li, t):
        if fmt in ("compressed-tensors", "awq"):  # per-expert linears (llm-compressor / AutoAWQ: gate_proj, up_proj)
            for ex in range(e):
                for prefix, out, inp, _, _ in hf_names.expert_linears(c, li, ex, "split"):
                    linear(prefix, out, inp, t)
                    t[f"{prefix}.bias"] = f16(out)
            return
        for which in hf_names.EXPERT_WEIGHTS:
            k, n = hf_names.expert_dims(c, which)
            name = hf_names.expert_param(li, which)
            if fmt == "hf":
                t[name] = f16(e, k, n)
            else:
                t[name + "_blocks"] = torch.from_numpy(rng.integers(0, 256, (e, n, k // 32, 16), dtype=np.uint8))
                t[name + "_scales"] = torch.from_numpy(rng.integers(118, 124, (e, n, k // 32), dtype=np.uint8))
            t[hf_names.expert_bias(li, which)] = f16(e, n)

    n_files = c.num_hidden_layers + 1
    tensors = list(hf_names.hf_tensors(c))
    flush({t.name: f16(*t.shape) for t in tensors if t.path[0] != "layers"},
          f"model-00001-of-{n_files:05d}.safetensors")
    for li in range(c.num_hidden_layers):
        t = {}
        for ht in tensors:
            if ht.path[:2] != ("layers", li) or ht.group == "experts":
                continue
            if hf_names.is_format_specific(hf_names.entry_of(ht.name)):  # an attention projection's weight
                linear(ht.name.removesuffix(".weight"), *ht.shape, t)
            else:
                t[ht.name] = f16(*ht.shape)
        experts(li, t)
        flush(t, f"model-{li + 2:05d}-of-{n_files:05d}.safetensors")
        del t
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf = c.to_hf_dict()
    ignore = [_module(hf_names.LM_HEAD_NAME), "re:.*mlp.router$"]
    if fmt == "compressed-tensors":
        hf["quantization_config"] = ct_quantization_config(group, symmetric, ignore)
    elif fmt == "awq":
        hf["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": -1 if group is None else group,
                                     "zero_point": True, "version": "gemm", "modules_to_not_convert": ignore}
    elif fmt == "mxfp4":
        hf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["self_attn", "router",
                                                                                        "embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(hf, indent=2))
