"""Synthetic DeepSeek-V4 targets and MTP proposers with known behaviour, for tests and engine benchmarks.

* `bigram_target`: random V4 weights whose greedy continuation follows a permutation `successor`: the token
  embedding is Gaussian, the attention / MoE output projections are scaled down (context moves the logits a
  little, never the argmax) and the head row of `successor[u]` is `u`'s embedding.
* `random_mtp`: random MTP weights with the target's embedding and head copied in (tau ~ 1).
* `oracle_mtp`: an MTP module drafting `successor[previous token]` for a fraction `accuracy` of tokens: its
  block (mHC, attention, MoE, run at full cost) adds nothing (zero output projections), `e_proj` passes the normed
  token embedding through, `h_proj` is zero, and its head maps each token's embedding to its believed successor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.handles import Draft, Target
from dspark_jax.layers.params import Init
from dspark_jax.models.deepseek_v4 import DeepseekV4Config
from dspark_jax.proposers.mtp_v4 import DEFAULT_MAX_DRAFT_LENGTH, V4MTPConfig, V4MTPProposer

OUTPUTS = ("wo_b", "w2", "shared_w2")  # what a V4 layer adds to its streams


def _set(params, path, value) -> None:
    var = dict(nnx.to_flat_state(params))[path]
    var.set_value(jnp.asarray(value, var.get_value().dtype))


def _scale_outputs(params, factor: float) -> None:
    for path, var in nnx.to_flat_state(params):
        if path[-1] in OUTPUTS:
            var.set_value((var.get_value().astype(jnp.float32) * factor).astype(var.get_value().dtype))


def _successor_head(embed: np.ndarray, successor: np.ndarray, scale: float) -> np.ndarray:
    head = np.zeros_like(embed)
    head[successor] = embed  # the row of succ(u) is u's embedding: argmax follows succ
    return scale * head / np.sqrt(embed.shape[1])


def bigram_target(config: DeepseekV4Config, successor: np.ndarray, *, seed: int = 0, dtype="float32",
                  layer_scale: float = 0.05, logit_scale: float = 4.0) -> Target:
    """A V4 target whose greedy continuation follows the permutation `successor`."""
    V, D = config.vocab_size, config.hidden_size
    if sorted(np.asarray(successor).tolist()) != list(range(V)):
        raise ValueError("successor must be a permutation of the vocabulary")
    target = Target.random(config, dtype=dtype, seed=seed)
    params = jax.tree.map(lambda x: x, target.params)
    embed = np.random.default_rng(seed + 1).standard_normal((V, D)).astype(np.float32)
    _set(params, ("embed",), embed)
    _scale_outputs(params, layer_scale)
    _set(params, ("head",), _successor_head(embed, np.asarray(successor), logit_scale))
    return target.with_params(params)


def random_mtp(target: Target, *, seed: int = 0, dtype=None, max_draft_length: int = DEFAULT_MAX_DRAFT_LENGTH) -> Draft:
    """Untrained MTP weights for a DeepSeek-V4 `target`, its embedding and head copied in."""
    cfg = V4MTPConfig(target=target.config, max_draft_length=max_draft_length)
    dtype = jnp.dtype(dtype or target.dtype)
    draft = Draft.of_module(V4MTPProposer(cfg, Init(nnx.Rngs(seed), dtype)), cfg, dtype)
    params = jax.tree.map(lambda x: x, draft.params)
    _set(params, ("embed",), target.module.embed[...])
    _set(params, ("head",), target.module.head[...])
    return draft.with_params(params)


def oracle_mtp(target: Target, successor: np.ndarray, *, accuracy: float = 1.0, seed: int = 0, dtype=None,
               max_draft_length: int = DEFAULT_MAX_DRAFT_LENGTH, logit_scale: float = 4.0) -> Draft:
    """An MTP module drafting `successor[previous token]` for a fraction `accuracy` of tokens (module doc)."""
    V, D = target.config.vocab_size, target.config.hidden_size
    rng = np.random.default_rng(seed)
    believed = np.asarray(successor).copy()
    wrong = rng.random(V) >= accuracy
    believed[wrong] = (believed[wrong] + 1 + rng.integers(0, V - 1, wrong.sum())) % V
    draft = random_mtp(target, seed=seed, dtype=dtype, max_draft_length=max_draft_length)
    params = jax.tree.map(lambda x: x, draft.params)
    _set(params, ("e_proj",), np.eye(D))
    _set(params, ("h_proj",), np.zeros((D, D)))
    _scale_outputs(params, 0.0)
    embed = np.asarray(target.module.embed[...], np.float32)
    _set(params, ("head",), _successor_head(embed, believed, logit_scale))
    return draft.with_params(params)
