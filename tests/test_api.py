"""The Python API: load (Hugging Face folder and converted checkpoint), logits, score, chat, errors."""

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from gptoss_jax import harmony
from gptoss_jax.api import InferenceModel, LoadError, TokenizerMissingError
from gptoss_jax.config import GptOssConfig
from gptoss_jax.generate import GenerationError
from gptoss_jax.hf_loader import save_hf_checkpoint
from gptoss_jax.model import params_of
from gptoss_jax.model import GptOss
from gptoss_jax.params import QuantSpec, count_parameters
from gptoss_jax.testing import rel_err
from gptoss_jax.testing import build_tiny_tokenizer
from gptoss_jax.tokenizer import TokenizerError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(1024)


@pytest.fixture(scope="module")
def config(tokenizer):
    return GptOssConfig.from_preset("tiny").replace(vocab_size=tokenizer.vocab_size, num_hidden_layers=2,
                                                    layer_types=())


@pytest.fixture(scope="module")
def module(config):
    return GptOss(config, dtype=jnp.float32, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, module, config, tokenizer):
    path = tmp_path_factory.mktemp("hf")
    save_hf_checkpoint(params_of(module), config, path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return gptoss_jax.load(hf_dir, dtype="float32", max_seq_len=128)


def reference_logits(module, ids):
    """Full-forward logits of the in-memory module (no cache)."""
    logits = InferenceModel(module, max_seq_len=128).logits(ids)
    return np.asarray(logits, np.float64)


# ---------------------------------------------------------------------------------------------------------- load
def test_load_hugging_face_folder(loaded, module, config, hf_dir, rng):
    assert isinstance(loaded, InferenceModel)
    assert loaded.config == config and loaded.tokenizer is not None and loaded.quant is None
    assert loaded.max_seq_len == 128
    ids = rng.integers(9, config.vocab_size, size=11).tolist()
    got = loaded.logits(ids)
    chex.assert_shape(got, (11, config.vocab_size))
    chex.assert_trees_all_equal(loaded.params, params_of(module))
    assert rel_err(got, reference_logits(module, ids)) < 1e-6
    info = loaded.info()
    assert info["format"] == "huggingface" and info["quantization"] is None
    assert info["parameters"] == count_parameters(config)
    assert info["bytes"] >= 4 * count_parameters(config)
    assert info["devices"] and info["dtype"] == "float32"
    assert info["stop_token_ids"] == list(config.eos_token_ids)
    json.dumps(info)  # JSON-able for `gptoss-jax info --json`


def test_generation_config_sets_default_stop_ids(hf_dir, tmp_path, config):
    for f in hf_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 8, 1]}))
    model = gptoss_jax.load(tmp_path, dtype="float32", max_seq_len=64)
    assert model.default_stop_token_ids == (2, 8, 1)


def test_load_converted_int4_checkpoint(tmp_path, config, tokenizer, rng):
    from gptoss_jax import checkpoint
    quant = QuantSpec(group_size=32)
    module = GptOss(config, dtype=jnp.bfloat16, quant=quant, rngs=nnx.Rngs(5))
    path = tmp_path / "int4"
    checkpoint.save_params(path, params_of(module), config, dtype="bfloat16", quant=quant)
    tokenizer.save(path)
    model = gptoss_jax.load(path, max_seq_len=64)
    assert model.quant == quant and model.tokenizer is not None
    assert model.info()["format"] == "gptoss-jax (int4)"
    chex.assert_trees_all_equal(model.params, params_of(module))  # packed codes, scales and bf16 tensors
    ids = rng.integers(9, config.vocab_size, size=7).tolist()
    np.testing.assert_array_equal(model.logits(ids), reference_logits(module, ids).astype(np.float32))


