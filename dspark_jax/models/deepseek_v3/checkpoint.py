"""DeepSeek-V3 checkpoint rules: HF / hub keys -> `DeepseekV3Model` parameters (layers stacked, see
`converters.loading`).

The hub layout is the transformers layout: `model.layers.{i}.self_attn.{q_a_proj, q_a_layernorm, q_b_proj |
q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}`, dense `mlp.{gate,up,down}_proj`, MoE
`mlp.gate.weight`, `mlp.gate.e_score_correction_bias`, per-expert `mlp.experts.{e}.*` (or the fused in-memory
layout of transformers 5) and `mlp.shared_experts.*`. FP8 checkpoints (`weight_scale_inv` next to each e4m3
weight) are dequantised before these rules see a tensor (`converters.fp8`). The MTP modules stored after the
last layer (`model.layers.{L..}`) belong to `proposers.mtp`; a target load skips them, as transformers does.
"""

from __future__ import annotations

import re

from converters.loading import LAYER, Rule
from dspark_jax.models.deepseek_v3.config import DeepseekV3Config

LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def attention_rules(cfg: DeepseekV3Config, prefix: str) -> list[Rule]:
    at = (LAYER, "self_attn")
    table: list[Rule] = [
        (prefix + "self_attn.kv_a_proj_with_mqa.weight", [((*at, "kv_a_proj_with_mqa"), "linear")]),
        (prefix + "self_attn.kv_a_layernorm.weight", [((*at, "kv_a_layernorm"), "copy")]),
        (prefix + "self_attn.kv_b_proj.weight", [((*at, "kv_b_proj"), "linear")]),
        (prefix + "self_attn.o_proj.weight", [((*at, "o_proj"), "linear_in")]),
    ]
    if cfg.q_lora_rank:
        table += [
            (prefix + "self_attn.q_a_proj.weight", [((*at, "q_a_proj"), "linear")]),
            (prefix + "self_attn.q_a_layernorm.weight", [((*at, "q_a_layernorm"), "copy")]),
            (prefix + "self_attn.q_b_proj.weight", [((*at, "q_b_proj"), "linear")]),
        ]
    else:
        table.append((prefix + "self_attn.q_proj.weight", [((*at, "q_proj"), "linear")]))
    return table


def layer_rules(cfg: DeepseekV3Config, prefix: str) -> list[Rule]:
    """One decoder layer's keys under `prefix` (`model.layers.{i}.`), dense or MoE (the layer decides which
    parameters exist; a key for a parameter the layer lacks is refused by the loader)."""
    mlp = (LAYER, "mlp")
    shared = (*mlp, "shared_experts")
    return [
        (prefix + "input_layernorm.weight", [((LAYER, "input_layernorm"), "copy")]),
        (prefix + "post_attention_layernorm.weight", [((LAYER, "post_attention_layernorm"), "copy")]),
        *attention_rules(cfg, prefix),
        (prefix + "mlp.gate_proj.weight", [((*mlp, "gate_proj"), "linear")]),
        (prefix + "mlp.up_proj.weight", [((*mlp, "up_proj"), "linear")]),
        (prefix + "mlp.down_proj.weight", [((*mlp, "down_proj"), "linear")]),
        (prefix + "mlp.gate.weight", [((*mlp, "router"), "linear")]),
        (prefix + "mlp.gate.e_score_correction_bias", [((*mlp, "e_score_correction_bias"), "copy")]),
        (prefix + "mlp.experts.{e}.gate_proj.weight", [((*mlp, "gate_proj", ("stack", "e")), "linear")]),
        (prefix + "mlp.experts.{e}.up_proj.weight", [((*mlp, "up_proj", ("stack", "e")), "linear")]),
        (prefix + "mlp.experts.{e}.down_proj.weight", [((*mlp, "down_proj", ("stack", "e")), "linear")]),
        (prefix + "mlp.experts.gate_up_proj", [((*mlp, "gate_proj"), "fused_gate"), ((*mlp, "up_proj"), "fused_up")]),
        (prefix + "mlp.experts.down_proj", [((*mlp, "down_proj"), "experts")]),
        (prefix + "mlp.shared_experts.gate_proj.weight", [((*shared, "gate_proj"), "linear")]),
        (prefix + "mlp.shared_experts.up_proj.weight", [((*shared, "up_proj"), "linear")]),
        (prefix + "mlp.shared_experts.down_proj.weight", [((*shared, "down_proj"), "linear")]),
    ]


def rules(cfg: DeepseekV3Config) -> list[Rule]:
    table: list[Rule] = [
        ("model.embed_tokens.weight", [(("embed_tokens",), "copy")]),
        ("model.norm.weight", [(("norm",), "copy")]),
        *layer_rules(cfg, "model.layers.{i}."),
    ]
    if not cfg.tie_word_embeddings:
        table.append(("lm_head.weight", [(("lm_head",), "copy")]))
    return table


def is_mtp_key(cfg: DeepseekV3Config, key: str) -> bool:
    """Whether `key` belongs to one of the MTP modules stored after the main layers."""
    m = LAYER_KEY.match(key)
    return m is not None and cfg.num_layers <= int(m.group(1)) < cfg.num_layers + cfg.num_mtp_layers


def ignore(cfg: DeepseekV3Config):
    """MTP modules (read by `proposers.mtp`), a tied head saved anyway, RoPE buffers of old exports."""

    def check(key: str) -> bool:
        return (
            is_mtp_key(cfg, key)
            or (cfg.tie_word_embeddings and key == "lm_head.weight")
            or key.endswith("rotary_emb.inv_freq")
        )

    return check


def rename(cfg: DeepseekV3Config):
    return lambda key: key
