"""Gemma 4 / Gemma 4 unified: HF checkpoint keys -> `dspark_jax.models.gemma4.Gemma4Model` parameters.

Released checkpoints are multimodal: the text decoder sits under `model.language_model.` next to vision and
audio towers (skipped). Text-only exports (`Gemma4ForCausalLM`) use `model.`. `rename` maps both onto
`model.` and refuses any other layout by name, so a checkpoint with a wrong prefix fails loudly instead of
leaving parameters random. Experts are stored fused (`experts.gate_up_proj [E, 2I, D]`, gate half first;
`experts.down_proj [E, D, I]`); `layer_scalar` is a `[1]` tensor. KV-sharing layers have no K/V weights;
hub checkpoints that still carry them are read past, as transformers does.
"""

from __future__ import annotations

import re

from converters.loading import Rule, attention_rules
from dspark_jax.config import Gemma4Config
from dspark_jax.errors import CheckpointError

TEXT_PREFIXES = ("model.language_model.", "model.")
NON_TEXT_PREFIXES = (
    "model.vision_tower.",
    "model.vision_embedder.",  # gemma4_unified hub name of `embed_vision` patch layers
    "model.embed_vision.",
    "model.audio_tower.",
    "model.embed_audio.",
)
LAYER = "model.layers.{i}."
SHARED_KV_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight")


def rules(cfg: Gemma4Config) -> list[Rule]:
    layer = ("layers", "{i}")
    at = (*layer, "self_attn")
    table: list[Rule] = [
        ("model.embed_tokens.weight", [(("embed_tokens",), "copy")]),
        ("model.norm.weight", [(("norm",), "copy")]),
        (LAYER + "layer_scalar", [((*layer, "layer_scalar"), "copy")]),
        *attention_rules(LAYER, at, bias=False),
        (LAYER + "mlp.gate_proj.weight", [((*layer, "mlp", "gate_proj"), "linear")]),
        (LAYER + "mlp.up_proj.weight", [((*layer, "mlp", "up_proj"), "linear")]),
        (LAYER + "mlp.down_proj.weight", [((*layer, "mlp", "down_proj"), "linear")]),
    ]
    norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    if cfg.enable_moe_block:
        norms += ["pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"]
        table += [
            (LAYER + "router.proj.weight", [((*layer, "router", "proj"), "linear")]),
            (LAYER + "router.scale", [((*layer, "router", "scale"), "copy")]),
            (LAYER + "router.per_expert_scale", [((*layer, "router", "per_expert_scale"), "copy")]),
            (
                LAYER + "experts.gate_up_proj",
                [((*layer, "experts", "gate_proj"), "fused_gate"), ((*layer, "experts", "up_proj"), "fused_up")],
            ),
            (LAYER + "experts.down_proj", [((*layer, "experts", "down_proj"), "experts")]),
        ]
    if cfg.hidden_size_per_layer_input:
        norms.append("post_per_layer_input_norm")
        table += [
            ("model.embed_tokens_per_layer.weight", [(("embed_tokens_per_layer",), "copy")]),
            ("model.per_layer_model_projection.weight", [(("per_layer_model_projection",), "linear")]),
            ("model.per_layer_projection_norm.weight", [(("per_layer_projection_norm",), "copy")]),
            (LAYER + "per_layer_input_gate.weight", [((*layer, "per_layer_input_gate"), "linear")]),
            (LAYER + "per_layer_projection.weight", [((*layer, "per_layer_projection"), "linear")]),
        ]
    table += [(LAYER + f"{name}.weight", [((*layer, name), "copy")]) for name in norms]
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
    sharing = {i for i in range(cfg.num_layers) if cfg.kv_source(i) != i}

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
