"""The trained tiny gpt-oss shipped in the package (gptoss_jax/tiny_model, made by gptoss_jax/train_tiny.py):
its files and architecture, that it is a language model (held-out perplexity far below the vocabulary size and a
unigram model), that it generates words of its corpus, deterministically, and that the training script's data
pipeline reproduces the shipped tokenizer and held-out text."""

import hashlib
from pathlib import Path
import json
import re

import numpy as np
import pytest

from gptoss_jax import demo
from gptoss_jax.train_tiny import corpus_split, model_config, token_stream, train_tokenizer, unigram_nll


@pytest.fixture(scope="module")
def path():
    return demo.shipped_model_dir()


@pytest.fixture(scope="module")
def model(path):
    import gptoss_jax
    return gptoss_jax.load(path, dtype="float32", max_seq_len=256)


def test_files_dtype_and_card(path):
    from gptoss_jax.safetensors_io import Checkpoint
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "heldout.txt", "README.md"} <= names
    size = (path / "model.safetensors").stat().st_size
    assert 1e6 < size < 10e6  # "a few MB"
    with Checkpoint(path) as ckpt:
        dtypes = {str(ckpt.info(n)[0]) for n in ckpt.keys()}
    assert dtypes == {"bfloat16"}, dtypes
    card = (path / "README.md").read_text()
    assert hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest() in card  # the card is current
    assert "Python Software Foundation License" in card


def test_real_gpt_oss_architecture(model):
    c = model.config
    assert c.num_hidden_layers == 4 and c.num_local_experts == 8 and c.num_experts_per_tok == 2
    assert c.layer_types == ("sliding_attention", "full_attention") * 2 and c.sliding_window < 256
    assert c.rope.rope_type == "yarn" and c.swiglu_limit == 7.0
    params = model.params
    sinks = np.asarray(params["layers"]["attn"]["sinks"])
    assert sinks.shape == (4, c.num_attention_heads) and np.all(np.isfinite(sinks)) and np.std(sinks) > 0
    assert 2000 <= c.vocab_size <= 4096 and model.tokenizer.vocab_size == c.vocab_size


def test_heldout_perplexity_beats_unigram_and_vocab(model, path):
    from gptoss_jax.evaluation import perplexity
    held = model.encode((path / "heldout.txt").read_text())
    r = perplexity(model, held[:1024], max_length=256, stride=128)
    train_ids = token_stream(model.tokenizer.backend, corpus_split()[0], model.config.eos_token_ids[0])
    unigram = float(np.exp(unigram_nll(train_ids, np.asarray(held[:1024]), model.config.vocab_size)))
    assert np.isfinite(r.perplexity)
    assert r.perplexity < 0.2 * unigram, (r.perplexity, unigram)  # 90 vs 537 for the shipped 750-step model
    assert r.perplexity < model.config.vocab_size / 10, r.perplexity


