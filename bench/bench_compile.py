"""Compile time of the public generate path, cold and with the persistent compilation cache.

    python3 bench/bench_compile.py                       # gpt-oss-120b shape, random int4 g32 weights, one device
    python3 bench/bench_compile.py --preset tiny --layers 36 --hidden 256   # the CPU acceptance shape

Runs itself twice in fresh processes sharing one compilation-cache folder: the first process compiles (cache cold),
the second loads the executables. Each process builds random weights on device (``bench_sharded_decode``'s
generator, straight into the stacked model tree), wraps them in :class:`gptoss_jax.api.InferenceModel` and runs
``generate`` twice: the first call's time to first token and decode-chunk time minus the second call's are the
compile times of prefill and decode; it also reports the time of the first ``generate`` as a whole. Results as JSON
lines on stdout and in $OUT/compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def child(args) -> dict:
    import jax
    import jax.numpy as jnp

    from bench_sharded_decode import random_params  # noqa: E402  (bench/ helper)
    from gptoss_jax.api import InferenceModel
    from gptoss_jax.compilation import enable_compilation_cache
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.model import build_model
    from gptoss_jax.params import QuantSpec

    cache_dir = enable_compilation_cache()
    # where a (warm) compile's seconds go: tracing, lowering to MLIR, XLA compile or cache retrieval (jax's own
    # monitoring events, summed over the process)
    durations: dict = {}

    def on_duration(event, secs, **_):
        durations[event] = durations.get(event, 0.0) + secs

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    config = GptOssConfig.from_preset(args.preset)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers, layer_types=())
    if args.hidden:
        config = config.replace(hidden_size=args.hidden)
    quant = None if args.group_size == 0 else QuantSpec(group_size=args.group_size, symmetric=False)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    t = time.perf_counter()
    params = random_params(config, dtype=jnp.bfloat16, quant=quant, shardings_of=lambda p, s: dev)
    jax.block_until_ready(params)
    weights_s = time.perf_counter() - t
    model = InferenceModel(build_model(config, params, dtype=jnp.bfloat16, quant=quant), max_seq_len=args.max_len)
    prompt = [[(7 * i + 3) % config.vocab_size for i in range(args.prompt)] for _ in range(args.batch)]
    runs = []
    for _ in range(2):
        t = time.perf_counter()
        stream = model.stream(prompt, max_new_tokens=args.gen, temperature=0)
        stream.finish()
        runs.append({"total_s": time.perf_counter() - t, **stream.stats.to_dict()})
    cold, warm = runs
    return {
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "cache_dir": cache_dir,
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "experts": config.num_local_experts,
        "batch": args.batch, "prompt": args.prompt, "gen": args.gen, "weights_s": round(weights_s, 2),
        "first_generate_s": round(cold["total_s"], 3),
        "prefill_compile_s": round(cold["time_to_first_token_s"] - warm["time_to_first_token_s"], 3),
        "decode_compile_s": round(cold.get("compile_decode_s", 0.0), 3),
        "second_generate_s": round(warm["total_s"], 3),
        "compiles": model.generator.trace_counts,
        "jax_durations_s": {k: round(v, 3) for k, v in sorted(durations.items()) if "compil" in k or "trace" in k
                            or "mlir" in k or "cache" in k},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt-oss-120b")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=32, help="0: 16-bit weights")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--gen", type=int, default=33)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
    os.makedirs(out_dir, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "GPTOSS_JAX_COMPILATION_CACHE": cache}
        for label in ("cold cache", "warm cache (second process)"):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, capture_output=True,
                                  text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{label}: child failed (exit {proc.returncode})")
            r = {"run": label, "process_s": round(time.perf_counter() - t, 2), **json.loads(line[7:])}
            results.append(r)
            print(json.dumps(r), flush=True)
    with open(os.path.join(out_dir, "compile.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
