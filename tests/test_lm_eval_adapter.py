"""lm-evaluation-harness adapter (gptoss_jax.lm_eval_adapter): loglikelihood / loglikelihood_rolling /
generate_until against direct computations with our model, and lm-eval running local tasks (a task yaml over a small
jsonl file) end to end through its own command line. Skipped without lm-eval (the `eval` extra)."""

import json
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local json tasks only: never reach for the Hub
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from gptoss_jax import api, testing  # noqa: E402
from gptoss_jax import lm_eval_adapter  # noqa: E402
from gptoss_jax.config import GptOssConfig, default_layer_types  # noqa: E402
from gptoss_jax.testing import build_tiny_tokenizer  # noqa: E402

CONFIG = GptOssConfig.from_preset("tiny").replace(num_hidden_layers=2, layer_types=default_layer_types(2))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("lmeval") / "model"
    testing.save_random_hf_checkpoint(CONFIG, path, seed=5)
    build_tiny_tokenizer(CONFIG.vocab_size, path)
    return path


@pytest.fixture(scope="module")
def lm(ckpt):
    return lm_eval_adapter.GptOssLM(path=str(ckpt), dtype="float32", batch_size=3, max_seq_len=64)


def req(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct_logprob(model, ids, start):
    """Σ_{i ≥ start} log p(ids[i] | ids[:i]) and greedy flag, from our model's fp32 logits in float64."""
    logits = np.asarray(model.logits([ids]), np.float64)[0]
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    pos = np.arange(start, len(ids))
    return float(np.sum(logp[pos - 1, np.asarray(ids)[pos]])), bool(np.all(np.argmax(logp[pos - 1], -1) ==
                                                                         np.asarray(ids)[pos]))


def test_loglikelihood_matches_direct(lm):
    pairs = [("The quick brown fox", " jumps over the lazy dog"), ("Hello, world!", " How are you"),
             ("", "Once upon a time"), ("def main(): ", "print('hello')")]
    got = lm.loglikelihood([req("loglikelihood", p) for p in pairs], disable_tqdm=True)
    assert len(got) == len(pairs)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        if ctx:
            c = ctx.rstrip()
            cont = ctx[len(c):] + cont
            whole = lm.model.encode(c + cont, allow_special=False)
            start = len(lm.model.encode(c, allow_special=False))
        else:
            whole = [lm.prefix_token_id] + lm.model.encode(cont, allow_special=False)
            start = 1
        ref, ref_greedy = direct_logprob(lm.model, whole, start)
        assert np.isfinite(lp) and lp < 0
        assert abs(lp - ref) <= 1e-4 * abs(ref), (ctx, lp, ref)
        assert greedy == ref_greedy


def test_loglikelihood_truncates_long_context(lm):
    ctx = "the of and to in is that it for on with as was at by " * 30  # > max_seq_len 64 tokens
    (lp, _), = lm.loglikelihood([req("loglikelihood", (ctx, " hello"))], disable_tqdm=True)
    full = lm.model.encode(ctx + " hello", allow_special=False)  # the context's trailing space joins the continuation
    n_cont = len(full) - len(lm.model.encode(ctx.rstrip(), allow_special=False))
    whole = full[-64:]
    ref, _ = direct_logprob(lm.model, whole, len(whole) - n_cont)
    assert abs(lp - ref) <= 1e-4 * abs(ref)


def test_loglikelihood_rolling_scores_every_token_once(lm):
    text = "Once upon a time there was a little model that learned to predict the next token. " * 4
    (total,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])
    ids = lm.model.encode(text, allow_special=False)
    assert len(ids) > 63  # more than one window
    # lm-eval's window rule (its spec): disjoint windows of ≤ 63 predicted tokens, each scored on its own context
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.prefix_token_id, 63, 1)]
    assert sum((cont for _, cont in windows), []) == ids  # every token scored exactly once
    ref = 0.0
    for ctx, cont in windows:
        assert len(ctx) + len(cont) <= 64
        ref += direct_logprob(lm.model, ctx + cont, len(ctx))[0]
    assert abs(total - ref) <= 1e-4 * abs(ref), (total, ref)


def test_generate_until_is_greedy_and_cuts_at_stop(lm):
    prompt = "The quick brown"
    ids = lm.model.encode(prompt, allow_special=False)
    full = lm.model.generate(ids, max_new_tokens=6, temperature=0.0, stop_token_ids=())
    (text,) = lm.generate_until([req("generate_until", (prompt, {"max_gen_toks": 6}))])
    assert full.text.startswith(text) and len(text) > 0
    stop = full.text[2:4]
    (cut,) = lm.generate_until([req("generate_until", (prompt, {"until": [stop], "max_gen_toks": 6}))])
    assert stop not in cut and full.text.startswith(cut)


def test_bad_model_args(ckpt):
    with pytest.raises(ValueError, match="unknown argument"):
        lm_eval_adapter.GptOssLM(path=str(ckpt), colour="blue")
    with pytest.raises(ValueError, match="path=CHECKPOINT"):
        lm_eval_adapter.GptOssLM()
    with pytest.raises(api.LoadError):
        lm_eval_adapter.GptOssLM(path=str(ckpt / "missing"))


TASKS = {
    "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
    "tiny_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                 "metric_list": [{"metric": "word_perplexity"}]},
    "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{target}}",
                 "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4},
                 "metric_list": [{"metric": "exact_match"}]},
}
DOCS = [{"question": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0,
         "text": "Hello, world! How are you today?", "target": " Paris"},
        {"question": "Two plus two is", "choices": [" four", " five", " six"], "answer": 0,
         "text": "The quick brown fox jumps over the lazy dog.", "target": " four"}]


@pytest.mark.slow
def test_lm_eval_cli_runs_local_tasks(ckpt, tmp_path, monkeypatch):
    """`gptoss-lm-eval --model gptoss-jax --model_args path=...,dtype=float32 --tasks ... --include_path DIR`."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    import yaml
    for name, spec in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **spec}))
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["gptoss-lm-eval", "--model", "gptoss-jax", "--model_args",
                                      f"path={ckpt},dtype=float32,max_seq_len=128", "--tasks",
                                      ",".join(TASKS), "--include_path", str(tmp_path), "--output_path", str(out)])
    lm_eval_adapter.main()
    files = list(out.rglob("results*.json"))
    assert files, f"no results under {out}"
    res = json.loads(files[0].read_text())["results"]
    assert 0.0 <= res["tiny_mc"]["acc,none"] <= 1.0
    assert np.isfinite(res["tiny_ppl"]["word_perplexity,none"]) and res["tiny_ppl"]["word_perplexity,none"] > 1
    assert 0.0 <= res["tiny_gen"]["exact_match,none"] <= 1.0
