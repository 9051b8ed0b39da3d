"""Tests for gptoss_jax.tokenizer: loading tokenizer.json offline and the tiny test tokenizer."""

import json
import random
import string

import numpy as np
import pytest

from gptoss_jax.tokenizer import (
    HARMONY_SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)
from gptoss_jax.testing import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    return build_tiny_tokenizer(1024, path)


def _random_ascii(rng, n):
    alphabet = string.printable  # letters, digits, punctuation, whitespace incl. \t \n \r \x0b \x0c
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_tiny_tokenizer_vocab_and_special_ids(tiny):
    assert tiny.vocab_size <= 1024
    assert len(tiny) == tiny.vocab_size
    specials = tiny.special_tokens
    assert set(specials) == set(HARMONY_SPECIAL_TOKENS)
    ids = [tiny.special_token_id(t) for t in HARMONY_SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids)
    assert max(ids) < tiny.vocab_size  # small ids, unlike o200k_harmony's 2000xx
    for t, i in specials.items():
        assert tiny.token_to_id(t) == i
        assert tiny.id_to_token(i) == t
        assert tiny.is_special_id(i)
        assert tiny.encode(t) == [i]


def test_tiny_tokenizer_round_trips_random_ascii(tiny):
    rng = random.Random()
    for _ in range(50):
        text = _random_ascii(rng, rng.randint(0, 200))
        ids = tiny.encode(text)
        assert all(0 <= i < tiny.vocab_size for i in ids)
        assert tiny.decode(ids) == text
        assert tiny.decode(tiny.encode(text, allow_special=False)) == text


def test_tiny_tokenizer_round_trips_unicode(tiny):
    rng = random.Random()
    for _ in range(20):
        ranges = [(0x20, 0x7E), (0xA0, 0x2FFF), (0x1F600, 0x1F64F)]  # ASCII, Latin..CJK symbols, emoji
        text = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40)))
        assert tiny.decode(tiny.encode(text)) == text


def test_special_token_strings_with_and_without_allow_special(tiny):
    text = "<|start|>user<|message|>hi <|end|> there<|end|>"
    ids = tiny.encode(text, allow_special=True)
    assert ids.count(tiny.special_token_id("<|end|>")) == 2
    assert ids[0] == tiny.special_token_id("<|start|>")
    assert tiny.decode(ids) == text
    plain = tiny.encode(text, allow_special=False)
    assert not any(tiny.is_special_id(i) for i in plain)
    assert tiny.decode(plain) == text
    # allow_special=True must still work after a plain encode (no shared mutable flag)
    assert tiny.encode(text, allow_special=True) == ids
    assert tiny.decode(ids, skip_special=True) == "userhi  there"


def test_encode_batch_and_array_ids(tiny):
    texts = ["hello world", "<|start|>assistant", ""]
    batch = tiny.encode_batch(texts)
    assert batch == [tiny.encode(t) for t in texts]
    ids = tiny.encode("The quick brown fox")
    assert tiny.decode(np.asarray(ids, np.int32)) == "The quick brown fox"
    jnp = pytest.importorskip("jax.numpy")
    assert tiny.decode(jnp.asarray(ids)) == "The quick brown fox"


def test_save_and_reload_same_ids(tiny, tmp_path):
    text = "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
    reloaded = load_tokenizer(tiny.path)
    assert reloaded.encode(text) == tiny.encode(text)
    # a checkpoint directory holding tokenizer.json loads too
    p = tiny.save(tmp_path / "ckpt")
    assert p.name == "tokenizer.json" and p.exists()
    from_dir = Tokenizer.from_file(tmp_path / "ckpt")
    assert from_dir.encode(text) == tiny.encode(text)
    assert from_dir.special_tokens == tiny.special_tokens


def test_build_is_deterministic_and_respects_vocab_size(tmp_path):
    a = build_tiny_tokenizer(300)
    b = build_tiny_tokenizer(300)
    assert a.vocab_size <= 300
    assert a.backend.to_str() == b.backend.to_str()
    small = build_tiny_tokenizer(265)
    assert small.vocab_size == 265  # 9 specials + 256 bytes, no merges
    assert small.decode(small.encode("abc xyz!")) == "abc xyz!"
    with pytest.raises(ValueError, match="vocab_size must be >= 265"):
        build_tiny_tokenizer(100)


def test_missing_file_error_names_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(TokenizerError, match="not found") as e:
        load_tokenizer(missing)
    assert str(missing) in str(e.value)
    # a directory without tokenizer.json
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"hello": "world"}), ""])
def test_corrupt_file_error_names_path(tmp_path, content):
    p = tmp_path / "tokenizer.json"
    p.write_text(content)
    with pytest.raises(TokenizerError, match="corrupt") as e:
        load_tokenizer(p)
    assert str(p) in str(e.value)


def test_misc_errors(tiny):
    with pytest.raises(KeyError, match="<\\|nope\\|>"):
        tiny.special_token_id("<|nope|>")
    with pytest.raises(ValueError, match="out of range"):
        tiny.decode([0, tiny.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tiny.decode([-1])
    with pytest.raises(TypeError):
        tiny.encode(b"bytes")
    with pytest.raises(TypeError):
        Tokenizer("not a tokenizer")
