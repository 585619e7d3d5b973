"""The training forward of a DSpark draft: every anchor's block in one pass (docs/algorithm.md §6.4, Appendix A.2).

Keys/values are `[context: S rows from C = hidden_norm(fc(F)) ; blocks: N * K rows]`; block `m` sees the
context strictly before its anchor (`j < A_m`, exactly the context an inference round with `start = A_m`
has) and all `K` slots of its own block, nothing of other blocks. Every training block therefore computes
what `DSparkDraft.block_hidden` computes at inference for that anchor. The pieces are the draft's own
(`project_context`, its backbone's `context_kv` and `block_hidden`), so the two cannot drift.

Dummy blocks see nothing (fully masked rows). The attention gives such rows finite values (masked scores
are a large finite negative), the loss gives them zero weight, and their final hidden states are set to
exact zeros with `where`, so no non-finite value can reach the loss or the gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.layers import kv_cache as kv
from dspark_jax.layers.attention import full_extent


def block_hidden_train(draft, features: jax.Array, block_ids: jax.Array, positions: jax.Array, keep: jax.Array,
                       *, remat: bool = False) -> jax.Array:
    """Final-normed block hidden states `[B, N, K, D]`.

    `features [B, S, n_t * D]` (target features of every position of the padded sequences),
    `block_ids`/`positions` `[B, N, K]` (from `anchors.block_targets`), `keep [B, N]`. `remat` recomputes
    each layer's activations in the backward pass instead of storing them (`jax.checkpoint` over the scan body).
    """
    B, N, K = block_ids.shape
    S = features.shape[1]
    context = draft.project_context(features)  # [B, S, D]
    context_kv = kv.cache_layout(
        draft.backbone.context_kv(context, jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :], (B, S))))
    anchor = jnp.repeat(positions[:, :, 0], K, axis=1)  # [B, N*K] anchor position of each query's block
    kept = jnp.repeat(keep, K, axis=1)  # [B, N*K]
    context_mask = (jnp.arange(S)[None, None, :] < anchor[:, :, None]) & kept[:, :, None]  # [B, N*K, S]
    block_of = jnp.arange(N * K) // K
    block_mask = (block_of[None, :, None] == block_of[None, None, :]) & kept[:, :, None]  # [B, N*K, N*K]
    with full_extent():  # differentiable: every context key read in one softmax
        hidden = draft.backbone.block_hidden(block_ids.reshape(B, N * K), positions.reshape(B, N * K), context_kv,
                                             context_mask, block_mask, remat=remat)
    hidden = jnp.where(kept[:, :, None], hidden, jnp.zeros((), hidden.dtype))
    return hidden.reshape(B, N, K, -1)
