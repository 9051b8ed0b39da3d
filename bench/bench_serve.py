"""Serving benchmark: N concurrent streaming clients against `gptoss-jax serve`; p50/p99 time to first token (TTFT),
time per output token (TPOT) and aggregate generated tokens/s.

    python3 bench/bench_serve.py --url http://127.0.0.1:8000 --clients 64        # a running server
    python3 bench/bench_serve.py --checkpoint CKPT --clients 64,256 --max-batch 256 # starts one in-process
    python3 bench/bench_serve.py --random-preset gpt-oss-120b --clients 64,256 --max-batch 256   # random int4
    python3 bench/bench_serve.py --random-preset tiny --clients 4 --max-tokens 16 --max-batch 4  # CPU dry run

Each client sends --requests-per-client completions (token-id prompts of --prompt-len random ids, greedy, exactly
--max-tokens tokens: no stop ids) through the openai client with stream=True; the first round is a warm-up
(compilations) and is not timed. Results (JSON) go to $OUT/bench_serve.json (or ./bench_out); each round's
"engine" entry has the server's scheduler timing over the round (from /metrics: host ms and device-wait ms per
decode call, the device's idle fraction, decode steps/s). Compare the
aggregate decode rate with `gptoss-jax bench` at the same batch (the issue's target: within 80 %): --random-preset
serves the same random weights as `gptoss-jax bench --random-weights` with the same --group-size / --asymmetric
(seed 0).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def start_server(model, args, max_batch: int):
    import uvicorn

    from gptoss_jax.serve.cli import build
    t0 = time.perf_counter()
    _, app = build(model, max_batch=max_batch, max_queue=4096, chunk_size=args.chunk_size, model_name="bench",
                   request_timeout=3600, warmup_prompt_len=args.prompt_len, overlap=not args.no_overlap,
                   prefill_budget=args.prefill_budget)
    print(f"server with {max_batch} slots compiled in {time.perf_counter() - t0:.1f}s", flush=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    server.thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def stop_server(server) -> None:
    """Stops uvicorn and waits for it (its lifespan shuts the engine down) before the interpreter exits."""
    server.should_exit = True
    server.thread.join(60)


def random_model(preset: str, max_seq_len: int, group_size: int = 32, symmetric: bool = True, seed: int = 0):
    """A random-weight model of a preset's shape (int4 experts/attention as converted checkpoints hold them: group
    size and symmetric / asymmetric as given), with the tiny tokenizer (prompts are token ids; ids past its
    vocabulary print as <|id:N|>). The weights are those of `gptoss-jax bench --random-weights --seed SEED` with the
    same scheme (gptoss_jax.bench.random_model_params): random weights route differently with every generator, so
    only the same weights make the two benchmarks comparable."""
    import jax
    import jax.numpy as jnp

    from gptoss_jax.api import InferenceModel
    from gptoss_jax.bench import random_model_params
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.model import build_model
    from gptoss_jax.params import QuantSpec
    from gptoss_jax.testing import build_tiny_tokenizer
    config = GptOssConfig.from_preset(preset)
    quant = QuantSpec(group_size=group_size, symmetric=symmetric)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = random_model_params(config, dtype=jnp.bfloat16, quant=quant, sharding_of=lambda path, spec: device,
                                 seed=seed)
    module = build_model(config, params, dtype=jnp.bfloat16, quant=quant)
    return InferenceModel(module, tokenizer=build_tiny_tokenizer(1024), max_seq_len=max_seq_len,
                          default_stop_token_ids=())


def scrape(url: str) -> dict:
    """The server's /metrics as {name or name{label=value}: value} (Prometheus text, parsed by prometheus_client)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def engine_timing(before: dict, after: dict, wall: float) -> dict:
    """Where the scheduler's time went during a round (deltas of the /metrics counters): per decode call, the host's
    work and the time blocked on the device; the device's idle time (upper bound) as a fraction of the wall time;
    model decode steps per second."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    calls = d.get("gptoss_decode_calls_total", 0.0)
    sec = {s: d.get(f"gptoss_scheduler_seconds_total{{state={s}}}", 0.0) for s in ("host", "wait", "idle",
                                                                                     "device_idle")}
    if not calls:
        return {}
    dispatches = d.get("gptoss_scheduler_dispatches_total", 0.0)
    return {"decode_calls": int(calls), "decode_steps": int(d.get("gptoss_decode_steps_total", 0)),
            "decode_steps_per_s": d.get("gptoss_decode_steps_total", 0.0) / wall,
            "prefill_calls": int(d.get("gptoss_prefill_calls_total", 0)),
            "host_ms_per_decode_call": 1e3 * sec["host"] / calls, "wait_ms_per_decode_call": 1e3 * sec["wait"] / calls,
            "device_idle_fraction": sec["device_idle"] / wall,
            "starved_dispatch_fraction": d.get("gptoss_scheduler_device_starved_total", 0.0) / max(dispatches, 1)}


def run_round(url: str, clients: int, args, vocab: int, seed: int) -> dict:
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600,
                           http_client=None)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(16, vocab, size=args.prompt_len).tolist() for _ in range(clients)]

    def one(i):
        t0 = time.perf_counter()
        ttft, n, last = None, 0, t0
        stream = client.completions.create(model="bench", prompt=prompts[i], max_tokens=args.max_tokens,
                                           temperature=0, stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        for c in stream:
            if c.usage is not None:
                n = c.usage.completion_tokens
            if c.choices and c.choices[0].text and ttft is None:
                ttft = time.perf_counter() - t0
            last = time.perf_counter()
        return ttft if ttft is not None else last - t0, n, last - t0

    before = scrape(url)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for _ in range(args.requests_per_client) for r in pool.map(one, range(clients))]
    wall = time.perf_counter() - t0
    timing = engine_timing(before, scrape(url), wall)
    ttft = np.array([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    tpot = np.array([(r[2] - r[0]) / max(r[1] - 1, 1) for r in results])
    return {"clients": clients, "requests": len(results), "generated_tokens": int(tokens), "wall_s": wall,
            "aggregate_tokens_per_s": tokens / wall, "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)), "tpot_p50_s": float(np.percentile(tpot, 50)),
            "tpot_p99_s": float(np.percentile(tpot, 99)),
            # what `gptoss-jax bench` calls decode tokens/s (batch / TPOT), for the comparison at the same batch
            "decode_tokens_per_s": clients / float(np.percentile(tpot, 50)), "engine": timing}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server")
    src.add_argument("--checkpoint", help="load this checkpoint and serve it in-process")
    src.add_argument("--random-preset", help="random weights of this preset's shape (int4), served in-process")
    ap.add_argument("--group-size", type=int, default=32, help="--random-preset: int4 group size")
    ap.add_argument("--asymmetric", action="store_true", help="--random-preset: int4 with zero points (as AWQ)")
    ap.add_argument("--clients", default="64", help="comma-separated concurrency levels, e.g. 64,256")
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=0,
                    help="decode slots of an in-process server (default 0: one server per level, slots = clients)")
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--prefill-budget", type=int, default=None,
                    help="the server's --prefill-budget (prompt tokens per iteration while rows decode)")
    ap.add_argument("--no-overlap", action="store_true",
                    help="in-process server: read each call before dispatching the next (the pre-overlap behaviour)")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=None, help="token ids are drawn below this (default: the model's)")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    vocab = args.vocab
    model = None
    if args.url:
        vocab = vocab or 300
    else:
        if args.checkpoint:
            import gptoss_jax
            model = gptoss_jax.load(args.checkpoint, max_seq_len=args.max_seq_len)
        else:
            model = random_model(args.random_preset, args.max_seq_len, args.group_size, not args.asymmetric)
        vocab = vocab or min(model.config.vocab_size, model.tokenizer.vocab_size)
    out = {"args": vars(args), "rounds": []}
    server = None
    for n in levels:
        url = args.url.rstrip("/") if args.url else None
        try:
            if model is not None and (server is None or not args.max_batch):
                if server is not None:
                    stop_server(server)
                server, url = start_server(model, args, args.max_batch or n)
            url = url or out.get("url")
            out["url"] = url
            t0 = time.perf_counter()
            run_round(url, n, args, vocab, seed=1)  # warm-up: compiles this level's prefill/decode shapes
            warm = time.perf_counter() - t0
            r = run_round(url, n, args, vocab, seed=2)
            r["warmup_s"] = warm
            print(json.dumps(r), flush=True)
            out["rounds"].append(r)
        except Exception as e:  # noqa: BLE001 — report and go on with the next level
            print(f"level {n}: {type(e).__name__}: {e}", flush=True)
            out["rounds"].append({"clients": n, "error": f"{type(e).__name__}: {e}"})
    if server is not None:
        stop_server(server)
    folder = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "bench_serve.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
