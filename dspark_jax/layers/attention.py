"""Grouped-query attention over several key/value parts with one joint softmax.

A query block attends to (a) what a cache already holds and (b) the block's own fresh keys; passing them as
separate parts avoids copying the cache and lets a ring buffer be written after attending (prefill longer
than the ring). Masks are boolean `[B, T, S_part]`; a masked score gets a large finite negative value so a
row with nothing visible stays finite (callers that need exact zeros there zero those rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

MASKED = -1e30


def attention(
    q: jax.Array,
    parts: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
    scale: float,
) -> jax.Array:
    """`q [B, T, N, H]` against parts `(k [B, S, G, H], v [B, S, G, H'], mask [B, T, S])` -> `[B, T, N, H']`.

    Query head n uses KV head n // (N // G). Scores and softmax in fp32, probabilities cast to the value
    dtype for the value product (fp32 accumulation).
    """
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
