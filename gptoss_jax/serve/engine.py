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
  *decode* — the occupied slots decode up to ``chunk_size`` tokens in one ``lax.while_loop`` (as in
  :mod:`gptoss_jax.generate`); rows that are empty or finished are masked (length 0: no cache write). When fewer
  than half the slots are busy, only the live rows are gathered into a batch bucket (a power of two) and scattered
  back, so a light load runs a small step instead of a ``max_batch`` one.
  Between calls the host admits queued requests into free slots, delivers new tokens, checks stop strings,
  cancellations and deadlines, and frees slots.
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
from gptoss_jax.generate import (DEFAULT_PREFILL_CHUNK, MAX_STOP_TOKEN_IDS, NO_TOKEN, TRACE_COUNTS, TextStreamer,
                                 batch_bucket, length_bucket)
from gptoss_jax.kv_cache import init_cache
from gptoss_jax.sampling import _sample as _sample_rows
from gptoss_jax.sampling import greedy
from gptoss_jax.validation import seed_key

log = logging.getLogger("gptoss_jax.serve")

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


class EngineError(GptOssError, RuntimeError):
    """Base of the scheduler's admission errors."""
    status = 500


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

    prompt: token ids; max_new_tokens ≥ 1; temperature 0 = greedy; top_k 0 / top_p 1 disable truncation; seed in
    [0, 2**64); stop_token_ids end the row (kept as the last token); stop_strings end it on the decoded text;
    logprobs: None (off) or the number of top alternatives (0..20) returned per token; text: False when the consumer
    reads token ids only (chat parses harmony from ids), which spares the incremental detokenization; deadline:
    time.monotonic() after which the request is ended with reason "timeout".
    """
    prompt: list[int]
    emit: Callable[[object], None]
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None
    text: bool = True  # False: the consumer reads token ids only (no detokenization unless stop_strings need it)
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


def _prefill_step_impl(graph, state, cache, slots, tokens, start, lengths, keys, temperature, top_k, top_p, *,
                       first: bool, mode, top: int):
    """Advances rows `slots` [b] (index ≥ batch: padding, untouched) by one prompt chunk tokens [b, C] written at
    positions start … start + lengths - 1. ``first``: the rows' prompts start here (their cache rows are cleared and
    the chunk attends only to itself, as generate's one-shot prefill); else it attends to the cache too (as its
    chunked prefill). Returns the cache, each row's sampled first token [b] (used where the chunk ends the row's
    prompt), and its logprobs (or None)."""
    TRACE_COUNTS[("serve_prefill", graph)] += 1
    model = graph.merge(state)
    rows = jax.tree.map(lambda a: jnp.take(a, slots, axis=1, mode="clip"), cache)
    if first:
        rows = tuple(dataclasses.replace(c, pos=jnp.full_like(c.pos, -1)) for c in rows)
    logits, rows = model(tokens, start=start, lengths=lengths, cache=rows, attend_to_cache=not first,
                         logits_for="last")
    cache = jax.tree.map(lambda a, r: a.at[:, slots].set(r, mode="drop"), cache, rows)
    logits = logits[:, 0].astype(jnp.float32)
    zeros = jnp.zeros_like(lengths)
    tok = _sample_per_row(logits, keys, zeros, temperature, top_k, top_p, mode)
    lp = _logprobs(logits, tok, top) if top else None
    return cache, tok, lp


def _decode_step_impl(graph, state, cache, last_token, positions, finished, num_generated, max_new_tokens, stop_ids,
                      keys, temperature, top_k, top_p, *, steps: int, mode, top: int):
    """Up to `steps` decode steps for every slot (finished rows masked). Per row: max_new_tokens [B], stop ids
    [B, K] (-1 padded), key data [B, 2]; step s of a row samples with fold_in(key, s) (s = tokens so far). Returns
    the cache, tokens [B, steps] (NO_TOKEN where none), logprobs (or None) and the loop state."""
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
    _, cache, token, pos, finished, n, out, lp_out = jax.lax.while_loop(cond, body, carry)
    return cache, out, lp_out, token, pos, finished, n


def _decode_rows_impl(graph, state, cache, slots, *args, steps: int, mode, top: int):
    """:func:`_decode_step_impl` on rows `slots` [b] of the cache only (index ≥ batch: padding, untouched): the
    rows are gathered out of the cache, decoded and scattered back, so a step costs b rows, not every slot."""
    rows = jax.tree.map(lambda a: jnp.take(a, slots, axis=1, mode="clip"), cache)
    rows, *rest = _decode_step_impl(graph, state, rows, *args, steps=steps, mode=mode, top=top)
    cache = jax.tree.map(lambda a, r: a.at[:, slots].set(r, mode="drop"), cache, rows)
    return (cache, *rest)


_prefill_step = jax.jit(_prefill_step_impl, static_argnums=0, static_argnames=("first", "mode", "top"),
                        donate_argnames=("cache",))
_decode_rows = jax.jit(_decode_rows_impl, static_argnums=0, static_argnames=("steps", "mode", "top"),
                       donate_argnames=("cache",))
_decode_step = jax.jit(_decode_step_impl, static_argnums=0, static_argnames=("steps", "mode", "top"),
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


class Metrics:
    """Counters the /metrics endpoint exports (read without locks: ints and floats, written by one thread)."""

    def __init__(self):
        self.requests_finished = collections.Counter()  # by reason
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft: list[float] = []  # seconds, appended by the scheduler; the server drains it into a histogram
        self.active = 0
        self.decode_steps = 0
        self.occupancy_sum = 0.0  # summed active/max_batch over decode calls


class Engine:
    """The scheduler (see the module doc) around a loaded :class:`gptoss_jax.api.InferenceModel`.

    max_batch: decode slots (rows of the KV cache); max_queue: waiting requests beyond which submit raises
    QueueFull; chunk_size: decode steps per call (the admission latency of a newcomer is at most one chunk);
    prefill_chunk: prompt tokens per prefill call and row. The KV cache holds max_batch × model.max_seq_len
    positions per layer (sliding layers: the window).
    """

    def __init__(self, model, *, max_batch: int = 16, max_queue: int = 256, chunk_size: int = 8,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_prefill_rows: int | None = None):
        if model.tokenizer is None:
            raise EngineError("serving needs a tokenizer (tokenizer.json in the checkpoint folder)")
        if max_batch < 1 or max_queue < 0 or chunk_size < 1 or prefill_chunk < 1:
            raise EngineError("max_batch, chunk_size and prefill_chunk must be ≥ 1 and max_queue ≥ 0")
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

    # -------------------------------------------------------------------------------------------------- public
    def start(self) -> "Engine":
        if self._thread is None:
            cache = init_cache(self.model.config, self.max_batch, self.max_seq_len, self.gen.cache_dtype)
            if self.gen.cache_constraint is not None:
                cache = jax.jit(self.gen.cache_constraint)(cache)
            self._cache = cache
            self._thread = threading.Thread(target=self._loop, name="gptoss-serve-scheduler", daemon=True)
            self._thread.start()
        return self

    def submit(self, req: Request) -> None:
        """Queues a request (thread-safe). Raises PromptTooLong (prompt + max_new_tokens over the context),
        QueueFull (max_queue waiting) or ShuttingDown."""
        need = len(req.prompt) + req.max_new_tokens
        if not req.prompt:
            raise EngineError("empty prompt")
        vocab = self.model.config.vocab_size
        if min(req.prompt) < 0 or max(req.prompt) >= vocab:
            raise EngineError(f"prompt token ids must lie in [0, {vocab})")
        if need > self.max_seq_len:
            raise PromptTooLong(f"prompt of {len(req.prompt)} tokens + max_tokens {req.max_new_tokens} exceeds the "
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
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    if self._stopping:
                        break
                    if not self._queue and self.active_slots == 0:
                        self._cv.wait(timeout=0.5)
                        continue
                self._sweep()
                self._admit()
                self.metrics.active = self.active_slots
                if any(s is not None and s.prefilling for s in self._slots):
                    self._prefill()
                if any(s is not None and not s.prefilling for s in self._slots):
                    self._decode()
        except Exception as e:  # noqa: BLE001 — the server must answer every request even if a step failed
            log.exception("scheduler failed")
            self._fail_all("error", f"internal error in the scheduler: {type(e).__name__}")
            with self._cv:
                self._stopping = True
            return
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
            key = np.array([req.seed >> 32, req.seed & 0xFFFFFFFF], np.uint32)
            streamer = TextStreamer(self.model._decode_lenient, req.stop_strings) \
                if req.text or req.stop_strings else _NoText()
            self._slots[free.pop(0)] = _Slot(req, streamer, key)

    def _mode(self, slots) -> tuple[bool, bool, bool]:
        reqs = [s.req for s in slots]
        all_greedy = all(r.temperature == 0 for r in reqs)
        if all_greedy:
            return True, False, False
        return False, any(r.top_k > 0 for r in reqs if r.temperature > 0), any(r.top_p < 1 for r in reqs
                                                                               if r.temperature > 0)

    def _top(self, slots) -> int:
        return MAX_TOP_LOGPROBS if any(s.req.logprobs is not None for s in slots) else 0

    def _width(self, rest: int) -> int:
        """Prefill chunk length for rows with up to `rest` prompt tokens left (a bucket ≤ prefill_chunk)."""
        return min(length_bucket(min(rest, self.prefill_chunk), cap=self.prefill_chunk), self.max_seq_len)

    def warmup(self, prompt_len: int = 128) -> None:
        """Compiles, before the first request, what greedy traffic with prompts of about `prompt_len` tokens needs:
        the first-chunk prefill at every rows bucket up to max_prefill_rows, and the decode step. Call before
        :meth:`start` (the calls write nothing: every row is padding)."""
        if self._thread is not None:
            raise EngineError("warmup() must run before start()")
        cache = init_cache(self.model.config, self.max_batch, self.max_seq_len, self.gen.cache_dtype)
        width, b, n = self._width(prompt_len), self.max_batch, 1
        while True:
            rows = batch_bucket(n, self.gen.batch_multiple)
            z, f = np.zeros((rows,), np.int32), np.zeros((rows,), np.float32)
            cache, tok, _ = _prefill_step(self.gen.graph, self.gen.state_leaves, cache, np.full((rows,), b, np.int32),
                                          np.zeros((rows, width), np.int32), z, z, np.zeros((rows, 2), np.uint32),
                                          f, z, f + 1, first=True, mode=(True, False, False), top=0)
            if rows >= self.max_prefill_rows:
                break
            n = rows * 2
        rows = batch_bucket(1, self.gen.batch_multiple)
        while True:  # the decode step at every batch bucket: the compact ones (live rows only), then all slots
            rows = min(rows, b)
            z, f = np.zeros((rows,), np.int32), np.zeros((rows,), np.float32)
            args = (z, z, np.ones((rows,), bool), z, z + 1, np.full((rows, MAX_STOP_TOKEN_IDS), NO_TOKEN, np.int32),
                    np.zeros((rows, 2), np.uint32), f, z, f + 1)
            kw = dict(steps=self.chunk_size, mode=(True, False, False), top=0)
            if rows < b:
                out = _decode_rows(self.gen.graph, self.gen.state_leaves, cache, np.full((rows,), b, np.int32),
                                   *args, **kw)
            else:
                out = _decode_step(self.gen.graph, self.gen.state_leaves, cache, *args, **kw)
            cache = out[0]
            if rows >= b:
                break
            rows = batch_bucket(rows * 2, self.gen.batch_multiple)
        jax.block_until_ready(out)

    def _prefill(self) -> None:
        """One prompt chunk for the prefilling rows: the rows starting their prompts (cache rows cleared) and the
        rows continuing one are separate calls (static `first`)."""
        for first in (True, False):
            idx = [i for i, s in enumerate(self._slots) if s is not None and s.prefilling
                   and (s.prefilled == 0) == first][:self.max_prefill_rows]
            if not idx:
                continue
            slots = [self._slots[i] for i in idx]
            width = self._width(max(len(s.req.prompt) - s.prefilled for s in slots))
            rows = batch_bucket(len(idx), self.gen.batch_multiple)
            tokens = np.zeros((rows, width), np.int32)
            start = np.zeros((rows,), np.int32)
            lengths = np.zeros((rows,), np.int32)
            keys = np.zeros((rows, 2), np.uint32)
            temp, top_k, top_p = np.zeros((rows,), np.float32), np.zeros((rows,), np.int32), np.ones((rows,),
                                                                                                     np.float32)
            slot_ids = np.full((rows,), self.max_batch, np.int32)  # padding rows: out of range, never written
            done = []
            for r, (i, s) in enumerate(zip(idx, slots)):
                n = min(width, len(s.req.prompt) - s.prefilled)
                tokens[r, :n] = s.req.prompt[s.prefilled:s.prefilled + n]
                start[r], lengths[r], keys[r], slot_ids[r] = s.prefilled, n, s.key, i
                temp[r], top_k[r], top_p[r] = s.req.temperature, s.req.top_k, s.req.top_p
                done.append(s.prefilled + n == len(s.req.prompt))
            self._cache, tok, lp = _prefill_step(
                self.gen.graph, self.gen.state_leaves, self._cache, slot_ids, tokens, start, lengths, keys, temp,
                top_k, top_p, first=first,
                mode=self._mode(slots), top=self._top(slots))
            tok, lp = jax.device_get((tok, lp))
            now = time.monotonic()
            for r, (i, s) in enumerate(zip(idx, slots)):
                s.prefilled += int(lengths[r])
                if not done[r]:
                    continue
                self.metrics.prompt_tokens += len(s.req.prompt)
                s.first_token_at = now
                self.metrics.ttft.append(now - s.req.arrival)
                lps = None if lp is None else [(float(lp[0][r]), list(zip(lp[1][r].tolist(), lp[2][r].tolist())))]
                self._deliver(i, [int(tok[r])], lps, device_finished=False)

    def _decode(self) -> None:
        """One decode call over the occupied rows: all slots when most are busy, else only the live rows gathered
        into a batch bucket (a power of two), so a light load does not pay for a full ``max_batch`` step."""
        live_ids = [i for i, s in enumerate(self._slots) if s is not None and not s.prefilling]
        live = [self._slots[i] for i in live_ids]
        bucket = batch_bucket(len(live_ids), self.gen.batch_multiple)
        compact = bucket < self.max_batch
        rows = live_ids if compact else list(range(self.max_batch))
        b = bucket if compact else self.max_batch
        slot_ids = np.full((b,), self.max_batch, np.int32)  # padding rows: out of range, never written
        slot_ids[:len(rows)] = rows
        last = np.zeros((b,), np.int32)
        pos = np.zeros((b,), np.int32)
        finished = np.ones((b,), bool)
        n = np.zeros((b,), np.int32)
        max_new = np.ones((b,), np.int32)
        stop_ids = np.full((b, MAX_STOP_TOKEN_IDS), NO_TOKEN, np.int32)
        keys = np.zeros((b, 2), np.uint32)
        temp, top_k, top_p = np.zeros((b,), np.float32), np.zeros((b,), np.int32), np.ones((b,), np.float32)
        for r_, i in enumerate(rows):
            s = self._slots[i]
            if s is None or s.prefilling:
                continue
            r = s.req
            last[r_], pos[r_], finished[r_] = s.tokens[-1], len(r.prompt) + len(s.tokens) - 1, False
            n[r_], max_new[r_], keys[r_] = len(s.tokens), r.max_new_tokens, s.key
            stop_ids[r_, :len(r.stop_token_ids)] = r.stop_token_ids
            temp[r_], top_k[r_], top_p[r_] = r.temperature, r.top_k, r.top_p
        self.metrics.decode_steps += 1
        self.metrics.occupancy_sum += len(live) / self.max_batch
        args = (last, pos, finished, n, max_new, stop_ids, keys, temp, top_k, top_p)
        kw = dict(steps=self.chunk_size, mode=self._mode(live), top=self._top(live))
        if compact:
            self._cache, out, lp, _, _, dev_finished, _ = _decode_rows(
                self.gen.graph, self.gen.state_leaves, self._cache, slot_ids, *args, **kw)
        else:
            self._cache, out, lp, _, _, dev_finished, _ = _decode_step(
                self.gen.graph, self.gen.state_leaves, self._cache, *args, **kw)
        out, lp, dev_finished = jax.device_get((out, lp, dev_finished))
        for r_, i in enumerate(rows):
            s = self._slots[i]
            if s is None or s.prefilling or finished[r_]:
                continue
            cols = [c for c in range(out.shape[1]) if out[r_, c] != NO_TOKEN]
            lps = None if lp is None else [(float(lp[0][r_, c]), list(zip(lp[1][r_, c].tolist(),
                                                                           lp[2][r_, c].tolist()))) for c in cols]
            self._deliver(i, [int(out[r_, c]) for c in cols], lps, device_finished=bool(dev_finished[r_]))

    def _deliver(self, i: int, new: list[int], lps, *, device_finished: bool) -> None:
        """Appends a row's new tokens, applies stop tokens / strings / limits, emits a Delta, finishes the row."""
        s = self._slots[i]
        r = s.req
        s.tokens.extend(new)
        self.metrics.generation_tokens += len(new)
        reason = None
        if new and new[-1] in r.stop_token_ids:
            reason = "stop_token"
        elif len(s.tokens) >= r.max_new_tokens:
            reason = "length"
        elif device_finished:
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
