"""Qwen3 dense and Qwen3-MoE decoders (HF `models/qwen3`, `models/qwen3_moe` numerics).

GQA with an explicit head dim, per-head q/k RMSNorm before RoPE, RoPE (default or YaRN), SwiGLU or a
softmax top-k routed MoE, Llama-style RMSNorm (cast to the input dtype before the weight multiply).

Layers are stacked and scanned (`layers.stack`): one group for uniform models, a repeating dense/sparse
pattern for MoE models with dense layers. The same layers serve the family's DSpark/DFlash drafts
(`proposers.dspark`): a draft is this model run on a block that attends, without a causal mask, to injected
context keys/values (`block_hidden`, `context_kv`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import sharding
from dspark_jax.layers import kv_cache as kv
from dspark_jax.layers import stack
from dspark_jax.layers.attention import attention
from dspark_jax.layers.linear import linear
from dspark_jax.layers.mlp import GatedMLP
from dspark_jax.layers.moe import routed_experts, softmax_topk_routing
from dspark_jax.layers.norms import rms_norm
from dspark_jax.layers.params import Init
from dspark_jax.layers.rope import apply_rope, cos_sin, inverse_frequencies
from dspark_jax.models.qwen3.config import SPARSE, Qwen3Config


class Qwen3Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, init: Init):
        D, N, G, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = init.normal((D, N, H), ("embed", "q_heads", "head_dim"))
        self.k_proj = init.normal((D, G, H), ("embed", "kv_heads", "head_dim"))
        self.v_proj = init.normal((D, G, H), ("embed", "kv_heads", "head_dim"))
        self.o_proj = init.normal((N, H, D), ("q_heads", "head_dim", "embed"))
        self.q_norm = init.ones((H,), ("head_dim",))
        self.k_norm = init.ones((H,), ("head_dim",))
        if cfg.attention_bias:
            self.q_bias = init.zeros((N, H), ("q_heads", "head_dim"))
            self.k_bias = init.zeros((G, H), ("kv_heads", "head_dim"))
            self.v_bias = init.zeros((G, H), ("kv_heads", "head_dim"))
            self.o_bias = init.zeros((D,), ("embed",))
        self.eps = cfg.rms_norm_eps
        self.bias = cfg.attention_bias
        self.scale = H**-0.5

    def keys_values(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Roped, k-normed keys and values `[B, T, G, H]` of inputs `x [B, T, D]`."""
        k = linear(x, self.k_proj[...])
        v = linear(x, self.v_proj[...])
        if self.bias:
            k, v = k + self.k_bias[...], v + self.v_bias[...]
        return apply_rope(rms_norm(k, self.k_norm[...], self.eps), cos, sin), v

    def __call__(self, x, cos, sin, parts, fresh_mask):
        """`x [B, T, D]` over earlier `parts [(k, v, mask)]` and its own block -> (output, block K, block V)."""
        with jax.named_scope("qkv"):
            q = linear(x, self.q_proj[...])
            if self.bias:
                q = q + self.q_bias[...]
            q = apply_rope(rms_norm(q, self.q_norm[...], self.eps), cos, sin)
            k, v = self.keys_values(x, cos, sin)
        with jax.named_scope("attend"):
            out = attention(q, parts, (k, v, fresh_mask), self.scale)
            out = linear(out, self.o_proj[...], in_dims=2)
            if self.bias:
                out = out + self.o_bias[...]
        return out, k, v


class Qwen3MoE(nnx.Module):
    def __init__(self, cfg: Qwen3Config, init: Init):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.router = init.normal((D, E), ("embed", None))
        self.gate_proj = init.normal((E, D, F), ("experts", "embed", "mlp"))
        self.up_proj = init.normal((E, D, F), ("experts", "embed", "mlp"))
        self.down_proj = init.normal((E, F, D), ("experts", "mlp", "embed"))
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
    def __init__(self, cfg: Qwen3Config, kind: str, init: Init):
        D = cfg.hidden_size
        self.input_layernorm = init.ones((D,), ("embed",))
        self.post_attention_layernorm = init.ones((D,), ("embed",))
        self.self_attn = Qwen3Attention(cfg, init)
        self.mlp = Qwen3MoE(cfg, init) if kind == SPARSE else GatedMLP(D, cfg.intermediate_size, "silu", init)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x, cos, sin, parts, fresh_mask):
        h, k, v = self.self_attn(rms_norm(x, self.input_layernorm[...], self.eps), cos, sin, parts, fresh_mask)
        x = x + h
        x = x + self.mlp(rms_norm(x, self.post_attention_layernorm[...], self.eps))
        return x, k, v


