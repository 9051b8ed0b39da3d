"""Continuous batching: one scheduler thread owns a fixed-size decode batch (slots) and its KV cache.

Design (the approach of Orca's iteration-level scheduling and vLLM's continuous batching, on our compiled
prefill / decode):

* The KV cache has ``max_batch`` rows (slots) of ``max_seq_len`` positions, allocated once. A request holds one slot
  from admission to its last token; its rows of the cache are overwritten by the next request that gets the slot
  (the first prefill chunk clears the row's positions to -1, so nothing of the previous occupant is visible).
* The scheduler loop alternates two kinds of compiled calls:
  *prefill* — the rows still reading their prompts are gathered out of the cache, advanced by one chunk of at most
  ``prefill_chunk`` tokens (a request whose prompt is longer is prefilled over several iterations, with decode chunks
  of the other rows in between), scattered back; a row whose prompt is complete samples its first token;
  *decode* — the occupied slots decode up to ``chunk_size`` tokens in one device loop (as in
  :mod:`gptoss_jax.generate`: a fixed trip count on GPUs, whose while loops sync with the host every step); rows
  that are empty or finished are masked (length 0: no cache write). When fewer than half the slots are busy, only
  the live rows are gathered into a batch bucket (a power of two) and scattered back, so a light load runs a small
  step instead of a ``max_batch`` one.
  Prefill of newcomers can be bounded (``prefill_budget`` prompt tokens per iteration) while other rows decode.
* Host work is off the critical path (JAX's asynchronous dispatch): the decode state — each slot's last token,
  position, finished flag, tokens so far — stays on the device as a slot-indexed *carry* that every call returns
  and the next one takes, so decode chunk k + 1 is dispatched before chunk k's tokens are read. The host then
  delivers chunk k (tokens, detokenization, stop strings, streaming), sweeps cancellations and deadlines, admits
  queued requests, and dispatches chunk k + 2, all while the device computes chunk k + 1. Rows the host ends (a
  stop string, a cancellation) are masked from the next dispatch; what the already-dispatched chunk generated for
  them is dropped when read (each call remembers which request held each row), never streamed.
* Every sampling parameter is per row (temperature, top-k, top-p, seed, max tokens, stop ids), so requests with
  different parameters share one batch. Each row samples with its own key ``fold_in(seed_key(seed), step)``, exactly
  the stream :func:`gptoss_jax.generate` uses for a prompt run alone, so results (greedy or seeded) do not depend on
  what else is in the batch. The static sampling *mode* is the union over the active rows (greedy only when every
  row is greedy), so the number of compilations stays small.

The host talks to the scheduler through :meth:`Engine.submit` (thread-safe; raises :class:`QueueFull`,
:class:`ShuttingDown`, :class:`PromptTooLong`) and receives :class:`Delta` / :class:`Finished` events through the
request's ``emit`` callback, called on the scheduler thread.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.errors import GptOssError
from gptoss_jax.generate import (DEFAULT_PREFILL_CHUNK, MAX_STOP_TOKEN_IDS, NO_TOKEN, TRACE_COUNTS, GenerationError,
                                 SamplingParams, TextStreamer, batch_bucket, decode_loop, length_bucket,
                                 on_graph_platform)
from gptoss_jax.kv_cache import init_cache
from gptoss_jax.sampling import _sample as _sample_rows
from gptoss_jax.sampling import greedy
from gptoss_jax.validation import seed_key

log = logging.getLogger("gptoss_jax.serve")

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


class EngineError(GptOssError, RuntimeError):
    """Base of the scheduler's admission errors."""
    status = 500


class InvalidParams(EngineError):
    """A request's sampling parameters failed ``SamplingParams.checked``; ``field`` names the field."""
    status = 400

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class QueueFull(EngineError):
    status = 429


class ShuttingDown(EngineError):
    status = 503


class PromptTooLong(EngineError):
    status = 413


@dataclasses.dataclass
class Delta:
    """New output of one request since the previous event.

    tokens: new token ids (a closing stop token included); text: new text that is safe to show (stop tokens left
    out, held back while it may be the start of a stop string); logprobs: per new token
    ``(logprob, [(id, logprob), ...top])`` from the model's raw distribution (float32), or None when not requested.
    """
    tokens: list[int]
    text: str
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclasses.dataclass
class Finished:
    """The request ended. reason: "stop_token" | "stop_string" | "length" | "cancelled" | "timeout" | "shutdown" |
    "error". tokens: every generated id (cut at a stop string); text: the whole text."""
    reason: str
    tokens: list[int]
    text: str
    prompt_tokens: int
    time_to_first_token_s: float | None
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request. `emit(event)` is called on the scheduler thread (must not block).

    prompt: token ids; params: how to sample and when to stop (:class:`gptoss_jax.generate.SamplingParams`, checked
    by :meth:`Engine.submit` with ``SamplingParams.checked`` — the one place sampling arguments are validated; stop
    token ids end the row and are kept as its last token, stop strings end it on the decoded text); logprobs: None
    (off) or the number of top alternatives (0..20) returned per token; text: False when the consumer reads token
    ids only (chat parses harmony from ids), which spares the incremental detokenization; deadline:
    time.monotonic() after which the request is ended with reason "timeout".
    """
    prompt: list[int]
    emit: Callable[[object], None]
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    logprobs: int | None = None
    text: bool = True  # False: the consumer reads token ids only (no detokenization unless stop strings need it)
    deadline: float | None = None
    request_id: str = ""
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False

    def cancel(self) -> None:
        """Ends the request at the scheduler's next step (thread-safe: one flag write)."""
        self.cancelled = True


