"""Our Flax model against transformers' GptOssForCausalLM (the numerical reference) on random tiny configs."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax.config import GptOssConfig
from gptoss_jax.hf_loader import load_hf_model
from gptoss_jax.kv_cache import init_cache, layer_cache
from gptoss_jax.layers import Int4Weight
from gptoss_jax.model import GptOss, abstract_model, params_of
from gptoss_jax.params import QuantSpec, iter_specs, layer_period, model_specs
from gptoss_jax.kernels import int4_layout

torch = pytest.importorskip("torch")
testing = pytest.importorskip("gptoss_jax.testing")

TINY = GptOssConfig.from_preset("tiny")  # hidden 256, 8 q / 2 kv heads, 8 experts top-2, window 16, 4 layers

CONFIGS = {
    # KV groups 4, top-2, window 16 < sequence
    "groups4_top2": TINY,
    # hidden 320 (not a multiple of 128), KV groups 1, top-4 of 4 experts, window 8
    "h320_groups1_top4": GptOssConfig.from_preset("tiny-320"),
    # KV groups 2, top-1, odd intermediate, 3 layers with a non-default layer pattern, window 5
    "groups2_top1": TINY.replace(hidden_size=320, intermediate_size=160, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, num_local_experts=6, num_experts_per_tok=1,
                                 num_hidden_layers=3, sliding_window=5,
                                 layer_types=("full_attention", "sliding_attention", "sliding_attention")),
}


@functools.lru_cache(maxsize=None)
def _checkpoint(name: str, tmp_root: str):
    cfg = CONFIGS[name]
    path = f"{tmp_root}/{name}"
    hf = testing.save_random_hf_checkpoint(cfg, path, seed=len(name))
    return path, hf


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf"))


def jit_forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, tokens, lengths):
        return nnx.merge(graphdef, state)(tokens, lengths=lengths)[0]

    return lambda tokens, lengths=None: np.asarray(fwd(state, jnp.asarray(tokens), None if lengths is None else
                                                       jnp.asarray(lengths)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_match_transformers(name, tmp_root, rng):
    path, hf = _checkpoint(name, tmp_root)
    cfg = CONFIGS[name]
    model = load_hf_model(path, dtype=jnp.float32)
    seq = 3 * cfg.sliding_window + 7  # longer than the window
    ids = rng.integers(0, cfg.vocab_size, (2, seq))
    ours = jit_forward(model)(ids)
    ref = testing.hf_logits(hf, ids)
    chex.assert_shape(ours, (2, seq, cfg.vocab_size))
    chex.assert_tree_all_finite(ours)
    assert testing.rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("name", ["groups4_top2", "h320_groups1_top4"])
def test_bf16_error_within_transformers_own_bf16_error(name, tmp_root, rng):
    path, hf = _checkpoint(name, tmp_root)
    cfg = CONFIGS[name]
    # many tokens: bf16 errors are dominated by rare top-k routing flips, so few tokens make a noisy ratio
    ids = rng.integers(0, cfg.vocab_size, (8, 4 * cfg.sliding_window + 3))
    ref32 = testing.hf_logits(hf, ids)
    from transformers import GptOssForCausalLM
    hf16 = GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ref16 = testing.hf_logits(hf16, ids)
    model = load_hf_model(path, dtype=jnp.bfloat16)
    chex.assert_trees_all_equal_dtypes(params_of(model)["lm_head"]["weight"], jnp.zeros((), jnp.bfloat16))
    ours = jit_forward(model)(ids)
    ours_err, ref_err = testing.rel_err(ours, ref32), testing.rel_err(ref16, ref32)
    print(f"bf16 rel err: ours {ours_err:.3e}, transformers {ref_err:.3e}")
    assert ref_err > 0
    assert ours_err <= 1.5 * ref_err


def test_padded_batch_matches_each_sequence_alone(tmp_root, rng):
    name = "groups4_top2"
    path, hf = _checkpoint(name, tmp_root)
    cfg = CONFIGS[name]
    model = load_hf_model(path, dtype=jnp.float32)
    lengths = np.array([37, 9, 23])
    ids = rng.integers(0, cfg.vocab_size, (3, 40))
    ours = jit_forward(model)(ids, lengths)
    for b, n in enumerate(lengths):
        ref = testing.hf_logits(hf, ids[b:b + 1, :n])[0]
        assert testing.rel_err(ours[b, :n], ref) <= 1e-4


@pytest.mark.parametrize("name", ["groups4_top2", "groups2_top1"])
def test_cached_decode_matches_full_forward(name, tmp_root, rng):
    path, _ = _checkpoint(name, tmp_root)
    cfg = CONFIGS[name]
    model = load_hf_model(path, dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    steps, prompt = 70, np.array([11, 4])  # 70 decode steps, ragged prompts, both far past the window
    total = int(prompt.max()) + steps
    ids = rng.integers(0, cfg.vocab_size, (2, total))
    full = jit_forward(model)(ids)

    @functools.partial(jax.jit, static_argnames="attend_to_cache", donate_argnames="cache")
    def step(state, tokens, start, lengths, cache, attend_to_cache=True):
        return nnx.merge(graphdef, state)(tokens, start=start, lengths=lengths, cache=cache,
                                          attend_to_cache=attend_to_cache)

    cache = init_cache(cfg, 2, total, jnp.float32)
    sliding = 1 if cfg.is_sliding(1) else 0
    chex.assert_shape(layer_cache(cache, sliding).k, (2, min(cfg.sliding_window, total), cfg.num_key_value_heads,
                                                      cfg.head_dim))
    chex.assert_shape(cache[sliding].k, (cfg.num_hidden_layers // len(cache), 2, min(cfg.sliding_window, total),
                                         cfg.num_key_value_heads, cfg.head_dim))
    logits, cache = step(state, jnp.asarray(ids[:, :prompt.max()]), jnp.zeros(2, jnp.int32), jnp.asarray(prompt),
                         cache, attend_to_cache=False)
    logits = np.asarray(logits)
    for b in range(2):
        assert testing.rel_err(logits[b, :prompt[b]], full[b, :prompt[b]]) <= 1e-4
    pos = prompt.copy()
    worst = 0.0
    for _ in range(steps):
        tok = ids[np.arange(2), pos][:, None]
        logits, cache = step(state, jnp.asarray(tok), jnp.asarray(pos), jnp.ones(2, jnp.int32), cache)
        logits = np.asarray(logits)
        for b in range(2):
            worst = max(worst, testing.rel_err(logits[b, 0], full[b, pos[b]]))
        pos += 1
    assert worst <= 1e-4


def test_chunked_prefill_through_cache_matches(tmp_root, rng):
    """Several tokens at a time on top of a filled cache (ring buffer overwritten mid-chunk)."""
    name = "groups4_top2"
    path, _ = _checkpoint(name, tmp_root)
    cfg = CONFIGS[name]
    model = load_hf_model(path, dtype=jnp.float32)
    ids = rng.integers(0, cfg.vocab_size, (1, 60))
    full = jit_forward(model)(ids)
    cache = init_cache(cfg, 1, 64, jnp.float32)
    start = 0
    for chunk in (13, 21, 26):  # chunks longer than the 16-slot sliding ring
        logits, cache = model(jnp.asarray(ids[:, start:start + chunk]), start=jnp.array([start]), cache=cache)
        assert testing.rel_err(np.asarray(logits)[0], full[0, start:start + chunk]) <= 1e-4
        start += chunk


DECLARATIONS = {  # 16-bit, and int4 in each storage variant (asymmetric, per channel, mixed precision, act order)
    "bf16": (jnp.bfloat16, None),
    "int4_sym32": (jnp.float32, QuantSpec(group_size=32)),
    "int4_asym_perchannel": (jnp.bfloat16, QuantSpec(group_size=None, symmetric=False, scale_dtype="float32")),
    "int4_mixed_act_order": (jnp.float32, QuantSpec(group_size=64, symmetric=False,
                                                    modules=("o_proj", "gate_up", "down"), act_order=("o_proj", "down"))),
}


@pytest.mark.parametrize("name", DECLARATIONS)
def test_model_params_are_derived_from_the_declaration(name):
    """Every nnx.Param of the model is its model_specs leaf — path, shape, dtype and logical axes (as flax's
    out_sharding metadata) — and nothing else is a parameter: the modules take all of it from the declaration."""
    dtype, quant = DECLARATIONS[name]
    model = abstract_model(TINY, dtype=dtype, quant=quant)
    got = {tuple(path): (tuple(v.get_value().shape), jnp.dtype(v.get_value().dtype), v.get_metadata()["out_sharding"])
           for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    want = {path: (s.shape, jnp.dtype(s.dtype), s.axes)
            for path, s in iter_specs(model_specs(TINY, dtype=dtype, quant=quant))}
    assert got == want


def test_modules_take_every_field_from_the_declaration(monkeypatch):
    """Edit one spec (shape, dtype, logical axes, init) and the model follows: no module spells any of it itself."""
    import gptoss_jax.model as model_module

    def edited_specs(config, **kw):
        specs = model_specs(config, **kw)
        sinks = specs["layers"]["attn"]["sinks"]
        specs["layers"]["attn"]["sinks"] = dataclasses.replace(sinks, shape=(sinks.shape[0], 3), dtype=jnp.float16,
                                                               axes=("layers", "experts"), init="ones")
        return specs

    monkeypatch.setattr(model_module, "model_specs", edited_specs)
    sinks = GptOss(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0)).layers.attn.sinks
    chex.assert_shape(sinks.get_value(), (TINY.num_hidden_layers, 3))
    chex.assert_type(sinks.get_value(), jnp.float16)
    np.testing.assert_array_equal(np.asarray(sinks.get_value()), 1.0)
    assert sinks.get_metadata()["out_sharding"] == ("layers", "experts")


def test_random_init_has_no_trivially_zero_term():
    """A fresh model: norm scales are 1, every other float parameter (biases and sinks too) is an N(0, 0.02²) draw
    per layer, int4 weights dequantize to such a draw, act-order perms are the identity."""
    dtype, quant = DECLARATIONS["int4_mixed_act_order"]  # 16-bit and (asymmetric, act-order) int4 weights
    model = GptOss(TINY, dtype=dtype, quant=quant, rngs=nnx.Rngs(5))
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        a = np.asarray(v.get_value()).astype(np.float64)
        assert np.isfinite(a).all(), path
        if path[-1] == "scale":
            np.testing.assert_array_equal(a, 1.0)
        elif path[-1] == "perm":
            np.testing.assert_array_equal(a, np.broadcast_to(np.arange(a.shape[-1]), a.shape))
        elif path[-1] not in ("packed", "scales", "zeros"):
            assert 0.012 < a.std() < 0.028, (path, a.std())
            per_layer = a.reshape(a.shape[0], -1) if path[0] == "layers" else a.reshape(1, -1)
            assert (per_layer != 0).any(axis=1).all(), path
            assert len({row.tobytes() for row in per_layer}) == len(per_layer), path  # each layer its own draw
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Int4Weight):
            w = np.asarray(int4_layout.dequantize(module.tensor(), jnp.float32))
            assert 0.015 < w.std() < 0.025, path


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, including those inside scan / cond / pjit bodies (the kernels' per-platform choice,
    platform_dependent, is a cond), but not inside Pallas kernel bodies (they work on blocks, not model tensors)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call":
            continue
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)
                elif hasattr(sub, "eqns"):
                    yield from _all_eqns(sub)


def test_layers_run_under_one_scan():
    """The decoder layers are traced once per block position (a scan over L/p blocks), not once per layer."""
    cfg = TINY.replace(num_hidden_layers=12, layer_types=tuple(["sliding_attention", "full_attention"] * 6))
    model = GptOss(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 8), jnp.int32))[0])(state)
    scans = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "scan"]
    assert any(e.params["length"] == 6 for e in scans)
    assert sum(e.primitive.name.startswith("ragged_dot") for e in _all_eqns(jaxpr.jaxpr)) == 2 * 2


def test_moe_groups_tokens_instead_of_running_every_expert():
    """The default MoE path is a grouped (ragged) matmul over tokens sorted by expert, not a dense einsum over all
    experts: 2 ragged_dots per layer, and no intermediate with a [tokens, experts, mlp] shape."""
    model = GptOss(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, 12), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens)[0])(state)
    prims = [eqn.primitive.name for eqn in _all_eqns(jaxpr.jaxpr)]
    assert sum(p.startswith("ragged_dot") for p in prims) == 2 * layer_period(TINY)  # traced once per block position
    e, i, h = TINY.num_local_experts, TINY.intermediate_size, TINY.hidden_size
    weight_shapes = {(e, h, 2 * i), (e, i, h), (e, 1, 2 * i), (e, 1, h)}  # + biases as the TPU kernel blocks them
    for eqn in _all_eqns(jaxpr.jaxpr):
        for var in eqn.outvars:
            shape = tuple(getattr(var.aval, "shape", ()))
            per_token = 12 in shape or 12 * TINY.num_experts_per_tok in shape  # activations, not (stacked) weights
            if len(shape) >= 3 and per_token and shape[-3:] not in weight_shapes:
                assert not (e in shape and (2 * i in shape or i in shape)), (eqn.primitive.name, shape)


@pytest.mark.parametrize("group_size, symmetric", [(32, True), (64, False), (None, True)])
def test_int4_model_matches_transformers_on_dequantized_weights(tmp_path, rng, group_size, symmetric):
    from gptoss_jax.hf_loader import save_hf_checkpoint
    from gptoss_jax.model import build_model

    cfg = CONFIGS["h320_groups1_top4"]
    quant = QuantSpec(group_size=group_size, symmetric=symmetric, scale_dtype="float32")
    model = GptOss(cfg, dtype=jnp.float32, quant=quant, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    # the int4 weights really are packed int4 in the model
    chex.assert_type(model.layers.mlp.experts.gate_up.packed[...], jnp.int32)
    assert isinstance(model.layers.attn.q_proj.weight, Int4Weight)

    dequantized = {}
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Int4Weight):
            dequantized[path] = int4_layout.dequantize(module.tensor(), jnp.float32)
    params = params_of(model)
    for path, value in dequantized.items():
        node = params
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    save_hf_checkpoint(params, cfg, tmp_path)
    from transformers import GptOssForCausalLM
    hf = GptOssForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    hf.config._attn_implementation = "eager"

    ids = rng.integers(0, cfg.vocab_size, (2, 2 * cfg.sliding_window + 5))
    ref = testing.hf_logits(hf, ids)
    ours = jit_forward(model)(ids)
    assert testing.rel_err(ours, ref) <= 1e-4
    float_model = build_model(cfg, params, dtype=jnp.float32)
    assert testing.rel_err(jit_forward(float_model)(ids), ref) <= 1e-4

    # bf16 activations over the same int4 weights: within 1.5x transformers' own bf16-vs-fp32 error
    def to_bf16(path, leaf):
        keep = getattr(path[-1], "key", None) in ("packed", "scales", "zeros")
        return leaf if keep else leaf.astype(jnp.bfloat16)

    int4_bf16 = build_model(cfg, jax.tree_util.tree_map_with_path(to_bf16, params_of(model)),
                                  dtype=jnp.bfloat16, quant=quant)
    hf16 = GptOssForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    ref_err = testing.rel_err(testing.hf_logits(hf16, ids), ref)
    ours_err = testing.rel_err(jit_forward(int4_bf16)(ids), ref)
    print(f"int4 bf16 rel err: ours {ours_err:.3e}, transformers bf16 {ref_err:.3e}")
    assert 0 < ours_err <= 1.5 * ref_err
