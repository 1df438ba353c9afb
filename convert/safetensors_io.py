"""Strict, streaming safetensors reading (header validated up front, tensors memory-mapped one at a time)
and atomic writing. No torch.

File layout: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data region; offsets are relative to the data region.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors.numpy

DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or tensor we refuse to load; the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int
    file: Path


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses and validates a safetensors header. Returns (tensors by name, metadata)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file: header of {n} bytes "
                                  f"but the file has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", {}) or {}
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r}: malformed header entry {entry!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if e - b != nbytes or b < 0:
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets [{b}, {e}) hold {e - b} bytes but "
                                  f"{dtype}{list(shape)} needs {nbytes}")
        if data_start + e > size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                                  f"{data_start + e} but the file has {size} bytes")
        out[name] = TensorInfo(name, dtype, shape, data_start + b, data_start + e, path)
    return out, metadata


class Reader:
    """Memory-maps one file; `get(info)` returns a read-only numpy view (no copy until you transform it)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else None

    def get(self, info: TensorInfo) -> np.ndarray:
        buf = memoryview(self._map)[info.begin:info.end] if self._map is not None else b""
        return np.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)

    def close(self):
        if self._map is not None:
            self._map.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_file(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes atomically: a temporary file renamed into place, so a crash never leaves half a checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                                metadata=metadata or {"format": "pt"})
    os.replace(tmp, path)
