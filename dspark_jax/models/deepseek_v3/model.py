"""DeepSeek-V3 decoder (HF `models/deepseek_v3` numerics) with a latent KV cache (docs/deepseek.md §1-§3).

Multi-head latent attention: per token the cache holds the normalised KV latent `c` (`kv_lora_rank`) and
the shared rotary key `k_pe` (`qk_rope_head_dim`), nothing per head. Against cached tokens attention runs
in the latent space with the key and value up-projections absorbed into the query and the output
(`q_c = q_nope W_uk`, scores `q_c . c + q_pe . k_pe`, output `(p . c) W_uv`); a long fresh block (a
prefill) expands its own keys and values instead, which is cheaper there. Both are joined in one softmax.

RoPE touches only the `qk_rope_head_dim` slice, in DeepSeek's interleaved pair layout (or rotate-half when
`rope_interleave` is off); YaRN scales the softmax by its mscale squared (`DeepseekV3Config.softmax_scale`).
The MLP is SwiGLU in the first `first_k_dense_replace` layers and a routed MoE after them: sigmoid scores,
group-limited top-k on the bias-corrected scores, weights from the uncorrected scores (renormalised, times
`routed_scaling_factor`), plus shared experts. The router runs in float32 whatever the model dtype.

Layers are stacked and scanned (`layers.stack`): a dense group, then an MoE group.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.layers import kv_cache as kv
from dspark_jax.layers import stack
from dspark_jax.layers.attention import MASKED
from dspark_jax.layers.linear import linear
from dspark_jax.layers.mlp import GatedMLP
from dspark_jax.layers.moe import routed_experts
from dspark_jax.layers.norms import rms_norm
from dspark_jax.layers.params import Init
from dspark_jax.layers.rope import apply_rope, cos_sin, inverse_frequencies
from dspark_jax.models.deepseek_v3.config import SPARSE, DeepseekV3Config

# Fresh blocks longer than this expand their own keys/values (prefill); shorter ones (decode, verify)
# stay in the latent space like the cache (docs/deepseek.md §2).
ABSORB_MAX_BLOCK = 16


def rope_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs `(x[2i], x[2i+1])` of `x [B, T, N, H]` by the angles of `cos/sin [B, T, H]` (whose two
    halves repeat the per-pair values). The result is laid out `[evens | odds]`, as transformers does; only
    dot products of rotated queries and keys are ever used, so the layout just has to be shared."""
    half = x.shape[-1] // 2
    c, s = cos[:, :, None, :half], sin[:, :, None, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def group_limited_routing(logits: jax.Array, bias: jax.Array, cfg: DeepseekV3Config) -> tuple[jax.Array, jax.Array]:
    """DeepSeek-V3 routing of fp32 router logits `[M, E]` -> (weights [M, k] fp32, expert indices [M, k]).

    Selection uses `sigmoid(logits) + bias`: groups are ranked by the sum of their two best corrected scores,
    the best `topk_group` groups are kept, and the top `k` experts among them are chosen. Weights are the
    uncorrected scores of the chosen experts (renormalised if `norm_topk_prob`) times `routed_scaling_factor`.
    """
    M, E = logits.shape
    G = cfg.n_group
    scores = jax.nn.sigmoid(logits)
    choice = scores + bias.astype(jnp.float32)
    group_scores = jnp.sum(jax.lax.top_k(choice.reshape(M, G, E // G), 2)[0], axis=-1)  # [M, G]
    _, groups = jax.lax.top_k(group_scores, cfg.topk_group)
    keep = jnp.zeros((M, G), bool).at[jnp.arange(M)[:, None], groups].set(True)
    choice = jnp.where(jnp.repeat(keep, E // G, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, idx, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx


class MLAttention(nnx.Module):
    """Multi-head latent attention. Kernels keep their head axes: `q_b_proj [Rq, N, dn + dr]`,
    `kv_b_proj [r, N, dn + dv]` (key half first), `o_proj [N, dv, D]`."""

    def __init__(self, cfg: DeepseekV3Config, init: Init):
        D, N = cfg.hidden_size, cfg.num_heads
        dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank:
            self.q_a_proj = init.normal((D, cfg.q_lora_rank), ("embed", "rank"))
            self.q_a_layernorm = init.ones((cfg.q_lora_rank,), ("rank",))
            self.q_b_proj = init.normal((cfg.q_lora_rank, N, dn + dr), ("rank", "q_heads", "head_dim"))
        else:
            self.q_proj = init.normal((D, N, dn + dr), ("embed", "q_heads", "head_dim"))
        self.kv_a_proj_with_mqa = init.normal((D, r + dr), ("embed", "rank"))
        self.kv_a_layernorm = init.ones((r,), ("rank",))
        self.kv_b_proj = init.normal((r, N, dn + dv), ("rank", "q_heads", "head_dim"))
        self.o_proj = init.normal((N, dv, D), ("q_heads", "head_dim", "embed"))
        self.q_lora = bool(cfg.q_lora_rank)
        self.interleave = cfg.rope_interleave
        self.eps = cfg.rms_norm_eps
        self.dims = (dn, dr, dv, r)
        self.scale = cfg.softmax_scale

    def _rope(self, x, cos, sin):
        return rope_interleaved(x, cos, sin) if self.interleave else apply_rope(x, cos, sin)

    def queries(self, x: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
        """`x [B, T, D]` -> (q_nope [B, T, N, dn], roped q_pe [B, T, N, dr])."""
        dn = self.dims[0]
        if self.q_lora:
            qa = rms_norm(linear(x, self.q_a_proj[...]), self.q_a_layernorm[...], self.eps)
            q = linear(qa, self.q_b_proj[...])
        else:
            q = linear(x, self.q_proj[...])
        return q[..., :dn], self._rope(q[..., dn:], cos, sin)

    def latents(self, x: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
        """What the cache holds for inputs `x [B, T, D]`: normed KV latents `[B, T, r]`, roped keys `[B, T, dr]`."""
        r = self.dims[3]
        ckv = linear(x, self.kv_a_proj_with_mqa[...])
        c = rms_norm(ckv[..., :r], self.kv_a_layernorm[...], self.eps)
        k_pe = self._rope(ckv[..., r:][:, :, None, :], cos, sin)[:, :, 0, :]
        return c, k_pe

    def attend(self, q_nope, q_pe, latent_parts, expanded=None) -> jax.Array:
        """Attention output `[B, T, D]` over `latent_parts [(c [B, S, r], k_pe [B, S, dr], mask [B, T, S])]`
        (absorbed) and an optional `expanded` part of the same form whose keys/values are rebuilt per head."""
        dn = self.dims[0]
        w = self.kv_b_proj[...]
        w_uk, w_uv = w[..., :dn], w[..., dn:]  # [r, N, dn], [r, N, dv]
        dtype = q_nope.dtype
        scores, values = [], []
        if latent_parts:
            q_c = jnp.einsum("btnd,rnd->btnr", q_nope, w_uk)
            for c, k_pe, mask in latent_parts:
                s = jnp.einsum("btnr,bsr->bnts", q_c, c, preferred_element_type=jnp.float32)
                s = s + jnp.einsum("btnp,bsp->bnts", q_pe, k_pe, preferred_element_type=jnp.float32)
                scores.append(jnp.where(mask[:, None], s * self.scale, MASKED))
                values.append(("latent", c))
        if expanded is not None:
            c, k_pe, mask = expanded
            k_nope = jnp.einsum("bsr,rnd->bsnd", c, w_uk)
            v = jnp.einsum("bsr,rnv->bsnv", c, w_uv)
            s = jnp.einsum("btnd,bsnd->bnts", q_nope, k_nope, preferred_element_type=jnp.float32)
            s = s + jnp.einsum("btnp,bsp->bnts", q_pe, k_pe, preferred_element_type=jnp.float32)
            scores.append(jnp.where(mask[:, None], s * self.scale, MASKED))
            values.append(("expanded", v))
        probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
        # Probabilities in the activation dtype times values, as transformers does. The products are left in
        # that dtype (XLA:CPU has no bf16 x bf16 -> f32 kernel for some of their layouts); parts add in fp32.
        out_latent, out = None, None
        offset = 0
        for kind, v in values:
            p = probs[..., offset : offset + v.shape[1]].astype(dtype)
            offset += v.shape[1]
            if kind == "latent":
                o = jnp.einsum("bnts,bsr->btnr", p, v).astype(jnp.float32)
                out_latent = o if out_latent is None else out_latent + o
            else:
                out = jnp.einsum("bnts,bsnv->btnv", p, v).astype(jnp.float32)
        if out_latent is not None:
            o = jnp.einsum("btnr,rnv->btnv", out_latent.astype(dtype), w_uv).astype(jnp.float32)
            out = o if out is None else out + o
        return linear(out.astype(dtype), self.o_proj[...], in_dims=2)

    def __call__(self, x, cos, sin, cached_parts, fresh_mask, *, expand: bool):
        """`x [B, T, D]` over cached latent parts and its own block -> (output, block latents, block rotary keys)."""
        with jax.named_scope("qkv"):
            q_nope, q_pe = self.queries(x, cos, sin)
            c, k_pe = self.latents(x, cos, sin)
        with jax.named_scope("attend"):
            fresh = (c, k_pe, fresh_mask)
            if expand:
                out = self.attend(q_nope, q_pe, list(cached_parts), fresh)
            else:
                out = self.attend(q_nope, q_pe, [*cached_parts, fresh])
        return out, c, k_pe


class DeepseekV3MoE(nnx.Module):
    def __init__(self, cfg: DeepseekV3Config, init: Init):
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        fp32 = dataclasses.replace(init, dtype=jnp.float32)  # transformers keeps the router in float32
        self.router = fp32.normal((D, E), ("embed", None))
        self.e_score_correction_bias = fp32.zeros((E,), (None,))
        self.gate_proj = init.normal((E, D, F), ("experts", "embed", "mlp"))
        self.up_proj = init.normal((E, D, F), ("experts", "embed", "mlp"))
        self.down_proj = init.normal((E, F, D), ("experts", "mlp", "embed"))
        self.shared_experts = GatedMLP(D, F * cfg.n_shared_experts, "silu", init) if cfg.n_shared_experts else None
        self.cfg = cfg

    def __call__(self, x):
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        logits = jnp.dot(flat.astype(jnp.float32), self.router[...].astype(jnp.float32))
        weights, idx = group_limited_routing(logits, self.e_score_correction_bias[...], self.cfg)
        out = routed_experts(flat, weights, idx, self.gate_proj[...], self.up_proj[...], self.down_proj[...], "silu")
        out = out.reshape(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekV3Layer(nnx.Module):
    def __init__(self, cfg: DeepseekV3Config, kind: str, init: Init):
        D = cfg.hidden_size
        self.input_layernorm = init.ones((D,), ("embed",))
        self.post_attention_layernorm = init.ones((D,), ("embed",))
        self.self_attn = MLAttention(cfg, init)
        self.mlp = DeepseekV3MoE(cfg, init) if kind == SPARSE else GatedMLP(D, cfg.intermediate_size, "silu", init)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x, cos, sin, cached_parts, fresh_mask, *, expand: bool):
        h, c, k_pe = self.self_attn(
            rms_norm(x, self.input_layernorm[...], self.eps), cos, sin, cached_parts, fresh_mask, expand=expand
        )
        x = x + h
        x = x + self.mlp(rms_norm(x, self.post_attention_layernorm[...], self.eps))
        return x, c, k_pe


def layer_groups(cfg: DeepseekV3Config, init: Init) -> list[stack.Group]:
    """The dense layers as one group, then the MoE layers as another (each uniform, so each one scan)."""
    kinds = [cfg.layer_kind(i) for i in range(cfg.num_layers)]
    k = sum(kind != SPARSE for kind in kinds)
    spans = stack.periodic_groups(kinds[:k]) + stack.periodic_groups(kinds[k:], start=k)
    return [stack.Group([DeepseekV3Layer(cfg, kind, init.stacked(n)) for kind in pattern], start, n)
            for start, pattern, n in spans]


class DeepseekV3Model(nnx.Module):
    """DeepSeek-V3 causal LM (`engine.contracts.TargetModel`). Holds parameters only; the latent cache is
    passed in and returned (`LayerKV.k` = latents `[n, B, S, 1, r]`, `LayerKV.v` = rotary keys `[n, B, S, 1, dr]`)."""

    def __init__(self, cfg: DeepseekV3Config, init: Init):
        D, V = cfg.hidden_size, cfg.vocab_size
        self.config = cfg
        self.dtype = jnp.dtype(init.dtype)
        self.embed_tokens = init.normal((V, D), ("vocab", "embed"))
        self.groups = nnx.List(layer_groups(cfg, init))
        self.norm = init.ones((D,), ("embed",))
        if not cfg.tie_word_embeddings:
            self.lm_head = init.normal((V, D), ("vocab", "embed"))

    # --- shapes ------------------------------------------------------------------------------------
    def layer_map(self) -> stack.LayerMap:
        return stack.LayerMap.of(self.groups)

    def cache_shapes(self, capacity: int, max_block: int = 1):
        c = self.config
        del max_block  # linear caches only
        return [[(g.n, capacity, 1, c.kv_lora_rank, c.qk_rope_head_dim)] * g.period for g in self.groups]

    def init_cache(self, batch: int, capacity: int, max_block: int = 1) -> kv.Cache:
        """Latent caches of `capacity` slots: `kv_lora_rank + qk_rope_head_dim` numbers per token and layer."""
        return kv.allocate(batch, self.cache_shapes(capacity, max_block), self.dtype)

    # --- pieces ------------------------------------------------------------------------------------
    def rope(self, positions: jax.Array):
        c = self.config
        return cos_sin(positions, *inverse_frequencies(c.rope, c.qk_rope_head_dim), self.dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0)

    def rms_norm(self, x: jax.Array, weight: jax.Array) -> jax.Array:
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def final_norm(self, x: jax.Array) -> jax.Array:
        return self.rms_norm(x, self.norm[...])

    def head(self) -> jax.Array:
        return self.embed_tokens[...] if self.config.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits `[..., V]` of final-normed hidden states."""
        return jnp.einsum("...d,vd->...v", hidden, self.head(), preferred_element_type=jnp.float32)

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
        """Run `tokens [B, T]` at positions `lengths[b] + t` on top of `cache` (write ahead, commit by length,
        docs/caches.md §2). Returns the final-normed hidden `[B, T, D]`, the cache with the block's latents
        written at `lengths`, and the requested HF `output_hidden_states` (0 = embeddings, i + 1 = output of
        layer i, L = final norm) concatenated `[B, T, len(capture) * D]`, or None."""
        del num_valid  # linear caches only
        B, T = tokens.shape
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        cos, sin = self.rope(positions)
        fresh_mask = kv.block_mask(B, T, causal=True)
        cached_mask = kv.cached_mask(positions, lengths, cache[0][0].k.shape[1 + kv.SEQ])
        expand = T > ABSORB_MAX_BLOCK
        x = self.embed(tokens)
        cap = stack.Capture(capture, self.config.num_layers)
        buf = cap.record(cap.buffer(x), 0, x)
        new_cache = []
        for group, group_cache in zip(self.groups, cache):

            def body(layers, carry, inp):
                x, buf, caches = carry
                r, index = inp
                out = []
                for q, (layer, c) in enumerate(zip(layers, caches)):
                    latents, rotary = kv.Stacked(c.k, r), kv.Stacked(c.v, r)
                    with jax.named_scope("layer"):
                        part = (kv.read(latents)[:, 0], kv.read(rotary)[:, 0], cached_mask)  # one latent 'head'
                        x, latent, k_pe = layer(x, cos, sin, [part], fresh_mask, expand=expand)
                    out.append(kv.LayerKV(kv.write_layer(latents, latent[:, :, None], lengths, after=x),
                                          kv.write_layer(rotary, k_pe[:, :, None], lengths, after=x)))
                    buf = cap.record(buf, index[q] + 1, x)
                return (x, buf, tuple(out)), None

            xs = (jnp.arange(group.n), jnp.asarray(group.layer_indices()))
            (x, buf, group_cache), _ = stack.scan(group, body, (x, buf, group_cache), xs)
            new_cache.append(group_cache)
        x = self.final_norm(x)
        buf = cap.record(buf, self.config.num_layers, x)
        return x, tuple(new_cache), cap.features(buf)
