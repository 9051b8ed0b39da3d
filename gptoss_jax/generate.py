"""Compiled prefill + chunked decode with a KV cache: the generation engine behind :mod:`gptoss_jax.api`.

How a call runs:

1. Prompts (token ids, different lengths) are padded on the right to a *length bucket* (a power of two, at least
   ``min_bucket``, capped by ``max_seq_len``) and prefilled in one jitted call, which also builds the KV cache and
   samples each row's first token. One compilation per (batch, bucket, cache size, sampling mode).
2. Decoding runs in *chunks*: one jitted call generates up to ``chunk_size`` tokens per row in one device loop
   (sampling, per-row finished flags and stop-token ids all on device; on CPU / TPU a ``lax.while_loop`` that exits
   once every row is done, on GPUs exactly ``chunk_size`` steps: :func:`decode_exits_early`). Each call pays a
   fixed host cost that grows with the number of parameter arrays (measured on an H200 with a gpt-oss-20b-sized
   int4 model: ~3.7 ms per call against ~5 ms per decode step), so several tokens per call matter. The cache is donated from call to call, so it is updated in place.
3. After each chunk the host receives the new tokens, checks stop strings (text only exists on the host), and
   streams the new tokens/text to the caller.

The cache size is ``bucket(longest real prompt + max_new_tokens)`` capped at ``max_seq_len`` (the real length, not
the padded prompt bucket: any request with prompt + max_new_tokens ≤ max_seq_len fits), so the number of
compilations is bounded by the buckets used, not by the number of distinct prompt lengths. Prompts longer than
``prefill_chunk`` tokens are prefilled chunk by chunk into the cache (:func:`prefill_chunked`), so prefill memory is
bounded by the chunk (with the O(T)-memory attention of :mod:`gptoss_jax.kernels.attention`).
Sampling parameters are passed as per-row arrays (traced), so changing temperature / top-k / top-p / seed never
recompiles; only the *mode* (greedy, or which of top-k / top-p is active at all) is static.
"""

from __future__ import annotations

from gptoss_jax.errors import GptOssError

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.kernels._common import lowering_platform, tracing_for
from gptoss_jax.kv_cache import init_cache
from gptoss_jax.sampling import sample_next_token
from gptoss_jax.validation import seed_key

DEFAULT_CHUNK_SIZE = 16
DEFAULT_MIN_BUCKET = 16
# Prefill chunk (tokens): longer prompts are prefilled chunk by chunk into the KV cache. Not yet tuned on a GPU.
DEFAULT_PREFILL_CHUNK = 2048
MAX_STOP_TOKEN_IDS = 16  # stop ids travel to the device as a fixed-size array (padded with -1): no recompiles
NO_TOKEN = -1  # marks "nothing emitted here" in the device → host token buffers


class GenerationError(GptOssError, ValueError):
    """Invalid arguments to generation or scoring (the message names the argument; ``field``, when set, is the
    argument's name, e.g. a :class:`SamplingParams` field)."""
    field: str | None = None


def length_bucket(n: int, *, minimum: int = DEFAULT_MIN_BUCKET, cap: int | None = None) -> int:
    """The smallest power of two ≥ max(n, minimum), capped at `cap` (n itself must fit under the cap)."""
    b = max(int(minimum), 1 << max(int(n) - 1, 0).bit_length())
    if cap is not None:
        if n > cap:
            raise GenerationError(f"length {n} exceeds the maximum {cap}")
        b = min(b, int(cap))
    return b


