"""Gemma 4 text decoders (HF `models/gemma4` and `models/gemma4_unified` numerics).

Per layer: sandwich norms around attention and the FFN, then `layer_scalar` times the whole hidden state.
Sliding layers (their own head dim, KV heads, default RoPE, window W) and full layers (global head dim,
proportional RoPE, with `attention_k_eq_v` the key projection doubles as the value). q/k RMS-normed with a
weight, v without; attention scale 1.0. All norms are fp32 `w * x_hat` (no `1 + w`). Optional pieces:
per-layer inputs (PLE), KV sharing across the last layers, a double-wide MLP on the sharing layers, and a
routed MoE in parallel with the dense MLP. Scaled embedding (scale rounded to the weight dtype), tied head,
final logit soft-capping.

Layers are stacked and scanned (`layers.stack`): the layers that own their K/V are grouped by their repeating
pattern of kinds (`config.LayerKind`; e.g. five sliding layers and one full layer, repeated), the KV-sharing
tail forms groups of its own. A sharing layer attends over the cache of its source layer (the last earlier
non-sharing layer of its type) as it was before this call, plus the source's K/V of the current block, which
the source group's scan returns.

Caches (`layers.kv_cache`): one `LayerKV` per pattern position of each group that owns K/V (a sharing group
has none: `()`). Full layers get linear caches of `capacity` slots; sliding layers get ring buffers of
`min(capacity, W + max_block - 1)` slots, written after attending with `num_valid` so a prefill keeps only
its tail and padding never evicts live entries.

The same layers serve the family's DSpark/DFlash drafts (all full-attention layers, own LM head): a draft is
this model run on a block that attends, without a causal mask, to injected context keys/values
(`context_kv`, `block_hidden`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import sharding
from dspark_jax.layers import kv_cache as kv
from dspark_jax.layers import stack
from dspark_jax.layers.attention import attention
from dspark_jax.layers.linear import linear
from dspark_jax.layers.mlp import ACTIVATIONS, GatedMLP
from dspark_jax.layers.moe import routed_experts, softmax_topk_routing
from dspark_jax.layers.norms import rms_norm_fp32
from dspark_jax.layers.params import Init
from dspark_jax.layers.rope import apply_rope, cos_sin, inverse_frequencies
from dspark_jax.models.gemma4.config import SLIDING, Gemma4Config, LayerKind


def _scale_in(value: float, dtype) -> jax.Array:
    """A constant multiplier the way HF builds it: an fp32 buffer cast to the weight dtype (sqrt(3840) -> 62.0 in bf16)."""
    return jnp.asarray(np.float32(value)).astype(dtype)


class Gemma4Attention(nnx.Module):
    def __init__(self, cfg: Gemma4Config, kind: LayerKind, init: Init):
        D, N = cfg.hidden_size, cfg.num_heads
        G, H = cfg.type_kv_heads(kind.attention), cfg.type_head_dim(kind.attention)
        self.q_proj = init.normal((D, N, H), ("embed", "q_heads", "head_dim"))
        self.q_norm = init.ones((H,), ("head_dim",))
        self.o_proj = init.normal((N, H, D), ("q_heads", "head_dim", "embed"))
        self.owns_kv = not kind.shares_kv
        self.k_eq_v = cfg.type_k_eq_v(kind.attention)
        if self.owns_kv:
            self.k_proj = init.normal((D, G, H), ("embed", "kv_heads", "head_dim"))
            self.k_norm = init.ones((H,), ("head_dim",))
            if not self.k_eq_v:
                self.v_proj = init.normal((D, G, H), ("embed", "kv_heads", "head_dim"))
        self.eps = cfg.rms_norm_eps

    def keys_values(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Roped, k-normed keys and scale-free-normed values `[B, T, G, H]`; with K=V the value is the
        normed *pre-k_norm, un-roped* key projection."""
        k_raw = linear(x, self.k_proj[...])
        v_raw = k_raw if self.k_eq_v else linear(x, self.v_proj[...])
        k = apply_rope(rms_norm_fp32(k_raw, self.k_norm[...], self.eps), cos, sin)
        return k, rms_norm_fp32(v_raw, None, self.eps)

    def __call__(self, x, cos, sin, parts, fresh_mask, shared=None):
        """`x [B, T, D]` over earlier `parts [(k, v, mask)]` and the block's own K/V (computed here, or the
        source layer's `shared = (k, v)` for a KV-sharing layer) -> (output, block K, block V)."""
        with jax.named_scope("qkv"):
            q = apply_rope(rms_norm_fp32(linear(x, self.q_proj[...]), self.q_norm[...], self.eps), cos, sin)
            k, v = self.keys_values(x, cos, sin) if shared is None else shared
        with jax.named_scope("attend"):
            out = attention(q, parts, (k, v, fresh_mask), 1.0)
            out = linear(out, self.o_proj[...], in_dims=2)
        return out, k, v


