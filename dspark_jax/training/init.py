"""A new draft for a target (docs/algorithm.md §6.6): target-shaped layers, fresh weights, copied embeddings.

The draft config is the target's geometry (hidden size, heads, head dim, RoPE, norm eps, vocabulary) plus the
draft fields. Fresh weights are N(0, 0.02), norms 1, biases 0 (HF `post_init`); `embed_tokens` and `lm_head`
are exact copies of the target's input and output embeddings (the same table when the target ties them) and
stay frozen during training.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from dspark_jax.errors import ConfigError
from dspark_jax.handles import Draft, Target
from dspark_jax.layers.params import Init
from dspark_jax.models.qwen3 import Qwen3Config
from dspark_jax.proposers.dspark import DraftConfig


def draft_config_from_target(
    target_config: Qwen3Config,
    *,
    num_layers: int,
    target_layer_ids,
    mask_token_id: int,
    block_size: int = 7,
    markov_rank: int = 0,
    markov_head_type: str = "vanilla",
    confidence_head: bool = False,
    confidence_head_with_markov: bool = True,
    intermediate_size: int | None = None,
    num_anchors: int = 512,
) -> DraftConfig:
    """The DeepSpec draft config for a Qwen3 target (DFlash: `markov_rank=0`, no confidence head)."""
    if not isinstance(target_config, Qwen3Config) or target_config.is_moe:
        raise ConfigError("training a draft is implemented for dense Qwen3 targets")
    L = target_config.num_layers
    ids = tuple(int(i) for i in target_layer_ids)
    if not ids or list(ids) != sorted(set(ids)) or not all(-1 <= i <= L - 2 for i in ids):
        raise ConfigError(
            f"target_layer_ids {list(ids)} must be strictly increasing ids in -1..{L - 2} (the target has {L} layers; "
            "the last layer is forbidden, docs/algorithm.md §2.1)"
        )
    if not 0 <= mask_token_id < target_config.vocab_size:
        raise ConfigError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {target_config.vocab_size})")
    if markov_head_type not in ("vanilla", "gated", "rnn"):
        raise ConfigError(f"markov_head_type {markov_head_type!r} must be 'vanilla', 'gated' or 'rnn'")
    backbone = dataclasses.replace(target_config, num_layers=int(num_layers), tie_word_embeddings=False,
                                   intermediate_size=int(intermediate_size or target_config.intermediate_size))
    return DraftConfig(
        backbone=backbone,
        block_size=int(block_size),
        target_layer_ids=ids,
        num_target_layers=L,
        mask_token_id=int(mask_token_id),
        markov_rank=int(markov_rank),
        markov_head_type=markov_head_type,
        enable_confidence_head=bool(confidence_head),
        confidence_head_with_markov=bool(confidence_head and confidence_head_with_markov and markov_rank > 0),
        num_anchors=int(num_anchors),
    )


def init_from_target(target: Target, config: DraftConfig, *, seed: int = 0, dtype="float32") -> Draft:
    """Fresh draft weights with `embed_tokens` / `lm_head` copied from `target`."""
    from dspark_jax.proposers.dspark import DSparkDraft

    tcfg = target.config
    if config.vocab_size != tcfg.vocab_size or config.hidden_size != tcfg.hidden_size:
        raise ConfigError(f"draft config ({config.vocab_size}, {config.hidden_size}) does not fit the target "
                          f"({tcfg.vocab_size}, {tcfg.hidden_size})")
    dt = jnp.dtype(dtype)
    module = DSparkDraft(config, Init(nnx.Rngs(seed), dt))
    t = target.module
    head = t.embed_tokens[...] if tcfg.tie_word_embeddings else t.lm_head[...]
    module.backbone.embed_tokens.set_value(jnp.asarray(t.embed_tokens[...], dt))
    module.backbone.lm_head.set_value(jnp.asarray(head, dt))
    graphdef, params = nnx.split(module)
    return Draft(config=config, graphdef=graphdef, params=params, dtype=dt)
