"""Gemma 4 text decoders (HF `models/gemma4` and `models/gemma4_unified` numerics).

Per layer: sandwich norms around attention and the FFN, then `layer_scalar` times the whole hidden state.
Sliding layers (their own head dim, KV heads, default RoPE, window W) and full layers (global head dim,
proportional RoPE, with `attention_k_eq_v` the key projection doubles as the value). q/k RMS-normed with a
weight, v without; attention scale 1.0. All norms are fp32 `w * x_hat` (no `1 + w`). Optional pieces:
per-layer inputs (PLE), KV sharing across the last layers, a double-wide MLP on the sharing layers, and a
routed MoE in parallel with the dense MLP. Scaled embedding (scale rounded to the weight dtype), tied head,
final logit soft-capping.

Caches: one per layer that owns K/V (KV-sharing layers own none). Full layers get linear caches of
`capacity` slots; sliding layers get ring buffers of `min(capacity, W + max_block - 1)` slots, written
after attending with `num_valid` so a prefill keeps only its tail and padding never evicts live entries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import cache as kv
from dspark_jax.config import FULL, SLIDING, Gemma4Config
from dspark_jax.layers import params
from dspark_jax.layers.attention import attention
from dspark_jax.layers.linear import linear
from dspark_jax.layers.mlp import ACTIVATIONS, GatedMLP
from dspark_jax.layers.moe import routed_experts, softmax_topk_routing
from dspark_jax.layers.norms import rms_norm_fp32
from dspark_jax.layers.rope import apply_rope, cos_sin, inverse_frequencies


def _scale_in(value: float, dtype) -> jax.Array:
    """A constant multiplier the way HF builds it: an fp32 buffer cast to the weight dtype (sqrt(3840) -> 62.0 in bf16)."""
    return jnp.asarray(np.float32(value)).astype(dtype)


class Gemma4Attention(nnx.Module):
    def __init__(self, cfg: Gemma4Config, layer: int, dtype, rngs: nnx.Rngs):
        D, N = cfg.hidden_size, cfg.num_heads
        G, H = cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer)
        self.q_proj = params.normal(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), dtype)
        self.q_norm = params.ones((H,), ("head_dim",), dtype)
        self.o_proj = params.normal(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), dtype)
        self.owns_kv = cfg.kv_source(layer) == layer
        self.k_eq_v = cfg.layer_k_eq_v(layer)
        if self.owns_kv:
            self.k_proj = params.normal(rngs, (D, G, H), ("embed", "kv_heads", "head_dim"), dtype)
            self.k_norm = params.ones((H,), ("head_dim",), dtype)
            if not self.k_eq_v:
                self.v_proj = params.normal(rngs, (D, G, H), ("embed", "kv_heads", "head_dim"), dtype)
        self.eps = cfg.rms_norm_eps

    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        q = linear(x, self.q_proj[...])
        return apply_rope(rms_norm_fp32(q, self.q_norm[...], self.eps), cos, sin)

    def keys_values(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Roped, k-normed keys and scale-free-normed values `[B, T, G, H]`; with K=V the value is the
        normed *pre-k_norm, un-roped* key projection."""
        k_raw = linear(x, self.k_proj[...])
        v_raw = k_raw if self.k_eq_v else linear(x, self.v_proj[...])
        k = apply_rope(rms_norm_fp32(k_raw, self.k_norm[...], self.eps), cos, sin)
        return k, rms_norm_fp32(v_raw, None, self.eps)

    def __call__(self, x, cos, sin, cached, cached_mask, fresh, fresh_mask):
        """`x [B, T, D]` over `cached = (k, v)` committed slots and the block's `fresh = (k, v)` -> `[B, T, D]`."""
        q = self.queries(x, cos, sin)
        out = attention(q, [(*cached, cached_mask), (*fresh, fresh_mask)], 1.0)
        return linear(out, self.o_proj[...], in_dims=2)


