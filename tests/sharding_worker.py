"""Subprocess side of tests/test_sharding.py: needs several (virtual CPU) devices, so XLA_FLAGS must be set before
jax is imported — the test runs ``python -m tests.sharding_worker MODE`` with the environment prepared.

Modes:
  equivalence   one-device vs sharded meshes: logits of prefill + decode and greedy tokens; prints JSON lines.
  save PATH FMT     writes the random parameter tree used by `restore` (FMT: converter | tree, see save()).
  restore PATH FMT  (under jax.distributed, e.g. 4 processes × 2 CPU devices) sharded restore; prints JSON.
  multihost_forward (under jax.distributed, 2 processes × 4 CPU devices) sharded prefill + decode vs one device.
"""

from __future__ import annotations

import json
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=N set before starting python")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gptoss_jax import sharding  # noqa: E402
from gptoss_jax.config import GptOssConfig  # noqa: E402
from gptoss_jax.model import build_model, params_of, shard_model  # noqa: E402
from gptoss_jax.kv_cache import init_cache  # noqa: E402
from gptoss_jax.model import GptOss  # noqa: E402
from gptoss_jax.params import QuantSpec  # noqa: E402

MESHES = [(1, 8, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)]
PROMPT_LEN, DECODE_STEPS, BATCH = 8, 3, 4


def tiny_config(layers: int = 2) -> GptOssConfig:
    # one sliding + one full layer, window shorter than prompt + decode so the ring buffer wraps
    return GptOssConfig.from_preset("tiny").replace(num_hidden_layers=layers, layer_types=(), sliding_window=6)


def make_runner(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, start, lengths, cache):
        m = nnx.merge(graphdef, state)
        return m(tokens, start=start, lengths=lengths, cache=cache, attend_to_cache=True)

    return lambda *a: step(state, *a)


def generate(model, prompt, lengths, mesh=None, forced=None):
    """Greedy prefill + DECODE_STEPS decode steps. Returns (list of logits arrays, tokens [B, steps+1]).

    forced: tokens to feed instead of the argmax (teacher forcing, so bf16 runs compare the same inputs)."""
    config = model.config
    run = make_runner(model)
    cache = init_cache(config, BATCH, PROMPT_LEN + DECODE_STEPS + 1, dtype=model.dtype)
    tokens = jnp.asarray(prompt)
    start = jnp.zeros((BATCH,), jnp.int32)
    lens = jnp.asarray(lengths, jnp.int32)
    if mesh is not None:
        cache = sharding.shard_cache(cache, mesh)
        tokens, start, lens = sharding.to_global(
            (tokens, start, lens), (sharding.activation_sharding(mesh, sharding.BATCH, sharding.SEQ),
                                    sharding.activation_sharding(mesh, sharding.BATCH),
                                    sharding.activation_sharding(mesh, sharding.BATCH)))
    logits, cache = run(tokens, start, lens, cache)
    logits = to_host(logits)
    all_logits = [logits[np.arange(BATCH)[:, None], np.arange(PROMPT_LEN)[None]] *
                  (np.arange(PROMPT_LEN)[None, :, None] < np.asarray(lengths)[:, None, None])]
    nxt = logits[np.arange(BATCH), np.asarray(lengths) - 1].argmax(-1)
    out_tokens = [nxt]
    pos = np.asarray(lengths)
    for step in range(DECODE_STEPS):
        feed = nxt if forced is None else forced[:, step]
        step_in = (np.asarray(feed[:, None], np.int32), np.asarray(pos, np.int32), np.ones((BATCH,), np.int32))
        if mesh is not None:
            step_in = sharding.to_global(step_in, (sharding.activation_sharding(mesh, sharding.BATCH, sharding.SEQ),
                                                   sharding.activation_sharding(mesh, sharding.BATCH),
                                                   sharding.activation_sharding(mesh, sharding.BATCH)))
        logits, cache = run(*step_in, cache)
        logits = to_host(logits)[:, 0]
        all_logits.append(logits)
        nxt = logits.argmax(-1)
        out_tokens.append(nxt)
        pos = pos + 1
    return all_logits, np.stack(out_tokens, 1)


