"""Logits processing and sampling, per row and fully traced.

`probabilities` turns logits into the distribution a row samples from: greedy rows (temperature 0) get the
one-hot of the first argmax; others get temperature scaling, then top-k, then top-p (HF logits-warper
order and semantics; tokens tied with the last kept value are kept). The same function produces the draft
and the target distributions of speculative decoding, so the acceptance ratio always compares the two
distributions that are actually sampled from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.config import SamplingParams

# Fixed salts so each random role of a row draws an independent stream.
SALT_TOKEN = 1
SALT_DRAFT = 2
SALT_ACCEPT = 3
SALT_RESIDUAL = 4


def _per_row(x: jax.Array, ndim: int) -> jax.Array:
    return x.reshape(x.shape + (1,) * (ndim - 1))


def _filter(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask (to -inf) what top-k and then top-p remove from temperature-scaled logits `[B, ..., V]`."""
    V = scaled.shape[-1]
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    k = _per_row(jnp.where((top_k > 0) & (top_k < V), top_k, V), scaled.ndim)
    rank = jnp.arange(V)
    ordered = jnp.where(rank < k, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    top_p = _per_row(top_p, scaled.ndim)
    # rows without a nucleus filter keep everything, even tail tokens whose cumulative mass rounds to 1
    keep = ((mass_before < top_p) | (top_p >= 1)) & (rank < k)
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def probabilities(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """fp32 distribution `[B, ..., V]` from logits `[B, ..., V]` under each row's sampling settings."""
    logits = logits.astype(jnp.float32)
    nd = logits.ndim
    temperature = _per_row(params.temperature, nd)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    needs_filter = jnp.any(((params.top_k > 0) | (params.top_p < 1)) & (params.temperature > 0))
    scaled = jax.lax.cond(needs_filter, lambda s: _filter(s, params.top_k, params.top_p), lambda s: s, scaled)
    sampled = jax.nn.softmax(scaled, axis=-1)
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(greedy, one_hot, sampled)


def sample(keys: jax.Array, probs: jax.Array) -> jax.Array:
    """One token per row from (possibly unnormalised) `probs [B, V]` with per-row `keys [B]`.

    Inverse CDF with one uniform per row: the token is the first index whose cumulative mass exceeds
    `u * total`, which always has non-zero probability. One random number per row instead of `V` keeps
    sampling cheap at real vocabulary sizes.
    """
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k))(keys) * cdf[:, -1]
    return jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), probs.shape[-1] - 1).astype(jnp.int32)


def step_keys(row_keys: jax.Array, salt: int, step: jax.Array) -> jax.Array:
    """Per-row keys for one random role at a per-row step (usually the row's position)."""
    return jax.vmap(lambda k, s: jax.random.fold_in(jax.random.fold_in(k, salt), s))(row_keys, step)


def row_keys(seeds: jax.Array, rows: jax.Array) -> jax.Array:
    """Row `i`'s key derives from `(seed_i, row_i)` only, never from its batch mates."""
    return jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(seeds, rows)
