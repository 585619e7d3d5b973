"""Grouped-query attention over several key/value parts with one joint softmax.

A query block attends to (a) what a cache already holds and (b) the block's own fresh keys; passing them as
separate parts avoids copying the cache and lets a ring buffer be written after attending (prefill longer
than the ring). Masks are boolean `[B, T, S_part]`; a masked score gets a large finite negative value so a
row with nothing visible stays finite (callers that need exact zeros there zero those rows).

Attention costs what is used, not what is allocated (docs/caches.md §10): a part longer than `EXTENT_BLOCK`
keys (a cache of `capacity` slots) is streamed in key blocks of `block_size(S)` positions with an online
softmax, a loop whose trip count is the used extent (the last key any query of the rows sees), so nothing
past it is read. On XLA:CPU, consecutive rows are attended in at most `ROW_GROUPS` groups, each streamed to its own
extent, so a long row makes only its group long. The loop reads the cache where it lies (arrays or
`kv_cache.Stacked` layer views, sliced block by block), with no branch that receives the whole cache: XLA
(on TPU too) then never copies a cache to run attention (tests/test_aot.py).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from dspark_jax import sharding
from dspark_jax.layers.kv_cache import SEQ, read, take

MASKED = -1e30
EXTENT_BLOCK = 256  # parts longer than this are streamed to their used extent, in blocks of at least this size
MAX_BLOCKS = 16  # ... and of at most this many blocks on XLA:CPU (longer parts take larger blocks: fewer loop trips)
# ... and this many elsewhere: a loop trip costs XLA:TPU microseconds whatever it reads, so fewer, larger blocks win
# there (the Qwen3-8B AR step at 4096 positions: 43% -> 53% of roofline at batch 8, docs/tpu.md §6)
MAX_BLOCKS_OFF_CPU = 4

Part = tuple  # (k, v, mask [B, T, S]): cached k [B, G, S, H] and v [B, G, S, H'] (cache layout, arrays or
# `kv_cache.Stacked` layers); the block's own k [B, T, G, H] and v [B, T, G, H'] (token-major, as projected)

ROW_GROUPS = 8  # a batch's rows are attended in at most this many groups, each read to its own extent
GROUP_ROWS = 8  # ... of at most this many rows; larger batches are read as one group


_FULL_EXTENT: contextvars.ContextVar[bool] = contextvars.ContextVar("attention_full_extent", default=False)


@contextlib.contextmanager
def full_extent():
    """Inside this block every part is read whole, in one softmax: no loop with a traced trip count, so the
    forward is reverse-differentiable (training, whose sequences use every key anyway)."""
    token = _FULL_EXTENT.set(True)
    try:
        yield
    finally:
        _FULL_EXTENT.reset(token)


def block_size(S: int, max_blocks: int | None = None) -> int:
    """Key block streamed per loop trip for a part of `S` keys: `EXTENT_BLOCK * 2**i`, at most `max_blocks` trips
    (default: `MAX_BLOCKS` on XLA:CPU, `MAX_BLOCKS_OFF_CPU` for the platform being compiled for otherwise)."""
    if max_blocks is None:
        max_blocks = MAX_BLOCKS if sharding.platform() == "cpu" else MAX_BLOCKS_OFF_CPU
    size = EXTENT_BLOCK
    while size * max_blocks < S:
        size *= 2
    return size


def attention(q: jax.Array, cached: Sequence[Part], own: Part, scale: float) -> jax.Array:
    """`q [B, T, N, H]` against earlier parts `cached` (caches, injected context) and the block's own keys
    `own`, all in one softmax -> `[B, T, N, H']`.

    Query head n uses KV head n // (N // G). Scores and softmax statistics in fp32, probabilities cast to the
    value dtype for the value product (fp32 accumulation). Cached parts longer than `EXTENT_BLOCK` are read only
    up to their used extent (module docstring); the block's own keys are always all used.
    """
    limit = float("inf") if _FULL_EXTENT.get() else EXTENT_BLOCK
    long = [p for p in cached if p[0].shape[SEQ] > limit]
    short = [p for p in cached if p[0].shape[SEQ] <= limit]
    if not long:
        return _stream(None, q, [(read(k), read(v), m) for k, v, m in short], [], [], own, scale)
    # per row and long part: one past the last key the row's queries see
    used = [jnp.max(jnp.where(jnp.any(m, axis=1), jnp.arange(1, k.shape[SEQ] + 1), 0), axis=1).astype(jnp.int32)
            for k, _, m in long]
    B = q.shape[0]
    width = -(-B // ROW_GROUPS)
    if B == 1 or width > GROUP_ROWS or sharding.batch_is_split() or sharding.platform() != "cpu":
        return _stream(None, q, short, long, used, own, scale)
    # XLA:CPU: consecutive rows attended `width` at a time, each group streamed to its own extent, so a long row
    # makes only its group long. Elsewhere one stream reads every row: for several loops over slices of the rows,
    # XLA:TPU re-lays out (copies) the whole stacked cache (docs/caches.md §10)
    outs = [_stream(slice(r, min(r + width, B)), q, short, long, used, own, scale) for r in range(0, B, width)]
    return jnp.concatenate(outs, axis=0)


def _scores(qg: jax.Array, k: jax.Array, mask: jax.Array, scale: float, *, cached: bool) -> jax.Array:
    """Masked fp32 scores `[B, G, n, T, S]` of grouped queries `qg [B, T, G, n, H]` against keys `k` (a cache's
    `[B, G, S, H]`, or a block's own `[B, S, G, H]`)."""
    keys = "bgsh" if cached else "bsgh"
    s = jnp.einsum(f"btgnh,{keys}->bgnts", qg, k, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None, :, :], s, MASKED)


