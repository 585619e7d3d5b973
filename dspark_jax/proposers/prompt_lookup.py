"""Prompt lookup: a model-free proposer that drafts by copying from the row's own context.

The last `n` tokens of a row (its committed tokens and the anchor) are looked up earlier in the same row,
for `n = max_ngram` down to `min_ngram`; the most recent earlier occurrence of the longest suffix that has
one gives the draft: the tokens that followed it, as many as the context holds (at most `K`). A row with no
match proposes nothing that round (the round is then a plain target step). The draft is a deterministic
function of the context, so its distribution is one-hot and the engine's rejection sampling keeps the
output exactly the target's (greedy: token for token). State: the row's tokens by position, written ahead
and committed by length like every cache (docs/caches.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.config import SamplingParams
from dspark_jax.engine.contracts import Proposal
from dspark_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class PromptLookupConfig:
    draft_length: int = 7
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        for name in ("draft_length", "max_ngram", "min_ngram"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"prompt_lookup {name}={value!r} must be an integer >= 1")
        if self.min_ngram > self.max_ngram:
            raise ConfigError(f"prompt_lookup min_ngram={self.min_ngram} must be <= max_ngram={self.max_ngram}")


class PromptLookup(nnx.Module):
    """The n-gram proposer (no parameters). Implements `engine.contracts.Proposer`."""

    def __init__(self, cfg: PromptLookupConfig):
        self.config = cfg
        self.max_draft_length = cfg.draft_length
        self.feature_indices = ()
        self.has_confidence = False

    def check_target(self, target_config) -> None:
        del target_config  # any target: drafts are the target's own tokens

    def init_state(self, batch: int, capacity: int) -> jax.Array:
        return jnp.zeros((batch, capacity), jnp.int32)

    def extend(self, state: jax.Array, tokens: jax.Array, features, lengths: jax.Array) -> jax.Array:
        del features
        return jax.vmap(lambda row, new, at: jax.lax.dynamic_update_slice_in_dim(row, new, at, axis=0))(state, tokens, lengths)

    def propose(self, state: jax.Array, anchor, lengths, params: SamplingParams, keys, K: int) -> Proposal:
        del params, keys
        B, C = state.shape
        rows = jnp.arange(B)
        seq = state.at[rows, lengths].set(anchor, mode="drop")  # context: positions [0, lengths]
        end = lengths + 1  # tokens known per row
        starts = jnp.arange(C)[None, :]
        found = jnp.zeros((B,), bool)
        begin = jnp.zeros((B,), jnp.int32)  # position of the first drafted token in `seq`
        for n in range(self.config.max_ngram, self.config.min_ngram - 1, -1):
            match = (starts + n < end[:, None]) & (end[:, None] >= n)  # an earlier occurrence, not the suffix itself
            for d in range(n):
                suffix = jnp.take_along_axis(seq, jnp.clip(end - n + d, 0, C - 1)[:, None], axis=1)
                window = jnp.take(seq, jnp.clip(starts + d, 0, C - 1)[0], axis=1)
                match &= window == suffix
            latest = jnp.max(jnp.where(match, starts, -1), axis=1)
            take = ~found & (latest >= 0)
            begin = jnp.where(take, latest + n, begin)
            found |= take
        idx = jnp.clip(begin[:, None] + jnp.arange(K)[None, :], 0, C - 1)
        tokens = jnp.take_along_axis(seq, idx, axis=1)
        num = jnp.where(found, jnp.clip(end - begin, 0, K), 0).astype(jnp.int32)
        return Proposal(tokens, None, num, None)


def prompt_lookup(draft_length: int = 7, max_ngram: int = 3, min_ngram: int = 1):
    """A prompt-lookup (n-gram) proposer, usable wherever a loaded draft is (`generate`, `stream`, batch jobs)."""
    from dspark_jax.handles import Draft

    cfg = PromptLookupConfig(draft_length=draft_length, max_ngram=max_ngram, min_ngram=min_ngram)
    return Draft.of_module(PromptLookup(cfg), cfg, jnp.float32)
