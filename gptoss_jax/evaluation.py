"""Evaluation runs: ``gptoss-jax eval perplexity CKPT FILE [--json OUT] [--max-length N] [--stride S]``.

Perplexity is the standard definition, exp of the mean negative log-likelihood per token of the whole file as one
token sequence, the first token unscored (nothing to condition on):

    PPL = exp( -1/(N-1) · Σ_{t=1}^{N-1} log p(x_t | x_{c(t)} … x_{t-1}) )

A sequence longer than the model's context is cut into windows of at most ``max_length`` tokens that start every
``stride`` tokens (the sliding-window recipe of Hugging Face's "Perplexity of fixed-length models",
https://huggingface.co/docs/transformers/perplexity): window ``[b, min(b + max_length, N))`` scores only the tokens
the previous window did not reach, with at least ``max_length - stride`` tokens of context once past the first
window. Smaller strides cost more forward passes and approach the fully-conditioned perplexity. With
``stride == max_length`` (disjoint chunks) each chunk's first token has no context inside its window and is left
unscored, as in that recipe; with ``stride < max_length`` tokens 1 … N-1 are each scored exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any, Sequence

import numpy as np

from gptoss_jax.errors import GptOssError


class EvaluationError(GptOssError, ValueError):
    """A bad evaluation argument (window sizes, too little text): the message names it."""


@dataclasses.dataclass(frozen=True)
class Window:
    """One forward pass: the tokens ``[begin, end)`` are fed, the tokens ``[score_from, end)`` are scored."""
    begin: int
    score_from: int
    end: int


def window_spans(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows of the sliding-window recipe over ``num_tokens`` tokens.

    Windows start at ``0, stride, 2·stride, …`` and end at ``min(begin + max_length, num_tokens)``; each scores from
    the previous window's end, but never its own first token (which has no context in the window; token 0 is never
    scored), and the walk stops at the first window that reaches the end. So with ``stride < max_length`` tokens
    1 … N-1 are each scored exactly once; a token scored in window ``[b, e)`` sees the context from ``b``.

    Raises EvaluationError for ``num_tokens < 2`` or ``stride`` not in ``[1, max_length]``.
    """
    if max_length < 2:
        raise EvaluationError(f"--max-length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise EvaluationError(f"--stride must be in [1, --max-length={max_length}], got {stride}")
    if num_tokens < 2:
        raise EvaluationError(f"perplexity needs at least 2 tokens, got {num_tokens}")
    windows, prev_end = [], 1  # token 0 is never scored
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append(Window(begin, max(prev_end, begin + 1), end))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@dataclasses.dataclass
class PerplexityResult:
    """perplexity = exp(nll_mean); nll_mean in nats per scored token; token_nll float64 [num_scored], in token order."""
    perplexity: float
    nll_mean: float
    num_tokens: int
    num_scored: int
    num_windows: int
    max_length: int
    stride: int
    token_nll: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "nll_mean": self.nll_mean, "bits_per_token": self.nll_mean / math.log(2),
                "num_tokens": self.num_tokens, "num_scored": self.num_scored, "num_windows": self.num_windows,
                "max_length": self.max_length, "stride": self.stride}


