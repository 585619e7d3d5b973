"""Qwen3 / Qwen3-MoE: HF checkpoint keys -> `dspark_jax.models.qwen3.Qwen3Model` parameters."""

from __future__ import annotations

from converters.loading import Rule, attention_rules
from dspark_jax.config import Qwen3Config

LAYER = "model.layers.{i}."


def rules(cfg: Qwen3Config) -> list[Rule]:
    at = ("layers", "{i}", "self_attn")
    mlp = ("layers", "{i}", "mlp")
    table: list[Rule] = [
        ("model.embed_tokens.weight", [(("embed_tokens",), "copy")]),
        ("model.norm.weight", [(("norm",), "copy")]),
        (LAYER + "input_layernorm.weight", [(("layers", "{i}", "input_layernorm"), "copy")]),
        (LAYER + "post_attention_layernorm.weight", [(("layers", "{i}", "post_attention_layernorm"), "copy")]),
        *attention_rules(LAYER, at, bias=True),
        (LAYER + "mlp.gate_proj.weight", [((*mlp, "gate_proj"), "linear")]),
        (LAYER + "mlp.up_proj.weight", [((*mlp, "up_proj"), "linear")]),
        (LAYER + "mlp.down_proj.weight", [((*mlp, "down_proj"), "linear")]),
        # MoE: router, per-expert tensors (hub layout) or the fused in-memory layout of transformers 5.
        (LAYER + "mlp.gate.weight", [((*mlp, "router"), "linear")]),
        (LAYER + "mlp.experts.{e}.gate_proj.weight", [((*mlp, "gate_proj", ("stack", "e")), "linear")]),
        (LAYER + "mlp.experts.{e}.up_proj.weight", [((*mlp, "up_proj", ("stack", "e")), "linear")]),
        (LAYER + "mlp.experts.{e}.down_proj.weight", [((*mlp, "down_proj", ("stack", "e")), "linear")]),
        (LAYER + "mlp.experts.gate_up_proj", [((*mlp, "gate_proj"), "fused_gate"), ((*mlp, "up_proj"), "fused_up")]),
        (LAYER + "mlp.experts.down_proj", [((*mlp, "down_proj"), "experts")]),
    ]
    if not cfg.tie_word_embeddings:
        table.append(("lm_head.weight", [(("lm_head",), "copy")]))
    return table


def ignore(cfg: Qwen3Config):
    """Keys that carry no information for this model: a tied head saved anyway, RoPE buffers of old exports."""

    def check(key: str) -> bool:
        return (cfg.tie_word_embeddings and key == "lm_head.weight") or key.endswith("rotary_emb.inv_freq")

    return check
