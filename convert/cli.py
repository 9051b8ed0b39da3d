"""``gptoss-convert``: any 4-bit (or unquantized) gpt-oss checkpoint -> a gptoss-jax Orbax checkpoint.

    gptoss-convert SRC DST [--format auto|compressed-tensors|awq|gptq|auto-round|hf|mxfp4] [--group-size N|channel]
                   [--symmetric] [--dtype bf16|fp16|fp32 (default: source dtypes, lossless)] [--force]
                   [--no-hash] [--threads N] [--quiet]
    gptoss-convert inspect SRC [--format ...] [--dtype ...] [--json]

Exit codes: 0 success, 1 bad input / conversion error / OS error (one line naming the file, tensor or path), 2 bad
usage, 130 / 143 interrupted by SIGINT / SIGTERM (the temporary folder is removed; nothing is left at DST).
"""

from __future__ import annotations

import argparse
import json
import sys

from gptoss_jax.convert.sources import FORMATS
from gptoss_jax import fsutil
from gptoss_jax.errors import describe_os_error, user_errors

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT; SIGTERM gives 143


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
    p.add_argument("--force", action="store_true",
                   help="replace DST if it is a previous gptoss-jax checkpoint (or an empty folder); any other "
                        "existing DST, and a DST that is, holds or lies inside SRC, is refused")
    p.add_argument("--no-hash", action="store_true",
                   help="skip the sha256 of the source files in the metadata (the digests of the written files, "
                        "checked on load, are always recorded)")
    p.add_argument("--threads", type=int, default=None,
                   help="experts converted in parallel (default min(4, CPUs); each RTN thread needs ~0.55 GB at "
                        "gpt-oss-120b size)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--asymmetric", dest="symmetric", action="store_false",
                   help="asymmetric RTN / AWQ (the default; the opposite of --symmetric)")
    g = p.add_argument_group("AWQ calibration (hf / mxfp4 sources; docs/CONVERTER.md)")
    g.add_argument("--awq", action="store_true",
                   help="activation-aware int4: per-channel scale and clip search on calibration text, scales "
                        "folded into the preceding norms / v_proj, then int4 packing")
    g.add_argument("--calib", default=None, metavar="FILE|builtin",
                   help="calibration text (UTF-8, tokenized with SRC/tokenizer.json) or 'builtin' (default)")
    g.add_argument("--calib-samples", type=int, default=None, metavar="N",
                   help="calibration sequences (default 32)")
    g.add_argument("--calib-seq-len", type=int, default=None, metavar="T",
                   help="tokens per calibration sequence (default 256)")
    g.add_argument("--no-clip", action="store_true", help="skip AWQ's clip search (scale search only)")
    return p


def _awq_options(p: argparse.ArgumentParser, args):
    """AWQOptions from the AWQ flags, or None without --awq (the other AWQ flags alone are a usage error)."""
    given = [f for f, v in (("--calib", args.calib), ("--calib-samples", args.calib_samples),
                            ("--calib-seq-len", args.calib_seq_len), ("--no-clip", args.no_clip or None))
             if v is not None]
    if not args.awq:
        if given:
            p.error(f"{given[0]} needs --awq")
        return None
    from gptoss_jax.convert.awq import AWQOptions
    opts = AWQOptions(calib=args.calib or "builtin", clip=not args.no_clip)
    for flag, name, value in (("--calib-samples", "samples", args.calib_samples),
                              ("--calib-seq-len", "seq_len", args.calib_seq_len)):
        if value is not None:
            if value < 1:
                p.error(f"{flag} must be a positive integer, got {value}")
            setattr(opts, name, value)
    return opts


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


def _error(e: BaseException) -> str:
    return describe_os_error(e) if isinstance(e, OSError) else str(e)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inspect":
        args = _inspect_parser().parse_args(argv[1:])
        from gptoss_jax.convert.converter import inspect
        from gptoss_jax.convert.sources import Options
        from gptoss_jax.checkpoint import dtype_name
        try:
            report = inspect(args.src, args.format,
                             Options(dtype=None if args.dtype is None else dtype_name(args.dtype)))
        except user_errors() as e:
            print(f"gptoss-convert inspect: error: {_error(e)}", file=sys.stderr)
            return EXIT_ERROR
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_inspect(report)
        return EXIT_ERROR if report.get("problems") else 0

    parser = _convert_parser()
    args = parser.parse_args(argv)
    awq = _awq_options(parser, args)
    from gptoss_jax.convert.converter import convert
    try:
        with fsutil.sigterm_as_interrupt():
            convert(args.src, args.dst, fmt=args.format, group_size=args.group_size, symmetric=args.symmetric,
                    dtype=args.dtype, force=args.force, progress=not args.quiet, hash_files=not args.no_hash,
                    threads=args.threads, awq=awq,
                    log=lambda msg: print(msg, file=sys.stderr))
    except user_errors() as e:
        print(f"gptoss-convert: error: {_error(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", 2)
        left = fsutil.remove_own_temp_dirs(args.dst)
        where = (f"could not remove {', '.join(map(str, left))}" if left else
                 f"nothing was left at {fsutil.user_path(args.dst)}")
        print(f"gptoss-convert: interrupted ({'SIGTERM' if signum == 15 else 'SIGINT'}); {where}", file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
