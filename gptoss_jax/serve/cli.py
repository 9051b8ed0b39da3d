"""The ``gptoss-jax serve`` subcommand (registered by :mod:`gptoss_jax.cli`); needs the ``serve`` extra."""

from __future__ import annotations

import argparse

from gptoss_jax.errors import GptOssError


class ServeError(GptOssError, ValueError):
    """A bad serve option or a missing dependency (one line, exit status 2)."""


def _positive(kind):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v
    return parse


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (docs/SERVING.md)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--max-batch", type=_positive(int), default=16, help="decode slots (rows of the KV cache)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    p.add_argument("--chunk-size", type=_positive(int), default=8,
                   help="decode steps per compiled call (a newcomer waits at most one chunk; default 8)")
    p.add_argument("--prefill-chunk", type=_positive(int), default=2048,
                   help="prompt tokens per prefill call and row (longer prompts interleave with decode)")
    p.add_argument("--prefill-budget", type=_positive(int), default=None,
                   help="while rows decode, prefill at most this many prompt tokens per scheduler iteration "
                        "(lower TPOT for running requests, slower admission of bursts; default: unbounded)")
    p.add_argument("--request-timeout", type=_positive(float), default=600.0,
                   help="seconds from arrival after which a request is ended with 504 (default 600)")
    p.add_argument("--warmup-prompt-len", type=int, default=0,
                   help="compile the greedy prefill (every batch bucket) and decode for prompts of about this many "
                        "tokens before listening (default 0: compile on first use)")
    p.add_argument("--no-overlap", action="store_true",
                   help="read each compiled call's results before dispatching the next (slower; for measuring what "
                        "overlapping the host's work with the device gains)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def build(model, *, max_batch=16, max_queue=256, chunk_size=8, prefill_chunk=2048, request_timeout=600.0,
          model_name="gpt-oss", warmup_prompt_len: int = 0, overlap: bool = True, prefill_budget=None):
    """(engine, app) for a loaded model: the scheduler started (after compiling for prompts of about
    `warmup_prompt_len` tokens, when > 0), the FastAPI app that shuts it down."""
    from gptoss_jax.serve.engine import Engine
    from gptoss_jax.serve.openai_api import create_app
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, chunk_size=chunk_size,
                    prefill_chunk=prefill_chunk, overlap=overlap, prefill_budget=prefill_budget)
    if warmup_prompt_len > 0:
        engine.warmup(warmup_prompt_len)
    engine.start()
    return engine, create_app(model, engine, model_name=model_name, request_timeout=request_timeout)


def run(args, load) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ServeError(f"serve needs FastAPI and uvicorn: pip install 'gptoss-jax[serve]' ({e})") from None
    if args.max_queue < 0:
        raise ServeError(f"--max-queue must be ≥ 0, got {args.max_queue}")
    if not 0 <= args.port < 65536:
        raise ServeError(f"--port must be in [0, 65535], got {args.port}")
    model = load(args)
    if model.tokenizer is None:
        raise ServeError(f"{args.checkpoint}: no tokenizer.json (pass --tokenizer): the server speaks text")
    from pathlib import Path
    name = args.model_name or Path(args.checkpoint).resolve().name
    _, app = build(model, max_batch=args.max_batch, max_queue=args.max_queue, chunk_size=args.chunk_size,
                   prefill_chunk=args.prefill_chunk, request_timeout=args.request_timeout, model_name=name,
                   warmup_prompt_len=args.warmup_prompt_len, overlap=not args.no_overlap,
                   prefill_budget=args.prefill_budget)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
