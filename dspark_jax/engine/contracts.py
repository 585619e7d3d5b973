"""The two contracts the engine is written against. The engine never reads past them: caches and proposer
state are opaque pytrees it passes back and forth.

`TargetModel` — a causal LM over an explicit cache (every family in `dspark_jax/models/` implements it):

* `init_cache(batch, capacity, max_block) -> cache`: room for `capacity` positions per row; `max_block`
  is the longest block that will be run on top of committed positions (sizes ring buffers).
* `__call__(tokens [B, T], lengths [B], cache, *, capture, num_valid) -> (hidden [B, T, D], cache, features)`:
  run a block at per-row offsets `lengths` (writing it ahead into the cache; what is committed is decided by
  `lengths` alone, docs/caches.md), with `num_valid [B]` real tokens per row, and return the hidden states
  at the requested HF `output_hidden_states` indices `capture`, concatenated (`[B, T, len(capture) * D]`).
* `logits(hidden) -> [..., V]` in fp32.

`Proposer` — whatever proposes draft tokens (`dspark_jax/proposers/`):

* `max_draft_length`: the largest `K` it can propose; `feature_indices`: the target hidden states it reads
  (HF indices, `()` for none); `has_confidence`: whether it produces confidence logits.
* `check_target(target_config)`: raise `ConfigError` if it cannot serve that target.
* `init_state(batch, capacity) -> state`: its context state, empty.
* `extend(state, tokens [B, T], features [B, T, F] | None, lengths [B]) -> state`: add verified context at
  positions `lengths + t` (written ahead; only positions below the engine's `lengths` count).
* `propose(state, anchor [B], lengths [B], sampling, keys, K) -> Proposal`: `K` draft tokens after each
  row's anchor (the last sampled token, at position `lengths`).

Both are pure: the engine calls them inside one compiled program.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax

from dspark_jax.config import SamplingParams


class Proposal(NamedTuple):
    tokens: jax.Array  # i32[B, K] draft tokens
    probs: jax.Array | None  # f32[B, K, V] the distributions they were sampled from; None = one-hot at `tokens`
    num_proposed: jax.Array  # i32[B] drafts sent to the target (a prefix of `tokens`)
    confidence_logits: jax.Array | None = None  # f32[B, K]


class TargetModel(Protocol):
    def init_cache(self, batch: int, capacity: int, max_block: int = 1) -> Any: ...

    def __call__(self, tokens, lengths, cache, *, capture: tuple[int, ...] = (), num_valid=None): ...

    def logits(self, hidden: jax.Array) -> jax.Array: ...


class Proposer(Protocol):
    max_draft_length: int
    feature_indices: tuple[int, ...]
    has_confidence: bool

    def check_target(self, target_config) -> None: ...

    def init_state(self, batch: int, capacity: int) -> Any: ...

    def extend(self, state, tokens: jax.Array, features: jax.Array | None, lengths: jax.Array) -> Any: ...

    def propose(self, state, anchor: jax.Array, lengths: jax.Array, sampling: SamplingParams, keys: jax.Array,
                K: int) -> Proposal: ...
