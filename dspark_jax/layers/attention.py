"""Grouped-query attention over several key/value parts with one joint softmax.

A query block attends to (a) what a cache already holds and (b) the block's own fresh keys; passing them as
separate parts avoids copying the cache and lets a ring buffer be written after attending (prefill longer
than the ring). Masks are boolean `[B, T, S_part]`; a masked score gets a large finite negative value so a
row with nothing visible stays finite (callers that need exact zeros there zero those rows).

Attention costs what is used, not what is allocated: a part longer than `EXTENT_BLOCK` keys (a cache of
`capacity` slots) is read, for each row, only up to the last key that row's queries see, rounded up to a size
of the ladder `EXTENT_BLOCK * 2**i`. Rows are sorted by that size and attended in at most `ROW_GROUPS`
groups, each at its own size (`lax.switch` over the sizes; docs/caches.md §10), so a long row makes only its
group long. Keys past that point are masked for every query of the group, so dropping them leaves the softmax
unchanged. Cached parts may be arrays or `kv_cache.Stacked` layer views, which copy only what is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from dspark_jax.layers.kv_cache import read, take

MASKED = -1e30
EXTENT_BLOCK = 256  # parts longer than this are read up to their used extent (the smallest ladder size)


def extent_sizes(S: int) -> tuple[int, ...]:
    """The sizes a part of `S` keys may be cut to: `EXTENT_BLOCK * 2**i` below `S`, then `S`."""
    sizes, e = [], EXTENT_BLOCK
    while e < S:
        sizes.append(e)
        e *= 2
    return (*sizes, S)


Part = tuple  # (k [B, S, G, H], v [B, S, G, H'], mask [B, T, S]); k and v arrays or `kv_cache.Stacked` layers


ROW_GROUPS = 8  # a batch's rows are attended in at most this many groups, each read to its own extent
GROUP_ROWS = 8  # ... of at most this many rows (copied one by one); larger batches are read as one group


def attention(q: jax.Array, cached: Sequence[Part], own: Part, scale: float) -> jax.Array:
    """`q [B, T, N, H]` against earlier parts `cached` (caches, injected context) and the block's own keys
    `own`, all in one softmax -> `[B, T, N, H']`.

    Query head n uses KV head n // (N // G). Scores and softmax in fp32, probabilities cast to the value
    dtype for the value product (fp32 accumulation). Cached parts longer than `EXTENT_BLOCK` are read only up
    to their used extent (module docstring); the block's own keys are always all used.
    """
    longest = max((k.shape[1] for k, _, _ in cached), default=0)
    if longest <= EXTENT_BLOCK:
        return _attend(q, [(read(k), read(v), m) for k, v, m in cached] + [own], scale)
    sizes = extent_sizes(longest)
    # per row: the ladder step that holds every cached part's last key the row's queries see
    need = jnp.zeros(q.shape[:1], jnp.int32)
    for k, _, mask in cached:
        if k.shape[1] > EXTENT_BLOCK:
            used = jnp.max(jnp.where(jnp.any(mask, axis=1), jnp.arange(1, k.shape[1] + 1), 0), axis=1)
            need = jnp.maximum(need, jnp.searchsorted(jnp.asarray(sizes), used).astype(jnp.int32))
    B = q.shape[0]
    width = -(-B // ROW_GROUPS)
    if B == 1 or width > GROUP_ROWS:
        return _cut_to(sizes, jnp.max(need), None, q, cached, own, scale)
    # rows sorted by their extent, then attended `width` at a time: a long row makes only its own group long
    order = jnp.argsort(need).astype(jnp.int32)
    groups = -(-B // width)

    def group(g, out):
        rows = order[jnp.minimum(g * width + jnp.arange(width), B - 1)]  # the last group may repeat a row
        o = _cut_to(sizes, jnp.max(need[rows]), rows, q, cached, own, scale)
        for i in range(width):
            out = jax.lax.dynamic_update_index_in_dim(out, o[i], rows[i], 0)
        return out

    out = jnp.zeros(q.shape[:3] + own[1].shape[-1:], q.dtype)
    return jax.lax.fori_loop(0, groups, group, out)


def _cut_to(sizes, need, rows, q, cached, own, scale):
    """Attention for batch rows `rows` (a static number of them; None: every row), every cached part read to
    `sizes[need]` positions."""

    def cut(size: int):
        def branch(rows, q, cached, own):
            kept = [(take(k, rows, size), take(v, rows, size), take(m, rows, size, axis=2)) for k, v, m in cached]
            mine = tuple(take(x, rows) for x in own)
            return _attend(take(q, rows), [*kept, mine], scale)

        return branch

    return jax.lax.switch(need, [cut(size) for size in sizes], rows, q, list(cached), own)


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
