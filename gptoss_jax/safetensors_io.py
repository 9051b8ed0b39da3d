"""Streaming, memory-mapped reading of (sharded) safetensors checkpoints, one tensor at a time.

Only the tensor asked for is touched: the file is memory-mapped and each tensor is a zero-copy numpy view until
the caller converts it. bfloat16 is read through ml_dtypes. Every error names the file and the tensor.
"""

from __future__ import annotations

from gptoss_jax.errors import GptOssError
from gptoss_jax.jsoncheck import refuse_duplicate_keys

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}

_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(GptOssError, ValueError):
    """A checkpoint file or tensor that cannot be read; the message names the file and tensor."""


def _parse_header(path: Path, raw: bytes, data_size: int):
    """(metadata, {name: (dtype, shape, begin, end)}) of a safetensors header, every field checked against the
    format (https://github.com/huggingface/safetensors, "Format"): a UTF-8 JSON object; "__metadata__" a string to
    string map; each tensor {"dtype": known name, "shape": non-negative ints, "data_offsets": [begin, end]} with
    end - begin = its byte size; the tensors tile the data buffer exactly (no overlap, no hole, nothing after)."""
    dup_check = refuse_duplicate_keys(
        lambda k: CheckpointError(f"{path}: corrupted safetensors header (duplicate key {k!r})"))

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=dup_check)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: corrupted safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupted safetensors header (__metadata__ must map strings to strings)")
    entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry must be an object, got {type(info).__name__}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise CheckpointError(f"{where}: header entry lacks {missing}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}"[:300])
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got "
                                  f"{offsets!r}"[:300])
        np_dtype = np.dtype(DTYPES[dtype])
        nbytes = math.prod(shape) * np_dtype.itemsize  # Python ints: no overflow for absurd shapes
        begin, end = offsets
        if end - begin != nbytes or end > data_size:
            raise CheckpointError(f"{where}: data range [{begin}, {end}) does not fit its shape {tuple(shape)} "
                                  f"{np_dtype.name} ({nbytes} bytes) or the file's {data_size} data bytes "
                                  f"(truncated?)")
        entries[name] = (np_dtype, tuple(shape), begin, end)
    pos = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a hole of {begin - pos} bytes before it"
            raise CheckpointError(f"{path}: tensor {name!r} data range [{begin}, {end}) {what} (corrupted header)")
        pos = end
    if pos != data_size:
        raise CheckpointError(f"{path}: the tensors cover {pos} of the file's {data_size} data bytes (corrupted "
                              f"header or trailing bytes)")
    return metadata, entries


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly and validated, data memory-mapped lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        if not self.path.is_file():  # a folder (or device) where a tensor file belongs: bad input, not the OS
            raise CheckpointError(f"{self.path}: not a regular file")
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: corrupted or truncated safetensors header "
                                      f"(header length {n}, file size {size})")
            raw = f.read(n)
        self.metadata, self.entries = _parse_header(self.path, raw, size - 8 - n)
        self._data_start = 8 + n
        self._data_size = size - self._data_start
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self.entries[name]
        return dtype, shape

    def get(self, name: str) -> np.ndarray:
        """A read-only, zero-copy view of one tensor."""
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        dtype, shape, begin, end = self.entries[name]
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self._data_size else b""
        buf = memoryview(self._mmap)[self._data_start + begin: self._data_start + end]
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def nbytes_of(self, name: str) -> int:
        _, _, begin, end = self.entries[name]
        return end - begin

    def release(self, name: str, index: int | None = None) -> None:
        """Drops the pages of one tensor (or of entry `index` of its leading dim) from this process's resident set
        (they are re-read from the file if used again), so streaming through a checkpoint keeps resident memory
        flat. Views stay valid."""
        if self._mmap is None or isinstance(self._mmap, bytes) or name not in self.entries:
            return
        dtype, shape, begin, end = self.entries[name]
        if index is not None and shape:
            stride = (end - begin) // shape[0]
            begin, end = begin + index * stride, begin + (index + 1) * stride
        page = mmap.PAGESIZE
        start = (self._data_start + begin) // page * page
        stop = self._data_start + end
        if stop > start and hasattr(self._mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self):
        if self._mmap is not None and not isinstance(self._mmap, bytes):
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive; the OS unmaps it when that view dies
                pass
        self._mmap = None


