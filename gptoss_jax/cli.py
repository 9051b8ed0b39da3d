"""The ``gptoss-jax`` command: generate, chat, score, info, verify, eval and demo.

    gptoss-jax generate CKPT "The capital of France is" --max-new-tokens 32 --temperature 0 --stream
    gptoss-jax generate CKPT --file prompts.txt --json            # one prompt per line, batched
    gptoss-jax chat CKPT --reasoning low --show-reasoning          # interactive, keeps history
    gptoss-jax score CKPT lines.txt --output scores.json           # per-line log-likelihood (JSON)
    gptoss-jax info CKPT                                           # config, quantization, parameters, devices
    gptoss-jax verify CKPT                                         # sizes + SHA-256 of every file vs metadata
    gptoss-jax eval perplexity CKPT text.txt --json ppl.json       # sliding-window perplexity of a file
    gptoss-jax demo                                                # shipped tiny model → int4 → perplexity → text

Results go to stdout; progress and timings (load time, time to first token, tokens/s) go to stderr.

Exit status (docs/RELIABILITY.md, "CLI"):

* 0: done.
* 2: bad input — a usage error (argparse's usage line), an option out of range, a file that is missing or not what
  it should be, text that is not UTF-8, an output path that cannot be written. One line
  ``gptoss-jax CMD: error: ...`` naming the option, file or argument; nothing is computed or written.
* 1: the environment failed (an OS error while reading or writing, out of memory) — one line naming the path — or
  ``demo``'s self-check failed.
* 70 (EX_SOFTWARE): an internal error, i.e. a bug in gptoss-jax: one line saying so, then the traceback to report.
* 130: interrupted (Ctrl-C). In ``chat``, Ctrl-C during a reply stops that reply and returns to the prompt; Ctrl-C
  at the prompt or end of input ends the session.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from gptoss_jax import evaluation
from gptoss_jax.errors import GptOssError

EXIT_USAGE = 2
EXIT_CHECK_FAILED = 1
EXIT_ENVIRONMENT = 1
EXIT_INTERNAL = 70  # sysexits.h EX_SOFTWARE
EXIT_INTERRUPTED = 130
SEED_MAX = 2**64 - 1


class CliError(GptOssError):
    """A user error: printed as one line, exit status 2."""


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------------
# argparse types: every numeric option is checked where it is parsed (exit 2 with argparse's usage line and a message
# naming the option), before anything is loaded.
def _int_type(minimum: int | None = None, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            hi = "2**64 - 1" if maximum == SEED_MAX else ("inf" if maximum is None else maximum)
            raise argparse.ArgumentTypeError(f"must be in [{minimum}, {hi}], got {text}")
        return value
    parse.__name__ = "integer"
    return parse


def _float_type(minimum: float, maximum: float | None = None, *, minimum_open: bool = False):
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or abs(value) > 3.4028234663852886e38:  # float32 max: sampling runs in float32
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (value <= minimum if minimum_open else value < minimum) or (maximum is not None and value > maximum):
            lo = "(" if minimum_open else "["
            raise argparse.ArgumentTypeError(f"must be in {lo}{minimum}, {maximum or 'inf'}], got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _utf8(text: str, what: str) -> str:
    """argv and stdin arrive decoded with surrogateescape: undecodable bytes become lone surrogates. Refuse them
    here, naming the argument and the bytes, instead of failing inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start:e.end].encode("utf-8", "surrogateescape")
        raise CliError(f"{what} is not valid UTF-8 (bytes {raw!r} at character {e.start})") from None
    return text


# ------------------------------------------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (gptoss-convert output or Hugging Face bf16 folder)")
    p.add_argument("--dtype", default=None, help="compute dtype of 16-bit weights: bfloat16 (default) or float32")
    p.add_argument("--max-seq-len", type=_int_type(1), default=None,
                   help="longest prompt + generation (default 4096)")
    p.add_argument("--mesh", default=None, metavar="DATA,EXPERT,TENSOR",
                   help="device mesh sizes, e.g. 1,4,2 (default: one device)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the SHA-256 check of a converted checkpoint's files (sizes and structure are always "
                        "checked; see `gptoss-jax verify`)")


