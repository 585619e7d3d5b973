"""DeepSeek-V3 multi-token prediction (MTP) module as a proposer (docs/deepseek.md §4).

The module stored after the target's last layer (`model.layers.{L}`) predicts the token after next: at
position `i` it combines the target's final-normed hidden state `h_i` with the embedding of token `x_{i+1}`,
`x = eh_proj([enorm(emb(x_{i+1})); hnorm(h_i)])`, runs one decoder layer (MLA + MoE) over its own latent
cache of earlier positions, and `shared_head.norm` -> `shared_head.head` gives logits for `x_{i+2}`
(transformers' `MtpLayer` numerics, the hidden state transformers feeds it being `hidden_states[L]`).

MTP-1 drafts one token per round; chained MTP-k applies the same module `k` times, each step feeding its
own post-normed output and drafted token to the next one position further on (drafted entries join the
attention of later steps but are never cached: the cache only ever holds entries built from verified target
hidden states and committed tokens).

State, written ahead and committed by length like every cache (docs/caches.md §2): the target's hidden
states by position (`hidden [B, C, D]`; an MTP entry at position `i` needs `h_i`, and the last committed
`i` is only known after verification) and the module's latent cache, whose entry `i` is built from
`(h_i, x_{i+1})`. `extend` with a block at `lengths` writes the entries of positions `lengths - 1 + t`,
`t = 0..T-1`: they pair each block token with the hidden state one position earlier, so every entry is
built from a real token; after committing `a + 1` tokens exactly the entries below the new `lengths - 1`
count, and `propose` recomputes the one at `lengths - 1` (the anchor's) as its first step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.config import SamplingParams
from dspark_jax.engine import sampling
from dspark_jax.engine.contracts import Proposal
from dspark_jax.errors import ConfigError
from dspark_jax.layers import kv_cache as kv
from dspark_jax.layers import stack
from dspark_jax.layers.linear import linear
from dspark_jax.layers.norms import rms_norm
from dspark_jax.layers.params import Init
from dspark_jax.layers.rope import cos_sin, inverse_frequencies
from dspark_jax.models.deepseek_v3.config import DENSE, SPARSE, DeepseekV3Config
from dspark_jax.models.deepseek_v3.model import DeepseekV3Layer

DEFAULT_MAX_DRAFT_LENGTH = 7


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """The MTP module of a DeepSeek-V3 `target` stored as HF layer `layer` (= the target's layer count),
    chained up to `max_draft_length` times."""

    target: DeepseekV3Config
    layer: int
    max_draft_length: int = DEFAULT_MAX_DRAFT_LENGTH

    def __post_init__(self):
        if self.max_draft_length < 1:
            raise ConfigError(f"MTP max_draft_length={self.max_draft_length} must be >= 1")

    @property
    def family(self) -> str:
        return "mtp"

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.target.hidden_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MTPState:
    hidden: jax.Array  # [B, C, D] target final-normed hidden states by position
    cache: kv.LayerKV  # latents [B, C, 1, r] and rotary keys [B, C, 1, dr] of the module's entries


class LayerMap:
    """Where the MTP block's parameters live for the checkpoint rules: HF layer `layer` only."""

    def __init__(self, layer: int, prefix: tuple):
        self.layer, self.prefix = layer, prefix

    def slot(self, i: int):
        return (self.prefix, 0) if i == self.layer else None

    @property
    def prefixes(self) -> set[tuple]:
        return {self.prefix}

    def layers_at(self, prefix: tuple) -> dict[int, int]:
        return {0: self.layer} if prefix == self.prefix else {}


class MTPProposer(nnx.Module):
    """Parameters of one MTP module (with its own copies of the embedding and head, as the checkpoint stores
    them) and the proposer contract (`engine.contracts.Proposer`)."""

    def __init__(self, cfg: MTPConfig, init: Init):
        t = cfg.target
        D, V = t.hidden_size, t.vocab_size
        self.config = cfg
        self.dtype = jnp.dtype(init.dtype)
        self.embed_tokens = init.normal((V, D), ("vocab", "embed"))
        self.enorm = init.ones((D,), ("embed",))
        self.hnorm = init.ones((D,), ("embed",))
        self.eh_proj = init.normal((2 * D, D), ("features", "embed"))
        kind = SPARSE if t.n_routed_experts else DENSE  # transformers builds MTP blocks as MoE layers
        self.block = stack.Group([DeepseekV3Layer(t, kind, init.stacked(1))], cfg.layer, 1)
        self.shared_head_norm = init.ones((D,), ("embed",))
        self.shared_head = init.normal((V, D), ("vocab", "embed"))
        self.max_draft_length = cfg.max_draft_length
        self.feature_indices = (t.num_layers,)  # hidden_states[L]: the final-normed output
        self.has_confidence = False

    # --- contract -------------------------------------------------------------------------------------
    def check_target(self, target_config) -> None:
        """An MTP module serves exactly the target it was stored with."""
        mine = self.config.target
        if not isinstance(target_config, DeepseekV3Config):
            raise ConfigError(f"this MTP module belongs to a DeepSeek-V3 target, not a {type(target_config).__name__}")
        if target_config != mine:
            diff = [f.name for f in dataclasses.fields(mine) if getattr(mine, f.name) != getattr(target_config, f.name)]
            raise ConfigError(f"this MTP module was stored with another DeepSeek-V3 target (config differs in {diff})")

    def init_state(self, batch: int, capacity: int) -> MTPState:
        t = self.config.target
        return MTPState(
            hidden=jnp.zeros((batch, capacity, t.hidden_size), self.dtype),
            cache=kv.LayerKV(
                k=jnp.zeros((batch, capacity, 1, t.kv_lora_rank), self.dtype),
                v=jnp.zeros((batch, capacity, 1, t.qk_rope_head_dim), self.dtype),
            ),
        )

    def extend(self, state: MTPState, tokens: jax.Array, features: jax.Array, lengths: jax.Array) -> MTPState:
        """Store the hidden states `features [B, T, D]` of positions `lengths + t` and write the entries of
        positions `lengths - 1 + t` (token `tokens[:, t]` with the hidden state one position earlier)."""
        B, T = tokens.shape
        C = state.hidden.shape[1]
        h = features.astype(self.dtype)
        hidden = jax.vmap(lambda c, u, o: jax.lax.dynamic_update_slice_in_dim(c, u, o, axis=0))(state.hidden, h, lengths)
        before = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)  # h at lengths - 1
        prev = jnp.concatenate([before, h[:, :-1]], axis=1)  # [B, T, D]: h of positions lengths - 1 + t
        positions = lengths[:, None] - 1 + jnp.arange(T, dtype=jnp.int32)[None, :]
        layer = self.layer()
        x = self.project(tokens, prev)
        c, k_pe = layer.self_attn.latents(rms_norm(x, layer.input_layernorm[...], layer.eps), *self.rope(positions))
        slot = jnp.where(positions >= 0, positions, C)  # position -1 of a prefill has no entry: dropped
        rows = jnp.arange(B)[:, None]
        cache = kv.LayerKV(
            k=state.cache.k.at[rows, slot, 0].set(c, mode="drop"),
            v=state.cache.v.at[rows, slot, 0].set(k_pe, mode="drop"),
        )
        return MTPState(hidden=hidden, cache=cache)

    def propose(self, state: MTPState, anchor, lengths, params: SamplingParams, keys, K: int) -> Proposal:
        """`K` chained MTP steps after each row's anchor (at position `lengths`)."""
        B = anchor.shape[0]
        C = state.hidden.shape[1]
        t = self.config.target
        p0 = lengths - 1  # the anchor's entry: (h at lengths - 1, anchor)
        h0 = jnp.take_along_axis(state.hidden, jnp.maximum(p0, 0)[:, None, None], axis=1)[:, 0]
        layer = self.layer()
        attn = layer.self_attn
        cached_c, cached_pe = state.cache.k[:, :, 0], state.cache.v[:, :, 0]
        fresh_c = jnp.zeros((B, K, t.kv_lora_rank), self.dtype)
        fresh_pe = jnp.zeros((B, K, t.qk_rope_head_dim), self.dtype)

        def body(carry, k):
            token, h, fresh_c, fresh_pe = carry
            pos = (p0 + k)[:, None]
            cos, sin = self.rope(pos)
            x = self.project(token[:, None], h[:, None])
            xn = rms_norm(x, layer.input_layernorm[...], layer.eps)
            q_nope, q_pe = attn.queries(xn, cos, sin)
            c, k_pe = attn.latents(xn, cos, sin)
            fresh_c = jax.lax.dynamic_update_index_in_dim(fresh_c, c[:, 0], k, 1)
            fresh_pe = jax.lax.dynamic_update_index_in_dim(fresh_pe, k_pe[:, 0], k, 1)
            cached_mask = kv.cached_mask(pos, p0, C)  # committed entries strictly before the anchor's
            fresh_mask = jnp.broadcast_to(jnp.arange(K)[None, None, :] <= k, (B, 1, K))
            x = x + attn.attend(q_nope, q_pe, [(cached_c, cached_pe, cached_mask), (fresh_c, fresh_pe, fresh_mask)])
            x = x + layer.mlp(rms_norm(x, layer.post_attention_layernorm[...], layer.eps))
            g = rms_norm(x[:, 0], self.shared_head_norm[...], layer.eps)
            logits = jnp.einsum("bd,vd->bv", g, self.shared_head[...], preferred_element_type=jnp.float32)
            probs = sampling.probabilities(logits, params)
            new = sampling.token_at(probs, params, keys, lengths + k + 1, sampling.SALT_DRAFT)
            return (new, g, fresh_c, fresh_pe), (new, probs)

        with jax.named_scope("mtp_chain"):
            _, (drafts, probs) = jax.lax.scan(body, (anchor, h0, fresh_c, fresh_pe), jnp.arange(K))
        return Proposal(drafts.T, jnp.swapaxes(probs, 0, 1), jnp.full((B,), K, jnp.int32), None)

    # --- pieces ---------------------------------------------------------------------------------------
    def layer(self) -> DeepseekV3Layer:
        """The block's layer with its (single) stacked copy sliced out."""
        graphdef, state = nnx.split(self.block.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))[0]

    def rope(self, positions: jax.Array):
        t = self.config.target
        return cos_sin(positions, *inverse_frequencies(t.rope, t.qk_rope_head_dim), self.dtype)

    def project(self, tokens: jax.Array, hidden: jax.Array) -> jax.Array:
        """`eh_proj([enorm(emb(tokens)); hnorm(hidden)])` for `tokens [B, T]`, `hidden [B, T, D]`."""
        eps = self.config.target.rms_norm_eps
        e = rms_norm(jnp.take(self.embed_tokens[...], tokens, axis=0), self.enorm[...], eps)
        h = rms_norm(hidden.astype(self.dtype), self.hnorm[...], eps)
        return linear(jnp.concatenate([e, h], axis=-1), self.eh_proj[...])

    def layer_map(self) -> LayerMap:
        return LayerMap(self.config.layer, ("block", "layers", 0))