# ------------------------------------------------------------------------------------------------------------------
# Compiled steps. Like generate's, they take the model's StaticGraph as a static argument.
def _row_keys(keys, steps):
    """keys uint32 [B, 2] (threefry key data per row), steps [B] → one typed key per row: fold_in(key_b, step_b)."""
    typed = jax.random.wrap_key_data(keys, impl="threefry2x32")
    return jax.vmap(jax.random.fold_in)(typed, steps)


def _sample_per_row(logits, keys, steps, temperature, top_k, top_p, mode):
    """logits [B, V] float32 → tokens [B]: row b samples exactly as a batch of one with key fold_in(key_b, step_b)
    would (generate's stream for that prompt alone); greedy rows take the argmax."""
    all_greedy, use_k, use_p = mode
    if all_greedy:
        return greedy(logits)
    row_keys = _row_keys(keys, steps)

    def one(lg, key, t, k, p):
        return _sample_rows(lg[None], key, t[None], k[None], p[None], use_k=use_k, use_p=use_p)[0]

    return jax.vmap(one)(logits, row_keys, temperature, top_k, top_p)


def _logprobs(logits, tokens, top: int):
    """Raw-distribution log-probabilities: of `tokens` [B], and the `top` best (ids, values) [B, top]."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, jnp.maximum(tokens, 0)[:, None], axis=-1)[:, 0]
    vals, ids = jax.lax.top_k(lp, top)
    return chosen, ids.astype(jnp.int32), vals


def _gather_rows(tree, slots):
    """Rows `slots` [b] of every cache array (batch axis 1); out-of-range indices (padding) read a clipped row."""
    return jax.tree.map(lambda a: jnp.take(a, slots, axis=1, mode="clip"), tree)


def _scatter_rows(tree, slots, rows):
    """Writes `rows` back at `slots` (batch axis 1); out-of-range indices (padding) are dropped."""
    return jax.tree.map(lambda a, r: a.at[:, slots].set(r, mode="drop"), tree, rows)


def _prefill_step_impl(graph, state, cache, carry, params, slots, tokens, start, lengths, done, *, first: bool, mode,
                       top: int, placement=(None, None)):
    """Advances rows `slots` [b] (index ≥ batch: padding, untouched) by one prompt chunk tokens [b, C] written at
    positions start … start + lengths - 1. ``first``: the rows' prompts start here (their cache rows are cleared and
    the chunk attends only to itself, as generate's one-shot prefill); else it attends to the cache too (as its
    chunked prefill). Rows whose prompt ends with this chunk (``done`` [b]) sample their first token, and their
    entries of the slot-space decode carry (last token, position, finished, tokens so far; see
    :func:`_decode_impl`) are set, so the next decode call continues them without a round trip through the host.
    Returns the cache, the carry, each row's sampled first token [b] and its logprobs (or None)."""
    TRACE_COUNTS[("serve_prefill", graph)] += 1
    model = graph.merge(state)
    max_new, stop_ids, keys, temperature, top_k, top_p = (jnp.take(p, slots, axis=0, mode="clip") for p in params)
    rows = _gather_rows(cache, slots)
    if first:
        rows = tuple(dataclasses.replace(c, pos=jnp.full_like(c.pos, -1)) for c in rows)
    logits, rows = model(tokens, start=start, lengths=lengths, cache=rows, attend_to_cache=not first,
                         logits_for="last")
    cache = _scatter_rows(cache, slots, rows)
    logits = logits[:, 0].astype(jnp.float32)
    tok = _sample_per_row(logits, keys, jnp.zeros_like(lengths), temperature, top_k, top_p, mode)
    lp = _logprobs(logits, tok, top) if top else None
    stopped = jnp.any(tok[:, None] == stop_ids, axis=-1) | (max_new <= 1)

    def put(a, v):
        return a.at[slots].set(jnp.where(done, v, jnp.take(a, slots, mode="clip")), mode="drop")

    token, pos, finished, n = carry
    carry = (put(token, tok), put(pos, start + lengths), put(finished, stopped), put(n, jnp.ones_like(n[slots])))
    cache, carry = _pin(cache, carry, placement)
    return cache, carry, tok, lp


