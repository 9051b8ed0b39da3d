"""`gptoss-jax eval perplexity` (gptoss_jax.evaluation): window semantics, the number against a float64
transformers computation of the same NLL and against transformers' own sliding-window perplexity recipe, the CLI.

The model is the shipped tiny gpt-oss (gptoss_jax/tiny_model) loaded in float32; the text is its held-out file."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_jax import cli, demo
from gptoss_jax.evaluation import EvaluationError, perplexity, window_spans


@given(n=st.integers(2, 400), max_length=st.integers(2, 64), data=st.data())
@settings(max_examples=200, deadline=None)
def test_windows_score_every_token_once_with_context(n, max_length, data):
    stride = data.draw(st.integers(1, max_length))
    windows = window_spans(n, max_length, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert all(0 <= w.begin < w.score_from <= w.end <= n and w.end - w.begin <= max_length for w in windows)
    assert windows[-1].end == n and windows[0].begin == 0
    if stride < max_length:
        assert scored == list(range(1, n))  # each of tokens 1 … n-1 once, in order
        # past the first window every scored token sees at least max_length - stride tokens before it
        assert all(t - w.begin >= min(t, max_length - stride) for w in windows for t in range(w.score_from, w.end))
    else:  # disjoint chunks: each chunk's own first token has no context and is not scored (the HF recipe)
        assert scored == [t for t in range(1, n) if t % max_length != 0]


def test_window_arguments_are_checked():
    with pytest.raises(EvaluationError, match="--stride"):
        window_spans(10, 4, 5)
    with pytest.raises(EvaluationError, match="--max-length"):
        window_spans(10, 1, 1)
    with pytest.raises(EvaluationError, match="at least 2 tokens"):
        window_spans(1, 4, 2)


@pytest.fixture(scope="module")
def shipped():
    import gptoss_jax
    path = demo.shipped_model_dir()
    model = gptoss_jax.load(path, dtype="float32", max_seq_len=128)
    ids = model.encode((path / "heldout.txt").read_text())[:300]
    return path, model, ids


@pytest.fixture(scope="module")
def hf_model(shipped):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.GptOssForCausalLM.from_pretrained(str(shipped[0]), dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("max_length,stride", [(128, 48)])
def test_perplexity_matches_float64_nll(shipped, hf_model, max_length, stride):
    """The same windows, NLL from transformers' logits in float64 (log-softmax in float64)."""
    import torch
    path, model, ids = shipped
    r = perplexity(model, ids, max_length=max_length, stride=stride, batch_size=4)
    # float64 end to end: the eager experts loop (torch's grouped_mm has no float64 kernel)
    m64 = type(hf_model).from_pretrained(str(path), dtype=torch.float64, experts_implementation="eager").eval()
    ref = []
    for w in window_spans(len(ids), max_length, stride):
        with torch.no_grad():
            logits = m64(torch.tensor([ids[w.begin:w.end]])).logits[0].numpy()
        assert logits.dtype == np.float64
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        ref.extend(-logp[t - w.begin - 1, ids[t]] for t in range(w.score_from, w.end))
    ref = np.asarray(ref)
    assert r.token_nll.shape == ref.shape and np.all(np.isfinite(r.token_nll))
    np.testing.assert_allclose(r.token_nll, ref, atol=2e-4)
    assert math.isclose(r.perplexity, math.exp(ref.mean()), rel_tol=1e-4)
    assert r.num_scored == len(ref) and r.num_windows == len(window_spans(len(ids), max_length, stride))


def _transformers_recipe(hf_model, ids, max_length, stride):
    """Hugging Face's "Perplexity of fixed-length models" loop (labels = -100 outside the target span, the model's
    own shifted cross-entropy), weighting each window's mean loss by the number of labels it actually averaged
    (the docs' `num_valid_tokens - batch_size` undercounts by one once trg_len < the window)."""
    import torch
    input_all = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = input_all[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=target).loss
        count = int((target[:, 1:] != -100).sum())
        nll_sum += float(loss) * count
        n_tokens += count
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("max_length,stride", [(128, 48), (100, 100)])
def test_perplexity_matches_the_transformers_recipe(shipped, hf_model, max_length, stride):
    _, model, ids = shipped
    want, n = _transformers_recipe(hf_model, ids, max_length, stride)
    r = perplexity(model, ids, max_length=max_length, stride=stride)
    assert r.num_scored == n
    assert math.isclose(r.perplexity, want, rel_tol=1e-4), (r.perplexity, want)


def test_smaller_stride_gives_more_context(shipped):
    _, model, ids = shipped
    disjoint = perplexity(model, ids, max_length=48, stride=48)
    sliding = perplexity(model, ids, max_length=48, stride=16)
    assert sliding.perplexity < disjoint.perplexity  # the same text scored with more context


def test_cli_eval_perplexity_json(shipped, tmp_path, capsys):
    path, model, ids = shipped
    text = tmp_path / "t.txt"
    text.write_text(model.decode(ids))
    out = tmp_path / "ppl.json"
    rc = cli.main(["eval", "perplexity", str(path), str(text), "--dtype", "float32", "--max-length", "128",
                   "--stride", "64", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    want = perplexity(model, model.encode(text.read_text()), max_length=128, stride=64)
    assert math.isclose(data["perplexity"], want.perplexity, rel_tol=1e-6)
    assert data["num_scored"] == want.num_scored and data["stride"] == 64 and data["max_length"] == 128
    assert f"perplexity {want.perplexity:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize("extra,needle", [
    (["--stride", "300", "--max-length", "256"], "--stride 300 exceeds --max-length 256"),
    (["--max-length", "1"], "--max-length"),
    (["--max-length", "64", "--max-seq-len", "32"], "--max-length 64 exceeds --max-seq-len 32"),
])
def test_cli_eval_bad_arguments_one_line(shipped, tmp_path, capsys, extra, needle):
    text = tmp_path / "t.txt"
    text.write_text("some text to score")
    assert cli.main(["eval", "perplexity", str(shipped[0]), str(text), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and "Traceback" not in "\n".join(err)


def test_cli_eval_refuses_missing_file_and_existing_json(shipped, tmp_path, capsys):
    assert cli.main(["eval", "perplexity", str(shipped[0]), str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("some text")
    out = tmp_path / "exists.json"
    out.write_text("keep")
    assert cli.main(["eval", "perplexity", str(shipped[0]), str(text), "--json", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "keep"
