"""Anchor sampling and block supervision targets (docs/algorithm.md §6.3, §6.4).

Per sequence (length `S_b`, right-padded to `S`), `N` anchors are drawn uniformly without replacement
from the positions `i <= S_b - 2` with `loss_mask[i] = loss_mask[i + 1] = 1`, then sorted ascending; when
there are fewer candidates than `N`, the remaining slots are dummies (anchor 0, `keep` False).
Block `m` supervises, at slot `k = 0..K-1`, the token at `label = A_m + k + 1`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def sample_anchors(key: jax.Array, loss_mask: jax.Array, lengths: jax.Array, num_anchors: int) -> tuple[jax.Array, jax.Array]:
    """`loss_mask [B, S]`, `lengths [B]` -> (anchors i32[B, N] ascending, keep bool[B, N])."""
    B, S = loss_mask.shape
    pos = jnp.arange(S)[None, :]
    supervised = loss_mask.astype(bool)
    candidate = supervised & jnp.pad(supervised[:, 1:], ((0, 0), (0, 1))) & (pos <= lengths[:, None] - 2)
    # Uniform without replacement: the N largest of i.i.d. uniforms over the candidates.
    score = jnp.where(candidate, jax.random.uniform(key, (B, S)), -1.0)
    if num_anchors > S:
        score = jnp.pad(score, ((0, 0), (0, num_anchors - S)), constant_values=-1.0)
    top, idx = jax.lax.top_k(score, num_anchors)
    keep = top >= 0
    order = jnp.argsort(jnp.where(keep, idx, S + num_anchors), axis=-1)  # kept anchors ascending, dummies last
    anchors = jnp.where(keep, idx, 0)
    return jnp.take_along_axis(anchors, order, axis=-1).astype(jnp.int32), jnp.take_along_axis(keep, order, axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockTargets:
    """Supervision of `N` blocks of `K` slots per sequence (all `[B, N, K]`)."""

    block_ids: jax.Array  # i32 draft inputs: [token at A_m, MASK, ...]; all MASK for dummies
    positions: jax.Array  # i32 absolute positions A_m + k
    target_ids: jax.Array  # i32 the true token at A_m + k + 1 (clamped inside the sequence)
    prev_ids: jax.Array  # i32 teacher-forced previous token: token at A_m, then target_ids[k - 1]
    teacher_rows: jax.Array  # i32 row of the target's last hidden that predicts target_ids
    supervised: jax.Array  # bool cumulative: valid label, supervised, kept, and every earlier slot too


def block_targets(input_ids: jax.Array, loss_mask: jax.Array, lengths: jax.Array, anchors: jax.Array, keep: jax.Array,
                  block_size: int, mask_token_id: int) -> BlockTargets:
    """Labels, teacher rows and the cumulative supervision mask of every block (docs/algorithm.md §6.4)."""
    k = jnp.arange(block_size)
    labels = anchors[..., None] + k + 1  # [B, N, K]
    safe = jnp.where(keep[..., None], jnp.minimum(labels, lengths[:, None, None] - 1), 0)
    take = jax.vmap(lambda row, idx: row[idx])
    target_ids = take(input_ids, safe)
    ok = (labels < lengths[:, None, None]) & take(loss_mask, safe).astype(bool) & keep[..., None]
    supervised = jnp.cumprod(ok.astype(jnp.int32), axis=-1).astype(bool)
    anchor_ids = take(input_ids, anchors)  # [B, N]
    block_ids = jnp.where((k == 0) & keep[..., None], anchor_ids[..., None], mask_token_id)
    prev_ids = jnp.concatenate([anchor_ids[..., None], target_ids[..., :-1]], axis=-1)
    return BlockTargets(
        block_ids=block_ids.astype(jnp.int32),
        positions=(anchors[..., None] + k).astype(jnp.int32),
        target_ids=target_ids.astype(jnp.int32),
        prev_ids=prev_ids.astype(jnp.int32),
        teacher_rows=jnp.maximum(safe - 1, 0).astype(jnp.int32),
        supervised=supervised,
    )
