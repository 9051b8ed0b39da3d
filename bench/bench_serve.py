"""Serving benchmark: N concurrent streaming clients against `gptoss-jax serve`; p50/p99 time to first token (TTFT),
time per output token (TPOT) and aggregate generated tokens/s.

    python3 bench/bench_serve.py --url http://127.0.0.1:8000 --clients 64        # a running server
    python3 bench/bench_serve.py --checkpoint CKPT --clients 64,256 --max-batch 256 # starts one in-process
    python3 bench/bench_serve.py --random-preset gpt-oss-120b --clients 64,256 --max-batch 256   # random int4
    python3 bench/bench_serve.py --random-preset tiny --clients 4 --max-tokens 16 --max-batch 4  # CPU dry run

Each client sends --requests-per-client completions (token-id prompts of --prompt-len random ids, greedy, exactly
--max-tokens tokens: no stop ids) through the openai client with stream=True; the first round is a warm-up
(compilations) and is not timed. Results (JSON) go to $OUT/bench_serve.json (or ./bench_out). Compare the
aggregate decode rate with `gptoss-jax bench` at the same batch (the issue's target: within 80 %).
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
                   request_timeout=3600, warmup_prompt_len=args.prompt_len)
    print(f"server with {max_batch} slots compiled in {time.perf_counter() - t0:.1f}s", flush=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def random_model(preset: str, max_seq_len: int):
    """A random-weight model of a preset's shape (int4 experts/attention as converted checkpoints hold them), with
    the tiny tokenizer (prompts are token ids; ids past its vocabulary print as <|id:N|>)."""
    import jax
    import jax.numpy as jnp

    from bench.bench_sharded_decode import make_model, random_params
    from gptoss_jax.api import InferenceModel
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.params import QuantSpec
    from gptoss_jax.testing import build_tiny_tokenizer
    config = GptOssConfig.from_preset(preset)
    quant = QuantSpec(group_size=32)
    params = random_params(config, dtype=jnp.bfloat16, quant=quant,
                           shardings_of=lambda path, spec: jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    module = make_model(config, params, dtype=jnp.bfloat16, quant=quant)
    return InferenceModel(module, tokenizer=build_tiny_tokenizer(1024), max_seq_len=max_seq_len,
                          default_stop_token_ids=())


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

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for _ in range(args.requests_per_client) for r in pool.map(one, range(clients))]
    wall = time.perf_counter() - t0
    ttft = np.array([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    tpot = np.array([(r[2] - r[0]) / max(r[1] - 1, 1) for r in results])
    return {"clients": clients, "requests": len(results), "generated_tokens": int(tokens), "wall_s": wall,
            "aggregate_tokens_per_s": tokens / wall, "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)), "tpot_p50_s": float(np.percentile(tpot, 50)),
            "tpot_p99_s": float(np.percentile(tpot, 99))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server")
    src.add_argument("--checkpoint", help="load this checkpoint and serve it in-process")
    src.add_argument("--random-preset", help="random weights of this preset's shape (int4), served in-process")
    ap.add_argument("--clients", default="64", help="comma-separated concurrency levels, e.g. 64,256")
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=0,
                    help="decode slots of an in-process server (default 0: one server per level, slots = clients)")
    ap.add_argument("--chunk-size", type=int, default=16)
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
            model = random_model(args.random_preset, args.max_seq_len)
        vocab = vocab or min(model.config.vocab_size, model.tokenizer.vocab_size)
    out = {"args": vars(args), "rounds": []}
    server = None
    for n in levels:
        url = args.url.rstrip("/") if args.url else None
        try:
            if model is not None and (server is None or not args.max_batch):
                if server is not None:
                    server.should_exit = True
                    time.sleep(2)
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
        server.should_exit = True
    folder = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "bench_serve.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