def _add_sampling_args(p: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=_int_type(1), default=max_new_tokens)
    p.add_argument("--temperature", type=_float_type(0.0), default=1.0, help="≥ 0; 0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=_int_type(0), default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=_float_type(0.0, 1.0, minimum_open=True), default=1.0,
                   help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=_int_type(0, SEED_MAX), default=0, help="in [0, 2**64 - 1] (default 0)")
    p.add_argument("--chunk-size", type=_int_type(1), default=None, help="tokens generated per compiled decode call")


def build_parser() -> argparse.ArgumentParser:
    from gptoss_jax import __version__
    parser = argparse.ArgumentParser(prog="gptoss-jax", description="Run gpt-oss models with JAX.")
    parser.add_argument("--version", action="version", version=f"gptoss-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="continue a prompt (or each line of a file)")
    _add_model_args(g)
    g.add_argument("prompt", nargs="?", help="prompt text (or use --file)")
    g.add_argument("--file", help="read prompts from this file, one per line ('-' = stdin); generated as a batch")
    _add_sampling_args(g, max_new_tokens=128)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-id", action="append", type=_int_type(0), default=None, metavar="ID",
                   help="stop token id (repeatable; default: the checkpoint's eos ids)")
    g.add_argument("--no-stop-ids", action="store_true", help="do not stop on the checkpoint's eos ids")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (not with --stream: JSON comes once a prompt is done)")
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
    s.add_argument("--output", "-o", default=None, help="write the JSON here instead of stdout (a new file)")
    s.add_argument("--force", action="store_true", help="replace an existing --output file")
    s.add_argument("--batch-size", type=_int_type(1), default=8)
    s.add_argument("--token-logprobs", action="store_true", help="include every token's log-probability")

    i = sub.add_parser("info", help="summary of a checkpoint: config, quantization, parameters, bytes, devices")
    _add_model_args(i)
    i.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", help="check a converted checkpoint: structure, sizes and every file's SHA-256")
    v.add_argument("checkpoint", help="gptoss-convert output folder")

    d = sub.add_parser("demo", help="the shipped tiny model → int4 → perplexity table → streamed text → checks")
    d.add_argument("--out", default=None,
                   help="new folder to keep the converted int4 checkpoints (default: a temporary folder); an "
                        "existing non-empty folder is refused, never overwritten")
    # the opening words of the "try" help topic (training text): a reader sees whether the continuation is on topic
    d.add_argument("--prompt", default='The "try" statement specifies')
    d.add_argument("--max-new-tokens", type=_int_type(1), default=64)
    d.add_argument("--group-size", type=_int_type(1), default=64, help="int4 group size of the conversions")
    d.add_argument("--eval-tokens", type=_int_type(2), default=4096,
                   help="held-out tokens scored per model in the perplexity table")
    d.add_argument("--awq", choices=("auto", "on", "off"), default="auto",
                   help="add an AWQ int4 row (auto: when gptoss-convert has --awq)")
    d.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also plot perplexity vs int4 group size (32/64/128, RTN and AWQ) as a new PNG file (needs "
                        "matplotlib: pip install 'gptoss-jax[plot]')")
    # 0.5: a tiny model's samples at 0.7 or more drift into made-up words; greedy (0) loops
    d.add_argument("--temperature", type=_float_type(0.0), default=0.5, help="the streamed sample's temperature")
    d.add_argument("--top-p", type=_float_type(0.0, 1.0, minimum_open=True), default=0.9,
                   help="the streamed sample's top-p")
    d.add_argument("--seed", type=_int_type(0, SEED_MAX), default=0, help="the streamed sample's seed")
    evaluation.add_eval_parser(sub, _add_model_args)
    __import__("gptoss_jax.bench").bench.add_parser(sub)  # gptoss-jax bench (gptoss_jax/bench.py)
    __import__("gptoss_jax.serve.cli", fromlist=["add_parser"]).add_parser(sub, _add_model_args)  # serve
    return parser


