"""Evaluation runs: ``gptoss-jax eval perplexity CKPT FILE [--json OUT] [--max-length N] [--stride S]`` and
``gptoss-jax eval groups CKPT FILE [--group-sizes 32,64,128] [--json OUT] [--plot OUT.png]`` (perplexity of the 16-bit
checkpoint and of its int4 RTN and AWQ conversions per group size, as JSON and as a PNG curve).

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


# ------------------------------------------------------------------------------------------- int4 group-size sweep
@dataclasses.dataclass
class SweepRow:
    """One scored model of :func:`group_size_sweep`: method "bf16" (the source as stored, group_size None), "rtn"
    or "awq"; perplexity as :func:`perplexity`; weights_bytes: the loaded parameters' bytes."""
    method: str
    group_size: int | None
    perplexity: float
    nll_mean: float
    num_scored: int
    weights_bytes: int
    seconds: float

    @property
    def label(self) -> str:
        return "bf16 (source)" if self.group_size is None else f"int4 {self.method.upper()} g{self.group_size}"


def group_size_sweep(src, text: str, work, *, group_sizes: Sequence[int] = (32, 64, 128), awq_calib: str | None,
                     max_length: int = 256, stride: int | None = None, eval_tokens: int | None = None,
                     known: dict | None = None, log=None) -> list[SweepRow]:
    """Perplexity of `text` under the 16-bit Hugging Face checkpoint `src` and its int4 conversions: round to nearest
    (RTN) and, when `awq_calib` is given ("builtin" or a text file; see ``gptoss-convert --awq``), AWQ, at each group
    size. Conversions are written under the existing folder `work` (the caller removes it).

    eval_tokens: score only the first N tokens of the text (None: all). known: {(method, group_size): SweepRow} rows
    already measured with the same text and windows (the demo's own table), reused instead of recomputed.
    Returns the rows: the source first, then per group size RTN (and AWQ). Raises EvaluationError for a bad group
    size, and the converter's ConvertError for a source it cannot quantize.
    """
    import gptoss_jax
    from gptoss_jax.convert.converter import convert
    from pathlib import Path
    work, known, log = Path(work), dict(known or {}), log or (lambda msg: None)
    for g in group_sizes:
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise EvaluationError(f"--group-sizes: a group size must be a positive integer, got {g!r}")

    def score(method, g, path, dtype):
        if (method, g) in known:
            return known[(method, g)]
        t0 = time.perf_counter()
        model = gptoss_jax.load(path, dtype=dtype, max_seq_len=max_length)
        ids = model.encode(text)
        ids = ids[:eval_tokens] if eval_tokens else ids
        r = perplexity(model, ids, max_length=max_length, stride=stride)
        row = SweepRow(method, g, r.perplexity, r.nll_mean, r.num_scored, int(model.info()["bytes"]),
                       round(time.perf_counter() - t0, 2))
        log(f"{row.label:<18} perplexity {row.perplexity:.2f}")
        return row

    rows = [score("bf16", None, src, "bfloat16")]
    for g in group_sizes:
        dst = work / f"int4-rtn-g{g}"
        if ("rtn", g) not in known:
            convert(src, dst, fmt="hf", group_size=g, hash_files=False)
        rows.append(score("rtn", g, dst, None))
        if awq_calib is not None:
            from gptoss_jax.convert.awq import AWQOptions
            dst = work / f"int4-awq-g{g}"
            if ("awq", g) not in known:
                convert(src, dst, fmt="hf", group_size=g, hash_files=False, awq=AWQOptions(calib=str(awq_calib)))
            rows.append(score("awq", g, dst, None))
    return rows


def sweep_to_dict(rows: Sequence[SweepRow]) -> dict[str, Any]:
    """The JSON form of :func:`group_size_sweep`'s rows, with each row's change against the source in percent."""
    base = rows[0].perplexity
    return {"task": "group_size_sweep", "rows": [
        {**dataclasses.asdict(r), "label": r.label, "vs_source_percent": 100.0 * (r.perplexity / base - 1.0)}
        for r in rows]}


class PlotUnavailable(EvaluationError):
    """matplotlib is not installed (the ``plot`` extra)."""


def plot_group_sweep(rows: Sequence[SweepRow], path, *, title: str | None = None) -> None:
    """Writes a PNG of perplexity against int4 group size: the 16-bit source as a horizontal line, RTN and AWQ as
    curves (group size on a log2 axis). Needs matplotlib (``pip install 'gptoss-jax[plot]'``, headless Agg backend).

    The file is written next to `path` under a temporary name and renamed over it at the end. Raises
    PlotUnavailable without matplotlib, EvaluationError when the folder of `path` does not exist."""
    import os
    import tempfile
    from pathlib import Path
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise EvaluationError(f"--plot {path}: folder {parent} does not exist")
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display: render to a file
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'gptoss-jax[plot]'") from None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    try:
        base = rows[0]
        ax.axhline(base.perplexity, color="black", linestyle="--", label=f"{base.label}: {base.perplexity:.2f}")
        for method, style in (("rtn", dict(color="tab:red", marker="o")), ("awq", dict(color="tab:blue", marker="s"))):
            pts = sorted((r.group_size, r.perplexity) for r in rows if r.method == method)
            if pts:
                ax.plot([g for g, _ in pts], [p for _, p in pts], label=f"int4 {method.upper()}", **style)
        sizes = sorted({r.group_size for r in rows if r.group_size is not None})
        if sizes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(g) for g in sizes])
            ax.minorticks_off()
        ax.set_xlabel("int4 group size (weights per scale)")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(title or "perplexity vs int4 group size")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format="png")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)


