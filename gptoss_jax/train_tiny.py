"""Trains the tiny gpt-oss that ships in the package (``gptoss_jax/tiny_model/``) — reproducibly, on CPU.

    python -m gptoss_jax.train_tiny                       # writes gptoss_jax/tiny_model/ (refuses to overwrite)
    python -m gptoss_jax.train_tiny --out /tmp/tiny --steps 20

What it builds (every choice is an argument default below, and is written to the model card):

* **Corpus**: the English text of Python's own help topics, ``pydoc_data.topics`` (what ``help("if")`` prints),
  which installs with every CPython. Licence: the Python documentation is distributed under the PSF License
  Agreement (Python Software Foundation License Version 2), see https://docs.python.org/3/license.html; the card
  and ``heldout.txt`` say so. The topics are sorted by name and about 10 % of the text, whole topics, is held out (see
  :func:`corpus_split`). The text differs between Python versions, so the card records the Python version and the corpus SHA-256,
  and the held-out text ships with the model (``heldout.txt``) so evaluation never depends on the local Python.
* **Tokenizer**: a byte-level BPE (``tokenizers``' ``BpeTrainer``) of ``--vocab-size`` ids trained on the training
  split only, with the nine harmony special tokens at ids 0-8 (``<|endoftext|>`` = 1 separates topics and is the
  eos id).
* **Model**: the real gpt-oss architecture of :mod:`gptoss_jax.model` (attention sinks, sliding window on alternate
  layers, YaRN RoPE, biased router with top-k, clamped SwiGLU experts, untied lm_head) at 4 layers, hidden 128,
  8 experts top-2, trained in float32 with optax AdamW (warmup + cosine decay, global-norm clipping) on random
  crops of ``--seq-len`` + 1 tokens, and saved as a Hugging Face folder (config.json, model.safetensors in
  bfloat16, tokenizer.json) that transformers' ``GptOssForCausalLM`` loads.

Everything is seeded (``--seed``): the same Python (corpus), jax and CPU reproduce the same bytes; the card
records the SHA-256 of model.safetensors. Training runs the model's own forward (the XLA reference kernels:
``GPTOSS_KERNELS=xla`` is set here, since Pallas calls have no autodiff rule).

Time: 750 steps of 8 x 256 tokens (about 14 passes over the 116k training tokens). Measured: 0.95 s per step on 2
CPU cores at light load (so about 12 minutes); the shipped run took 1252 s (21 minutes) on the shared 2-core machine
it was made on, under a load average of 4-9 from other jobs. Why these numbers: a sweep (same script, GPU) of sizes
and lengths gave held-out perplexities 131 (200 steps), 40 (800), 64 (1600 steps: memorises the training text,
train loss 0.27); hidden 192 / 256 at 800 steps gave 46 / 45 at 1.7x / 2.6x the CPU time per step. So the shipped
model keeps hidden 128 and takes as many steps as fit the time budget, with warmup and cosine decay to 10 % of the
peak rate. The sizes are arguments (``--hidden-size``, ``--layers``, ``--experts`` ...) for other budgets.

This is a development script: nothing in the runtime imports it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = PACKAGE_DIR / "tiny_model"
HELDOUT_FILE = "heldout.txt"
CARD_FILE = "README.md"
LICENCE_NOTE = ("Python Software Foundation License Version 2 (the Python documentation's licence, "
                "https://docs.python.org/3/license.html)")


def corpus_split(fraction: float = 0.1) -> tuple[list[str], list[str], str]:
    """(train texts, held-out texts, SHA-256 of the whole corpus) from ``pydoc_data.topics``, topics sorted by name.

    Walking the sorted topics, a topic is held out whenever the held-out text so far is under `fraction` of all the
    text so far: about `fraction` of the characters, spread over the alphabet, whole topics only (so no held-out
    sentence is also in training)."""
    from pydoc_data.topics import topics
    names = sorted(topics)
    digest = hashlib.sha256("\0".join(f"{n}\0{topics[n]}" for n in names).encode("utf-8")).hexdigest()
    train, held = [], []
    seen = held_chars = 0
    for n in names:
        text = topics[n].strip()
        seen += len(text)
        if held_chars + len(text) <= fraction * seen:
            held.append(text)
            held_chars += len(text)
        else:
            train.append(text)
    return train, held, digest


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with the harmony special tokens at ids 0-8 (gptoss_jax.tokenizer.HARMONY_SPECIAL_TOKENS)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from gptoss_jax.tokenizer import HARMONY_SPECIAL_TOKENS
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(HARMONY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def model_config(vocab_size: int, eos_id: int, *, hidden_size: int = 128, intermediate_size: int = 128,
                 num_layers: int = 4, num_heads: int = 4, num_experts: int = 8, top_k: int = 2):
    """The shipped architecture: the ``tiny`` preset's gpt-oss features (sinks, sliding window 64 on alternate
    layers, YaRN RoPE, biased top-k router, clamped SwiGLU) at the given sizes; heads of 32, 2 KV heads."""
    from gptoss_jax.config import GptOssConfig
    return GptOssConfig.from_preset("tiny").replace(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=2, head_dim=32,
        num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=64,
        layer_types=tuple(("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)),
        eos_token_ids=(eos_id,), pad_token_id=eos_id)


def token_stream(tok, texts: list[str], eos_id: int):
    """Every text's ids followed by the eos id, concatenated (int32 numpy)."""
    import numpy as np
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return np.asarray(ids, np.int32)