# ------------------------------------------------------------------------------------------------------------------
def _load(args):
    import gptoss_jax
    t0 = time.perf_counter()
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise CliError(f"--max-seq-len must be positive, got {args.max_seq_len}")
    model = gptoss_jax.load(args.checkpoint, mesh=args.mesh, dtype=args.dtype, max_seq_len=args.max_seq_len,
                            tokenizer=args.tokenizer, verify=not getattr(args, "no_verify", False))
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
    """A UTF-8 text file (or stdin for '-') as lines; CliError naming the file for a missing file, a folder or bytes
    that are not UTF-8 (with the line number)."""
    if path == "-":
        stdin = getattr(sys.stdin, "buffer", None)
        data = stdin.read() if stdin is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
        name = "standard input"
    else:
        p = Path(path)
        if p.is_dir():
            raise CliError(f"{path}: is a folder, expected a text file")
        if not p.is_file():
            raise CliError(f"{path}: no such file")
        data = p.read_bytes()
        name = path
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise CliError(f"{name}: not UTF-8 text (bytes {data[e.start:e.end]!r} on line {line})") from None
    return text.splitlines()


def _check_output(path: str | None, force: bool) -> None:
    """Before any work: the output must be a file we may create (or replace with --force) in an existing folder."""
    import os
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise CliError(f"--output {path}: is a folder; name a file")
    if p.exists() and not force:
        raise CliError(f"--output {path}: exists; pass --force to replace it")
    if p.exists() and not p.is_file():
        raise CliError(f"--output {path}: exists and is not a regular file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"--output {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"--output {path}: folder {parent} is not writable")


def _write_atomic(path: str, text: str) -> None:
    """Writes a temporary file next to `path` and renames it over: a reader never sees a half-written file, and an
    error or interrupt leaves the previous file (if any) as it was."""
    import os
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sampling_kwargs(args) -> dict:
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed)
    if getattr(args, "chunk_size", None):
        kw["chunk_size"] = args.chunk_size
    return kw


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.file is None):
        raise CliError("give a prompt or --file (exactly one)")
    if args.stream and args.json:
        raise CliError("--stream and --json cannot be combined: --json prints each prompt's result once it is "
                       "done (drop one of them)")
    if args.prompt is not None:
        _utf8(args.prompt, "the prompt")
        if not args.prompt:
            raise CliError("the prompt is empty")
    for i, s in enumerate(args.stop):
        _utf8(s, f"--stop #{i + 1}")
        if not s:
            raise CliError(f"--stop #{i + 1} is empty")
    prompts = [args.prompt] if args.file is None else [line for line in _read_lines(args.file) if line.strip()]
    if not prompts:
        raise CliError(f"{args.file}: no prompts (empty file)")
    if args.stream and len(prompts) > 1:
        raise CliError("--stream prints one prompt's tokens; --file has several prompts (drop --stream)")
    model = _load(args)
    if model.tokenizer is None:
        raise CliError(f"{args.checkpoint}: no tokenizer.json; pass --tokenizer")
    from gptoss_jax import harmony
    if args.harmony:
        _require_harmony(model, args)
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

    def __init__(self, model, show_reasoning: bool, out=None):
        self.model, self.show, self.out = model, show_reasoning, out if out is not None else sys.stdout
        self.tokens: list[int] = []
        self.printed = ""

    def _render(self) -> str:
        import warnings

        from gptoss_jax import harmony
        with warnings.catch_warnings():  # a reply in progress: malformed parts are reported once, at the end
            warnings.simplefilter("ignore")
            messages = harmony.parse_completion(self.tokens, self.model.tokenizer, complete=False)
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


def _require_harmony(model, args) -> None:
    """The harmony special tokens must be in the tokenizer: checked before the first message, not after it."""
    from gptoss_jax import harmony
    try:
        harmony.special_token_ids(model.tokenizer)
    except ValueError as e:
        raise CliError(f"{args.checkpoint}: this tokenizer cannot use the harmony chat format: {e}") from None


def _read_chat_line(interactive: bool) -> str | None:
    """One line of input (None at end of input). Bytes that are not UTF-8 are reported and the line is skipped."""
    stdin = getattr(sys.stdin, "buffer", None)
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        if stdin is None:
            line = sys.stdin.readline()
            return line or None
        raw = stdin.readline()
        if not raw:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _err(f"[gptoss-jax] skipped a line that is not UTF-8 text (bytes {raw[e.start:e.end]!r})")


