"""KV cache pieces: stacked per-layer caches, a block written at per-row offsets, masks from positions.

A layer's cache is `[B, S, G, H]`. Slot `s` holds the latest position `p < lengths` with `p = s (mod S)`,
so one formula serves linear caches (`S` >= every length: slot s holds position s) and ring buffers for
sliding-window layers (`S` >= window + K). "Write ahead, commit by length" (docs/caches.md): a block is
written at each row's `lengths`; only `lengths` decides what is committed, so rejected slots are simply
overwritten later.

A model's cache mirrors its layer stacks (`layers.stack.Group`): one `LayerKV` per pattern position of each
group, its arrays stacked `[n, B, S, G, H]` over the group's repetitions, so the scan over layers slices the
cache with the parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax import sharding

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
ACTIVATION_AXES = ("batch", None, "embed")  # the residual stream [B, T, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    """Keys `[n, B, S, G, Hk]` and values `[n, B, S, G, Hv]` of one stacked pattern position."""

    k: jax.Array
    v: jax.Array


Cache = tuple[tuple[LayerKV, ...], ...]  # per group, per pattern position


def allocate(batch: int, shapes, dtype) -> Cache:
    """Zeros for `shapes[group][position] = (n, slots, kv_heads, key_dim, value_dim)`, placed by `CACHE_AXES`
    (rows over the data axis, KV heads over the model axis) when a mesh is active."""
    return constrain(tuple(
        tuple(
            LayerKV(k=jnp.zeros((n, batch, s, g, hk), dtype), v=jnp.zeros((n, batch, s, g, hv), dtype))
            for n, s, g, hk, hv in group
        )
        for group in shapes
    ))


def constrain(cache: Cache) -> Cache:
    """Every cache array pinned to `CACHE_AXES` on the active mesh (no-op without one)."""
    return jax.tree.map(lambda a: sharding.constrain(a, CACHE_AXES), cache)


def slot_positions(lengths: jax.Array, num_slots: int) -> jax.Array:
    """Position held by each slot `[B, S]` once `lengths [B]` tokens are committed; negative = empty."""
    s = jnp.arange(num_slots, dtype=jnp.int32)[None, :]
    last = lengths[:, None] - 1
    return s + num_slots * jnp.floor_divide(last - s, num_slots)


def cached_mask(q_pos: jax.Array, lengths: jax.Array, num_slots: int, window: int | None = None) -> jax.Array:
    """Which committed slots each query sees, `[B, T, S]`: causal, and within `window` if given."""
    p = slot_positions(lengths, num_slots)[:, None, :]
    visible = (p >= 0) & (p <= q_pos[:, :, None])
    if window is not None:
        visible &= q_pos[:, :, None] - p < window
    return visible


def block_mask(batch: int, T: int, *, causal: bool, window: int | None = None) -> jax.Array:
    """Visibility inside a fresh block `[B, T, T]` (causal for targets, full for the draft block)."""
    t = jnp.arange(T)
    visible = t[None, :] <= t[:, None] if causal else jnp.ones((T, T), bool)
    if window is not None:
        visible &= t[:, None] - t[None, :] < window
    return jnp.broadcast_to(visible, (batch, T, T))


def write(layer: jax.Array, block: jax.Array, lengths: jax.Array, num_valid: jax.Array | None = None) -> jax.Array:
    """Write `block [B, T, G, H]` at positions `lengths[b] + t` into `layer [B, S, G, H]`.

    A linear cache (`num_valid` None) takes a per-row dynamic slice update; the caller guarantees
    `lengths + T <= S`. A ring buffer passes `num_valid [B]` (tokens of the block that are real): each
    slot takes the latest valid block token mapping to it, so a block longer than the ring (a prefill)
    keeps exactly its tail and padding never overwrites live entries.
    """
    if num_valid is None:
        return jax.vmap(lambda c, u, o: jax.lax.dynamic_update_slice_in_dim(c, u, o, axis=0))(layer, block, lengths)
    S = layer.shape[1]
    new_positions = slot_positions(lengths + num_valid, S)  # [B, S]
    fresh = new_positions >= lengths[:, None]
    t = jnp.clip(new_positions - lengths[:, None], 0, block.shape[1] - 1)
    gathered = jnp.take_along_axis(block, t[:, :, None, None], axis=1)
    return jnp.where(fresh[:, :, None, None], gathered, layer)
