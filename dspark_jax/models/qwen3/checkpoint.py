"""Qwen3 / Qwen3-MoE checkpoint rules: HF keys -> `Qwen3Model` parameters (layers stacked, see
`converters.loading`), and the HF target export."""

from __future__ import annotations

import json
from pathlib import Path

from converters.loading import LAYER, Rule, attention_rules
from dspark_jax.models.qwen3.config import Qwen3Config, hf_config_dict


def layer_rules(cfg: Qwen3Config, prefix: str) -> list[Rule]:
    """One decoder layer's keys under `prefix` (e.g. `model.layers.{i}.` for targets, `layers.{i}.` for drafts)."""
    mlp = (LAYER, "mlp")
    return [
        (prefix + "input_layernorm.weight", [((LAYER, "input_layernorm"), "copy")]),
        (prefix + "post_attention_layernorm.weight", [((LAYER, "post_attention_layernorm"), "copy")]),
        *attention_rules(prefix, bias=True),
        (prefix + "mlp.gate_proj.weight", [((*mlp, "gate_proj"), "linear")]),
        (prefix + "mlp.up_proj.weight", [((*mlp, "up_proj"), "linear")]),
        (prefix + "mlp.down_proj.weight", [((*mlp, "down_proj"), "linear")]),
        # MoE: router, per-expert tensors (hub layout) or the fused in-memory layout of transformers 5.
        (prefix + "mlp.gate.weight", [((*mlp, "router"), "linear")]),
        (prefix + "mlp.experts.{e}.gate_proj.weight", [((*mlp, "gate_proj", ("stack", "e")), "linear")]),
        (prefix + "mlp.experts.{e}.up_proj.weight", [((*mlp, "up_proj", ("stack", "e")), "linear")]),
        (prefix + "mlp.experts.{e}.down_proj.weight", [((*mlp, "down_proj", ("stack", "e")), "linear")]),
        (prefix + "mlp.experts.gate_up_proj", [((*mlp, "gate_proj"), "fused_gate"), ((*mlp, "up_proj"), "fused_up")]),
        (prefix + "mlp.experts.down_proj", [((*mlp, "down_proj"), "experts")]),
    ]


def rules(cfg: Qwen3Config) -> list[Rule]:
    table: list[Rule] = [
        ("model.embed_tokens.weight", [(("embed_tokens",), "copy")]),
        ("model.norm.weight", [(("norm",), "copy")]),
        *layer_rules(cfg, "model.layers.{i}."),
    ]
    if not cfg.tie_word_embeddings:
        table.append(("lm_head.weight", [(("lm_head",), "copy")]))
    return table


def ignore(cfg: Qwen3Config):
    """Keys that carry no information for this model: a tied head saved anyway, RoPE buffers of old exports."""

    def check(key: str) -> bool:
        return (cfg.tie_word_embeddings and key == "lm_head.weight") or key.endswith("rotary_emb.inv_freq")

    return check


def rename(cfg: Qwen3Config):
    return lambda key: key


def export_target(target, directory, *, dtype="float32", eos_token_id=None, pad_token_id=None) -> Path:
    """Write a dense Qwen3 `Target` as an HF checkpoint: `config.json`, `model.safetensors`, `generation_config.json`.

    Tokenizer files are the caller's (copy them next to it).
    """
    import jax.numpy as jnp

    from converters.safetensors_io import save_file
    from dspark_jax.models.loading import checkpoint_tensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = target.config
    save_file(checkpoint_tensors(target, rules(cfg), dtype), directory / "model.safetensors")
    eos = list(target.stop_token_ids) if eos_token_id is None else eos_token_id
    (directory / "config.json").write_text(
        json.dumps(hf_config_dict(cfg, eos_token_id=eos, pad_token_id=pad_token_id, dtype=str(jnp.dtype(dtype))), indent=2) + "\n"
    )
    gen = {"eos_token_id": eos, "pad_token_id": pad_token_id, "do_sample": True, "temperature": 0.7, "top_p": 0.8,
           "top_k": 20}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return directory