def to_host(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def equivalence(full: bool = False):
    config = tiny_config()
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, (BATCH, PROMPT_LEN)).astype(np.int32)
    lengths = np.array([PROMPT_LEN, 5, 3, PROMPT_LEN - 1], np.int32)
    variants = {
        "fp32": dict(dtype=jnp.float32, quant=None),
        "int4-fp32": dict(dtype=jnp.float32, quant=QuantSpec(group_size=32)),
        "bf16": dict(dtype=jnp.bfloat16, quant=None),
        "int4-bf16": dict(dtype=jnp.bfloat16, quant=QuantSpec(group_size=32)),
    }
    experts_everywhere = dict(sharding.RULES)
    experts_everywhere[sharding.P_.EXPERTS] = (sharding.DATA, sharding.EXPERT, sharding.TENSOR)
    for vname, kw in variants.items():
        base_model = GptOss(config, rngs=nnx.Rngs(1), **kw)
        # bigger router logits so top-k picks are not near-ties (bf16 and int4 rounding must not flip a choice)
        params = params_of(base_model)
        r = params["layers"]["mlp"]["router"]  # every layer (stacked)
        r["weight"] = (r["weight"].astype(jnp.float32) * 20).astype(r["weight"].dtype)
        base_model = build_model(config, params, **kw)
        ref_logits, ref_tokens = generate(base_model, prompt, lengths)
        cases = [(m, s, "default") for m in MESHES for s in ("replicated", "dispatch")]
        if vname == "fp32":
            cases = [((2, 2, 2), s, "experts_over_data") for s in ("replicated", "dispatch")] + (cases if full else [])
        if vname == "bf16" and not full:  # quick run: a subset (int4-fp32 covers every mesh × strategy)
            cases = [((2, 2, 2), "replicated", "default")]
        if vname == "int4-bf16" and not full:
            cases = [((1, 4, 2), "dispatch", "default")]
        for mesh_shape, strategy, rules_name in cases:
            t0 = time.time()
            rules = experts_everywhere if rules_name == "experts_over_data" else sharding.RULES
            mesh = sharding.make_mesh(*mesh_shape, config=config, rules=rules)
            model = build_model(config, params, **kw)
            model = shard_model(model, mesh, moe_strategy=strategy, rules=rules)
            forced = ref_tokens[:, :-1] if "bf16" in vname else None
            logits, tokens = generate(model, prompt, lengths, mesh, forced=forced)
            errs = [rel(a, b) for a, b in zip(logits, ref_logits)]
            # where the reference's top-2 margin is clear, bf16 must pick the same token too
            margins = [np.sort(x, -1)[..., -1] - np.sort(x, -1)[..., -2] for x in ref_logits[1:]]
            shard_shapes = sorted({tuple(s.data.shape) for s in
                                   model.layers.mlp.experts.down_bias[...].addressable_shards})
            print(json.dumps(dict(
                variant=vname, mesh=mesh_shape, strategy=strategy, rules=rules_name,
                prefill_rel_err=errs[0], decode_rel_err=max(errs[1:]),
                tokens_equal=bool(np.array_equal(tokens, ref_tokens)),
                tokens=tokens.tolist(), ref_tokens=ref_tokens.tolist(),
                min_decode_margin=float(min(m.min() for m in margins)),
                nan=bool(any(np.isnan(x).any() for x in logits)),
                expert_bias_shard_shapes=shard_shapes, seconds=round(time.time() - t0, 2))), flush=True)


def multihost_forward():
    """Under jax.distributed (2 processes × 4 CPU devices): the (2,2,2) mesh spans both processes — batch split over
    `data` across them, experts and heads within and across. Every process also runs the one-device model on a
    local device and compares (prints one JSON line per strategy)."""
    sharding.maybe_initialize_distributed()
    config = tiny_config()
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, (BATCH, PROMPT_LEN)).astype(np.int32)
    lengths = np.array([PROMPT_LEN, 5, 3, PROMPT_LEN - 1], np.int32)
    kw = dict(dtype=jnp.float32, quant=QuantSpec(group_size=32))
    with jax.default_device(jax.local_devices()[0]):
        base_model = GptOss(config, rngs=nnx.Rngs(1), **kw)
        params = jax.tree.map(np.asarray, params_of(base_model))
        ref_logits, ref_tokens = generate(base_model, prompt, lengths)
    for strategy in ("replicated", "dispatch"):
        mesh = sharding.make_mesh(2, 2, 2, config=config)
        model = build_model(config, params, **kw)
        model = shard_model(model, mesh, moe_strategy=strategy)
        logits, tokens = generate(model, prompt, lengths, mesh)
        errs = [rel(a, b) for a, b in zip(logits, ref_logits)]
        print(json.dumps(dict(process=jax.process_index(), processes=jax.process_count(),
                              devices=jax.device_count(), strategy=strategy, prefill_rel_err=errs[0],
                              decode_rel_err=max(errs[1:]), tokens_equal=bool(np.array_equal(tokens, ref_tokens)),
                              nan=bool(any(np.isnan(x).any() for x in logits)))), flush=True)


