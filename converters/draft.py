"""DeepSpec draft checkpoints (`Qwen3DSparkModel` / `Gemma4DSparkModel`, DSpark and DFlash) <-> parameters.

Keys have no `model.` prefix (reference §1.3). `rules` reads them; `export_draft` writes the same layout
back (PyTorch `[out, in]` Linear weights) so a draft trained here loads in the reference.
"""

from __future__ import annotations

from converters.loading import Rule, attention_rules
from dspark_jax.config import DraftConfig

LAYER = "layers.{i}."


def strip_prefix(key: str) -> str:
    """`torch.compile` checkpoints prefix keys with `_orig_mod.`; the reference strips it, so do we."""
    return key.removeprefix("_orig_mod.")


def rules(cfg: DraftConfig) -> list[Rule]:
    at = ("layers", "{i}", "self_attn")
    ly = ("layers", "{i}")
    table: list[Rule] = [
        ("embed_tokens.weight", [(("embed_tokens",), "copy")]),
        ("lm_head.weight", [(("lm_head",), "copy")]),
        ("fc.weight", [(("fc",), "linear")]),
        ("hidden_norm.weight", [(("hidden_norm",), "copy")]),
        ("norm.weight", [(("norm",), "copy")]),
        (LAYER + "input_layernorm.weight", [((*ly, "input_layernorm"), "copy")]),
        (LAYER + "post_attention_layernorm.weight", [((*ly, "post_attention_layernorm"), "copy")]),
        (LAYER + "mlp.gate_proj.weight", [((*ly, "gate_proj"), "linear")]),
        (LAYER + "mlp.up_proj.weight", [((*ly, "up_proj"), "linear")]),
        (LAYER + "mlp.down_proj.weight", [((*ly, "down_proj"), "linear")]),
        *attention_rules(LAYER, at, bias=True),
        (LAYER + "pre_feedforward_layernorm.weight", [((*ly, "pre_feedforward_layernorm"), "copy")]),
        (LAYER + "post_feedforward_layernorm.weight", [((*ly, "post_feedforward_layernorm"), "copy")]),
        (LAYER + "layer_scalar", [((*ly, "layer_scalar"), "copy")]),
        ("markov_head.markov_w1.weight", [(("markov_head", "markov_w1"), "copy")]),
        ("markov_head.markov_w2.weight", [(("markov_head", "markov_w2"), "copy")]),
        ("markov_head.gate_proj.weight", [(("markov_head", "gate_proj"), "linear")]),
        ("markov_head.gate_proj.bias", [(("markov_head", "gate_bias"), "copy")]),
        ("markov_head.joint_proj.weight", [(("markov_head", "joint_proj"), "linear")]),
        ("markov_head.joint_proj.bias", [(("markov_head", "joint_bias"), "copy")]),
        ("confidence_head.proj.weight", [(("confidence_head", "proj"), "linear")]),
        ("confidence_head.proj.bias", [(("confidence_head", "bias"), "copy")]),
    ]
    return table


def _rope_dict(rope) -> dict:
    """A `rope_parameters` entry that `hf_config.parse_rope` reads back to the same `RopeConfig`."""
    d = {"rope_theta": rope.theta, "rope_type": rope.rope_type}
    if rope.partial_rotary_factor != 1.0:
        d["partial_rotary_factor"] = rope.partial_rotary_factor
    for name in ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
                 "mscale_all_dim"):
        if getattr(rope, name) is not None:
            d[name] = getattr(rope, name)
    if not rope.truncate:
        d["truncate"] = False
    return d


def config_dict(cfg: DraftConfig, base: dict | None = None, dtype: str = "bfloat16") -> dict:
    """The DeepSpec draft `config.json`: the target's config (`base`, if given) with the draft fields set.

    Optional fields follow the reference: `markov_head_type` only with a Markov head,
    `confidence_head_with_markov` only with a confidence head; `tie_word_embeddings` is always false.
    """
    import copy

    out = copy.deepcopy(base) if base else {}
    for key in ("markov_head_type", "confidence_head_with_markov", "auto_map", "text_config"):
        out.pop(key, None)
    out.update(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        attention_bias=cfg.attention_bias,
        num_target_layers=cfg.num_target_layers,
        block_size=cfg.block_size,
        target_layer_ids=list(cfg.target_layer_ids),
        mask_token_id=cfg.mask_token_id,
        num_anchors=cfg.num_anchors,
        enable_confidence_head=cfg.enable_confidence_head,
        markov_rank=cfg.markov_rank,
        tie_word_embeddings=False,
        layer_types=["full_attention"] * cfg.num_layers,
        dtype=dtype,
    )
    if cfg.enable_confidence_head:
        out["confidence_head_with_markov"] = cfg.confidence_head_with_markov
    if cfg.markov_rank > 0:
        out["markov_head_type"] = cfg.markov_head_type
    if cfg.family == "qwen3":
        out.update(
            architectures=["Qwen3DSparkModel"],
            model_type=out.get("model_type", "qwen3"),
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            hidden_act=cfg.activation,
            rope_parameters=_rope_dict(cfg.rope),
        )
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
    else:
        rope = dict(out.get("rope_parameters") or {})
        rope["full_attention"] = _rope_dict(cfg.rope)
        out.update(
            architectures=["Gemma4DSparkModel"],
            attention_k_eq_v=cfg.attention_k_eq_v,
            global_head_dim=cfg.head_dim,
            hidden_activation=cfg.activation,
            final_logit_softcapping=cfg.final_logit_softcapping,
            rope_parameters=rope,
            enable_moe_block=False,
            hidden_size_per_layer_input=0,
        )
        out["num_global_key_value_heads" if cfg.attention_k_eq_v else "num_key_value_heads"] = cfg.num_kv_heads
    return out


def export_draft(draft, directory, *, dtype="bfloat16", base_config: dict | None = None):
    """Write a `Draft` in the DeepSpec layout: `config.json` + `model.safetensors` (`[out, in]` Linear weights).

    `dtype` is the stored dtype (the reference stores bf16); `dj.load_draft` reads the files back bit-exactly
    at that dtype. `base_config` is the target's `config.json` dict, which the reference copies into the
    draft's config (optional: without it only the fields the draft needs are written).
    """
    import json
    from pathlib import Path

    import jax.numpy as jnp

    from converters.export import export_tensors
    from converters.safetensors_io import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = export_tensors(draft.params, rules(draft.config), dtype)
    save_file(tensors, directory / "model.safetensors")
    cfg = config_dict(draft.config, base_config, str(jnp.dtype(dtype)))
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return directory
