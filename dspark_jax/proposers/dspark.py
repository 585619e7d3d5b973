"""DSpark / DFlash drafts (docs/algorithm.md §2-§4): a parallel block backbone conditioned on target features,
a sequential Markov head and a confidence head.

The backbone is the target family's own model class (`DraftConfig.backbone` is a family config: the draft's
layers have the target's geometry), run in its draft mode: the block `[anchor, MASK...]` attends without a
causal mask to injected context keys/values (`context_kv` of `C = rms_norm(F @ fc)`, F the concatenated
target features) and to itself. The family supplies every numeric detail (norms, embedding scale, attention
variant, logit soft-capping), so this module has no family flags. Context K/V depend only on target
features, so they are cached for committed positions (`extend`) and a round only computes the block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.config import SamplingParams
from dspark_jax.engine import sampling
from dspark_jax.engine.contracts import Proposal
from dspark_jax.errors import ConfigError
from dspark_jax.layers import kv_cache as kv
from dspark_jax.layers.params import Init
from dspark_jax.models import registry
from dspark_jax.proposers.markov import ConfidenceHead, MarkovHead


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """A DSpark / DFlash draft in the DeepSpec layout (`Qwen3DSparkModel` / `Gemma4DSparkModel`).

    `backbone` is the family config of the draft's layers (its `num_layers` is the draft's depth, with an
    untied head); the other fields are the draft's own.
    """

    backbone: Any
    block_size: int
    target_layer_ids: tuple[int, ...]
    num_target_layers: int
    mask_token_id: int
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    num_anchors: int = 512

    @property
    def family(self) -> str:
        return self.backbone.family

    @property
    def vocab_size(self) -> int:
        return self.backbone.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    @property
    def num_features(self) -> int:
        return len(self.target_layer_ids)

    @property
    def hidden_state_indices(self) -> tuple[int, ...]:
        """HF `output_hidden_states` indices of the target features: id -1 -> 0, id k -> k + 1."""
        return tuple(0 if i == -1 else i + 1 for i in self.target_layer_ids)


class DSparkDraft(nnx.Module):
    """Parameters of a DSpark/DFlash draft and its proposer contract (`engine.contracts.Proposer`)."""

    def __init__(self, cfg: DraftConfig, init: Init):
        D = cfg.hidden_size
        self.config = cfg
        self.dtype = jnp.dtype(init.dtype)
        self.backbone = registry.by_config(cfg.backbone).model_class(cfg.backbone, init)
        self.fc = init.normal((cfg.num_features * D, D), ("features", "embed"))
        self.hidden_norm = init.ones((D,), ("embed",))
        self.markov_head = MarkovHead(cfg, init) if cfg.markov_rank > 0 else None
        self.confidence_head = ConfidenceHead(cfg, init) if cfg.enable_confidence_head else None
        self.max_draft_length = cfg.block_size
        self.feature_indices = cfg.hidden_state_indices
        self.has_confidence = cfg.enable_confidence_head

    # --- contract -------------------------------------------------------------------------------------
    def check_target(self, target_config) -> None:
        """A draft must match its target: vocabulary, hidden size, feature layers, mask token."""
        t, d = target_config, self.config
        if d.vocab_size != t.vocab_size:
            raise ConfigError(f"draft vocab_size {d.vocab_size} != target vocab_size {t.vocab_size}: this draft was trained for another target")
        if d.hidden_size != t.hidden_size:
            raise ConfigError(f"draft hidden_size {d.hidden_size} != target hidden_size {t.hidden_size}: this draft was trained for another target")
        L = t.num_layers
        for i in d.target_layer_ids:
            if not -1 <= i < L:
                raise ConfigError(f"draft target_layer_ids {list(d.target_layer_ids)}: layer {i} is outside the target's {L} layers")
            if i == L - 1:
                raise ConfigError(
                    f"draft target_layer_ids {list(d.target_layer_ids)} uses the target's last layer {L - 1}, whose HF hidden "
                    "state is final-normed (docs/algorithm.md §2.1). Retrain the draft on interior layers"
                )
        if d.num_target_layers != L:
            raise ConfigError(f"draft was built for a {d.num_target_layers}-layer target, this target has {L} layers")
        if not 0 <= d.mask_token_id < t.vocab_size:
            raise ConfigError(f"draft mask_token_id {d.mask_token_id} is outside the vocabulary (size {t.vocab_size})")

    def init_state(self, batch: int, capacity: int) -> kv.Cache:
        """The context cache: every draft layer's injected K/V of committed positions (linear, `capacity` slots)."""
        return self.backbone.init_cache(batch, capacity)

    def extend(self, state: kv.Cache, tokens, features: jax.Array, lengths: jax.Array) -> kv.Cache:
        """Write the context K/V of `features [B, T, F]` (positions `lengths + t`) into the context cache."""
        del tokens
        T = features.shape[1]
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        fresh = self.backbone.context_kv(self.project_context(features), positions)
        write = jax.vmap(kv.write, in_axes=(0, 0, None))  # over the stacked layers
        return jax.tree.map(
            lambda c, f: kv.LayerKV(write(c.k, f.k, lengths), write(c.v, f.v, lengths)),
            state, fresh, is_leaf=lambda x: isinstance(x, kv.LayerKV),
        )

    def propose(self, state: kv.Cache, anchor, lengths, params: SamplingParams, keys, K: int) -> Proposal:
        """Draft `K` tokens per row after the anchors at positions `lengths`, truncated by confidence
        (docs/algorithm.md §4.2): a row proposes up to its first position whose confidence is below its threshold."""
        drafts, probs, _, conf = self.sample_block(state, anchor, lengths, params, keys, K)
        threshold = params.confidence_threshold[:, None]
        low = (jax.nn.sigmoid(conf) < threshold) & (threshold > 0)
        num_proposed = jnp.where(jnp.any(low, axis=1), jnp.argmax(low, axis=1), K).astype(jnp.int32)
        return Proposal(drafts, probs, num_proposed, conf if self.confidence_head is not None else None)

    # --- pieces ---------------------------------------------------------------------------------------
    def project_context(self, features: jax.Array) -> jax.Array:
        """`C = hidden_norm(F @ fc)`: `[B, T, n_t * D]` target features -> `[B, T, D]`."""
        c = jnp.einsum("btf,fd->btd", features.astype(self.dtype), self.fc[...])
        return self.backbone.rms_norm(c, self.hidden_norm[...])

    def block_hidden(self, ids: jax.Array, lengths: jax.Array, state: kv.Cache) -> jax.Array:
        """Final-normed hidden `[B, T, D]` of the block `ids [B, T]` at positions `lengths + t`, over the
        committed context of the cache."""
        B, T = ids.shape
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        context_mask = kv.cached_mask(positions, lengths, state[0][0].k.shape[1 + kv.SEQ])
        return self.backbone.block_hidden(ids, positions, state, context_mask, kv.block_mask(B, T, causal=False))

    def base_logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits of the (frozen) LM head, soft-capped where the family does (before any Markov bias)."""
        return self.backbone.logits(hidden)

    def confidence(self, hidden: jax.Array, prev: jax.Array) -> jax.Array:
        """Confidence logits (fp32) for block hidden states and the previous tokens of those positions."""
        e = self.markov_head.embed(prev) if self.markov_head is not None else None
        return self.confidence_head(hidden, e)

    def sample_block(self, state, anchor, lengths, params: SamplingParams, keys, K: int):
        """The block forward and the sequential Markov sampling loop (docs/algorithm.md §3.4).

        -> (drafts i32[B, K], their distributions f32[B, K, V], corrected logits f32[B, K, V],
        confidence logits f32[B, K], zeros without a head)."""
        cfg = self.config
        B = anchor.shape[0]
        block = jnp.concatenate([anchor[:, None], jnp.full((B, cfg.block_size - 1), cfg.mask_token_id, jnp.int32)], axis=1)
        with jax.named_scope("draft_block"):
            hidden = self.block_hidden(block, lengths, state)[:, :K]  # [B, K, D]
            base = self.base_logits(hidden)  # [B, K, V]
        markov = self.markov_head

        def body(carry, xs):
            prev, rnn_state = carry
            k, h, logits = xs
            if markov is not None:
                bias, rnn_state = markov.step(prev, h, rnn_state)
                logits = logits + bias
            probs = sampling.probabilities(logits, params)
            token = sampling.token_at(probs, params, keys, lengths + k + 1, sampling.SALT_DRAFT, greedy)
            conf = self.confidence(h, prev) if self.confidence_head is not None else jnp.zeros((B,), jnp.float32)
            return (token, rnn_state), (token, probs, logits, conf)

        greedy = sampling.all_greedy(params)
        init_state = markov.initial_state(B) if markov is not None else jnp.zeros((B, 0), self.dtype)
        with jax.named_scope("markov_loop"):
            _, (drafts, probs, logits, conf) = jax.lax.scan(
                body, (anchor, init_state), (jnp.arange(K), jnp.swapaxes(hidden, 0, 1), jnp.swapaxes(base, 0, 1))
            )
        return drafts.T, jnp.swapaxes(probs, 0, 1), jnp.swapaxes(logits, 0, 1), conf.T

    def layer_map(self):
        return self.backbone.layer_map().prefixed(("backbone",))
