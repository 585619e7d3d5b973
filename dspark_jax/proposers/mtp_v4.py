"""DeepSeek-V4 multi-token prediction (MTP) module as a proposer (docs/deepseek.md §10).

The hub checkpoint stores it as `mtp.0.*`: `e_proj`, `h_proj`, `enorm`, `hnorm`, one decoder block with
sliding-window attention only and a routed MoE (`attn_norm`, `ffn_norm`, `hc_{attn,ffn}_*`, `attn.*`,
`ffn.*`), its own `norm` and `hc_head_{fn,base,scale}`; the embedding and the head are the target's
(`embed.weight`, `head.weight`). At position `i` it takes the target's last-layer streams `h_i [n, D]`
(before the target's `hc_head`) and token `x_{i+1}`:

    x   = e_proj(enorm(emb(x_{i+1})))  (added to every stream)  +  h_proj(hnorm(h_i))        [n, D]
    g_i = block(x)          attending to the module's key/value rows of positions i - W < j <= i
    logits(x_{i+2}) = head(norm(hc_head(g_i)))

Chained MTP-k applies the same module again one position further on, feeding the block's output streams
`g` and the drafted token (the analogue of transformers' V3 chaining, which feeds the module's output).

State, written ahead and committed by length (docs/caches.md §2): the target's streams by position
(`hidden [B, C, n D]`) and the module's key/value rows by position (`keys [B, C, H]`, linear: a prefill chunk
may be longer than a ring and `extend` is not told how many of its rows are real). `extend` with a block at
`lengths` writes the rows of positions `lengths - 1 + t` (block token `t` with the streams one position
earlier); `propose` recomputes the anchor's row (`lengths - 1`) as its first step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.config import SamplingParams, read_json
from dspark_jax.engine import sampling
from dspark_jax.engine.contracts import Proposal
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.handles import Draft
from dspark_jax.layers import kv_cache as kv
from dspark_jax.layers import stack
from dspark_jax.layers.linear import linear
from dspark_jax.layers.norms import rms_norm_fp32
from dspark_jax.layers.params import Init
from dspark_jax.layers.rope import inverse_frequencies
from dspark_jax.models.deepseek_v4 import checkpoint as v4_checkpoint
from dspark_jax.models.deepseek_v4.config import ROUTED, SLIDING, DeepseekV4Config
from dspark_jax.models.deepseek_v4.config import parse as parse_v4
from dspark_jax.models.deepseek_v4.model import F32, V4Layer, hc_mix, rope_angles, unweighted_rms

DEFAULT_MAX_DRAFT_LENGTH = 7


@dataclasses.dataclass(frozen=True)
class V4MTPConfig:
    """The MTP module `mtp.0` of a DeepSeek-V4 `target`, chained up to `max_draft_length` times."""

    target: DeepseekV4Config
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
class V4MTPState:
    hidden: jax.Array  # [B, C, n * D] the target's last-layer streams by position
    keys: jax.Array  # [B, C, H] the module's key/value rows by position


class LayerMap:
    """The block's parameters for the checkpoint rules: `mtp.{i}` with i = 0 only."""

    prefix = ("block", "layers", 0)

    def slot(self, i: int):
        return (self.prefix, 0) if i == 0 else None

    @property
    def prefixes(self) -> set[tuple]:
        return {self.prefix}

    def layers_at(self, prefix: tuple) -> dict[int, int]:
        return {0: 0} if prefix == self.prefix else {}