def check_new_file(flag: str, path: str | None, force: bool) -> None:
    """Before any work: `path` (of option `flag`) must be a file we may create (or replace with `force`) in an
    existing folder. Raises EvaluationError naming the option."""
    from pathlib import Path
    if path is None:
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise EvaluationError(f"{flag} {path}: is a folder; name a file")
    if p.exists() and not force:
        raise EvaluationError(f"{flag} {path}: exists; pass --force to replace it")
    if p.exists() and not p.is_file():
        raise EvaluationError(f"{flag} {path}: exists and is not a regular file")
    if not parent.is_dir():
        raise EvaluationError(f"{flag} {path}: folder {parent} does not exist")


def _plot_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


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

    g = esub.add_parser("groups", help="perplexity of a 16-bit checkpoint and its int4 RTN / AWQ conversions per "
                                       "group size (JSON, PNG plot)")
    g.add_argument("checkpoint", help="unquantized Hugging Face folder (bf16 / fp16 / fp32 safetensors)")
    g.add_argument("file", help="UTF-8 text file, scored as one sequence")
    g.add_argument("--group-sizes", type=_group_sizes, default=(32, 64, 128), metavar="G,G,...",
                   help="int4 group sizes (default 32,64,128)")
    g.add_argument("--calib", default="builtin", metavar="FILE|builtin",
                   help="AWQ calibration text (as gptoss-convert --calib; default builtin)")
    g.add_argument("--no-awq", action="store_true", help="round to nearest only")
    g.add_argument("--eval-tokens", type=_int_type(2), default=None, help="score only the first N tokens")
    g.add_argument("--max-length", type=_int_type(2), default=256, help="tokens per window (default 256)")
    g.add_argument("--stride", type=_int_type(1), default=None, help="window start step (default: max-length / 2)")
    g.add_argument("--json", default=None, metavar="OUT", help="write the rows as JSON to this new file")
    g.add_argument("--plot", default=None, metavar="OUT.png",
                   help="write perplexity vs group size as a PNG (needs matplotlib: the plot extra)")
    g.add_argument("--force", action="store_true", help="replace an existing --json / --plot file")


def _group_sizes(text: str) -> tuple[int, ...]:
    import argparse
    try:
        sizes = tuple(int(t, 10) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"group sizes must be positive, got {text!r}")
    return sizes


def cmd_groups(args) -> int:
    """``gptoss-jax eval groups``: the table (stdout), JSON and PNG of :func:`group_size_sweep`."""
    import shutil
    import tempfile
    from pathlib import Path

    from gptoss_jax import cli
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        try:
            check_new_file(flag, path, args.force)
        except EvaluationError as e:
            raise cli.CliError(str(e)) from None
    if args.plot is not None and not _plot_available():
        raise cli.CliError("--plot needs matplotlib: pip install 'gptoss-jax[plot]'")
    if args.stride is not None and args.stride > args.max_length:
        raise cli.CliError(f"--stride {args.stride} exceeds --max-length {args.max_length}")
    src = Path(args.checkpoint)
    if not (src / "config.json").is_file() or not any(src.glob("*.safetensors")):
        raise cli.CliError(f"{src}: not a Hugging Face folder (config.json and *.safetensors)")
    text = "\n".join(cli._read_lines(args.file))
    if not text.strip():
        raise cli.CliError(f"{args.file}: nothing to evaluate (empty file)")
    work = Path(tempfile.mkdtemp(prefix="gptoss-jax-groups-"))
    try:
        rows = group_size_sweep(src, text, work, group_sizes=args.group_sizes,
                                awq_calib=None if args.no_awq else args.calib, max_length=args.max_length,
                                stride=args.stride, eval_tokens=args.eval_tokens,
                                log=lambda m: cli._err(f"[gptoss-jax] {m}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(format_sweep(rows))
    if args.json:
        cli._write_atomic(args.json, json.dumps({"checkpoint": str(src), "file": str(args.file),
                                                 **sweep_to_dict(rows)}, indent=2) + "\n")
    if args.plot:
        plot_group_sweep(rows, args.plot, title=f"{src.name}: perplexity vs int4 group size")
        cli._err(f"[gptoss-jax] wrote {args.plot}")
    return 0


def format_sweep(rows: Sequence[SweepRow]) -> str:
    """A markdown table of the sweep: one row per group size, RTN and AWQ columns (and the source's perplexity)."""
    base = rows[0].perplexity
    sizes = sorted({r.group_size for r in rows if r.group_size is not None})
    by = {(r.method, r.group_size): r.perplexity for r in rows}
    methods = [m for m in ("rtn", "awq") if any(r.method == m for r in rows)]
    head = "| group size | " + " | ".join(f"int4 {m.upper()}" for m in methods) + f" | {rows[0].label} |"
    lines = [head, "|" + " --- |" * (len(methods) + 2)]
    for g in sizes:
        cells = [f"{by[(m, g)]:.2f} ({100 * (by[(m, g)] / base - 1):+.1f}%)" for m in methods]
        lines.append(f"| {g} | " + " | ".join(cells) + f" | {base:.2f} |")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from gptoss_jax import cli
    if args.eval_command == "groups":
        return cmd_groups(args)
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