class Qwen3Model(nnx.Module):
    """Qwen3 / Qwen3-MoE causal LM. Holds parameters only; caches are passed in and returned."""

    def __init__(self, cfg: Qwen3Config, init: Init):
        D, V = cfg.hidden_size, cfg.vocab_size
        self.config = cfg
        self.dtype = jnp.dtype(init.dtype)
        self.embed_tokens = init.normal((V, D), ("vocab", "embed"))
        kinds = [cfg.layer_kind(i) for i in range(cfg.num_layers)]
        self.groups = nnx.List([
            stack.Group([Qwen3Layer(cfg, kind, init.stacked(n)) for kind in pattern], start, n)
            for start, pattern, n in stack.periodic_groups(kinds)
        ])
        self.norm = init.ones((D,), ("embed",))
        if not cfg.tie_word_embeddings:
            self.lm_head = init.normal((V, D), ("vocab", "embed"))

    # --- shapes ------------------------------------------------------------------------------------
    def layer_map(self) -> stack.LayerMap:
        return stack.LayerMap.of(self.groups)

    def cache_shapes(self, capacity: int, max_block: int = 1):
        c = self.config
        del max_block  # no ring buffers in this family
        return [[(g.n, capacity, c.num_kv_heads, c.head_dim, c.head_dim)] * g.period for g in self.groups]

    def init_cache(self, batch: int, capacity: int, max_block: int = 1) -> kv.Cache:
        """Linear caches of `capacity` slots (`max_block` sizes ring buffers in families with sliding layers)."""
        return kv.allocate(batch, self.cache_shapes(capacity, max_block), self.dtype)

    # --- pieces ------------------------------------------------------------------------------------
    def rope(self, positions: jax.Array):
        return cos_sin(positions, *inverse_frequencies(self.config.rope, self.config.head_dim), self.dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0)

    def rms_norm(self, x: jax.Array, weight: jax.Array) -> jax.Array:
        """This family's RMSNorm (drafts normalise their projected context with it)."""
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def final_norm(self, x: jax.Array) -> jax.Array:
        return self.rms_norm(x, self.norm[...])

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits `[..., V]` of final-normed hidden states."""
        head = self.embed_tokens[...] if self.config.tie_word_embeddings else self.lm_head[...]
        return jnp.einsum("...d,vd->...v", hidden, head, preferred_element_type=jnp.float32)

    # --- target forward ------------------------------------------------------------------------------
    def __call__(
        self,
        tokens: jax.Array,
        lengths: jax.Array,
        cache: kv.Cache,
        *,
        capture: tuple[int, ...] = (),
        num_valid: jax.Array | None = None,
    ) -> tuple[jax.Array, kv.Cache, jax.Array | None]:
        """Run `tokens [B, T]` at positions `lengths[b] + t` on top of `cache`.

        Returns the final-normed hidden `[B, T, D]`, the cache with the block written at `lengths`, and
        the concatenation `[B, T, len(capture) * D]` of the requested hidden states in HF
        `output_hidden_states` indexing (0 = embedding output, i + 1 = raw output of layer i, L = final norm),
        or None. `num_valid` is accepted for interface parity with targets that have ring-buffer layers.
        """
        del num_valid
        B, T = tokens.shape
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        cos, sin = self.rope(positions)
        fresh_mask = kv.block_mask(B, T, causal=True)
        x = sharding.constrain(self.embed(tokens), kv.ACTIVATION_AXES)
        cap = stack.Capture(capture, self.config.num_layers)
        buf = cap.record(cap.buffer(x), 0, x)
        cached_mask = kv.cached_mask(positions, lengths, cache[0][0].k.shape[1 + kv.SEQ])  # every layer's is linear
        new_cache = []
        for group, group_cache in zip(self.groups, cache):

            def body(layers, carry, inp):
                x, buf, caches = carry
                r, index = inp
                out = []
                for q, (layer, c) in enumerate(zip(layers, caches)):
                    k_in, v_in = kv.Stacked(c.k, r), kv.Stacked(c.v, r)
                    with jax.named_scope("layer"):
                        x, k, v = layer(x, cos, sin, [(k_in, v_in, cached_mask)], fresh_mask)
                    out.append(kv.LayerKV(kv.write_layer(k_in, k, lengths, after=x), kv.write_layer(v_in, v, lengths, after=x)))
                    buf = cap.record(buf, index[q] + 1, x)
                return (x, buf, tuple(out)), None

            xs = (jnp.arange(group.n), jnp.asarray(group.layer_indices()))
            (x, buf, group_cache), _ = stack.scan(group, body, (x, buf, group_cache), xs)
            new_cache.append(group_cache)
        x = self.final_norm(x)
        buf = cap.record(buf, self.config.num_layers, x)
        return x, kv.constrain(tuple(new_cache)), cap.features(buf)

    # --- draft forward (the family's DSpark/DFlash backbone) ---------------------------------------------
    def context_kv(self, context: jax.Array, positions: jax.Array) -> kv.Cache:
        """Every layer's keys/values of an injected context stream `[B, T, D]` at `positions [B, T]`, token-major
        `[n, B, T, G, H]` per pattern position (blocks to write into a cache with `kv_cache.write`)."""
        cos, sin = self.rope(positions)
        out = []
        for group in self.groups:

            def body(layers, carry, _):
                return carry, tuple(kv.LayerKV(*layer.self_attn.keys_values(context, cos, sin)) for layer in layers)

            out.append(stack.scan(group, body, None)[1])
        return tuple(out)

    def block_hidden(self, tokens, positions, context: kv.Cache, context_mask, block_mask, *, remat: bool = False):
        """Final-normed hidden `[B, T, D]` of `tokens [B, T]` at `positions` attending to each layer's `context`
        keys/values (`context_mask [B, T, S]`) and to the block itself (`block_mask [B, T, T]`)."""
        cos, sin = self.rope(positions)
        x = self.embed(tokens)
        for group, group_context in zip(self.groups, context):

            def body(layers, x, r, group_context=group_context):
                for layer, c in zip(layers, group_context):
                    x, _, _ = layer(x, cos, sin, [(kv.Stacked(c.k, r), kv.Stacked(c.v, r), context_mask)], block_mask)
                return x, None

            x, _ = stack.scan(group, body, x, jnp.arange(group.n), remat=remat)
        return self.final_norm(x)

