"""JAX-native AWQ calibration for 16-bit (bf16 / fp16 / fp32) and MXFP4 gpt-oss sources: `gptoss-convert --awq`.

Activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", arXiv:2306.00978; the reference implementations are mit-han-lab/llm-awq and AutoAWQ's
``auto_scale`` / ``auto_clip``). Per layer, streamed (one layer's weights and one expert's float64 copy at a time):

1. The calibration tokens' hidden states enter the layer (the unquantized model's activations, as AutoAWQ).
2. **Scale search.** For a group of linears that share an input ``x`` and a foldable preceding op, per input
   channel ``s = mean_t|x|^alpha`` (normalised by ``sqrt(max s · min s)``) for ``alpha`` on a grid of ``n_grid``
   points in [0, 1); the weight ``diag(s)·W`` is quantized (RTN, the converter's rule), the input divided by ``s``,
   and the ``alpha`` with the smallest mean squared error of the block output against the unquantized block wins.
   ``alpha = 0`` is plain RTN, so the search never picks something worse than RTN on its own loss.
   * q/k/v: input RMSNorm scale (``input_norm.scale /= s``), loss on the attention block output (o_proj fp).
   * v → o: v_proj's output columns and bias ``/= s``, o_proj's input rows ``*= s``. GQA: o_proj's input channel
     ``(h, d)`` reads v channel ``(h // G, d)``, so ``s`` is shared by the G query heads of a KV head (the mean of
     their statistics). Loss on o_proj's output.
   * router + every expert's gate_up: the post-attention RMSNorm scale (``post_attn_norm.scale /= s``). That norm
     also feeds the router, which stays 16-bit: its weight rows are multiplied by ``s`` (compensated; exact in
     exact arithmetic). One ``s`` for all experts (they share the norm); loss = Σ over experts of the routing-weighted
     squared error of each expert's output on the tokens routed to it (gate_up int4, down fp).
   * down_proj: **no scale**. Its input is the clamped SwiGLU output ``(clip(up) + 1)·min(gate, 7)·σ(1.702·min(gate,
     7))``; a per-channel scale cannot pass through the clamps and the ``+ 1``, so no preceding op folds it exactly,
     and an explicit per-channel input scale would need a new model parameter. Measured in docs/CONVERTER.md.
3. **Clip search** (``auto_clip``): per output column and group, the max ``|w|`` is shrunk by ``1 − i/n_grid`` for
   ``i < max_shrink·n_grid``; the one whose quantized group-partial outputs ``x_g·Q(clip(w_g))`` are closest to the
   unquantized ``x_g·w_g`` (mean over ≤ 512 calibration tokens) wins. For v, o, every expert's gate_up and down (on
   the tokens routed to it); not for q and k (AutoAWQ skips them: attention logits are sensitive to clipping).
4. The folded, clipped weights go through the converter's RTN (``packing.rtn_quantize``) into our int4 layout.

Exactness of the folding: in exact arithmetic the folded unquantized layer computes the same function (tested in
fp32 ≤ 1e-5). When a folded tensor (norm scales, router weight, v bias) is stored in 16 bits, every ``s`` is rounded
to a power of two first, so ``g / s``, ``W_router · s`` and ``b_v / s`` stay exact in bf16 / fp16 too.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import GptOssConfig
from gptoss_jax.convert.sources import ATTN_PROJ, ConvertError, _np_dtype
from gptoss_jax.kernels.attention import attention
from gptoss_jax.params import QuantSpec
from gptoss_jax.rope import apply_rope, rope_cos_sin, yarn_inv_freq

BUILTIN_CALIB = Path(__file__).with_name("calib_builtin.txt")
CLIP_TOKENS = 512  # AutoAWQ's n_sample_token for auto_clip
_CLIP_CHUNK_ELEMENTS = 1 << 23  # [tokens, groups, columns] floats per clip-search step


@dataclasses.dataclass
class AWQOptions:
    """Options of `gptoss-convert --awq`.

    calib: "builtin" (the text shipped with the package, ``calib_builtin.txt``) or a UTF-8 text file, tokenized with
    the source's tokenizer.json. samples × seq_len calibration tokens (contiguous, evenly spaced chunks of the text).
    n_grid: points of the alpha grid; max_shrink: the largest clip shrink (AutoAWQ: 20 and 0.5). clip: run the clip
    search.
    """
    calib: str = "builtin"
    samples: int = 32
    seq_len: int = 256
    n_grid: int = 20
    max_shrink: float = 0.5
    clip: bool = True

    def check(self) -> None:
        for name in ("samples", "seq_len", "n_grid"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConvertError(f"AWQ option {name} must be a positive integer, got {v!r}")
        if self.seq_len < 2:
            raise ConvertError(f"AWQ option seq_len must be at least 2, got {self.seq_len}")
        if not 0 <= self.max_shrink < 1:
            raise ConvertError(f"AWQ option max_shrink must be in [0, 1), got {self.max_shrink!r}")


# ------------------------------------------------------------------------------------------------- calibration data
def calibration_text(calib: str) -> tuple[str, str]:
    """(text, where) of --calib: "builtin" or a file path. Raises ConvertError naming the file."""
    path = BUILTIN_CALIB if calib == "builtin" else Path(calib).expanduser()
    if not path.is_file():
        raise ConvertError(f"--calib {calib}: no such file (give a UTF-8 text file or 'builtin')")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConvertError(f"--calib {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConvertError(f"--calib {path}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise ConvertError(f"--calib {path}: the file is empty")
    return text, str(path)


def calibration_ids(opts: AWQOptions, src: Path, config: GptOssConfig) -> tuple[np.ndarray, dict]:
    """Token ids [B, T] of the calibration text (B ≤ opts.samples, T ≤ opts.seq_len) and a description for the
    metadata. The text is tokenized with SRC/tokenizer.json (no special tokens added); B chunks of T contiguous
    tokens are taken evenly spaced over it. Raises ConvertError (no tokenizer, ids outside the vocabulary, too little
    text)."""
    text, where = calibration_text(opts.calib)
    tok_path = Path(src) / "tokenizer.json"
    if not tok_path.is_file():
        raise ConvertError(f"{tok_path}: missing; --awq tokenizes the calibration text with the source's tokenizer")
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ConvertError(f"{tok_path}: cannot load the tokenizer ({' '.join(str(e).split())})") from None
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int64)
    if ids.size and int(ids.max()) >= config.vocab_size:
        raise ConvertError(f"{tok_path}: token id {int(ids.max())} of the calibration text is outside the model's "
                           f"vocab_size {config.vocab_size}")
    t = min(opts.seq_len, ids.size)
    if t < 2:
        raise ConvertError(f"--calib {where}: {ids.size} token(s); calibration needs at least 2")
    b = max(1, min(opts.samples, ids.size // t))
    starts = np.linspace(0, ids.size - t, b).astype(np.int64)
    batch = np.stack([ids[s:s + t] for s in starts]).astype(np.int32)
    desc = {"calib": "builtin" if opts.calib == "builtin" else where, "samples": int(b), "seq_len": int(t),
            "tokens": int(b * t), "text_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return batch, desc


# ------------------------------------------------------------------------------------------------- numeric kernels
@dataclasses.dataclass(frozen=True)
class _Q:
    """The int4 scheme for a K: group (K for per channel), symmetric, scale dtype name (static under jit)."""
    group: int
    symmetric: bool
    scale_dtype: str


def _qscheme(quant: QuantSpec, k: int) -> _Q:
    return _Q(quant.group_for(k), quant.symmetric, quant.scale_dtype)


def fake_quant(w, q: _Q):
    """Quantize-dequantize w [K, N] (float32) along K with the converter's RTN rule (packing.rtn_quantize, scales
    rounded to the scale dtype first), in jnp."""
    k, n = w.shape
    wg = w.reshape(k // q.group, q.group, n)
    if q.symmetric:
        scale = jnp.max(jnp.abs(wg), axis=1) / 7.0
    else:
        lo = jnp.minimum(jnp.min(wg, axis=1), 0.0)
        hi = jnp.maximum(jnp.max(wg, axis=1), 0.0)
        scale = (hi - lo) / 15.0
    scale = jnp.where(scale == 0, 1.0, scale).astype(jnp.dtype(_np_dtype(q.scale_dtype))).astype(jnp.float32)
    s = scale[:, None, :]
    if q.symmetric:
        deq = jnp.clip(jnp.round(wg / s), -8, 7) * s
    else:
        z = jnp.clip(jnp.round(-lo / scale), 0, 15)[:, None, :]
        deq = (jnp.clip(jnp.round(wg / s) + z, 0, 15) - z) * s
    return deq.reshape(k, n)


def _hi(a, b):
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)


def _rms(x, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def awq_scales(x_mean, alpha, pow2: bool):
    """s = x_mean^alpha / sqrt(max · min) (AutoAWQ), rounded to a power of two when pow2 (exact 16-bit folding)."""
    s = jnp.maximum(x_mean, 1e-4) ** alpha
    s = jnp.maximum(s / jnp.sqrt(jnp.max(s) * jnp.min(s)), 1e-4)
    return jnp.exp2(jnp.round(jnp.log2(s))) if pow2 else s


def swiglu(y, alpha, limit):
    """gpt-oss clamped SwiGLU of gate_up output y [..., 2I] (gate even, up odd columns)."""
    gate = jnp.minimum(y[..., 0::2], limit)
    up = jnp.clip(y[..., 1::2], -limit, limit)
    return (up + 1.0) * gate * jax.nn.sigmoid(alpha * gate)


@functools.partial(jax.jit, static_argnames=("window", "kv", "heads"))
def _attn_core(a_in, w, cos, sin, pos, window, kv, heads):
    """Attention of normalised input a_in [B, T, H] with float weights w → (o_in [B, T, q_dim], out [B, T, H])."""
    b, t, _ = a_in.shape
    q = (_hi(a_in, w["q_proj"]["weight"]) + w["q_proj"]["bias"]).reshape(b, t, heads, -1)
    k = (_hi(a_in, w["k_proj"]["weight"]) + w["k_proj"]["bias"]).reshape(b, t, kv, -1)
    v = (_hi(a_in, w["v_proj"]["weight"]) + w["v_proj"]["bias"]).reshape(b, t, kv, -1)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o_in = attention(q, k, v, pos, pos, w["sinks"], window).reshape(b, t, -1)
    return o_in, _hi(o_in, w["o_proj"]["weight"]) + w["o_proj"]["bias"]


@functools.partial(jax.jit, static_argnames=("window", "kv", "heads", "eps"))
def _attn_block(x, g_in, w, cos, sin, pos, window, kv, heads, eps):
    """Unquantized attention block and its AWQ statistics: a_in (normed input), o_in (o_proj input), attn_out,
    mean|a_in| [H], mean|o_in| per KV channel [KV, D] (averaged over the query heads of each KV head), o_proj's
    output without bias."""
    a_in = _rms(x, eps) * g_in
    o_in, out = _attn_core(a_in, w, cos, sin, pos, window, kv, heads)
    b, t, _ = x.shape
    mean_o = jnp.mean(jnp.abs(o_in), axis=(0, 1)).reshape(kv, heads // kv, -1).mean(axis=1)
    return a_in, o_in, out, jnp.mean(jnp.abs(a_in), axis=(0, 1)), mean_o, _hi(o_in, w["o_proj"]["weight"])


@functools.partial(jax.jit, static_argnames=("k", "eps"))
def _moe_prologue(x, attn_out, g_post, wr, br, k, eps):
    """Residual after attention, the MoE input m_in [N, H], its top-k experts / weights and mean|m_in| [H]."""
    hmid = x + attn_out
    m_in = (_rms(hmid, eps) * g_post).reshape(-1, x.shape[-1])
    top_logits, top_e = jax.lax.top_k(_hi(m_in, wr) + br, k)
    return hmid, m_in, top_e, jax.nn.softmax(top_logits, axis=-1), jnp.mean(jnp.abs(m_in), axis=0)


@functools.partial(jax.jit, static_argnames=("pow2",))
def _scales(x_mean, alpha, pow2):
    return awq_scales(x_mean, alpha, pow2)


@functools.partial(jax.jit, static_argnames=("window", "kv", "heads", "qh", "pow2"))
def _qkv_loss(alpha, a_in, mean, w, cos, sin, pos, ref, window, kv, heads, qh: _Q, pow2):
    s = awq_scales(mean, alpha, pow2)
    wq = dict(w)
    for p in ("q_proj", "k_proj", "v_proj"):
        wq[p] = {"weight": fake_quant(w[p]["weight"] * s[:, None], qh), "bias": w[p]["bias"]}
    _, out = _attn_core(a_in / s, wq, cos, sin, pos, window, kv, heads)
    return jnp.mean((out - ref) ** 2)


@functools.partial(jax.jit, static_argnames=("qo", "pow2", "groups"))
def _o_loss(alpha, o_in, mean_kv, wo, ref, qo: _Q, pow2, groups):
    s_kv = awq_scales(mean_kv, alpha, pow2)  # [KV, D]
    s = jnp.repeat(s_kv[:, None, :], groups, axis=1).reshape(-1)  # o input channel (h, d) -> s[h // G, d]
    out = _hi(o_in / s, fake_quant(wo * s[:, None], qo))
    return jnp.mean((out - ref) ** 2)


@functools.partial(jax.jit, static_argnames=("qh", "pow2", "alpha_act", "limit"))
def _expert_losses(alphas, mean, x, wts, gu, gub, dn, dnb, ref, qh: _Q, pow2, alpha_act, limit):
    """Routing-weighted squared error of one expert's output (gate_up int4 with scale s(alpha), down fp) on the
    tokens routed to it, for every alpha: [n_grid]. Padding rows carry weight 0."""
    def one(alpha):
        s = awq_scales(mean, alpha, pow2)
        y = _hi(x / s, fake_quant(gu * s[:, None], qh)) + gub
        out = _hi(swiglu(y, alpha_act, limit), dn) + dnb
        return jnp.sum(wts[:, None] * (out - ref) ** 2)
    return jax.lax.map(one, alphas)


@functools.partial(jax.jit, static_argnames=("alpha_act", "limit"))
def _expert_fp(x, gu, gub, dn, dnb, alpha_act, limit):
    h = swiglu(_hi(x, gu) + gub, alpha_act, limit)
    return _hi(h, dn) + dnb, h


@functools.partial(jax.jit, static_argnames=("q", "steps", "n_grid"))
def _clip_chunk(w, x, q: _Q, steps, n_grid):
    """auto_clip on w [K, Nc] with inputs x [T, K]: the best max |w| per (group, column), [K/g, Nc]."""
    k, n = w.shape
    g = k // q.group
    wg = w.reshape(g, q.group, n)
    xg = x.reshape(x.shape[0], g, q.group)
    org = jnp.einsum("tgk,gkn->tgn", xg, wg, precision=jax.lax.Precision.HIGHEST)
    amax = jnp.max(jnp.abs(wg), axis=1)

    def body(i, carry):
        best_err, best = carry
        mv = amax * (1.0 - i / n_grid)
        cw = jnp.clip(wg, -mv[:, None, :], mv[:, None, :])
        qw = fake_quant(cw.reshape(k, n), q).reshape(g, q.group, n)
        out = jnp.einsum("tgk,gkn->tgn", xg, qw, precision=jax.lax.Precision.HIGHEST)
        err = jnp.mean((out - org) ** 2, axis=0)
        better = err < best_err
        return jnp.where(better, err, best_err), jnp.where(better, mv, best)

    init = (jnp.full(amax.shape, jnp.inf, jnp.float32), amax)
    return jax.lax.fori_loop(0, steps, body, init)[1]


def clip_search(w: np.ndarray, x: np.ndarray, q: _Q, n_grid: int, max_shrink: float,
                rows: int | None = None) -> np.ndarray:
    """AutoAWQ's auto_clip for w [K, N] (float64) on inputs x [T, K]: returns w clipped to the best
    [-max, max] per (group, output column). T is subsampled to ≤ CLIP_TOKENS. rows: pad the tokens to this many
    zero rows (one compiled shape for calls with different T; zero rows add zero error to every candidate, so the
    argmin is unchanged)."""
    steps = int(max_shrink * n_grid)
    if steps <= 1 or x.shape[0] == 0:
        return w
    if x.shape[0] > CLIP_TOKENS:
        x = x[:: x.shape[0] // CLIP_TOKENS][:CLIP_TOKENS]
    x = _pad_rows(x, max(x.shape[0], min(rows or 0, CLIP_TOKENS)))
    k, n = w.shape
    g = k // q.group
    limit = max(1, _CLIP_CHUNK_ELEMENTS // max(1, x.shape[0] * g))
    chunk = max(d for d in range(1, n + 1) if n % d == 0 and d <= limit)  # one compiled shape
    x32 = jnp.asarray(x, jnp.float32)
    best = np.concatenate([np.asarray(_clip_chunk(jnp.asarray(w[:, c:c + chunk], jnp.float32), x32, q, steps,
                                                  n_grid)) for c in range(0, n, chunk)], axis=1)
    mv = np.repeat(best.astype(np.float64), q.group, axis=0)
    return np.clip(w, -mv, mv)


def _bucket(n: int) -> int:
    return max(8, 1 << (n - 1).bit_length())


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows, *a.shape[1:]), np.float32)
    out[:a.shape[0]] = a
    return out


# ---------------------------------------------------------------------------------------------------- one layer
@dataclasses.dataclass
class LayerResult:
    """The folded (and clipped) non-expert tensors of a layer (float64, our [in, out] layout, the tree of
    ``params.param_specs``'s layer without the expert weights), the hidden states after the layer (unquantized
    model, [B, T, H] float32) and the search report."""
    layer: dict
    x_next: np.ndarray
    report: dict


def calibrate_layer(config: GptOssConfig, li: int, layer: dict, expert: Callable[[int], dict], x: np.ndarray,
                    quant: QuantSpec, opts: AWQOptions, *, pow2: bool,
                    emit_expert: Callable[[int, np.ndarray, np.ndarray], None]) -> LayerResult:
    """AWQ of decoder layer li (module docstring).

    layer: float64 numpy tree {input_norm: {scale [H]}, attn: {q_proj|k_proj|v_proj|o_proj: {weight [in, out],
    bias}, sinks [heads]}, post_attn_norm: {scale}, mlp: {router: {weight [H, E], bias [E]}, experts:
    {gate_up_bias [E, 2I], down_bias [E, H]}}} (expert weights excluded). expert(e) → {"gate_up" [H, 2I],
    "down" [I, H]} float64 (read on demand; called twice per expert). x: hidden states entering the layer [B, T, H].
    emit_expert(e, gate_up, down): receives each expert's folded, clipped float64 weights, ready for RTN.
    pow2: round the scales to powers of two (16-bit folded tensors). Returns a LayerResult."""
    c = config
    b, t, hsz = x.shape
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    grid = np.arange(opts.n_grid, dtype=np.float32) / opts.n_grid
    qh, qq = _qscheme(quant, hsz), _qscheme(quant, c.q_dim)
    window = c.sliding_window if c.is_sliding(li) else None
    inv_freq, scale = yarn_inv_freq(c)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_cos_sin(pos, jnp.asarray(inv_freq), scale)
    attn_w = jax.tree.map(f32, layer["attn"])
    x32 = f32(x)
    eps = c.rms_norm_eps
    kw = dict(window=window, kv=c.num_key_value_heads, heads=c.num_attention_heads)
    report: dict[str, Any] = {}

    def search(loss_fn) -> tuple[float, float]:
        losses = [float(loss_fn(jnp.float32(a))) for a in grid]
        best = int(np.argmin(losses))
        return float(grid[best]), (losses[best] / losses[0] if losses[0] > 0 else 1.0)

    # --- q/k/v: input RMSNorm scale
    a_in, o_in, attn_out, mean_a, mean_o, o_ref = _attn_block(x32, f32(layer["input_norm"]["scale"]), attn_w, cos,
                                                              sin, pos, eps=eps, **kw)
    alpha_qkv, ratio = search(lambda a: _qkv_loss(a, a_in, mean_a, attn_w, cos, sin, pos, attn_out, qh=qh,
                                                  pow2=pow2, **kw))
    s_qkv = np.asarray(_scales(mean_a, alpha_qkv, pow2), np.float64)
    report["qkv"] = {"alpha": alpha_qkv, "loss_vs_rtn": ratio}

    # --- v -> o
    kvh, groups, d = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim
    alpha_o, ratio = search(lambda a: _o_loss(a, o_in, mean_o, attn_w["o_proj"]["weight"], o_ref, qo=qq, pow2=pow2,
                                              groups=groups))
    s_v = np.asarray(_scales(mean_o, alpha_o, pow2), np.float64).reshape(-1)  # [KV·D]
    s_o = np.repeat(s_v.reshape(kvh, 1, d), groups, axis=1).reshape(-1)
    report["v_o"] = {"alpha": alpha_o, "loss_vs_rtn": ratio}

    # --- MoE input: router (fp) + every expert's gate_up
    hmid, m_in, top_e, top_w, mean_m = _moe_prologue(x32, attn_out, f32(layer["post_attn_norm"]["scale"]),
                                                     f32(layer["mlp"]["router"]["weight"]),
                                                     f32(layer["mlp"]["router"]["bias"]), k=c.num_experts_per_tok,
                                                     eps=eps)
    top_e, top_w, m_np = np.asarray(top_e), np.asarray(top_w), np.asarray(m_in)
    # every expert's rows padded to one size (one compiled shape per layer size)
    n_pad = _bucket(max(int(np.count_nonzero(top_e == e)) for e in range(c.num_local_experts)))
    gub_all, dnb_all = layer["mlp"]["experts"]["gate_up_bias"], layer["mlp"]["experts"]["down_bias"]
    act = dict(alpha_act=float(c.swiglu_alpha), limit=float(c.swiglu_limit))
    moe_out = np.zeros((b * t, hsz), np.float64)
    losses = np.zeros(opts.n_grid, np.float64)
    routed = []
    for e in range(c.num_local_experts):
        rows, slot = np.nonzero(top_e == e)
        routed.append((rows, top_w[rows, slot]))
        if rows.size == 0:
            continue
        w = expert(e)
        xe, we = f32(_pad_rows(m_np[rows], n_pad)), f32(_pad_rows(top_w[rows, slot], n_pad))
        gu, gub, dn, dnb = f32(w["gate_up"]), f32(gub_all[e]), f32(w["down"]), f32(dnb_all[e])
        ref, _ = _expert_fp(xe, gu, gub, dn, dnb, **act)
        np.add.at(moe_out, rows, np.asarray(ref)[:rows.size] * top_w[rows, slot][:, None])
        losses += np.asarray(_expert_losses(f32(grid), mean_m, xe, we, gu, gub, dn, dnb, ref, qh=qh, pow2=pow2,
                                            **act), np.float64)
    best = int(np.argmin(losses))
    alpha_m = float(grid[best])
    s_m = np.asarray(_scales(mean_m, alpha_m, pow2), np.float64)
    report["moe"] = {"alpha": alpha_m, "loss_vs_rtn": float(losses[best] / losses[0]) if losses[0] > 0 else 1.0}

    # --- pass 2 over the experts: fold s_m into gate_up, clip both on the routed tokens, hand out
    qi = _qscheme(quant, c.intermediate_size)
    for e in range(c.num_local_experts):
        w = expert(e)
        gu = w["gate_up"] * s_m[:, None]
        dn = w["down"]
        rows, _ = routed[e]
        if opts.clip and rows.size:
            xe = m_np[rows].astype(np.float64)
            gu = clip_search(gu, xe / s_m, qh, opts.n_grid, opts.max_shrink, rows=n_pad)
            _, hid = _expert_fp(f32(_pad_rows(xe, n_pad)), f32(w["gate_up"]), f32(gub_all[e]), f32(dn),
                                f32(dnb_all[e]), **act)
            dn = clip_search(dn, np.asarray(hid, np.float64)[:rows.size], qi, opts.n_grid, opts.max_shrink,
                             rows=n_pad)
        emit_expert(e, gu, dn)
        del w, gu, dn

    # --- fold the attention scales and clip v / o
    out = jax.tree.map(lambda a: np.array(a, np.float64), {k: v for k, v in layer.items()})
    at = out["attn"]
    out["input_norm"]["scale"] = layer["input_norm"]["scale"] / s_qkv
    for p in ("q_proj", "k_proj", "v_proj"):
        at[p]["weight"] = layer["attn"][p]["weight"] * s_qkv[:, None]
    at["v_proj"]["weight"] = at["v_proj"]["weight"] / s_v[None, :]
    at["v_proj"]["bias"] = layer["attn"]["v_proj"]["bias"] / s_v
    at["o_proj"]["weight"] = layer["attn"]["o_proj"]["weight"] * s_o[:, None]
    if opts.clip:
        a_np = np.asarray(a_in, np.float64).reshape(b * t, hsz)
        at["v_proj"]["weight"] = clip_search(at["v_proj"]["weight"], a_np / s_qkv, qh, opts.n_grid, opts.max_shrink)
        o_np = np.asarray(o_in, np.float64).reshape(b * t, -1)
        at["o_proj"]["weight"] = clip_search(at["o_proj"]["weight"], o_np / s_o, qq, opts.n_grid, opts.max_shrink)
    out["post_attn_norm"]["scale"] = layer["post_attn_norm"]["scale"] / s_m
    out["mlp"]["router"]["weight"] = layer["mlp"]["router"]["weight"] * s_m[:, None]
    x_next = (np.asarray(hmid, np.float64).reshape(b * t, hsz) + moe_out).reshape(b, t, hsz).astype(np.float32)
    return LayerResult(out, x_next, report)


# ------------------------------------------------------------------------------------------- converter integration
class AWQMixin:
    """Turns an HFSource / MXFP4Source into an AWQ-calibrating one (see :func:`enable`). Items are produced in the
    writer's order: "embed" computes the calibration tokens' embeddings, "layers.i" calibrates layer i (holding its
    experts' int4 arrays until "layers.i.gate_up" / "layers.i.down" are written), then the hidden states move on."""

    awq_opts: AWQOptions
    awq_ids: np.ndarray
    awq_x: np.ndarray | None
    awq_pending: dict
    awq_report: dict

    def scheme_description(self) -> str:
        return super().scheme_description() + f", AWQ ({self.awq_report['calibration']['tokens']} tokens)"

    def int4_action(self, group: str) -> str:
        return "AWQ-calibrated " + super().int4_action(group)

    def read_item(self, name: str) -> dict:
        if name == "embed":
            tree = super().read_item(name)
            self.awq_x = np.asarray(tree["embed"]["embedding"][self.awq_ids], np.float32)
            return tree
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == "layers":
            return self._awq_layer(int(parts[1]))
        if len(parts) == 3:
            return {parts[2]: self.awq_pending.pop(parts[2])}
        return super().read_item(name)

    def _float_in_out(self, name: str) -> np.ndarray:
        a = self.get(name)
        w = np.array(a, np.float64).T
        self.release(name)
        if not np.all(np.isfinite(w)):
            raise ConvertError(f"{self.where(name)}: non-finite values")
        return w

    def _awq_layer(self, li: int) -> dict:
        c = self.config
        p = f"model.layers.{li}."
        kept = _read_kept(self, li)  # tensors in their output dtype
        f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
        layer = jax.tree.map(f64, kept)
        for proj in ATTN_PROJ:
            layer["attn"][proj]["weight"] = self._float_in_out(f"{p}self_attn.{proj}.weight")
        # the tensors the scales fold into keep their (16- or 32-bit) dtype: power-of-two scales unless all are fp32
        folded = (kept["input_norm"]["scale"], kept["post_attn_norm"]["scale"], kept["mlp"]["router"]["weight"],
                  kept["attn"]["v_proj"]["bias"])
        pow2 = {np.dtype(a.dtype) for a in folded} != {np.dtype(np.float32)}
        h, i = c.hidden_size, c.intermediate_size
        gate_up, down = self._alloc_experts(h, 2 * i), self._alloc_experts(i, h)

        def expert(e):
            gu, _ = self.expert_weight_in_out(li, "gate_up", e)
            dn, _ = self.expert_weight_in_out(li, "down", e)
            for nm, w in (("gate_up", gu), ("down", dn)):
                if not np.all(np.isfinite(w)):
                    raise ConvertError(f"{self.where(f'{p}mlp.experts.{nm}_proj')}: non-finite values in expert {e}")
            return {"gate_up": gu, "down": dn}

        def emit(e, gu, dn):
            self._put_expert(gate_up, e, self.rtn(gu, f"{p}mlp.experts.gate_up_proj[{e}]"))
            self._put_expert(down, e, self.rtn(dn, f"{p}mlp.experts.down_proj[{e}]"))

        res = calibrate_layer(c, li, layer, expert, self.awq_x, self.quant, self.awq_opts, pow2=pow2,
                              emit_expert=emit)
        self.release_expert(li, "gate_up")
        self.release_expert(li, "down")
        self.awq_x = res.x_next
        self.awq_pending = {"gate_up": gate_up, "down": down}
        self.awq_report["layers"].append({"layer": li, **res.report, "power_of_two_scales": pow2})

        def cast_like(new, old, what):
            out = np.asarray(new).astype(old.dtype)
            if not np.all(np.isfinite(out)):
                raise ConvertError(f"{self.where(what)}: AWQ folding overflowed {old.dtype.name}")
            return out

        tree = jax.tree.map(lambda a: a, kept)
        tree["input_norm"]["scale"] = cast_like(res.layer["input_norm"]["scale"], kept["input_norm"]["scale"],
                                                p + "input_layernorm.weight")
        tree["post_attn_norm"]["scale"] = cast_like(res.layer["post_attn_norm"]["scale"],
                                                    kept["post_attn_norm"]["scale"],
                                                    p + "post_attention_layernorm.weight")
        tree["mlp"]["router"]["weight"] = cast_like(res.layer["mlp"]["router"]["weight"],
                                                    kept["mlp"]["router"]["weight"], p + "mlp.router.weight")
        tree["attn"]["v_proj"]["bias"] = cast_like(res.layer["attn"]["v_proj"]["bias"],
                                                   kept["attn"]["v_proj"]["bias"], p + "self_attn.v_proj.bias")
        for proj in ATTN_PROJ:
            tree["attn"][proj]["weight"] = self.rtn(res.layer["attn"][proj]["weight"], f"{p}self_attn.{proj}.weight")
        return tree


def _read_kept(source, li: int) -> dict:
    """Layer li's 16/32-bit tensors (norms, biases, sinks, router, expert biases) as Source.read_layer reads them
    (source dtype, or --dtype), without the attention weights."""
    p = f"model.layers.{li}."
    attn = {proj: {"bias": source.f16(f"{p}self_attn.{proj}.bias")} for proj in ATTN_PROJ}
    attn["sinks"] = source.f16(p + "self_attn.sinks")
    return {
        "input_norm": {"scale": source.f16(p + "input_layernorm.weight")},
        "attn": attn,
        "post_attn_norm": {"scale": source.f16(p + "post_attention_layernorm.weight")},
        "mlp": {"router": {"weight": source.f16(p + "mlp.router.weight", transpose=True),
                           "bias": source.f16(p + "mlp.router.bias")},
                "experts": source.read_expert_biases(li)},
    }


def enable(source, opts: AWQOptions, src: Path):
    """Makes `source` (an HFSource or MXFP4Source, freshly opened) calibrate with AWQ while it converts. Raises
    ConvertError for other formats, bad options, or unusable calibration data (before any work)."""
    if source.format not in ("hf", "mxfp4"):
        raise ConvertError(f"--awq calibrates a 16-bit (hf) or MXFP4 source; {src} is {source.format}, already "
                           f"quantized (its codes are converted exactly without --awq)")
    opts.check()
    ids, desc = calibration_ids(opts, Path(src), source.config)
    cls = type(source)
    source.__class__ = type(f"AWQ{cls.__name__}", (AWQMixin, cls), {})
    source.awq_opts, source.awq_ids, source.awq_x, source.awq_pending = opts, ids, None, {}
    source.awq_report = {"method": "awq", "paper": "arXiv:2306.00978", "calibration": desc,
                         "n_grid": opts.n_grid, "max_shrink": opts.max_shrink if opts.clip else None,
                         "folded": {"q_proj,k_proj,v_proj": "input_layernorm", "v_proj->o_proj": "v_proj",
                                    "router,gate_up": "post_attention_layernorm (router compensated)",
                                    "down": "not scaled (clamped SwiGLU folds nothing); clip only"},
                         "layers": []}
    return source


__all__ = ["AWQOptions", "calibrate_layer", "calibration_ids", "clip_search", "enable", "fake_quant",
           "LayerResult"]
