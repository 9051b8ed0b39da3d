"""Next-token sampling in pure JAX (jit-compatible).

:func:`sample_next_token` applies, per batch row, temperature scaling, top-k truncation and top-p
(nucleus) truncation, then draws from what is left:

* ``temperature == 0`` is greedy decoding (argmax of the raw logits);
* ``top_k == 0`` disables top-k; ``top_k >= 1`` keeps the ``top_k`` largest logits (``top_k == 1``
  is greedy);
* ``top_p == 1`` disables top-p; otherwise the smallest set of most-probable tokens whose
  probability adds up to at least ``top_p`` is kept (always at least one token). As in
  HF transformers and vLLM, top-p is applied to the distribution left after top-k.

Each of the three may be a python scalar (one value for the batch, and the disabled cases are
specialised away at trace time) or an array of shape ``[B]`` (per-row values, e.g. for batched
serving). Logits may hold ``-inf`` (masked tokens); a row with no finite logit yields token 0.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["greedy", "sample_next_token", "validate_sampling_args"]

_ScalarOrArray = float | int | jax.Array | np.ndarray


def _is_python_scalar(x) -> bool:
    return isinstance(x, (numbers.Number, np.generic)) and not isinstance(x, bool)


def validate_sampling_args(temperature=1.0, top_k=0, top_p=1.0) -> None:
    """Check sampling parameters; raise ValueError with a clear message if one is invalid.

    Accepts python scalars or concrete arrays (checked elementwise). Traced values cannot be
    checked and are skipped, so call this outside ``jit``.
    """

    def values(name, x):
        if isinstance(x, bool):
            raise ValueError(f"{name} must be a number, got bool {x!r}")
        if isinstance(x, jax.core.Tracer):
            return None
        try:
            arr = np.asarray(x)
        except Exception as e:  # pragma: no cover - exotic inputs
            raise ValueError(f"{name} must be a number or an array of numbers, got {x!r}") from e
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)):
            raise ValueError(f"{name} must be a number or an array of numbers, got {x!r}")
        if arr.ndim > 1:
            raise ValueError(f"{name} must be a scalar or a 1-D per-row array, got shape {arr.shape}")
        return arr

    t = values("temperature", temperature)
    if t is not None:
        if not np.all(np.isfinite(t)) or np.any(np.abs(t) > np.finfo(np.float32).max):
            raise ValueError(f"temperature must be finite (in float32, as sampling runs), got {temperature!r}")
        if np.any(t < 0):
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    k = values("top_k", top_k)
    if k is not None:
        if not np.issubdtype(k.dtype, np.integer):
            if not (np.all(np.isfinite(k)) and np.all(k == np.round(k))):
                raise ValueError(f"top_k must be an integer, got {top_k!r}")
        if np.any(k < 0):
            raise ValueError(f"top_k must be >= 0 (0 disables top-k), got {top_k!r}")
    p = values("top_p", top_p)
    if p is not None:
        if not np.all(np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1):
            raise ValueError(f"top_p must be in (0, 1] (1 disables top-p), got {top_p!r}")
    arrays = (("temperature", t), ("top_k", k), ("top_p", p))
    sizes = {name: a.shape[0] for name, a in arrays if a is not None and a.ndim == 1}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"per-row sampling arrays disagree in length: {sizes}")


def greedy(logits: jax.Array) -> jax.Array:
    """Argmax over the last axis, int32 (ties go to the lowest id)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _per_row(x, batch: int, dtype):
    # numpy for host values (no eager device op per call), jnp for device / traced values.
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x, dtype=dtype)
    if x.ndim == 0:
        return xp.broadcast_to(x, (batch,))
    if x.shape != (batch,):
        raise ValueError(f"per-row sampling parameter must have shape ({batch},), got {x.shape}")
    return x


