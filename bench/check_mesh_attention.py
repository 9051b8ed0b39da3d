"""On one GPU: the model on a (1,1,1) mesh (attention per device under shard_map) equals the single-device model
and runs the same Pallas kernels (attention included), at the gpt-oss-120b widths with few layers.

    python3 bench/check_mesh_attention.py [--layers 2 --prompt 2048 --steps 8]

Prints JSON: relative L2 of the logits (prefill + decode steps), greedy tokens equal, the number of Triton custom
calls in each compiled prefill/decode, and prefill/decode times of both. Results also in $OUT/mesh_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt-oss-120b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_sharded_decode import make_steps, new_cache, random_params, rel
    from gptoss_jax import sharding
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.model import build_model, shard_model
    from gptoss_jax.params import QuantSpec

    config = GptOssConfig.from_preset(args.preset).replace(num_hidden_layers=args.layers, layer_types=())
    quant = QuantSpec(group_size=32, symmetric=False)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = random_params(config, dtype=jnp.bfloat16, quant=quant, shardings_of=lambda p, s: dev)
    single = build_model(config, params, dtype=jnp.bfloat16, quant=quant)
    mesh = sharding.make_mesh(1, 1, 1, config=config)
    meshed = shard_model(single, mesh, moe_strategy="replicated")

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    lengths = np.array([args.prompt - 17 * i for i in range(args.batch)], np.int32)
    out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "layers": args.layers,
           "prompt": args.prompt, "batch": args.batch}
    results = {}
    for name, model, m in (("single", single, None), ("mesh111", meshed, mesh)):
        state, prefill, decode, _ = make_steps(model)
        cache = new_cache(config, args.batch, args.prompt + args.steps + 1, jnp.bfloat16, m)
        hlo_p = prefill.lower(state, jnp.asarray(prompt), jnp.asarray(lengths), cache).compile().as_text()
        hlo_d = decode.lower(state, jnp.asarray(lengths), jnp.asarray(lengths), cache).compile().as_text()
        out[f"{name}_triton_calls_prefill"] = hlo_p.count("__gpu$xla.gpu.triton")
        out[f"{name}_triton_calls_decode"] = hlo_d.count("__gpu$xla.gpu.triton")
        def run():
            cache = new_cache(config, args.batch, args.prompt + args.steps + 1, jnp.bfloat16, m)
            t0 = time.perf_counter()
            logits, nxt, cache = prefill(state, jnp.asarray(prompt), jnp.asarray(lengths), cache)
            all_logits, tokens = [np.asarray(logits, np.float32)], [np.asarray(nxt)]
            t1 = time.perf_counter()
            pos = jnp.asarray(lengths)
            for _ in range(args.steps):
                logits, nxt, cache = decode(state, nxt, pos, cache)
                pos = pos + 1
                all_logits.append(np.asarray(logits, np.float32))
                tokens.append(np.asarray(nxt))
            t2 = time.perf_counter()
            return np.stack(all_logits, 1), np.stack(tokens, 1), t1 - t0, (t2 - t1) / args.steps

        run()  # compiles
        logits, tokens, out[f"{name}_prefill_s"], out[f"{name}_decode_step_s"] = run()
        results[name] = (logits, tokens)
    out["logits_rel_l2"] = rel(results["mesh111"][0], results["single"][0])
    out["tokens_equal"] = bool((results["mesh111"][1] == results["single"][1]).all())
    print(json.dumps(out), flush=True)
    dst = os.environ.get("OUT")
    if dst:
        with open(os.path.join(dst, "mesh_attention.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
