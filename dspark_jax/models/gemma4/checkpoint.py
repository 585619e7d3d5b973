"""Gemma 4 / Gemma 4 unified checkpoint rules: HF keys -> `Gemma4Model` parameters (layers stacked, see
`converters.loading`).

Released checkpoints are multimodal: the text decoder sits under `model.language_model.` next to vision and
audio towers (skipped). Text-only exports (`Gemma4ForCausalLM`) use `model.`. `rename` maps both onto
`model.` and refuses any other layout by name, so a checkpoint with a wrong prefix fails loudly instead of
leaving parameters random. Experts are stored fused (`experts.gate_up_proj [E, 2I, D]`, gate half first;
`experts.down_proj [E, D, I]`); `layer_scalar` is a `[1]` tensor. KV-sharing layers have no K/V weights;
hub checkpoints that still carry them are read past, as transformers does.

`layer_rules` also serves DeepSpec `Gemma4DSparkModel` drafts (keys `layers.{i}.`): attention without
`v_proj` when K=V, the four sandwich norms, `layer_scalar` and the MLP.
"""

from __future__ import annotations

import re

from converters.loading import LAYER, Rule, attention_rules
from dspark_jax.errors import CheckpointError
from dspark_jax.models.gemma4.config import Gemma4Config
from dspark_jax.models.gemma4.model import MOE_NORMS, NORMS

TEXT_PREFIXES = ("model.language_model.", "model.")
NON_TEXT_PREFIXES = (
    "model.vision_tower.",
    "model.vision_embedder.",  # gemma4_unified hub name of `embed_vision` patch layers
    "model.embed_vision.",
    "model.audio_tower.",
    "model.embed_audio.",
)
SHARED_KV_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight")


def layer_rules(cfg: Gemma4Config, prefix: str) -> list[Rule]:
    """One decoder layer's keys under `prefix` (`model.layers.{i}.` for targets, `layers.{i}.` for drafts).

    A layer without a parameter a rule names (`v_proj` of a K=V full layer, K/V of a KV-sharing layer) has
    no such key in a valid checkpoint; the loader refuses one that has it.
    """
    mlp = (LAYER, "mlp")
    table: list[Rule] = [
        (prefix + "layer_scalar", [((LAYER, "layer_scalar"), "copy")]),
        *attention_rules(prefix, bias=False),
        (prefix + "mlp.gate_proj.weight", [((*mlp, "gate_proj"), "linear")]),
        (prefix + "mlp.up_proj.weight", [((*mlp, "up_proj"), "linear")]),
        (prefix + "mlp.down_proj.weight", [((*mlp, "down_proj"), "linear")]),
    ]
    norms = list(NORMS)
    if cfg.enable_moe_block:
        norms += MOE_NORMS
        table += [
            (prefix + "router.proj.weight", [((LAYER, "router", "proj"), "linear")]),
            (prefix + "router.scale", [((LAYER, "router", "scale"), "copy")]),
            (prefix + "router.per_expert_scale", [((LAYER, "router", "per_expert_scale"), "copy")]),
            (
                prefix + "experts.gate_up_proj",
                [((LAYER, "experts", "gate_proj"), "fused_gate"), ((LAYER, "experts", "up_proj"), "fused_up")],
            ),
            (prefix + "experts.down_proj", [((LAYER, "experts", "down_proj"), "experts")]),
        ]
    if cfg.hidden_size_per_layer_input:
        norms.append("post_per_layer_input_norm")
        table += [
            (prefix + "per_layer_input_gate.weight", [((LAYER, "per_layer_input_gate"), "linear")]),
            (prefix + "per_layer_projection.weight", [((LAYER, "per_layer_projection"), "linear")]),
        ]
    table += [(prefix + f"{name}.weight", [((LAYER, name), "copy")]) for name in norms]
    return table


def rules(cfg: Gemma4Config) -> list[Rule]:
    """A target's keys, after `rename` (so always under `model.`)."""
    table: list[Rule] = [
        ("model.embed_tokens.weight", [(("embed_tokens",), "copy")]),
        ("model.norm.weight", [(("norm",), "copy")]),
        *layer_rules(cfg, "model.layers.{i}."),
    ]
    if cfg.hidden_size_per_layer_input:
        table += [
            ("model.embed_tokens_per_layer.weight", [(("embed_tokens_per_layer",), "copy")]),
            ("model.per_layer_model_projection.weight", [(("per_layer_model_projection",), "linear")]),
            ("model.per_layer_projection_norm.weight", [(("per_layer_projection_norm",), "copy")]),
        ]
    if not cfg.tie_word_embeddings:
        table.append(("lm_head.weight", [(("lm_head",), "copy")]))
    return table


def _text_key(key: str) -> str | None:
    """`model.language_model.X` / `model.X` -> `model.X`; `lm_head.weight` as is; anything else None."""
    if key == "lm_head.weight":
        return key
    for prefix in TEXT_PREFIXES:
        if key.startswith(prefix):
            return "model." + key[len(prefix) :]
    return None


def rename(cfg: Gemma4Config):
    def check(key: str) -> str:
        text_key = _text_key(key)
        if text_key is None:
            raise CheckpointError(
                f"tensor {key!r} is not a Gemma 4 text-decoder weight: expected keys under 'model.language_model.' "
                "(multimodal checkpoints) or 'model.' (text-only exports); this checkpoint's layout is not supported"
            )
        return text_key

    return check


def ignore(cfg: Gemma4Config):
    """Vision/audio towers, a tied head saved anyway, and K/V weights of KV-sharing layers (unused by HF too)."""
    sharing = set(range(cfg.first_shared_layer, cfg.num_layers))

    def check(key: str) -> bool:
        if key.startswith(NON_TEXT_PREFIXES):
            return True
        text_key = _text_key(key)
        if text_key is None:
            return False
        if cfg.tie_word_embeddings and text_key == "lm_head.weight":
            return True
        match = SHARED_KV_KEY.fullmatch(text_key)
        return match is not None and int(match.group(1)) in sharing

    return check