def sample_next_token(
    logits: jax.Array,
    key: jax.Array,
    *,
    temperature: _ScalarOrArray = 1.0,
    top_k: _ScalarOrArray = 0,
    top_p: _ScalarOrArray = 1.0,
) -> jax.Array:
    """Sample one token id per row from ``logits`` of shape ``[B, V]``; returns int32 ``[B]``.

    See the module docstring for the semantics. Python scalars decide at trace time which stages
    exist (``temperature=0`` or ``top_k=1`` is just an argmax; ``top_k=0, top_p=1`` skips the
    sort; a python-int ``top_k`` takes ``lax.top_k`` of that many logits instead of sorting the vocabulary, with the
    same draw); their values are passed as data, so changing e.g. the temperature does not recompile.
    Array parameters are always traced, so one compiled function serves any per-row mix,
    including greedy rows. Does not validate values: call :func:`validate_sampling_args` first.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [B, V], got {logits.shape}")
    batch, _ = logits.shape

    static_t = _is_python_scalar(temperature)
    static_k = _is_python_scalar(top_k)
    static_p = _is_python_scalar(top_p)
    if static_t and float(temperature) == 0.0:
        return greedy(logits)
    if static_k and int(top_k) == 1:
        return greedy(logits)
    if static_k:
        top_k = min(int(top_k), logits.shape[1])
    # Per-row parameters are checked here (outside the jitted body) for a clear error.
    t = _per_row(temperature, batch, jnp.float32)
    k = _per_row(top_k, batch, jnp.int32)
    p = _per_row(top_p, batch, jnp.float32)
    return _sample(
        logits,
        key,
        t,
        k,
        p,
        use_k=not (static_k and int(top_k) == 0),
        use_p=not (static_p and float(top_p) >= 1.0),
        bound_k=int(top_k) if static_k and int(top_k) > 0 else None,
    )


def _top_p_mask(sorted_logits, p):
    """Descending-sorted logits [B, n] with the tokens outside each row's top-p nucleus set to -inf."""
    rank = jnp.arange(sorted_logits.shape[-1], dtype=jnp.int32)[None, :]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    probs = jnp.where(jnp.isnan(probs), 0.0, probs)  # rows with no finite logit
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative probability
    # Keep a token while the mass of the better tokens is still short of top_p: the kept set
    # is the smallest prefix reaching top_p; rank 0 is always kept.
    keep_p = (mass_before < p[:, None]) | (p[:, None] >= 1.0) | (rank == 0)
    return jnp.where(keep_p, sorted_logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("use_k", "use_p", "bound_k"))
def _sample(logits, key, t, k, p, *, use_k: bool, use_p: bool, bound_k: int | None = None):
    batch, vocab = logits.shape
    logits = logits.astype(jnp.float32)
    greedy_ids = greedy(logits)
    safe_t = jnp.where(t > 0, t, 1.0)
    # Subtract each row's max before dividing: with a tiny temperature (say 1e-30) logits / t overflows to ±inf and
    # softmax(inf - inf) is NaN; shifted, the best logits stay at 0 and the rest go to -inf, the correct limit
    # (uniform over the tied best tokens). Softmax is shift-invariant, so nothing else changes.
    finite = jnp.isfinite(logits)
    row_max = jnp.max(jnp.where(finite, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    scaled = (logits - row_max) / safe_t[:, None]

    if not use_k and not use_p:
        sampled = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    elif bound_k is not None:
        # A static top_k: only the top_k best logits can survive either truncation, so take them with lax.top_k
        # (ties: the lower index first, as the stable sort below) instead of sorting the whole vocabulary (201k at
        # gpt-oss size), then apply top-p within them (top-p acts on what top-k left).
        top_vals, top_ids = jax.lax.top_k(scaled, bound_k)
        masked = top_vals
        if use_p:
            masked = _top_p_mask(masked, p)
        # jax.random.categorical is argmax(logits + gumbel(key, logits.shape)); the sort path below draws over the
        # sorted row, where ranks >= top_k are -inf, so ranks < top_k with the same noise give the same draw.
        noise = jax.random.gumbel(key, (batch, vocab), jnp.float32)[:, :bound_k]
        choice = jnp.argmax(masked + noise, axis=-1)
        sampled = jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    else:
        # Sort each row once (descending); ranks in sorted order drive both truncations.
        order = jnp.argsort(-scaled, axis=-1, stable=True)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]
        masked = sorted_logits
        if use_k:
            kk = jnp.where(k > 0, jnp.minimum(k, vocab), vocab)
            masked = jnp.where(rank < kk[:, None], masked, -jnp.inf)
        if use_p:
            masked = _top_p_mask(masked, p)
        choice = jax.random.categorical(key, masked, axis=-1)
        sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    use_greedy = (t <= 0) | (k == 1)
    # A row whose logits are all -inf has nothing to sample: fall back to argmax (token 0).
    use_greedy = use_greedy | ~jnp.any(jnp.isfinite(logits), axis=-1)
    return jnp.where(use_greedy, greedy_ids, sampled)