class V4MTPProposer(nnx.Module):
    """Parameters of `mtp.0` with copies of the target's embedding and head, and the proposer contract."""

    def __init__(self, cfg: V4MTPConfig, init: Init):
        t = cfg.target
        D, V, n = t.hidden_size, t.vocab_size, t.hc_mult
        fp32 = dataclasses.replace(init, dtype=F32)
        self.config = cfg
        self.dtype = jnp.dtype(init.dtype)
        self.embed = init.normal((V, D), ("vocab", "embed"))
        self.head = init.normal((V, D), ("vocab", "embed"))
        self.e_proj = init.normal((D, D), ("features", "embed"))
        self.h_proj = init.normal((D, D), ("features", "embed"))
        self.enorm = fp32.ones((D,), ("embed",))
        self.hnorm = fp32.ones((D,), ("embed",))
        self.norm = fp32.ones((D,), ("embed",))
        self.hc_head_fn = fp32.normal((n * D, n), ("embed", None))
        self.hc_head_base = fp32.zeros((n,), (None,))
        self.hc_head_scale = fp32.ones((1,), (None,))
        self.block = stack.Group([V4Layer(t, (SLIDING, ROUTED), init.stacked(1))], 0, 1)
        self.max_draft_length = cfg.max_draft_length
        self.feature_indices = (t.num_layers + 1,)  # the target's raw last-layer streams (DeepseekV4Model)
        self.has_confidence = False

    # --- contract -------------------------------------------------------------------------------------
    def check_target(self, target_config) -> None:
        mine = self.config.target
        if not isinstance(target_config, DeepseekV4Config):
            raise ConfigError(f"this MTP module belongs to a DeepSeek-V4 target, not a {type(target_config).__name__}")
        if target_config != mine:
            diff = [f.name for f in dataclasses.fields(mine) if getattr(mine, f.name) != getattr(target_config, f.name)]
            raise ConfigError(f"this MTP module was stored with another DeepSeek-V4 target (config differs in {diff})")

    def init_state(self, batch: int, capacity: int) -> V4MTPState:
        t = self.config.target
        return V4MTPState(hidden=jnp.zeros((batch, capacity, t.hc_mult * t.hidden_size), self.dtype),
                          keys=jnp.zeros((batch, capacity, t.head_dim), self.dtype))

    def extend(self, state: V4MTPState, tokens: jax.Array, features: jax.Array, lengths: jax.Array) -> V4MTPState:
        """Store the streams `features [B, T, n D]` of positions `lengths + t`; write the rows of positions
        `lengths - 1 + t` (token `tokens[:, t]` with the streams one position earlier)."""
        B, T = tokens.shape
        C = state.hidden.shape[1]
        h = features.astype(self.dtype)
        hidden = jax.vmap(lambda c, u, o: jax.lax.dynamic_update_slice_in_dim(c, u, o, axis=0))(state.hidden, h, lengths)
        before = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)
        prev = jnp.concatenate([before, h[:, :-1]], axis=1)
        positions = lengths[:, None] - 1 + jnp.arange(T, dtype=jnp.int32)[None, :]
        layer = self.layer()
        x = self.streams_in(tokens, prev)
        _, _, collapsed = layer.hc_attn(x)
        rows = layer.attn.keys(rms_norm_fp32(collapsed, layer.attn_norm[...], layer.eps), *self.rope(positions))[:, :, 0]
        slot = jnp.where(positions >= 0, positions, C)  # position -1 of a prefill has no row: dropped
        keys = state.keys.at[jnp.arange(B)[:, None], slot].set(rows, mode="drop")
        return V4MTPState(hidden=hidden, keys=keys)

    def propose(self, state: V4MTPState, anchor, lengths, params: SamplingParams, keys, K: int) -> Proposal:
        """`K` chained MTP steps after each row's anchor (at position `lengths`)."""
        t = self.config.target
        B = anchor.shape[0]
        C = state.hidden.shape[1]
        n, D, W = t.hc_mult, t.hidden_size, t.sliding_window
        p0 = lengths - 1
        h0 = jnp.take_along_axis(state.hidden, jnp.maximum(p0, 0)[:, None, None], axis=1).reshape(B, 1, n, D)
        layer = self.layer()
        fresh = jnp.zeros((B, K, t.head_dim), self.dtype)

        def body(carry, k):
            token, h, fresh = carry
            pos = (p0 + k)[:, None]
            cos, sin = self.rope(pos)
            x = self.streams_in(token[:, None], h)
            post, comb, collapsed = layer.hc_attn(x)
            xn = rms_norm_fp32(collapsed, layer.attn_norm[...], layer.eps)
            q, _ = layer.attn.queries(xn, cos, sin)
            fresh = jax.lax.dynamic_update_index_in_dim(fresh, layer.attn.keys(xn, cos, sin)[:, 0, 0], k, 1)
            j = jnp.arange(K)[None, None, :]
            parts = [(state.keys, kv.cached_mask(pos, p0, C, W)),  # committed rows before the anchor's
                     (fresh, jnp.broadcast_to((j <= k) & (k - j < W), (B, 1, K)))]
            g = hc_mix(post, comb, layer.attn.output(q, parts, cos, sin), x)
            post, comb, collapsed = layer.hc_ffn(g)
            g = hc_mix(post, comb, layer.ffn(rms_norm_fp32(collapsed, layer.ffn_norm[...], layer.eps), token[:, None]), g)
            probs = sampling.probabilities(self.logits(g[:, 0]), params)
            new = sampling.token_at(probs, params, keys, lengths + k + 1, sampling.SALT_DRAFT)
            return (new, g, fresh), (new, probs)

        with jax.named_scope("mtp_chain"):
            _, (drafts, probs) = jax.lax.scan(body, (anchor, h0, fresh), jnp.arange(K))
        return Proposal(drafts.T, jnp.swapaxes(probs, 0, 1), jnp.full((B,), K, jnp.int32), None)

    # --- pieces ---------------------------------------------------------------------------------------
    def layer(self) -> V4Layer:
        graphdef, st = nnx.split(self.block.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], st))[0]

    def rope(self, positions: jax.Array):
        """The block's (sliding-only: "main") RoPE at `positions`."""
        t = self.config.target
        inv, factor = inverse_frequencies(dataclasses.replace(t.rope_main, partial_rotary_factor=1.0), t.rope_head_dim)
        return rope_angles(positions, inv, factor, self.dtype)

    def streams_in(self, tokens: jax.Array, hidden: jax.Array) -> jax.Array:
        """The block input `[B, T, n, D]`: `e_proj(enorm(emb(tokens)))` on every stream plus `h_proj(hnorm(h))`."""
        t = self.config.target
        B, T = tokens.shape
        h = hidden.reshape(B, T, t.hc_mult, t.hidden_size).astype(self.dtype)
        e = rms_norm_fp32(jnp.take(self.embed[...], tokens, axis=0), self.enorm[...], t.rms_norm_eps)
        return linear(e, self.e_proj[...])[:, :, None, :] + linear(rms_norm_fp32(h, self.hnorm[...], t.rms_norm_eps),
                                                                    self.h_proj[...])

    def logits(self, g: jax.Array) -> jax.Array:
        """fp32 logits of the block's output streams `g [B, n, D]`: the module's `hc_head` and norm, the shared head."""
        t = self.config.target
        B, n, D = g.shape
        flat = unweighted_rms(g.reshape(B, n * D).astype(F32), t.rms_norm_eps)
        pre = jax.nn.sigmoid((flat @ self.hc_head_fn[...].astype(F32)) * self.hc_head_scale[...].astype(F32)
                             + self.hc_head_base[...].astype(F32)) + t.hc_eps
        x = jnp.sum(pre[..., None] * g.astype(F32), axis=1).astype(g.dtype)
        x = rms_norm_fp32(x, self.norm[...], t.rms_norm_eps)
        return jnp.einsum("bd,vd->bv", x, self.head[...], preferred_element_type=F32)

    def layer_map(self) -> LayerMap:
        return LayerMap()


