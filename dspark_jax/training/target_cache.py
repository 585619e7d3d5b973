"""The target cache: what a draft trains on, computed once by running the target (docs/algorithm.md §6.2 layout).

On-disk format (a directory; the reference's manifest version 2, so caches are interchangeable):

* `manifest.json`: `version` 2, `num_samples`, `num_shards`, `target_layer_ids`, `hidden_size`,
  `hidden_dtype` ("bfloat16" or "float32"), `token_dtype` "int32", `mask_dtype` "uint8",
  `index_record_size` 56, `shards` [{shard_id, file_name}], plus provenance (`target_model_name_or_path`,
  `source_jsonl_paths`, `max_length`, `min_loss_tokens`, `chat_template`, `vocab_size`, `num_target_layers`).
* `samples.idx`: one 56-byte little-endian record per sample, `struct "<QIIQQQQQ"`:
  `sample_id, shard_id, seq_len, input_ids_off, attention_mask_off, loss_mask_off, hidden_off, last_hidden_off`
  (byte offsets into the shard; record `i` has `sample_id == i`).
* `shard-NNNNN.bin`: per sample, contiguous: `input_ids int32[L]`, `attention_mask uint8[L]` (all ones),
  `loss_mask uint8[L]`, `target_hidden_states [L, n_t * D]` (the raw residual streams after the layers in
  `target_layer_ids`, concatenated in that order; id -1 = embedding output), `target_last_hidden_states [L, D]`
  (the final-normed hidden state: target logits = lm_head of row t predict token t + 1). Row-major, no padding.
* `progress.json` (while building / after): `records_consumed`, `num_samples`, byte sizes of the index and
  every shard at the last flush. A restarted build truncates to those sizes and continues after
  `records_consumed` input records, so an interrupted build resumes without duplicates.

Reading is by memory map: `TargetCache(dir)[i]` returns numpy views without loading the whole cache.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

from dspark_jax import compiling
from dspark_jax.errors import CheckpointError, ConfigError

VERSION = 2
RECORD = struct.Struct("<QIIQQQQQ")
MANIFEST = "manifest.json"
INDEX = "samples.idx"
PROGRESS = "progress.json"
HIDDEN_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


@dataclasses.dataclass(frozen=True)
class Sample:
    input_ids: np.ndarray  # int32[L]
    loss_mask: np.ndarray  # uint8[L]
    features: np.ndarray  # [L, n_t * D]
    last_hidden: np.ndarray  # [L, D]

    def __len__(self) -> int:
        return len(self.input_ids)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class CacheWriter:
    """Appends samples to shards + index; `flush(records_consumed)` makes everything so far durable."""

    def __init__(self, directory, *, target_layer_ids, hidden_size: int, hidden_dtype: str = "bfloat16",
                 shard_bytes: int = 1 << 30, metadata: dict | None = None):
        if hidden_dtype not in HIDDEN_DTYPES:
            raise ConfigError(f"hidden_dtype {hidden_dtype!r} is not supported; use one of {list(HIDDEN_DTYPES)}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.layer_ids = [int(i) for i in target_layer_ids]
        self.hidden_size = int(hidden_size)
        self.hidden_dtype = hidden_dtype
        self.np_dtype = np.dtype(HIDDEN_DTYPES[hidden_dtype])
        self.shard_bytes = shard_bytes
        self.metadata = dict(metadata or {})
        self.records_consumed = 0
        self.num_samples = 0
        shard_sizes = [0]
        progress = self.dir / PROGRESS
        if progress.exists():  # resume: drop anything written after the last flush
            p = json.loads(progress.read_text())
            if p["target_layer_ids"] != self.layer_ids or p["hidden_size"] != self.hidden_size or p["hidden_dtype"] != hidden_dtype:
                raise CheckpointError(
                    f"{self.dir} holds a cache for other settings ({p['target_layer_ids']}, {p['hidden_size']}, "
                    f"{p['hidden_dtype']}); use a new output directory"
                )
            self.records_consumed, self.num_samples, shard_sizes = p["records_consumed"], p["num_samples"], p["shard_sizes"]
        with open(self.dir / INDEX, "ab") as f:
            f.truncate(self.num_samples * RECORD.size)
        for i, size in enumerate(shard_sizes):
            with open(self.dir / shard_name(i), "ab") as f:
                f.truncate(size)
        self.shard_sizes = list(shard_sizes)
        self.index = open(self.dir / INDEX, "ab")
        self.shard = open(self.dir / shard_name(len(self.shard_sizes) - 1), "ab")

    def append(self, input_ids: np.ndarray, loss_mask: np.ndarray, features: np.ndarray, last_hidden: np.ndarray) -> None:
        L = len(input_ids)
        F = len(self.layer_ids) * self.hidden_size
        if features.shape != (L, F) or last_hidden.shape != (L, self.hidden_size) or loss_mask.shape != (L,):
            raise ValueError(f"sample shapes {features.shape}, {last_hidden.shape}, {loss_mask.shape} do not match L={L}, F={F}")
        parts = [
            np.asarray(input_ids, np.int32),
            np.ones(L, np.uint8),
            np.asarray(loss_mask, np.uint8),
            np.asarray(features).astype(self.np_dtype),
            np.asarray(last_hidden).astype(self.np_dtype),
        ]
        size = sum(p.nbytes for p in parts)
        if self.shard_sizes[-1] > 0 and self.shard_sizes[-1] + size > self.shard_bytes:
            self.shard.close()
            self.shard_sizes.append(0)
            self.shard = open(self.dir / shard_name(len(self.shard_sizes) - 1), "ab")
        offsets, off = [], self.shard_sizes[-1]
        for p in parts:
            offsets.append(off)
            self.shard.write(np.ascontiguousarray(p).tobytes())
            off += p.nbytes
        self.shard_sizes[-1] = off
        self.index.write(RECORD.pack(self.num_samples, len(self.shard_sizes) - 1, L, *offsets))
        self.num_samples += 1

    def flush(self, records_consumed: int) -> None:
        self.records_consumed = records_consumed
        for f in (self.shard, self.index):
            f.flush()
            os.fsync(f.fileno())
        _write_json_atomic(self.dir / PROGRESS, {
            "records_consumed": records_consumed, "num_samples": self.num_samples, "shard_sizes": self.shard_sizes,
            "target_layer_ids": self.layer_ids, "hidden_size": self.hidden_size, "hidden_dtype": self.hidden_dtype,
        })
        self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = {
            "version": VERSION,
            "num_samples": self.num_samples,
            "num_shards": len(self.shard_sizes),
            "target_layer_ids": self.layer_ids,
            "hidden_dtype": self.hidden_dtype,
            "token_dtype": "int32",
            "mask_dtype": "uint8",
            "index_record_size": RECORD.size,
            "hidden_size": self.hidden_size,
            "shards": [{"shard_id": i, "file_name": shard_name(i)} for i in range(len(self.shard_sizes))],
            **self.metadata,
        }
        _write_json_atomic(self.dir / MANIFEST, manifest)

    def close(self, records_consumed: int) -> None:
        self.flush(records_consumed)
        self.shard.close()
        self.index.close()


class TargetCache:
    """Memory-mapped reader of a cache directory."""

    def __init__(self, directory):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.exists():
            raise CheckpointError(f"{self.dir} is not a target cache (no {MANIFEST}); build one with `dspark-jax build-cache`")
        self.manifest = json.loads(path.read_text())
        m = self.manifest
        if m.get("version") != VERSION or m.get("index_record_size") != RECORD.size:
            raise CheckpointError(f"{path}: unsupported cache version {m.get('version')} (expected {VERSION})")
        if m.get("hidden_dtype") not in HIDDEN_DTYPES:
            raise CheckpointError(f"{path}: hidden_dtype {m.get('hidden_dtype')!r} is not one of {list(HIDDEN_DTYPES)}")
        self.hidden_dtype = np.dtype(HIDDEN_DTYPES[m["hidden_dtype"]])
        self.layer_ids = tuple(int(i) for i in m["target_layer_ids"])
        self.hidden_size = int(m["hidden_size"])
        n = int(m["num_samples"])
        raw = np.fromfile(self.dir / INDEX, dtype=np.uint8)
        if raw.size < n * RECORD.size:
            raise CheckpointError(f"{self.dir / INDEX} holds {raw.size // RECORD.size} records, manifest says {n}")
        dt = np.dtype([("sample_id", "<u8"), ("shard_id", "<u4"), ("seq_len", "<u4"), ("ids", "<u8"), ("attn", "<u8"),
                       ("loss", "<u8"), ("hidden", "<u8"), ("last", "<u8")])
        self.index = raw[: n * RECORD.size].view(dt)
        if not np.array_equal(self.index["sample_id"], np.arange(n)):
            raise CheckpointError(f"{self.dir / INDEX}: record i must have sample_id i")
        self.shards = [np.memmap(self.dir / s["file_name"], dtype=np.uint8, mode="r") for s in m["shards"]]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> np.ndarray:
        return self.index["seq_len"].astype(np.int64)

    def __getitem__(self, i: int) -> Sample:
        r = self.index[i]
        shard, L = self.shards[int(r["shard_id"])], int(r["seq_len"])
        F = len(self.layer_ids) * self.hidden_size

        def view(off, dtype, shape):
            count = int(np.prod(shape))
            return np.frombuffer(shard, dtype=dtype, count=count, offset=int(off)).reshape(shape)

        return Sample(
            input_ids=view(r["ids"], np.int32, (L,)),
            loss_mask=view(r["loss"], np.uint8, (L,)),
            features=view(r["hidden"], self.hidden_dtype, (L, F)),
            last_hidden=view(r["last"], self.hidden_dtype, (L, self.hidden_size)),
        )

    def check_draft(self, draft_config) -> None:
        """The cache must hold the features this draft reads."""
        if tuple(draft_config.target_layer_ids) != self.layer_ids or draft_config.hidden_size != self.hidden_size:
            raise ConfigError(
                f"cache {self.dir} holds target layers {list(self.layer_ids)} with hidden size {self.hidden_size}, the draft "
                f"needs layers {list(draft_config.target_layer_ids)} with hidden size {draft_config.hidden_size}; rebuild the "
                "cache for this draft"
            )


@functools.partial(compiling.jit, static_argnames=("graphdef", "capture"))
def _target_features(graphdef, params, tokens, *, capture):
    """Features `[B, T, n_t * D]` at HF hidden-state indices `capture` and final-normed hidden `[B, T, D]`."""
    model = nnx.merge(graphdef, params)
    B, T = tokens.shape
    hidden, _, features = model(tokens, jnp.zeros((B,), jnp.int32), model.init_cache(B, T), capture=capture)
    return features, hidden


def build_cache(
    target,
    samples: Iterable[tuple[np.ndarray, np.ndarray] | None],
    out_dir,
    *,
    target_layer_ids,
    hidden_dtype: str = "bfloat16",
    min_loss_tokens: int = 14,
    batch_tokens: int = 8192,
    group: int = 256,
    min_length: int = 64,
    total: int | None = None,
    metadata: dict | None = None,
) -> TargetCache:
    """Run `target` over tokenised `samples` ((input_ids, loss_mask) per input record; None = skip) into `out_dir`.

    Records are read in groups of `group`; a group is sorted by length and run in right-padded batches of
    `batch_tokens // T` rows of length `T` (a power of two >= `min_length`: few shapes, few compilations),
    then written and flushed, so an interrupted build resumes at the group it was working on. Samples with fewer than `min_loss_tokens`
    supervised tokens are dropped (docs/algorithm.md §6.1).
    """
    L_t = target.config.num_layers
    for i in target_layer_ids:
        if not -1 <= i < L_t - 1:
            raise ConfigError(
                f"target_layer_ids {list(target_layer_ids)}: {i} is not an interior layer of this {L_t}-layer target "
                "(allowed: -1 for the embedding output, 0..L-2; the last layer is forbidden, docs/algorithm.md §2.1)"
            )
    capture = tuple(0 if i == -1 else i + 1 for i in target_layer_ids)
    meta = {"vocab_size": target.config.vocab_size, "num_target_layers": L_t, "min_loss_tokens": min_loss_tokens,
            **(metadata or {})}
    writer = CacheWriter(out_dir, target_layer_ids=target_layer_ids, hidden_size=target.config.hidden_size,
                         hidden_dtype=hidden_dtype, metadata=meta)
    skip = writer.records_consumed
    bar = tqdm(total=total, initial=skip, desc="target cache", unit="rec", dynamic_ncols=True)
    consumed = 0
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def bucket(n: int) -> int:
        return max(min_length, 1 << (n - 1).bit_length())

    def run_batch(batch):
        T = bucket(max(len(ids) for ids, _ in batch))
        tokens = np.zeros((max(1, batch_tokens // T), T), np.int32)
        for row, (ids, _) in enumerate(batch):
            tokens[row, : len(ids)] = ids
        features, hidden = _target_features(target.graphdef, target.params, jnp.asarray(tokens), capture=capture)
        features, hidden = np.asarray(features, np.float32), np.asarray(hidden, np.float32)
        for row, (ids, mask) in enumerate(batch):
            writer.append(ids, mask, features[row, : len(ids)], hidden[row, : len(ids)])

    def run_group():
        batch = []
        for sample in sorted(pending, key=lambda s: len(s[0])):  # ascending: the newest sample is the longest
            T = bucket(len(sample[0]))
            if batch and (bucket(len(batch[0][0])) != T or len(batch) >= max(1, batch_tokens // T)):
                run_batch(batch)
                batch = []
            batch.append(sample)
        if batch:
            run_batch(batch)

    for sample in samples:
        consumed += 1
        if consumed <= skip:
            continue
        if sample is not None and int(np.sum(sample[1])) >= min_loss_tokens and len(sample[0]) >= 2:
            pending.append(sample)
        if consumed % group == 0:
            run_group()
            writer.flush(consumed)
            pending.clear()
        bar.update(1)
    run_group()
    writer.close(consumed)
    bar.close()
    return TargetCache(out_dir)
