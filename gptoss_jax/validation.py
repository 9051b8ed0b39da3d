"""Argument checks for the public API: every numeric argument to its meaningful and representable range, token ids,
text (no lone surrogates) and stop conditions. Each failure is one :class:`~gptoss_jax.generate.GenerationError`
(or :class:`~gptoss_jax.api.LoadError` for ``load``) whose message names the argument.

The entry points (:meth:`InferenceModel.generate` / ``stream`` / ``chat`` / ``score`` / ``logits``, ``load``) call
these helpers before anything reaches the device, so no OverflowError / TypeError from numpy, JAX or the tokenizer
library escapes for a caller's mistake.

Ranges and why (see docs/RELIABILITY.md, "Numbers"):

* ``max_new_tokens``, ``chunk_size``, ``max_seq_len``: integers ≥ 1 (``bool`` and ``float`` refused: ``2.5`` tokens
  has no meaning, and silently truncating it would hide a bug); the context check (prompt + max_new_tokens ≤
  max_seq_len) bounds them from above.
* ``temperature``: a finite real ≥ 0 that stays finite in float32 (sampling runs in float32); 0 is greedy.
* ``top_k``: an integer ≥ 0 (0 = off); values above the vocabulary mean "keep everything" and are clipped to it, so
  no value overflows the int32 the device uses.
* ``top_p``: a real in (0, 1] (1 = off).
* ``seed``: an integer in [0, 2**64 - 1]. The key is built from the seed's two 32-bit halves (what
  ``jax.random.key`` does with 64-bit ints enabled), so distinct seeds give distinct streams whether or not
  ``jax_enable_x64`` is set (without it ``jax.random.key`` keeps only the low 32 bits, and overflows past 2**63).
* token ids: integers (Python or numpy; not ``bool``, not ``float``) in [0, vocab_size).
* text (prompts, stop strings, chat messages): ``str`` without lone surrogates (those are not Unicode scalar values
  and cannot be encoded as UTF-8; they typically come from undecodable bytes read with ``surrogateescape``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

SEED_MAX = 2**64 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _generation_error(msg: str) -> Exception:
    from gptoss_jax.generate import GenerationError  # lazy: generate imports this module
    return GenerationError(msg)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, (numbers.Real, np.floating, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None,
              error=None) -> int:
    """`value` as a Python int, if it is an integer (not bool/float) in [minimum, maximum]; else an error naming
    `name` (GenerationError unless `error` is given)."""
    error = error or _generation_error
    if not _is_int(value):
        raise error(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else str(minimum)
        hi = "inf" if maximum is None else ("2**64 - 1" if maximum == SEED_MAX else str(maximum))
        raise error(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_real(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
               minimum_open: bool = False, hint: str = "", error=None) -> float:
    """`value` as a Python float if it is a real number (not bool/str), finite and finite in float32, within
    [minimum, maximum] (or (minimum, maximum] with `minimum_open`); else an error naming `name`."""
    error = error or _generation_error
    if not _is_real(value):
        raise error(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
        raise error(f"{name} must be finite (and within float32 range), got {value!r}")
    below = minimum is not None and (v <= minimum if minimum_open else v < minimum)
    if below or (maximum is not None and v > maximum):
        lo = "(" if minimum_open else "["
        raise error(f"{name} must be in {lo}{minimum}, {maximum if maximum is not None else 'inf'}]{hint}, "
                    f"got {value!r}")
    return v


def check_seed(seed: Any, name: str = "seed", error=None) -> int:
    return check_int(seed, name, minimum=0, maximum=SEED_MAX, error=error)


def seed_key(seed: int):
    """A JAX PRNG key for a seed in [0, 2**64 - 1]: key data [seed >> 32, seed & 0xffffffff] (threefry), equal to
    ``jax.random.key(seed)`` for every seed < 2**32 and to its 64-bit-mode value above."""
    import jax
    seed = check_seed(seed)
    data = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    return jax.random.wrap_key_data(data, impl="threefry2x32")


def check_text(text: Any, name: str, *, allow_empty: bool = True, error=None) -> str:
    """`text` if it is a str that encodes as UTF-8 (no lone surrogates); else an error naming `name` and where."""
    error = error or _generation_error
    if not isinstance(text, str):
        raise error(f"{name} must be a str, got {type(text).__name__}")
    if not allow_empty and not text:
        raise error(f"{name} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raise error(f"{name} holds a lone surrogate U+{ord(bad):04X} at character {e.start}: not valid Unicode "
                    f"text (undecodable bytes read with surrogateescape?)") from None
    return text


def named(field: str, check, *args, **kwargs):
    """``check(*args, **kwargs)``; an error it raises gets ``.field = field`` (the argument's name), so a caller that
    exposes the argument under another name (an HTTP API's field) can say which one was wrong."""
    try:
        return check(*args, **kwargs)
    except Exception as e:
        if getattr(e, "field", None) is None:
            try:
                e.field = field
            except AttributeError:
                pass
        raise


def check_sampling(*, max_new_tokens, temperature, top_k, top_p, seed, vocab_size: int | None = None) -> dict:
    """The scalar sampling arguments, checked and normalised (Python int/float; top_k clipped to the vocabulary).
    An error's ``.field`` names the argument."""
    out = dict(
        max_new_tokens=named("max_new_tokens", check_int, max_new_tokens, "max_new_tokens", minimum=1),
        temperature=named("temperature", check_real, temperature, "temperature", minimum=0.0,
                          hint=" (0 means greedy)"),
        top_k=named("top_k", check_int, top_k, "top_k", minimum=0),
        top_p=named("top_p", check_real, top_p, "top_p", minimum=0.0, maximum=1.0, minimum_open=True,
                    hint=" (1 disables top-p)"),
        seed=named("seed", check_seed, seed),
    )
    if vocab_size is not None and out["top_k"] > vocab_size:
        out["top_k"] = int(vocab_size)  # keeping more tokens than exist keeps them all
    return out


def check_stop_token_ids(ids: Any, vocab_size: int, *, limit: int) -> tuple[int, ...]:
    """A sequence of token ids (or one id) → tuple of ints in [0, vocab_size), at most `limit` of them."""
    if _is_int(ids):
        ids = (ids,)
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray, set, frozenset)):
        raise _generation_error(f"stop_token_ids must be a sequence of token ids, got {type(ids).__name__}")
    ids = list(np.asarray(ids).tolist()) if isinstance(ids, np.ndarray) else list(ids)
    if len(ids) > limit:
        raise _generation_error(f"at most {limit} stop_token_ids are supported, got {len(ids)}")
    return tuple(check_int(t, "stop_token_ids entry", minimum=0, maximum=vocab_size - 1) for t in ids)