def _chat_turn(model, history, printer, kw, **chat_kw):
    """Runs one reply; returns the ChatResult. Harmony parse warnings (malformed model output, shown as text) are
    printed as one line each."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = model.chat(history, on_chunk=printer, **chat_kw, **kw)
    for w in caught:
        _err(f"[gptoss-jax] warning: {w.message}")
    return result


def cmd_chat(args) -> int:
    from gptoss_jax import harmony
    for name in ("instructions", "date"):
        if getattr(args, name) is not None:
            _utf8(getattr(args, name), f"--{name}")
    if args.date is not None and args.date != "today":
        import datetime
        try:
            datetime.date.fromisoformat(args.date)
        except ValueError:
            raise CliError(f"--date must be YYYY-MM-DD or 'today', got {args.date!r}") from None
    model = _load(args)
    if model.tokenizer is None:
        raise CliError(f"{args.checkpoint}: no tokenizer.json; pass --tokenizer")
    _require_harmony(model, args)
    from gptoss_jax.generate import GenerationError
    if args.max_new_tokens >= model.max_seq_len:
        raise CliError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the conversation in the context "
                       f"(max_seq_len={model.max_seq_len}); lower it or raise --max-seq-len")
    kw = _sampling_kwargs(args)
    reasoning = args.reasoning
    history: list = []
    interactive = sys.stdin.isatty()
    if interactive:
        _err("[gptoss-jax] chat: type a message; /reset clears history, /reasoning low|medium|high, /exit quits; "
             "Ctrl-C stops a reply")
    turn = 0
    while True:
        line = _read_chat_line(interactive)
        if line is None:
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
            # each turn its own seed, wrapping inside the valid range
            result = _chat_turn(model, history, printer, {**kw, "seed": (args.seed + turn) % (SEED_MAX + 1)},
                                reasoning=reasoning, instructions=args.instructions, current_date=args.date)
        except KeyboardInterrupt:
            # Ctrl-C during a reply: drop the unfinished turn. At a terminal, back to the prompt; with piped input
            # (nobody to type the next line) the session ends.
            history.pop()
            sys.stdout.write("\n")
            sys.stdout.flush()
            _err("[gptoss-jax] reply interrupted" + ("; it is not kept in the history" if interactive else ""))
            if not interactive:
                raise
            turn += 1
            continue
        except GenerationError as e:
            # e.g. the history outgrew --max-seq-len: this turn is dropped, the session goes on
            history.pop()
            _err(f"[gptoss-jax] error: {e} (/reset clears the history)")
            if not interactive:
                raise
            continue
        except BaseException:
            history.pop()
            raise
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.extend(result.messages or [harmony.Message.assistant(result.completion)])
        _err(_timing_line(result.stats) + f"; finish: {result.finish_reason}")
        turn += 1
    return 0


def cmd_score(args) -> int:
    _check_output(args.output, args.force)  # before any work: an unwritable output must not lose it
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
        _write_atomic(args.output, text + "\n")
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
def cmd_verify(args) -> int:
    """Exit 0 if the checkpoint's files match its metadata (sizes and SHA-256), 1 naming the first bad file."""
    from gptoss_jax import checkpoint
    from gptoss_jax.safetensors_io import CheckpointError
    t0 = time.perf_counter()
    try:
        meta, _ = checkpoint.verify_checkpoint(args.checkpoint, digests=True)
    except CheckpointError as e:
        _err(f"gptoss-jax verify: FAILED: {e}")
        return EXIT_CHECK_FAILED
    total = sum(f["size"] for f in meta["files"].values())
    print(f"OK: {len(meta['files'])} files, {_human_bytes(total)} match {checkpoint.METADATA_FILE} "
          f"(SHA-256, {time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_demo(args) -> int:
    """The shipped tiny model end to end (gptoss_jax.demo); exit 1 if its greedy check fails."""
    from gptoss_jax import demo, fsutil
    _utf8(args.prompt, "--prompt")
    if not args.prompt.split():
        raise CliError("--prompt is empty")
    if args.awq == "on" and not demo.awq_available():
        raise CliError("--awq on: this gptoss-convert has no --awq option yet (use --awq auto or off)")
    plot = None
    if args.plot is not None:
        evaluation.check_new_file("--plot", args.plot, force=False)  # before any work: one line naming --plot
        if not evaluation._plot_available():
            raise CliError("--plot needs matplotlib: pip install 'gptoss-jax[plot]'")
        plot = fsutil.user_path(args.plot)
    out = None
    if args.out is not None:
        out = fsutil.user_path(args.out)
        if os.path.lexists(out) and (not out.is_dir() or out.is_symlink() or any(out.iterdir())):
            raise CliError(f"--out {out}: exists and is not an empty folder; the demo writes only into a new folder")
    return demo.run_demo(out=out, prompt=args.prompt, max_new_tokens=args.max_new_tokens, group_size=args.group_size,
                         eval_tokens=args.eval_tokens, awq=args.awq, plot=plot, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed)


# ------------------------------------------------------------------------------------------------------------------
COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "score": cmd_score, "info": cmd_info, "demo": cmd_demo,
            "verify": cmd_verify, "eval": evaluation.cmd_eval,
            "bench": lambda args: __import__("gptoss_jax.bench").bench.cmd_bench(args),
            "serve": lambda args: __import__("gptoss_jax.serve.cli", fromlist=["run"]).run(args, _load)}


