"""Gemma 4 configuration: the dataclass, `config.json` parsing (multimodal wrappers with a `text_config`,
their `*_text` decoders, hub and transformers-5 dialects), and the DeepSpec `Gemma4DSparkModel` draft backbone."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

from dspark_jax.config import RopeConfig, parse_rope, require, rope_dict
from dspark_jax.errors import ConfigError
from dspark_jax.layers.mlp import ACTIVATIONS

SLIDING = "sliding_attention"
FULL = "full_attention"
# Multimodal wrappers (text decoder under `text_config`) -> their text decoders, and back.
MULTIMODAL = {"gemma4": "gemma4_text", "gemma4_unified": "gemma4_unified_text"}
TEXT = {"gemma4_text": "gemma4", "gemma4_unified_text": "gemma4_unified"}
MODEL_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
DRAFT_ARCHITECTURE = "Gemma4DSparkModel"


class LayerKind(NamedTuple):
    """Everything that changes a layer's parameter shapes or computation: its attention type, whether it
    reuses the K/V of an earlier layer (KV sharing: no K/V projections), and whether its MLP is double-wide."""

    attention: str
    shares_kv: bool = False
    double_wide: bool = False


@dataclasses.dataclass(frozen=True)
class Gemma4Config:
    """Gemma 4 text decoders: `gemma4` (E2B/E4B/26B-A4B/31B) and `gemma4_unified` (12B).

    Two attention geometries: sliding layers (`head_dim`, `num_kv_heads`, window `sliding_window`,
    `rope_sliding`) and full layers (`global_head_dim`, `num_global_kv_heads`, `rope_full`; with
    `attention_k_eq_v` they have no value projection). The last `num_kv_shared_layers` layers reuse the
    K/V of the last earlier layer of their type. `gemma4_unified` has no per-layer inputs and no MoE.
    """

    family: ClassVar[str] = "gemma4"

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_types: tuple[str, ...]
    sliding_window: int
    head_dim: int
    num_kv_heads: int
    global_head_dim: int
    num_global_kv_heads: int
    rope_sliding: RopeConfig = RopeConfig(theta=10000.0)
    rope_full: RopeConfig = RopeConfig(theta=1e6, rope_type="proportional", partial_rotary_factor=0.25)
    attention_k_eq_v: bool = False
    final_logit_softcapping: float | None = None
    rms_norm_eps: float = 1e-6
    activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131072
    # Per-layer inputs (PLE, E2B/E4B): 0 disables them.
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    # KV sharing across layers (E2B/E4B) and the double-wide MLP of the sharing layers (E2B).
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    # Mixture of experts in parallel with the dense MLP (26B-A4B), in every layer when enabled.
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {SLIDING, FULL}:
            raise ConfigError(
                f"Gemma 4 layer_types must list {self.num_layers} entries of {SLIDING!r} / {FULL!r}, got {self.layer_types}"
            )
        if not 0 <= self.num_kv_shared_layers < self.num_layers:
            raise ConfigError(f"num_kv_shared_layers={self.num_kv_shared_layers} must be in [0, num_hidden_layers)")
        first_shared = self.first_shared_layer
        if not set(self.layer_types[first_shared:]) <= set(self.layer_types[:first_shared]):
            raise ConfigError(
                "num_kv_shared_layers: every attention type of the KV-sharing layers needs an earlier layer of that "
                f"type to share from (layer_types={list(self.layer_types)})"
            )
        if self.enable_moe_block and not (0 < self.top_k_experts <= self.num_experts and self.moe_intermediate_size > 0):
            raise ConfigError(
                f"enable_moe_block needs num_experts >= top_k_experts > 0 and moe_intermediate_size > 0, got "
                f"{self.num_experts}, {self.top_k_experts}, {self.moe_intermediate_size}"
            )

    # --- per attention type ----------------------------------------------------------------------------
    def type_head_dim(self, kind: str) -> int:
        return self.head_dim if kind == SLIDING else self.global_head_dim

    def type_kv_heads(self, kind: str) -> int:
        return self.num_kv_heads if kind == SLIDING else self.num_global_kv_heads

    def type_k_eq_v(self, kind: str) -> bool:
        return self.attention_k_eq_v and kind == FULL

    def type_rope(self, kind: str) -> RopeConfig:
        return self.rope_sliding if kind == SLIDING else self.rope_full

    def type_window(self, kind: str) -> int | None:
        return self.sliding_window if kind == SLIDING else None

    # --- per layer -------------------------------------------------------------------------------------
    @property
    def first_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.type_head_dim(self.layer_types[layer])

    def layer_kv_heads(self, layer: int) -> int:
        return self.type_kv_heads(self.layer_types[layer])

    def layer_k_eq_v(self, layer: int) -> bool:
        return self.type_k_eq_v(self.layer_types[layer])

    def layer_intermediate_size(self, layer: int) -> int:
        return self.intermediate_size * (2 if self.layer_kind(layer).double_wide else 1)

    def layer_kind(self, layer: int) -> LayerKind:
        shares = layer >= self.first_shared_layer
        return LayerKind(self.layer_types[layer], shares, shares and self.use_double_wide_mlp)

    def kv_source(self, layer: int) -> int:
        """The layer whose keys/values `layer` attends over: itself, or for a KV-sharing layer the last
        non-sharing layer of the same type (HF `kv_sharing_modes` "store"/"reuse")."""
        if layer < self.first_shared_layer:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(self.first_shared_layer) if self.layer_types[i] == kind)

    @property
    def cache_layers(self) -> tuple[int, ...]:
        """Layers that own a KV cache (every layer but the KV-sharing ones), in layer order."""
        return tuple(range(self.first_shared_layer))


# --- target config.json ---------------------------------------------------------------------------------


def _head_geometry(text: dict, layer_types: list[str], where: str) -> dict[str, tuple[int, int]]:
    """`{layer type: (head_dim, kv_heads)}` from either dialect.

    Hub: `head_dim`/`num_key_value_heads` for sliding layers, `global_head_dim` (default 512) for full layers,
    whose KV heads are `num_global_key_value_heads` only with `attention_k_eq_v`. transformers 5: the same
    full-layer values written as per-layer overrides in `per_layer_config`.
    """
    head_dim = int(text.get("head_dim") or 256)
    kv_heads = int(text.get("num_key_value_heads") or 4)
    overrides = text.get("per_layer_config")
    if overrides is None:
        global_kv = text.get("num_global_key_value_heads") if text.get("attention_k_eq_v", False) else None
        overrides = {
            i: {"head_dim": text.get("global_head_dim") or 512, **({"num_key_value_heads": global_kv} if global_kv else {})}
            for i, kind in enumerate(layer_types)
            if kind == FULL
        }
    per_layer: list[tuple[int, int]] = [(head_dim, kv_heads)] * len(layer_types)
    for key, override in dict(overrides).items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: per_layer_config key {key!r} is not a layer index") from None
        if not 0 <= i < len(layer_types) or not isinstance(override, dict):
            raise ConfigError(f"{where}: per_layer_config entry {key!r} does not name a layer of this model with a dict")
        unknown = set(override) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise ConfigError(
                f"{where}: per_layer_config[{key!r}] overrides {sorted(unknown)}; only head_dim and num_key_value_heads "
                "are supported"
            )
        per_layer[i] = (int(override.get("head_dim", head_dim)), int(override.get("num_key_value_heads", kv_heads)))
    geometry: dict[str, tuple[int, int]] = {SLIDING: (head_dim, kv_heads), FULL: (head_dim, kv_heads)}
    for kind in (SLIDING, FULL):
        shapes = {per_layer[i] for i, k in enumerate(layer_types) if k == kind}
        if len(shapes) > 1:
            raise ConfigError(f"{where}: {kind} layers have different head geometries {sorted(shapes)}; not supported")
        if shapes:
            geometry[kind] = shapes.pop()
    return geometry


def _activation(cfg: dict, where: str) -> str:
    activation = str(cfg.get("hidden_activation") or "gelu_pytorch_tanh")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{where}: hidden_activation {activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return activation


def parse(cfg: dict, where: str) -> Gemma4Config:
    """Gemma 4 (`gemma4`, `gemma4_unified` multimodal configs with a `text_config`, or their `*_text` decoders).

    Missing optional fields take transformers' defaults for the model type; `gemma4_unified` has no per-layer
    inputs and no MoE block.
    """
    model_type = cfg.get("model_type")
    if model_type in MULTIMODAL:
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{where}: a {model_type!r} config needs its text decoder settings under 'text_config'")
        flavor = model_type
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    elif model_type in TEXT:
        text = cfg
        flavor = TEXT[model_type]
        tie = cfg.get("tie_word_embeddings", True)
    else:
        raise ConfigError(f"{where}: model_type {model_type!r} is not a Gemma 4 model; supported: {', '.join(MODEL_TYPES)}")
    unified = flavor == "gemma4_unified"
    if text.get("use_bidirectional_attention") == "all":
        raise ConfigError(f"{where}: use_bidirectional_attention='all' is an encoder setting; a target must be causal")
    if text.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true is not supported for Gemma 4 (no released checkpoint uses it)")
    layers = int(require(text, "num_hidden_layers", where))
    layer_types = list(text.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(layers)])
    if len(layer_types) != layers or not set(layer_types) <= {SLIDING, FULL}:
        raise ConfigError(f"{where}: layer_types must list {layers} entries of {SLIDING!r} / {FULL!r}")
    layer_types[-1] = FULL  # transformers forces the last layer to full attention
    rp = text.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    max_pos = int(text.get("max_position_embeddings") or (262_144 if unified else 131_072))
    ropes = {}
    for kind in set(layer_types):
        if not isinstance(rp.get(kind), dict):
            raise ConfigError(f"{where}: rope_parameters needs an entry for {kind!r}")
        ropes[kind] = parse_rope(rp[kind], max_position_embeddings=max_pos)
    geometry = _head_geometry(text, layer_types, where)
    moe = bool(text.get("enable_moe_block", False)) and not unified
    ple = 0 if unified else int(text.get("hidden_size_per_layer_input", 256) or 0)
    cap = text.get("final_logit_softcapping")
    return Gemma4Config(
        model_type=flavor,
        vocab_size=int(require(text, "vocab_size", where)),
        hidden_size=int(require(text, "hidden_size", where)),
        intermediate_size=int(require(text, "intermediate_size", where)),
        num_layers=layers,
        num_heads=int(require(text, "num_attention_heads", where)),
        layer_types=tuple(layer_types),
        sliding_window=int(text.get("sliding_window") or (1024 if unified else 512)),
        head_dim=geometry[SLIDING][0],
        num_kv_heads=geometry[SLIDING][1],
        global_head_dim=geometry[FULL][0],
        num_global_kv_heads=geometry[FULL][1],
        rope_sliding=ropes.get(SLIDING, RopeConfig(theta=10_000.0)),
        rope_full=ropes[FULL],
        attention_k_eq_v=bool(text.get("attention_k_eq_v", False)),
        final_logit_softcapping=float(cap) if cap else None,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        activation=_activation(text, where),
        tie_word_embeddings=bool(tie),
        max_position_embeddings=max_pos,
        hidden_size_per_layer_input=ple,
        vocab_size_per_layer_input=int(text.get("vocab_size_per_layer_input") or 262_144) if ple else 0,
        num_kv_shared_layers=int(text.get("num_kv_shared_layers", 0) or 0),
        use_double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
        enable_moe_block=moe,
        num_experts=int(text.get("num_experts") or 0) if moe else 0,
        top_k_experts=int(text.get("top_k_experts") or 0) if moe else 0,
        moe_intermediate_size=int(text.get("moe_intermediate_size") or 0) if moe else 0,
    )


# --- DeepSpec Gemma4DSparkModel drafts -------------------------------------------------------------------


def parse_draft_backbone(cfg: dict, where: str, num_layers: int) -> Gemma4Config:
    """The layers of a `Gemma4DSparkModel` draft: `num_layers` full-attention layers with the target's *global*
    head geometry (`global_head_dim`; KV heads `num_global_key_value_heads` with `attention_k_eq_v`, else
    `num_key_value_heads`), `rope_parameters["full_attention"]`, its own LM head; no per-layer inputs, no MoE,
    no KV sharing."""
    if cfg.get("enable_moe_block"):
        raise ConfigError(f"{where}: enable_moe_block must be false for a Gemma4 DSpark draft")
    if cfg.get("hidden_size_per_layer_input"):
        raise ConfigError(f"{where}: hidden_size_per_layer_input must be 0 for a Gemma4 DSpark draft")
    if cfg.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true is not supported for a Gemma4 DSpark draft (Gemma 4 has no biases)")
    H = int(require(cfg, "hidden_size", where))
    heads = int(require(cfg, "num_attention_heads", where))
    k_eq_v = bool(cfg.get("attention_k_eq_v", False))
    head_dim = int(cfg.get("global_head_dim") or cfg.get("head_dim") or H // heads)
    kv_heads = cfg.get("num_global_key_value_heads") if k_eq_v else None
    kv_heads = int(kv_heads or cfg.get("num_key_value_heads") or heads)
    rp = cfg.get("rope_parameters") or {}
    full = rp.get(FULL) if isinstance(rp.get(FULL), dict) else None
    if full is None:
        raise ConfigError(f"{where}: a Gemma4 draft needs rope_parameters['full_attention']")
    max_pos = int(cfg.get("max_position_embeddings") or 131_072)
    cap = cfg.get("final_logit_softcapping")
    return Gemma4Config(
        model_type="gemma4",
        vocab_size=int(require(cfg, "vocab_size", where)),
        hidden_size=H,
        intermediate_size=int(require(cfg, "intermediate_size", where)),
        num_layers=num_layers,
        num_heads=heads,
        layer_types=(FULL,) * num_layers,
        sliding_window=512,  # unused: no sliding layers (fixed, so the backbone reads back equal)
        head_dim=head_dim,
        num_kv_heads=kv_heads,
        global_head_dim=head_dim,
        num_global_kv_heads=kv_heads,
        rope_full=parse_rope(full, max_position_embeddings=max_pos),
        attention_k_eq_v=k_eq_v,
        final_logit_softcapping=float(cap) if cap else None,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        activation=_activation(cfg, where),
        tie_word_embeddings=False,
        max_position_embeddings=max_pos,
    )


def draft_backbone_fields(backbone: Gemma4Config) -> dict:
    """The DeepSpec draft `config.json` fields that describe the draft's layers; `parse_draft_backbone` reads
    them back to `backbone`. Sliding-layer fields of a target config the draft copies stay untouched."""
    if backbone.num_kv_shared_layers or backbone.hidden_size_per_layer_input or backbone.enable_moe_block:
        raise ConfigError("a Gemma4 DSpark draft has no KV sharing, per-layer inputs or MoE block")
    if set(backbone.layer_types) != {FULL} or backbone.tie_word_embeddings:
        raise ConfigError("a Gemma4 DSpark draft has only full-attention layers and its own LM head")
    fields = dict(
        architectures=[DRAFT_ARCHITECTURE],
        vocab_size=backbone.vocab_size,
        hidden_size=backbone.hidden_size,
        intermediate_size=backbone.intermediate_size,
        num_hidden_layers=backbone.num_layers,
        num_attention_heads=backbone.num_heads,
        rms_norm_eps=backbone.rms_norm_eps,
        attention_bias=False,
        attention_k_eq_v=backbone.attention_k_eq_v,
        global_head_dim=backbone.global_head_dim,
        hidden_activation=backbone.activation,
        final_logit_softcapping=backbone.final_logit_softcapping,
        rope_parameters={FULL: rope_dict(backbone.rope_full)},
        max_position_embeddings=backbone.max_position_embeddings,
        enable_moe_block=False,
        hidden_size_per_layer_input=0,
    )
    fields["num_global_key_value_heads" if backbone.attention_k_eq_v else "num_key_value_heads"] = backbone.num_global_kv_heads
    return fields
