"""EAGLE-3 drafts (docs/eagle3.md): one decoder layer over fused target features, drafting a chain token by token.

The layer is built from the Qwen3 family's own blocks: its attention (`Qwen3Attention`, run over the 2H-wide
input `[embedding ; hidden]` and projecting back to H) and its gated MLP, with the family's RMSNorm and RoPE.
An *entry* (residual r, token x, position p) goes through the layer once (docs/eagle3.md §3); context entries
pair the projected target features of position t with the committed token at t + 1 (§4), drafted entries feed
the draft's own output and token back (§5).

State (docs/eagle3.md §4): the layer's keys/values by slot `position + 1` and the projected features by
position, both written ahead and committed by the engine's `lengths` (docs/caches.md §2). The entry of the
last committed position needs the token after it, which only the next anchor supplies, so it is computed in
`propose` and written by the following `extend`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.config import SamplingParams
from dspark_jax.engine import sampling
from dspark_jax.engine.contracts import Proposal
from dspark_jax.errors import ConfigError
from dspark_jax.layers import kv_cache as kv
from dspark_jax.layers.mlp import GatedMLP
from dspark_jax.layers.norms import rms_norm
from dspark_jax.layers.params import Init
from dspark_jax.layers.rope import cos_sin, inverse_frequencies
from dspark_jax.models.qwen3.config import Qwen3Config
from dspark_jax.models.qwen3.model import Qwen3Attention

DEEPSPEC = "deepspec"  # `Qwen3Eagle3Model`: 5 feature layers, full vocabulary (docs/eagle3.md §1.1)
REDUCED_VOCAB = "reduced_vocab"  # `midlayer.*` keys, `d2t` draft -> target token offsets (docs/eagle3.md §1.2)


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """An EAGLE-3 draft. `layer` is the Qwen3 config of its single decoder layer (the target's geometry)."""

    layer: Qwen3Config
    target_layer_ids: tuple[int, ...]
    draft_length: int  # the longest chain one round drafts (`ttt_length` of the checkpoint)
    layout: str = DEEPSPEC
    num_target_layers: int | None = None  # None when the checkpoint does not say
    draft_vocab_size: int | None = None  # None: the full target vocabulary
    target_hidden_size: int | None = None  # None: the draft's hidden size
    step_loss_decay: float = 0.8  # training only (docs/eagle3.md §8)

    @property
    def vocab_size(self) -> int:
        return self.layer.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.layer.hidden_size

    @property
    def head_vocab_size(self) -> int:
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab_size is not None

    @property
    def feature_width(self) -> int:
        return len(self.target_layer_ids) * (self.target_hidden_size or self.hidden_size)

    @property
    def hidden_state_indices(self) -> tuple[int, ...]:
        """HF `output_hidden_states` indices: layer id l -> l + 1 (docs/eagle3.md §2)."""
        return tuple(i + 1 for i in self.target_layer_ids)


class VocabMap(nnx.Variable):
    """Target token id of every draft token (reduced vocabulary); not trained."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Eagle3State:
    k: jax.Array  # [B, G, S, Hd] keys of the entry at position s - 1 in slot s (a cache: heads-major)
    v: jax.Array  # [B, G, S, Hd]
    residual: jax.Array  # [B, S, D] fc(F_t) of position t


class Entry(NamedTuple):
    """What one entry's pass through the layer produces (docs/eagle3.md §3)."""

    hidden: jax.Array  # h' = r + a + m, the raw residual stream
    k: jax.Array
    v: jax.Array
    attn_input: jax.Array  # u = [norm_in(embedding) ; norm_hidden(r)]
    attn_output: jax.Array  # a
    mlp_output: jax.Array  # m


class Chain(NamedTuple):
    """A drafted chain, one row per entry processed (`steps` of them)."""

    tokens: jax.Array  # i32[B, steps] x_1 .. x_steps
    probs: jax.Array  # f32[B, steps, V] their distributions over the target vocabulary
    logits: jax.Array  # f32[B, steps, V] draft logits (target vocabulary; -inf outside a reduced one)
    hidden: jax.Array  # [B, steps, D] h_0 .. h_{steps-1}
    attn_input: jax.Array  # [B, steps, 2D]
    attn_output: jax.Array  # [B, steps, D]
    mlp_output: jax.Array  # [B, steps, D]


class Eagle3Attention(Qwen3Attention):
    """The Qwen3 attention block over the 2H-wide `[embedding ; hidden]` input, projecting back to H."""

    def __init__(self, cfg: Qwen3Config, init: Init):
        D = cfg.hidden_size
        super().__init__(dataclasses.replace(cfg, hidden_size=2 * D), init)
        self.o_proj = init.normal((cfg.num_heads, cfg.head_dim, D), ("q_heads", "head_dim", "embed"))
        if cfg.attention_bias:
            self.o_bias = init.zeros((D,), ("embed",))


class Eagle3Layer(nnx.Module):
    """The single EAGLE-3 decoder layer (docs/eagle3.md §3): Qwen3 attention and MLP, its own `hidden_norm`."""

    def __init__(self, cfg: Qwen3Config, init: Init):
        D = cfg.hidden_size
        self.hidden_norm = init.ones((D,), ("embed",))
        self.input_layernorm = init.ones((D,), ("embed",))
        self.post_attention_layernorm = init.ones((D,), ("embed",))
        self.self_attn = Eagle3Attention(cfg, init)
        self.mlp = GatedMLP(D, cfg.intermediate_size, "silu", init)
        self.eps = cfg.rms_norm_eps

    def attention_input(self, embedded: jax.Array, residual: jax.Array) -> jax.Array:
        """`u = [norm_in(e) ; norm_hidden(r)]`, embedding half first."""
        e = rms_norm(embedded, self.input_layernorm[...], self.eps)
        g = rms_norm(residual, self.hidden_norm[...], self.eps)
        return jnp.concatenate([e, g], axis=-1)

    def keys_values(self, embedded, residual, cos, sin):
        """Keys/values of entries: they depend only on the entry itself (one layer)."""
        return self.self_attn.keys_values(self.attention_input(embedded, residual), cos, sin)

    def __call__(self, embedded, residual, cos, sin, parts, fresh_mask) -> Entry:
        u = self.attention_input(embedded, residual)
        a, k, v = self.self_attn(u, cos, sin, parts, fresh_mask)
        h = residual + a
        m = self.mlp(rms_norm(h, self.post_attention_layernorm[...], self.eps))
        return Entry(h + m, k, v, u, a, m)


class Eagle3Draft(nnx.Module):
    """Parameters of an EAGLE-3 draft and its proposer contract (`engine.contracts.Proposer`)."""

    def __init__(self, cfg: Eagle3Config, init: Init):
        D = cfg.hidden_size
        self.config = cfg
        self.dtype = jnp.dtype(init.dtype)
        self.embed_tokens = init.normal((cfg.vocab_size, D), ("vocab", "embed"))
        self.fc = init.normal((cfg.feature_width, D), ("features", "embed"))
        self.layer = Eagle3Layer(cfg.layer, init)
        self.norm = init.ones((D,), ("embed",))
        self.lm_head = init.normal((cfg.head_vocab_size, D), ("vocab", "embed"))
        if cfg.reduced_vocab:
            self.vocab_map = VocabMap(jnp.arange(cfg.head_vocab_size, dtype=jnp.int32), axes=("vocab",))
        self.max_draft_length = cfg.draft_length
        self.feature_indices = cfg.hidden_state_indices
        self.has_confidence = False

    # --- contract -------------------------------------------------------------------------------------
    def check_target(self, target_config) -> None:
        """Vocabulary, hidden size and feature layers must fit the target (docs/eagle3.md §7)."""
        t, d = target_config, self.config
        if d.vocab_size != t.vocab_size:
            raise ConfigError(f"EAGLE-3 draft vocab_size {d.vocab_size} != target vocab_size {t.vocab_size}: this draft was trained for another target")
        width = d.target_hidden_size or d.hidden_size
        if width != t.hidden_size:
            raise ConfigError(f"EAGLE-3 draft reads target features of width {width}, the target's hidden size is {t.hidden_size}: this draft was trained for another target")
        L = t.num_layers
        if d.num_target_layers is not None and d.num_target_layers != L:
            raise ConfigError(f"EAGLE-3 draft was built for a {d.num_target_layers}-layer target, this target has {L} layers")
        for i in d.target_layer_ids:
            if not 0 <= i < L:
                raise ConfigError(f"EAGLE-3 draft target_layer_ids {list(d.target_layer_ids)}: layer {i} is outside the target's {L} layers")
            if i == L - 1:
                raise ConfigError(
                    f"EAGLE-3 draft target_layer_ids {list(d.target_layer_ids)} uses the target's last layer {L - 1}, whose HF "
                    "hidden state is final-normed (docs/algorithm.md §2.1); the reference refuses it too"
                )

    def init_state(self, batch: int, capacity: int) -> Eagle3State:
        c = self.config.layer
        shape = (batch, c.num_kv_heads, capacity, c.head_dim)
        return Eagle3State(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                           jnp.zeros((batch, capacity, self.config.hidden_size), self.dtype))

    def extend(self, state: Eagle3State, tokens: jax.Array, features: jax.Array, lengths: jax.Array) -> Eagle3State:
        """Verified rows `tokens [B, T]`, `features [B, T, F]` at positions `lengths + t` (docs/eagle3.md §4).

        Writes the context entries of positions `lengths - 1 + t`: entry `lengths - 1` gets its token now
        (`tokens[:, 0]`, the anchor) with the projected features stored the round before, entry
        `lengths - 1 + t` (t >= 1) the projected features of row t - 1 and token `tokens[:, t]`. The projected
        features of all T rows are stored for the entry that completes next round. With `lengths = 0`
        (prefill) entry -1 lands in slot 0, which no mask ever shows.
        """
        B, T = tokens.shape
        fresh = self.project(features)  # [B, T, D]
        previous = state.residual[jnp.arange(B), jnp.maximum(lengths - 1, 0)]
        residual = jnp.concatenate([previous[:, None], fresh[:, :-1]], axis=1)
        positions = lengths[:, None] - 1 + jnp.arange(T, dtype=jnp.int32)[None, :]
        cos, sin = self.rope(positions)
        k, v = self.layer.keys_values(self.embed(tokens), residual, cos, sin)
        return Eagle3State(kv.write(state.k, k, lengths), kv.write(state.v, v, lengths), kv.write_rows(state.residual, fresh, lengths))

    def propose(self, state: Eagle3State, anchor, lengths, params: SamplingParams, keys, K: int) -> Proposal:
        """A chain of `K` drafts after each row's anchor (docs/eagle3.md §5); every draft is proposed."""
        chain = self.sample_chain(state, anchor, lengths, params, keys, K)
        B = anchor.shape[0]
        return Proposal(chain.tokens, chain.probs, jnp.full((B,), K, jnp.int32), None)

    # --- pieces ---------------------------------------------------------------------------------------
    def rope(self, positions: jax.Array):
        c = self.config.layer
        return cos_sin(positions, *inverse_frequencies(c.rope, c.head_dim), self.dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0)

    def project(self, features: jax.Array) -> jax.Array:
        """`fc(F)`: `[B, T, n * H_t]` target features -> `[B, T, D]` residual inputs (no norm, no bias)."""
        return jnp.einsum("btf,fd->btd", features.astype(self.dtype), self.fc[...])

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 draft logits over the target vocabulary of raw hidden states: `lm_head(norm(h))`; tokens outside a
        reduced draft vocabulary get -inf (docs/eagle3.md §1.2)."""
        normed = rms_norm(hidden, self.norm[...], self.config.layer.rms_norm_eps)
        out = jnp.einsum("...d,vd->...v", normed, self.lm_head[...], preferred_element_type=jnp.float32)
        if not self.config.reduced_vocab:
            return out
        full = jnp.full(out.shape[:-1] + (self.config.vocab_size,), -jnp.inf, jnp.float32)
        return full.at[..., self.vocab_map[...]].set(out)

    def sample_chain(self, state: Eagle3State, anchor, lengths, params: SamplingParams, keys, steps: int,
                     forced: jax.Array | None = None) -> Chain:
        """Process `steps` entries and draw one token after each (docs/eagle3.md §5).

        Entry 0 is the context entry of position `lengths - 1` (its projected features, token = anchor); entry
        k >= 1 is drafted: residual `h_{k-1}`, token `x_k`, position `lengths - 1 + k`. Entry k's output `h_k`
        gives the logits of `x_{k+1}` (position `lengths + k + 1`). Each entry attends to the committed context
        entries (positions `< lengths - 1`) and to the chain's entries up to itself. `forced [B, steps]`, if
        given, replaces the drawn tokens fed to the next entries (teacher forcing, as in training, §8).
        """
        B = anchor.shape[0]
        c = self.config.layer
        rows = jnp.arange(B)
        S = state.k.shape[kv.SEQ]
        slot_position = jnp.arange(S, dtype=jnp.int32)[None, :] - 1
        context_mask = ((slot_position >= 0) & (slot_position < lengths[:, None] - 1))[:, None, :]  # [B, 1, S]
        own_mask = jnp.ones((B, 1, 1), bool)
        fresh = jnp.zeros((B, c.num_kv_heads, steps, c.head_dim), self.dtype)  # the chain's entries, cache layout

        def body(carry, xs):
            residual, token, fk, fv = carry
            k, given = xs
            cos, sin = self.rope((lengths - 1 + k)[:, None])
            earlier = jnp.broadcast_to((jnp.arange(steps) < k)[None, None, :], (B, 1, steps))
            out = self.layer(self.embed(token[:, None]), residual[:, None], cos, sin,
                             [(state.k, state.v, context_mask), (fk, fv, earlier)], own_mask)
            fk = jax.lax.dynamic_update_slice_in_dim(fk, jnp.swapaxes(out.k, 1, 2), k, axis=kv.SEQ)
            fv = jax.lax.dynamic_update_slice_in_dim(fv, jnp.swapaxes(out.v, 1, 2), k, axis=kv.SEQ)
            h = out.hidden[:, 0]
            logits = self.logits(h)
            probs = sampling.probabilities(logits, params)
            drawn = sampling.token_at(probs, params, keys, lengths + k + 1, sampling.SALT_DRAFT)
            ys = (drawn, probs, logits, h, out.attn_input[:, 0], out.attn_output[:, 0], out.mlp_output[:, 0])
            return (h, drawn if forced is None else given, fk, fv), ys

        start = state.residual[rows, lengths - 1]
        given = jnp.zeros((steps, B), jnp.int32) if forced is None else jnp.swapaxes(forced, 0, 1)
        _, ys = jax.lax.scan(body, (start, anchor, fresh, fresh), (jnp.arange(steps), given))
        return Chain(*(jnp.swapaxes(y, 0, 1) for y in ys))

    def layer_map(self):
        return None


def random_draft(config: Eagle3Config, *, dtype="float32", seed: int = 0):
    """An EAGLE-3 draft with random weights (N(0, 0.02), norms 1) as a `Draft`."""
    from dspark_jax.handles import Draft

    return Draft.of_module(Eagle3Draft(config, Init(nnx.Rngs(seed), jnp.dtype(dtype))), config, dtype)


def draft_config_for(target_config: Qwen3Config, *, target_layer_ids: tuple[int, ...] | None = None,
                     draft_length: int = 7, draft_vocab_size: int | None = None, layout: str = DEEPSPEC,
                     step_loss_decay: float = 0.8) -> Eagle3Config:
    """An EAGLE-3 draft config shaped for `target_config` (its geometry, one dense layer, own head).

    The default feature layers are 5 interior layers spread over the target (the reference's count).
    """
    L = target_config.num_layers
    if target_layer_ids is None:
        if L < 6:
            raise ConfigError(f"a DeepSpec EAGLE-3 draft reads 5 distinct interior layers; a {L}-layer target has only {L - 1}")
        target_layer_ids = tuple(int(i) for i in np.linspace(0, L - 2, 5).round())  # spacing >= 1: distinct
    layer = dataclasses.replace(
        target_config, num_layers=1, tie_word_embeddings=False, num_experts=0, num_experts_per_tok=0,
        moe_intermediate_size=0, moe_layers=(), model_type="qwen3",
        intermediate_size=target_config.intermediate_size or 4 * target_config.hidden_size,
    )
    return Eagle3Config(layer=layer, target_layer_ids=tuple(target_layer_ids), draft_length=draft_length, layout=layout,
                        num_target_layers=L, draft_vocab_size=draft_vocab_size, step_loss_decay=step_loss_decay)

