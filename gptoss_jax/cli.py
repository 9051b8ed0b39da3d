"""The ``gptoss-jax`` command: generate, chat, score, info and demo.

    gptoss-jax generate CKPT "The capital of France is" --max-new-tokens 32 --temperature 0 --stream
    gptoss-jax generate CKPT --file prompts.txt --json            # one prompt per line, batched
    gptoss-jax chat CKPT --reasoning low --show-reasoning          # interactive, keeps history
    gptoss-jax score CKPT lines.txt --output scores.json           # per-line log-likelihood (JSON)
    gptoss-jax info CKPT                                           # config, quantization, parameters, devices
    gptoss-jax demo                                                # tiny random model end to end, self-checking

Results go to stdout; progress and timings (load time, time to first token, tokens/s) go to stderr. Bad input exits
with status 2 and a one-line ``gptoss-jax: error: ...`` message.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

EXIT_USAGE = 2
EXIT_CHECK_FAILED = 1


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (gptoss-convert output or Hugging Face bf16 folder)")
    p.add_argument("--dtype", default=None, help="compute dtype of 16-bit weights: bfloat16 (default) or float32")
    p.add_argument("--max-seq-len", type=int, default=None, help="longest prompt + generation (default 4096)")
    p.add_argument("--mesh", default=None, metavar="DATA,EXPERT,TENSOR",
                   help="device mesh sizes, e.g. 1,4,2 (default: one device)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")


def _add_sampling_args(p: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=None, help="tokens generated per compiled decode call")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss-jax", description="Run gpt-oss models with JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="continue a prompt (or each line of a file)")
    _add_model_args(g)
    g.add_argument("prompt", nargs="?", help="prompt text (or use --file)")
    g.add_argument("--file", help="read prompts from this file, one per line ('-' = stdin); generated as a batch")
    _add_sampling_args(g, max_new_tokens=128)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-id", action="append", type=int, default=None, metavar="ID",
                   help="stop token id (repeatable; default: the checkpoint's eos ids)")
    g.add_argument("--no-stop-ids", action="store_true", help="do not stop on the checkpoint's eos ids")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt)")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.add_argument("--harmony", action="store_true",
                   help="treat the prompt as a user message: render it in the harmony chat format")

    c = sub.add_parser("chat", help="interactive harmony chat (reads stdin; /reset, /reasoning LEVEL, /exit)")
    _add_model_args(c)
    _add_sampling_args(c, max_new_tokens=1024)
    c.add_argument("--reasoning", choices=("low", "medium", "high"), default="medium")
    c.add_argument("--show-reasoning", action="store_true", help="also print the analysis channel")
    c.add_argument("--instructions", default=None, help="developer instructions (the old 'system prompt')")
    c.add_argument("--date", default=None, help="current date for the system message (YYYY-MM-DD or 'today')")

    s = sub.add_parser("score", help="log-likelihood of each line of a file (JSON)")
    _add_model_args(s)
    s.add_argument("file", help="text file, one sequence per line ('-' = stdin)")
    s.add_argument("--output", "-o", default=None, help="write the JSON here instead of stdout")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--token-logprobs", action="store_true", help="include every token's log-probability")

    i = sub.add_parser("info", help="summary of a checkpoint: config, quantization, parameters, bytes, devices")
    _add_model_args(i)
    i.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="tiny random model: save, load, stream-generate, verify greedy decoding")
    d.add_argument("--out", default=None, help="folder for the tiny checkpoint (default: a temporary folder)")
    d.add_argument("--prompt", default="Hello, world! The quick brown fox")
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--preset", default="tiny")
    return parser


# ------------------------------------------------------------------------------------------------------------------
def _load(args):
    import gptoss_jax
    t0 = time.perf_counter()
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise CliError(f"--max-seq-len must be positive, got {args.max_seq_len}")
    model = gptoss_jax.load(args.checkpoint, mesh=args.mesh, dtype=args.dtype, max_seq_len=args.max_seq_len,
                            tokenizer=args.tokenizer)
    info = model.info()
    _err(f"[gptoss-jax] loaded {args.checkpoint} ({info['format']}, {_human_bytes(info['bytes'])}) "
         f"in {time.perf_counter() - t0:.1f}s on {info['backend']}")
    return model


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _timing_line(stats) -> str:
    ttft = f"time to first token {stats.time_to_first_token_s * 1e3:.0f} ms"
    if stats.prefill_compiled:
        ttft += " (includes compiling)"
    if stats.decode_s > 0:
        rate = f"decode {stats.decode_tokens_per_s:.1f} tokens/s"
    else:
        rate = "decode tokens/s n/a (every decode call compiled: generate more tokens to measure)"
    return (f"[gptoss-jax] {stats.generated_tokens} tokens from {stats.prompt_tokens} prompt tokens; {ttft}; {rate}; "
            f"total {stats.total_s:.2f}s")


def _read_lines(path: str) -> list[str]:
    if path == "-":
        text = sys.stdin.read()
    else:
        p = Path(path)
        if not p.is_file():
            raise CliError(f"{path}: no such file")
        text = p.read_text(encoding="utf-8")
    return text.splitlines()


def _sampling_kwargs(args) -> dict:
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed)
    if getattr(args, "chunk_size", None):
        if args.chunk_size < 1:
            raise CliError(f"--chunk-size must be positive, got {args.chunk_size}")
        kw["chunk_size"] = args.chunk_size
    return kw


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.file is None):
        raise CliError("give a prompt or --file (exactly one)")
    prompts = [args.prompt] if args.file is None else [line for line in _read_lines(args.file) if line.strip()]
    if not prompts:
        raise CliError(f"{args.file}: no prompts (empty file)")
    if args.stream and len(prompts) > 1:
        raise CliError("--stream prints one prompt's tokens; --file has several prompts (drop --stream)")
    model = _load(args)
    if model.tokenizer is None:
        raise CliError(f"{args.checkpoint}: no tokenizer.json; pass --tokenizer")
    from gptoss_jax import harmony
    stop_ids = None
    if args.no_stop_ids:
        stop_ids = []
    if args.stop_id:
        stop_ids = list(args.stop_id)
    if args.harmony:
        prompts = [model.render_chat([harmony.Message.user(p)]) for p in prompts]
        if stop_ids is None:
            stop_ids = list(harmony.stop_token_ids(model.tokenizer))
    kw = _sampling_kwargs(args)
    def stream_chunk(chunk):
        if chunk.text and chunk.text[0]:
            sys.stdout.write(chunk.text[0])
            sys.stdout.flush()

    on_chunk = stream_chunk if args.stream else None
    results, stats = model.generate(prompts if len(prompts) > 1 else prompts[0], stop_token_ids=stop_ids,
                                    stop_strings=args.stop, on_chunk=on_chunk, return_stats=True, **kw)
    results = results if isinstance(results, list) else [results]
    if args.stream:
        sys.stdout.write("\n")
    elif args.json:
        for prompt, r in zip(prompts, results):
            print(json.dumps({"prompt": prompt if isinstance(prompt, str) else model._decode_lenient(prompt),
                              "text": r.text, "tokens": r.tokens, "finish_reason": r.finish_reason}))
    else:
        for n, r in enumerate(results):
            if len(results) > 1 and n:
                print("-" * 40)
            print(r.text)
    sys.stdout.flush()
    _err(_timing_line(stats))
    return 0


class _ChatPrinter:
    """Streams a harmony completion to the terminal: final channel always, analysis with --show-reasoning."""

    def __init__(self, model, show_reasoning: bool, out=sys.stdout):
        self.model, self.show, self.out = model, show_reasoning, out
        self.tokens: list[int] = []
        self.printed = ""

    def _render(self) -> str:
        from gptoss_jax import harmony
        messages = harmony.parse_completion(self.tokens, self.model.tokenizer)
        parts = []
        for i, m in enumerate(messages):
            if m.channel == "final" or m.channel is None:
                parts.append(m.content)
            elif self.show:
                # the newline goes after a message only once it is complete, so streamed text only ever grows
                done = "\n" if i < len(messages) - 1 else ""
                parts.append(f"[{m.channel}{' → ' + m.recipient if m.recipient else ''}] {m.content}{done}")
        return "".join(parts)

    def __call__(self, chunk):
        self.tokens.extend(chunk.tokens[0])
        text = self._render().replace("\ufffd", "")
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        else:  # a re-parse changed earlier text (rare: a header completed); print the tail afresh
            self.out.write("\n" + text)
        self.printed = text
        self.out.flush()


def cmd_chat(args) -> int:
    from gptoss_jax import harmony
    model = _load(args)
    if model.tokenizer is None:
        raise CliError(f"{args.checkpoint}: no tokenizer.json; pass --tokenizer")
    kw = _sampling_kwargs(args)
    reasoning = args.reasoning
    history: list = []
    interactive = sys.stdin.isatty()
    if interactive:
        _err("[gptoss-jax] chat: type a message; /reset clears history, /reasoning low|medium|high, /exit quits")
    turn = 0
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, *rest = line.split()
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                history.clear()
                _err("[gptoss-jax] history cleared")
                continue
            if cmd == "/reasoning" and rest and rest[0] in harmony.REASONING_LEVELS:
                reasoning = rest[0]
                _err(f"[gptoss-jax] reasoning: {reasoning}")
                continue
            _err(f"[gptoss-jax] unknown command {line!r} (/reset, /reasoning low|medium|high, /exit)")
            continue
        history.append(harmony.Message.user(line))
        printer = _ChatPrinter(model, args.show_reasoning)
        try:
            result = model.chat(history, reasoning=reasoning, instructions=args.instructions,
                                current_date=args.date, on_chunk=printer, **{**kw, "seed": args.seed + turn})
        except Exception:
            history.pop()
            raise
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.extend(result.messages or [harmony.Message.assistant(result.completion)])
        _err(_timing_line(result.stats) + f"; finish: {result.finish_reason}")
        turn += 1
    return 0


def cmd_score(args) -> int:
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be positive, got {args.batch_size}")
    lines = _read_lines(args.file)
    if not any(line.strip() for line in lines):
        raise CliError(f"{args.file}: nothing to score (empty file)")
    model = _load(args)
    if model.tokenizer is None:
        raise CliError(f"{args.checkpoint}: no tokenizer.json; pass --tokenizer")
    t0 = time.perf_counter()
    entries: list[dict] = []
    todo: list[tuple[int, list[int]]] = []
    for n, line in enumerate(lines):
        ids = model.encode(line) if line.strip() else []
        if len(ids) > model.max_seq_len:
            raise CliError(f"{args.file}: line {n + 1} has {len(ids)} tokens, more than --max-seq-len "
                           f"{model.max_seq_len}")
        entries.append({"line": n + 1, "text": line, "num_tokens": len(ids)})
        if len(ids) >= 2:
            todo.append((n, ids))
        else:
            entries[-1].update(skipped="fewer than 2 tokens: nothing to score")
    total_lp, total_n = 0.0, 0
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        for (n, _), r in zip(batch, model.score([ids for _, ids in batch])):
            d = r.to_dict()
            if not args.token_logprobs:
                d.pop("token_logprobs")
            entries[n].update(d)
            total_lp += r.total_logprob
            total_n += r.num_scored
        _err(f"[gptoss-jax] scored {min(start + args.batch_size, len(todo))}/{len(todo)} lines")
    elapsed = time.perf_counter() - t0
    import math
    out = {"checkpoint": str(args.checkpoint), "lines": entries, "total_logprob": total_lp, "num_scored": total_n,
           "perplexity": math.exp(-total_lp / total_n) if total_n else None}
    text = json.dumps(out, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    tokens = sum(e["num_tokens"] for e in entries)
    _err(f"[gptoss-jax] {total_n} tokens scored in {elapsed:.2f}s ({tokens / max(elapsed, 1e-9):.0f} tokens/s)")
    return 0


def cmd_info(args) -> int:
    model = _load(args)
    info = model.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    q = info["quantization"]
    print(f"checkpoint:    {info['source']} ({info['format']})")
    print(f"architecture:  {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} "
          f"query / {c['num_key_value_heads']} KV heads × {c['head_dim']}, {c['num_local_experts']} experts "
          f"(top-{c['num_experts_per_tok']}), vocab {c['vocab_size']}, sliding window {c['sliding_window']}")
    print(f"parameters:    {info['parameters']:,} ({info['parameters'] / 1e9:.2f} B)")
    print(f"weights:       {_human_bytes(info['bytes'])} in memory, dtype {info['dtype']}")
    print("quantization:  " + ("none" if q is None else f"{q['method']}, group size {q['group_size']}, "
                                f"{'symmetric' if q['symmetric'] else 'asymmetric'}, scales {q['scale_dtype']}"))
    print(f"context:       max_seq_len {info['max_seq_len']} (config allows {c['max_position_embeddings']})")
    tok = info["tokenizer"]
    print("tokenizer:     " + ("none" if tok is None else f"{tok['vocab_size']} ids ({tok['path']})"))
    print(f"stop ids:      {info['stop_token_ids']}")
    for note in info.get("assumed", []):
        print(f"assumed:       {note}")
    print(f"devices:       {info['backend']}: {', '.join(info['devices'])}")
    if info["mesh"]:
        print(f"mesh:          {info['mesh']}")
    return 0


# ------------------------------------------------------------------------------------------------------------------
def make_tiny_checkpoint(out: str | Path, *, preset: str = "tiny", seed: int = 0) -> Path:
    """A random-weight checkpoint of a small preset (Hugging Face format, fp32) plus a tiny harmony tokenizer."""
    import jax.numpy as jnp
    from flax import nnx

    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.hf_loader import params_of, save_hf_checkpoint
    from gptoss_jax.model import GptOss
    from gptoss_jax.tokenizer import build_tiny_tokenizer

    out = Path(out)
    config = GptOssConfig.from_preset(preset)
    tokenizer = build_tiny_tokenizer(min(config.vocab_size, 1024), path=out)
    # every id the model can emit should decode: shrink the vocabulary to the tokenizer's
    config = config.replace(vocab_size=tokenizer.vocab_size)
    module = GptOss(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    save_hf_checkpoint(params_of(module), config, out)
    return out


def cmd_demo(args) -> int:
    import numpy as np

    import gptoss_jax
    t_start = time.perf_counter()
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="gptoss-jax-demo-")
        out = Path(tmp.name)
    else:
        out = Path(args.out)
    try:
        print(f"1. building the {args.preset!r} preset with random weights (seed {args.seed}) → {out}")
        make_tiny_checkpoint(out, preset=args.preset, seed=args.seed)
        print("2. loading it with gptoss_jax.load (float32)")
        model = gptoss_jax.load(out, dtype="float32", max_seq_len=256)
        print(f"   {model}")
        prompts = [args.prompt, args.prompt.split()[0]]  # two prompts of different lengths, one batch
        print(f"3. greedy generation, batch of 2 prompts of {len(model.encode(prompts[0]))} and "
              f"{len(model.encode(prompts[1]))} tokens, streaming the first (random weights: the text is noise)")
        for attempt in ("first call (includes compilation)", "second call (compiled)"):
            sys.stdout.write(f"   {prompts[0]!r} → ")
            stream_row0 = (lambda chunk: (sys.stdout.write(chunk.text[0]), sys.stdout.flush())) \
                if attempt.startswith("first") else None
            results, stats = model.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=0.0,
                                            stop_token_ids=(), on_chunk=stream_row0, return_stats=True)
            if stream_row0 is None:
                sys.stdout.write(results[0].text)
            rate = f"{stats.decode_tokens_per_s:.1f} tokens/s" if stats.decode_s > 0 else "tokens/s n/a (compiling)"
            print(f"\n   {attempt}: time to first token {stats.time_to_first_token_s * 1e3:.0f} ms, {rate}")
        print("4. checking greedy tokens against the argmax of full-forward logits, step by step")
        reference = "gptoss-jax full forward"
        hf_model = None
        try:
            import torch
            from transformers import GptOssForCausalLM
            try:
                from transformers.utils import logging as hf_logging
                hf_logging.disable_progress_bar()
            except ImportError:
                pass
            hf_model = GptOssForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
            reference = "transformers GptOssForCausalLM (float32)"
        except Exception as e:  # noqa: BLE001 — transformers is optional
            print(f"   transformers not usable ({type(e).__name__}); using our own full forward instead")
        ok = True
        for n, r in enumerate(results):
            seq = np.array(r.prompt_tokens + r.tokens)
            if hf_model is not None:
                import torch
                with torch.no_grad():
                    logits = hf_model(torch.as_tensor(seq[None])).logits[0].float().numpy()
            else:
                logits = np.asarray(model.logits(seq.tolist()))
            p = len(r.prompt_tokens)
            steps = logits[p - 1:len(seq) - 1]
            chosen = steps[np.arange(len(r.tokens)), r.tokens]
            exact = int(np.sum(np.argmax(steps, -1) == np.array(r.tokens)))
            # a token within 1e-4 of the max is a float tie, not a decoding error
            row_ok = bool(np.all(chosen >= steps.max(-1) - 1e-4))
            ok &= row_ok
            print(f"   prompt {n}: {exact}/{len(r.tokens)} tokens are the exact argmax of {reference} "
                  f"→ {'PASS' if row_ok else 'FAIL'}")
        print(f"{'PASS' if ok else 'FAIL'} — demo finished in {time.perf_counter() - t_start:.1f}s")
        return 0 if ok else EXIT_CHECK_FAILED
    finally:
        if tmp is not None:
            tmp.cleanup()


# ------------------------------------------------------------------------------------------------------------------
COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "score": cmd_score, "info": cmd_info, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from gptoss_jax.api import LoadError, TokenizerMissingError
    from gptoss_jax.config import ConfigError
    from gptoss_jax.safetensors_io import CheckpointError
    from gptoss_jax.tokenizer import TokenizerError
    user_errors = (CliError, LoadError, TokenizerMissingError, ConfigError, CheckpointError, TokenizerError,
                   ValueError, FileNotFoundError)
    try:
        return COMMANDS[args.command](args)
    except user_errors as e:
        _err(f"gptoss-jax {args.command}: error: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
