"""DSpark draft backbone (DeepSpec `Qwen3DSparkModel` / `Gemma4DSparkModel` numerics).

Context projection `C = hidden_norm(F @ fc)` of the concatenated target features; in every layer the context
becomes extra keys/values through that layer's own `k_proj`/`v_proj`/`k_norm` (KV injection). The block
`[anchor, MASK...]` at absolute positions attends, without a mask, to all committed context and to every
block position. Context K/V depend only on target features, so they are cached for committed positions
(`extend_context`) and a round only computes the block.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import cache as kv
from dspark_jax.config import DraftConfig
from dspark_jax.draft.markov import ConfidenceHead, MarkovHead
from dspark_jax.layers import params
from dspark_jax.layers.attention import attention
from dspark_jax.layers.linear import linear
from dspark_jax.layers.mlp import gated_mlp
from dspark_jax.layers.norms import rms_norm, rms_norm_fp32
from dspark_jax.layers.rope import apply_rope, cos_sin, inverse_frequencies


def _norm_fn(cfg: DraftConfig):
    """Qwen3 drafts use Llama-style RMSNorm; Gemma 4 drafts normalise entirely in fp32."""
    return rms_norm_fp32 if cfg.family == "gemma4" else rms_norm


class DraftAttention(nnx.Module):
    def __init__(self, cfg: DraftConfig, dtype, rngs: nnx.Rngs):
        D, N, G, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = params.normal(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), dtype)
        self.k_proj = params.normal(rngs, (D, G, H), ("embed", "kv_heads", "head_dim"), dtype)
        if not cfg.attention_k_eq_v:
            self.v_proj = params.normal(rngs, (D, G, H), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = params.normal(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), dtype)
        self.q_norm = params.ones((H,), ("head_dim",), dtype)
        self.k_norm = params.ones((H,), ("head_dim",), dtype)
        if cfg.attention_bias:
            self.q_bias = params.zeros((N, H), ("q_heads", "head_dim"), dtype)
            self.k_bias = params.zeros((G, H), ("kv_heads", "head_dim"), dtype)
            if not cfg.attention_k_eq_v:
                self.v_bias = params.zeros((G, H), ("kv_heads", "head_dim"), dtype)
            self.o_bias = params.zeros((D,), ("embed",), dtype)
        self.gemma = cfg.family == "gemma4"
        self.k_eq_v = cfg.attention_k_eq_v
        self.bias = cfg.attention_bias
        self.eps = cfg.rms_norm_eps
        self.scale = 1.0 if self.gemma else H**-0.5

    def _norm(self, x, w):
        return (rms_norm_fp32 if self.gemma else rms_norm)(x, w, self.eps)

    def keys_values(self, y: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Roped, k-normed keys and values `[B, T, G, H]` of inputs `y [B, T, D]`."""
        k_raw = linear(y, self.k_proj[...])
        if self.bias:
            k_raw = k_raw + self.k_bias[...]
        k = apply_rope(self._norm(k_raw, self.k_norm[...]), cos, sin)
        if self.k_eq_v:  # Gemma 4: V is the scale-free RMS norm of the (pre-norm, un-roped) key projection
            return k, rms_norm_fp32(k_raw, None, self.eps)
        v = linear(y, self.v_proj[...])
        if self.bias:
            v = v + self.v_bias[...]
        return k, (rms_norm_fp32(v, None, self.eps) if self.gemma else v)

    def __call__(self, y, cos, sin, context, block_mask):
        """Block queries over `context` parts `[(k, v, mask)]` and the block's own keys (`block_mask`)."""
        q = linear(y, self.q_proj[...])
        if self.bias:
            q = q + self.q_bias[...]
        q = apply_rope(self._norm(q, self.q_norm[...]), cos, sin)
        kb, vb = self.keys_values(y, cos, sin)
        out = attention(q, [*context, (kb, vb, block_mask)], self.scale)
        out = linear(out, self.o_proj[...], in_dims=2)
        return out + self.o_bias[...] if self.bias else out