# ------------------------------------------------------------------------------------------------ restore
def restore_config() -> GptOssConfig:
    # experts dominate the checkpoint (like gpt-oss), so a host holding half the experts reads about half of it
    return tiny_config(layers=8).replace(intermediate_size=512, num_local_experts=16, vocab_size=512)


def _random_tree(specs):
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), specs,
                        is_leaf=sharding.P_.is_spec)


def save(path, fmt):
    """fmt "converter": gptoss_jax.checkpoint.save_params (item per layer, written from host arrays);
    fmt "tree": one Orbax tree written from a sharded layout (its stored chunks are the shards)."""
    config = restore_config()
    specs = sharding.P_.param_specs(config, dtype=jnp.float32)
    tree = _random_tree(specs)
    if fmt == "converter":
        from gptoss_jax import checkpoint
        checkpoint.save_params(path, tree, config, dtype="float32")
    else:
        import orbax.checkpoint as ocp
        mesh = sharding.make_mesh(1, None, 1, config=config)
        tree = jax.device_put(tree, sharding.shardings_for(specs, mesh))
        with ocp.StandardCheckpointer() as ck:
            ck.save(os.path.abspath(path), sharding._str_keys(tree))
    nbytes = sum(s.nbytes for _, s in sharding.P_.iter_specs(specs))
    print(json.dumps(dict(saved=path, nbytes=nbytes)), flush=True)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def restore(path, fmt):
    sharding.maybe_initialize_distributed()  # env: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    config = restore_config()
    mesh = sharding.make_mesh(1, None, 1, config=config)  # experts over all 8 devices of both processes
    specs = sharding.P_.param_specs(config, dtype=jnp.float32)
    shardings = sharding.shardings_for(specs, mesh)
    import orbax.checkpoint  # noqa: F401  (import cost outside the measurement)

    from gptoss_jax import checkpoint  # noqa: F401
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter so VmHWM measures the restore only
        hwm_reset = True
    except OSError:
        hwm_reset = False
    rss_before = _rss_kb("VmRSS")
    t0 = time.time()
    if fmt == "converter":
        _, _, params = checkpoint.restore_params(path, mesh)
    else:
        params = sharding.restore_orbax_tree(path, specs, shardings)
    jax.block_until_ready(params)
    seconds = time.time() - t0
    peak = _rss_kb("VmHWM")
    full = _random_tree(specs)
    if fmt == "converter":  # restored as the model tree: layers stacked
        specs = sharding.P_.model_specs(config, dtype=jnp.float32)
        shardings = sharding.shardings_for(specs, mesh)
        full = sharding.P_.stack_layers(full)
    ok_shapes, bad = 0, []
    for p, s in sharding.P_.iter_specs(specs):
        arr = params
        for key in p:
            arr = arr[key]
        expected = shardings
        for key in p:
            expected = expected[key]
        want = expected.shard_shape(s.shape)
        for shard in arr.addressable_shards:
            if tuple(shard.data.shape) != tuple(want):
                bad.append((sharding.P_.path_str(p), tuple(shard.data.shape), tuple(want)))
            else:
                ok_shapes += 1
    # values: compare this host's shards with the same random tree regenerated
    mismatched = 0
    for p, _ in sharding.P_.iter_specs(specs):
        arr, ref = params, full
        for key in p:
            arr, ref = arr[key], ref[key]
        for shard in arr.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), ref[shard.index]):
                mismatched += 1
    local_bytes = sum(sh.data.nbytes for leaf in jax.tree.leaves(params) for sh in leaf.addressable_shards)
    down = params["layers"]["mlp"]["experts"]["down"] if fmt == "converter" else params["layers"][0]["mlp"]["experts"]["down"]
    dev0 = down.addressable_shards[0]
    print(json.dumps(dict(
        process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
        local_devices=jax.local_device_count(), checkpoint_bytes=sum(s.nbytes for _, s in
                                                                      sharding.P_.iter_specs(specs)),
        rss_increase_bytes=(peak - rss_before) * 1024, hwm_reset=hwm_reset, local_shard_bytes=local_bytes,
        shards_ok=ok_shapes, bad_shapes=bad[:5], mismatched_shards=mismatched, seconds=round(seconds, 2),
        experts_down_shard_shape=list(dev0.data.shape[-3:]))), flush=True)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "equivalence"
    if mode == "equivalence":
        equivalence(full="--full" in sys.argv)
    elif mode == "multihost_forward":
        multihost_forward()
    elif mode == "save":
        save(sys.argv[2], sys.argv[3])
    elif mode == "restore":
        restore(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
