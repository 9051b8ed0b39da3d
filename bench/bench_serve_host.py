"""Where the serve scheduler's time goes, without HTTP: how much of the wall time the host spends between device
calls (the device idle) with overlap on and off.

    PYTHONPATH=$PWD python bench/bench_serve_host.py                       # tiny random model on CPU
    PYTHONPATH=$PWD python bench/bench_serve_host.py --engine old.py       # another engine.py (e.g. an older one)

Runs --requests greedy requests (random token-id prompts of --prompt-len, exactly --max-tokens tokens each, text
detokenized as the completions endpoint does) through :class:`gptoss_jax.serve.engine.Engine` on --max-batch
slots, once with ``overlap=False`` (one call at a time: dispatch, wait, host work) and once with overlap, after a
warm-up round. ``jax.device_get`` is wrapped to time how long the scheduler thread is blocked on results, so the
numbers mean the same for any engine version:

* ``blocked``: seconds blocked on the device; ``host``: the rest of the busy wall time.
* without overlap the device idles while the host works: device idle fraction = host / wall (the only number an
  engine without the metrics below gives).
* the engine's own counters (``Engine.metrics``, also on ``/metrics``): ``device_idle_s`` is an upper bound of the
  time the device sat idle waiting for the host (summed over dispatches that found it done with everything sent
  before); ``device_idle_fraction`` = that / wall.

On a CPU the "device" is the same two cores as the host, so overlap cannot make the run much faster there (the
host's work slows XLA's threads); what it shows is that the device no longer waits for the host between calls.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

BLOCKED = [0.0]
METRICS = ("host_s", "wait_s", "idle_s", "device_idle_s", "dispatches", "starved", "decode_calls", "decode_steps",
           "prefill_calls")
_real_get = jax.device_get


def _timed_get(x):
    t0 = time.perf_counter()
    try:
        return _real_get(x)
    finally:
        if threading.current_thread().name == "gptoss-serve-scheduler":
            BLOCKED[0] += time.perf_counter() - t0


jax.device_get = _timed_get


def tiny_model(max_seq_len: int, layers: int, hidden: int | None):
    import jax.numpy as jnp
    from flax import nnx

    from gptoss_jax.api import InferenceModel
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.model import GptOss
    from gptoss_jax.testing import build_tiny_tokenizer
    tok = build_tiny_tokenizer(1024)
    config = GptOssConfig.from_preset("tiny").replace(vocab_size=tok.vocab_size, num_hidden_layers=layers,
                                                      layer_types=())
    if hidden:
        config = config.replace(hidden_size=hidden)
    module = GptOss(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    return InferenceModel(module, tokenizer=tok, max_seq_len=max_seq_len, default_stop_token_ids=())


def load_engine_module(path: str | None):
    if path is None:
        from gptoss_jax.serve import engine
        return engine
    spec = importlib.util.spec_from_file_location("engine_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def make_request(mod, prompt, emit, max_tokens):
    fields = getattr(mod.Request, "__dataclass_fields__", {})
    if "params" in fields:
        from gptoss_jax.generate import SamplingParams
        return mod.Request(prompt, emit, params=SamplingParams(max_new_tokens=max_tokens, temperature=0.0))
    return mod.Request(prompt, emit, max_new_tokens=max_tokens, temperature=0.0)


def run(mod, model, args, overlap: bool, seed: int) -> dict:
    kw = dict(max_batch=args.max_batch, chunk_size=args.chunk_size, max_queue=10_000)
    if "overlap" in mod.Engine.__init__.__code__.co_varnames:
        kw["overlap"] = overlap
    elif overlap:
        return {}
    engine = mod.Engine(model, **kw)
    engine.warmup(args.prompt_len)
    engine.start()
    rng = np.random.default_rng(seed)
    try:
        out = {}
        for rnd in ("warmup", "timed"):
            done = threading.Semaphore(0)
            tokens = [0]

            def emit(ev):
                if isinstance(ev, mod.Finished):
                    tokens[0] += len(ev.tokens)
                    done.release()
            BLOCKED[0] = 0.0
            m = engine.metrics
            before = {k: getattr(m, k) for k in METRICS if hasattr(m, k)}
            t0 = time.perf_counter()
            for _ in range(args.requests):
                prompt = rng.integers(16, model.config.vocab_size, size=args.prompt_len).tolist()
                engine.submit(make_request(mod, prompt, emit, args.max_tokens))
            for _ in range(args.requests):
                done.acquire()
            wall = time.perf_counter() - t0
            out = {"overlap": overlap, "wall_s": wall, "tokens": tokens[0], "tokens_per_s": tokens[0] / wall,
                   "blocked_s": BLOCKED[0], "host_s": wall - BLOCKED[0],
                   "host_fraction": (wall - BLOCKED[0]) / wall}
            for k, v in before.items():  # the engine's own counters over the timed round
                out[f"metrics_{k}"] = getattr(m, k) - v
            if "device_idle_s" in before:
                out["device_idle_fraction"] = out["metrics_device_idle_s"] / wall
        return out
    finally:
        engine.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", help="path of an engine.py to measure instead of gptoss_jax.serve.engine")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    mod = load_engine_module(args.engine)
    model = tiny_model(256, args.layers, args.hidden)
    results = []
    for rep in range(args.repeats):
        sync = run(mod, model, args, False, seed=rep)
        results.append(sync)
        print(json.dumps(sync), flush=True)
        over = run(mod, model, args, True, seed=rep)
        if over:
            results.append(over)
            print(json.dumps(over), flush=True)
    folder = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "bench_serve_host.json"), "w") as f:
        json.dump({"args": vars(args), "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()