def check_stop_strings(strings: Any) -> tuple[str, ...]:
    """None / one str / a sequence of non-empty valid strs → tuple."""
    if strings is None:
        return ()
    if isinstance(strings, str):
        strings = (strings,)
    if isinstance(strings, bytes) or not isinstance(strings, (Sequence, set, frozenset)):
        raise _generation_error(f"stop_strings must be a str or a sequence of str, got {type(strings).__name__}")
    return tuple(check_text(s, f"stop_strings[{i}]", allow_empty=False) for i, s in enumerate(strings))


def token_prompts(prompts: Any, *, vocab_size: int, max_seq_len: int, what: str = "prompt") -> list[list[int]]:
    """Token-id prompts (one sequence of ids, a batch of them, or a 1-D/2-D integer array) → list of lists of ints.

    Refuses, naming the row: an empty batch or row, text where ids are expected, non-integer ids (floats, bools,
    nested lists), ids outside [0, vocab_size), rows longer than max_seq_len.
    """
    import jax
    err = _generation_error
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise err(f"token id {what}s must be 1-D or 2-D, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise err(f"token id {what}s must be integers, got an array of {arr.dtype}")
        prompts = arr.tolist()
    if isinstance(prompts, (str, bytes)):
        raise err(f"the {what} is text but this call takes token ids (load a tokenizer to pass text)")
    try:
        prompts = list(prompts)
    except TypeError:
        raise err(f"{what}s must be token ids (a list of ints or a list of such lists), got "
                  f"{type(prompts).__name__}") from None
    if not prompts:
        raise err(f"the batch of {what}s is empty")
    if all(_is_int(p) for p in prompts):
        prompts = [prompts]
    elif not any(isinstance(p, (list, tuple, np.ndarray, jax.Array, str)) for p in prompts):
        bad = next(p for p in prompts if not _is_int(p))
        raise err(f"{what} holds {bad!r} ({type(bad).__name__}), not an integer token id")
    out = []
    for row, p in enumerate(prompts):
        if isinstance(p, (np.ndarray, jax.Array)):
            a = np.asarray(p)
            if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
                raise err(f"{what} {row} must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
            p = a.tolist()
        if isinstance(p, str):
            raise err(f"{what} {row} is text but this call takes token ids (load a tokenizer to pass text)")
        if not isinstance(p, (list, tuple)):
            raise err(f"{what} {row} must be a list of token ids, got {type(p).__name__} {p!r}")
        if not p:
            raise err(f"{what} {row} is empty: a {what} needs at least one token")
        for t in p:
            if not _is_int(t):
                raise err(f"{what} {row} holds {t!r} ({type(t).__name__}), not an integer token id")
            if not 0 <= t < vocab_size:
                raise err(f"{what} {row} holds token id {t}, outside the vocabulary [0, {vocab_size})")
        if len(p) > max_seq_len:
            raise err(f"{what} {row} has {len(p)} tokens, longer than the context (max_seq_len={max_seq_len})")
        out.append([int(t) for t in p])
    return out


def text_or_ids(prompts: Any, encode, *, what: str = "prompt") -> tuple[Any, bool]:
    """str | list[str] | ids | list[ids] → (list of id lists, or the raw ids for :func:`token_prompts`; single?).

    Texts are checked (no lone surrogates) and encoded with `encode(text)`; an empty text is refused (it encodes to
    no tokens). A batch mixing text and ids is refused.
    """
    import jax
    err = _generation_error
    if isinstance(prompts, str):
        check_text(prompts, f"the {what}", allow_empty=False)
        return [encode(prompts)], True
    if isinstance(prompts, (np.ndarray, jax.Array)):
        return prompts, np.ndim(prompts) == 1
    if isinstance(prompts, (bytes, bytearray)):
        raise err(f"the {what} must be str or token ids, got bytes (decode it first)")
    if prompts is None or _is_real(prompts):
        raise err(f"the {what} must be str, token ids or a list of them, got {type(prompts).__name__} {prompts!r}")
    try:
        prompts = list(prompts)
    except TypeError:
        raise err(f"the {what} must be str, token ids or a list of them, got {type(prompts).__name__}") from None
    n_text = sum(isinstance(p, str) for p in prompts)
    if prompts and n_text == len(prompts):
        for i, p in enumerate(prompts):
            check_text(p, f"{what} {i}", allow_empty=False)
        return [encode(p) for p in prompts], False
    if n_text:
        raise err(f"the {what}s mix text and token ids: pass all text or all ids")
    if prompts and all(_is_int(p) for p in prompts):
        return [prompts], True
    return prompts, False


def check_load_args(*, max_seq_len, chunk_size, tokenizer) -> None:
    """`load`'s non-path arguments: LoadError naming the argument (the config bounds max_seq_len later)."""
    from gptoss_jax.api import LoadError
    if max_seq_len is not None:
        check_int(max_seq_len, "max_seq_len", minimum=1, error=LoadError)
    check_int(chunk_size, "chunk_size", minimum=1, error=LoadError)
    if tokenizer is not None and not isinstance(tokenizer, (bool, str)) and not hasattr(tokenizer, "__fspath__"):
        raise LoadError(f"tokenizer must be a path, True, False or None, got {type(tokenizer).__name__}")
    if isinstance(tokenizer, str):
        check_text(tokenizer, "tokenizer", allow_empty=False, error=LoadError)


def check_chat_args(tokenizer, messages, *, reasoning, instructions, current_date, tools=None) -> list:
    """A conversation for :meth:`InferenceModel.chat`: harmony Messages (dicts are converted), valid text, a known
    reasoning level, and a tokenizer that has the harmony special tokens. Returns the list of Messages."""
    from gptoss_jax import harmony
    err = _generation_error
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise err("messages must be a list of harmony Messages or {'role', 'content'} dicts, got "
                  f"{type(messages).__name__}")
    if not messages:
        raise err("messages is empty: a conversation needs at least one message")
    out = []
    for i, m in enumerate(messages):
        try:
            m = harmony._as_message(m)
        except (TypeError, ValueError) as e:
            raise err(f"messages[{i}]: {e}") from None
        check_text(m.content, f"messages[{i}].content")
        out.append(m)
    if reasoning is not None and (not isinstance(reasoning, str) or reasoning.lower() not in harmony.REASONING_LEVELS):
        raise err(f"reasoning must be one of {harmony.REASONING_LEVELS}, got {reasoning!r}")
    if instructions is not None:
        check_text(instructions, "instructions")
    if current_date is not None and not hasattr(current_date, "strftime"):
        check_text(current_date, "current_date", allow_empty=False)
    if tools is not None:
        from collections.abc import Mapping
        if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, (list, tuple)):
            raise err(f"tools must be a list of function definitions, got {type(tools).__name__}")
        for i, t in enumerate(tools):
            spec = t.get("function", t) if isinstance(t, Mapping) else None
            if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
                raise err(f"tools[{i}] must be a dict with a non-empty 'name' (and optional 'description', "
                          f"'parameters'), got {t!r:.80}")
            if spec.get("parameters") is not None and not isinstance(spec["parameters"], Mapping):
                raise err(f"tools[{i}].parameters must be a JSON schema object")
    try:
        harmony.special_token_ids(tokenizer)
    except ValueError as e:
        raise err(f"chat needs the harmony format: {e}") from None
    return out
