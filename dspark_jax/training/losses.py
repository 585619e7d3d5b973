"""DSpark / DFlash training losses (docs/algorithm.md §6.5), computed in vocabulary-sized chunks.

Per supervised slot `(m, k)` with corrected draft logits `Z` (base + teacher-forced Markov bias) and the
target's logits `Ut` (the frozen LM head on the cached final hidden state that predicts the same token):
  CE  = -log softmax(Z)[y]
  L1  = || softmax(Z) - softmax(Ut) ||_1            (full L1, i.e. twice the total variation)
  a*  = stop_gradient(clip(1 - L1 / 2, 0, 1))       (the soft acceptance label)
  BCE = BCEWithLogits(confidence logit, a*)         (trains the head, the backbone and W1; only a* is detached)
Weights `w = supervised * exp(-k / gamma)`; each term is `sum(w * term) / (sum(w) + 1e-6)` over the micro-batch;
the loss is `ce * CE + l1 * L1 + conf * BCE` (DSpark: 0.1, 0.9, 1.0; DFlash: 1.0, 0, no head).

Memory: the `[blocks, K, V]` logits exist one chunk of `chunk_blocks` blocks at a time; the chunk function
is rematerialised, so the backward pass recomputes a chunk's logits instead of keeping every chunk's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class LossWeights:
    ce: float = 0.1
    l1: float = 0.9
    conf: float = 1.0
    decay_gamma: float = 4.0


def position_weights(supervised: jax.Array, gamma: float) -> jax.Array:
    """`supervised [..., K] * exp(-k / gamma)` (no decay when gamma <= 0)."""
    K = supervised.shape[-1]
    decay = jnp.exp(-jnp.arange(K, dtype=jnp.float32) / gamma) if gamma and gamma > 0 else jnp.ones((K,), jnp.float32)
    return supervised.astype(jnp.float32) * decay


def slot_terms(draft_logits: jax.Array, target_logits: jax.Array, target_ids: jax.Array,
               confidence_logits: jax.Array | None) -> dict[str, jax.Array]:
    """Per-slot terms `[..., K]` from fp32 logits `[..., K, V]` (the reference formulas, nothing else)."""
    log_p_draft = jax.nn.log_softmax(draft_logits.astype(jnp.float32), axis=-1)
    p_target = jax.nn.softmax(target_logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(log_p_draft, target_ids[..., None], axis=-1)[..., 0]
    l1 = jnp.sum(jnp.abs(jnp.exp(log_p_draft) - p_target), axis=-1)
    accept = jax.lax.stop_gradient(jnp.clip(1.0 - 0.5 * l1, 0.0, 1.0))
    terms = {
        "ce": ce,
        "l1": l1,
        "accept": accept,
        "greedy_match": (jnp.argmax(draft_logits, axis=-1) == jnp.argmax(target_logits, axis=-1)).astype(jnp.float32),
    }
    if confidence_logits is not None:
        terms["conf"] = optax.sigmoid_binary_cross_entropy(confidence_logits, accept)
        terms["conf_error"] = jax.lax.stop_gradient(jnp.abs(jax.nn.sigmoid(confidence_logits) - accept))
    return terms


def _chunk_terms(draft, hidden, teacher_hidden, target_ids, prev_ids):
    """Terms for one chunk of blocks: `hidden/teacher_hidden [C, K, D]`, ids `[C, K]`."""
    logits = draft.base_logits(hidden)
    if draft.markov_head is not None:
        logits = logits + draft.markov_head.block_bias(prev_ids, hidden)
    conf = draft.confidence(hidden, prev_ids) if draft.confidence_head is not None else None
    return slot_terms(logits, draft.base_logits(teacher_hidden), target_ids, conf)


def block_terms(draft, hidden: jax.Array, teacher_hidden: jax.Array, target_ids: jax.Array, prev_ids: jax.Array,
                chunk_blocks: int) -> dict[str, jax.Array]:
    """Per-slot terms `[B, N, K]` for `hidden/teacher_hidden [B, N, K, D]`, computed `chunk_blocks` blocks at a time."""
    B, N, K, D = hidden.shape
    M = B * N
    C = max(1, min(chunk_blocks, M))
    pad = -M % C

    def chunks(x):
        x = x.reshape(M, *x.shape[2:])
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(-1, C, *x.shape[1:])

    body = jax.checkpoint(lambda xs: _chunk_terms(draft, *xs))
    out = jax.lax.map(body, tuple(chunks(x) for x in (hidden, teacher_hidden, target_ids, prev_ids)))
    return {name: v.reshape(-1, K)[:M].reshape(B, N, K) for name, v in out.items()}


def combine(terms: dict[str, jax.Array], supervised: jax.Array, weights: LossWeights) -> tuple[jax.Array, dict]:
    """The weighted loss and its parts (each `sum(w * term) / (sum(w) + 1e-6)`)."""
    w = position_weights(supervised, weights.decay_gamma)
    denom = jnp.sum(w) + EPS
    parts = {name: jnp.sum(w * terms[name]) / denom for name in ("ce", "l1", "conf") if name in terms}
    loss = weights.ce * parts["ce"]
    if weights.l1 > 0:
        loss = loss + weights.l1 * parts["l1"]
    if "conf" in parts and weights.conf > 0:
        loss = loss + weights.conf * parts["conf"]
    return loss, parts


def block_statistics(terms: dict[str, jax.Array], supervised: jax.Array) -> dict[str, jax.Array]:
    """Sums (and counts) for acceptance metrics, to be added over batches and divided at the end.

    `accept_sum[k]` / `slots[k]`: mean soft acceptance at slot k over supervised slots.
    `tau_prob_sum` / `blocks`: expected accepted length `1 + sum_k prod_{i<=k} a*_i` per block with a
    supervised first slot (the reference's logged `tau_probabilistic`); `tau_greedy_sum` the same with
    "draft argmax == target argmax" in place of a* (a teacher-forced proxy of greedy tau).
    """
    sup = supervised.astype(jnp.float32)
    blocks = sup[..., 0]
    stats = {
        "slots": jnp.sum(sup, axis=(0, 1)),
        "accept_sum": jnp.sum(terms["accept"] * sup, axis=(0, 1)),
        "blocks": jnp.sum(blocks),
        "tau_prob_sum": jnp.sum(blocks * (1 + jnp.sum(jnp.cumprod(terms["accept"] * sup, axis=-1), axis=-1))),
        "tau_greedy_sum": jnp.sum(blocks * (1 + jnp.sum(jnp.cumprod(terms["greedy_match"] * sup, axis=-1), axis=-1))),
    }
    if "conf_error" in terms:
        stats["conf_error_sum"] = jnp.sum(terms["conf_error"] * sup)
    return stats
