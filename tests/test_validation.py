"""Every argument of the Python API is checked: valid values give the intended result, invalid ones a one-line
GenerationError / LoadError naming the argument (never an OverflowError / TypeError from numpy, JAX or tokenizers).

The sampling property tests draw random sampling arguments with hypothesis: valid ones must sample the intended
distribution (exact probabilities computed in float64 from the definition of temperature / top-k / top-p, compared
with 20,000 draws token by token at 6 sigma, and tokens outside the kept set never drawn); invalid ones must raise.
Also holds the case rel-api-bad-arg-errors (seed 2**64, float token ids, lone surrogate prompt, generation_config
eos "five").
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gptoss_jax
from gptoss_jax.errors import GptOssError
from gptoss_jax import harmony
from gptoss_jax.api import InferenceModel, LoadError
from gptoss_jax.config import GptOssConfig
from gptoss_jax.generate import GenerationError, SamplingParams
from gptoss_jax.hf_loader import save_hf_checkpoint
from gptoss_jax.model import params_of
from gptoss_jax.model import GptOss
from gptoss_jax.sampling import sample_next_token
from gptoss_jax.testing import build_tiny_tokenizer
from gptoss_jax.validation import SEED_MAX, seed_key

# ---------------------------------------------------------------------------------------------- sampling properties
# One fixed logits row: distinct finite values (no ties, so top-k is well defined) and one masked (-inf) token.
LOGITS = np.array([2.0, 1.2, 1.0, 0.3, 0.0, -0.7, -1.5, -np.inf], np.float32)
V = LOGITS.size
N = 20_000


def intended_distribution(temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """float64 probabilities from the definitions (temperature, then top-k, then top-p on what is left)."""
    t = float(np.float32(temperature))  # the device holds temperature in float32
    logits = LOGITS.astype(np.float64)
    if t == 0.0 or top_k == 1:
        out = np.zeros(V)
        out[np.argmax(logits)] = 1.0
        return out
    z = (logits - logits.max()) / t
    probs = np.exp(z)
    probs /= probs.sum()
    order = np.argsort(-z, kind="stable")
    keep = np.ones(V, bool)
    if top_k > 0:
        keep[order[min(top_k, V):]] = False
    kept = np.where(keep, probs, 0.0)
    kept /= kept.sum()
    if top_p < 1.0:
        sorted_p = kept[order]
        before = np.cumsum(sorted_p) - sorted_p
        # float32 cumulative sums on the device: stay clear of a boundary where rounding decides membership
        assume(np.all(np.abs(before[sorted_p > 0] - top_p) > 1e-5))
        drop = order[(before >= top_p) & (np.arange(V) > 0)]
        kept[drop] = 0.0
        kept /= kept.sum()
    return kept


def draw(params: SamplingParams) -> np.ndarray:
    """N samples of the fixed row, through the path generation uses: checked params, the static mode, per-row
    arrays for the traced values, and the key built from the seed."""
    params = params.checked(V)
    greedy, use_k, use_p = params.mode
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (N, V))
    key = jax.random.fold_in(seed_key(params.seed), 0)
    if greedy:
        return np.asarray(sample_next_token(logits, key, temperature=0.0))
    return np.asarray(sample_next_token(
        logits, key, temperature=jnp.full((N,), params.temperature, jnp.float32),
        top_k=jnp.full((N,), params.top_k, jnp.int32) if use_k else 0,
        top_p=jnp.full((N,), params.top_p, jnp.float32) if use_p else 1.0))


valid_temperature = st.one_of(st.just(0.0), st.just(1), st.floats(1e-38, 1e-3), st.floats(1e-3, 50.0),
                              st.floats(50.0, 1e30))
valid_top_k = st.one_of(st.integers(0, V + 3), st.integers(2**31, 2**80), st.just(np.int64(3)))
valid_top_p = st.one_of(st.just(1.0), st.floats(0.0, 1.0, exclude_min=True), st.just(1e-30))
valid_seed = st.one_of(st.integers(0, 2**32), st.integers(2**32, SEED_MAX), st.just(SEED_MAX))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(temperature=valid_temperature, top_k=valid_top_k, top_p=valid_top_p, seed=valid_seed)
def test_valid_sampling_arguments_sample_the_intended_distribution(temperature, top_k, top_p, seed):
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    want = intended_distribution(temperature, int(top_k), top_p)
    tokens = draw(params)
    assert tokens.shape == (N,) and tokens.min() >= 0 and tokens.max() < V
    counts = np.bincount(tokens, minlength=V)
    assert counts[want == 0].sum() == 0, (counts, want)  # nothing outside the kept set, never the masked token
    sigma = np.sqrt(N * want * (1 - want))
    assert np.all(np.abs(counts - N * want) <= 6 * sigma + 3), (counts, N * want)


def _invalid(name):
    bad_int = st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.none(), st.just(2.0))
    bad_real = st.one_of(st.booleans(), st.text(max_size=3), st.none(), st.just(float("nan")),
                         st.just(float("inf")), st.just(-float("inf")), st.just(1e39), st.just([0.5]))
    return {
        "max_new_tokens": st.one_of(st.integers(max_value=0), bad_int),
        "temperature": st.one_of(st.floats(max_value=-1e-45), bad_real),
        "top_k": st.one_of(st.integers(max_value=-1), bad_int),
        "top_p": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), bad_real,
                           st.just(0)),
        "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=SEED_MAX + 1), bad_int),
    }[name]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(["max_new_tokens", "temperature", "top_k", "top_p", "seed"]))
def test_invalid_sampling_arguments_raise_naming_the_argument(data, name):
    kw = dict(max_new_tokens=4, temperature=0.7, top_k=5, top_p=0.9, seed=1)
    kw[name] = data.draw(_invalid(name))
    with pytest.raises(GenerationError, match=name) as e:
        SamplingParams(**kw).checked(V)
    assert "\n" not in str(e.value)


def test_seed_keys_are_distinct_over_the_whole_range():
    # below 2**32: the very key jax.random.key builds, so seeded results are unchanged
    for s in (0, 1, 12345, 2**32 - 1):
        np.testing.assert_array_equal(jax.random.key_data(seed_key(s)), jax.random.key_data(jax.random.key(s)))
    # above: jax.random.key drops the high half without x64 (1 and 2**32 + 1 collide) — ours does not
    datas = {tuple(np.asarray(jax.random.key_data(seed_key(s))).tolist())
             for s in (1, 2**32 + 1, 2**63, SEED_MAX, SEED_MAX - 1, 2**32 - 1)}
    assert len(datas) == 6


def test_tiny_temperature_is_the_greedy_limit_not_nan():
    logits = jnp.asarray(np.tile(np.array([[5.0, 80.0, 80.0, -3.0]], np.float32), (4000, 1)))
    out = np.asarray(sample_next_token(logits, jax.random.key(0), temperature=jnp.full((4000,), 1e-30)))
    counts = np.bincount(out, minlength=4)
    assert counts[0] == counts[3] == 0 and min(counts[1], counts[2]) > 1700  # the two tied best, evenly


# ---------------------------------------------------------------------------------------------- the API entry points
@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(1024)


@pytest.fixture(scope="module")
def model(tok):
    config = GptOssConfig.from_preset("tiny").replace(vocab_size=tok.vocab_size, num_hidden_layers=1, layer_types=())
    return InferenceModel(GptOss(config, dtype=jnp.float32, rngs=nnx.Rngs(0)), tokenizer=tok, max_seq_len=256)


BAD_CALLS = [
    # (method, args, kwargs, words the message must hold)
    ("generate", ("hi",), dict(seed=2**64), "seed"),
    ("generate", ("hi",), dict(seed=-1), "seed"),
    ("generate", ("hi",), dict(seed=True), "seed"),
    ("generate", ("hi",), dict(seed=1.5), "seed"),
    ("generate", ("hi",), dict(max_new_tokens=2.0), "max_new_tokens"),
    ("generate", ("hi",), dict(max_new_tokens=10**30), "max_new_tokens"),
    ("generate", ("hi",), dict(temperature=float("nan")), "temperature"),
    ("generate", ("hi",), dict(temperature=1e300), "temperature"),
    ("generate", ("hi",), dict(top_k=2**70 * -1), "top_k"),
    ("generate", ("hi",), dict(top_p=np.float32(0)), "top_p"),
    ("generate", ([1.0, 2.0],), {}, "token id"),
    ("generate", ([1, -2],), {}, "token id"),
    ("generate", ([1, 10**6],), {}, "outside the vocabulary"),
    ("generate", ([1, 2**70],), {}, "outside the vocabulary"),
    ("generate", ([[1, 2], [3, [4]]],), {}, "prompt 1"),
    ("generate", ([[1, 2], 3],), {}, "prompt 1"),
    ("generate", (np.array([1.5, 2.0]),), {}, "integers"),
    ("generate", (np.zeros((1, 1, 2), np.int32),), {}, "1-D or 2-D"),
    ("generate", ([],), {}, "empty"),
    ("generate", ([[]],), {}, "prompt 0 is empty"),
    ("generate", ("",), {}, "prompt is empty"),
    ("generate", (["a", ""],), {}, "prompt 1 is empty"),
    ("generate", ("bad \ud800 surrogate",), {}, "prompt"),
    ("generate", (["ok", "x\udcff"],), {}, "prompt 1"),
    ("generate", (["ok", [1, 2]],), {}, "mix text and token ids"),
    ("generate", (b"bytes",), {}, "bytes"),
    ("generate", (3.5,), {}, "prompt"),
    ("generate", (None,), {}, "prompt"),
    ("generate", ("hi",), dict(stop_strings=[""]), "stop_strings[0]"),
    ("generate", ("hi",), dict(stop_strings=["ok", "\ud800"]), "stop_strings[1]"),
    ("generate", ("hi",), dict(stop_strings=[3]), "stop_strings[0]"),
    ("generate", ("hi",), dict(stop_token_ids=[True]), "stop_token_ids"),
    ("generate", ("hi",), dict(stop_token_ids=[1.0]), "stop_token_ids"),
    ("generate", ("hi",), dict(stop_token_ids=[-1]), "stop_token_ids"),
    ("generate", ("hi",), dict(stop_token_ids="5"), "stop_token_ids"),
    ("generate", ("hi",), dict(chunk_size=0, max_new_tokens=2), "chunk_size"),
    ("stream", ("hi",), dict(seed=2**64), "seed"),
    ("logits", ([0.5],), {}, "token id"),
    ("logits", ("x\ud800",), {}, "prompt"),
    ("score", ([[1, 2], [3.0, 4]],), {}, "prompt 1"),
    ("score", (["ab", "cd"],), dict(contexts=["x"]), "contexts"),
    ("score", (["ab"],), dict(contexts=["x\ud800"]), "context 0"),
    ("score", (["ab"],), dict(contexts=[[0.5]]), "context"),
    ("chat", ([{"role": "user", "content": "hi"}],), dict(seed=2**64), "seed"),
    ("chat", ([{"role": "user", "content": "hi\ud800"}],), {}, "messages[0].content"),
    ("chat", ([{"role": "user"}],), {}, "messages[0]"),
    ("chat", ([{"role": "wizard", "content": "x"}],), {}, "messages[0]"),
    ("chat", ([],), {}, "messages is empty"),
    ("chat", ([harmony.Message.user("hi")],), dict(reasoning="extreme"), "reasoning"),
    ("chat", ([harmony.Message.user("hi")],), dict(instructions="\udc80"), "instructions"),
    ("chat", ([harmony.Message.user("hi")],), dict(top_k=-1), "top_k"),
    ("chat", ([harmony.Message.user("hi")],), dict(tools=[{"description": "no name"}]), "tools[0]"),
    ("chat", ([harmony.Message.user("hi")],), dict(tools={"name": "f"}), "tools must be a list"),
    ("chat", ([harmony.Message.user("hi")],), dict(tools=[{"name": "f", "parameters": "x"}]), "tools[0].parameters"),
]


@pytest.mark.parametrize("method, args, kwargs, words", BAD_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_bad_api_arguments_raise_one_line_naming_them(model, method, args, kwargs, words):
    with pytest.raises(GenerationError) as e:
        getattr(model, method)(*args, **kwargs)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg


def test_edge_values_that_are_valid_work(model, tok):
    # seeds past 2**63 work and give their own stream; np integers are accepted; top_k above the vocabulary is off
    kw = dict(max_new_tokens=6, temperature=5.0, stop_token_ids=())
    a = model.generate([5, 6, 7], seed=SEED_MAX, **kw).tokens
    b = model.generate([5, 6, 7], seed=np.uint64(SEED_MAX), **kw).tokens
    assert a == b and len(a) == 6
    runs = {tuple(model.generate([5, 6, 7], seed=s, **kw).tokens) for s in (1, 2**32 + 1, 2**63)}
    assert len(runs) == 3  # 1 and 2**32 + 1 collide with jax.random.key without x64
    greedy = model.generate([5, 6, 7], max_new_tokens=4, temperature=0, stop_token_ids=()).tokens
    r = model.generate([5, 6, 7], max_new_tokens=np.int64(4), temperature=0, stop_token_ids=greedy[1])
    stop_at = greedy.index(greedy[1]) + 1  # the first occurrence of the stop id ends the row
    assert r.tokens == greedy[:stop_at] and r.finish_reason == "stop_token"  # one int as stop_token_ids
    assert model.generate(np.array([5, 6, 7]), max_new_tokens=4, top_k=2**40, temperature=0,
                          stop_token_ids=()).tokens == greedy
    assert model.generate("hi", max_new_tokens=2, stop_strings="zz", seed=3).finish_reason in ("length", "stop_token")


def test_chat_on_a_tokenizer_without_harmony_tokens_fails_before_generating(model):
    import tokenizers
    from tokenizers import models

    from gptoss_jax.tokenizer import Tokenizer
    plain = Tokenizer(tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    bare = InferenceModel(model.module, tokenizer=plain, max_seq_len=64)
    with pytest.raises(GenerationError, match="harmony"):
        bare.chat([harmony.Message.user("a")])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, model, tok):
    path = tmp_path_factory.mktemp("hf")
    save_hf_checkpoint(params_of(model.module), model.config, path)
    tok.save(path)
    return path


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_seq_len=64.0), "max_seq_len"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(max_seq_len=True), "max_seq_len"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(tokenizer=3), "tokenizer"),
    (dict(dtype="int7"), "dtype"),
    (dict(dtype=object()), "dtype"),
])
def test_bad_load_arguments(hf_dir, kwargs, words):
    with pytest.raises(LoadError, match=words):
        gptoss_jax.load(hf_dir, **kwargs)


@pytest.mark.parametrize("eos, ok", [("five", False), ([1, "x"], False), (True, False), (-3, False), (2.0, False),
                                      ([3, 4], True), (7, True)])
def test_generation_config_eos_is_type_checked(hf_dir, tmp_path, eos, ok):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    if ok:
        want = tuple(eos) if isinstance(eos, list) else (eos,)
        assert gptoss_jax.load(d, max_seq_len=32).default_stop_token_ids == want
    else:
        with pytest.raises(LoadError, match="generation_config.json: eos_token_id"):
            gptoss_jax.load(d, max_seq_len=32)


def test_quantization_config_not_an_object_is_refused(hf_dir, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = "awq"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GptOssError, match="config.json: quantization_config must be an object"):
        gptoss_jax.load(d)


def test_tokenizer_encode_refuses_lone_surrogates_clearly(tok):
    from gptoss_jax.tokenizer import TokenizerError
    with pytest.raises(TokenizerError, match="lone surrogate U\\+DC80 at character 2"):
        tok.encode("ab\udc80")
