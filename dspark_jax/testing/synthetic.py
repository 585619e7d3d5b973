"""Synthetic models with known behaviour, for tests and engine benchmarks.

* `bigram_target`: random weights, but the greedy next token is `successor[current token]` whatever the
  context (embeddings dominate the residual stream; the untied LM head maps each token to its successor).
  Its logits still depend on the context, and it costs exactly what a random model of its shape costs.
* `oracle_draft`: a real DSpark draft whose low-rank Markov head encodes that successor map, so at
  temperature 0 it proposes the target's own greedy continuation (tau = K + 1). With `accuracy < 1` a
  fraction of tokens get a wrong successor (a "mixed" draft).
* `random_draft`: untrained draft weights with the target's embeddings copied in (tau ~ 1).
* `draft_config_for`: a DSpark draft config shaped like the reference's (target-shaped layers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.handles import Draft, Target
from dspark_jax.models.qwen3 import Qwen3Config
from dspark_jax.proposers.dspark import DraftConfig


def draft_config_for(
    target_config: Qwen3Config,
    *,
    num_layers: int = 1,
    block_size: int = 7,
    target_layer_ids: tuple[int, ...] | None = None,
    markov_rank: int = 64,
    markov_head_type: str = "vanilla",
    confidence: bool = True,
    mask_token_id: int | None = None,
) -> DraftConfig:
    """A Qwen3-family DSpark draft for `target_config` (DFlash when `markov_rank` is 0)."""
    L = target_config.num_layers
    if target_layer_ids is None:  # spread over the interior, never the last layer (docs/algorithm.md §2.1)
        target_layer_ids = tuple(sorted({max(0, min(L - 2, round(i * (L - 2) / 4))) for i in range(5)}))
    backbone = dataclasses.replace(
        target_config,
        intermediate_size=target_config.intermediate_size or 4 * target_config.hidden_size,
        num_layers=num_layers,
        tie_word_embeddings=False,
        num_experts=0,
        num_experts_per_tok=0,
        moe_intermediate_size=0,
        moe_layers=(),
        model_type="qwen3",
    )
    return DraftConfig(
        backbone=backbone,
        block_size=block_size,
        target_layer_ids=tuple(target_layer_ids),
        num_target_layers=L,
        mask_token_id=target_config.vocab_size - 1 if mask_token_id is None else mask_token_id,
        markov_rank=markov_rank,
        markov_head_type=markov_head_type,
        enable_confidence_head=confidence,
        confidence_head_with_markov=confidence and markov_rank > 0,
    )


def _set(state: nnx.State, path: tuple, value) -> None:
    flat = dict(nnx.to_flat_state(state))
    var = flat[path]
    var.set_value(jnp.asarray(value, var.get_value().dtype))


def _paths(state: nnx.State):
    return [p for p, _ in nnx.to_flat_state(state)]


def random_permutation_successor(vocab_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(vocab_size).astype(np.int32)


def bigram_target(
    config: Qwen3Config,
    *,
    successor: np.ndarray | None = None,
    seed: int = 0,
    dtype="float32",
    layer_scale: float = 0.05,
    logit_scale: float = 4.0,
) -> Target:
    """A target whose greedy continuation follows `successor` (a permutation; identity if tied)."""
    V = config.vocab_size
    if successor is None:
        successor = np.arange(V, dtype=np.int32) if config.tie_word_embeddings else random_permutation_successor(V, seed)
    successor = np.asarray(successor)
    if config.tie_word_embeddings and not np.array_equal(successor, np.arange(V)):
        raise ValueError("a tied-embedding bigram target can only follow the identity successor map")
    if sorted(successor.tolist()) != list(range(V)):
        raise ValueError("successor must be a permutation of the vocabulary")
    target = Target.random(config, dtype=dtype, seed=seed)
    params = jax.tree.map(lambda x: x, target.params)
    rng = np.random.default_rng(seed + 1)
    embed = rng.standard_normal((V, config.hidden_size)).astype(np.float32)
    _set(params, ("embed_tokens",), embed)
    for path in _paths(params):
        if path[-1] in ("o_proj", "down_proj"):  # small residual updates: context shifts logits, not argmax
            flat = dict(nnx.to_flat_state(params))
            _set(params, path, np.asarray(flat[path].get_value(), np.float32) * layer_scale)
    if not config.tie_word_embeddings:
        head = np.zeros_like(embed)
        head[successor] = embed  # the row of token succ(u) is u's embedding: argmax follows succ
        _set(params, ("lm_head",), logit_scale * head / np.sqrt(config.hidden_size))
    return target.with_params(params)


def random_draft(target: Target, config: DraftConfig, *, seed: int = 0, dtype=None) -> Draft:
    """Untrained draft weights; embeddings and LM head copied from the target as the reference does."""
    draft = Draft.random(config, dtype=dtype or target.dtype, seed=seed)
    params = jax.tree.map(lambda x: x, draft.params)
    t = target.module
    _set(params, ("backbone", "embed_tokens"), t.embed_tokens[...])
    head = t.embed_tokens[...] if target.config.tie_word_embeddings else t.lm_head[...]
    _set(params, ("backbone", "lm_head"), head)
    return draft.with_params(params)


def oracle_draft(
    target: Target,
    config: DraftConfig,
    successor: np.ndarray,
    *,
    accuracy: float = 1.0,
    strength: float = 30.0,
    seed: int = 0,
    dtype=None,
) -> Draft:
    """A draft whose Markov head proposes `successor[prev]` (for a fraction `accuracy` of tokens).

    The backbone's final norm is zeroed so base logits vanish and the low-rank Markov bias
    `strength * code(prev) . code(succ^-1(v))` decides; random unit codes of rank R keep cross terms small.
    """
    if config.markov_rank <= 0:
        raise ValueError("an oracle draft needs a Markov head (markov_rank > 0)")
    V, R = config.vocab_size, config.markov_rank
    rng = np.random.default_rng(seed)
    believed = np.asarray(successor).copy()
    wrong = rng.random(V) >= accuracy
    believed[wrong] = (believed[wrong] + 1 + rng.integers(0, V - 1, wrong.sum())) % V
    codes = rng.standard_normal((V, R)).astype(np.float32)
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    w2 = np.zeros((V, R), np.float32)
    # bias[v] = strength * sum over tokens u believed to precede v of code(prev) . code(u)
    np.add.at(w2, believed, strength * codes)
    draft = random_draft(target, config, seed=seed, dtype=dtype)
    params = jax.tree.map(lambda x: x, draft.params)
    _set(params, ("markov_head", "markov_w1"), codes)
    _set(params, ("markov_head", "markov_w2"), w2)
    _set(params, ("backbone", "norm"), np.zeros(config.hidden_size, np.float32))
    return dataclasses.replace(draft, params=params)