def batch_bucket(n: int, multiple: int = 1) -> int:
    """Rows a batch of n sequences is padded to: the next power of two, then up to a multiple of `multiple`."""
    b = 1 << max(int(n) - 1, 0).bit_length()
    return -(-b // multiple) * multiple


def bucket_set(max_seq_len: int, minimum: int = DEFAULT_MIN_BUCKET) -> list[int]:
    """Every bucket length that can occur for sequences up to max_seq_len."""
    out, b = [], length_bucket(1, minimum=minimum, cap=max_seq_len)
    while True:
        out.append(b)
        if b >= max_seq_len:
            return out
        b = length_bucket(b + 1, minimum=minimum, cap=max_seq_len)


# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 is greedy. top_k 0 and top_p 1 disable those truncations. `seed` makes sampling reproducible.
    Generation of a row ends at the first token in `stop_token_ids` (kept as the last token of `tokens`, left out of
    `text`), at the first occurrence of any of `stop_strings` in the decoded text (text cut before it), or after
    `max_new_tokens` tokens.
    """
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def validate(self, vocab_size: int) -> None:
        """Raises GenerationError naming the first invalid field (see :mod:`gptoss_jax.validation`)."""
        self.checked(vocab_size)

    def checked(self, vocab_size: int) -> "SamplingParams":
        """A copy with every field checked and normalised (Python ints/floats, top_k clipped to the vocabulary).
        Raises GenerationError whose ``field`` is the name of the first invalid field."""
        from gptoss_jax import validation as V
        nums = V.check_sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, seed=self.seed, vocab_size=vocab_size)
        return dataclasses.replace(
            self, **nums, stop_token_ids=V.named("stop_token_ids", V.check_stop_token_ids, self.stop_token_ids,
                                                 vocab_size, limit=MAX_STOP_TOKEN_IDS),
            stop_strings=V.named("stop_strings", V.check_stop_strings, self.stop_strings))

    @property
    def mode(self) -> tuple[bool, bool, bool]:
        """(greedy, top-k active, top-p active): the static part of sampling, one compilation each."""
        greedy = float(self.temperature) == 0.0
        return greedy, (not greedy and int(self.top_k) > 0), (not greedy and float(self.top_p) < 1.0)


@dataclasses.dataclass
class GenerationStats:
    """Timings of one generate call. Calls that had to compile are reported apart, so rates are steady-state."""
    prompt_tokens: int = 0  # summed over the batch (unpadded)
    generated_tokens: int = 0  # summed over the batch
    time_to_first_token_s: float = 0.0  # call → first tokens on the host (includes compiling, see prefill_compiled)
    prefill_compiled: bool = False  # the prefill compiled during this call (first call of its shape)
    decode_s: float = 0.0  # time in decode calls that did not compile
    decode_tokens: int = 0  # tokens those calls produced
    compile_decode_s: float = 0.0  # time in decode calls that compiled (compilation + their tokens)
    total_s: float = 0.0
    chunks: int = 0  # decode calls

    @property
    def decode_tokens_per_s(self) -> float:
        """Steady-state decode rate over the whole batch (nan when every decode call compiled)."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


@dataclasses.dataclass
class GenerationResult:
    """One prompt's generation. `tokens` excludes the prompt; a stop token that ended the row is its last entry."""
    tokens: list[int]
    finish_reason: str  # "stop_token" | "stop_string" | "length"
    text: str | None = None  # decoded `tokens` without the closing stop token / cut before the stop string
    prompt_tokens: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GenerationChunk:
    """What arrived for each row since the previous chunk (empty lists/strings for rows with nothing new)."""
    tokens: list[list[int]]
    text: list[str] | None  # new text per row (held back while it might be the start of a stop string)
    finished: list[bool]
    step: int  # index of this chunk (0 = the prefill's first tokens)


# ------------------------------------------------------------------------------------------------------------------
# Compiled functions are module-level and take the model's graph definition as a static argument, so models of
# identical structure (same config, dtype, quantization, mesh) share compilations — e.g. a reloaded checkpoint.
# TRACE_COUNTS[(function, StaticGraph)] counts traces (= compilations).
TRACE_COUNTS: collections.Counter = collections.Counter()


class StaticGraph:
    """A model's structure (GraphDef + the treedef of its state) as a cheap static jit argument.

    jit hashes static arguments on every call, and hashing an NNX GraphDef walks the whole module tree (milliseconds
    for gpt-oss-120b) — more than a decode step. This wrapper hashes once; instances are interned by
    :func:`static_graph`, so equal structures share one object and comparisons are identity checks.

    The state travels as a flat list of arrays (unflattened inside the trace): flattening an NNX State in Python
    costs about a microsecond per variable on every call, hundreds of variables for the real models.

    ``platform`` (the lowering platform of the model's devices, e.g. "cuda"; None: unknown) is part of the key:
    the compiled functions trace only that platform's kernel branches (``gptoss_jax.kernels._common.tracing_for``,
    half the trace time of a decode step), so a graph on another platform must not share their traces.
    """

    __slots__ = ("graphdef", "state_def", "platform", "_hash")

    def __init__(self, graphdef, state_def, platform: str | None = None):
        self.graphdef, self.state_def, self.platform = graphdef, state_def, platform
        self._hash = hash((graphdef, state_def, platform))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, StaticGraph) and self._hash == other._hash
                                 and self.platform == other.platform and self.graphdef == other.graphdef
                                 and self.state_def == other.state_def)

    def merge(self, state_leaves):
        return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self.state_def, state_leaves))


