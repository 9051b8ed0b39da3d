"""Expert-parallel gpt-oss-120b-shaped model on 1..N GPUs of one host: correctness against one GPU, then timings.

    python3 bench/bench_sharded_decode.py --gpus 2     # logs + sharded_decode.json under $OUT (or ./bench_out)
    python3 bench/bench_sharded_decode.py --gpus 2,4          # several GPU counts in one run
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python3 bench/bench_sharded_decode.py --preset tiny \\
        --gpus 2,4 --check-layers 2 --layers 2                # CPU dry run of the script itself

Weights are random int4 (packed codes + bf16 scales, group 32) and bf16, generated on the devices straight into
their shardings (``jax.random`` values do not depend on the sharding, so every mesh sees the same weights).

1. Correctness (a model of --check-layers layers, since one GPU cannot hold all 36 of 120b): greedy prefill + decode
   on one GPU, then on each mesh (1, n, 1) with both MoE strategies ("replicated" psum and "dispatch" ragged
   all-to-all); reports greedy-token equality and the relative L2 error of the logits vs one GPU.
2. Timing (--layers layers, default all 36) on each mesh (1, n, 1): the decode step time (greedy, on device, cache
   donated, --max-len cache slots) at batch 1, 64 and 256, tokens/s = batch / step time; then, while the budget
   lasts, prefill of --prompt tokens per row (auto MoE strategy: dispatch from 4096 tokens).
Every item is wrapped in try/except and a time budget (--budget-s) skips what no longer fits.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gptoss_jax import sharding  # noqa: E402
from gptoss_jax.config import GptOssConfig  # noqa: E402
from gptoss_jax.model import build_model, shard_model  # noqa: E402
from gptoss_jax.kv_cache import init_cache  # noqa: E402
from gptoss_jax.params import (QuantSpec, StackedTreeBuilder, iter_specs, model_specs, param_specs,  # noqa: E402
                               path_str)

T0 = time.time()
OUT = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
os.makedirs(OUT, exist_ok=True)
LOG = open(os.path.join(OUT, "sharded_decode.log"), "a")
RESULTS: dict = dict(checks=[], timings=[], errors=[], skipped=[])


def log(*a):
    s = f"[{time.time() - T0:7.1f}s] " + " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


def save_results():
    with open(os.path.join(OUT, "sharded_decode.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


# ------------------------------------------------------------------------------------------------ random weights
def _leaf_kind(path: tuple) -> str:
    last = path[-1]
    if last == "packed":
        return "packed"
    if last == "scales":
        return "scales"
    if last == "scale":
        return "ones"
    return "normal"


def _gen(key, *, shape, dtype, kind):
    if kind == "packed":  # 8 uniform random 4-bit codes per int32 word
        return jax.lax.bitcast_convert_type(jax.random.bits(key, shape, jnp.uint32), jnp.int32)
    if kind == "scales":  # codes q-8 in [-8, 7] have std ~4.6: weights of std ~0.02
        return (0.0045 * jax.random.uniform(key, shape, jnp.float32, 0.5, 1.5)).astype(dtype)
    if kind == "ones":
        return jnp.ones(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


_GEN_CACHE: dict = {}


def random_params(config, *, dtype, quant, shardings_of, seed=0):
    """The model tree (layers stacked) generated on device layer by layer, each layer written in place into its
    stacked array (params.StackedTreeBuilder), so no leaf is ever generated whole (a 36-layer gate_up is 38 GB);
    shardings_of(model_path, spec) gives each leaf's sharding."""
    base = jax.random.key(seed)
    builder = StackedTreeBuilder(model_specs(config, dtype=dtype, quant=quant), shardings_of)
    for path, spec in iter_specs(param_specs(config, dtype=dtype, quant=quant)):  # storage tree: per layer
        kind = _leaf_kind(path)
        # key from the path with the layer index folded in separately: layer i is the same in any model depth
        name = path_str(tuple("L" if isinstance(p, int) else p for p in path))
        key = jax.random.fold_in(base, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        layer = next((p for p in path if isinstance(p, int)), -1)
        key = jax.random.fold_in(key, layer + 1)
        sh = builder.layer_sharding(path)
        cache_key = (spec.shape, str(jnp.dtype(spec.dtype)), kind, sh)
        if cache_key not in _GEN_CACHE:
            _GEN_CACHE[cache_key] = jax.jit(lambda k, s=spec.shape, d=jnp.dtype(spec.dtype), kd=kind:
                                            _gen(k, shape=s, dtype=d, kind=kd), out_shardings=sh)
        builder.put(path, _GEN_CACHE[cache_key](key))
    return builder.tree()


# ------------------------------------------------------------------------------------------------- model steps
def make_steps(model):
    graphdef, state = nnx.split(model)

    def prefill(state, tokens, lengths, cache):
        m = nnx.merge(graphdef, state)
        b = tokens.shape[0]
        logits, cache = m(tokens, start=jnp.zeros((b,), jnp.int32), lengths=lengths, cache=cache,
                          attend_to_cache=False, logits_for="last")
        return logits[:, 0], jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

    def decode(state, tokens, positions, cache):
        m = nnx.merge(graphdef, state)
        b = tokens.shape[0]
        logits, cache = m(tokens[:, None], start=positions, lengths=jnp.ones((b,), jnp.int32), cache=cache)
        return logits[:, 0], jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

    def decode_tokens_only(state, tokens, positions, cache):
        _, nxt, cache = decode(state, tokens, positions, cache)
        return nxt, positions + 1, cache

    return (state, jax.jit(prefill, donate_argnums=(3,)), jax.jit(decode, donate_argnums=(3,)),
            jax.jit(decode_tokens_only, donate_argnums=(3,)))


def make_model(config, params, *, dtype, quant, mesh=None, strategy="auto"):
    model = build_model(config, params, dtype=dtype, quant=quant)
    if mesh is not None:
        model = shard_model(model, mesh, moe_strategy=strategy)
    return model


def new_cache(config, batch, max_len, dtype, mesh):
    cache = init_cache(config, batch, max_len, dtype=dtype)
    return sharding.shard_cache(cache, mesh) if mesh is not None else cache


def greedy(model, config, prompt, lengths, steps, dtype, mesh):
    state, prefill, decode, _ = make_steps(model)
    b = prompt.shape[0]
    cache = new_cache(config, b, prompt.shape[1] + steps + 1, dtype, mesh)
    logits, nxt, cache = prefill(state, jnp.asarray(prompt), jnp.asarray(lengths), cache)
    all_logits, tokens = [np.asarray(logits, np.float32)], [np.asarray(nxt)]
    pos = jnp.asarray(lengths)
    for _ in range(steps):
        logits, nxt, cache = decode(state, nxt, pos, cache)
        pos = pos + 1
        all_logits.append(np.asarray(logits, np.float32))
        tokens.append(np.asarray(nxt))
    return np.stack(all_logits, 1), np.stack(tokens, 1)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt-oss-120b")
    ap.add_argument("--gpus", default="2", help="comma-separated device counts for the expert axis, e.g. 2,4")
    ap.add_argument("--layers", type=int, default=None, help="layers for timing (default: all of the preset)")
    ap.add_argument("--check-layers", type=int, default=4, help="layers for the one-device comparison (0: skip)")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per batch size")
    ap.add_argument("--max-len", type=int, default=512, help="KV cache slots of the full-attention layers")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--check-fp32", action="store_true", help="also compare float32-compute runs (after timing)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_BUDGET_S", "380")))
    args = ap.parse_args()

    dtype, quant = jnp.bfloat16, QuantSpec(group_size=args.group_size)
    full = GptOssConfig.from_preset(args.preset)
    gpu_counts = [int(x) for x in args.gpus.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    RESULTS.update(started=datetime.datetime.utcnow().isoformat() + "Z", backend=jax.default_backend(),
                   devices=[str(d) for d in jax.devices()], jax=jax.__version__, args=vars(args))
    log("devices:", jax.devices())
    from gptoss_jax.kernels import default_implementation
    log("kernel implementation (auto):", default_implementation())
    RESULTS["kernel_implementation"] = default_implementation()

    def over_budget(what, need=30.0):
        if time.time() - T0 + need > args.budget_s:
            log("SKIP (budget):", what)
            RESULTS["skipped"].append(what)
            save_results()
            return True
        return False

    # 1. correctness vs one device -------------------------------------------------------------------------
    def correctness(cdtype, label):
        cfg = full.replace(num_hidden_layers=args.check_layers, layer_types=())
        rng = np.random.default_rng(0)
        b, t, steps = 4, 16, 8
        prompt = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
        lengths = np.array([t, t - 3, 9, t - 1], np.int32)
        one = jax.devices()[:1]
        if over_budget(f"{label} reference", 60):
            return
        try:
            t1 = time.time()
            ref_params = random_params(cfg, dtype=cdtype, quant=quant,
                                       shardings_of=lambda p, s: jax.sharding.SingleDeviceSharding(one[0]))
            ref_logits, ref_tokens = greedy(make_model(cfg, ref_params, dtype=cdtype, quant=quant), cfg, prompt,
                                            lengths, steps, cdtype, None)
            del ref_params
            log(f"{label} one-device reference ({args.check_layers} layers): tokens {ref_tokens.tolist()} "
                f"({time.time() - t1:.1f}s)")
        except Exception as e:  # noqa: BLE001
            log(f"{label} one-device reference FAILED:", repr(e)[:2000])
            RESULTS["errors"].append(dict(what=f"{label} reference", error=traceback.format_exc()[-4000:]))
            return
        for n in gpu_counts:
            for strategy in ("replicated", "dispatch"):
                what = f"{label} check n={n} {strategy}"
                if over_budget(what, 40):
                    continue
                try:
                    t1 = time.time()
                    mesh = sharding.make_mesh(1, n, 1, config=cfg)
                    params = random_params(cfg, dtype=cdtype, quant=quant,
                                           shardings_of=sharding.sharding_rule(mesh))
                    model = make_model(cfg, params, dtype=cdtype, quant=quant, mesh=mesh, strategy=strategy)
                    logits, tokens = greedy(model, cfg, prompt, lengths, steps, cdtype, mesh)
                    margin = np.sort(ref_logits, -1)
                    r = dict(dtype=label, gpus=n, strategy=strategy, layers=args.check_layers,
                             tokens_equal=bool(np.array_equal(tokens, ref_tokens)),
                             mismatched_tokens=int((tokens != ref_tokens).sum()), total_tokens=int(tokens.size),
                             logits_rel_err=rel(logits, ref_logits),
                             min_top2_margin=float((margin[..., -1] - margin[..., -2]).min()),
                             tokens=tokens.tolist(), seconds=round(time.time() - t1, 1))
                    RESULTS["checks"].append(r)
                    log(what, {k: v for k, v in r.items() if k != "tokens"})
                    del model, params
                except Exception as e:  # noqa: BLE001
                    log(what, "FAILED:", repr(e)[:2000])
                    RESULTS["errors"].append(dict(what=what, error=traceback.format_exc()[-4000:]))
                save_results()

    if args.check_layers:
        correctness(dtype, "bf16")

    # 2. timing -----------------------------------------------------------------------------------------------
    layers = args.layers or full.num_hidden_layers
    cfg = full.replace(num_hidden_layers=layers, layer_types=())
    max_len = args.max_len
    for n in gpu_counts:
        if over_budget(f"timing n={n}", 60):
            continue
        try:
            t1 = time.time()
            mesh = sharding.make_mesh(1, n, 1, config=cfg)
            params = random_params(cfg, dtype=dtype, quant=quant, shardings_of=sharding.sharding_rule(mesh))
            jax.block_until_ready(params)
            per_device = max(sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards
                                 if s.device == d) for d in mesh.devices.flat)
            log(f"n={n}: {layers}-layer weights generated in {time.time() - t1:.1f}s; "
                f"{per_device / 2**30:.2f} GiB of weights per device")
            RESULTS.setdefault("weights_gib_per_device", {})[n] = round(per_device / 2**30, 2)
            model = make_model(cfg, params, dtype=dtype, quant=quant, mesh=mesh, strategy="auto")
            state, prefill, _, decode_tokens = make_steps(model)
        except Exception as e:  # noqa: BLE001
            log(f"timing n={n} setup FAILED:", repr(e)[:2000])
            RESULTS["errors"].append(dict(what=f"timing n={n} setup", error=traceback.format_exc()[-4000:]))
            save_results()
            continue
        # decode first (the numbers asked for), from an empty cache of max_len slots: a decode step reads every
        # slot whatever its fill, so its cost is that of a context of max_len tokens
        for b in batches:
            what = f"decode n={n} batch={b}"
            if over_budget(what, 45):
                continue
            try:
                cache = new_cache(cfg, b, max_len, dtype, mesh)
                nxt = jnp.asarray(np.random.default_rng(b).integers(0, cfg.vocab_size, (b,)), jnp.int32)
                pos = jnp.zeros((b,), jnp.int32)
                t1 = time.time()
                nxt, pos, cache = decode_tokens(state, nxt, pos, cache)  # compile + warm-up
                nxt, pos, cache = decode_tokens(state, nxt, pos, cache)
                nxt.block_until_ready()
                compile_s = time.time() - t1
                t1 = time.time()
                for _ in range(args.steps):
                    nxt, pos, cache = decode_tokens(state, nxt, pos, cache)
                nxt.block_until_ready()
                step = (time.time() - t1) / args.steps
                r = dict(gpus=n, batch=b, layers=layers, decode_step_ms=round(step * 1e3, 3),
                         tokens_per_s=round(b / step, 1), cache_slots=max_len, compile_s=round(compile_s, 1),
                         moe_strategy=model.layers.mlp.parallel.strategy_for(b))
                RESULTS["timings"].append(r)
                log(what, r)
                del cache
            except Exception as e:  # noqa: BLE001
                log(what, "FAILED:", repr(e)[:2000])
                RESULTS["errors"].append(dict(what=what, error=traceback.format_exc()[-4000:]))
            save_results()
        # then prefill of --prompt tokens per row, while the budget lasts
        for b in batches:
            what = f"prefill n={n} batch={b}"
            if over_budget(what, 45):
                continue
            try:
                rng = np.random.default_rng(b)
                prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, args.prompt)), jnp.int32)
                lengths = jnp.full((b,), args.prompt, jnp.int32)
                strategy = model.layers.mlp.parallel.strategy_for(b * args.prompt)
                t1 = time.time()
                try:
                    _, nxt, cache = prefill(state, prompt, lengths, new_cache(cfg, b, max_len, dtype, mesh))
                    nxt.block_until_ready()
                except Exception as e:  # noqa: BLE001 — e.g. ragged_all_to_all missing: fall back, keep timing
                    log(what, "FAILED, retrying with the replicated MoE strategy:", repr(e)[:1500])
                    RESULTS["errors"].append(dict(what=what, error=traceback.format_exc()[-4000:]))
                    model = shard_model(model, mesh, moe_strategy="replicated")
                    state, prefill, _, decode_tokens = make_steps(model)
                    strategy = "replicated (fallback)"
                    _, nxt, cache = prefill(state, prompt, lengths, new_cache(cfg, b, max_len, dtype, mesh))
                    nxt.block_until_ready()
                compile_s = time.time() - t1
                del cache
                t1 = time.time()
                _, nxt, cache = prefill(state, prompt, lengths, new_cache(cfg, b, max_len, dtype, mesh))
                nxt.block_until_ready()
                prefill_s = time.time() - t1
                r = dict(gpus=n, batch=b, layers=layers, prefill_tokens=b * args.prompt,
                         prefill_ms=round(prefill_s * 1e3, 1), tokens_per_s=round(b * args.prompt / prefill_s, 1),
                         moe_strategy=strategy, compile_s=round(compile_s, 1))
                RESULTS.setdefault("prefill", []).append(r)
                log(what, r)
                del cache
            except Exception as e:  # noqa: BLE001
                log(what, "FAILED:", repr(e)[:2000])
                RESULTS["errors"].append(dict(what=what, error=traceback.format_exc()[-4000:]))
            save_results()
        del model, state, params, prefill, decode_tokens
    if args.check_layers and args.check_fp32:  # float32 compute (int4 weights): the tight comparison, if time is left
        correctness(jnp.float32, "fp32")
    RESULTS["wall_s"] = round(time.time() - T0, 1)
    save_results()
    log("\n| GPUs | batch | layers | decode step (ms) | tokens/s | cache slots |")
    log("|---|---|---|---|---|---|")
    for r in RESULTS["timings"]:
        log(f"| {r['gpus']} | {r['batch']} | {r['layers']} | {r['decode_step_ms']} | {r['tokens_per_s']} | "
            f"{r['cache_slots']} |")
    for r in RESULTS.get("prefill", []):
        log(f"prefill gpus={r['gpus']} tokens={r['prefill_tokens']} ({r['moe_strategy']}): {r['prefill_ms']} ms, "
            f"{r['tokens_per_s']} tokens/s")
    for c in RESULTS["checks"]:
        log(f"check {c['dtype']} gpus={c['gpus']} {c['strategy']}: tokens_equal={c['tokens_equal']} "
            f"({c['mismatched_tokens']}/{c['total_tokens']} differ) logits_rel_err={c['logits_rel_err']:.2e}")


if __name__ == "__main__":
    main()