# --- loading ------------------------------------------------------------------------------------------------


def rules(cfg: V4MTPConfig):
    p = "mtp.0."
    return [
        ("embed.weight", [(("embed",), "copy")]),
        ("head.weight", [(("head",), "copy")]),
        (p + "e_proj.weight", [(("e_proj",), "linear")]),
        (p + "h_proj.weight", [(("h_proj",), "linear")]),
        (p + "enorm.weight", [(("enorm",), "copy")]),
        (p + "hnorm.weight", [(("hnorm",), "copy")]),
        (p + "norm.weight", [(("norm",), "copy")]),
        (p + "hc_head_fn", [(("hc_head_fn",), "linear")]),
        (p + "hc_head_base", [(("hc_head_base",), "copy")]),
        (p + "hc_head_scale", [(("hc_head_scale",), "copy")]),
        *v4_checkpoint.layer_rules(cfg.target, "mtp.{i}."),
    ]


def ignore(key: str) -> bool:
    """Everything but `mtp.0.*` and the shared embedding and head (the target's own tensors are not read)."""
    hub = v4_checkpoint.to_hub(key)
    return not (hub.startswith("mtp.0.") or hub in ("embed.weight", "head.weight"))


def load_v4_mtp(path, dtype="bfloat16", mesh=None, max_draft_length: int = DEFAULT_MAX_DRAFT_LENGTH) -> Draft:
    """The MTP module of the DeepSeek-V4 checkpoint in `path` as a `Draft` (K up to `max_draft_length`)."""
    from dspark_jax.models.loading import abstract, check_dtype, fill
    from dspark_jax.proposers.mtp_checkpoint import checkpoint_keys

    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    dt = check_dtype(dtype)
    where = directory / "config.json"
    raw = read_json(where)
    dspark = sorted(k for k in raw if k.startswith("dspark_"))
    if dspark:
        raise ConfigError(f"{where}: this is a DeepSeek-V4 DSpark checkpoint ({', '.join(dspark)}); its draft (mtp.0..2 "
                          "with main_proj, Markov and confidence heads) is not supported yet: use the target with its MTP "
                          "module or a model-free proposer (dj.prompt_lookup())")
    target = parse_v4(raw, str(where))
    if target.num_mtp_layers < 1:
        raise ConfigError(f"{where}: num_nextn_predict_layers is 0: this DeepSeek-V4 checkpoint has no MTP module")
    if target.tie_word_embeddings:
        raise ConfigError(f"{where}: tie_word_embeddings is not supported for a DeepSeek-V4 MTP module (its head is head.weight)")
    keys = {v4_checkpoint.to_hub(k) for k in checkpoint_keys(directory)}
    if keys and "mtp.0.e_proj.weight" not in keys:
        raise CheckpointError(
            f"{directory} declares {target.num_mtp_layers} MTP module(s) but holds no mtp.0.* tensors "
            "(transformers' save_pretrained drops them; use the hub checkpoint)"
        )
    cfg = V4MTPConfig(target=target, max_draft_length=max_draft_length)
    graphdef, state = abstract(lambda: V4MTPProposer(cfg, Init(nnx.Rngs(0), dt)))
    params = fill(state, directory, rules(cfg), dtype=dt, mesh=mesh, layer_map=LayerMap(), ignore=ignore,
                  rename=v4_checkpoint.to_hub)
    return Draft(config=cfg, graphdef=graphdef, params=params, dtype=dt, directory=directory)
