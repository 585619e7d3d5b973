"""Synthetic DeepSeek-V4 DSpark drafts with known behaviour, for tests and engine benchmarks (targets:
`testing.mtp_v4.bigram_target`).

* `random_dspark`: random draft weights with the target's embedding and head copied in (tau ~ 1).
* `oracle_dspark`: a draft whose Markov head knows the successor map for a fraction `accuracy` of tokens: its
  blocks (mHC, attention over the injected rows, MoE, all run at full cost) and its base logits add nothing
  (zero head), and the vanilla Markov head (rank D: `W1` = the target's embedding, `W2` row `believed[u]` = `u`'s embedding)
  peaks at `believed[prev]`, so each block position drafts the believed successor of the token drafted before it.
  With a bigram target (Gaussian embedding) the margin is about `logit_scale * sqrt(D)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.handles import Draft, Target
from dspark_jax.layers.params import Init
from dspark_jax.proposers.dspark_v4 import V4DSparkConfig, V4DSparkDraft
from dspark_jax.testing.mtp_v4 import _scale_outputs, _set, _successor_head


def draft_config(target: Target, *, num_layers: int = 3, block_size: int = 5, target_layer_ids=None,
                 mask_token_id: int | None = None, markov_rank: int = 8, confidence: bool = True,
                 feature_source: str = "input") -> V4DSparkConfig:
    t = target.config
    L = t.num_layers
    ids = tuple(target_layer_ids) if target_layer_ids is not None else tuple(range(max(0, L - 3), L))
    return V4DSparkConfig(target=t, num_layers=num_layers, block_size=block_size, target_layer_ids=ids,
                          mask_token_id=t.vocab_size - 1 if mask_token_id is None else mask_token_id,
                          markov_rank=markov_rank, enable_confidence_head=confidence and markov_rank > 0,
                          feature_source=feature_source)


def random_dspark(target: Target, cfg: V4DSparkConfig | None = None, *, seed: int = 0, dtype=None, **kwargs) -> Draft:
    """Untrained V4 DSpark weights for `target` (config from `draft_config(target, **kwargs)` unless given)."""
    cfg = cfg or draft_config(target, **kwargs)
    dtype = jnp.dtype(dtype or target.dtype)
    draft = Draft.of_module(V4DSparkDraft(cfg, Init(nnx.Rngs(seed), dtype)), cfg, dtype)
    params = jax.tree.map(lambda x: x, draft.params)
    _set(params, ("embed",), target.module.embed[...])
    _set(params, ("head",), target.module.head[...])
    return draft.with_params(params)


def oracle_dspark(target: Target, successor: np.ndarray, *, accuracy: float = 1.0, seed: int = 0, dtype=None,
                  logit_scale: float = 4.0, **kwargs) -> Draft:
    """A V4 DSpark draft drafting `successor[previous token]` for a fraction `accuracy` of tokens (module doc)."""
    V = target.config.vocab_size
    rng = np.random.default_rng(seed)
    believed = np.asarray(successor).copy()
    wrong = rng.random(V) >= accuracy
    believed[wrong] = (believed[wrong] + 1 + rng.integers(0, V - 1, wrong.sum())) % V
    D = target.config.hidden_size
    kwargs["markov_rank"] = D
    draft = random_dspark(target, seed=seed, dtype=dtype, **kwargs)
    params = jax.tree.map(lambda x: x, draft.params)
    _scale_outputs(params, 0.0)
    _set(params, ("head",), np.zeros((V, D)))
    embed = np.asarray(target.module.embed[...], np.float32)
    # W1 = the token embedding, W2[believed[u]] = u's embedding: the bias peaks at believed[prev] (rank D, not V)
    _set(params, ("markov_head", "markov_w1"), embed)
    _set(params, ("markov_head", "markov_w2"), _successor_head(embed, believed, logit_scale))
    return draft.with_params(params)