_INTERNED: dict[StaticGraph, StaticGraph] = {}


def static_graph(graphdef, state_def, platform: str | None = None) -> StaticGraph:
    key = StaticGraph(graphdef, state_def, platform)
    return _INTERNED.setdefault(key, key)


def on_graph_platform(impl):
    """Decorates a compiled function's implementation whose first argument is a StaticGraph: it is traced with only
    the kernel branches of the graph's platform (``tracing_for(graph.platform)``)."""

    @functools.wraps(impl)
    def traced(graph, *args, **kwargs):
        with tracing_for(graph.platform):
            return impl(graph, *args, **kwargs)

    return traced


def _sample(logits, key, mode, temperature, top_k, top_p):
    greedy, use_k, use_p = mode
    if greedy:
        return sample_next_token(logits, key, temperature=0.0)
    return sample_next_token(logits, key, temperature=temperature, top_k=top_k if use_k else 0,
                             top_p=top_p if use_p else 1.0)


def prefill_chunked(model, tokens, lengths, cache, chunk: int | None):
    """Prefills right-padded prompts tokens [B, T] (lengths [B]) into an empty cache, `chunk` tokens at a time.

    Returns (logits of each row's last real token [B, 1, V] float32, cache). The first chunk attends only to
    itself; chunk c ≥ 1 (a ``lax.scan``, one compiled body) writes positions c·chunk … into the cache and attends to
    the cache and itself, exactly as a one-shot forward would (same masks from positions). ``chunk=None`` or
    T ≤ chunk: one call. Memory is bounded by one chunk's activations (attention: gptoss_jax.kernels.attention).
    """
    b, t = tokens.shape
    zeros = jnp.zeros_like(lengths)
    if chunk is None or t <= chunk:
        return model(tokens, start=zeros, lengths=lengths, cache=cache, attend_to_cache=False, logits_for="last")
    n = -(-t // chunk)
    tokens = jnp.pad(tokens, ((0, 0), (0, n * chunk - t)))  # padding past the prompt: invalid, never cached

    def run(c, cache, attend):
        start = c * chunk
        tok = jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1)
        len_c = jnp.clip(lengths - start, 0, chunk)
        logits, cache = model(tok, start=zeros + start, lengths=len_c, cache=cache, attend_to_cache=attend,
                              logits_for="last")
        has_last = (lengths > start) & (lengths <= start + chunk)  # row's last real token is in this chunk
        return logits, has_last, cache

    logits, _, cache = run(0, cache, False)

    def body(carry, c):
        last, cache = carry
        lg, has_last, cache = run(c, cache, True)
        return (jnp.where(has_last[:, None, None], lg, last), cache), None

    (logits, cache), _ = jax.lax.scan(body, (logits, cache), jnp.arange(1, n))
    return logits, cache


def _prefill_impl(graph, state, tokens, lengths, key, temperature, top_k, top_p, *, cache_len, cache_dtype,
                  cache_constraint, mode, prefill_chunk=DEFAULT_PREFILL_CHUNK):
    """tokens [B, Tb] right-padded, lengths [B] → (first sampled token [B], fresh cache holding the prompts)."""
    TRACE_COUNTS[("prefill", graph)] += 1
    model = graph.merge(state)
    cache = init_cache(model.config, tokens.shape[0], cache_len, cache_dtype)
    if cache_constraint is not None:
        cache = cache_constraint(cache)
    logits, cache = prefill_chunked(model, tokens, lengths, cache, prefill_chunk)
    first = _sample(logits[:, 0], jax.random.fold_in(key, 0), mode, temperature, top_k, top_p)
    return first, cache


EARLY_EXIT_ENV_VAR = "GPTOSS_DECODE_EARLY_EXIT"  # "1" / "0": force the decode loop's kind (A/B benches, tests)