def _pin(cache, carry, placement):
    """Pins the layouts of the outputs the next call takes: ``placement`` = (cache constraint function or None,
    carry sharding or None). On a mesh, without it each call's outputs would be laid out as the compiler's
    propagation found for that call, and the next call would compile again for a layout warmup did not see."""
    constrain, carry_sharding = placement
    if constrain is not None:
        cache = constrain(cache)
    if carry_sharding is not None:
        carry = jax.lax.with_sharding_constraint(carry, carry_sharding)
    return cache, carry


def _decode_step_impl(graph, state, cache, last_token, positions, finished, num_generated, max_new_tokens, stop_ids,
                      keys, temperature, top_k, top_p, *, steps: int, mode, top: int, early_exit: bool = True):
    """Up to `steps` decode steps for every row of `cache` (finished rows masked). Per row: max_new_tokens [B], stop
    ids [B, K] (-1 padded), key data [B, 2]; step s of a row samples with fold_in(key, s) (s = tokens so far).
    Returns the cache, tokens [B, steps] (NO_TOKEN where none), logprobs (or None) and the loop state (last token,
    position, finished, tokens so far)."""
    TRACE_COUNTS[("serve_decode", graph)] += 1
    model = graph.merge(state)
    batch = last_token.shape[0]
    out = jnp.full((batch, steps), NO_TOKEN, jnp.int32)
    lp_out = (jnp.zeros((batch, steps), jnp.float32), jnp.zeros((batch, steps, top), jnp.int32),
              jnp.zeros((batch, steps, top), jnp.float32)) if top else None

    def cond(carry):
        i, finished = carry[0], carry[4]
        return (i < steps) & ~jnp.all(finished)

    def body(carry):
        i, cache, token, pos, finished, n, out, lp_out = carry
        active = ~finished
        logits, cache = model(token[:, None], start=pos, lengths=active.astype(jnp.int32), cache=cache,
                              attend_to_cache=True, logits_for="last")
        logits = logits[:, 0].astype(jnp.float32)
        new = _sample_per_row(logits, keys, n, temperature, top_k, top_p, mode)
        new = jnp.where(active, new, NO_TOKEN)
        if top:
            c, ids, vals = _logprobs(logits, new, top)
            lp_out = (lp_out[0].at[:, i].set(c), lp_out[1].at[:, i].set(ids), lp_out[2].at[:, i].set(vals))
        n = n + active.astype(jnp.int32)
        stopped = jnp.any(new[:, None] == stop_ids, axis=-1)
        finished = finished | (active & (stopped | (n >= max_new_tokens)))
        out = out.at[:, i].set(new)
        token = jnp.where(active, new, token)
        pos = pos + active.astype(jnp.int32)
        return i + 1, cache, token, pos, finished, n, out, lp_out

    carry = (jnp.int32(0), cache, last_token, positions, finished, num_generated, out, lp_out)
    _, cache, token, pos, finished, n, out, lp_out = decode_loop(cond, body, carry, steps=steps,
                                                                 early_exit=early_exit)
    return cache, out, lp_out, (token, pos, finished, n)


def _decode_impl(graph, state, cache, carry, params, live, slots, *, steps: int, mode, top: int, compact: bool,
                 placement=(None, None), early_exit: bool = True):
    """One decode chunk whose inputs stay on the device: ``carry`` = (last token, position, finished, tokens so far),
    each [max_batch] in *slot space* (row i = slot i), is what the previous prefill / decode call returned, so call
    k + 1 can be dispatched before the host has read call k's tokens. ``params`` = (max_new_tokens, stop ids, key
    data, temperature, top_k, top_p), slot space, from the host. ``live`` [max_batch] bool: the slots the host lets
    decode (False: empty, still prefilling, or ended on the host — a stop string, a cancellation — which the device
    cannot see). ``compact``: only rows ``slots`` [b] (index ≥ max_batch: padding) are gathered out of the cache,
    decoded and scattered back (a light load runs a b-row step); else every slot runs (``slots`` unused).
    Returns the cache, tokens [b, steps] in ``slots`` order (NO_TOKEN where none), logprobs (or None), and the new
    slot-space carry."""
    token, pos, finished, n = carry
    finished = finished | ~live
    if not compact:
        cache, out, lp, carry = _decode_step_impl(graph, state, cache, token, pos, finished, n, *params, steps=steps,
                                                  mode=mode, top=top, early_exit=early_exit)
        cache, carry = _pin(cache, carry, placement)
        return cache, out, lp, carry
    take = functools.partial(jnp.take, indices=slots, axis=0, mode="clip")
    rows_in = (take(token), take(pos), jnp.take(finished, slots, mode="fill", fill_value=True), take(n))
    rows, out, lp, rows_out = _decode_step_impl(graph, state, _gather_rows(cache, slots), *rows_in,
                                                *(take(p) for p in params), steps=steps, mode=mode, top=top,
                                                early_exit=early_exit)
    cache = _scatter_rows(cache, slots, rows)
    carry = tuple(a.at[slots].set(r, mode="drop") for a, r in zip((token, pos, finished, n), rows_out))
    cache, carry = _pin(cache, carry, placement)
    return cache, out, lp, carry


