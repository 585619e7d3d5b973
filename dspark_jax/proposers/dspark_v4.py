"""The DeepSeek-V4 DSpark draft as a proposer (docs/deepseek.md §12).

DSpark V4 checkpoints (`DeepSeek-V4-Flash-DSpark`, target_families.md §2) store the draft inside the target
checkpoint under the legacy MTP namespace `mtp.0 .. mtp.{L_d - 1}`: `L_d` decoder blocks of the target's own
geometry with sliding-window attention only and a routed MoE (read with the V4 family's layer rules and run
with its `V4Layer` pieces), `mtp.0.main_proj [D, n_t D]` + `mtp.0.main_norm` over the concatenated target
features, and on the last stage `norm`, `hc_head_{fn,base,scale}`, the Markov head (`markov_w1`, `markov_w2`
`[V, R]`, also spelt `markov_head.markov_w{1,2}`) and the confidence head (`confidence_head.proj.weight` or
`confidence_weight`, `[1, D + R]`; a bias when stored). The embedding and the head are the target's.

Forward (the DSpark semantics of docs/algorithm.md §2-§4 on V4 blocks):

* context `C = main_norm(main_proj(F))`, `F` the target features of committed positions; every draft block
  turns `C` into its shared key/value rows with its own `wkv`, `kv_norm` and the "main" RoPE at the target
  positions (KV injection; like the DeepSpec drafts, `C` skips the block's input norm). These rows depend on
  target features only, so they are cached by position and committed by length;
* the block `[anchor, noise x (bs - 1)]` at positions `start .. start + bs - 1` enters as the embedding on every
  hc stream; each block mixes its streams (mHC), attends **bidirectionally** within the block and to the
  injected rows of the last `sliding_window` positions before the anchor (`start - W <= j < start`), and runs
  its MoE; `hc_head`, `norm` and the shared head give `bs` base logits (position k predicts `start + k + 1`);
* the vanilla Markov head adds `W2 W1[prev]` to each position's logits and tokens are drawn left to right; the
  confidence head reads `[h_k ; W1[prev_k]]`.

Target features (`feature_source`): the official drafter reads `h.mean(hc)` of target layers
`dspark_target_layer_ids` (e.g. [40, 41, 42] of 43), and secondary sources disagree whether that is the layer's
input or output. We default to the layer **input** (HF hidden-state index `id`): with output semantics the last
id (42) would be the output of the target's last layer, whose HF hidden state is final-normed (docs/algorithm.md
§2.1), while the input reading keeps every feature an interior residual stream the target returns as it is.
`feature_source="output"` (index `id + 1`, the DeepSpec convention of the Qwen3/Gemma drafts) is available
from `config.json` (`dspark_feature_source`) or `load_v4_dspark(..., feature_source=...)`, and then refuses
the last layer.
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
from dspark_jax.layers import stack
from dspark_jax.layers.norms import rms_norm_fp32
from dspark_jax.layers.params import Init
from dspark_jax.layers.rope import inverse_frequencies
from dspark_jax.models.deepseek_v4 import checkpoint as v4_checkpoint
from dspark_jax.models.deepseek_v4.config import ROUTED, SLIDING, DeepseekV4Config
from dspark_jax.models.deepseek_v4.config import parse as parse_v4
from dspark_jax.models.deepseek_v4.model import F32, V4Layer, hc_mix, rope_angles, unweighted_rms
from dspark_jax.proposers.markov import ConfidenceHead, MarkovHead

FEATURE_SOURCES = ("input", "output")
DEFAULT_FEATURE_SOURCE = "input"  # module doc: why


@dataclasses.dataclass(frozen=True)
class V4DSparkConfig:
    """A DSpark draft of a DeepSeek-V4 `target`: `num_layers` sliding-only V4 blocks (module doc)."""

    target: DeepseekV4Config
    num_layers: int
    block_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    markov_rank: int = 0
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = True
    feature_source: str = DEFAULT_FEATURE_SOURCE
    markov_head_type: str = "vanilla"  # the only kind the V4 layout stores (markov_w1, markov_w2)

    def __post_init__(self):
        if self.num_layers < 1:
            raise ConfigError(f"V4 DSpark draft: num_layers={self.num_layers} must be >= 1")
        if self.block_size < 1:
            raise ConfigError(f"V4 DSpark draft: dspark_block_size={self.block_size} must be >= 1")
        if not self.target_layer_ids:
            raise ConfigError("V4 DSpark draft: dspark_target_layer_ids is empty")
        if self.feature_source not in FEATURE_SOURCES:
            raise ConfigError(f"V4 DSpark draft: feature_source {self.feature_source!r} must be one of {FEATURE_SOURCES}")
        if self.markov_rank < 0:
            raise ConfigError(f"V4 DSpark draft: dspark_markov_rank={self.markov_rank} must be >= 0")
        if self.markov_head_type != "vanilla":
            raise ConfigError(f"V4 DSpark draft: Markov head {self.markov_head_type!r}: the V4 layout stores only the vanilla head")
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0:
            raise ConfigError("V4 DSpark draft: a confidence head reading the Markov embedding needs dspark_markov_rank > 0")
        if not 0 <= self.mask_token_id < self.target.vocab_size:
            raise ConfigError(f"V4 DSpark draft: dspark_noise_token_id {self.mask_token_id} is outside the vocabulary "
                              f"(size {self.target.vocab_size})")

    @property
    def family(self) -> str:
        return "dspark"

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.target.hidden_size

    @property
    def hidden_state_indices(self) -> tuple[int, ...]:
        """The target hidden-state indices of the features: the input of layer `id` is index `id`, its output `id + 1`."""
        shift = 0 if self.feature_source == "input" else 1
        return tuple(i + shift for i in self.target_layer_ids)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class V4DSparkState:
    keys: jax.Array  # [L_d, B, C, H] every draft block's injected key/value rows by target position


class LayerMap:
    """The draft blocks for the checkpoint rules: `mtp.{i}`, i < num_layers, one stacked group."""

    prefix = ("blocks", "layers", 0)

    def __init__(self, n: int):
        self.n = n

    def slot(self, i: int):
        return (self.prefix, i) if 0 <= i < self.n else None

    @property
    def prefixes(self) -> set[tuple]:
        return {self.prefix}

    def layers_at(self, prefix: tuple) -> dict[int, int]:
        return {i: i for i in range(self.n)} if prefix == self.prefix else {}


class V4DSparkDraft(nnx.Module):
    """Parameters of a V4 DSpark draft (with copies of the target's embedding and head) and the proposer contract."""

    def __init__(self, cfg: V4DSparkConfig, init: Init):
        t = cfg.target
        D, V, n = t.hidden_size, t.vocab_size, t.hc_mult
        fp32 = dataclasses.replace(init, dtype=F32)
        self.config = cfg
        self.dtype = jnp.dtype(init.dtype)
        self.embed = init.normal((V, D), ("vocab", "embed"))
        self.head = init.normal((V, D), ("vocab", "embed"))
        self.main_proj = init.normal((len(cfg.target_layer_ids) * D, D), ("features", "embed"))
        self.main_norm = fp32.ones((D,), ("embed",))
        self.norm = fp32.ones((D,), ("embed",))
        self.hc_head_fn = fp32.normal((n * D, n), ("embed", None))
        self.hc_head_base = fp32.zeros((n,), (None,))
        self.hc_head_scale = fp32.ones((1,), (None,))
        self.blocks = stack.Group([V4Layer(t, (SLIDING, ROUTED), init.stacked(cfg.num_layers))], 0, cfg.num_layers)
        self.markov_head = MarkovHead(cfg, init) if cfg.markov_rank > 0 else None
        self.confidence_head = ConfidenceHead(cfg, init) if cfg.enable_confidence_head else None
        self.max_draft_length = cfg.block_size
        self.feature_indices = cfg.hidden_state_indices
        self.has_confidence = cfg.enable_confidence_head

    # --- contract -------------------------------------------------------------------------------------
    def check_target(self, target_config) -> None:
        mine = self.config.target
        if not isinstance(target_config, DeepseekV4Config):
            raise ConfigError(f"this DSpark draft belongs to a DeepSeek-V4 target, not a {type(target_config).__name__}")
        if target_config != mine:
            diff = [f.name for f in dataclasses.fields(mine) if getattr(mine, f.name) != getattr(target_config, f.name)]
            raise ConfigError(f"this DSpark draft was stored with another DeepSeek-V4 target (config differs in {diff})")
        check_layer_ids(self.config)

    def init_state(self, batch: int, capacity: int) -> V4DSparkState:
        t = self.config.target
        return V4DSparkState(keys=jnp.zeros((self.config.num_layers, batch, capacity, t.head_dim), self.dtype))

    def extend(self, state: V4DSparkState, tokens, features: jax.Array, lengths: jax.Array) -> V4DSparkState:
        """Write every block's injected rows of `features [B, T, n_t D]` at positions `lengths + t` (written ahead)."""
        del tokens
        B, T = features.shape[:2]
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        c = self.project_context(features)
        cos, sin = self.rope(positions)
        rows = jnp.stack([layer.attn.keys(c, cos, sin)[:, :, 0] for layer in self.layers()])  # [L_d, B, T, H]
        keys = state.keys.at[:, jnp.arange(B)[:, None], positions].set(rows, mode="drop")
        return V4DSparkState(keys=keys)

    def propose(self, state: V4DSparkState, anchor, lengths, params: SamplingParams, keys, K: int) -> Proposal:
        """`K` drafts after each row's anchor (position `lengths`), truncated by confidence like `DSparkDraft`."""
        drafts, probs, _, conf = self.sample_block(state, anchor, lengths, params, keys, K)
        threshold = params.confidence_threshold[:, None]
        low = (jax.nn.sigmoid(conf) < threshold) & (threshold > 0)
        num_proposed = jnp.where(jnp.any(low, axis=1), jnp.argmax(low, axis=1), K).astype(jnp.int32)
        return Proposal(drafts, probs, num_proposed, conf if self.confidence_head is not None else None)

    # --- pieces ---------------------------------------------------------------------------------------
    def layers(self) -> list[V4Layer]:
        graphdef, st = nnx.split(self.blocks.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], st))[0] for i in range(self.config.num_layers)]

    def rope(self, positions: jax.Array):
        """The sliding-only blocks' ("main") RoPE at `positions`."""
        t = self.config.target
        inv, factor = inverse_frequencies(dataclasses.replace(t.rope_main, partial_rotary_factor=1.0), t.rope_head_dim)
        return rope_angles(positions, inv, factor, self.dtype)

    def project_context(self, features: jax.Array) -> jax.Array:
        """`main_norm(main_proj(F))`: `[B, T, n_t D]` -> `[B, T, D]`."""
        c = jnp.einsum("btf,fd->btd", features.astype(self.dtype), self.main_proj[...])
        return rms_norm_fp32(c, self.main_norm[...], self.config.target.rms_norm_eps)

    def block_hidden(self, block: jax.Array, lengths: jax.Array, state: V4DSparkState) -> jax.Array:
        """Final-normed hidden `[B, bs, D]` of `block [B, bs]` at positions `lengths + k` over the injected rows."""
        t = self.config.target
        B, T = block.shape
        C = state.keys.shape[2]
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        cos, sin = self.rope(positions)
        j = jnp.arange(C, dtype=jnp.int32)[None, None, :]
        context = jnp.broadcast_to((j < lengths[:, None, None]) & (j >= lengths[:, None, None] - t.sliding_window), (B, T, C))
        bidirectional = jnp.ones((B, T, T), bool)
        x = jnp.take(self.embed[...], block, axis=0)
        h = jnp.broadcast_to(x[:, :, None, :], (B, T, t.hc_mult, t.hidden_size))
        for i, layer in enumerate(self.layers()):
            post, comb, collapsed = layer.hc_attn(h)
            xn = rms_norm_fp32(collapsed, layer.attn_norm[...], layer.eps)
            q, _ = layer.attn.queries(xn, cos, sin)
            own = layer.attn.keys(xn, cos, sin)[:, :, 0]
            h = hc_mix(post, comb, layer.attn.output(q, [(state.keys[i], context), (own, bidirectional)], cos, sin), h)
            post, comb, collapsed = layer.hc_ffn(h)
            h = hc_mix(post, comb, layer.ffn(rms_norm_fp32(collapsed, layer.ffn_norm[...], layer.eps), block), h)
        return rms_norm_fp32(self.hc_head(h), self.norm[...], t.rms_norm_eps)

    def hc_head(self, h: jax.Array) -> jax.Array:
        """Collapse the streams `[B, T, n, D]` with the draft's own `hc_head` weights (as the target's, no Sinkhorn)."""
        t = self.config.target
        B, T, n, D = h.shape
        flat = unweighted_rms(h.reshape(B, T, n * D).astype(F32), t.rms_norm_eps)
        pre = jax.nn.sigmoid((flat @ self.hc_head_fn[...].astype(F32)) * self.hc_head_scale[...].astype(F32)
                             + self.hc_head_base[...].astype(F32)) + t.hc_eps
        return jnp.sum(pre[..., None] * h.astype(F32), axis=2).astype(h.dtype)

    def base_logits(self, hidden: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", hidden, self.head[...], preferred_element_type=F32)

    def confidence(self, hidden: jax.Array, prev: jax.Array) -> jax.Array:
        e = self.markov_head.embed(prev) if self.markov_head is not None else None
        return self.confidence_head(hidden, e)

    def sample_block(self, state, anchor, lengths, params: SamplingParams, keys, K: int):
        """The block forward and the sequential Markov sampling loop -> (drafts i32[B, K], their distributions
        f32[B, K, V], corrected logits f32[B, K, V], confidence logits f32[B, K] (zeros without a head))."""
        cfg = self.config
        B = anchor.shape[0]
        block = jnp.concatenate([anchor[:, None], jnp.full((B, cfg.block_size - 1), cfg.mask_token_id, jnp.int32)], axis=1)
        with jax.named_scope("draft_block"):
            hidden = self.block_hidden(block, lengths, state)[:, :K]
            base = self.base_logits(hidden)
        markov = self.markov_head
        greedy = sampling.all_greedy(params)

        def body(prev, xs):
            k, h, logits = xs
            if markov is not None:
                logits = logits + markov.step(prev, h, jnp.zeros((B, 0), self.dtype))[0]
            probs = sampling.probabilities(logits, params)
            token = sampling.token_at(probs, params, keys, lengths + k + 1, sampling.SALT_DRAFT, greedy)
            conf = self.confidence(h, prev) if self.confidence_head is not None else jnp.zeros((B,), jnp.float32)
            return token, (token, probs, logits, conf)

        with jax.named_scope("markov_loop"):
            _, (drafts, probs, logits, conf) = jax.lax.scan(
                body, anchor, (jnp.arange(K), jnp.swapaxes(hidden, 0, 1), jnp.swapaxes(base, 0, 1)))
        return drafts.T, jnp.swapaxes(probs, 0, 1), jnp.swapaxes(logits, 0, 1), conf.T

    def layer_map(self) -> LayerMap:
        return LayerMap(self.config.num_layers)


def check_layer_ids(cfg: V4DSparkConfig) -> None:
    L = cfg.target.num_layers
    for i in cfg.target_layer_ids:
        if not 0 <= i < L:
            raise ConfigError(f"V4 DSpark dspark_target_layer_ids {list(cfg.target_layer_ids)}: layer {i} is outside the "
                              f"target's {L} layers")
        if cfg.feature_source == "output" and i == L - 1:
            raise ConfigError(
                f"V4 DSpark dspark_target_layer_ids {list(cfg.target_layer_ids)} with feature_source='output' reads the "
                f"output of the target's last layer {L - 1}, whose hidden state is final-normed; use feature_source='input'"
            )


# --- loading ------------------------------------------------------------------------------------------------

MARKOV_NAMES = {"markov_w1": ("markov_w1", "markov_head.markov_w1"), "markov_w2": ("markov_w2", "markov_head.markov_w2")}
CONFIDENCE_WEIGHTS = ("confidence_head.proj.weight", "confidence_weight")
CONFIDENCE_BIASES = ("confidence_head.proj.bias", "confidence_bias")


def is_dspark_config(raw: dict) -> bool:
    return any(k.startswith("dspark_") for k in raw)


def config_from(raw: dict, where: str, keys: set[str], feature_source: str | None = None) -> V4DSparkConfig:
    """The draft's configuration from a V4 DSpark `config.json` and the checkpoint's tensor names."""
    target = parse_v4(raw, where)
    for field in ("dspark_block_size", "dspark_target_layer_ids", "dspark_noise_token_id"):
        if raw.get(field) is None:
            raise ConfigError(f"{where}: a DeepSeek-V4 DSpark config needs {field}")
    L = target.num_layers
    ratios = raw.get("compress_ratios")
    if raw.get("dspark_num_layers") is not None:
        n = int(raw["dspark_num_layers"])
    elif ratios is not None and len(ratios) > L:
        n = len(ratios) - L  # one trailing compress_ratios entry per draft block
    else:
        raise ConfigError(f"{where}: cannot tell the DSpark draft depth: compress_ratios has no entries past the "
                          f"{L} target layers and dspark_num_layers is not set")
    if ratios is not None and any(int(r) != 0 for r in ratios[L : L + n]):
        raise ConfigError(f"{where}: compress_ratios {list(ratios[L:L + n])} of the DSpark blocks must be 0 (sliding only)")
    last = f"mtp.{n - 1}."
    confidence = any(last + name in keys for name in CONFIDENCE_WEIGHTS)
    source = feature_source or raw.get("dspark_feature_source") or DEFAULT_FEATURE_SOURCE
    cfg = V4DSparkConfig(target=target, num_layers=n, block_size=int(raw["dspark_block_size"]),
                         target_layer_ids=tuple(int(i) for i in raw["dspark_target_layer_ids"]),
                         mask_token_id=int(raw["dspark_noise_token_id"]), markov_rank=int(raw.get("dspark_markov_rank", 0) or 0),
                         enable_confidence_head=confidence, confidence_head_with_markov=True, feature_source=source)
    check_layer_ids(cfg)
    return cfg


def rules(cfg: V4DSparkConfig):
    last = f"mtp.{cfg.num_layers - 1}."
    table = [
        ("embed.weight", [(("embed",), "copy")]),
        ("head.weight", [(("head",), "copy")]),
        ("mtp.0.main_proj.weight", [(("main_proj",), "linear")]),
        ("mtp.0.main_norm.weight", [(("main_norm",), "copy")]),
        (last + "norm.weight", [(("norm",), "copy")]),
        (last + "hc_head_fn", [(("hc_head_fn",), "linear")]),
        (last + "hc_head_base", [(("hc_head_base",), "copy")]),
        (last + "hc_head_scale", [(("hc_head_scale",), "copy")]),
    ]
    for param, names in MARKOV_NAMES.items():
        table += [(last + name, [(("markov_head", param), "copy")]) for name in names]
    table += [(last + name, [(("confidence_head", "proj"), "linear")]) for name in CONFIDENCE_WEIGHTS]
    table += [(last + name, [(("confidence_head", "bias"), "copy")]) for name in CONFIDENCE_BIASES]
    return table + v4_checkpoint.layer_rules(cfg.target, "mtp.{i}.")


def ignore(key: str) -> bool:
    """The target's own tensors (everything but `mtp.*` and the shared embedding and head) are not read."""
    hub = v4_checkpoint.to_hub(key)
    return not (hub.startswith("mtp.") or hub in ("embed.weight", "head.weight"))


def load_v4_dspark(path, dtype="bfloat16", mesh=None, feature_source: str | None = None) -> Draft:
    """The DSpark draft stored in the DeepSeek-V4 DSpark checkpoint `path` (`mtp.0..L_d-1`, module doc) as a `Draft`.
    `feature_source` ("input" / "output") overrides `config.json`'s `dspark_feature_source` (default "input")."""
    from dspark_jax.models.loading import abstract, check_dtype, fill
    from dspark_jax.proposers.mtp_checkpoint import checkpoint_keys

    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    dt = check_dtype(dtype)
    where = directory / "config.json"
    raw = read_json(where)
    keys = {v4_checkpoint.to_hub(k) for k in checkpoint_keys(directory)}
    cfg = config_from(raw, str(where), keys, feature_source)
    if cfg.target.tie_word_embeddings:
        raise ConfigError(f"{where}: tie_word_embeddings is not supported for a DeepSeek-V4 DSpark draft (its head is head.weight)")
    if keys and "mtp.0.main_proj.weight" not in keys:
        found = " (it holds an MTP module, mtp.0.e_proj)" if "mtp.0.e_proj.weight" in keys else ""
        raise CheckpointError(f"{directory} declares a DeepSeek-V4 DSpark draft (dspark_* config fields) but holds no "
                              f"mtp.0.main_proj tensor{found}")
    graphdef, state = abstract(lambda: V4DSparkDraft(cfg, Init(nnx.Rngs(0), dt)))
    flat = list(nnx.to_flat_state(state))
    last = f"mtp.{cfg.num_layers - 1}."
    # the confidence bias is optional in this layout (zero when absent)
    no_bias = cfg.enable_confidence_head and not any(last + name in keys for name in CONFIDENCE_BIASES) and bool(keys)
    bias_path = ("confidence_head", "bias")
    reading = nnx.from_flat_state([(p, v) for p, v in flat if not (no_bias and p == bias_path)])
    params = fill(reading, directory, rules(cfg), dtype=dt, mesh=mesh, layer_map=LayerMap(cfg.num_layers), ignore=ignore,
                  rename=v4_checkpoint.to_hub)
    if no_bias:
        filled = dict(nnx.to_flat_state(params))
        var = dict(flat)[bias_path]
        filled[bias_path] = var.replace(jnp.zeros(var.get_value().shape, var.get_value().dtype))
        params = nnx.from_flat_state([(p, filled[p]) for p, _ in flat])
    return Draft(config=cfg, graphdef=graphdef, params=params, dtype=dt, directory=directory)