def perplexity(model, text_or_ids: str | Sequence[int], *, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 8, progress=None) -> PerplexityResult:
    """Perplexity of one text (tokenized as one sequence) or id sequence under an :class:`~gptoss_jax.api.
    InferenceModel` (the module docstring has the definition and window semantics).

    max_length: tokens per forward pass (default: the model's max_seq_len); stride: default max_length // 2.
    batch_size: windows per forward call. progress(done, total): optional callback after each batch.
    Log-probabilities come from :meth:`InferenceModel.score` (float32 log-softmax of float32 logits) and are summed
    in float64. Raises EvaluationError for bad window sizes or fewer than 2 tokens.
    """
    ids = model.encode(text_or_ids) if isinstance(text_or_ids, str) else [int(i) for i in text_or_ids]
    max_length = model.max_seq_len if max_length is None else int(max_length)
    if max_length > model.max_seq_len:
        raise EvaluationError(f"--max-length {max_length} exceeds the model's max_seq_len {model.max_seq_len}")
    stride = max(1, max_length // 2) if stride is None else int(stride)
    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be positive, got {batch_size}")
    windows = window_spans(len(ids), max_length, stride)
    nll: list[np.ndarray] = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        results = model.score([ids[w.begin:w.end] for w in batch])
        for w, r in zip(batch, results):
            # r.token_logprobs[i] scores token w.begin + 1 + i
            nll.append(-np.asarray(r.token_logprobs[w.score_from - w.begin - 1:], np.float64))
        if progress is not None:
            progress(min(start + batch_size, len(windows)), len(windows))
    token_nll = np.concatenate(nll)
    assert len(token_nll) == sum(w.end - w.score_from for w in windows)
    mean = float(token_nll.mean())
    return PerplexityResult(math.exp(mean), mean, len(ids), len(token_nll), len(windows), max_length, stride,
                            token_nll)


# ------------------------------------------------------------------------------------------------------------------ CLI
def add_eval_parser(sub, add_model_args) -> None:
    """Registers ``eval`` (with its ``perplexity`` subcommand) on the ``gptoss-jax`` subparsers."""
    from gptoss_jax.cli import _int_type
    e = sub.add_parser("eval", help="evaluation runs: perplexity of a text file")
    esub = e.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    p = esub.add_parser("perplexity", help="perplexity of a UTF-8 text file (one token sequence, sliding windows)")
    add_model_args(p)
    p.add_argument("file", help="UTF-8 text file, scored as one sequence ('-' = stdin)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON to this new file")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.add_argument("--max-length", type=_int_type(2), default=None,
                   help="tokens per window (default: --max-seq-len, or 1024)")
    p.add_argument("--stride", type=_int_type(1), default=None, help="window start step (default: max-length / 2)")
    p.add_argument("--batch-size", type=_int_type(1), default=8, help="windows per forward call")


def cmd_eval(args) -> int:
    from gptoss_jax import cli
    if args.eval_command != "perplexity":  # argparse only lets known subcommands through
        raise cli.CliError(f"unknown eval command {args.eval_command!r}")
    cli._check_output(args.json, args.force)
    lines = cli._read_lines(args.file)  # UTF-8 checked, naming the file and line
    text = "\n".join(lines)
    if not text.strip():
        raise cli.CliError(f"{args.file}: nothing to evaluate (empty file)")
    max_length = args.max_length
    if max_length is None:
        max_length = args.max_seq_len or 1024
    if args.max_seq_len is None:
        args.max_seq_len = max_length
    if args.max_seq_len < max_length:
        raise cli.CliError(f"--max-length {max_length} exceeds --max-seq-len {args.max_seq_len}")
    if args.stride is not None and args.stride > max_length:
        raise cli.CliError(f"--stride {args.stride} exceeds --max-length {max_length}")
    model = cli._load(args)
    if model.tokenizer is None:
        raise cli.CliError(f"{args.checkpoint}: no tokenizer.json; pass --tokenizer")
    t0 = time.perf_counter()
    result = perplexity(model, text, max_length=max_length, stride=args.stride, batch_size=args.batch_size,
                        progress=lambda d, n: cli._err(f"[gptoss-jax] window {d}/{n}"))
    elapsed = time.perf_counter() - t0
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.nll_mean:.4f} nats/token over {result.num_scored} "
          f"tokens, {result.num_windows} windows of ≤{result.max_length}, stride {result.stride})")
    if args.json:
        out = {"checkpoint": str(args.checkpoint), "file": str(args.file), "task": "perplexity",
               **result.to_dict(), "seconds": round(elapsed, 3)}
        cli._write_atomic(args.json, json.dumps(out, indent=2) + "\n")
    cli._err(f"[gptoss-jax] {result.num_scored} tokens scored in {elapsed:.2f}s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from gptoss_jax.cli import main
    sys.exit(main(["eval", *sys.argv[1:]]))