class DraftLayer(nnx.Module):
    def __init__(self, cfg: DraftConfig, dtype, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gemma = cfg.family == "gemma4"
        self.act = cfg.activation
        self.eps = cfg.rms_norm_eps
        self.rms = _norm_fn(cfg)
        self.self_attn = DraftAttention(cfg, dtype, rngs)
        self.input_layernorm = params.ones((D,), ("embed",), dtype)
        self.post_attention_layernorm = params.ones((D,), ("embed",), dtype)
        self.gate_proj = params.normal(rngs, (D, F), ("embed", "mlp"), dtype)
        self.up_proj = params.normal(rngs, (D, F), ("embed", "mlp"), dtype)
        self.down_proj = params.normal(rngs, (F, D), ("mlp", "embed"), dtype)
        if self.gemma:
            self.pre_feedforward_layernorm = params.ones((D,), ("embed",), dtype)
            self.post_feedforward_layernorm = params.ones((D,), ("embed",), dtype)
            self.layer_scalar = params.ones((1,), (None,), dtype)

    def _mlp(self, x):
        return gated_mlp(x, self.gate_proj[...], self.up_proj[...], self.down_proj[...], self.act)

    def __call__(self, x, cos, sin, context, block_mask):
        a = self.self_attn(self.rms(x, self.input_layernorm[...], self.eps), cos, sin, context, block_mask)
        if not self.gemma:
            x = x + a
            return x + self._mlp(self.rms(x, self.post_attention_layernorm[...], self.eps))
        x = x + self.rms(a, self.post_attention_layernorm[...], self.eps)
        m = self._mlp(self.rms(x, self.pre_feedforward_layernorm[...], self.eps))
        x = x + self.rms(m, self.post_feedforward_layernorm[...], self.eps)
        return x * self.layer_scalar[...]


class DSparkDraft(nnx.Module):
    """Parameters of a DSpark/DFlash draft and its pure forward pieces (caches passed explicitly)."""

    def __init__(self, cfg: DraftConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        D, V = cfg.hidden_size, cfg.vocab_size
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = params.normal(rngs, (V, D), ("vocab", "embed"), dtype)
        self.fc = params.normal(rngs, (cfg.num_features * D, D), ("features", "embed"), dtype)
        self.hidden_norm = params.ones((D,), ("embed",), dtype)
        self.layers = nnx.List([DraftLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = params.ones((D,), ("embed",), dtype)
        self.lm_head = params.normal(rngs, (V, D), ("vocab", "embed"), dtype)
        self.markov_head = MarkovHead(cfg, dtype, rngs) if cfg.markov_rank > 0 else None
        self.confidence_head = ConfidenceHead(cfg, dtype, rngs) if cfg.enable_confidence_head else None
        self._norm = _norm_fn(cfg)

    # --- shapes -----------------------------------------------------------------------------------
    def cache_shapes(self, capacity: int) -> list[tuple[int, int, int, int]]:
        c = self.config
        return [(capacity, c.num_kv_heads, c.head_dim, c.head_dim)] * c.num_layers

    def init_cache(self, batch: int, capacity: int) -> kv.KVCache:
        return kv.allocate(batch, self.cache_shapes(capacity), self.dtype)

    # --- pieces -----------------------------------------------------------------------------------
    def rope(self, positions: jax.Array):
        return cos_sin(positions, *inverse_frequencies(self.config.rope, self.config.head_dim), self.dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embed_tokens[...], ids, axis=0)
        if self.config.family == "gemma4":  # scale rounded to the weight dtype (62.0 for H=3840 in bf16)
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), self.embed_tokens.dtype)
        return x

    def project_context(self, features: jax.Array) -> jax.Array:
        """`C = hidden_norm(F @ fc)`: `[B, T, n_t * D]` target features -> `[B, T, D]`."""
        c = jnp.einsum("btf,fd->btd", features.astype(self.dtype), self.fc[...])
        return self._norm(c, self.hidden_norm[...], self.config.rms_norm_eps)

    def context_kv(self, features: jax.Array, positions: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Per-layer injected keys/values `[B, T, G, H]` for context features at `positions [B, T]`."""
        c = self.project_context(features)
        cos, sin = self.rope(positions)
        return [layer.self_attn.keys_values(c, cos, sin) for layer in self.layers]

    def extend_context(self, features: jax.Array, lengths: jax.Array, cache: kv.KVCache) -> kv.KVCache:
        """Write the context K/V of `features [B, T, F]` (positions `lengths + t`) into the draft cache."""
        T = features.shape[1]
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        kvs = self.context_kv(features, positions)
        return kv.KVCache(
            k=tuple(kv.write(cache.k[i], k, lengths) for i, (k, _) in enumerate(kvs)),
            v=tuple(kv.write(cache.v[i], v, lengths) for i, (_, v) in enumerate(kvs)),
        )

    def block_hidden(self, ids: jax.Array, lengths: jax.Array, cache: kv.KVCache) -> jax.Array:
        """Final-normed hidden `[B, T, D]` of the block `ids [B, T]` at positions `lengths + t`."""
        B, T = ids.shape
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        cos, sin = self.rope(positions)
        x = self.embed(ids)
        full = kv.block_mask(B, T, causal=False)
        for i, layer in enumerate(self.layers):
            mask = kv.cached_mask(positions, lengths, cache.k[i].shape[1])
            with jax.named_scope(f"draft_layer_{i}"):
                x = layer(x, cos, sin, [(cache.k[i], cache.v[i], mask)], full)
        return self.final_norm(x)

    def final_norm(self, x: jax.Array) -> jax.Array:
        """The final RMSNorm of the block stream; its output `[..., D]` feeds every head."""
        return self._norm(x, self.norm[...], self.config.rms_norm_eps)

    def base_logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits of the (frozen) LM head; Gemma 4 soft-caps them (before any Markov bias)."""
        logits = jnp.einsum("...d,vd->...v", hidden, self.lm_head[...], preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        return cap * jnp.tanh(logits / cap) if cap else logits

    def confidence(self, hidden: jax.Array, prev: jax.Array) -> jax.Array:
        """Confidence logits (fp32) for block hidden states and the previous tokens of those positions."""
        e = self.markov_head.embed(prev) if self.markov_head is not None else None
        return self.confidence_head(hidden, e)