def test_model_config_sizes_keep_the_architecture():
    """train_tiny's size arguments change sizes only: sinks, alternating sliding window, YaRN, top-k MoE and the
    clamped SwiGLU stay."""
    c = model_config(1024, 1, hidden_size=192, intermediate_size=256, num_layers=2, num_heads=6, num_experts=4,
                     top_k=2)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (1024, 192, 256, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (6, 2, 32)
    assert (c.num_local_experts, c.num_experts_per_tok, c.eos_token_ids, c.pad_token_id) == (4, 2, (1,), 1)
    assert c.layer_types == ("sliding_attention", "full_attention") and c.sliding_window == 64
    assert c.rope.rope_type == "yarn" and c.swiglu_limit == 7.0
    default = model_config(2048, 1)
    assert (default.hidden_size, default.num_hidden_layers, default.num_local_experts) == (128, 4, 8)


def _known_bigram_fraction(text: str) -> float:
    """Fraction of the text's consecutive word pairs that also occur in the training text: a crude measure of
    local coherence (made-up words and word salad score low)."""
    words = re.findall(r"[A-Za-z]+", " ".join(corpus_split()[0]))
    known = set(zip(words, words[1:]))
    w = re.findall(r"[A-Za-z]+", text)
    pairs = list(zip(w, w[1:]))
    assert len(pairs) >= 16, text
    return sum(p in known for p in pairs) / len(pairs)


@pytest.mark.slow
def test_demo_sample_is_coherent(model):
    """The demo's streamed sample (its default prompt, seeded sampling at temperature 0.5, top-p 0.9) and the greedy
    continuation read as the corpus' English: most word pairs are pairs of the training text (0.93 and 0.76 for the
    shipped model's bf16 weights here; the 200-step model it replaced wrote 'The "x" statement is a "x"')."""
    prompt = 'The "try" statement specifies'
    sample = model.generate(prompt, max_new_tokens=64, temperature=0.5, top_p=0.9, seed=0, stop_token_ids=())
    greedy = model.generate(prompt, max_new_tokens=64, temperature=0.0, stop_token_ids=())
    for text in (sample.text, greedy.text):
        assert _known_bigram_fraction(text) >= 0.7, text
        assert '"x"' not in text


@pytest.mark.slow
def test_generation_is_corpus_words_and_deterministic(model, path):
    prompt = 'The "for" statement is used'
    a = model.generate([prompt, prompt], max_new_tokens=32, temperature=0.0, stop_token_ids=())
    b = model.generate(prompt, max_new_tokens=32, temperature=0.0, stop_token_ids=())
    assert a[0].tokens == a[1].tokens == b.tokens  # greedy is deterministic, batched or not
    s1 = model.generate(prompt, max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0, stop_token_ids=())
    vocabulary = set(re.findall(r"[A-Za-z]+", " ".join(corpus_split()[0])))
    for text in (a[0].text, s1.text):
        words = re.findall(r"[A-Za-z]+", text)
        assert len(words) >= 8, text
        known = sum(w in vocabulary for w in words) / len(words)
        assert known >= 0.8, (known, text)  # English of the corpus, not byte soup


@pytest.mark.slow
def test_training_data_pipeline_reproduces_shipped_tokenizer_and_heldout(path):
    """The deterministic half of `python -m gptoss_jax.train_tiny` (corpus split and BPE training) gives the shipped
    tokenizer.json and heldout.txt byte for byte, when this Python has the corpus the card was made from."""
    train, held, digest = corpus_split()
    if digest not in (path / "README.md").read_text():
        pytest.skip("this Python's pydoc_data.topics differs from the one the shipped model was trained on")
    assert (path / "heldout.txt").read_text(encoding="utf-8") == "\n\n".join(held) + "\n"
    tok = train_tokenizer(train, json.loads((path / "config.json").read_text())["vocab_size"])
    shipped = json.loads((path / "tokenizer.json").read_text())
    assert json.loads(tok.to_str()) == shipped


@pytest.mark.slow
def test_wheel_carries_the_shipped_model(tmp_path):
    """`pip install` carries the model: the wheel built from pyproject's setuptools config holds its files."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(repo, src, symlinks=True, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info",
                                                                          ".hypothesis", "__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "No module named pip" in r.stderr:
        pytest.skip("pip is not installed in this environment")
    assert r.returncode == 0, r.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in demo.shipped_model_dir().iterdir():
        assert f"gptoss_jax/tiny_model/{f.name}" in names


@pytest.mark.slow
def test_training_is_seeded_and_bitwise_reproducible(tmp_path):
    """Two runs of the training script (shortened to 2 steps) write identical weights; another seed differs."""
    import os
    import subprocess
    import sys

    def run(*args):  # a fresh process per run, as a user runs it (and no training state left in this one)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                            os.environ.get("PYTHONPATH", "")])}
        return subprocess.run([sys.executable, "-m", "gptoss_jax.train_tiny", *args], capture_output=True, text=True,
                              timeout=600, env=env)

    digests = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        r = run("--out", str(tmp_path / name), "--steps", "2", "--seed", str(seed))
        assert r.returncode == 0, r.stderr[-2000:]
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1] != digests[2]
    assert run("--out", str(tmp_path / "a")).returncode == 2  # never overwrites
