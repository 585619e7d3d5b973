"""Synthetic DeepSeek-V3 MTP proposers with known behaviour, for tests and engine benchmarks.

* `random_mtp`: random weights with the target's embedding and head copied in (as the hub checkpoint stores
  them), so it drafts like an untrained module (tau ~ 1).
* `oracle_mtp`: drafts `successor[previous token]` for a fraction `accuracy` of tokens (1 = always): paired
  with `synthetic.bigram_target` following the same successor map, chained MTP-k is accepted in full at
  temperature 0 (tau = k + 1). Its block is a real MLA + MoE layer run at full cost whose output projections
  are zero, `eh_proj` passes the normed token embedding through and the head maps each token's embedding
  to its believed successor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.handles import Draft, Target
from dspark_jax.layers.params import Init
from dspark_jax.proposers.mtp import DEFAULT_MAX_DRAFT_LENGTH, MTPConfig, MTPProposer


def _set(params, path, value) -> None:
    var = dict(nnx.to_flat_state(params))[path]
    var.set_value(jnp.asarray(value, var.get_value().dtype))


def random_mtp(target: Target, *, seed: int = 0, dtype=None, max_draft_length: int = DEFAULT_MAX_DRAFT_LENGTH) -> Draft:
    """Untrained MTP weights for a DeepSeek-V3 `target`, its embedding and head copied in."""
    cfg = MTPConfig(target=target.config, layer=target.config.num_layers, max_draft_length=max_draft_length)
    dtype = jnp.dtype(dtype or target.dtype)
    draft = Draft.of_module(MTPProposer(cfg, Init(nnx.Rngs(seed), dtype)), cfg, dtype)
    params = jax.tree.map(lambda x: x, draft.params)
    t = target.module
    _set(params, ("embed_tokens",), t.embed_tokens[...])
    _set(params, ("shared_head",), t.head())
    return draft.with_params(params)


def oracle_mtp(target: Target, successor: np.ndarray, *, accuracy: float = 1.0, seed: int = 0, dtype=None,
               max_draft_length: int = DEFAULT_MAX_DRAFT_LENGTH) -> Draft:
    """An MTP module drafting `successor[previous token]` for a fraction `accuracy` of tokens (see module doc)."""
    V, D = target.config.vocab_size, target.config.hidden_size
    rng = np.random.default_rng(seed)
    believed = np.asarray(successor).copy()
    wrong = rng.random(V) >= accuracy
    believed[wrong] = (believed[wrong] + 1 + rng.integers(0, V - 1, wrong.sum())) % V
    draft = random_mtp(target, seed=seed, dtype=dtype, max_draft_length=max_draft_length)
    params = jax.tree.map(lambda x: x, draft.params)
    _set(params, ("eh_proj",), np.concatenate([np.eye(D), np.zeros((D, D))], axis=0))
    for path, var in nnx.to_flat_state(params):
        if path[-1] in ("o_proj", "down_proj"):
            var.set_value(jnp.zeros_like(var.get_value()))
    head = np.zeros((V, D), np.float32)
    head[believed] = np.asarray(target.module.embed_tokens[...], np.float32)
    _set(params, ("shared_head",), head)
    return draft.with_params(params)
