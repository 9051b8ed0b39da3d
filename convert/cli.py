"""``gptoss-convert``: any 4-bit (or unquantized) gpt-oss checkpoint -> a gptoss-jax Orbax checkpoint.

    gptoss-convert SRC DST [--format auto|compressed-tensors|awq|gptq|auto-round|hf|mxfp4] [--group-size N|channel]
                   [--symmetric] [--dtype bf16|fp16|fp32 (default: source dtypes, lossless)] [--force]
                   [--no-hash] [--threads N] [--quiet]
    gptoss-convert inspect SRC [--format ...] [--dtype ...] [--json]

Exit codes: 0 success, 1 bad input / conversion error (the message names file and tensor), 2 bad usage,
130 interrupted (nothing loadable is left at DST; rerunning succeeds).
"""

from __future__ import annotations

import argparse
import json
import sys

from convert.sources import FORMATS, ConvertError
from gptoss_jax.config import ConfigError
from gptoss_jax.safetensors_io import CheckpointError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _group_size(text: str):
    if text in ("channel", "0", "-1"):
        return "channel"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group-size must be a positive integer or 'channel', got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--group-size must be positive, got {value}")
    return value


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptoss-convert",
                                description="Convert a gpt-oss checkpoint (compressed-tensors / AutoAWQ / GPTQ / "
                                            "AutoRound 4-bit, MXFP4 or unquantized) into a gptoss-jax Orbax "
                                            "checkpoint with packed int4 weights. `gptoss-convert inspect SRC` checks "
                                            "a source only.")
    p.add_argument("src", help="source folder (config.json + safetensors)")
    p.add_argument("dst", help="output folder (must not exist unless --force)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="source format (default: detected from config.json's quantization_config)")
    p.add_argument("--group-size", type=_group_size, default=None,
                   help="RTN group size for hf / mxfp4 sources (default 64; 'channel' = per channel)")
    p.add_argument("--symmetric", action="store_true", default=None,
                   help="symmetric RTN for hf / mxfp4 sources (default asymmetric)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="cast every non-int4 tensor (embeddings, norms, biases, router, lm_head, 16-bit attention) "
                        "to this dtype; lossy when narrower than the source. Default: keep each tensor's source "
                        "dtype (lossless)")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 of the source files in the metadata")
    p.add_argument("--threads", type=int, default=None,
                   help="experts converted in parallel (default min(4, CPUs); each RTN thread needs ~0.55 GB at "
                        "gpt-oss-120b size)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptoss-convert inspect", description="Report on a source checkpoint.")
    p.add_argument("src")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="report the plan for a conversion with this --dtype")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _print_inspect(report: dict) -> None:
    for key, label in (("source", "source"), ("format", "format"), ("scheme", "scheme"), ("dtype", "stored dtype"),
                       ("requantized", "requantized"), ("files", "files"), ("tensors", "tensors"),
                       ("parameters", "parameters"), ("layers", "layers"), ("experts", "experts")):
        if key in report:
            value = report[key]
            if key == "parameters":
                value = f"{value:,} ({value / 1e9:.2f} billion)" if value >= 1e8 else f"{value:,}"
            if key == "requantized":
                value = ", ".join(value) or "none"
            print(f"{label:>20}: {value}")
    for key in ("bytes_in", "estimated_bytes_out"):
        if report.get(key) is not None:
            print(f"{key.replace('_', ' '):>20}: {_human(report[key])} ({report[key]:,} bytes)")
    if report.get("modules"):
        print(f"{'modules':>20}:")
        width = max(len(r["source"]) for r in report["modules"])
        for r in report["modules"]:
            print(f"  {r['group']:<10} {r['source']:<{width}}  -> {r['conversion']}")
    for note in report.get("assumed", []):
        print(f"{'assumed':>20}: {note}")
    problems = report.get("problems", [])
    print(f"{'problems':>20}: {len(problems) or 'none'}")
    for prob in problems:
        print(f"  - {prob}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inspect":
        args = _inspect_parser().parse_args(argv[1:])
        from convert.converter import inspect
        from convert.sources import Options
        from gptoss_jax.checkpoint import dtype_name
        report = inspect(args.src, args.format,
                         Options(dtype=None if args.dtype is None else dtype_name(args.dtype)))
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_inspect(report)
        return EXIT_ERROR if report.get("problems") else 0

    args = _convert_parser().parse_args(argv)
    from convert.converter import convert
    try:
        convert(args.src, args.dst, fmt=args.format, group_size=args.group_size, symmetric=args.symmetric,
                dtype=args.dtype, force=args.force, progress=not args.quiet, hash_files=not args.no_hash,
                threads=args.threads,
                log=lambda msg: print(msg, file=sys.stderr))
    except (ConvertError, CheckpointError, ConfigError) as e:
        print(f"gptoss-convert: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"gptoss-convert: interrupted; nothing was left at {args.dst}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
