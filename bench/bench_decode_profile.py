"""Steady-state decode of the public generate path with a kernel-level profile (where the time of a step goes).

    python3 bench/bench_decode_profile.py [--layers 36] [--batch 1]      # gpt-oss-120b shape, random int4 g32

Prints decode ms/token and tokens/s from GenerationStats, then the top kernels of one profiled generate call
(parsed from jax.profiler's perfetto trace): name, count, total ms.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt-oss-120b")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gen", type=int, default=65)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from bench_sharded_decode import random_params
    from gptoss_jax.api import InferenceModel
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.model import build_model
    from gptoss_jax.params import QuantSpec

    config = GptOssConfig.from_preset(args.preset)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers, layer_types=())
    quant = QuantSpec(group_size=32, symmetric=False)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = random_params(config, dtype=jnp.bfloat16, quant=quant, shardings_of=lambda p, s: dev)
    model = InferenceModel(build_model(config, params, dtype=jnp.bfloat16, quant=quant), max_seq_len=1024)
    prompt = [[(7 * i + 3) % config.vocab_size for i in range(64)] for _ in range(args.batch)]
    kw = dict(max_new_tokens=args.gen, temperature=0, stop_token_ids=())
    for _ in range(2):
        s = model.stream(prompt, **kw)
        s.finish()
    st = s.stats
    ms = 1000 * st.decode_s / max(st.decode_tokens / args.batch, 1)
    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "layers": config.num_hidden_layers,
                      "batch": args.batch, "decode_ms_per_step": round(ms, 3),
                      "decode_tokens_per_s": round(st.decode_tokens_per_s, 1),
                      "ttft_s": round(st.time_to_first_token_s, 4)}), flush=True)
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        s = model.stream(prompt, **kw)
        s.finish()
    files = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)
    events = json.load(gzip.open(files[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    pids = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {p for p, n in pids.items() if "/device:GPU" in n or "GPU" in n and "Host" not in n}
    agg = collections.defaultdict(lambda: [0, 0.0, ""])
    busy = 0.0
    modules = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu:
            module = (e.get("args") or {}).get("hlo_module", "")
            modules[module] += 1
            if module and "decode" not in module:
                continue  # the prefill program's kernels
            a = agg[e["name"][:90]]
            a[0] += 1
            a[1] += e.get("dur", 0) / 1000
            a[2] = (e.get("args") or {}).get("hlo_op", "")
            busy += e.get("dur", 0) / 1000
    steps = s.stats.decode_tokens / args.batch
    summary = {"profiled_steps": steps, "gpu_busy_ms_per_step": round(busy / steps, 3),
               "kernels_per_step": round(sum(a[0] for a in agg.values()) / steps, 1),
               "kernel_events_by_module": dict(modules)}
    print(json.dumps(summary))
    table = sorted(agg.items(), key=lambda kv: -kv[1][1])
    for name, (n, t, op) in table[:args.top]:
        print(f"{t / steps:9.3f} ms/step {n / steps:7.1f}/step  {name}  [{op}]")
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        tag = os.environ.get("PROFILE_TAG", "profile")
        with open(os.path.join(out, f"{tag}.json"), "w") as f:
            json.dump({**summary, "decode_ms_per_step": ms, "kernels": [
                dict(name=n, per_step=c / steps, ms_per_step=t / steps, hlo_op=op) for n, (c, t, op) in table]}, f,
                indent=0)


if __name__ == "__main__":
    main()
