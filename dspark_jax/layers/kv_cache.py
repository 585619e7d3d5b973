"""KV cache pieces: stacked per-layer caches, a block written at per-row offsets, masks from positions.

A layer's cache is heads-major, `[B, G, S, H]` (positions next to the head dim, so a TPU tiles each head's
cache as `(S, H)`: attention reads it as it lies and writes land in place, docs/caches.md §10); blocks written
into it are token-major `[B, T, G, H]`, as projections make them. Slot `s` holds the latest position
`p < lengths` with `p = s (mod S)`, so one formula serves linear caches (`S` >= every length: slot s holds
position s) and ring buffers for sliding-window layers (`S` >= window + K). "Write ahead, commit by length"
(docs/caches.md): a block is written at each row's `lengths`; only `lengths` decides what is committed, so
rejected slots are simply overwritten later.

A model's cache mirrors its layer stacks (`layers.stack.Group`): one `LayerKV` per pattern position of each
group, its arrays stacked `[n, B, G, S, H]` over the group's repetitions. The scan over layers carries the
stacked arrays and gives layer `r` a `Stacked` view of them: it reads what it needs and `write_layer` writes
its block in place (docs/caches.md §10).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax import sharding

CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")
SEQ = 2  # the positions axis of a layer's cache `[B, G, S, H]`
ACTIVATION_AXES = ("batch", None, "embed")  # the residual stream [B, T, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    """Keys `[n, B, G, S, Hk]` and values `[n, B, G, S, Hv]` of one stacked pattern position."""

    k: jax.Array
    v: jax.Array


Cache = tuple[tuple[LayerKV, ...], ...]  # per group, per pattern position


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stacked:
    """Layer `index` of a stacked array `[n, B, G, S, H]`, read where it lies (docs/caches.md §10).

    A layer scan carries (or closes over) the whole stacked cache and hands each layer this view instead of
    a slice: reading a prefix of `size` positions copies that prefix only, and `write_layer` stores a block
    into the stacked array in place, so a forward moves what it reads and writes, never the capacity."""

    array: jax.Array
    index: jax.Array | int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape[1:]


def take(x: jax.Array | Stacked, rows: slice | None = None, size: int | None = None, axis: int = 1,
         start: jax.Array | int = 0) -> jax.Array:
    """Batch rows `rows` (a static `slice` of consecutive rows; all rows when None) of `x` (`[B, ...]`, or a
    `Stacked` layer), cut to `size` entries along `axis` (positions) from `start` (all by default), copying only
    those. The caller keeps `start + size` within the axis (a dynamic slice would otherwise shift its start)."""
    array, lead = (x.array, (x.index,)) if isinstance(x, Stacked) else (x, ())
    shape = list(array.shape[len(lead):])
    starts = [0] * len(shape)
    if size is not None:
        shape[axis] = min(size, shape[axis])
        starts[axis] = start
    if rows is not None:
        first, stop, _ = rows.indices(shape[0])
        starts[0], shape[0] = first, stop - first
    if not lead and tuple(shape) == x.shape:
        return x
    return jax.lax.dynamic_slice(array, lead + tuple(starts), [1] * len(lead) + shape).reshape(shape)


def cache_layout(blocks):
    """Token-major blocks (`[..., B, T, G, H]` leaves, e.g. a backbone's `context_kv`) in the cache layout
    `[..., B, G, T, H]`, to be read as cached parts without writing them into a cache first (training)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, -3, -2), blocks)


def read(x: jax.Array | Stacked, size: int | None = None) -> jax.Array:
    """A cache part's first `size` positions (all by default), whether an array `[B, G, S, H]` or a `Stacked`."""
    return take(x, None, size, axis=SEQ)


def write_layer(layer: Stacked, block: jax.Array, lengths: jax.Array, num_valid: jax.Array | None = None, *,
                after: jax.Array | None = None) -> jax.Array:
    """`write` into layer `layer.index` of the stacked array: the new stacked array. A linear cache takes the
    block at each row's `lengths` in place (a scatter of the block's positions); a ring buffer (`num_valid`
    given, docs/caches.md §5) is small and is rewritten whole."""
    array = layer.array
    if after is not None:
        dep = after.reshape(after.shape[0], -1)[:, :1].astype(jnp.float32)
        block = (block.astype(jnp.float32) + (dep - dep).reshape((-1,) + (1,) * (block.ndim - 1))).astype(block.dtype)
    if num_valid is not None:
        new = write(read(layer), block, lengths, num_valid)
        return jax.lax.dynamic_update_index_in_dim(array, new, layer.index, 0)
    return _scatter(array, block, lengths, layer.index)


def _scatter(array: jax.Array, block: jax.Array, lengths: jax.Array, index=None) -> jax.Array:
    """`block [B, T, G, H]` stored at positions `lengths[b] + t` of `array [B, G, S, H]` (of its layer `index` when
    stacked), in place: one `H` row per (row, head, token), the unit a heads-major cache holds contiguously."""
    B, T, G = block.shape[:3]
    rows = jnp.arange(B, dtype=jnp.int32)[:, None, None]
    heads = jnp.arange(G, dtype=jnp.int32)[None, :, None]
    positions = (lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :])[:, None, :]
    where = (rows, heads, positions) if index is None else (index, rows, heads, positions)
    return array.at[where].set(jnp.swapaxes(block, 1, 2).astype(array.dtype), mode="drop")


def allocate(batch: int, shapes, dtype) -> Cache:
    """Zeros for `shapes[group][position] = (n, slots, kv_heads, key_dim, value_dim)`, heads-major
    (`[n, B, G, S, H]`), placed by `CACHE_AXES` (rows over the data axis, KV heads over the model axis) when a
    mesh is active."""
    return constrain(tuple(
        tuple(
            LayerKV(k=jnp.zeros((n, batch, g, s, hk), dtype), v=jnp.zeros((n, batch, g, s, hv), dtype))
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


def write_rows(array: jax.Array, block: jax.Array, lengths: jax.Array) -> jax.Array:
    """Per-position state that is not a KV cache (`array [B, S, ...]`, e.g. stored hidden states): `block [B, T,
    ...]` at positions `lengths[b] + t` (the caller keeps them below `S`)."""
    return jax.vmap(lambda c, u, o: jax.lax.dynamic_update_slice_in_dim(c, u, o, axis=0))(array, block, lengths)


def write(layer: jax.Array, block: jax.Array, lengths: jax.Array, num_valid: jax.Array | None = None) -> jax.Array:
    """Write `block [B, T, G, H]` at positions `lengths[b] + t` into `layer [B, G, S, H]`.

    A linear cache (`num_valid` None) takes the block in place; the caller guarantees `lengths + T <= S`. A ring
    buffer passes `num_valid [B]` (tokens of the block that are real): each slot takes the latest valid block
    token mapping to it, so a block longer than the ring (a prefill) keeps exactly its tail and padding never
    overwrites live entries.
    """
    if num_valid is None:
        return _scatter(layer, block, lengths)
    S = layer.shape[SEQ]
    new_positions = slot_positions(lengths + num_valid, S)  # [B, S]
    fresh = new_positions >= lengths[:, None]
    t = jnp.clip(new_positions - lengths[:, None], 0, block.shape[1] - 1)
    gathered = jnp.swapaxes(jnp.take_along_axis(block, t[:, :, None, None], axis=1), 1, 2)  # [B, G, S, H]
    return jnp.where(fresh[:, None, :, None], gathered.astype(layer.dtype), layer)
