"""Subprocess side of tests/test_serve.py's mesh test: the serve scheduler on a virtual CPU mesh. XLA_FLAGS must give
several host devices before jax is imported, so the test runs ``python -m tests.serve_mesh_worker MESH`` with the
environment prepared. Prints one JSON line: per request, the served tokens and generate's tokens for the prompt
alone on the same mesh model; the XLA compilations and the traces of the serve steps on the scheduler thread after
warmup (more compilations than traces: an argument placed differently from warmup's); the engine's slots.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=N set before starting python")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import gptoss_jax  # noqa: E402
from gptoss_jax.config import GptOssConfig  # noqa: E402
from gptoss_jax.generate import TRACE_COUNTS, SamplingParams  # noqa: E402
from gptoss_jax.hf_loader import save_hf_checkpoint  # noqa: E402
from gptoss_jax.model import GptOss, params_of  # noqa: E402
from gptoss_jax.serve.engine import Delta, Engine, Finished, Request  # noqa: E402
from gptoss_jax.testing import build_tiny_tokenizer  # noqa: E402


def main(mesh: str) -> None:
    tok = build_tiny_tokenizer(1024)
    config = GptOssConfig.from_preset("tiny").replace(vocab_size=tok.vocab_size, num_hidden_layers=2,
                                                      layer_types=(), sliding_window=6)
    path = tempfile.mkdtemp()
    save_hf_checkpoint(params_of(GptOss(config, dtype=jnp.float32, rngs=nnx.Rngs(5))), config, path)
    tok.save(path)
    model = gptoss_jax.load(path, mesh=mesh, dtype="float32", max_seq_len=64)
    # 3 slots: padded to the data axis; prompts longer than the prefill chunk (chunked prefill), more requests than
    # slots (admission into freed slots), greedy and seeded sampling in one batch
    engine = Engine(model, max_batch=3, chunk_size=4, prefill_chunk=8)
    engine.warmup(prompt_len=6)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        and threading.current_thread().name == "gptoss-serve-scheduler" else None)
    graph = model.generator.graph
    traces0 = TRACE_COUNTS[("serve_prefill", graph)] + TRACE_COUNTS[("serve_decode", graph)]
    engine.start()
    jobs = [([20 + i for i in range(n)], dict(temperature=0.0) if j % 2 == 0 else dict(temperature=0.8, seed=j))
            for j, n in enumerate((5, 13, 6, 3, 11))]
    results = []
    try:
        waits = []
        for prompt, kw in jobs:
            events, done = [], threading.Event()
            waits.append((events, done))
            engine.submit(Request(prompt, lambda ev, events=events, done=done: events.append(ev) or (
                isinstance(ev, Finished) and done.set()), params=SamplingParams(max_new_tokens=7, **kw)))
        for (prompt, kw), (events, done) in zip(jobs, waits):
            assert done.wait(600), "a request did not finish"
            streamed = [t for e in events if isinstance(e, Delta) for t in e.tokens]
            results.append({"served": events[-1].tokens, "streamed": streamed, "reason": events[-1].reason})
    finally:
        engine.shutdown()
    scheduler_compiles = len(compiles)
    traces = TRACE_COUNTS[("serve_prefill", graph)] + TRACE_COUNTS[("serve_decode", graph)] - traces0
    for (prompt, kw), r in zip(jobs, results):
        r["alone"] = model.generate(prompt, max_new_tokens=7, **kw).tokens
    print(json.dumps({"mesh": {str(k): int(v) for k, v in dict(model.mesh.shape).items()},
                      "max_batch": engine.max_batch, "results": results,
                      "scheduler_compiles_after_warmup": scheduler_compiles,
                      "scheduler_traces_after_warmup": traces}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
