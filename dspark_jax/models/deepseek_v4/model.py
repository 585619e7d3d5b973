"""DeepSeek-V4 decoder (HF `models/deepseek_v4` numerics) with rollback-aware caches (docs/deepseek.md §5-§7).

The residual is `hc_mult` streams `[B, T, n, D]` (mHC, §5): before each sub-block a learned, input-dependent
mix collapses them into one input (`pre`), and after it they are rebuilt as `post * out + comb^T streams`
with `comb` projected onto doubly-stochastic matrices by Sinkhorn iterations in float32. `hc_head` collapses
them once more before the final norm.

Attention (§6) is multi-query with one shared key/value head (the normed, partially roped `wkv` projection
serves as key and value), a learned per-head sink logit in the softmax, RoPE on the last `rope_head_dim`
dims in interleaved pairs and the inverse rotation on the output. Every layer attends to the last
`sliding_window` raw entries; CSA / HCA layers also attend to compressed entries, one per window of `m`
positions (CSA: overlapping windows of 2m, chosen per query by the lightning indexer's top-k; HCA: all of
them). The output goes through the grouped projection `wo_a` (one block per head group) and `wo_b`.

The FFN is an MoE in every layer: sqrt(softplus) scores, top-k on the bias-corrected scores or a fixed
per-token table (`tid2eid`, hash layers), renormalised weights times `routed_scaling_factor`, clamped SwiGLU
experts and one clamped shared expert.

Caches (§7), per layer: a ring of the roped key/value rows (`window`), a ring of the raw compressor rows
(kv and gate projections, the indexer's too) and linear caches of compressed entries. A block reads the
rings, computes the entries of the windows whose last position lies inside it from raw rows only, writes
everything ahead, and `lengths` alone decides what is committed: an entry produced inside a rejected suffix
is invisible (its window ends past every committed query) until the block that commits that window's last
position writes it again.

Layers are stacked and scanned (`layers.stack`), grouped by their repeating pattern of (attention, MLP) types.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.errors import ConfigError
from dspark_jax.layers import kv_cache as kv
from dspark_jax.layers import stack
from dspark_jax.layers.attention import MASKED
from dspark_jax.layers.linear import linear
from dspark_jax.layers.moe import routed_experts
from dspark_jax.layers.norms import rms_norm_fp32
from dspark_jax.layers.params import Init
from dspark_jax.layers.rope import inverse_frequencies
from dspark_jax.models.deepseek_v4.config import CSA, HASH, HCA, SLIDING, DeepseekV4Config

F32 = jnp.float32


# --- small numerics ------------------------------------------------------------------------------------


def unweighted_rms(x: jax.Array, eps: float) -> jax.Array:
    """`x * rsqrt(mean(x^2) + eps)`, the statistic in float32, the product in `x`'s dtype."""
    r = jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(F32)), axis=-1, keepdims=True) + eps)
    return x * r.astype(x.dtype)


def rope_tail(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the last `2 * cos.shape[-1]` dims of `x [B, T, N, H]` in interleaved pairs `(2i, 2i + 1)` by the
    angles of `cos/sin [B, T, rd / 2]` (float32 math, the layout kept); the leading dims pass unchanged."""
    rd = 2 * cos.shape[-1]
    nope, r = x[..., : x.shape[-1] - rd], x[..., x.shape[-1] - rd :].astype(F32)
    c, s = cos[:, :, None, :].astype(F32), sin[:, :, None, :].astype(F32)
    x1, x2 = r[..., 0::2], r[..., 1::2]
    rot = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(r.shape).astype(x.dtype)
    return jnp.concatenate([nope, rot], axis=-1)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray, factor: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[B, T, rd / 2]` (one angle per pair) at integer `positions [B, T]`, in the activation dtype."""
    angles = positions.astype(F32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    return (jnp.cos(angles) * factor).astype(dtype), (jnp.sin(angles) * factor).astype(dtype)


def sinkhorn(comb: jax.Array, iters: int, eps: float) -> jax.Array:
    """Column-normalise, then `iters - 1` rounds of row- and column-normalising `comb [..., n, n]` (+eps in
    every denominator): the doubly-stochastic projection of mHC (docs/deepseek.md §5)."""
    def rows_then_columns(_, c):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
        return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)
    return jax.lax.fori_loop(0, iters - 1, rows_then_columns, comb)  # a loop: half the compile time of unrolling


def clamped_swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, limit: float) -> jax.Array:
    g = jnp.minimum(linear(x, w1), limit)
    u = jnp.clip(linear(x, w3), -limit, limit)
    return linear(jax.nn.silu(g) * u, w2)


