"""Synthetic EAGLE-3 drafts with known behaviour, for tests and benchmarks (docs/eagle3.md §3, §5).

* `random_draft`: untrained weights with the target's embedding (and its LM head rows) copied in (tau ~ 1).
* `oracle_draft`: a draft that predicts `successor[x]` after every entry token x, on any context. Its layer
  attends (almost) only to the entry itself: queries and keys are constant (biases only) with large q/k-norm
  weights, so with RoPE the score peaks at distance 0. The value of an entry is `psi(x) - norm(r)` with
  `psi(t)` the RMS-normalised embedding of t, so the output `h = r + a` of an entry whose residual is the
  previous output `psi(x_prev)` is `psi(x)`: the chain carries the newest token only. The LM head row of
  token v is `strength / D * psi(u)` for the tokens u believed to precede v. With `accuracy < 1` some tokens
  get a wrong successor (a "mixed" draft); a small `strength` gives soft distributions.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.handles import Draft, Target
from dspark_jax.proposers.eagle3 import DEEPSPEC, REDUCED_VOCAB, Eagle3Config
from dspark_jax.proposers.eagle3 import random_draft as _random


def config_for(target_config, *, target_layer_ids, draft_length: int = 7, draft_vocab_size: int | None = None,
               head_dim: int = 16, attention_bias: bool = False) -> Eagle3Config:
    """An EAGLE-3 config for `target_config` whose attention carries the whole hidden state (kv width = D)."""
    D = target_config.hidden_size
    heads = D // head_dim
    layer = dataclasses.replace(
        target_config, num_layers=1, num_heads=heads, num_kv_heads=heads, head_dim=head_dim, tie_word_embeddings=False,
        attention_bias=attention_bias, intermediate_size=target_config.intermediate_size or 4 * D, model_type="qwen3",
        num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0, moe_layers=(),
    )
    return Eagle3Config(layer=layer, target_layer_ids=tuple(target_layer_ids), draft_length=draft_length,
                        layout=REDUCED_VOCAB if draft_vocab_size else DEEPSPEC,
                        num_target_layers=target_config.num_layers, draft_vocab_size=draft_vocab_size)


def _set(params: nnx.State, path: tuple, value) -> None:
    var = dict(nnx.to_flat_state(params))[path]
    var.set_value(jnp.asarray(value, var.get_value().dtype))


def _target_tables(target: Target) -> tuple[np.ndarray, np.ndarray]:
    t = target.module
    embed = np.asarray(t.embed_tokens[...], np.float32)
    head = embed if target.config.tie_word_embeddings else np.asarray(t.lm_head[...], np.float32)
    return embed, head


def vocab_subset(vocab_size: int, draft_vocab_size: int, seed: int = 0) -> np.ndarray:
    """A sorted random subset of target tokens forming a reduced draft vocabulary."""
    return np.sort(np.random.default_rng(seed).choice(vocab_size, draft_vocab_size, replace=False)).astype(np.int32)


def random_draft(target: Target, config: Eagle3Config, *, seed: int = 0, vocab: np.ndarray | None = None) -> Draft:
    """Untrained EAGLE-3 weights with the target's embedding and LM head (rows of the draft vocabulary) copied in."""
    draft = _random(config, dtype=target.dtype, seed=seed)
    params = draft.params  # fresh: set in place
    embed, head = _target_tables(target)
    _set(params, ("embed_tokens",), embed)
    if config.reduced_vocab:
        vocab = vocab_subset(config.vocab_size, config.head_vocab_size, seed) if vocab is None else np.asarray(vocab)
        _set(params, ("vocab_map",), vocab)
        head = head[vocab]
    _set(params, ("lm_head",), head)
    return draft.with_params(params)


def oracle_draft(target: Target, config: Eagle3Config, successor: np.ndarray, *, accuracy: float = 1.0,
                 strength: float = 30.0, seed: int = 0, vocab: np.ndarray | None = None) -> Draft:
    """A draft proposing `successor[x]` after each token x (see the module docstring); `config` from `config_for`
    with `attention_bias=True`."""
    c = config.layer
    D, N, G, Hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    if not (c.attention_bias and N == G and G * Hd == D):
        raise ValueError("an oracle EAGLE-3 draft needs attention biases and one KV head per query head of total width D")
    draft = random_draft(target, config, seed=seed, vocab=vocab)
    params = draft.params
    embed, _ = _target_tables(target)
    psi = embed / np.sqrt(np.mean(embed * embed, axis=1, keepdims=True))
    V = config.vocab_size
    rng = np.random.default_rng(seed)
    believed = np.asarray(successor).copy()
    wrong = rng.random(V) >= accuracy
    believed[wrong] = (believed[wrong] + 1 + rng.integers(0, V - 1, wrong.sum())) % V
    rows = np.zeros((V, D), np.float32)
    np.add.at(rows, believed, strength / D * psi)
    if config.reduced_vocab:
        rows = rows[np.asarray(dict(nnx.to_flat_state(params))[("vocab_map",)].get_value())]
    eye = np.eye(D, dtype=np.float32)
    attn = ("layer", "self_attn")
    _set(params, ("fc",), np.zeros((config.feature_width, D), np.float32))
    _set(params, (*attn, "q_proj"), np.zeros((2 * D, N, Hd), np.float32))
    _set(params, (*attn, "k_proj"), np.zeros((2 * D, G, Hd), np.float32))
    _set(params, (*attn, "q_bias"), np.ones((N, Hd), np.float32))
    _set(params, (*attn, "k_bias"), np.ones((G, Hd), np.float32))
    _set(params, (*attn, "q_norm"), np.full((Hd,), 12.0, np.float32))
    _set(params, (*attn, "k_norm"), np.full((Hd,), 12.0, np.float32))
    _set(params, (*attn, "v_proj"), np.concatenate([eye, -eye]).reshape(2 * D, G, Hd))
    _set(params, (*attn, "v_bias"), np.zeros((G, Hd), np.float32))
    _set(params, (*attn, "o_proj"), eye.reshape(N, Hd, D))
    _set(params, (*attn, "o_bias"), np.zeros((D,), np.float32))
    for name in ("hidden_norm", "input_layernorm", "post_attention_layernorm"):
        _set(params, ("layer", name), np.ones((D,), np.float32))
    _set(params, ("layer", "mlp", "down_proj"), np.zeros((c.intermediate_size, D), np.float32))
    _set(params, ("norm",), np.ones((D,), np.float32))
    _set(params, ("lm_head",), rows)
    return draft.with_params(params)