@functools.partial(jax.jit, static_argnums=0)
def _initial_carry(batch: int):
    z = jnp.zeros((batch,), jnp.int32)
    return z, z, jnp.ones((batch,), bool), z


_prefill_step = jax.jit(on_graph_platform(_prefill_step_impl), static_argnums=0,
                        static_argnames=("first", "mode", "top", "placement"),
                        donate_argnames=("cache",))
_decode = jax.jit(on_graph_platform(_decode_impl), static_argnums=0,
                  static_argnames=("steps", "mode", "top", "compact", "placement", "early_exit"),
                  donate_argnames=("cache",))


# ------------------------------------------------------------------------------------------------------------------
class _NoText:
    """Stands in for a TextStreamer when the consumer wants token ids only."""

    def add(self, ids):
        return None

    def final_text(self) -> str:
        return ""

    def take(self) -> str:
        return ""


@dataclasses.dataclass(eq=False)
class _Slot:
    """Host state of one occupied slot."""
    req: Request
    streamer: TextStreamer | _NoText
    key: np.ndarray  # uint32 [2]
    prefilled: int = 0  # prompt tokens already in the cache
    tokens: list = dataclasses.field(default_factory=list)
    first_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.req.prompt)


@dataclasses.dataclass(eq=False)
class _Call:
    """A dispatched compiled call whose results the host has not read yet. rows: (row in the outputs, slot, the
    _Slot that held it at dispatch) for the rows whose tokens go to a request; outputs: (tokens, logprobs) device
    arrays."""
    kind: str  # "prefill" | "decode"
    rows: list
    outputs: tuple


class Metrics:
    """Counters the /metrics endpoint exports (read without locks: ints and floats, written by one thread).

    Scheduler timing (seconds, summed): ``host_s`` — the scheduler thread working (admissions, building a call's
    arrays, dispatching it, delivering tokens, detokenizing, stop strings); ``wait_s`` — blocked on the device for a
    call's results; ``idle_s`` — nothing to do. With overlap the device runs call k + 1 during the host work for call
    k, so ``wait_s`` > 0 means the device is the bottleneck; ``starved`` counts dispatches that found the device
    already done with everything sent before (it waited for the host), and ``device_idle_s`` sums, over those, the
    time since the device was last known busy (the later of the previous dispatch and the return of the last read
    that had to wait): an upper bound of the device's idle time while there was work."""

    def __init__(self):
        self.requests_finished = collections.Counter()  # by reason
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft: list[float] = []  # seconds, appended by the scheduler; the server drains it into a histogram
        self.active = 0
        self.decode_calls = 0  # decode calls (chunks)
        self.decode_steps = 0  # model steps those calls ran (≤ chunk_size each: the loop exits early)
        self.prefill_calls = 0
        self.occupancy_sum = 0.0  # summed live rows / max_batch over decode calls
        self.host_s = 0.0
        self.wait_s = 0.0
        self.idle_s = 0.0
        self.dispatches = 0
        self.starved = 0
        self.device_idle_s = 0.0  # upper bound of the time the device sat idle waiting for the host (see _dispatch)


