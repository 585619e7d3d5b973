"""Grouped-query attention over several key/value parts with one joint softmax.

A query block attends to (a) what a cache already holds and (b) the block's own fresh keys; passing them as
separate parts avoids copying the cache and lets a ring buffer be written after attending (prefill longer
than the ring). Masks are boolean `[B, T, S_part]`; a masked score gets a large finite negative value so a
row with nothing visible stays finite (callers that need exact zeros there zero those rows).

Attention costs what is used, not what is allocated: a part longer than `EXTENT_BLOCK` keys (a cache of
`capacity` slots) is read only up to its last key that some query sees, rounded up to a size of the ladder
`EXTENT_BLOCK * 2**i` (`lax.switch` over the sizes; docs/caches.md §10). A short prompt in a long-capacity
cache, or a batch whose rows are all short, pays for its own lengths. Keys past that point are masked for
every query, so dropping them leaves the softmax unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

MASKED = -1e30
EXTENT_BLOCK = 256  # parts longer than this are read up to their used extent (the smallest ladder size)


def extent_sizes(S: int) -> tuple[int, ...]:
    """The sizes a part of `S` keys may be cut to: `EXTENT_BLOCK * 2**i` below `S`, then `S`."""
    sizes, e = [], EXTENT_BLOCK
    while e < S:
        sizes.append(e)
        e *= 2
    return (*sizes, S)


Part = tuple[jax.Array, jax.Array, jax.Array]  # (k [B, S, G, H], v [B, S, G, H'], mask [B, T, S])


def attention(q: jax.Array, cached: Sequence[Part], own: Part, scale: float) -> jax.Array:
    """`q [B, T, N, H]` against earlier parts `cached` (caches, injected context) and the block's own keys
    `own`, all in one softmax -> `[B, T, N, H']`.

    Query head n uses KV head n // (N // G). Scores and softmax in fp32, probabilities cast to the value
    dtype for the value product (fp32 accumulation). Cached parts longer than `EXTENT_BLOCK` are cut to their
    used extent first (module docstring); the block's own keys are always all used.
    """
    longest = max((k.shape[1] for k, _, _ in cached), default=0)
    if longest <= EXTENT_BLOCK:
        return _attend(q, [*cached, own], scale)
    sizes = extent_sizes(longest)
    # the ladder step that holds every cached part's last visible key; one index for all parts
    need = 0
    for k, _, mask in cached:
        if k.shape[1] > EXTENT_BLOCK:
            used = jnp.max(jnp.where(jnp.any(mask, axis=(0, 1)), jnp.arange(1, k.shape[1] + 1), 0))
            need = jnp.maximum(need, jnp.searchsorted(jnp.asarray(sizes), used))

    def cut(size: int):
        def branch(q, cached, own):
            kept = [(k[:, :size], v[:, :size], m[..., :size]) if k.shape[1] > size else (k, v, m) for k, v, m in cached]
            return _attend(q, [*kept, own], scale)

        return branch

    return jax.lax.switch(need, [cut(size) for size in sizes], q, list(cached), own)


def _attend(q: jax.Array, parts, scale: float) -> jax.Array:
    B, T, N, H = q.shape
    G = parts[0][0].shape[2]
    qg = q.reshape(B, T, G, N // G, H)
    scores = []
    for k, _, mask in parts:
        s = jnp.einsum("btgnh,bsgh->bgnts", qg, k, preferred_element_type=jnp.float32) * scale
        scores.append(jnp.where(mask[:, None, None, :, :], s, MASKED))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out = None
    offset = 0
    for k, v, _ in parts:
        p = probs[..., offset : offset + k.shape[1]].astype(v.dtype)
        offset += k.shape[1]
        o = jnp.einsum("bgnts,bsgh->btgnh", p, v, preferred_element_type=jnp.float32)
        out = o if out is None else out + o
    return out.reshape(B, T, N, v.shape[-1]).astype(q.dtype)
