"""Block-scaled FP8 weights (the DeepSeek-V3 / transformers "fine-grained FP8" storage), dequantised while
the checkpoint streams.

A quantised Linear weight `X.weight` is stored as float8 e4m3 `[out, in]` next to `X.weight_scale_inv`, a
float32 grid `[ceil(out / bo), ceil(in / bi)]` for blocks of `bo x bi` (`quantization_config.
weight_block_size`, 128 x 128 for DeepSeek-V3): the real weight is `fp8 * scale_inv` of its block, the
blocks at the right and bottom edges being partial. Everything else (norms, embeddings, the router, its
bias) is stored unquantised and passes through untouched.

DeepSeek-V4 hub checkpoints (docs/deepseek.md §9) name the scale `X.scale` and store it as UE8M0
(`float8_e8m0fnu`, the value `2^(byte - 127)`; `quantization_config.scale_fmt = "ue8m0"`). Their routed
experts are FP4 e2m1 (`expert_dtype = "fp4"`): two values per byte, the low nibble first, in an int8 / uint8
`[out, in / 2]` tensor with a UE8M0 scale per 1 x 32 block of the unpacked `[out, in]` weight.

`dequantize_stream` pairs each weight with its scale in whichever order they arrive (keys of one shard
are sorted, but a pair may straddle shards; a memory-mapped tensor waits without being read) and yields
the float32 weight under the weight's key; the scale key is consumed. A float8 or packed-FP4 weight without
a scale, a scale without its weight, or a scale grid of the wrong shape (for FP4: a packing that does not
match its scales) is a `FormatError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from converters.errors import FormatError

SCALE_SUFFIX = "_scale_inv"  # `X.weight` -> `X.weight_scale_inv`
V4_SCALE_SUFFIX = ".scale"  # `X.weight` -> `X.scale` (DeepSeek-V4 hub layout, UE8M0 scales)
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
UE8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
FP4_DTYPES = (np.dtype(np.int8), np.dtype(np.uint8))  # two e2m1 values per byte
FP4_BLOCK = (1, 32)
FP4_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
DEFAULT_BLOCK = (128, 128)
SCALE_FORMATS = (None, "ue8m0")
EXPERT_DTYPES = (None, "fp4", "fp8", "bf16")


def weight_key_of_scale(key: str, array: np.ndarray | None = None) -> str | None:
    """The weight a scale tensor belongs to, or None if `key` is no scale: `X.weight_scale_inv` (any dtype) or,
    stored as UE8M0, `X.scale` (a float `X.scale` is an ordinary parameter, e.g. transformers' `attn_hc.scale`)."""
    if key.endswith(SCALE_SUFFIX):
        return key[: -len(SCALE_SUFFIX)]
    if key.endswith(V4_SCALE_SUFFIX) and array is not None and array.dtype == UE8M0:
        return key[: -len(V4_SCALE_SUFFIX)] + ".weight"
    return None


def is_packed_fp4(key: str, array: np.ndarray) -> bool:
    """An int8 / uint8 `...weight` tensor: a packed FP4 weight (integer tables such as `tid2eid` are not weights)."""
    return array.dtype in FP4_DTYPES and key.endswith(".weight")


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """float32 `[..., 2 n]` from e2m1 pairs `[..., n]` (int8 or uint8 bytes, the low nibble first)."""
    u8 = np.asarray(packed).view(np.uint8)
    out = np.stack([FP4_E2M1[u8 & 0xF], FP4_E2M1[u8 >> 4]], axis=-1)
    return out.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantize_fp4(weight: np.ndarray, scale: np.ndarray, key: str = "weight") -> np.ndarray:
    """float32 `[out, in]` of a packed `[out, in / 2]` FP4 weight times its 1 x 32 block scales `[out, in / 32]`."""
    if weight.ndim != 2:
        raise FormatError(f"FP4 tensor {key!r} has shape {weight.shape}; it must be a 2-D [out, in / 2] packed weight")
    out, half = weight.shape
    grid = scale_grid((out, 2 * half), FP4_BLOCK)
    if tuple(scale.shape) != grid:
        raise FormatError(
            f"FP4 weight {key!r} is packed as {tuple(weight.shape)} (two e2m1 values per byte, so [{out}, {2 * half}] "
            f"unpacked) but its scale has shape {tuple(scale.shape)}, expected {grid} for 1x32 blocks: the packing "
            "does not match the scales (re-export the experts as [out, in / 2] bytes with [out, in / 32] scales)"
        )
    return dequantize(unpack_fp4(weight), scale, FP4_BLOCK, key)


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
    if q.get("scale_fmt") not in SCALE_FORMATS:
        raise FormatError(f"{where}: quantization_config.scale_fmt={q.get('scale_fmt')!r} is not supported "
                          f"(supported: {[f for f in SCALE_FORMATS if f]} or none)")
    expert = q.get("expert_dtype", (config or {}).get("expert_dtype"))
    if expert not in EXPERT_DTYPES:
        raise FormatError(f"{where}: expert_dtype={expert!r} is not supported (supported: {[e for e in EXPERT_DTYPES if e]})")
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
    scale_names: dict[str, str] = {}  # weight key -> the scale key seen (for messages)

    def deq(key, weight, scale):
        if is_packed_fp4(key, weight):
            return dequantize_fp4(weight, scale, key)
        return dequantize(weight, scale, block, key)

    for key, array, file in tensors:
        weight_key = weight_key_of_scale(key, array)
        quantized = array.dtype in FP8_DTYPES or is_packed_fp4(key, array)
        if read_block is not None and (weight_key or quantized) and not skip(weight_key or key):
            block, read_block = read_block(), None
        if weight_key is not None:
            if skip(weight_key):
                continue
            if block is None:
                raise FormatError(f"{file}: tensor {key!r} is a block scale but config.json declares no quantization_config")
            scale_names[weight_key] = key
            if weight_key in weights:
                w, w_file = weights.pop(weight_key)
                yield weight_key, deq(weight_key, w, array), w_file
            else:
                scales[weight_key] = (array, file)
            continue
        if skip(key):
            continue
        if not quantized:
            yield key, array, file
            continue
        if block is None:
            what = "packed FP4 (int8 pairs)" if is_packed_fp4(key, array) else str(array.dtype)
            raise FormatError(f"{file}: tensor {key!r} is stored as {what} but config.json declares no quantization_config")
        if key in scales:
            s, _ = scales.pop(key)
            yield key, deq(key, array, s), file
        else:
            weights[key] = (array, file)
    if weights:
        names = sorted(weights)
        v4 = any(k.endswith(V4_SCALE_SUFFIX) for k in scale_names.values())
        wanted = [k[: -len(".weight")] + V4_SCALE_SUFFIX if v4 and k.endswith(".weight") else k + SCALE_SUFFIX
                  for k in names[:8]]
        raise FormatError(
            f"checkpoint is missing FP8 scale(s) {wanted} for weight(s) stored as float8 or packed FP4 "
            f"(in {weights[names[0]][1]})"
        )
    if scales:
        names = sorted(scales)
        raise FormatError(f"checkpoint has block scale(s) {[scale_names[k] for k in names[:8]]} without their weights")
