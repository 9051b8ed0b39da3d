"""Streaming, memory-mapped reading of (sharded) safetensors checkpoints, one tensor at a time.

Only the tensor asked for is touched: the file is memory-mapped and each tensor is a zero-copy numpy view until
the caller converts it. bfloat16 is read through ml_dtypes. Every error names the file and the tensor.
"""

from __future__ import annotations

import json
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


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be read; the message names the file and tensor."""


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly and validated, data memory-mapped lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: corrupted or truncated safetensors header "
                                      f"(header length {n}, file size {size})")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupted safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupted safetensors header (not an object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._data_size = size - self._data_start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except KeyError as e:
                raise CheckpointError(f"{self.path}: tensor {name!r} has an unsupported or missing header field "
                                      f"{e}") from None
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry ({e})") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if end - begin != nbytes or begin < 0 or end > self._data_size:
                raise CheckpointError(f"{self.path}: tensor {name!r} data range [{begin}, {end}) does not fit its "
                                      f"shape {shape} {np.dtype(dtype).name} or the file (truncated?)")
            self.entries[name] = (np.dtype(dtype), shape, begin, end)
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


class Checkpoint:
    """A folder (or a single file) with model.safetensors or a sharded model.safetensors.index.json."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.root = path if path.is_dir() else path.parent
        self.files: dict[str, SafetensorsFile] = {}
        self.tensor_file: dict[str, str] = {}
        if path.is_file():
            shards = [path.name]
        elif (path / "model.safetensors.index.json").exists():
            index_path = path / "model.safetensors.index.json"
            try:
                index = json.loads(index_path.read_text())
                weight_map = index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
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