def decode_exits_early(platform: str | None) -> bool:
    """Whether a decode chunk runs as a ``lax.while_loop`` that stops once every row is finished (True) or as a loop
    of exactly ``steps`` iterations (False), for a model on ``platform`` (a lowering platform name, e.g. "cuda", as
    :class:`StaticGraph` carries it; None: unknown).

    False on GPUs: XLA:GPU's while loop copies its predicate to the host after every iteration, a host-device sync
    per decoded token that keeps the host from enqueuing step s + 1's ~1,200 kernels while the GPU runs step s (the
    dispatch is then serial with the device); a loop whose trip count is known at compile time runs without it. The
    price is at most ``steps − 1`` masked steps after the last row of a call finishes (rows that finished earlier
    are masked in both kinds). CPU / TPU have no such sync and keep the early exit. ``GPTOSS_DECODE_EARLY_EXIT``
    ("1" / "0") overrides (benches, tests); anything else raises ValueError."""
    import os  # noqa: PLC0415

    value = (os.environ.get(EARLY_EXIT_ENV_VAR) or "").strip()
    if value:
        if value not in ("0", "1"):
            raise ValueError(f"{EARLY_EXIT_ENV_VAR}={value!r}: expected 0 or 1")
        return value == "1"
    return platform not in ("cuda", "rocm")


def decode_loop(cond, body, carry, *, steps: int, early_exit: bool):
    """``lax.while_loop(cond, body, carry)`` (early exit) or ``steps`` iterations of ``body`` with a trip count XLA
    knows at compile time (:func:`decode_exits_early` says why). ``cond`` must be ``carry[0] < steps`` and'ed with
    the early-exit test, and ``body`` must mask finished rows, so both kinds give the same results."""
    if early_exit:
        return jax.lax.while_loop(cond, body, carry)
    return jax.lax.fori_loop(0, steps, lambda _, c: body(c), carry)


def _decode_impl(graph, state, cache, last_token, positions, finished, num_generated, step, max_new_tokens,
                 stop_ids, key, temperature, top_k, top_p, *, steps, mode, early_exit=True):
    """Feeds each unfinished row's last token and samples up to `steps` more, stopping early once every row is
    finished. Returns the tokens [B, steps] (NO_TOKEN where nothing was emitted) and the updated loop state.

    Step s of the whole generation samples with fold_in(key, s), so results do not depend on the chunk size.
    """
    TRACE_COUNTS[("decode", graph)] += 1
    model = graph.merge(state)
    batch = last_token.shape[0]
    out = jnp.full((batch, steps), NO_TOKEN, jnp.int32)

    def cond(carry):
        i, _, _, _, finished, _, _, _ = carry
        return (i < steps) & ~jnp.all(finished)

    def body(carry):
        i, cache, token, pos, finished, n, step, out = carry
        active = ~finished
        logits, cache = model(token[:, None], start=pos, lengths=active.astype(jnp.int32), cache=cache,
                              attend_to_cache=True, logits_for="last")
        new = _sample(logits[:, 0], jax.random.fold_in(key, step), mode, temperature, top_k, top_p)
        new = jnp.where(active, new, NO_TOKEN)
        n = n + active.astype(jnp.int32)
        stopped = jnp.any(new[:, None] == stop_ids[None, :], axis=-1)
        finished = finished | (active & (stopped | (n >= max_new_tokens)))
        out = out.at[:, i].set(new)
        token = jnp.where(active, new, token)
        pos = pos + active.astype(jnp.int32)
        return i + 1, cache, token, pos, finished, n, step + 1, out

    carry = (jnp.int32(0), cache, last_token, positions, finished, num_generated, step, out)
    _, cache, token, pos, finished, n, step, out = decode_loop(cond, body, carry, steps=steps, early_exit=early_exit)
    return cache, out, token, pos, finished, n, step