class Gemma4Router(nnx.Module):
    """Softmax top-k over E experts of `proj(rms_norm_noscale(x) * scale / sqrt(D))`, renormalised, times
    each chosen expert's learned scale."""

    def __init__(self, cfg: Gemma4Config, init: Init):
        D, E = cfg.hidden_size, cfg.num_experts
        self.proj = init.normal((D, E), ("embed", None))
        self.scale = init.ones((D,), ("embed",))
        self.per_expert_scale = init.ones((E,), (None,))
        self.top_k = cfg.top_k_experts
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`x [M, D]` -> (weights [M, k] fp32, expert ids [M, k])."""
        h = rms_norm_fp32(x, None, self.eps) * self.scale[...] * x.shape[-1] ** -0.5
        weights, idx = softmax_topk_routing(h @ self.proj[...], self.top_k, renormalize=True)
        return weights * jnp.take(self.per_expert_scale[...], idx).astype(jnp.float32), idx


class Gemma4Experts(nnx.Module):
    def __init__(self, cfg: Gemma4Config, init: Init):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.gate_proj = init.normal((E, D, F), ("experts", "embed", "mlp"))
        self.up_proj = init.normal((E, D, F), ("experts", "embed", "mlp"))
        self.down_proj = init.normal((E, F, D), ("experts", "mlp", "embed"))
        self.act = cfg.activation

    def __call__(self, x, weights, idx):
        return routed_experts(x, weights, idx, self.gate_proj[...], self.up_proj[...], self.down_proj[...], self.act)


NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
MOE_NORMS = ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2")


class Gemma4Layer(nnx.Module):
    def __init__(self, cfg: Gemma4Config, kind: LayerKind, init: Init):
        D, P = cfg.hidden_size, cfg.hidden_size_per_layer_input
        self.self_attn = Gemma4Attention(cfg, kind, init)
        width = cfg.intermediate_size * (2 if kind.double_wide else 1)
        self.mlp = GatedMLP(D, width, cfg.activation, init)
        for name in NORMS:
            setattr(self, name, init.ones((D,), ("embed",)))
        self.layer_scalar = init.ones((1,), (None,))
        self.moe = cfg.enable_moe_block
        if self.moe:
            self.router = Gemma4Router(cfg, init)
            self.experts = Gemma4Experts(cfg, init)
            for name in MOE_NORMS:
                setattr(self, name, init.ones((D,), ("embed",)))
        self.ple = P > 0
        if self.ple:
            self.per_layer_input_gate = init.normal((D, P), ("embed", None))
            self.per_layer_projection = init.normal((P, D), (None, "embed"))
            self.post_per_layer_input_norm = init.ones((D,), ("embed",))
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

    def __call__(self, x, cos, sin, parts, fresh_mask, shared=None, per_layer_input=None):
        """One layer over earlier `parts [(k, v, mask)]` and its own block (`fresh_mask`); a KV-sharing layer
        gets its source's block K/V as `shared`. -> (output `[B, T, D]`, the block's K, V)."""
        a, k, v = self.self_attn(self._norm(x, "input_layernorm"), cos, sin, parts, fresh_mask, shared)
        x = x + self._norm(a, "post_attention_layernorm")
        x = x + self._norm(self.feed_forward(x), "post_feedforward_layernorm")
        if self.ple:
            g = ACTIVATIONS[self.act](jnp.einsum("btd,dp->btp", x, self.per_layer_input_gate[...])) * per_layer_input
            x = x + self._norm(jnp.einsum("btp,pd->btd", g, self.per_layer_projection[...]), "post_per_layer_input_norm")
        return x * self.layer_scalar[...], k, v


class Gemma4Model(nnx.Module):
    """Gemma 4 / Gemma 4 unified causal LM. Holds parameters only; caches are passed in and returned."""

    def __init__(self, cfg: Gemma4Config, init: Init):
        D, V, L, P = cfg.hidden_size, cfg.vocab_size, cfg.num_layers, cfg.hidden_size_per_layer_input
        self.config = cfg
        self.dtype = jnp.dtype(init.dtype)
        self.embed_tokens = init.normal((V, D), ("vocab", "embed"))
        if P > 0:
            self.embed_tokens_per_layer = init.normal((cfg.vocab_size_per_layer_input, L * P), ("vocab", None))
            self.per_layer_model_projection = init.normal((D, L, P), ("embed", None, None))
            self.per_layer_projection_norm = init.ones((P,), (None,))
        kinds = [cfg.layer_kind(i) for i in range(L)]
        first = cfg.first_shared_layer
        spans = stack.periodic_groups(kinds[:first]) + stack.periodic_groups(kinds[first:], start=first)
        self.groups = nnx.List([
            stack.Group([Gemma4Layer(cfg, kind, init.stacked(n)) for kind in pattern], start, n)
            for start, pattern, n in spans
        ])
        self.norm = init.ones((D,), ("embed",))
        if not cfg.tie_word_embeddings:
            self.lm_head = init.normal((V, D), ("vocab", "embed"))

    # --- structure ---------------------------------------------------------------------------------
    def layer_map(self) -> stack.LayerMap:
        return stack.LayerMap.of(self.groups)

    def pattern(self, group: stack.Group) -> list[LayerKind]:
        """The layer kinds of a group's pattern positions."""
        return [self.config.layer_kind(group.start + q) for q in range(group.period)]

    def kv_sources(self) -> dict[str, tuple[int, int, int]]:
        """For each attention type of the KV-sharing layers: where its source layer lives, `(group, pattern
        position, repetition)`; the source's cache is `cache[group][position]` at `[repetition]`."""
        c = self.config
        out = {}
        for i in range(c.first_shared_layer, c.num_layers):
            src = c.kv_source(i)
            for g, group in enumerate(self.groups):
                hits = np.argwhere(group.layer_indices() == src)
                if len(hits):
                    out[c.layer_types[i]] = (g, int(hits[0][1]), int(hits[0][0]))
        return out

    def _slots(self, attention_type: str, capacity: int, max_block: int) -> int:
        c = self.config
        return min(capacity, c.sliding_window + max_block - 1) if attention_type == SLIDING else capacity

    def cache_shapes(self, capacity: int, max_block: int = 1):
        """`(n, slots, kv_heads, head_dim, head_dim)` per pattern position of each group (none for sharing groups)."""
        c = self.config
        shapes = []
        for group in self.groups:
            pattern = self.pattern(group)
            shapes.append([
                (group.n, self._slots(k.attention, capacity, max_block), c.type_kv_heads(k.attention),
                 c.type_head_dim(k.attention), c.type_head_dim(k.attention))
                for k in pattern if not k.shares_kv
            ])
        return shapes

    def init_cache(self, batch: int, capacity: int, max_block: int = 1) -> kv.Cache:
        """Linear caches for full layers; ring buffers of `W + max_block - 1` slots for sliding layers.

        A block attends to the ring *before* writing itself, so its first query needs the `W - 1` positions
        before it; but a verify block of `T <= max_block` tokens that is then committed only in part has
        already overwritten its `T - 1` rejected slots, which the next round must not miss: `W + T - 2` slots
        is the minimum (one fewer makes the partial-commit test fail); one slot is kept to spare."""
        return kv.allocate(batch, self.cache_shapes(capacity, max_block), self.dtype)

    # --- pieces ------------------------------------------------------------------------------------
    def rope(self, attention_type: str, positions: jax.Array):
        c = self.config
        inv = inverse_frequencies(c.type_rope(attention_type), c.type_head_dim(attention_type))
        return cos_sin(positions, *inv, self.dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0) * _scale_in(math.sqrt(self.config.hidden_size), self.dtype)

    def per_layer_inputs(self, tokens: jax.Array, x: jax.Array) -> jax.Array:
        """PLE `[B, T, L, P]`: `(rms_norm(x @ W / sqrt(D)) + embed_per_layer(tokens) * sqrt(P)) / sqrt(2)`."""
        c = self.config
        B, T = tokens.shape
        L, P = c.num_layers, c.hidden_size_per_layer_input
        token_part = jnp.take(self.embed_tokens_per_layer[...], tokens, axis=0) * _scale_in(math.sqrt(P), self.dtype)
        context = linear(x, self.per_layer_model_projection[...]) * c.hidden_size**-0.5
        context = rms_norm_fp32(context, self.per_layer_projection_norm[...], c.rms_norm_eps)
        return (context + token_part.reshape(B, T, L, P)) * 2.0**-0.5

    def rms_norm(self, x: jax.Array, weight: jax.Array) -> jax.Array:
        """This family's RMSNorm, all in fp32 (drafts normalise their projected context with it)."""
        return rms_norm_fp32(x, weight, self.config.rms_norm_eps)

    def final_norm(self, x: jax.Array) -> jax.Array:
        return self.rms_norm(x, self.norm[...])

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits `[..., V]` of final-normed hidden states, soft-capped `cap * tanh(z / cap)`."""
        head = self.embed_tokens[...] if self.config.tie_word_embeddings else self.lm_head[...]
        z = jnp.einsum("...d,vd->...v", hidden, head, preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        return cap * jnp.tanh(z / cap) if cap else z

    # --- the layer stack -----------------------------------------------------------------------------
    def _stack(self, x, ple, geometry, memory, *, write=None, cap=None, buf=None, remat=False):
        """Every group in order over `x [B, T, D]`.

        `geometry[attention type] = (cos, sin, memory mask [B, T, S], block mask [B, T, T])`; `memory` is
        cache-shaped (the target's cache, or a draft's context K/V) and read by each layer that owns K/V, and
        by the sharing layers at their source. `write(attention type, LayerKV, k, v) -> LayerKV` stores a
        block into a layer's memory (None: read only). -> (x, written memory or None, capture buffer).
        """
        cap = cap or stack.Capture((), self.config.num_layers)
        sources = self.kv_sources()
        fresh = {}  # attention type -> its source layer's block K/V
        # what a KV-sharing layer reads of its source's memory: a sliding ring as it was before this block (the
        # block's write may evict entries its earlier queries see); a linear cache in place after the write,
        # which changed only positions the memory mask hides
        before = {t: (memory[sg][sq].k[sr], memory[sg][sq].v[sr]) for t, (sg, sq, sr) in sources.items() if t == SLIDING}
        written = []
        for g, (group, mem) in enumerate(zip(self.groups, memory)):
            index = group.layer_indices()
            pl = None if ple is None else jnp.moveaxis(ple[:, :, index], (2, 3), (0, 1))  # [n, period, B, T, P]
            if self.pattern(group)[0].shares_kv:
                shared = {}
                for t, (sg, sq, sr) in sources.items():
                    src = written[sg][sq] if write is not None else memory[sg][sq]
                    mk, mv = before[t] if t in before else (kv.Stacked(src.k, sr), kv.Stacked(src.v, sr))
                    shared[t] = (mk, mv, *fresh[t])
                x, buf = self._sharing_group(group, x, buf, pl, geometry, shared, cap, remat)
                written.append(())
            else:
                keep = {sq: t for t, (sg, sq, _) in sources.items() if sg == g}
                x, buf, out, kept = self._owning_group(group, x, buf, mem, pl, geometry, write, keep, cap, remat)
                for sq, t in keep.items():
                    sr = sources[t][2]
                    fresh[t] = (kept[sq].k[sr], kept[sq].v[sr])
                written.append(out)
        return x, (tuple(written) if write is not None else None), buf

    def _owning_group(self, group, x, buf, mem, pl, geometry, write, keep, cap, remat):
        pattern = self.pattern(group)

        def body(layers, carry, inp):
            x, buf, caches = carry
            pl, r, index = inp
            out, kept = [], []
            for q, (layer, c) in enumerate(zip(layers, caches)):
                t = pattern[q].attention
                cos, sin, memory_mask, block_mask = geometry[t]
                k_in, v_in = kv.Stacked(c.k, r), kv.Stacked(c.v, r)
                with jax.named_scope("layer"):
                    x, k, v = layer(x, cos, sin, [(k_in, v_in, memory_mask)], block_mask,
                                    per_layer_input=None if pl is None else pl[q])
                out.append(c if write is None else write(t, k_in, v_in, k, v, x))
                kept.append(kv.LayerKV(k, v) if q in keep else None)
                buf = cap.record(buf, index[q] + 1, x)
            return (x, buf, tuple(out)), tuple(kept)

        xs = (pl, jnp.arange(group.n), jnp.asarray(group.layer_indices()))
        (x, buf, out), kept = stack.scan(group, body, (x, buf, mem), xs, remat=remat)
        return x, buf, out, kept

    def _sharing_group(self, group, x, buf, pl, geometry, shared, cap, remat):
        pattern = self.pattern(group)

        def body(layers, carry, inp):
            x, buf = carry
            pl, index = inp
            for q, layer in enumerate(layers):
                t = pattern[q].attention
                cos, sin, memory_mask, block_mask = geometry[t]
                mk, mv, fk, fv = shared[t]
                with jax.named_scope("layer"):
                    x, _, _ = layer(x, cos, sin, [(mk, mv, memory_mask)], block_mask, shared=(fk, fv),
                                    per_layer_input=None if pl is None else pl[q])
                buf = cap.record(buf, index[q] + 1, x)
            return (x, buf), None

        (x, buf), _ = stack.scan(group, body, (x, buf), (pl, jnp.asarray(group.layer_indices())), remat=remat)
        return x, buf

    def _attention_types(self) -> list[str]:
        return sorted(set(self.config.layer_types))

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
        slots = {}  # attention type -> cache slots (every layer of a type has the same)
        for group, group_cache in zip(self.groups, cache):
            for k, layer_cache in zip([k for k in self.pattern(group) if not k.shares_kv], group_cache):
                slots.setdefault(k.attention, layer_cache.k.shape[1 + kv.SEQ])
        geometry = {}
        for t in self._attention_types():
            window = c.type_window(t)
            geometry[t] = (
                *self.rope(t, positions),
                kv.cached_mask(positions, lengths, slots[t], window=window),
                kv.block_mask(B, T, causal=True, window=window),
            )

        def write(t, k_in, v_in, k, v, after):
            valid = num_valid if t == SLIDING else None
            return kv.LayerKV(kv.write_layer(k_in, k, lengths, valid, after=after),
                              kv.write_layer(v_in, v, lengths, valid, after=after))

        x = sharding.constrain(self.embed(tokens), kv.ACTIVATION_AXES)
        ple = self.per_layer_inputs(tokens, x) if c.hidden_size_per_layer_input else None
        cap = stack.Capture(capture, c.num_layers)
        buf = cap.record(cap.buffer(x), 0, x)
        x, cache, buf = self._stack(x, ple, geometry, cache, write=write, cap=cap, buf=buf)
        x = self.final_norm(x)
        buf = cap.record(buf, c.num_layers, x)
        return x, kv.constrain(cache), cap.features(buf)

    # --- draft forward (the family's DSpark/DFlash backbone) ---------------------------------------------
    def context_kv(self, context: jax.Array, positions: jax.Array) -> kv.Cache:
        """Every K/V-owning layer's keys/values of an injected context stream `[B, T, D]` at `positions [B, T]`,
        token-major (`[n, B, T, G, H]` per pattern position, blocks for `kv_cache.write`; `()` for sharing groups)."""
        rope = {t: self.rope(t, positions) for t in self._attention_types()}
        out = []
        for group in self.groups:
            pattern = self.pattern(group)
            if pattern[0].shares_kv:
                out.append(())
                continue

            def body(layers, carry, _, pattern=pattern):
                return carry, tuple(
                    kv.LayerKV(*layer.self_attn.keys_values(context, *rope[k.attention]))
                    for layer, k in zip(layers, pattern)
                )

            out.append(stack.scan(group, body, None)[1])
        return tuple(out)

    def block_hidden(self, tokens, positions, context: kv.Cache, context_mask, block_mask, *, remat: bool = False):
        """Final-normed hidden `[B, T, D]` of `tokens [B, T]` at `positions` attending to each layer's `context`
        keys/values (`context_mask [B, T, S]`) and to the block itself (`block_mask [B, T, T]`). The masks
        apply to every layer as given (draft backbones have full-attention layers only)."""
        x = self.embed(tokens)
        ple = self.per_layer_inputs(tokens, x) if self.config.hidden_size_per_layer_input else None
        geometry = {t: (*self.rope(t, positions), context_mask, block_mask) for t in self._attention_types()}
        x, _, _ = self._stack(x, ple, geometry, context, remat=remat)
        return self.final_norm(x)