# --- caches --------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class V4LayerCache:
    """One stacked pattern position's caches (every array `[n, B, 1, S, width]`, the heads-major layout of
    `kv_cache.CACHE_AXES` with one head):

    * `window`: ring of the roped key/value rows (`S` slots, positions mod `S`);
    * `raw`: ring (same slots) of the raw compressor rows `[kv | gate]` (then the indexer's), or None;
    * `entries`: compressed entry `w` at slot `w` (linear), or None;
    * `index_entries`: the indexer's compressed keys (CSA), or None.
    """

    window: jax.Array
    raw: jax.Array | None = None
    entries: jax.Array | None = None
    index_entries: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Context:
    """What every layer of one forward shares."""

    tokens: jax.Array  # [B, T]
    positions: jax.Array  # [B, T]
    lengths: jax.Array  # [B]
    num_valid: jax.Array  # [B]
    rope: dict  # attention type -> (cos, sin) [B, T, rd / 2] at the query positions
    fresh_mask: jax.Array  # [B, T, T] causal within the sliding window


def ring_rows(ring: jax.Array, first: jax.Array, count: int) -> jax.Array:
    """Rows of positions `first[b] + i`, `i < count`, from a ring `[B, 1, S, F]` -> `[B, count, F]` (slot =
    position mod S; positions the ring no longer holds come back as whatever their slot holds)."""
    S = ring.shape[2]
    slots = jnp.mod(first[:, None] + jnp.arange(count, dtype=jnp.int32)[None, :], S)
    return jnp.take_along_axis(ring[:, 0], slots[:, :, None], axis=1)


# --- modules -------------------------------------------------------------------------------------------