def unigram_nll(train_ids, held_ids, vocab_size: int) -> float:
    """Mean NLL (nats) of the held-out tokens (first unscored) under add-one-smoothed training unigram counts."""
    import numpy as np
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[held_ids[1:]].mean())


def train(args) -> dict:
    """Trains and saves the model (see the module docstring); returns its metrics. The XLA reference kernels are
    forced while it runs (GPTOSS_KERNELS=xla) and the caller's setting is restored afterwards."""
    saved = os.environ.get("GPTOSS_KERNELS")
    try:
        return _train(args)
    finally:
        if saved is None:
            os.environ.pop("GPTOSS_KERNELS", None)
        else:
            os.environ["GPTOSS_KERNELS"] = saved


def _train(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from gptoss_jax.model import GptOss, params_of

    # the XLA reference kernels: Pallas calls have no autodiff rule (read at trace time, so set here, not on import)
    os.environ["GPTOSS_KERNELS"] = "xla"
    t_start = time.perf_counter()
    train_texts, held_texts, corpus_sha = corpus_split()
    tok = train_tokenizer(train_texts, args.vocab_size)
    eos_id = tok.token_to_id("<|endoftext|>")
    train_ids = token_stream(tok, train_texts, eos_id)
    held_ids = token_stream(tok, held_texts, eos_id)
    config = model_config(tok.get_vocab_size(), eos_id, hidden_size=args.hidden_size,
                          intermediate_size=args.intermediate_size, num_layers=args.layers, num_heads=args.heads,
                          num_experts=args.experts, top_k=args.top_k)
    print(f"corpus: {len(train_texts)} train / {len(held_texts)} held-out topics, {len(train_ids)} / "
          f"{len(held_ids)} tokens (vocab {config.vocab_size}); sha256 {corpus_sha[:16]}", flush=True)

    model = GptOss(config, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(args.warmup, args.steps - 1),
                                                  args.steps, args.lr * 0.1)
    opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                           optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.01)), wrt=nnx.Param)

    def loss_fn(m, batch):
        logits, _ = m(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @nnx.jit
    def step(m, o, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(m, batch)
        o.update(m, grads)
        return loss

    @nnx.jit
    def eval_loss(m, batch):
        return loss_fn(m, batch)

    rng = np.random.default_rng(args.seed)
    n = args.seq_len + 1
    held_batch = np.stack([held_ids[i:i + n] for i in range(0, len(held_ids) - n, n)][:32])
    losses = []
    for s in range(args.steps):
        starts = rng.integers(0, len(train_ids) - n, size=args.batch_size)
        batch = np.stack([train_ids[i:i + n] for i in starts])
        losses.append(float(step(model, opt, jnp.asarray(batch))))
        if s % 10 == 0 or s == args.steps - 1:
            print(f"step {s:4d}  train loss {np.mean(losses[-10:]):.3f}  ({time.perf_counter() - t_start:.0f}s)",
                  flush=True)
    held_loss = float(eval_loss(model, jnp.asarray(held_batch)))
    metrics = {
        "steps": args.steps, "train_loss_last10": float(np.mean(losses[-10:])),
        "heldout_loss_fp32": held_loss, "heldout_perplexity_fp32": math.exp(held_loss),
        "heldout_unigram_perplexity": math.exp(unigram_nll(train_ids, held_ids, config.vocab_size)),
        "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(held_ids)),
        "train_seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(metrics, indent=2), flush=True)
    return dict(model=model, params=params_of(model), config=config, tokenizer=tok, held_texts=held_texts,
                corpus_sha=corpus_sha, metrics=metrics)


def write_folder(result: dict, out: Path, args) -> Path:
    """Writes the HF folder into a temporary sibling and renames it to `out` (which must not exist)."""
    import ml_dtypes

    from gptoss_jax import fsutil
    from gptoss_jax.hf_loader import save_hf_checkpoint
    tmp = fsutil.make_temp_dir(out)
    try:
        save_hf_checkpoint(result["params"], result["config"], tmp, dtype=ml_dtypes.bfloat16)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        result["tokenizer"].save(str(tmp / "tokenizer.json"))
        (tmp / HELDOUT_FILE).write_text("\n\n".join(result["held_texts"]) + "\n", encoding="utf-8")
        weights_sha = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
        (tmp / CARD_FILE).write_text(_card(result, args, weights_sha), encoding="utf-8")
        (tmp / fsutil.OWNER_FILE).unlink(missing_ok=True)
        for f in tmp.iterdir():
            f.chmod(0o644)  # package data: readable by everyone once installed
        os.replace(tmp, out)
    except BaseException:
        fsutil.remove_tree(tmp)
        raise
    return out


def _card(result: dict, args, weights_sha: str) -> str:
    import jax
    c, m = result["config"], result["metrics"]
    return f"""# gptoss-jax tiny: a trained tiny gpt-oss (the embedded default)

Made by `python -m gptoss_jax.train_tiny` (gptoss_jax/train_tiny.py) with
`--seed {args.seed} --steps {args.steps} --batch-size {args.batch_size} --seq-len {args.seq_len} --lr {args.lr}
--warmup {args.warmup} --vocab-size {args.vocab_size}` on Python {platform.python_version()}, jax {jax.__version__}.

* Architecture: gpt-oss ({c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} query /
  {c.num_key_value_heads} KV heads x {c.head_dim}, {c.num_local_experts} experts top-{c.num_experts_per_tok} of
  intermediate {c.intermediate_size}, sliding window {c.sliding_window} on alternate layers, YaRN RoPE, sinks,
  clamped SwiGLU), vocab {c.vocab_size} (byte-level BPE, harmony special tokens at 0-8, eos `<|endoftext|>` = 1).
* Weights: model.safetensors, bfloat16, SHA-256 `{weights_sha}`.
* Corpus: Python's `pydoc_data.topics` (the text of `help()` topics), SHA-256 `{result['corpus_sha']}`; topics
  sorted by name, about 10 % (whole topics) held out ({HELDOUT_FILE}, {m['heldout_tokens']} tokens), the rest trained on
  ({m['train_tokens']} tokens).
* Licence of the corpus text (and so of {HELDOUT_FILE}): {LICENCE_NOTE}. Copyright (c) Python Software Foundation.
* Held-out (first 32 windows of {args.seq_len} tokens, fp32): loss {m['heldout_loss_fp32']:.3f} nats/token,
  perplexity {m['heldout_perplexity_fp32']:.1f}; unigram baseline perplexity {m['heldout_unigram_perplexity']:.1f}.
* Training: {m['steps']} AdamW steps, final train loss {m['train_loss_last10']:.3f}, {m['train_seconds']} s.

A demonstration model: it writes Python-documentation-like English, it knows nothing.
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptoss_jax.train_tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="new folder (default: the packaged tiny_model/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=750)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"train_tiny: error: --out {args.out}: exists; remove it first (the script never overwrites)",
              file=sys.stderr)
        return 2
    result = train(args)
    write_folder(result, args.out, args)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