def _score_impl(graph, state, tokens, lengths):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) [B, T-1] (float32) and whether each was the argmax."""
    TRACE_COUNTS[("score", graph)] += 1
    model = graph.merge(state)
    logits, _ = model(tokens, lengths=lengths)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = tokens[:, 1:]
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    is_greedy = jnp.argmax(logits[:, :-1], axis=-1) == targets
    return token_logp, is_greedy


def _logits_impl(graph, state, tokens, lengths):
    TRACE_COUNTS[("logits", graph)] += 1
    model = graph.merge(state)
    logits, _ = model(tokens, lengths=lengths)
    return logits


_prefill = jax.jit(on_graph_platform(_prefill_impl), static_argnums=0,
                   static_argnames=("cache_len", "cache_dtype", "cache_constraint", "mode", "prefill_chunk"))
_decode = jax.jit(on_graph_platform(_decode_impl), static_argnums=0,
                  static_argnames=("steps", "mode", "early_exit"), donate_argnames=("cache",))
_score = jax.jit(on_graph_platform(_score_impl), static_argnums=0)
_logits = jax.jit(on_graph_platform(_logits_impl), static_argnums=0)


class Generator:
    """Prefill / decode / scoring around one model (an NNX ``GptOss``), with host-side batching and validation.

    The model is split once (``graphdef, state``); the compiled functions are pure in ``state`` and rebuild the
    module inside the trace with ``nnx.merge``.
    """

    def __init__(self, model, *, max_seq_len: int, cache_dtype=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 min_bucket: int = DEFAULT_MIN_BUCKET, cache_constraint: Callable | None = None,
                 batch_multiple: int = 1, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK):
        self.config = model.config
        self.prefill_chunk = prefill_chunk  # None: one-shot prefill
        self.graphdef, self.state = nnx.split(model)
        leaves, state_def = jax.tree_util.tree_flatten(self.state)
        self.state_leaves = leaves  # what the compiled functions receive (see StaticGraph)
        # the compiled functions' static argument (with the platform whose kernel branches they trace)
        self.graph = static_graph(self.graphdef, state_def, lowering_platform(leaves))
        self.early_exit = decode_exits_early(self.graph.platform)  # the decode loop's kind (while vs fixed count)
        self.max_seq_len = int(max_seq_len)
        self.cache_dtype = jnp.dtype(cache_dtype or model.dtype)
        if chunk_size < 1:
            raise GenerationError(f"chunk_size must be ≥ 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.min_bucket = int(min_bucket)
        self.cache_constraint = cache_constraint  # (cache) -> cache with sharding constraints, or None
        if batch_multiple < 1:
            raise GenerationError(f"batch_multiple must be ≥ 1, got {batch_multiple}")
        self.batch_multiple = int(batch_multiple)

    @property
    def trace_counts(self) -> dict[str, int]:
        """Compilations so far of each function for this model's structure."""
        return {name: TRACE_COUNTS[(name, self.graph)] for name in ("prefill", "decode", "score", "logits")}

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def model(self):
        return nnx.merge(self.graphdef, self.state)

    # -------------------------------------------------------------------------------------------------- validation
    def check_prompts(self, prompts) -> list[list[int]]:
        """Token-id prompts (a list of lists, or one list) → list of lists of ints, with clear errors."""
        from gptoss_jax.validation import token_prompts
        return token_prompts(prompts, vocab_size=self.vocab_size, max_seq_len=self.max_seq_len)

    def _padded(self, prompts: list[list[int]]):
        """Right-pads prompts to a length bucket → tokens [R, Tb], lengths [R]. R is the batch bucket of
        len(prompts) (:func:`batch_bucket`: the next power of two, rounded up to a multiple of `batch_multiple`, the
        mesh's data-parallel size), so batch sizes share compilations like prompt lengths do; the extra rows repeat
        prompt 0, start finished, and their outputs are dropped."""
        longest = max(len(p) for p in prompts)
        width = length_bucket(longest, minimum=self.min_bucket, cap=self.max_seq_len)
        rows = batch_bucket(len(prompts), self.batch_multiple)
        prompts = prompts + [prompts[0]] * (rows - len(prompts))
        tokens = np.zeros((rows, width), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        lengths = np.array([len(p) for p in prompts], np.int32)
        return tokens, lengths

    # -------------------------------------------------------------------------------------------------- scoring
    def logits(self, prompts) -> list[np.ndarray]:
        """Full-forward float32 logits per prompt ([len, V] each), padded to a bucket internally."""
        prompts = self.check_prompts(prompts)
        tokens, lengths = self._padded(prompts)
        out = np.asarray(_logits(self.graph, self.state_leaves, tokens, lengths))
        return [out[i, :len(p)] for i, p in enumerate(prompts)]

    def score(self, prompts) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per prompt: log-probabilities of tokens 1..n-1 given their prefixes, and greedy-match flags."""
        prompts = self.check_prompts(prompts)
        tokens, lengths = self._padded(prompts)
        logp, greedy = _score(self.graph, self.state_leaves, tokens, lengths)
        logp, greedy = np.asarray(logp), np.asarray(greedy)
        return ([logp[i, :len(p) - 1] for i, p in enumerate(prompts)],
                [greedy[i, :len(p) - 1] for i, p in enumerate(prompts)])

    # -------------------------------------------------------------------------------------------------- generation
    def stream(self, prompts, params: SamplingParams, *, decode: Callable[[list[int]], str] | None = None,
               chunk_size: int | None = None) -> "GenerationStream":
        """Starts generation; iterate the returned stream for chunks, then read `.results` / `.stats`.

        `decode(ids) -> str` (a tokenizer's) enables text output and stop strings.
        """
        params = params.checked(self.vocab_size)
        prompts = self.check_prompts(prompts)
        if params.stop_strings and decode is None:
            raise GenerationError("stop_strings need a tokenizer to decode text")
        longest = max(len(p) for p in prompts)
        if longest + params.max_new_tokens > self.max_seq_len:
            raise GenerationError(f"prompt length {longest} + max_new_tokens {params.max_new_tokens} exceeds the "
                                  f"context (max_seq_len={self.max_seq_len}); shorten the prompt or lower "
                                  f"max_new_tokens")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                       or chunk_size < 1):
            raise GenerationError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        return GenerationStream(self, prompts, params, decode, chunk_size or self.chunk_size)


class TextStreamer:
    """One row's text, detokenized incrementally, with stop strings: what the generation loop streams.

    Each new token costs two decodes of a few-token window instead of decoding the row's whole text per chunk
    (the approach of vLLM's incremental detokenizer): with ``prefix`` … ``read`` the tokens already turned into
    text, ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])`` is the new text. Stop strings are searched only
    in the newly confirmed tail. Text that could still be the start of a stop string is held back from :meth:`take`.

    Byte-level tokenizers can emit incomplete or invalid UTF-8 (decoded as U+FFFD), where a window's decode need not
    agree with the whole text's. Once a row's text shows U+FFFD the row switches to exact mode for good: the whole
    text is decoded after each token and searched for the stop strings (the slow path, only for such rows), so the
    kept tokens are the shortest prefix whose text holds a stop and the final text is theirs, never depending on
    the windowing or on the chunking of the tokens.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()):
        self._decode, self._stops = decode, tuple(stop_strings)
        self._ids: list[int] = []
        self._prefix = self._read = 0
        self._text = ""  # confirmed text (exact mode: the whole text)
        self._ends: list[int] = []  # len(confirmed text) after each token (incremental mode)
        self._searched = 0  # stop strings cannot start before this index of _text
        self._emitted = 0
        self._final: str | None = None
        self._exact = False

    def add(self, ids: Sequence[int]) -> int | None:
        """Adds tokens. Returns None, or — when a stop string appeared — how many of all tokens added so far to keep
        (the shortest prefix whose text contains it); the text then ends where the stop string starts."""
        for t in ids:
            self._ids.append(int(t))
            if self._exact:
                if self._stops and self._exact_stop():
                    return len(self._ids)
                continue
            before = self._decode(self._ids[self._prefix:self._read])
            after = self._decode(self._ids[self._prefix:])
            if "\ufffd" in after:
                # Until now every prefix decoded cleanly (and was searched above); from here on each prefix is
                # decoded whole, since a window's decode need not agree with it.
                self._exact = True
                if self._stops and self._exact_stop():
                    return len(self._ids)
                continue
            if len(after) > len(before):
                self._text += after[len(before):]
                self._prefix, self._read = self._read, len(self._ids)
            self._ends.append(len(self._text))
            if self._stops:
                hits = [(i, s) for s in self._stops if (i := self._text.find(s, self._searched)) >= 0]
                if hits:
                    cut, stop = min(hits)
                    keep = next(n for n, end in enumerate(self._ends, 1) if end >= cut + len(stop))
                    self._final = self._text[:cut]
                    return keep
                self._searched = max(0, len(self._text) - max(len(s) for s in self._stops) + 1)
        if self._exact and not self._stops:  # with stop strings, _exact_stop decoded the whole text already
            self._text = self._decode(self._ids)
        return None

    def _exact_stop(self) -> bool:
        """Exact mode, after each token: whether the text of all tokens so far contains a stop string; if so the
        final text is that text cut at the first one. Checking every prefix is what makes the kept tokens the
        shortest prefix holding a stop and the final text exactly theirs: with invalid UTF-8, a stop can appear in
        a prefix's text (e.g. U+FFFD of a still incomplete byte sequence) and not in a longer one's."""
        self._text = text = self._decode(self._ids)
        hits = [i for s in self._stops if (i := text.find(s)) >= 0]
        if not hits:
            return False
        self._final = text[:min(hits)]
        return True

    def final_text(self) -> str:
        """The row's whole text once it finished (pending bytes flushed, cut at a stop string)."""
        if self._final is None:
            self._final = self._decode(self._ids)
        return self._final

    def take(self) -> str:
        """The text not yet returned that is safe to show (not possibly the start of a stop string, nor an
        incomplete UTF-8 sequence)."""
        if self._final is not None:
            safe, text = len(self._final), self._final
        else:
            text = self._text
            safe = len(text) - _holdback(text, self._stops)
        if safe <= self._emitted:
            return ""
        out = text[self._emitted:safe]
        self._emitted = safe
        return out