def test_load_errors(tmp_path, hf_dir):
    with pytest.raises(LoadError, match="no such file"):
        gptoss_jax.load(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LoadError, match="expected a checkpoint folder"):
        gptoss_jax.load(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="neither a gptoss-convert checkpoint nor a Hugging Face"):
        gptoss_jax.load(tmp_path / "empty")
    quantized = tmp_path / "mxfp4"
    quantized.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (quantized / "config.json").write_text(json.dumps(cfg))
    (quantized / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match="gptoss-convert"):
        gptoss_jax.load(quantized)
    with pytest.raises(TokenizerError):
        gptoss_jax.load(hf_dir, tokenizer=tmp_path / "nope.json")
    with pytest.raises(ValueError, match="dtype"):
        gptoss_jax.load(hf_dir, dtype="int3")
    with pytest.raises(ValueError, match="max_seq_len"):
        gptoss_jax.load(hf_dir, max_seq_len=10**9)


def test_without_tokenizer_ids_work_and_text_methods_explain(hf_dir):
    model = gptoss_jax.load(hf_dir, dtype="float32", max_seq_len=64, tokenizer=False)
    assert model.tokenizer is None
    r = model.generate([10, 11, 12], max_new_tokens=3, temperature=0.0, stop_token_ids=())
    assert len(r.tokens) == 3 and r.text is None
    for call in (lambda: model.generate("hello"), lambda: model.score(["hello there"]),
                 lambda: model.chat([harmony.Message.user("hi")]), lambda: model.decode([1])):
        with pytest.raises(TokenizerMissingError, match="tokenizer"):
            call()


# ---------------------------------------------------------------------------------------------------------- score
def test_score_is_log_softmax_of_full_forward(loaded):
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello, world!"]
    results = loaded.score(texts)
    for text, r in zip(texts, results):
        ids = loaded.encode(text)
        assert r.tokens == ids and r.scored_tokens == ids[1:]
        logits = np.asarray(loaded.logits(ids), np.float64)
        logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        want = logp[np.arange(len(ids) - 1), ids[1:]]
        np.testing.assert_allclose(r.token_logprobs, want, rtol=1e-5, atol=1e-5)
        assert np.isclose(r.total_logprob, want.sum(), rtol=1e-5)
        assert np.isclose(r.perplexity, np.exp(-want.mean()), rtol=1e-5)
        assert r.greedy == bool(np.all(np.argmax(logits[:-1], -1) == ids[1:]))
    # continuation scoring = the tail of scoring the concatenation
    ctx, cont = "The quick brown fox", " jumps over the lazy dog."
    [c] = loaded.score([cont], contexts=[ctx])
    ids = loaded.encode(ctx) + loaded.encode(cont)
    [full] = loaded.score([ids])
    assert c.scored_tokens == loaded.encode(cont)
    np.testing.assert_allclose(c.token_logprobs, full.token_logprobs[-len(c.scored_tokens):], rtol=1e-5, atol=1e-6)
    with pytest.raises(GenerationError, match="at least two"):
        loaded.score([[5]])
    with pytest.raises(GenerationError, match="contexts"):
        loaded.score(["a b", "c d"], contexts=["x"])


def test_text_generation_round_trip(loaded):
    r = loaded.generate("Hello, world!", max_new_tokens=5, temperature=0.0, stop_token_ids=())
    assert r.prompt_tokens == loaded.encode("Hello, world!")
    assert len(r.tokens) == 5 and r.text == loaded.decode(r.tokens)