def read_index(index_path: Path) -> dict[str, str]:
    """The weight_map of a model.safetensors.index.json, type-checked; every shard must be a plain file name in the
    index's folder (no "/", "\\", "..", absolute path): a downloaded index must not make us read other files."""
    from gptoss_jax.jsoncheck import field, read_json_object
    index = read_json_object(index_path, error=CheckpointError)
    field(index, "metadata", str(index_path), "object", default=None, nullable=True, error=CheckpointError)
    weight_map = field(index, "weight_map", str(index_path), "object", error=CheckpointError)
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index_path}: field 'weight_map.{tensor}' must be a file name, got {shard!r}")
        if (not shard or "/" in shard or "\\" in shard or shard in (".", "..") or "\0" in shard
                or Path(shard).is_absolute()):
            raise CheckpointError(f"{index_path}: shard {shard!r} (of tensor {tensor!r}) is not a plain file name "
                                  f"in the checkpoint folder; refusing to read outside it")
    if not weight_map:
        raise CheckpointError(f"{index_path}: field 'weight_map' is empty")
    return weight_map


class Checkpoint:
    """A folder (or a single file) with model.safetensors or a sharded model.safetensors.index.json."""

    def __init__(self, path: str | os.PathLike):
        path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        self.root = path if path.is_dir() else path.parent
        self.files: dict[str, SafetensorsFile] = {}
        self.tensor_file: dict[str, str] = {}
        if path.is_file():
            shards = [path.name]
        elif (path / "model.safetensors.index.json").exists():
            index_path = path / "model.safetensors.index.json"
            weight_map = read_index(index_path)
            missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
            if missing:
                raise CheckpointError(f"{index_path}: shard(s) named in the index are missing: {missing}")
            shards = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").exists():
            shards = ["model.safetensors"]
        else:
            found = sorted(p.name for p in path.glob("*.safetensors"))
            if not found:
                raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors")
            shards = found
        for shard in shards:
            f = SafetensorsFile(self.root / shard)
            self.files[shard] = f
            for name in f.keys():
                if name in self.tensor_file:
                    raise CheckpointError(f"{self.root / shard}: tensor {name!r} also appears in "
                                          f"{self.tensor_file[name]}")
                self.tensor_file[name] = shard

    def keys(self) -> list[str]:
        return list(self.tensor_file)

    def __contains__(self, name: str) -> bool:
        return name in self.tensor_file

    def file_of(self, name: str) -> Path:
        return self.root / self.tensor_file[name]

    def info(self, name: str):
        return self.files[self.tensor_file[name]].info(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensor_file:
            raise CheckpointError(f"{self.root}: tensor {name!r} is missing from the checkpoint")
        return self.files[self.tensor_file[name]].get(name)

    def release(self, name: str, index: int | None = None) -> None:
        """Drops one tensor's pages (or those of entry `index` of its leading dim) from resident memory (see
        SafetensorsFile.release)."""
        if name in self.tensor_file:
            self.files[self.tensor_file[name]].release(name, index)

    def nbytes_of(self, name: str) -> int:
        return self.files[self.tensor_file[name]].nbytes_of(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.tensor_file:
            yield name, self.get(name)

    def nbytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files.values())

    def close(self):
        for f in self.files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_sharded(tensors, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> None:
    """Writes (name, array) pairs as model.safetensors, or as numbered shards plus model.safetensors.index.json when
    they exceed max_shard_bytes. Arrays are numpy (bfloat16 via ml_dtypes) or torch tensors, not mixed."""
    path = Path(path)
    shards: list[dict] = [{}]
    size = 0
    is_torch = False
    for name, a in tensors:
        is_torch = type(a).__module__.startswith("torch")
        nbytes = a.numel() * a.element_size() if is_torch else a.nbytes
        if max_shard_bytes and size + nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = a.contiguous() if is_torch else np.ascontiguousarray(a)
        size += nbytes
    if is_torch:
        from safetensors.torch import save_file
    else:
        from safetensors.numpy import save_file
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                  indent=1))


def first_nonfinite(a: np.ndarray) -> int | None:
    """Flat index of the first NaN / ±Inf of a float array (bf16 via ml_dtypes), or None. One float64 reduction
    (≈1 GB/s here; finite 16/32-bit values cannot overflow a float64 sum), then a search only if it is non-finite."""
    if a.dtype.kind != "f" and a.dtype != np.dtype(ml_dtypes.bfloat16):
        return None
    flat = np.asarray(a).reshape(-1)
    if np.isfinite(np.add.reduce(flat, dtype=np.float64)):
        return None
    step = 1 << 22
    for i in range(0, flat.size, step):
        bad = np.flatnonzero(~np.isfinite(flat[i:i + step].astype(np.float32)))
        if bad.size:
            return i + int(bad[0])
    return None


def require_finite(a: np.ndarray, where: str, error=CheckpointError) -> None:
    """Raises `error` ("<where>: NaN/Inf at index (i, j)") if `a` holds a non-finite value."""
    i = first_nonfinite(a)
    if i is not None:
        value = float(np.asarray(a).reshape(-1)[i].astype(np.float32))
        raise error(f"{where}: non-finite value {value} at index {tuple(int(x) for x in np.unravel_index(i, a.shape))}"
                    f" (a corrupted or diverged checkpoint; every tensor must be finite)")