class HyperConnection(nnx.Module):
    """mHC mixing weights of one sub-block from the `n` streams (float32 parameters)."""

    def __init__(self, cfg: DeepseekV4Config, init: Init):
        n, D = cfg.hc_mult, cfg.hidden_size
        self.fn = init.normal((n * D, (2 + n) * n), ("embed", None))
        self.base = init.zeros(((2 + n) * n,), (None,))
        self.scale = init.ones((3,), (None,))
        self.n, self.iters, self.hc_eps, self.eps = n, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps

    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`h [B, T, n, D]` -> (post [B, T, n], comb [B, T, n, n] fp32, the collapsed block input [B, T, D])."""
        B, T, n, D = h.shape
        flat = unweighted_rms(h.reshape(B, T, n * D).astype(F32), self.eps)
        mix = flat @ self.fn[...].astype(F32)
        base, scale = self.base[...].astype(F32), self.scale[...].astype(F32)
        pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + self.hc_eps
        post = 2 * jax.nn.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
        comb = (mix[..., 2 * n :] * scale[2] + base[2 * n :]).reshape(B, T, n, n)
        comb = sinkhorn(jax.nn.softmax(comb, axis=-1) + self.hc_eps, self.iters, self.hc_eps)
        collapsed = jnp.sum(pre[..., None] * h.astype(F32), axis=2).astype(h.dtype)
        return post, comb, collapsed


def hc_mix(post: jax.Array, comb: jax.Array, out: jax.Array, h: jax.Array) -> jax.Array:
    """New streams `post_k * out + sum_j comb[j, k] * h_j` (in the activation dtype)."""
    dtype = h.dtype
    return post.astype(dtype)[..., None] * out[:, :, None, :] + jnp.einsum("btjk,btjd->btkd", comb.astype(dtype), h)


class Compressor(nnx.Module):
    """Pools the raw `[kv | gate]` rows of each window of `ratio` positions into one entry of `dim` numbers:
    softmax over the window's slots of `gate + ape` (float32), weighted sum of kv, RMSNorm, RoPE at the
    window's first position. `overlap` (CSA): two series per position; entry w pools window w - 1's first
    series and window w's second (2 * ratio slots), window -1 being empty."""

    def __init__(self, D: int, dim: int, ratio: int, overlap: bool, eps: float, init: Init):
        c = 2 if overlap else 1
        fp32 = dataclasses.replace(init, dtype=F32)
        self.wkv = init.normal((D, c * dim), ("embed", None))
        self.wgate = init.normal((D, c * dim), ("embed", None))
        self.ape = fp32.zeros((ratio, c * dim), (None, None))
        self.norm = fp32.ones((dim,), (None,))
        self.dim, self.ratio, self.overlap, self.eps = dim, ratio, overlap, eps

    @property
    def width(self) -> int:
        """Numbers per position in the raw ring."""
        return 2 * (2 if self.overlap else 1) * self.dim

    def rows(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([linear(x, self.wkv[...]), linear(x, self.wgate[...])], axis=-1)

    def pool(self, src: jax.Array, first: jax.Array, lengths: jax.Array, T: int, rope) -> tuple[jax.Array, jax.Array]:
        """Entries of the windows whose last position lies in `[lengths, lengths + T)`.

        `src [B, P, width]` holds the raw rows of positions `first + p`. Returns (entries `[B, nw, dim]` of
        windows `lengths // ratio + j`, `j < nw = ceil(T / ratio)`, their window index where the entry is
        new, else -1)."""
        B = src.shape[0]
        m, d, c = self.ratio, self.dim, 2 if self.overlap else 1
        nw = -(-T // m)
        w = lengths[:, None] // m + jnp.arange(nw, dtype=jnp.int32)[None, :]
        pos = w[..., None] * m + jnp.arange(m, dtype=jnp.int32)  # [B, nw, m]

        def rows_at(p):
            i = jnp.clip(p - first[:, None, None], 0, src.shape[1] - 1).reshape(B, nw * m)
            return jnp.take_along_axis(src, i[..., None], axis=1).reshape(B, nw, m, -1)

        ape = self.ape[...].astype(F32)
        cur = rows_at(pos)
        kv_cur, gate_cur = cur[..., : c * d], cur[..., c * d :].astype(F32) + ape
        if self.overlap:
            prev = rows_at(pos - m)
            gate_prev = prev[..., c * d : c * d + d].astype(F32) + ape[:, :d]
            gate_prev = jnp.where((pos - m >= 0)[..., None], gate_prev, -jnp.inf)
            values = jnp.concatenate([prev[..., :d], kv_cur[..., d:]], axis=2)  # [B, nw, 2m, d]
            gates = jnp.concatenate([gate_prev, gate_cur[..., d:]], axis=2)
        else:
            values, gates = kv_cur, gate_cur
        probs = jax.nn.softmax(gates, axis=2).astype(values.dtype)
        pooled = rms_norm_fp32(jnp.sum(values * probs, axis=2), self.norm[...], self.eps)
        cos, sin = rope(w * m)
        entries = rope_tail(pooled[:, :, None, :], cos, sin)[:, :, 0, :]
        last = w * m + m - 1
        new = (last >= lengths[:, None]) & (last < lengths[:, None] + T)
        return entries, jnp.where(new, w, -1)


def write_entries(cache: jax.Array, entries: jax.Array, index: jax.Array) -> jax.Array:
    """`cache [B, 1, C, d]` with `entries [B, nw, d]` at slots `index [B, nw]` (-1: not written)."""
    C = cache.shape[2]
    slot = jnp.where(index >= 0, index, C)  # out of range: dropped
    rows = jnp.arange(cache.shape[0])[:, None]
    return cache.at[rows, 0, slot].set(entries.astype(cache.dtype), mode="drop")


class Indexer(nnx.Module):
    """Lightning indexer: scores `sum_h w[t, h] relu(q[t, h] . k[s]) / sqrt(dI)` of each query against the
    indexer's own compressed keys, `w = weights_proj(x) / sqrt(H_I)`; keeps the top `index_topk` visible ones."""

    def __init__(self, cfg: DeepseekV4Config, init: Init):
        D, Hi, dI = cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = init.normal((cfg.q_lora_rank, Hi, dI), ("rank", None, None))
        self.weights_proj = init.normal((D, Hi), ("embed", None))
        self.compressor = Compressor(D, dI, cfg.csa_ratio, True, cfg.rms_norm_eps, init)
        self.topk, self.ratio = cfg.index_topk, cfg.csa_ratio

    def select(self, x, qr, keys, positions, cos, sin) -> jax.Array:
        """Which compressed entries each query attends to, `[B, T, C]`."""
        Hi, dI = self.wq_b.shape[-2:]
        q = rope_tail(linear(qr, self.wq_b[...]), cos, sin)
        s = jax.nn.relu(jnp.einsum("bthd,bsd->bths", q.astype(F32), keys.astype(F32))) * dI**-0.5
        w = linear(x, self.weights_proj[...]).astype(F32) * Hi**-0.5
        score = jnp.einsum("bths,bth->bts", s, w)
        C = keys.shape[1]
        visible = jnp.arange(C)[None, None, :] < ((positions + 1) // self.ratio)[..., None]
        score = jnp.where(visible, score, -jnp.inf)
        kth = jax.lax.top_k(score, min(self.topk, C))[0][..., -1:]
        return visible & (score >= kth)


class V4Attention(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, attention_type: str, init: Init):
        D, N, H, Rq = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.q_lora_rank
        G, O = cfg.o_groups, cfg.o_lora_rank
        fp32 = dataclasses.replace(init, dtype=F32)
        self.wq_a = init.normal((D, Rq), ("embed", "rank"))
        self.q_norm = fp32.ones((Rq,), ("rank",))
        self.wq_b = init.normal((Rq, N, H), ("rank", "q_heads", "head_dim"))
        self.wkv = init.normal((D, H), ("embed", "head_dim"))
        self.kv_norm = fp32.ones((H,), ("head_dim",))
        self.wo_a = init.normal((N * H // G, G, O), (None, None, "rank"))  # per group: [heads of the group x H, O]
        self.wo_b = init.normal((G * O, D), ("rank", "embed"))
        self.attn_sink = fp32.zeros((N,), ("q_heads",))
        self.type = attention_type
        if attention_type != SLIDING:
            ratio = cfg.csa_ratio if attention_type == CSA else cfg.hca_ratio
            self.compressor = Compressor(D, H, ratio, attention_type == CSA, cfg.rms_norm_eps, init)
        if attention_type == CSA:
            self.indexer = Indexer(cfg, init)
        self.eps, self.window, self.groups = cfg.rms_norm_eps, cfg.sliding_window, G

    def raw_width(self) -> int:
        if self.type == SLIDING:
            return 0
        return self.compressor.width + (self.indexer.compressor.width if self.type == CSA else 0)

    def keys(self, x: jax.Array, cos, sin) -> jax.Array:
        """The shared key/value rows `[B, T, 1, H]` (normed, roped) of inputs `x [B, T, D]`."""
        return rope_tail(rms_norm_fp32(linear(x, self.wkv[...]), self.kv_norm[...], self.eps)[:, :, None, :], cos, sin)

    def queries(self, x: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
        """(roped queries `[B, T, N, H]`, the normed low-rank query `qr [B, T, Rq]` the indexer also reads)."""
        qr = rms_norm_fp32(linear(x, self.wq_a[...]), self.q_norm[...], self.eps)
        return rope_tail(unweighted_rms(linear(qr, self.wq_b[...]), self.eps), cos, sin), qr

    def output(self, q: jax.Array, parts, cos, sin) -> jax.Array:
        """Attention over `parts [(kv [B, S, H], mask [B, T, S])]` with the sinks, the inverse RoPE and the
        grouped output projection -> `[B, T, D]`."""
        B, T = q.shape[:2]
        out = rope_tail(self._attend(q, parts), cos, -sin)
        y = jnp.einsum("btgi,igo->btgo", out.reshape(B, T, self.groups, -1), self.wo_a[...]).reshape(B, T, -1)
        return linear(y, self.wo_b[...])

    def __call__(self, x: jax.Array, ctx: Context, cache: V4LayerCache, rope_at) -> tuple[jax.Array, V4LayerCache]:
        cos, sin = ctx.rope[self.type]
        q, qr = self.queries(x, cos, sin)
        k = self.keys(x, cos, sin)
        S = cache.window.shape[2]
        parts = [(cache.window[:, 0], kv.cached_mask(ctx.positions, ctx.lengths, S, self.window)),
                 (k[:, :, 0], ctx.fresh_mask)]
        new = dataclasses.replace(cache, window=kv.write(cache.window, k, ctx.lengths, ctx.num_valid))
        if self.type != SLIDING:
            part, updates = self._compressed(x, qr, ctx, cache, rope_at)
            parts.append(part)
            new = dataclasses.replace(new, **updates)
        return self.output(q, parts, cos, sin), new

    def _compressed(self, x, qr, ctx: Context, cache: V4LayerCache, rope_at):
        """Write this block's entries (from the raw ring and the block's rows) -> (the compressed part
        `(entries [B, C, H], mask [B, T, C])`, the updated cache fields)."""
        out = {}
        T = x.shape[1]
        comp = self.compressor
        rows = comp.rows(x)
        if self.type == CSA:
            rows = jnp.concatenate([rows, self.indexer.compressor.rows(x)], axis=-1)
        back = (2 if comp.overlap else 1) * comp.ratio - 1  # earlier positions a new entry may need
        first = ctx.lengths - back
        src = jnp.concatenate([ring_rows(cache.raw, first, back).astype(rows.dtype), rows], axis=1)
        out["raw"] = kv.write(cache.raw, rows[:, :, None, :].astype(cache.raw.dtype), ctx.lengths, ctx.num_valid)
        w = comp.width
        entries, index = comp.pool(src[..., :w], first, ctx.lengths, T, rope_at)
        out["entries"] = write_entries(cache.entries, entries, index)
        keys = out["entries"][:, 0]
        if self.type == CSA:
            idx_entries, idx_index = self.indexer.compressor.pool(src[..., w:], first, ctx.lengths, T, rope_at)
            out["index_entries"] = write_entries(cache.index_entries, idx_entries, idx_index)
            cos, sin = ctx.rope[CSA]
            mask = self.indexer.select(x, qr, out["index_entries"][:, 0], ctx.positions, cos, sin)
        else:
            C = keys.shape[1]
            mask = jnp.arange(C)[None, None, :] < ((ctx.positions + 1) // comp.ratio)[..., None]
        return (keys, mask), out

    def _attend(self, q: jax.Array, parts) -> jax.Array:
        """Shared-KV MQA of `q [B, T, N, H]` over `parts [(kv [B, S, H], mask [B, T, S])]` plus the sinks."""
        B, T, N, H = q.shape
        scale = H**-0.5
        scores = [jnp.where(m[:, None], jnp.einsum("btnh,bsh->bnts", q, v, preferred_element_type=F32) * scale, MASKED)
                  for v, m in parts]
        sink = jnp.broadcast_to(self.attn_sink[...].astype(F32)[None, :, None, None], (B, N, T, 1))
        probs = jax.nn.softmax(jnp.concatenate([*scores, sink], axis=-1), axis=-1)
        # probabilities in the value dtype times values, as transformers does; each part's product stays in that
        # dtype (XLA:CPU has no bf16 x bf16 -> f32 kernel for this layout), the parts add in float32
        out, offset = None, 0
        for v, _ in parts:
            p = probs[..., offset : offset + v.shape[1]].astype(v.dtype)
            offset += v.shape[1]
            o = jnp.einsum("bnts,bsh->btnh", p, v).astype(F32)
            out = o if out is None else out + o
        return out.astype(q.dtype)


class V4MoE(nnx.Module):
    """Routed experts (`w1` gate, `w3` up, `w2` down) plus one shared expert, clamped SwiGLU throughout."""

    def __init__(self, cfg: DeepseekV4Config, hashed: bool, init: Init):
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        self.gate = init.normal((D, E), ("embed", None))
        if hashed:  # a fixed token -> experts table, int32 whatever the model dtype
            lead = (init.stack,) if init.stack else ()
            self.tid2eid = nnx.Param(jnp.zeros((*lead, cfg.vocab_size, cfg.num_experts_per_tok), jnp.int32),
                                     axes=(("layers",) if lead else ()) + ("vocab", None))
        else:
            self.bias = dataclasses.replace(init, dtype=F32).zeros((E,), (None,))
        self.w1 = init.normal((E, D, F), ("experts", "embed", "mlp"))
        self.w3 = init.normal((E, D, F), ("experts", "embed", "mlp"))
        self.w2 = init.normal((E, F, D), ("experts", "mlp", "embed"))
        self.shared_w1 = init.normal((D, F), ("embed", "mlp"))
        self.shared_w3 = init.normal((D, F), ("embed", "mlp"))
        self.shared_w2 = init.normal((F, D), ("mlp", "embed"))
        self.hashed, self.k = hashed, cfg.num_experts_per_tok
        self.scaling, self.limit = cfg.routed_scaling_factor, cfg.swiglu_limit

    def route(self, flat: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`flat [M, D]`, `tokens [M]` -> (weights [M, k] fp32, expert ids [M, k])."""
        scores = jnp.sqrt(jax.nn.softplus(linear(flat, self.gate[...]).astype(F32)))
        if self.hashed:
            idx = jnp.take(self.tid2eid[...], tokens, axis=0)
        else:
            idx = jax.lax.top_k(scores + self.bias[...].astype(F32), self.k)[1]
        weights = jnp.take_along_axis(scores, idx, axis=1)
        return weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20) * self.scaling, idx

    def __call__(self, x: jax.Array, tokens: jax.Array) -> jax.Array:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, idx = self.route(flat, tokens.reshape(-1))
        out = routed_experts(flat, weights, idx, self.w1[...], self.w3[...], self.w2[...], "silu", self.limit)
        shared = clamped_swiglu(x, self.shared_w1[...], self.shared_w3[...], self.shared_w2[...], self.limit)
        return out.reshape(B, T, D) + shared


class V4Layer(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, kind: tuple[str, str], init: Init):
        D = cfg.hidden_size
        fp32 = dataclasses.replace(init, dtype=F32)
        self.attn_norm = fp32.ones((D,), ("embed",))
        self.ffn_norm = fp32.ones((D,), ("embed",))
        self.hc_attn = HyperConnection(cfg, fp32)
        self.hc_ffn = HyperConnection(cfg, fp32)
        self.attn = V4Attention(cfg, kind[0], init)
        self.ffn = V4MoE(cfg, kind[1] == HASH, init)
        self.eps = cfg.rms_norm_eps

    def __call__(self, h, ctx: Context, cache: V4LayerCache, rope_at):
        post, comb, x = self.hc_attn(h)
        a, cache = self.attn(rms_norm_fp32(x, self.attn_norm[...], self.eps), ctx, cache, rope_at)
        h = hc_mix(post, comb, a, h)
        post, comb, x = self.hc_ffn(h)
        f = self.ffn(rms_norm_fp32(x, self.ffn_norm[...], self.eps), ctx.tokens)
        return hc_mix(post, comb, f, h), cache


class DeepseekV4Model(nnx.Module):
    """DeepSeek-V4 causal LM (`engine.contracts.TargetModel`). Holds parameters only; caches are passed in
    and returned (`V4LayerCache` per pattern position of each layer group)."""

    def __init__(self, cfg: DeepseekV4Config, init: Init):
        D, V, n = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
        fp32 = dataclasses.replace(init, dtype=F32)
        self.config = cfg
        self.dtype = jnp.dtype(init.dtype)
        self.embed = init.normal((V, D), ("vocab", "embed"))
        kinds = [self.kind(i) for i in range(cfg.num_layers)]
        self.groups = nnx.List([
            stack.Group([V4Layer(cfg, kind, init.stacked(r)) for kind in pattern], start, r)
            for start, pattern, r in stack.periodic_groups(kinds)
        ])
        self.norm = fp32.ones((D,), ("embed",))
        self.hc_head_fn = fp32.normal((n * D, n), ("embed", None))
        self.hc_head_base = fp32.zeros((n,), (None,))
        self.hc_head_scale = fp32.ones((1,), (None,))
        if not cfg.tie_word_embeddings:
            self.head = init.normal((V, D), ("vocab", "embed"))

    def last_streams_index(self) -> int:
        """The capture index of the raw last-layer streams `[B, T, n * D]` (before `hc_head`): a V4 MTP module's input."""
        return self.config.num_layers + 1

    def kind(self, layer: int) -> tuple[str, str]:
        return self.config.layer_types[layer], self.config.mlp_layer_types[layer]

    # --- shapes ------------------------------------------------------------------------------------
    def layer_map(self) -> stack.LayerMap:
        return stack.LayerMap.of(self.groups)

    def ring_slots(self, attention_type: str, capacity: int, max_block: int) -> int:
        """Ring slots of a layer: the window's `W - 1` earlier positions or the raw rows a new entry needs
        (`2m - 1` CSA, `m - 1` HCA), plus a block of `max_block` written ahead (docs/deepseek.md §7)."""
        c = self.config
        back = {SLIDING: 0, CSA: 2 * c.csa_ratio - 1, HCA: c.hca_ratio - 1}[attention_type]
        return min(capacity, max(c.sliding_window - 1, back) + max_block)

    def init_cache(self, batch: int, capacity: int, max_block: int = 1):
        c = self.config
        caches = []
        for group in self.groups:
            per = []
            for q, layer in enumerate(group.layers):
                t = c.layer_types[group.start + q]
                S = self.ring_slots(t, capacity, max_block)

                def z(s, w, n=group.n):
                    return jnp.zeros((n, batch, 1, s, w), self.dtype)

                if t == SLIDING:
                    per.append(V4LayerCache(window=z(S, c.head_dim)))
                    continue
                m = c.csa_ratio if t == CSA else c.hca_ratio
                C = max(1, capacity // m)
                per.append(V4LayerCache(
                    window=z(S, c.head_dim), raw=z(S, layer.attn.raw_width()), entries=z(C, c.head_dim),
                    index_entries=z(C, c.index_head_dim) if t == CSA else None,
                ))
            caches.append(tuple(per))
        return kv.constrain(tuple(caches))

    # --- pieces ------------------------------------------------------------------------------------
    def rope(self, attention_type: str, positions: jax.Array):
        """cos/sin `[B, T, rope_head_dim / 2]` of an attention type's RoPE (main or compress)."""
        c = self.config
        inv, factor = inverse_frequencies(dataclasses.replace(c.rope(attention_type), partial_rotary_factor=1.0),
                                          c.rope_head_dim)
        return rope_angles(positions, inv, factor, self.dtype)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0)

    def hc_head(self, h: jax.Array) -> jax.Array:
        """Collapse the streams `[B, T, n, D]` -> `[B, T, D]` with `hc_head` weights (no Sinkhorn)."""
        B, T, n, D = h.shape
        flat = unweighted_rms(h.reshape(B, T, n * D).astype(F32), self.config.rms_norm_eps)
        mix = flat @ self.hc_head_fn[...].astype(F32)
        pre = jax.nn.sigmoid(mix * self.hc_head_scale[...].astype(F32) + self.hc_head_base[...].astype(F32))
        pre = pre + self.config.hc_eps
        return jnp.sum(pre[..., None] * h.astype(F32), axis=2).astype(h.dtype)

    def final_norm(self, x: jax.Array) -> jax.Array:
        return rms_norm_fp32(x, self.norm[...], self.config.rms_norm_eps)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits `[..., V]` of final-normed hidden states."""
        head = self.embed[...] if self.config.tie_word_embeddings else self.head[...]
        return jnp.einsum("...d,vd->...v", hidden, head, preferred_element_type=F32)

    # --- target forward ------------------------------------------------------------------------------
    def __call__(self, tokens, lengths, cache, *, capture: tuple[int, ...] = (), num_valid=None, streams: bool = False):
        """Run `tokens [B, T]` at positions `lengths[b] + t` on top of `cache` (write ahead, commit by length,
        docs/caches.md §2; docs/deepseek.md §7). Returns the final-normed hidden `[B, T, D]`, the cache, and the
        requested HF `output_hidden_states` concatenated: index 0 = embeddings, i + 1 = output of layer i,
        L = final norm, each the mean over the hc streams (`[B, T, D]` per index). With `streams`, each index
        i < L is the flattened streams `[B, T, n * D]` instead and index L the raw last-layer streams (before
        `hc_head`). Requesting index `L + 1` (alone) means those raw last-layer streams (`last_streams_index`)."""
        c = self.config
        B, T = tokens.shape
        L = c.num_layers
        if L + 1 in capture:  # the raw last-layer streams: what a V4 MTP module reads
            if any(i != L + 1 for i in capture):
                raise ConfigError(f"capture {capture}: index {L + 1} (the raw last-layer streams) must be requested alone")
            capture, streams = (L,) * len(capture), True
        lengths = lengths.astype(jnp.int32)
        num_valid = jnp.full((B,), T, jnp.int32) if num_valid is None else num_valid.astype(jnp.int32)
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        rope = {t: self.rope(t, positions) for t in (SLIDING, CSA, HCA)}
        ctx = Context(tokens=tokens, positions=positions, lengths=lengths, num_valid=num_valid, rope=rope,
                      fresh_mask=kv.block_mask(B, T, causal=True, window=c.sliding_window))

        def rope_at(p):
            return self.rope(CSA, p)

        x = self.embed_tokens(tokens)
        h = jnp.broadcast_to(x[:, :, None, :], (B, T, c.hc_mult, c.hidden_size))
        cap = stack.Capture(capture, L)

        def feature(h):
            return h.reshape(B, T, -1) if streams else jnp.mean(h.astype(F32), axis=2).astype(h.dtype)

        buf = cap.record(cap.buffer(feature(h)), 0, feature(h))
        new_cache = []
        for group, group_cache in zip(self.groups, cache):

            def body(layers, carry, inp):
                h, buf = carry
                caches, index = inp
                out = []
                for q, (layer, lc) in enumerate(zip(layers, caches)):
                    with jax.named_scope("layer"):
                        h, lc = layer(h, ctx, lc, rope_at)
                    out.append(lc)
                    if streams:
                        buf = cap.record(buf, index[q] + 1, feature(h))
                    else:
                        buf = cap.record(buf, jnp.where(index[q] + 1 < L, index[q] + 1, L + 1), feature(h))
                return (h, buf), tuple(out)

            (h, buf), group_cache = stack.scan(group, body, (h, buf), (group_cache, jnp.asarray(group.layer_indices())))
            new_cache.append(group_cache)
        x = self.final_norm(self.hc_head(h))
        if not streams:
            buf = cap.record(buf, L, x)
        return x, tuple(new_cache), cap.features(buf)
