"""The conversion driver: source checkpoint -> gptoss-jax Orbax checkpoint, streaming one layer at a time.

Memory: tensors are memory-mapped and read one at a time; after a tensor is converted its pages are dropped from the
resident set (``Checkpoint.release``); the output is written one item (embeddings, one layer, head) at a time. Peak
resident memory is therefore about one output layer (≈1.7 GB for gpt-oss-120b) plus one expert's float64 working
copy when quantizing, independent of the number of layers.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable


from gptoss_jax.convert.sources import FORMATS, ConvertError, Options, Source, detect_format, open_source
from gptoss_jax.convert.validate import check_config_against_headers
from gptoss_jax import checkpoint, fsutil
from gptoss_jax.jsoncheck import read_json_object
from gptoss_jax.config import ConfigError, GptOssConfig
from gptoss_jax.params import count_parameters, iter_specs, param_specs
from gptoss_jax.safetensors_io import Checkpoint, CheckpointError

CONVERTER_VERSION = "1.0.0"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
HASH_CHUNK = 16 << 20


def read_hf_config(src: Path) -> dict:
    return read_json_object(src / "config.json", error=ConvertError,
                            what="the source folder needs the model's config.json")


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


class _Progress:
    """Bytes-of-input progress (tqdm bar with bytes/s and ETA on a terminal, or silent)."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True,
                            smoothing=0.1)

    def update(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def open_checkpoint_source(src: str | os.PathLike, fmt: str = "auto", options: Options | None = None
                           ) -> tuple[Checkpoint, Source, dict]:
    """Opens SRC, reads config.json and builds the format reader (no tensor data read yet)."""
    src = fsutil.user_path(src)
    if not src.is_dir():
        raise ConvertError(f"{src}: not a folder (expected a Hugging Face model folder with config.json)")
    hf = read_hf_config(src)
    try:
        config = GptOssConfig.from_hf_dict(hf, source=str(src / "config.json"))
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    detected = detect_format(hf, str(src / "config.json"))
    if fmt in (None, "auto"):
        fmt = detected
    elif fmt not in FORMATS:
        raise ConvertError(f"--format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    ckpt = Checkpoint(src)
    try:
        # sizes claimed by config.json against the safetensors headers, before any per-layer table is built
        check_config_against_headers(config, ckpt, fmt, str(src / "config.json"))
        source = open_source(ckpt, config, hf, fmt, options or Options())
    except BaseException:
        ckpt.close()
        raise
    return ckpt, source, hf


def _estimate_out_bytes(source: Source) -> int | None:
    """Bytes of the converted parameters (None when the scheme cannot describe this model, e.g. a bad group)."""
    try:
        specs = param_specs(source.config, dtype=checkpoint.host_dtype(source.storage_dtype()), quant=source.quant)
    except ValueError:
        return None
    return sum(s.nbytes for _, s in iter_specs(specs))


def inspect(src: str | os.PathLike, fmt: str = "auto", options: Options | None = None) -> dict[str, Any]:
    """What `gptoss-convert inspect` prints: format, scheme, counts, sizes and every problem found."""
    src = fsutil.user_path(src)
    report: dict[str, Any] = {"source": str(src)}
    try:
        ckpt, source, hf = open_checkpoint_source(src, fmt, options)
    except (ConvertError, CheckpointError, ConfigError) as e:
        report["problems"] = [str(e)]
        return report
    with ckpt:
        problems = source.problems()
        if not problems:
            problems += source.value_problems()
        report.update({
            "format": source.format,
            "detected_format": detect_format(hf),
            "scheme": source.scheme_description(),
            "quant": source.quant.to_dict(),
            "dtype": source.storage_dtype(),
            "dtype_cast": source.options.dtype,
            "modules": source.module_plan(),
            "assumed": list(source.config.rope.assumed),
            "requantized": list(source.requantized),
            "files": len(ckpt.files),
            "tensors": len(ckpt.keys()),
            "parameters": count_parameters(source.config),
            "bytes_in": ckpt.nbytes(),
            "estimated_bytes_out": _estimate_out_bytes(source),
            "layers": source.config.num_hidden_layers,
            "experts": source.config.num_local_experts,
            "problems": problems,
        })
    return report


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, fmt: str = "auto", group_size: int | str | None = None,
            symmetric: bool | None = None, dtype: str | None = None, force: bool = False, progress: bool = False,
            hash_files: bool = True, threads: int | None = None, log: Callable[[str], None] | None = None,
            awq=None) -> Path:
    """Converts SRC into a gptoss-jax checkpoint at DST and returns DST.

    group_size: RTN group size for hf / mxfp4 sources (None = default 64, "channel" = per channel); symmetric likewise
    (None = default, asymmetric). Quantized sources keep their own scheme (passing either is an error).
    dtype: None (default) keeps every non-int4 tensor in its source dtype (lossless); "bf16" / "fp16" / "fp32" casts
    them all to it (an explicit choice, lossy when narrower than the source), recorded in the metadata.

    awq: None (round to nearest) or a ``gptoss_jax.convert.awq.AWQOptions``: AWQ calibration of an hf / mxfp4
    source (docs/CONVERTER.md, "AWQ"); the group size and symmetry still come from group_size / symmetric.

    SRC and DST may be relative, ``~`` or symlinks. `force` replaces DST only if it is a previous gptoss-jax
    checkpoint or an empty folder; a DST that is, holds or lies inside SRC is always refused.

    Raises (all ``gptoss_jax.GptOssError``, naming the file / tensor / field): ConvertError for a source or option
    that cannot be converted (malformed config.json, sizes the safetensors do not hold, NaN/Inf in a tensor, index
    entries outside SRC) or a refused DST; CheckpointError for unreadable safetensors or a failed write; OSError
    for the file system (permissions, disk full). Nothing is left at DST on any failure or interrupt (docs/
    RELIABILITY.md).
    """
    src, dst = fsutil.user_path(src), fsutil.user_path(dst)
    log = log or (lambda msg: None)
    # refuses before any work: DST = / inside / holding SRC, an existing DST without force, and with force anything
    # but a previous gptoss-jax checkpoint (or an empty folder)
    try:
        fsutil.check_destination(dst, force=force, sources=(src,))
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    out_dtype = None if dtype is None else checkpoint.dtype_name(dtype)
    if group_size is not None and group_size != "channel" and (isinstance(group_size, bool) or
                                                               not isinstance(group_size, int) or group_size <= 0):
        raise ConvertError(f"group size must be a positive integer or 'channel', got {group_size!r}")
    options = Options(dtype=out_dtype, group_size={None: 64, "channel": None}.get(group_size, group_size),
                      symmetric=bool(symmetric), group_size_given=group_size is not None,
                      symmetric_given=symmetric is not None)
    if threads is not None:
        if threads < 1:
            raise ConvertError(f"threads must be >= 1, got {threads}")
        options.threads = threads
    if awq is not None:
        awq.check()
    ckpt, source, hf = open_checkpoint_source(src, fmt, options)
    with ckpt:
        problems = source.problems()
        if not problems:
            problems = source.value_problems()
        if awq is not None and not problems:
            from gptoss_jax.convert import awq as awq_mod
            awq_mod.enable(source, awq, src)  # refuses quantized sources and bad calibration data before any work
        if problems:
            # one line: the first few problems; `inspect` lists every one
            shown = "; ".join(" ".join(p.split()) for p in problems[:4])
            more = (f" (and {len(problems) - 4} more: `gptoss-convert inspect {src}` lists them all)"
                    if len(problems) > 4 else "")
            raise ConvertError(f"cannot convert {src} ({len(problems)} problem(s)): {shown}{more}")
        config = source.config
        log(f"{src}: {source.format}, {source.scheme_description()}, {len(ckpt.keys())} tensors, "
            f"{ckpt.nbytes() / 1e6:,.1f} MB")
        total = sum(ckpt.nbytes_of(n) for n in ckpt.keys())
        bar = _Progress(total, progress, "convert")
        counted: set[str] = set()
        release = source.release

        def release_and_count(name: str) -> None:
            release(name)
            if name not in counted and name in ckpt:
                counted.add(name)
                bar.update(ckpt.nbytes_of(name))
        source.release = release_and_count  # type: ignore[method-assign]

        started = time.perf_counter()
        try:
            storage = source.storage_dtype()
            with checkpoint.CheckpointWriter(dst, config, dtype=storage, quant=source.quant, force=force) as w:
                for name in checkpoint.item_names(config):
                    try:
                        tree = source.read_item(name)
                    except CheckpointError as e:
                        raise ConvertError(str(e)) from None
                    w.write_item(name, tree)
                    del tree
                bar.update(total - sum(ckpt.nbytes_of(n) for n in counted))
                for fname in TOKENIZER_FILES:
                    if (src / fname).is_file():
                        w.copy_file(src / fname)
                files = []
                if hash_files:
                    log(f"hashing {len(ckpt.files)} source file(s) for the metadata (skip with --no-hash)")
                for shard, f in ckpt.files.items():
                    entry = {"name": shard, "size": f.path.stat().st_size}
                    if hash_files:
                        entry["sha256"] = sha256_file(f.path)
                    files.append(entry)
                for extra in ("model.safetensors.index.json", "config.json"):
                    if (src / extra).is_file():
                        files.append({"name": extra, "size": (src / extra).stat().st_size,
                                      **({"sha256": sha256_file(src / extra)} if hash_files else {})})
                elapsed = time.perf_counter() - started
                out = w.finish({
                    "converter": {"name": "gptoss-convert", "version": CONVERTER_VERSION,
                                  "seconds": round(elapsed, 3)},
                    "source": {"path": str(src.resolve()), "format": source.format,
                               "scheme": source.scheme_description(),
                               "quantization_config": hf.get("quantization_config"), "files": files},
                    "dtype_cast": out_dtype,  # None: lossless (source dtypes kept per tensor)
                    "modules": source.module_plan(),
                    "assumed": list(config.rope.assumed),
                    "requantized": list(source.requantized),
                    **({"awq": source.awq_report} if awq is not None else {}),
                })
        finally:
            bar.close()
    log(f"wrote {out} in {elapsed:.1f} s ({total / max(elapsed, 1e-9) / 1e6:.1f} MB/s of input)")
    return out


__all__ = ["convert", "inspect", "CONVERTER_VERSION", "TOKENIZER_FILES", "ConvertError"]
