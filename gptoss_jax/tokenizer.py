"""Thin, offline wrapper over the HuggingFace ``tokenizers`` library.

gpt-oss checkpoints ship a ``tokenizer.json`` (the ``o200k_harmony`` encoding). :class:`Tokenizer`
loads it from disk only (no hub access) and exposes the handful of operations the rest of the
package needs: encoding with or without special-token recognition, decoding, vocabulary size and
special-token look-up.

Tests build a small byte-level BPE tokenizer with the harmony special tokens
(:func:`gptoss_jax.testing.build_tiny_tokenizer`); its special-token ids are small, so code must look ids up
through the tokenizer instead of hard-coding the o200k_harmony values (199998 ... 200012).
"""

from __future__ import annotations

from gptoss_jax.errors import GptOssError

import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers

__all__ = [
    "HARMONY_SPECIAL_TOKENS",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
]

# The harmony special tokens, in o200k_harmony id order (ids 199998, 199999, 200002, 200003, 200005,
# 200006, 200007, 200008, 200012 there). The tiny tokenizer adds exactly these.
HARMONY_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|return|>",
    "<|constrain|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|call|>",
)

TOKENIZER_FILENAME = "tokenizer.json"


class TokenizerError(GptOssError, ValueError):
    """A tokenizer file is missing, unreadable or not a valid ``tokenizer.json``."""


def _resolve_path(path: str | os.PathLike) -> Path:
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_dir():
        p = p / TOKENIZER_FILENAME
    return p


class Tokenizer:
    """A loaded ``tokenizers.Tokenizer`` plus convenience helpers.

    Use :meth:`from_file` (or :func:`load_tokenizer`) to load a checkpoint's ``tokenizer.json``.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, path: str | os.PathLike | None = None):
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        self.path = None if path is None else Path(path)
        # A second instance that treats special-token strings in the input as ordinary text
        # (``encode(..., allow_special=False)``); created lazily, never mutated afterwards, so
        # concurrent encodes never race on the ``encode_special_tokens`` flag.
        self._plain_tok: tokenizers.Tokenizer | None = None
        self._plain_lock = threading.Lock()
        self._special_tokens = {
            tok.content: idx for idx, tok in tokenizer.get_added_tokens_decoder().items() if tok.special
        }

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``tokenizer.json`` from ``path`` (the file itself or a checkpoint directory)."""
        p = _resolve_path(path)
        if not p.exists():
            raise TokenizerError(f"tokenizer file not found: {p}")
        if not p.is_file():
            raise TokenizerError(f"tokenizer path is not a file: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"could not read tokenizer file {p}: {e}") from e
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON / schema
            raise TokenizerError(f"corrupt or unsupported tokenizer file {p}: {e}") from e
        return cls(tok, path=p)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (base vocabulary plus added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special (added) tokens: name -> id."""
        return dict(self._special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(int(idx))

    def special_token_id(self, name: str) -> int:
        """Id of special token ``name`` (e.g. ``"<|return|>"``); KeyError naming the file if absent."""
        idx = self._special_tokens.get(name)
        if idx is None:
            idx = self._tok.token_to_id(name)
        if idx is None:
            where = f" in {self.path}" if self.path is not None else ""
            raise KeyError(f"special token {name!r} not found{where}")
        return idx

    def is_special_id(self, idx: int) -> bool:
        return int(idx) in self._special_ids

    @property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(self._special_tokens.values())

    # ------------------------------------------------------------------ encode / decode
    def _plain(self) -> tokenizers.Tokenizer:
        if self._plain_tok is None:
            with self._plain_lock:
                if self._plain_tok is None:
                    t = tokenizers.Tokenizer.from_str(self._tok.to_str())
                    t.encode_special_tokens = True
                    self._plain_tok = t
        return self._plain_tok

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Encode ``text`` to ids.

        With ``allow_special=True`` special-token strings in ``text`` (``"<|start|>"`` ...) become
        their single special id; with ``False`` they are encoded as ordinary text, which is what
        untrusted content (user messages, tool output) needs. No BOS/EOS is ever added.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # tokenizers would raise "TextInputSequence must be str"
            raise TokenizerError(f"cannot encode text holding a lone surrogate U+{ord(text[e.start]):04X} at "
                                 f"character {e.start} (not valid Unicode)") from None
        tok = self._tok if allow_special else self._plain()
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> list[list[int]]:
        tok = self._tok if allow_special else self._plain()
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Decode ids to text; special tokens are kept as text unless ``skip_special``."""
        ids = [int(i) for i in _flatten_ids(ids)]
        n = self.vocab_size
        bad = [i for i in ids if i < 0 or i >= n]
        if bad:
            raise ValueError(f"token ids out of range [0, {n}): {bad[:8]}")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    # ------------------------------------------------------------------ saving
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` to ``path`` (a file path or a directory)."""
        p = Path(path)
        if p.is_dir() or (not p.suffix and not p.exists()):
            p.mkdir(parents=True, exist_ok=True)
            p = p / TOKENIZER_FILENAME
        p.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(p))
        self.path = p
        return p

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path) if self.path else None!r}, vocab_size={self.vocab_size})"


def _flatten_ids(ids) -> list[int]:
    # Accept python ints, lists, numpy / jax arrays (1-D).
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    out = list(ids)
    if any(isinstance(i, (list, tuple)) for i in out):
        raise ValueError("decode expects a 1-D sequence of ids")
    return out


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a checkpoint's ``tokenizer.json`` (file or checkpoint directory) offline."""
    return Tokenizer.from_file(path)


# A small deterministic corpus for the tiny tokenizer's merges: harmony headers plus plain English,
# so common words and format strings get merged tokens.