def _holdback(text: str, stop_strings: Sequence[str]) -> int:
    """How many trailing characters of `text` could still be the start of a stop string (or an incomplete
    UTF-8 sequence, which byte-level tokenizers decode as U+FFFD). The pending U+FFFD are held first; the text
    before them may itself be the start of a stop string whose next character is still incomplete."""
    stripped = text.rstrip("\ufffd")
    trailing_bad = len(text) - len(stripped)
    keep = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(stripped)), 0, -1):
            if stripped.endswith(s[:k]):
                keep = max(keep, k)
                break
    return trailing_bad + keep


class GenerationStream:
    """An iterator of :class:`GenerationChunk`; when exhausted, `.results` and `.stats` hold the outcome.

    `.results` (or :meth:`finish`) drains the remaining chunks first.
    """

    def __init__(self, gen: Generator, prompts: list[list[int]], params: SamplingParams,
                 decode: Callable[[list[int]], str] | None, chunk_size: int):
        self._gen, self._prompts, self._params, self._decode_text = gen, prompts, params, decode
        self._chunk_size = chunk_size
        self._iter = self._run()
        self._results: list[GenerationResult] | None = None
        self.stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self._iter

    def __next__(self) -> GenerationChunk:
        return next(self._iter)

    def finish(self) -> list[GenerationResult]:
        for _ in self._iter:
            pass
        return self._results

    @property
    def results(self) -> list[GenerationResult]:
        return self.finish()

    def _run(self) -> Iterator[GenerationChunk]:
        gen, params, prompts = self._gen, self._params, self._prompts
        t0 = time.perf_counter()
        batch = len(prompts)
        tokens, lengths = gen._padded(prompts)
        rows = tokens.shape[0]  # ≥ batch: padded rows (mesh data axis) start finished and are never reported
        padding_done = [True] * (rows - batch)
        # The real longest prompt (not its padded bucket) + max_new_tokens: stream() checked it fits max_seq_len.
        cache_len = length_bucket(max(len(p) for p in prompts) + params.max_new_tokens, minimum=gen.min_bucket,
                                  cap=gen.max_seq_len)
        mode = params.mode
        # Loop constants go to the device once, not on every decode call.
        temperature = jnp.full((rows,), params.temperature, jnp.float32)
        top_k = jnp.full((rows,), params.top_k, jnp.int32)
        top_p = jnp.full((rows,), params.top_p, jnp.float32)
        key = seed_key(params.seed)  # all of [0, 2**64) distinct, with or without x64
        stop_ids = np.full((MAX_STOP_TOKEN_IDS,), NO_TOKEN, np.int32)
        stop_ids[:len(params.stop_token_ids)] = params.stop_token_ids
        stop_ids = jnp.asarray(stop_ids)
        max_new_tokens = jnp.int32(params.max_new_tokens)
        stop_set = set(int(t) for t in params.stop_token_ids)

        prefill_traces = TRACE_COUNTS[("prefill", gen.graph)]
        first, cache = _prefill(gen.graph, gen.state_leaves, tokens, lengths, key, temperature, top_k, top_p,
                                cache_len=cache_len, cache_dtype=gen.cache_dtype,
                                cache_constraint=gen.cache_constraint, mode=mode,
                                prefill_chunk=getattr(gen, "prefill_chunk", DEFAULT_PREFILL_CHUNK))
        # The small loop-carried values (last token, positions, counters) go back and forth as host arrays: passing
        # the previous call's device outputs instead would change the arguments from uncommitted to committed after
        # the first chunk and compile the decode step twice. The KV cache stays on device (donated).
        first = np.asarray(first)
        last = first
        self.stats.time_to_first_token_s = time.perf_counter() - t0
        self.stats.prefill_compiled = TRACE_COUNTS[("prefill", gen.graph)] > prefill_traces

        out_tokens: list[list[int]] = [[int(t)] for t in first[:batch]]
        reasons: list[str | None] = [None] * batch
        for b in range(batch):
            if int(first[b]) in stop_set:
                reasons[b] = "stop_token"
            elif params.max_new_tokens <= 1:
                reasons[b] = "length"
        texts_done: list[str | None] = [None] * batch  # final text once a row finished
        streamers = [None if self._decode_text is None else TextStreamer(self._decode_text, params.stop_strings)
                     for _ in range(batch)]

        def text_updates(new_counts: list[int]) -> list[str] | None:
            """Feeds each row's new tokens to its TextStreamer (stop strings) and returns the new safe text."""
            if self._decode_text is None:
                return None
            deltas = [""] * batch
            for b in range(batch):
                if texts_done[b] is not None:
                    continue
                st = streamers[b]
                new = out_tokens[b][len(out_tokens[b]) - new_counts[b]:] if new_counts[b] else []
                if reasons[b] == "stop_token":
                    new = new[:-1]  # the stop token is not part of the text
                keep = st.add(new)
                if keep is not None:  # a stop string: keep the shortest token prefix that contains it
                    out_tokens[b] = out_tokens[b][:keep]
                    reasons[b] = "stop_string"
                if reasons[b] is not None:
                    texts_done[b] = st.final_text()
                deltas[b] = st.take()
            return deltas

        text = text_updates([1] * batch)
        finished = [r is not None for r in reasons]
        yield GenerationChunk([list(t) for t in out_tokens], text, list(finished), 0)

        positions = np.asarray(lengths, np.int32)
        num_generated = np.ones((rows,), np.int32)
        step = np.int32(1)
        chunk_index = 0
        while not all(finished):
            chunk_index += 1
            before = [len(t) for t in out_tokens]
            decode_traces = TRACE_COUNTS[("decode", gen.graph)]
            t_chunk = time.perf_counter()
            cache, out, last, positions, dev_finished, num_generated, step = _decode(
                gen.graph, gen.state_leaves, cache, last, positions, np.asarray(finished + padding_done), num_generated, step,
                max_new_tokens, stop_ids, key, temperature, top_k, top_p,
                steps=self._chunk_size, mode=mode, early_exit=gen.early_exit)
            out, dev_finished, last, positions, num_generated, step = jax.device_get(
                (out, dev_finished, last, positions, num_generated, step))
            elapsed = time.perf_counter() - t_chunk
            self.stats.chunks += 1
            if TRACE_COUNTS[("decode", gen.graph)] > decode_traces:
                self.stats.compile_decode_s += elapsed
            else:
                self.stats.decode_s += elapsed
                self.stats.decode_tokens += int(np.sum(out[:batch] != NO_TOKEN))
            for b in range(batch):
                if finished[b]:
                    continue
                new = [int(t) for t in out[b] if t != NO_TOKEN]
                out_tokens[b].extend(new)
                if dev_finished[b]:
                    reasons[b] = "stop_token" if new and new[-1] in stop_set else "length"
            text = text_updates([len(t) - n for t, n in zip(out_tokens, before)])
            new_tokens = [t[n:] for t, n in zip(out_tokens, before)]
            finished = [r is not None for r in reasons]
            yield GenerationChunk(new_tokens, text, list(finished), chunk_index)
        del cache
        now = time.perf_counter()
        self.stats.total_s = now - t0
        self.stats.generated_tokens = sum(len(t) for t in out_tokens)
        self._results = [GenerationResult(tokens=out_tokens[b], finish_reason=reasons[b], text=texts_done[b],
                                          prompt_tokens=prompts[b]) for b in range(batch)]


def generate(gen: Generator, prompts, params: SamplingParams, *, decode=None,
             on_chunk: Callable[[GenerationChunk], None] | None = None) -> tuple[list[GenerationResult],
                                                                                  GenerationStats]:
    stream = gen.stream(prompts, params, decode=decode)
    for chunk in stream:
        if on_chunk is not None:
            on_chunk(chunk)
    return stream.results, stream.stats