def _user_error_types() -> tuple[type, ...]:
    """Exceptions that mean "bad input" (exit 2). Our own modules raise ValueError subclasses for a caller's
    mistake; see :func:`_is_user_error` for plain ValueErrors."""
    from gptoss_jax.api import LoadError, TokenizerMissingError
    from gptoss_jax.config import ConfigError
    from gptoss_jax.generate import GenerationError
    from gptoss_jax.harmony import HarmonyParseError
    from gptoss_jax.safetensors_io import CheckpointError
    from gptoss_jax.tokenizer import TokenizerError
    types = [CliError, LoadError, TokenizerMissingError, ConfigError, CheckpointError, TokenizerError,
             GenerationError, HarmonyParseError]
    from gptoss_jax.kernels.int4_layout import Int4LayoutError
    types += [GptOssError, Int4LayoutError]  # every user-facing error of the package (gptoss_jax.errors)
    return tuple(types)


def _is_user_error(e: BaseException) -> bool:
    """Any other ValueError is a user error only when our own code raised it (argument checks in gptoss_jax /
    convert); one raised inside numpy, JAX or another library is a bug of ours, reported as an internal error."""
    if isinstance(e, _user_error_types()):
        return True
    if isinstance(e, ValueError):
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        origin = tb.tb_frame.f_code.co_filename if tb is not None else ""
        return any(part in Path(origin).parts for part in ("gptoss_jax", "convert"))
    return False


def _is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)[:200]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # usage errors: argparse prints usage + one line naming the option
    except SystemExit as e:  # 2 for a usage error, 0 for --help / --version: returned, so main() always returns
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    from gptoss_jax.fsutil import sigterm_as_interrupt
    try:
        with sigterm_as_interrupt():  # SIGTERM ends like Ctrl-C: cleanup runs, nothing partial is left
            return COMMANDS[args.command](args)
    except KeyboardInterrupt as e:
        _err(f"gptoss-jax {args.command}: interrupted")
        return 128 + getattr(e, "signum", 2)  # 130 for SIGINT, 143 for SIGTERM
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not an error; silence the final flush of stdout
        import os
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as e:  # noqa: BLE001 — every failure becomes one line and a documented exit status
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _is_user_error(e):
            _err(f"gptoss-jax {args.command}: error: {msg}")
            return EXIT_USAGE
        if isinstance(e, OSError):
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _err(f"gptoss-jax {args.command}: error: {where}{e.strerror or msg}")
            return EXIT_ENVIRONMENT
        if _is_out_of_memory(e):
            _err(f"gptoss-jax {args.command}: error: out of memory ({msg[:200]}); try a smaller --max-seq-len, "
                 f"fewer prompts or a mesh over more devices")
            return EXIT_ENVIRONMENT
        import traceback
        _err(f"gptoss-jax {args.command}: internal error (a bug in gptoss-jax, please report it with the "
             f"traceback below): {type(e).__name__}: {msg}")
        traceback.print_exception(e, file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
