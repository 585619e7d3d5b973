"""Verification of a drafted block: exact speculative rejection sampling, per row.

Draft token `x_i` (i = 1..n) is accepted when `u_i * p_d[i-1, x_i] < p_t[i-1, x_i]`, i.e. with probability
`min(1, q / p)` without the reference's 1e-8 floor on `p`, and `u_i` is a full-precision uniform, so tiny
probabilities keep their exact odds (docs/algorithm.md §5.2); `a` is the length of the accepted prefix. If a
rejection happened (`a < n`) the next token is drawn from the residual `max(0, p_t[a] - p_d[a])` (the target row
itself if the residual is exactly zero), otherwise a bonus token is drawn from `p_t[n]`, both with the exact
sampler (`sampling.sample`). With one-hot (greedy) distributions this reduces to "accept while equal to the
target argmax, then emit the target argmax". A stop token among the accepted drafts ends the row there: `a`
is cut to include it and no next token is emitted (docs/algorithm.md §5.3).

A deterministic proposer (prompt lookup) passes no draft distributions: its drafts are one-hot, so the
acceptance ratio is the target's probability of the draft and the residual is the target row without it.

With the coupled sampler (docs/algorithm.md §3.6) the target's own token at each of the `K + 1` positions is
its Gumbel-max draw with that position's noise (`sampling.coupled`), the token plain decoding would draw there;
a draft is accepted iff it equals the target's token, and the target's token after the accepted prefix is the
correction or bonus. The draft distributions are not read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.engine import sampling


def is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """`tokens [B, ...]` in each row's stop set `stop_ids [B, NS]` (padded with -1)."""
    stops = stop_ids.reshape(stop_ids.shape[:1] + (1,) * (tokens.ndim - 1) + stop_ids.shape[1:])
    return jnp.any((tokens[..., None] == stops) & (stops >= 0), axis=-1)


def verify(
    drafts: jax.Array,
    p_draft: jax.Array | None,
    p_target: jax.Array,
    num_proposed: jax.Array,
    stop_ids: jax.Array,
    row_keys: jax.Array,
    lengths: jax.Array,
    greedy: jax.Array | bool = False,
    sampler: str = "rejection",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> (accepted `a [B]`, next token `[B]`, terminated by a stop token `[B]`).

    `drafts [B, K]` were sampled from `p_draft [B, K, V]` (None: one-hot at the drafts); `p_target [B, K + 1, V]` is the target's
    distribution after the anchor and each draft; only the first `num_proposed [B]` drafts count.
    Randomness: acceptance uniforms and the residual draw are keyed by the row and its position.
    `greedy` (scalar): every row's distributions are one-hot, so acceptance needs no uniforms (`u p < q` with
    `p = 1`, `q` in {0, 1} holds for every `u` in (0, 1) exactly when `q = 1`) and the next token is the
    one-hot position; the result is the same, with less work.
    """
    B, K = drafts.shape
    if sampler == "coupled":
        return _verify_coupled(drafts, p_target, num_proposed, stop_ids, row_keys, lengths, greedy)
    idx = drafts[..., None]
    q = jnp.take_along_axis(p_target[:, :K], idx, axis=-1)[..., 0]
    p = 1.0 if p_draft is None else jnp.take_along_axis(p_draft, idx, axis=-1)[..., 0]
    # full-precision uniforms: P(u < r) = r exactly, however small the ratio (docs/algorithm.md §3.5); `u p < q`
    # is `u < min(1, q / p)` for the p > 0 of a drawn draft, with no floor on p (§5.2)
    u = jax.lax.cond(jnp.asarray(greedy), lambda k: jnp.full((B, K), 0.5, jnp.float32),
                     lambda k: sampling.uniforms(sampling.step_keys(k, sampling.SALT_ACCEPT, lengths), K), row_keys)
    ok = (u * p < q) & (jnp.arange(K)[None, :] < num_proposed[:, None])
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)

    accepted, terminated = _cut_at_stop(drafts, accepted, stop_ids)

    rows = jnp.arange(B)
    target_row = p_target[rows, accepted]
    at = jnp.minimum(accepted, K - 1)
    if p_draft is None:
        draft_row = jax.nn.one_hot(drafts[rows, at], p_target.shape[-1], dtype=p_target.dtype)
    else:
        draft_row = p_draft[rows, at]
    residual = jnp.maximum(target_row - draft_row, 0.0)
    # `sample` takes unnormalised rows; the target row stands in only for a residual that is exactly zero (§5.4)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, target_row)
    rejected = accepted < num_proposed
    next_probs = jnp.where(rejected[:, None], residual, target_row)
    keys = sampling.step_keys(row_keys, sampling.SALT_RESIDUAL, lengths + accepted + 1)
    return accepted, sampling.draw(keys, next_probs, jnp.asarray(greedy)), terminated


def _cut_at_stop(drafts, accepted, stop_ids):
    """A stop token among the accepted drafts ends the row there. -> (accepted, terminated)."""
    stop_hit = is_stop(drafts, stop_ids) & (jnp.arange(drafts.shape[1])[None, :] < accepted[:, None])
    terminated = jnp.any(stop_hit, axis=1)
    return jnp.where(terminated, jnp.argmax(stop_hit, axis=1) + 1, accepted), terminated


def _verify_coupled(drafts, p_target, num_proposed, stop_ids, row_keys, lengths, greedy):
    """`verify` under the coupled sampler: row `i` of `p_target` is the position `lengths + i + 1`, drawn with
    that position's noise whatever was drafted there."""
    B, K = drafts.shape
    positions = lengths[:, None] + 1 + jnp.arange(K + 1)[None, :]
    target_tokens = jax.lax.cond(
        jnp.asarray(greedy), lambda p: jnp.argmax(p, axis=-1).astype(jnp.int32),
        lambda p: sampling.coupled(p, row_keys, positions), p_target,
    )
    ok = (drafts == target_tokens[:, :K]) & (jnp.arange(K)[None, :] < num_proposed[:, None])
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    accepted, terminated = _cut_at_stop(drafts, accepted, stop_ids)
    return accepted, target_tokens[jnp.arange(B), accepted], terminated