class Gemma4Router(nnx.Module):
    """Softmax top-k over E experts of `proj(rms_norm_noscale(x) * scale / sqrt(D))`, renormalised, times
    each chosen expert's learned scale."""

    def __init__(self, cfg: Gemma4Config, dtype, rngs: nnx.Rngs):
        D, E = cfg.hidden_size, cfg.num_experts
        self.proj = params.normal(rngs, (D, E), ("embed", None), dtype)
        self.scale = params.ones((D,), ("embed",), dtype)
        self.per_expert_scale = params.ones((E,), (None,), dtype)
        self.top_k = cfg.top_k_experts
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`x [M, D]` -> (weights [M, k] fp32, expert ids [M, k])."""
        h = rms_norm_fp32(x, None, self.eps) * self.scale[...] * x.shape[-1] ** -0.5
        weights, idx = softmax_topk_routing(h @ self.proj[...], self.top_k, renormalize=True)
        return weights * jnp.take(self.per_expert_scale[...], idx).astype(jnp.float32), idx


class Gemma4Experts(nnx.Module):
    def __init__(self, cfg: Gemma4Config, dtype, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.gate_proj = params.normal(rngs, (E, D, F), ("experts", "embed", "mlp"), dtype)
        self.up_proj = params.normal(rngs, (E, D, F), ("experts", "embed", "mlp"), dtype)
        self.down_proj = params.normal(rngs, (E, F, D), ("experts", "mlp", "embed"), dtype)
        self.act = cfg.activation

    def __call__(self, x, weights, idx):
        return routed_experts(x, weights, idx, self.gate_proj[...], self.up_proj[...], self.down_proj[...], self.act)


class Gemma4Layer(nnx.Module):
    def __init__(self, cfg: Gemma4Config, layer: int, dtype, rngs: nnx.Rngs):
        D, P = cfg.hidden_size, cfg.hidden_size_per_layer_input
        self.self_attn = Gemma4Attention(cfg, layer, dtype, rngs)
        self.mlp = GatedMLP(D, cfg.layer_intermediate_size(layer), cfg.activation, dtype, rngs)
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            setattr(self, name, params.ones((D,), ("embed",), dtype))
        self.layer_scalar = params.ones((1,), (None,), dtype)
        self.moe = cfg.enable_moe_block
        if self.moe:
            self.router = Gemma4Router(cfg, dtype, rngs)
            self.experts = Gemma4Experts(cfg, dtype, rngs)
            for name in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
                setattr(self, name, params.ones((D,), ("embed",), dtype))
        self.ple = P > 0
        if self.ple:
            self.per_layer_input_gate = params.normal(rngs, (D, P), ("embed", None), dtype)
            self.per_layer_projection = params.normal(rngs, (P, D), (None, "embed"), dtype)
            self.post_per_layer_input_norm = params.ones((D,), ("embed",), dtype)
        self.act = cfg.activation
        self.eps = cfg.rms_norm_eps

    def _norm(self, x, name):
        return rms_norm_fp32(x, getattr(self, name)[...], self.eps)

    def feed_forward(self, x: jax.Array) -> jax.Array:
        """Dense GeGLU, plus (MoE models) routed experts on the same residual, each with its own norms."""
        h = self.mlp(self._norm(x, "pre_feedforward_layernorm"))
        if not self.moe:
            return h
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, idx = self.router(flat)
        routed = self.experts(self._norm(flat, "pre_feedforward_layernorm_2"), weights, idx).reshape(B, T, D)
        return self._norm(h, "post_feedforward_layernorm_1") + self._norm(routed, "post_feedforward_layernorm_2")

    def __call__(self, x, cos, sin, cached, cached_mask, fresh_mask, shared=None, per_layer_input=None):
        """One layer over `cached = (k, v)` slots of its KV source. A KV-sharing layer gets the source's fresh
        block K/V as `shared`; any other layer computes its own. -> (output `[B, T, D]`, the block's K/V)."""
        h = self._norm(x, "input_layernorm")
        fresh = self.self_attn.keys_values(h, cos, sin) if shared is None else shared
        a = self.self_attn(h, cos, sin, cached, cached_mask, fresh, fresh_mask)
        x = x + self._norm(a, "post_attention_layernorm")
        x = x + self._norm(self.feed_forward(x), "post_feedforward_layernorm")
        if self.ple:
            g = ACTIVATIONS[self.act](jnp.einsum("btd,dp->btp", x, self.per_layer_input_gate[...])) * per_layer_input
            x = x + self._norm(
                jnp.einsum("btp,pd->btd", g, self.per_layer_projection[...]), "post_per_layer_input_norm"
            )
        return x * self.layer_scalar[...], fresh


class Gemma4Model(nnx.Module):
    """Gemma 4 / Gemma 4 unified causal LM. Holds parameters only; caches are passed in and returned."""

    def __init__(self, cfg: Gemma4Config, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        D, V, L, P = cfg.hidden_size, cfg.vocab_size, cfg.num_layers, cfg.hidden_size_per_layer_input
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = params.normal(rngs, (V, D), ("vocab", "embed"), dtype)
        if P > 0:
            self.embed_tokens_per_layer = params.normal(
                rngs, (cfg.vocab_size_per_layer_input, L * P), ("vocab", None), dtype
            )
            self.per_layer_model_projection = params.normal(rngs, (D, L, P), ("embed", None, None), dtype)
            self.per_layer_projection_norm = params.ones((P,), (None,), dtype)
        self.layers = nnx.List([Gemma4Layer(cfg, i, dtype, rngs) for i in range(L)])
        self.norm = params.ones((D,), ("embed",), dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = params.normal(rngs, (V, D), ("vocab", "embed"), dtype)

    def _slots(self, layer: int, capacity: int, max_block: int) -> int:
        c = self.config
        return min(capacity, c.sliding_window + max_block - 1) if c.is_sliding(layer) else capacity

    def cache_shapes(self, capacity: int, max_block: int = 1) -> list[tuple[int, int, int, int]]:
        """`(slots, kv_heads, head_dim, head_dim)` per cache-owning layer (`config.cache_layers`)."""
        c = self.config
        return [
            (self._slots(i, capacity, max_block), c.layer_kv_heads(i), c.layer_head_dim(i), c.layer_head_dim(i))
            for i in c.cache_layers
        ]

    def init_cache(self, batch: int, capacity: int, max_block: int = 1) -> kv.KVCache:
        """Linear caches for full layers; ring buffers of `W + max_block - 1` slots for sliding layers.

        A block attends to the ring *before* writing itself, so its first query needs the `W - 1` positions
        before it; but a verify block of `T <= max_block` tokens that is then committed only in part has
        already overwritten its `T - 1` rejected slots, which the next round must not miss: `W + T - 2` slots
        is the minimum (one fewer makes the partial-commit test fail); one slot is kept to spare."""
        return kv.allocate(batch, self.cache_shapes(capacity, max_block), self.dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0) * _scale_in(
            math.sqrt(self.config.hidden_size), self.dtype
        )

    def per_layer_inputs(self, tokens: jax.Array, x: jax.Array) -> jax.Array:
        """PLE `[B, T, L, P]`: `(rms_norm(x @ W / sqrt(D)) + embed_per_layer(tokens) * sqrt(P)) / sqrt(2)`."""
        c = self.config
        B, T = tokens.shape
        L, P = c.num_layers, c.hidden_size_per_layer_input
        token_part = jnp.take(self.embed_tokens_per_layer[...], tokens, axis=0) * _scale_in(math.sqrt(P), self.dtype)
        context = linear(x, self.per_layer_model_projection[...]) * c.hidden_size**-0.5
        context = rms_norm_fp32(context, self.per_layer_projection_norm[...], c.rms_norm_eps)
        return (context + token_part.reshape(B, T, L, P)) * 2.0**-0.5

    def __call__(
        self,
        tokens: jax.Array,
        lengths: jax.Array,
        cache: kv.KVCache,
        *,
        capture: tuple[int, ...] = (),
        num_valid: jax.Array | None = None,
    ) -> tuple[jax.Array, kv.KVCache, jax.Array | None]:
        """Run `tokens [B, T]` at positions `lengths[b] + t` on top of `cache`.

        Returns the final-normed hidden `[B, T, D]`, the cache with the block written at `lengths`, and the
        concatenation `[B, T, len(capture) * D]` of the requested hidden states in HF `output_hidden_states`
        indexing (0 = scaled embedding, i + 1 = output of layer i, L = final norm), or None. `num_valid [B]`
        (default: all T) is how many block tokens are real; only they enter the ring buffers.
        """
        c = self.config
        B, T = tokens.shape
        if num_valid is None:
            num_valid = jnp.full((B,), T, jnp.int32)
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        geometry = {}  # layer type -> (cos, sin, cached mask, fresh mask); every layer of a type shares them
        for kind, rope, head_dim in ((SLIDING, c.rope_sliding, c.head_dim), (FULL, c.rope_full, c.global_head_dim)):
            layer = next((i for i in c.cache_layers if c.layer_types[i] == kind), None)
            if layer is None:
                continue
            window = c.sliding_window if kind == SLIDING else None
            cos, sin = cos_sin(positions, *inverse_frequencies(rope, head_dim), self.dtype)
            geometry[kind] = (
                cos,
                sin,
                kv.cached_mask(positions, lengths, cache.k[layer].shape[1], window=window),
                kv.block_mask(B, T, causal=True, window=window),
            )

        x = self.embed(tokens)
        ple = self.per_layer_inputs(tokens, x) if c.hidden_size_per_layer_input else None
        captured = {0: x}
        ks, vs = list(cache.k), list(cache.v)
        fresh = {}  # cache-owning layer -> the block's K/V, written to its cache after the forward
        for i, layer in enumerate(self.layers):
            cos, sin, cached_mask, fresh_mask = geometry[c.layer_types[i]]
            src = c.kv_source(i)
            with jax.named_scope(f"layer_{i}"):
                x, fresh[src] = layer(
                    x,
                    cos,
                    sin,
                    (cache.k[src], cache.v[src]),
                    cached_mask,
                    fresh_mask,
                    shared=fresh.get(src),
                    per_layer_input=None if ple is None else ple[:, :, i],
                )
            captured[i + 1] = x
        for i, (k, v) in fresh.items():
            if c.is_sliding(i):
                ks[i], vs[i] = kv.write(ks[i], k, lengths, num_valid), kv.write(vs[i], v, lengths, num_valid)
            else:
                ks[i], vs[i] = kv.write(ks[i], k, lengths), kv.write(vs[i], v, lengths)
        x = rms_norm_fp32(x, self.norm[...], c.rms_norm_eps)
        captured[c.num_layers] = x
        features = jnp.concatenate([captured[i] for i in capture], axis=-1) if capture else None
        return x, kv.KVCache(k=tuple(ks), v=tuple(vs)), features

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits `[..., V]` of final-normed hidden states, soft-capped `cap * tanh(z / cap)`."""
        head = self.embed_tokens[...] if self.config.tie_word_embeddings else self.lm_head[...]
        z = jnp.einsum("...d,vd->...v", hidden, head, preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        return cap * jnp.tanh(z / cap) if cap else z
