"""Streaming safetensors reading (no torch) and writing, plus the torch `.bin` fallback.

The reader parses the header itself and memory-maps each tensor, so a checkpoint is read one tensor at a
time, every dtype the format defines is handled (bf16 and fp8 via ml_dtypes), and a truncated or corrupt
file fails with a `CheckpointError` naming the file instead of crashing later.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from converters.errors import FormatError as CheckpointError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One `.safetensors` file: `keys()`, `shape(key)`, and `get(key)` -> a read-only numpy view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"cannot open checkpoint file {self.path}: {e}") from e
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{self.path} is not a safetensors file (only {size} bytes); re-download or re-save it")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > MAX_HEADER or 8 + header_len > size:
            raise CheckpointError(
                f"{self.path} has a corrupt or truncated safetensors header (declares {header_len} bytes, file has "
                f"{size}); re-download or re-save it"
            )
        try:
            header = json.loads(self._file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path} has an unreadable safetensors header: {e}") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        for key, entry in header.items():
            dtype = entry.get("dtype")
            if dtype not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {dtype!r}")
            start, end = entry["data_offsets"]
            expected = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            if end - start != expected:
                raise CheckpointError(f"{self.path}: tensor {key!r} spans {end - start} bytes, its shape needs {expected}")
            if end > data_size:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {key!r} ends at byte {self._data_start + end} but the file has "
                    f"{size} bytes; re-download or re-save it"
                )
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype_name(self, key: str) -> str:
        """The tensor's safetensors dtype name ("BF16", "F8_E4M3", ...)."""
        return self._entries[key]["dtype"]

    def get(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        arr = np.frombuffer(self._map, dtype=dtype, count=(end - start) // dtype.itemsize, offset=self._data_start + start)
        return arr.reshape(entry["shape"])

    def release(self) -> None:
        """Drop this file's pages from the process's resident memory (they stay in the OS page cache): a loader
        that read a tensor through `get` calls it once the data is copied, so mapped pages do not pile up."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self):
        if self._map is not None:
            self._map.close()
        self._file.close()


class CheckpointIndex:
    """Every tensor of a safetensors checkpoint directory by key, headers read and files memory-mapped, no tensor
    data read: `get(key)` is a lazy view, so a slice of it reads only the bytes the slice covers. For loaders
    that read only part of each tensor (a process of a multi-host job reads its devices' shards)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        files = checkpoint_files(self.directory)
        bins = [f for f in files if f.suffix == ".bin"]
        if bins:
            raise CheckpointError(f"{bins[0]} is a PyTorch .bin file; slices can only be read from safetensors")
        self.files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for st in self.files:
            for key in st.keys():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} appears twice: in {self._where[key].path} and {st.path}")
                self._where[key] = st

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key].path

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype_name(self, key: str) -> str:
        return self._where[key].dtype_name(key)

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def release(self) -> None:
        for st in self.files:
            st.release()

    def close(self) -> None:
        for st in self.files:
            st.close()


def iter_checkpoint(directory: str | os.PathLike) -> Iterator[tuple[str, np.ndarray, Path]]:
    """Yield `(key, array, file)` for every tensor of an HF checkpoint directory, one at a time.

    Reads `model.safetensors`, or the shards listed in `model.safetensors.index.json`, or (only when no
    safetensors exist) `pytorch_model.bin` / its index via `torch.load(weights_only=True)`.
    A key present in two shards is reported as a duplicate.
    """
    directory = Path(directory)
    files = checkpoint_files(directory)
    seen: dict[str, Path] = {}
    for path in files:
        if path.suffix == ".bin":
            tensors = _load_torch_bin(path)
            items = ((k, tensors[k]) for k in tensors)
        else:
            st = SafetensorsFile(path)
            items = ((k, st.get(k)) for k in st.keys())
        for key, arr in items:
            if key in seen:
                raise CheckpointError(f"tensor {key!r} appears twice: in {seen[key]} and {path}")
            seen[key] = path
            yield key, arr, path


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in shard order."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid checkpoint index (needs a 'weight_map'): {e}") from e
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (directory / n).exists()]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) {missing} that are not in {directory}")
            return [directory / n for n in names]
        if (directory / single).exists():
            return [directory / single]
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json, or pytorch_model.bin"
    )


def _load_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path} is a PyTorch .bin checkpoint and torch is not installed; install torch or convert it to safetensors"
        ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (and others) for anything but plain tensors
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor state dict ({type(e).__name__}: {e}). "
            "Only weights_only loading is allowed; convert it to safetensors from a trusted source"
        ) from e
    out = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu()
        out[key] = t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
    return out


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays (bf16/fp8 included) as one safetensors file."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if arr.dtype not in NAMES:
            raise ValueError(f"tensor {key!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[key] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
