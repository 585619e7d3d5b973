"""Qwen3 dense and Qwen3-MoE text decoders (HF `models/qwen3`, `models/qwen3_moe` numerics).

GQA with an explicit head dim, per-head q/k RMSNorm before RoPE, RoPE (default or YaRN), SwiGLU or a
softmax top-k routed MoE, Llama-style RMSNorm (cast to the input dtype before the weight multiply).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import cache as kv
from dspark_jax.config import Qwen3Config
from dspark_jax.layers import params
from dspark_jax.layers.attention import attention
from dspark_jax.layers.linear import linear
from dspark_jax.layers.mlp import GatedMLP
from dspark_jax.layers.moe import routed_experts, softmax_topk_routing
from dspark_jax.layers.norms import rms_norm
from dspark_jax.layers.rope import apply_rope, cos_sin, inverse_frequencies


class Qwen3Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, dtype, rngs: nnx.Rngs):
        D, N, G, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = params.normal(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), dtype)
        self.k_proj = params.normal(rngs, (D, G, H), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = params.normal(rngs, (D, G, H), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = params.normal(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), dtype)
        self.q_norm = params.ones((H,), ("head_dim",), dtype)
        self.k_norm = params.ones((H,), ("head_dim",), dtype)
        if cfg.attention_bias:
            self.q_bias = params.zeros((N, H), ("q_heads", "head_dim"), dtype)
            self.k_bias = params.zeros((G, H), ("kv_heads", "head_dim"), dtype)
            self.v_bias = params.zeros((G, H), ("kv_heads", "head_dim"), dtype)
            self.o_bias = params.zeros((D,), ("embed",), dtype)
        self.eps = cfg.rms_norm_eps
        self.bias = cfg.attention_bias
        self.scale = H**-0.5

    def __call__(self, x, cos, sin, positions, lengths, k_cache, v_cache):
        """`x [B, T, D]` at `positions [B, T]` over committed cache slots; returns output and updated K/V."""
        with jax.named_scope("qkv"):
            q = linear(x, self.q_proj[...])
            k = linear(x, self.k_proj[...])
            v = linear(x, self.v_proj[...])
            if self.bias:
                q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
            q = apply_rope(rms_norm(q, self.q_norm[...], self.eps), cos, sin)
            k = apply_rope(rms_norm(k, self.k_norm[...], self.eps), cos, sin)
        B, T = x.shape[:2]
        with jax.named_scope("attend"):
            out = attention(
                q,
                [
                    (k_cache, v_cache, kv.cached_mask(positions, lengths, k_cache.shape[1])),
                    (k, v, kv.block_mask(B, T, causal=True)),
                ],
                self.scale,
            )
            out = linear(out, self.o_proj[...], in_dims=2)
            if self.bias:
                out = out + self.o_bias[...]
        return out, kv.write(k_cache, k, lengths), kv.write(v_cache, v, lengths)


class Qwen3MoE(nnx.Module):
    def __init__(self, cfg: Qwen3Config, dtype, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.router = params.normal(rngs, (D, E), ("embed", None), dtype)
        self.gate_proj = params.normal(rngs, (E, D, F), ("experts", "embed", "mlp"), dtype)
        self.up_proj = params.normal(rngs, (E, D, F), ("experts", "embed", "mlp"), dtype)
        self.down_proj = params.normal(rngs, (E, F, D), ("experts", "mlp", "embed"), dtype)
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob

    def __call__(self, x):
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, idx = softmax_topk_routing(flat @ self.router[...], self.top_k, self.renormalize)
        # HF casts the routing weights back to the activation dtype before combining.
        weights = weights.astype(x.dtype)
        out = routed_experts(flat, weights, idx, self.gate_proj[...], self.up_proj[...], self.down_proj[...], "silu")
        return out.reshape(B, T, D)


class Qwen3Layer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, index: int, dtype, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.input_layernorm = params.ones((D,), ("embed",), dtype)
        self.post_attention_layernorm = params.ones((D,), ("embed",), dtype)
        self.self_attn = Qwen3Attention(cfg, dtype, rngs)
        sparse = bool(cfg.moe_layers) and cfg.moe_layers[index]
        self.mlp = Qwen3MoE(cfg, dtype, rngs) if sparse else GatedMLP(D, cfg.intermediate_size, "silu", dtype, rngs)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x, cos, sin, positions, lengths, k_cache, v_cache):
        h, k_cache, v_cache = self.self_attn(
            rms_norm(x, self.input_layernorm[...], self.eps), cos, sin, positions, lengths, k_cache, v_cache
        )
        x = x + h
        x = x + self.mlp(rms_norm(x, self.post_attention_layernorm[...], self.eps))
        return x, k_cache, v_cache


class Qwen3Model(nnx.Module):
    """Qwen3 / Qwen3-MoE causal LM. Holds parameters only; caches are passed in and returned."""

    def __init__(self, cfg: Qwen3Config, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        D, V = cfg.hidden_size, cfg.vocab_size
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = params.normal(rngs, (V, D), ("vocab", "embed"), dtype)
        self.layers = nnx.List([Qwen3Layer(cfg, i, dtype, rngs) for i in range(cfg.num_layers)])
        self.norm = params.ones((D,), ("embed",), dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = params.normal(rngs, (V, D), ("vocab", "embed"), dtype)

    def cache_shapes(self, capacity: int) -> list[tuple[int, int, int, int]]:
        c = self.config
        return [(capacity, c.num_kv_heads, c.head_dim, c.head_dim)] * c.num_layers

    def init_cache(self, batch: int, capacity: int, max_block: int = 1) -> kv.KVCache:
        """Linear caches of `capacity` slots (`max_block` sizes ring buffers in models with sliding layers)."""
        del max_block
        return kv.allocate(batch, self.cache_shapes(capacity), self.dtype)

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

        Returns the final-normed hidden `[B, T, D]`, the cache with the block written at `lengths`, and
        the concatenation `[B, T, len(capture) * D]` of the requested hidden states in HF
        `output_hidden_states` indexing (0 = embedding output, i + 1 = raw output of layer i, L = final norm),
        or None. `num_valid` is accepted for interface parity with targets that have ring-buffer layers.
        """
        del num_valid
        B, T = tokens.shape
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        cos, sin = cos_sin(positions, *inverse_frequencies(self.config.rope, self.config.head_dim), self.dtype)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        captured = {0: x}
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, k, v = layer(x, cos, sin, positions, lengths, cache.k[i], cache.v[i])
            ks.append(k)
            vs.append(v)
            captured[i + 1] = x
        x = rms_norm(x, self.norm[...], self.config.rms_norm_eps)
        captured[self.config.num_layers] = x
        features = jnp.concatenate([captured[i] for i in capture], axis=-1) if capture else None
        return x, kv.KVCache(k=tuple(ks), v=tuple(vs)), features

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits `[..., V]` of final-normed hidden states."""
        head = self.embed_tokens[...] if self.config.tie_word_embeddings else self.lm_head[...]
        return jnp.einsum("...d,vd->...v", hidden, head, preferred_element_type=jnp.float32)