def _values(p: jax.Array, v: jax.Array, *, cached: bool) -> jax.Array:
    values = "bgsh" if cached else "bsgh"
    return jnp.einsum(f"bgnts,{values}->bgnth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _stream(rows, q, short, long, used, own, scale):
    """Attention for batch rows `rows` (a static `slice`; None: every row): the short parts and the block's own
    keys in one softmax, then each long part streamed block by block up to the rows' extent, folded in with the
    online-softmax rescaling (running max `m`, sum `l`, weighted values `acc`)."""
    qr = take(q, rows)
    b, T, N, H = qr.shape
    G = own[0].shape[2]
    qg = qr.reshape(b, T, G, N // G, H)
    direct = [(take(k, rows), take(v, rows), take(m, rows), True) for k, v, m in short]
    direct.append((*(take(x, rows) for x in own), False))
    s = jnp.concatenate([_scores(qg, k, m, scale, cached=c) for k, _, m, c in direct], axis=-1)
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    l = jnp.sum(p, axis=-1)
    acc, offset = None, 0
    for k, v, _, c in direct:
        width = k.shape[SEQ] if c else k.shape[1]
        o = _values(p[..., offset : offset + width], v, cached=c)
        offset += width
        acc = o if acc is None else acc + o
    for (k, v, mask), u in zip(long, used):
        S = k.shape[SEQ]
        C = block_size(S)
        extent = jnp.max(take(u, rows))
        trips = (extent + C - 1) // C

        def fold(c, state, k=k, v=v, mask=mask, S=S, C=C):
            m, l, acc = state
            start = jnp.minimum(c * C, S - C)  # the last block ends at S; keys before c * C were folded in already
            fresh = (start + jnp.arange(C) >= c * C)[None, None, :]
            visible = take(mask, rows, C, axis=2, start=start) & fresh
            s = _scores(qg, take(k, rows, C, axis=SEQ, start=start), visible, scale, cached=True)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            rescale = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            acc = acc * rescale[..., None] + _values(p, take(v, rows, C, axis=SEQ, start=start), cached=True)
            return m_new, l * rescale + jnp.sum(p, axis=-1), acc

        # the scope names the part's size and block: `aot.estimate_cycles` reads the loop's trip count for a given
        # used extent from it (docs/tpu.md §3)
        with jax.named_scope(f"key_blocks_S{S}_C{C}"):
            m, l, acc = jax.lax.fori_loop(0, trips, fold, (m, l, acc))
    out = acc / l[..., None]  # [b, G, n, T, H']
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, T, N, out.shape[-1]).astype(q.dtype)
