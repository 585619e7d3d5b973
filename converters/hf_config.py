"""`config.json` parsing for both dialects: hub fields (`rope_theta`, `rope_scaling`) and transformers-5
re-serialisations (`rope_parameters`). Never uses transformers' config classes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dspark_jax.config import DraftConfig, Qwen3Config, RopeConfig
from dspark_jax.errors import ConfigError

TARGET_MODEL_TYPES = ("qwen3", "qwen3_moe")
DRAFT_ARCHITECTURES = {"Qwen3DSparkModel": "qwen3", "Gemma4DSparkModel": "gemma4"}
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path} not found: a checkpoint directory needs its config.json") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def _require(cfg: dict, key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{where}: required field {key!r} is missing")
    return cfg[key]


def parse_rope(rope_dict: dict | None, *, theta: float | None = None, max_position_embeddings: int | None = None) -> RopeConfig:
    """One RoPE entry from a `rope_parameters` dict (5.x) or a legacy `rope_scaling` dict plus `rope_theta`."""
    d = dict(rope_dict or {})
    rope_type = d.get("rope_type") or d.get("type") or "default"
    theta = d.get("rope_theta") if d.get("rope_theta") is not None else theta
    if theta is None:
        raise ConfigError("RoPE settings need rope_theta (top-level or inside rope_parameters)")

    def opt(name, cast=float):
        return cast(d[name]) if d.get(name) is not None else None

    return RopeConfig(
        theta=float(theta),
        rope_type=str(rope_type),
        partial_rotary_factor=float(d.get("partial_rotary_factor", 1.0)),
        factor=opt("factor"),
        original_max_position_embeddings=opt("original_max_position_embeddings", int),
        attention_factor=opt("attention_factor"),
        beta_fast=opt("beta_fast"),
        beta_slow=opt("beta_slow"),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        truncate=bool(d.get("truncate", True)),
        max_position_embeddings=max_position_embeddings,
    )


def _qwen3_rope(cfg: dict) -> RopeConfig:
    max_pos = cfg.get("max_position_embeddings")
    if cfg.get("rope_parameters"):
        rp = cfg["rope_parameters"]
        if "full_attention" in rp and isinstance(rp["full_attention"], dict):
            rp = rp["full_attention"]
        return parse_rope(rp, theta=cfg.get("rope_theta"), max_position_embeddings=max_pos)
    return parse_rope(cfg.get("rope_scaling"), theta=cfg.get("rope_theta", 10000.0), max_position_embeddings=max_pos)


def parse_qwen3(cfg: dict, where: str) -> Qwen3Config:
    model_type = cfg.get("model_type")
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported for Qwen3 (no released checkpoint uses it)")
    H = int(_require(cfg, "hidden_size", where))
    heads = int(_require(cfg, "num_attention_heads", where))
    layers = int(_require(cfg, "num_hidden_layers", where))
    moe = model_type == "qwen3_moe"
    num_experts = int(cfg.get("num_experts", 0) or 0) if moe else 0
    if moe:
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        only_dense = set(cfg.get("mlp_only_layers") or [])
        moe_layers = tuple(i not in only_dense and num_experts > 0 and (i + 1) % step == 0 for i in range(layers))
    else:
        moe_layers = ()
    return Qwen3Config(
        model_type=model_type,
        vocab_size=int(_require(cfg, "vocab_size", where)),
        hidden_size=H,
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or H // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_qwen3_rope(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 40960),
        num_experts=num_experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0) if moe else 0,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0) or 0) if moe else 0,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        moe_layers=moe_layers,
    )


def parse_target_config(path: Path):
    """Parse a target `config.json` into the family's config dataclass."""
    cfg = read_json(path)
    model_type = cfg.get("model_type")
    if model_type in ("qwen3", "qwen3_moe"):
        return parse_qwen3(cfg, str(path))
    raise ConfigError(
        f"{path}: model_type {model_type!r} is not supported as a target; supported: {', '.join(TARGET_MODEL_TYPES)}"
    )


