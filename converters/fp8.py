"""Block-scaled FP8 weights (the DeepSeek-V3 / transformers "fine-grained FP8" storage), dequantised while
the checkpoint streams.

A quantised Linear weight `X.weight` is stored as float8 e4m3 `[out, in]` next to `X.weight_scale_inv`, a
float32 grid `[ceil(out / bo), ceil(in / bi)]` for blocks of `bo x bi` (`quantization_config.
weight_block_size`, 128 x 128 for DeepSeek-V3): the real weight is `fp8 * scale_inv` of its block, the
blocks at the right and bottom edges being partial. Everything else (norms, embeddings, the router, its
bias) is stored unquantised and passes through untouched.

`dequantize_stream` pairs each weight with its scale in whichever order they arrive (keys of one shard
are sorted, but a pair may straddle shards; a memory-mapped tensor waits without being read) and yields
the float32 weight under the weight's key; the scale key is consumed. A float8 weight without a scale, a
scale without its weight, or a scale grid of the wrong shape is a `FormatError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from converters.errors import FormatError

SCALE_SUFFIX = "_scale_inv"  # `X.weight` -> `X.weight_scale_inv`
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
DEFAULT_BLOCK = (128, 128)


def block_size(config: dict | None, where: str = "config.json") -> tuple[int, int] | None:
    """The FP8 block of a checkpoint's `config.json` (`quantization_config`), None when it declares none.

    Only the block-scaled FP8 method is understood; another declared method is refused by name, since its
    tensors would otherwise be read as plain weights."""
    q = (config or {}).get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise FormatError(f"{where}: quantization_config.quant_method={method!r} is not supported (only block-scaled 'fp8')")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise FormatError(f"{where}: quantization_config.fmt={fmt!r} is not supported (only 'e4m3')")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise FormatError(f"{where}: quantization_config.activation_scheme={q.get('activation_scheme')!r} is not supported (only 'dynamic')")
    block = q.get("weight_block_size") or DEFAULT_BLOCK
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise FormatError(f"{where}: quantization_config.weight_block_size={block!r} must be two positive integers")
    return int(block[0]), int(block[1])


def block_size_of(directory: str | Path) -> Callable[[], tuple[int, int] | None]:
    """`block_size` of the `config.json` in `directory` (None without one), read when first needed: a
    checkpoint without FP8 tensors loads whatever its config declares."""

    def read():
        path = Path(directory) / "config.json"
        if not path.exists():
            return None
        try:
            return block_size(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as e:
            raise FormatError(f"{path} is not valid JSON: {e}") from e

    return read


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    out, inp = shape
    return -(-out // block[0]), -(-inp // block[1])


def dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], key: str = "weight") -> np.ndarray:
    """float32 `weight * scale_inv` per `block` (partial blocks at the edges)."""
    if weight.ndim != 2:
        raise FormatError(f"FP8 tensor {key!r} has shape {weight.shape}; block scales need a 2-D [out, in] weight")
    grid = scale_grid(weight.shape, block)
    if tuple(scale_inv.shape) != grid:
        raise FormatError(
            f"scale {key + SCALE_SUFFIX!r} has shape {tuple(scale_inv.shape)}, expected {grid} for weight shape "
            f"{tuple(weight.shape)} in {block[0]}x{block[1]} blocks"
        )
    scale = np.asarray(scale_inv, np.float32)
    full = np.repeat(np.repeat(scale, block[0], axis=0), block[1], axis=1)[: weight.shape[0], : weight.shape[1]]
    return np.asarray(weight).astype(np.float32) * full


def dequantize_stream(
    tensors: Iterable[tuple[str, np.ndarray, Path]],
    block: tuple[int, int] | None | Callable[[], tuple[int, int] | None],
    skip: Callable[[str], bool] = lambda key: False,
) -> Iterator[tuple[str, np.ndarray, Path]]:
    """Pass `(key, array, file)` tensors through, dequantising FP8 weights with their scales (see module doc).

    `skip(key)` drops a tensor (and the scale of a dropped weight) before anything is read or dequantised.
    `block` (or a function giving it, called at the first FP8 tensor) None means the checkpoint declares no
    quantisation: a float8 tensor or a scale is then an error.
    """
    weights: dict[str, tuple[np.ndarray, Path]] = {}
    scales: dict[str, tuple[np.ndarray, Path]] = {}
    if callable(block):
        read_block = block
        block = None
    else:
        read_block = None
    for key, array, file in tensors:
        if read_block is not None and (key.endswith(SCALE_SUFFIX) or array.dtype in FP8_DTYPES) and not skip(
            key.removesuffix(SCALE_SUFFIX)
        ):
            block, read_block = read_block(), None
        if key.endswith(SCALE_SUFFIX):
            weight_key = key[: -len(SCALE_SUFFIX)]
            if skip(weight_key):
                continue
            if block is None:
                raise FormatError(f"{file}: tensor {key!r} is an FP8 block scale but config.json declares no quantization_config")
            if weight_key in weights:
                w, w_file = weights.pop(weight_key)
                yield weight_key, dequantize(w, array, block, weight_key), w_file
            else:
                scales[weight_key] = (array, file)
            continue
        if skip(key):
            continue
        if array.dtype not in FP8_DTYPES:
            yield key, array, file
            continue
        if block is None:
            raise FormatError(f"{file}: tensor {key!r} is stored as {array.dtype} but config.json declares no quantization_config")
        if key in scales:
            s, _ = scales.pop(key)
            yield key, dequantize(array, s, block, key), file
        else:
            weights[key] = (array, file)
    if weights:
        names = sorted(weights)
        raise FormatError(
            f"checkpoint is missing FP8 scale(s) {[k + SCALE_SUFFIX for k in names[:8]]} for weight(s) stored as float8 "
            f"(in {weights[names[0]][1]})"
        )
    if scales:
        names = sorted(scales)
        raise FormatError(f"checkpoint has FP8 scale(s) {[k + SCALE_SUFFIX for k in names[:8]]} without their weights")