class Engine:
    """The scheduler (see the module doc) around a loaded :class:`gptoss_jax.api.InferenceModel`.

    max_batch: decode slots (rows of the KV cache); max_queue: waiting requests beyond which submit raises
    QueueFull; chunk_size: decode steps per call (the admission latency of a newcomer is at most one chunk);
    prefill_chunk: prompt tokens per prefill call and row. prefill_budget: None (default) lets every waiting row (up
    to max_prefill_rows) prefill in one iteration; an int bounds the prompt tokens (rows × chunk length, padded) one
    iteration prefills while other rows are decoding, so newcomers stall the decoding rows by at most about one such
    call per chunk — lower TPOT for running requests, but a burst of arrivals then takes many iterations to admit
    (on the H200 a budget of 2,048 cut the aggregate tokens/s of 64 / 256 simultaneous clients, docs/SERVING.md).
    overlap: dispatch decode chunk k + 1 before reading chunk k's tokens
    (the host's per-chunk work runs while the device computes; False: one call at a time, for measurements). The
    KV cache holds max_batch × model.max_seq_len positions per layer (sliding layers: the window).
    """

    def __init__(self, model, *, max_batch: int = 16, max_queue: int = 256, chunk_size: int = 8,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_prefill_rows: int | None = None,
                 overlap: bool = True, prefill_budget: int | None = None):
        if model.tokenizer is None:
            raise EngineError("serving needs a tokenizer (tokenizer.json in the checkpoint folder)")
        if max_batch < 1 or max_queue < 0 or chunk_size < 1 or prefill_chunk < 1:
            raise EngineError("max_batch, chunk_size and prefill_chunk must be ≥ 1 and max_queue ≥ 0")
        if prefill_budget is not None and prefill_budget < 1:
            raise EngineError("prefill_budget must be ≥ 1 (or None: unbounded)")
        self.prefill_budget = None if prefill_budget is None else int(prefill_budget)
        self.model = model
        self.gen = model.generator
        if self.gen.batch_multiple != 1:
            max_batch = -(-max_batch // self.gen.batch_multiple) * self.gen.batch_multiple
        self.max_batch, self.max_queue, self.chunk_size = int(max_batch), int(max_queue), int(chunk_size)
        self.prefill_chunk = int(prefill_chunk)
        self.max_prefill_rows = int(max_prefill_rows or max_batch)
        self.max_seq_len = model.max_seq_len
        self.metrics = Metrics()
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._slots: list[_Slot | None] = [None] * self.max_batch
        self._thread: threading.Thread | None = None
        self._cache = None
        self._carry = None  # slot-space decode state on the device (see _decode_impl)
        self.overlap = bool(overlap)
        self._pending: collections.deque[_Call] = collections.deque()  # dispatched, results not read yet
        self._busy_mark = 0.0  # perf_counter time until which the device is known to have been busy
        mesh = getattr(model, "mesh", None)
        # (cache layout, carry layout) every call's outputs are pinned to (see _pin): the mesh's cache rules and a
        # replicated carry; on one device the outputs follow the committed inputs
        self._placement = (self.gen.cache_constraint, None if mesh is None else
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        b, k = self.max_batch, MAX_STOP_TOKEN_IDS
        # slot-space sampling parameters (host copies, set at admission): max_new, stop ids, key data, temperature,
        # top_k, top_p
        self._params = (np.ones((b,), np.int32), np.full((b, k), NO_TOKEN, np.int32), np.zeros((b, 2), np.uint32),
                        np.zeros((b,), np.float32), np.zeros((b,), np.int32), np.ones((b,), np.float32))

    # -------------------------------------------------------------------------------------------------- public
    def start(self) -> "Engine":
        if self._thread is None:
            self._cache = self._new_cache()
            self._carry = self._initial_carry()
            self._thread = threading.Thread(target=self._loop, name="gptoss-serve-scheduler", daemon=True)
            self._thread.start()
        return self

    def submit(self, req: Request) -> None:
        """Queues a request (thread-safe). Raises EngineError for an empty prompt or ids outside the vocabulary,
        InvalidParams (a GenerationError from ``SamplingParams.checked``; ``field`` names the bad field),
        PromptTooLong (prompt + max_new_tokens over the context), QueueFull (max_queue waiting) or ShuttingDown.
        ``req.params`` is replaced by its checked (normalised) copy."""
        if not req.prompt:
            raise EngineError("empty prompt")
        vocab = self.model.config.vocab_size
        if min(req.prompt) < 0 or max(req.prompt) >= vocab:
            raise EngineError(f"prompt token ids must lie in [0, {vocab})")
        try:
            req.params = req.params.checked(vocab)
        except GenerationError as e:
            raise InvalidParams(str(e), field=e.field) from None
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParams(f"logprobs must be None or in [0, {MAX_TOP_LOGPROBS}], got {req.logprobs}",
                                field="logprobs")
        max_new = req.params.max_new_tokens
        if len(req.prompt) + max_new > self.max_seq_len:
            raise PromptTooLong(f"prompt of {len(req.prompt)} tokens + max_tokens {max_new} exceeds the "
                                f"context of {self.max_seq_len} tokens")
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue={self.max_queue}); retry later")
            self._queue.append(req)
            self._cv.notify()

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def active_slots(self) -> int:
        return sum(s is not None for s in self._slots)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stops admitting (submit raises ShuttingDown), ends queued and running requests with reason "shutdown",
        and joins the scheduler thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -------------------------------------------------------------------------------------------------- loop
    def _new_cache(self):
        """The KV cache, placed like the outputs of the compiled calls that replace it (committed to the model's
        device, or laid out by the mesh's rules): an uncommitted first cache would compile the first call twice,
        once for it and once for the calls' own outputs."""
        cache = init_cache(self.model.config, self.max_batch, self.max_seq_len, self.gen.cache_dtype)
        if self.gen.cache_constraint is not None:
            return jax.jit(self.gen.cache_constraint)(cache)
        return self._place(cache)

    def _place(self, tree):
        """Commits arrays to the model's device (one device) or replicates them over its mesh."""
        mesh = getattr(self.model, "mesh", None)
        if mesh is not None:
            return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        return jax.device_put(tree, min(jax.tree.leaves(self.gen.state_leaves)[0].devices(), key=lambda d: d.id))

    def _initial_carry(self):
        """The slot-space decode carry with every slot finished, placed like the outputs of the calls that replace
        it (see _new_cache)."""
        return self._place(_initial_carry(self.max_batch))

    def _loop(self) -> None:
        m = self.metrics
        try:
            while True:
                t0 = time.perf_counter()
                with self._cv:
                    if self._stopping:
                        break
                    if not self._queue and self.active_slots == 0 and not self._pending:
                        self._cv.wait(timeout=0.5)
                        self._busy_mark = time.perf_counter()  # no work: the device's idle time is not the host's
                        m.idle_s += self._busy_mark - t0
                        continue
                wait0 = m.wait_s
                self._sweep()
                self._admit()
                m.active = self.active_slots
                dispatched = False
                if any(s is not None and s.prefilling for s in self._slots):
                    dispatched |= self._prefill()
                if any(s is not None and not s.prefilling for s in self._slots):
                    dispatched |= self._decode()
                # Read the results of every call but the last one dispatched: the device computes that one while
                # the host delivers the others' tokens (its inputs are the previous call's device outputs). With
                # nothing new dispatched (or overlap off) read everything.
                keep = 1 if self.overlap and dispatched else 0
                while len(self._pending) > keep:
                    self._process(self._pending.popleft())
                m.host_s += time.perf_counter() - t0 - (m.wait_s - wait0)
        except Exception as e:  # noqa: BLE001 — the server must answer every request even if a step failed
            log.exception("scheduler failed")
            self._pending.clear()
            self._fail_all("error", f"internal error in the scheduler: {type(e).__name__}")
            with self._cv:
                self._stopping = True
            return
        self._pending.clear()
        self._fail_all("shutdown", "the server is shutting down")

    def _fail_all(self, reason: str, message: str) -> None:
        with self._cv:
            queued, self._queue = list(self._queue), collections.deque()
        for req in queued:
            self._emit(req, Finished(reason, [], "", len(req.prompt), None, error=message))
        for i, s in enumerate(self._slots):
            if s is not None:
                self._finish(i, reason, error=message)

    def _emit(self, req: Request, event) -> None:
        try:
            req.emit(event)
        except Exception:  # noqa: BLE001 — a consumer's failure must not stop the others
            log.exception("emit failed for request %s", req.request_id)
            req.cancelled = True

    def _sweep(self) -> None:
        """Ends running requests that were cancelled (client gone) or passed their deadline; frees their slots."""
        now = time.monotonic()
        for i, s in enumerate(self._slots):
            if s is None:
                continue
            if s.req.cancelled:
                self._finish(i, "cancelled")
            elif s.req.deadline is not None and now > s.req.deadline:
                self._finish(i, "timeout", error="the request timed out")

    def _admit(self) -> None:
        now = time.monotonic()
        free = [i for i, s in enumerate(self._slots) if s is None]
        while free:
            with self._cv:
                if not self._queue:
                    return
                req = self._queue.popleft()
            if req.cancelled:
                self._emit(req, Finished("cancelled", [], "", len(req.prompt), None))
                continue
            if req.deadline is not None and now > req.deadline:
                self._emit(req, Finished("timeout", [], "", len(req.prompt), None,
                                         error="the request timed out while queued"))
                self.metrics.requests_finished["timeout"] += 1
                continue
            p = req.params
            key = np.array([p.seed >> 32, p.seed & 0xFFFFFFFF], np.uint32)
            streamer = TextStreamer(self.model._decode_lenient, p.stop_strings) \
                if req.text or p.stop_strings else _NoText()
            i = free.pop(0)
            self._slots[i] = _Slot(req, streamer, key)
            max_new, stop, keys, temp, top_k, top_p = self._params
            max_new[i], keys[i], temp[i], top_k[i], top_p[i] = p.max_new_tokens, key, p.temperature, p.top_k, p.top_p
            stop[i] = NO_TOKEN
            stop[i, :len(p.stop_token_ids)] = p.stop_token_ids

    def _mode(self, slots) -> tuple[bool, bool, bool]:
        modes = [s.req.params.mode for s in slots]  # (greedy, top-k on, top-p on) per row
        if all(m[0] for m in modes):
            return True, False, False
        return False, any(m[1] for m in modes), any(m[2] for m in modes)

    def _top(self, slots) -> int:
        return MAX_TOP_LOGPROBS if any(s.req.logprobs is not None for s in slots) else 0

    def _width(self, rest: int) -> int:
        """Prefill chunk length for rows with up to `rest` prompt tokens left (a bucket ≤ prefill_chunk)."""
        return min(length_bucket(min(rest, self.prefill_chunk), cap=self.prefill_chunk), self.max_seq_len)

    def warmup(self, prompt_len: int = 128) -> None:
        """Compiles, before the first request, what greedy traffic with prompts of about `prompt_len` tokens needs:
        the first-chunk prefill at every rows bucket up to max_prefill_rows, and the decode step at every batch
        bucket. Call before :meth:`start` (the calls write nothing: every row is padding or not live)."""
        if self._thread is not None:
            raise EngineError("warmup() must run before start()")
        cache = self._new_cache()
        carry = self._initial_carry()
        width, b, n = self._width(prompt_len), self.max_batch, 1
        while True:
            rows = batch_bucket(n, self.gen.batch_multiple)
            z = np.zeros((rows,), np.int32)
            cache, carry, _, _ = _prefill_step(self.gen.graph, self.gen.state_leaves, cache, carry, self._params,
                                               np.full((rows,), b, np.int32), np.zeros((rows, width), np.int32), z,
                                               z, np.zeros((rows,), bool), first=True, mode=(True, False, False),
                                               top=0, placement=self._placement)
            if rows >= self.max_prefill_rows:
                break
            n = rows * 2
        rows = batch_bucket(1, self.gen.batch_multiple)
        live = np.zeros((b,), bool)
        while True:  # the decode step at every batch bucket: the compact ones (live rows only), then all slots
            rows = min(rows, b)
            cache, _, _, carry = _decode(self.gen.graph, self.gen.state_leaves, cache, carry, self._params, live,
                                         np.full((rows,), b, np.int32), steps=self.chunk_size,
                                         mode=(True, False, False), top=0, compact=rows < b,
                                         placement=self._placement, early_exit=self.gen.early_exit)
            if rows >= b:
                break
            rows = batch_bucket(rows * 2, self.gen.batch_multiple)
        jax.block_until_ready((cache, carry))

    def _dispatch(self, call: "_Call") -> None:
        m = self.metrics
        m.dispatches += 1
        now = time.perf_counter()
        if not self._pending or all(a.is_ready() for a in jax.tree.leaves(self._pending[-1].outputs)):
            m.starved += 1  # the device had finished everything sent before: it waited for the host
            m.device_idle_s += max(0.0, now - self._busy_mark)
        self._busy_mark = max(self._busy_mark, now)
        self._pending.append(call)
        if not self.overlap:  # one call at a time: read it before anything else is dispatched
            self._process(self._pending.popleft())

    def _prefill(self) -> bool:
        """One prompt chunk for the prefilling rows: the rows starting their prompts (cache rows cleared) and the
        rows continuing one are separate calls (static `first`). While other rows are decoding, one iteration
        prefills at most about `prefill_budget` prompt tokens (rows × chunk length, padded; when set), so the
        decoding rows wait for at most one such call between their chunks; otherwise up to max_prefill_rows rows
        go at once. Returns whether a call was dispatched."""
        decoding = any(s is not None and not s.prefilling for s in self._slots)
        budget = self.prefill_budget if decoding else None
        dispatched = False
        for first in (False, True):  # continuing prompts first: they hold slots and are nearer their first token
            idx = [i for i, s in enumerate(self._slots) if s is not None and s.prefilling
                   and (s.prefilled == 0) == first][:self.max_prefill_rows]
            if not idx:
                continue
            if budget is not None and budget <= 0:
                break
            width = self._width(max(len(self._slots[i].req.prompt) - self._slots[i].prefilled for i in idx))
            if budget is not None:
                fit = max(1, budget // width)
                fit = 1 << (fit.bit_length() - 1)  # the rows bucket (a power of two) stays within the budget
                if fit < len(idx):
                    idx = idx[:fit]
                    width = self._width(max(len(self._slots[i].req.prompt) - self._slots[i].prefilled for i in idx))
                budget -= batch_bucket(len(idx), self.gen.batch_multiple) * width
            slots = [self._slots[i] for i in idx]
            rows = batch_bucket(len(idx), self.gen.batch_multiple)
            tokens = np.zeros((rows, width), np.int32)
            start = np.zeros((rows,), np.int32)
            lengths = np.zeros((rows,), np.int32)
            done = np.zeros((rows,), bool)
            slot_ids = np.full((rows,), self.max_batch, np.int32)  # padding rows: out of range, never written
            for r, (i, s) in enumerate(zip(idx, slots)):
                n = min(width, len(s.req.prompt) - s.prefilled)
                tokens[r, :n] = s.req.prompt[s.prefilled:s.prefilled + n]
                start[r], lengths[r], slot_ids[r] = s.prefilled, n, i
                s.prefilled += n
                done[r] = not s.prefilling
            self._cache, self._carry, tok, lp = _prefill_step(
                self.gen.graph, self.gen.state_leaves, self._cache, self._carry, self._params, slot_ids, tokens,
                start, lengths, done, first=first, mode=self._mode(slots), top=self._top(slots),
                placement=self._placement)
            self.metrics.prefill_calls += 1
            self._dispatch(_Call("prefill", [(r, i, s) for r, (i, s) in enumerate(zip(idx, slots)) if done[r]],
                                 (tok, lp)))
            dispatched = True
        return dispatched

    def _decode(self) -> bool:
        """Dispatches one decode chunk over the slots whose prompt is in: all slots when most are busy, else only
        the live rows gathered into a batch bucket (a power of two), so a light load does not pay for a full
        ``max_batch`` step. Its inputs are the device carry left by the previous call; nothing is read back here."""
        live_ids = [i for i, s in enumerate(self._slots) if s is not None and not s.prefilling]
        if not live_ids:
            return False
        live = [self._slots[i] for i in live_ids]
        bucket = batch_bucket(len(live_ids), self.gen.batch_multiple)
        compact = bucket < self.max_batch
        slot_ids = np.full((bucket if compact else self.max_batch,), self.max_batch, np.int32)
        rows = live_ids if compact else list(range(self.max_batch))
        slot_ids[:len(rows)] = rows
        mask = np.zeros((self.max_batch,), bool)
        mask[live_ids] = True
        self.metrics.decode_calls += 1
        self.metrics.occupancy_sum += len(live) / self.max_batch
        self._cache, out, lp, self._carry = _decode(
            self.gen.graph, self.gen.state_leaves, self._cache, self._carry, self._params, mask, slot_ids,
            steps=self.chunk_size, mode=self._mode(live), top=self._top(live), compact=compact,
            placement=self._placement, early_exit=self.gen.early_exit)
        self._dispatch(_Call("decode", [(r, i, self._slots[i]) for r, i in enumerate(rows) if mask[i]], (out, lp)))
        return True

    def _process(self, call: "_Call") -> None:
        """Reads one dispatched call's results (the only host sync per call) and delivers them to the requests that
        still hold their slots — a row ended on the host meanwhile (stop string, cancellation) or handed to a new
        request gets nothing: tokens generated past a stop in an overlapped chunk are dropped, never streamed.
        The time blocked on the device goes to ``metrics.wait_s``."""
        t0 = time.perf_counter()
        first, lp = jax.device_get(call.outputs)
        t1 = time.perf_counter()
        waited = t1 - t0
        self.metrics.wait_s += waited
        if waited > 1e-4:  # it had to wait: the device was busy until t1
            self._busy_mark = max(self._busy_mark, t1)
        if call.kind == "prefill":
            now = time.monotonic()
            for r, i, s in call.rows:
                if self._slots[i] is not s:
                    continue
                self.metrics.prompt_tokens += len(s.req.prompt)
                s.first_token_at = now
                self.metrics.ttft.append(now - s.req.arrival)
                lps = None if lp is None else [(float(lp[0][r]), list(zip(lp[1][r].tolist(), lp[2][r].tolist())))]
                self._deliver(i, [int(first[r])], lps)
            return
        out = first
        self.metrics.decode_steps += int((out != NO_TOKEN).any(axis=0).sum())
        for r, i, s in call.rows:
            if self._slots[i] is not s:
                continue
            row = out[r]
            cols = np.flatnonzero(row != NO_TOKEN)
            if not len(cols):
                continue
            lps = None if lp is None else [(float(lp[0][r, c]), list(zip(lp[1][r, c].tolist(),
                                                                          lp[2][r, c].tolist()))) for c in cols]
            self._deliver(i, row[cols].tolist(), lps)

    def _deliver(self, i: int, new: list[int], lps) -> None:
        """Appends a row's new tokens, applies stop tokens / strings / limits, emits a Delta, finishes the row."""
        s = self._slots[i]
        r = s.req
        s.tokens.extend(new)
        self.metrics.generation_tokens += len(new)
        reason = None
        if new and new[-1] in r.params.stop_token_ids:
            reason = "stop_token"
        elif len(s.tokens) >= r.params.max_new_tokens:  # the device stops the row on the same two conditions
            reason = "length"
        text_ids = new[:-1] if reason == "stop_token" else new
        keep = s.streamer.add(text_ids)
        if keep is not None:  # a stop string: keep the shortest token prefix whose text contains it
            drop = len(s.tokens) - keep
            s.tokens = s.tokens[:keep]
            new = new[:max(0, len(new) - drop)]
            if lps is not None:
                lps = lps[:len(new)]
            reason = "stop_string"
        if reason is not None:
            s.streamer.final_text()
        text = s.streamer.take()
        if new or text:
            self._emit(r, Delta(new, text, lps))
        if r.cancelled:
            reason = "cancelled"
        elif reason is None and r.deadline is not None and time.monotonic() > r.deadline:
            reason = "timeout"
        if reason is not None:
            self._finish(i, reason, error="the request timed out" if reason == "timeout" else None)

    def _finish(self, i: int, reason: str, error: str | None = None) -> None:
        s = self._slots[i]
        self._slots[i] = None
        r = s.req
        ttft = None if s.first_token_at is None else s.first_token_at - r.arrival
        self.metrics.requests_finished[reason] += 1
        self._emit(r, Finished(reason, list(s.tokens), s.streamer.final_text(), len(r.prompt), ttft, error=error))