def parse_draft_config(path: Path) -> DraftConfig:
    """Parse a DeepSpec draft `config.json` (DSpark or DFlash; optional fields defaulted as the reference does)."""
    cfg = read_json(path)
    where = str(path)
    archs = cfg.get("architectures") or []
    family = DRAFT_ARCHITECTURES.get(archs[0] if archs else None)
    if family is None:
        raise ConfigError(
            f"{where}: architectures {archs!r} is not a DSpark draft; supported: {', '.join(DRAFT_ARCHITECTURES)}"
        )
    markov_rank = int(cfg.get("markov_rank", 0) or 0)
    head_type = str(cfg.get("markov_head_type", "vanilla") or "vanilla").lower()
    if markov_rank > 0 and head_type not in MARKOV_HEAD_TYPES:
        raise ConfigError(f"{where}: markov_head_type {head_type!r} is not one of {MARKOV_HEAD_TYPES}")
    conf = bool(cfg.get("enable_confidence_head", False))
    target_ids = tuple(int(i) for i in _require(cfg, "target_layer_ids", where))
    n_target = int(_require(cfg, "num_target_layers", where))
    H = int(_require(cfg, "hidden_size", where))
    heads = int(_require(cfg, "num_attention_heads", where))
    common = dict(
        family=family,
        vocab_size=int(_require(cfg, "vocab_size", where)),
        hidden_size=H,
        intermediate_size=int(_require(cfg, "intermediate_size", where)),
        num_layers=int(_require(cfg, "num_hidden_layers", where)),
        num_heads=heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        block_size=int(_require(cfg, "block_size", where)),
        target_layer_ids=target_ids,
        num_target_layers=n_target,
        mask_token_id=int(_require(cfg, "mask_token_id", where)),
        markov_rank=markov_rank,
        markov_head_type=head_type,
        enable_confidence_head=conf,
        confidence_head_with_markov=bool(cfg.get("confidence_head_with_markov", False)) and conf,
        attention_bias=bool(cfg.get("attention_bias", False)),
        num_anchors=int(cfg.get("num_anchors", 512) or 512),
    )
    if family == "qwen3":
        return DraftConfig(
            **common,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or H // heads),
            rope=_qwen3_rope(cfg),
            activation=str(cfg.get("hidden_act") or "silu"),
        )
    # Gemma 4 draft: every layer is a "full_attention" layer with the global head geometry (reference §2.5).
    if cfg.get("enable_moe_block"):
        raise ConfigError(f"{where}: enable_moe_block must be false for a Gemma4 DSpark draft")
    if cfg.get("hidden_size_per_layer_input"):
        raise ConfigError(f"{where}: hidden_size_per_layer_input must be 0 for a Gemma4 DSpark draft")
    k_eq_v = bool(cfg.get("attention_k_eq_v", False))
    global_head_dim = cfg.get("global_head_dim") or cfg.get("head_dim") or H // heads
    kv_heads = cfg.get("num_global_key_value_heads") if k_eq_v else None
    kv_heads = kv_heads or cfg.get("num_key_value_heads") or heads
    rp = cfg.get("rope_parameters") or {}
    full = rp.get("full_attention") if isinstance(rp.get("full_attention"), dict) else None
    if full is None:
        raise ConfigError(f"{where}: a Gemma4 draft needs rope_parameters['full_attention']")
    return DraftConfig(
        **common,
        num_kv_heads=int(kv_heads),
        head_dim=int(global_head_dim),
        rope=parse_rope(full, max_position_embeddings=cfg.get("max_position_embeddings")),
        attention_k_eq_v=k_eq_v,
        activation=str(cfg.get("hidden_activation") or "gelu_pytorch_tanh"),
        final_logit_softcapping=float(cfg["final_logit_softcapping"]) if cfg.get("final_logit_softcapping") else None,
    )


def stop_token_ids(directory: Path) -> tuple[int, ...]:
    """Stop tokens of a checkpoint: `generation_config.json` eos ids, else config.json's, deduplicated."""
    for name in ("generation_config.json", "config.json"):
        path = Path(directory) / name
        if path.exists():
            eos = read_json(path).get("eos_token_id")
            if eos is not None:
                ids = [eos] if isinstance(eos, int) else list(eos)
                return tuple(dict.fromkeys(int(i) for i in ids))
    return ()