# ---------------------------------------------------------------------------------------------------------- chat
def scripted_module(config, tokenizer, chain, seed=0):
    """A model that deterministically continues token a with token b for each (a, b) of `chain`: attention and
    expert outputs are zeroed, so the residual stream is just the token's embedding, and lm_head maps each
    embedding to its successor (a bigram model with a large margin)."""
    module = GptOss(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    layers = module.layers  # every layer, stacked
    for p in (layers.attn.o_proj.weight, layers.attn.o_proj.bias, layers.mlp.experts.down,
              layers.mlp.experts.down_bias):
        p[...] = jnp.zeros_like(p[...])
    emb = np.random.default_rng(seed).normal(size=(config.vocab_size, config.hidden_size)).astype(np.float32)
    module.embed.embedding[...] = jnp.asarray(emb)
    module.norm.scale[...] = jnp.ones_like(module.norm.scale[...])
    head = np.zeros((config.hidden_size, config.vocab_size), np.float32)
    sources = [a for a, _ in chain]
    assert len(set(sources)) == len(sources), "a bigram chain needs distinct source tokens"
    for a, b in chain:
        # RMSNorm(e_a) · e_a/|e_a| = sqrt(H): token a gives b a logit of 40; other tokens ~ 40/sqrt(H) noise
        head[:, b] += 40.0 * emb[a] / np.linalg.norm(emb[a]) / np.sqrt(config.hidden_size)
    module.lm_head.weight[...] = jnp.asarray(head)
    return module


def harmony_chain(tokenizer, prompt_ids, completion_ids):
    seq = [prompt_ids[-1]] + completion_ids
    return list(zip(seq[:-1], seq[1:]))


FINAL_ANSWER = "Hello!"


def scripted_chat_model(config, tokenizer, messages, **render):
    prompt = harmony.render_conversation_ids(tokenizer, messages, **render)
    ids = harmony.special_token_ids(tokenizer)
    completion = ([ids["<|channel|>"]] + tokenizer.encode("final", allow_special=False) + [ids["<|message|>"]]
                  + tokenizer.encode(FINAL_ANSWER, allow_special=False) + [ids["<|return|>"]])
    module = scripted_module(config, tokenizer, harmony_chain(tokenizer, prompt, completion))
    return InferenceModel(module, tokenizer=tokenizer, max_seq_len=512), prompt, completion


def test_chat_renders_harmony_stops_on_return_and_parses(config, tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    model, prompt, completion = scripted_chat_model(config, tokenizer, messages, reasoning="low")
    assert model.render_chat(messages, reasoning="low") == prompt
    result = model.chat(messages, reasoning="low", temperature=0.0, max_new_tokens=64)
    assert result.prompt_tokens == prompt
    assert result.tokens == completion  # stopped at <|return|> although 64 tokens were allowed
    assert result.finish_reason == "stop_token"
    assert result.final == FINAL_ANSWER and result.analysis == ""
    assert [(m.role, m.channel) for m in result.messages] == [("assistant", "final")]
    # the conversation continues with the parsed reply; <|call|> also stops
    assert set(harmony.stop_token_ids(tokenizer)) == {tokenizer.special_token_id("<|return|>"),
                                                      tokenizer.special_token_id("<|call|>")}
    streamed = []
    again = model.chat(messages, reasoning="low", temperature=0.0, max_new_tokens=64, on_chunk=streamed.append)
    assert sum((c.tokens[0] for c in streamed), []) == again.tokens == completion


def test_chat_result_exposes_analysis_and_tool_calls(tokenizer):
    from gptoss_jax.api import ChatResult
    from gptoss_jax.generate import GenerationStats
    text = ("<|channel|>analysis<|message|>Simple arithmetic.<|end|><|start|>assistant<|channel|>final"
            "<|message|>4<|return|>")
    ids = tokenizer.encode(text)
    msgs = harmony.parse_completion(ids, tokenizer)
    r = ChatResult(messages=msgs, completion=text, tokens=ids, finish_reason="stop_token", prompt_tokens=[],
                   stats=GenerationStats())
    assert r.analysis == "Simple arithmetic." and r.final == "4" and r.tool_calls == []


def test_chat_argument_errors(loaded):
    with pytest.raises(GenerationError, match="messages"):
        loaded.chat("hello")
    with pytest.raises(ValueError, match="reasoning"):
        loaded.chat([harmony.Message.user("hi")], reasoning="extreme")
    with pytest.raises(GenerationError, match="top_p"):
        loaded.chat([harmony.Message.user("hi")], top_p=0)
