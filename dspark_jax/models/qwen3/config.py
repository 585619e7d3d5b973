"""Qwen3 / Qwen3-MoE configuration: the dataclass and its `config.json` parsing (both dialects: hub fields
`rope_theta`/`rope_scaling`, transformers-5 `rope_parameters`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from dspark_jax.config import RopeConfig, parse_rope, require, rope_dict
from dspark_jax.errors import ConfigError

MODEL_TYPES = ("qwen3", "qwen3_moe")
DENSE, SPARSE = "dense", "moe"


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Qwen3 dense (`qwen3`) and Qwen3-MoE (`qwen3_moe`) text decoders."""

    family: ClassVar[str] = "qwen3"

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig(theta=1e6)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 40960
    # Mixture of experts (qwen3_moe). `moe_layers[i]` says whether layer i is sparse.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and any(self.moe_layers)

    def layer_kind(self, layer: int) -> str:
        return SPARSE if self.moe_layers and self.moe_layers[layer] else DENSE


def parse_rope_fields(cfg: dict) -> RopeConfig:
    max_pos = cfg.get("max_position_embeddings")
    if cfg.get("rope_parameters"):
        rp = cfg["rope_parameters"]
        if "full_attention" in rp and isinstance(rp["full_attention"], dict):
            rp = rp["full_attention"]
        return parse_rope(rp, theta=cfg.get("rope_theta"), max_position_embeddings=max_pos)
    return parse_rope(cfg.get("rope_scaling"), theta=cfg.get("rope_theta", 10000.0), max_position_embeddings=max_pos)


def parse(cfg: dict, where: str) -> Qwen3Config:
    model_type = cfg.get("model_type")
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported for Qwen3 (no released checkpoint uses it)")
    H = int(require(cfg, "hidden_size", where))
    heads = int(require(cfg, "num_attention_heads", where))
    layers = int(require(cfg, "num_hidden_layers", where))
    moe = model_type == "qwen3_moe"
    # hub configs say num_experts; transformers 5 re-serialises it as num_local_experts
    num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if moe else 0
    if moe and num_experts <= 0:
        raise ConfigError(f"{where}: a qwen3_moe config needs num_experts (or num_local_experts) > 0")
    if moe:
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        only_dense = set(cfg.get("mlp_only_layers") or [])
        moe_layers = tuple(i not in only_dense and num_experts > 0 and (i + 1) % step == 0 for i in range(layers))
    else:
        moe_layers = ()
    return Qwen3Config(
        model_type=model_type,
        vocab_size=int(require(cfg, "vocab_size", where)),
        hidden_size=H,
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or H // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=parse_rope_fields(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 40960),
        num_experts=num_experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0) if moe else 0,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0) or 0) if moe else 0,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        moe_layers=moe_layers,
    )


def parse_draft_backbone(cfg: dict, where: str, num_layers: int) -> Qwen3Config:
    """The layers of a `Qwen3DSparkModel` draft: the target's geometry, `num_layers` dense layers, own head."""
    H = int(require(cfg, "hidden_size", where))
    heads = int(require(cfg, "num_attention_heads", where))
    return Qwen3Config(
        model_type="qwen3",
        vocab_size=int(require(cfg, "vocab_size", where)),
        hidden_size=H,
        intermediate_size=int(require(cfg, "intermediate_size", where)),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or H // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=parse_rope_fields(cfg),
        tie_word_embeddings=False,
        attention_bias=bool(cfg.get("attention_bias", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 40960),
    )


def draft_backbone_fields(backbone: Qwen3Config) -> dict:
    """The DeepSpec draft `config.json` fields that describe the draft's layers."""
    return dict(
        architectures=["Qwen3DSparkModel"],
        model_type="qwen3",
        vocab_size=backbone.vocab_size,
        hidden_size=backbone.hidden_size,
        intermediate_size=backbone.intermediate_size,
        num_hidden_layers=backbone.num_layers,
        num_attention_heads=backbone.num_heads,
        num_key_value_heads=backbone.num_kv_heads,
        head_dim=backbone.head_dim,
        rms_norm_eps=backbone.rms_norm_eps,
        attention_bias=backbone.attention_bias,
        hidden_act="silu",
        rope_parameters=rope_dict(backbone.rope),
    )


def hf_config_dict(cfg: Qwen3Config, *, eos_token_id=None, pad_token_id=None, dtype: str = "float32") -> dict:
    """An HF `config.json` (transformers-5 dialect) for a dense Qwen3 config."""
    if cfg.is_moe:
        raise ConfigError("writing Qwen3-MoE configs is not supported")
    if cfg.rope.rope_type != "default":
        raise ConfigError(f"writing rope_type {cfg.rope.rope_type!r} is not supported (only 'default')")
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope.theta, "rope_type": "default"},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "layer_types": ["full_attention"] * cfg.num_layers,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
    }
