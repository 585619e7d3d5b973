"""DeepSeek-V3 configuration: the dataclass and its `config.json` parsing (hub dialect `rope_theta` /
`rope_scaling` and the transformers-5 `rope_parameters`).

Only the variant transformers' `deepseek_v3` computes is accepted: sigmoid scores with the bias-corrected,
group-limited top-k (`scoring_func="sigmoid"`, `topk_method="noaux_tc"`), an MoE MLP in every layer from
`first_k_dense_replace` on. Other DeepSeek-V2-era settings (softmax scoring, greedy routing, a sparse MoE
stride) are refused by name instead of being computed differently from the checkpoint's training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from dspark_jax.config import RopeConfig, parse_rope, require
from dspark_jax.errors import ConfigError

MODEL_TYPES = ("deepseek_v3",)
DENSE, SPARSE = "dense", "moe"


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config:
    """DeepSeek-V3 / R1 text decoders: multi-head latent attention (MLA) and a sigmoid-routed MoE.

    `q_lora_rank` 0 means queries come from one projection (`q_proj`); otherwise from the low-rank pair
    `q_a_proj` -> `q_a_layernorm` -> `q_b_proj`. Keys and values are rebuilt from a per-token latent of
    `kv_lora_rank` numbers plus a shared `qk_rope_head_dim` rotary key, which is all the cache holds.
    `num_mtp_layers` (`num_nextn_predict_layers`) MTP modules follow the main layers in the checkpoint.
    """

    family: ClassVar[str] = "deepseek_v3"

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig(theta=10000.0)
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    num_mtp_layers: int = 0

    def __post_init__(self):
        if self.n_routed_experts:
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
            if self.n_routed_experts // self.n_group < 2:
                raise ConfigError("group-limited routing scores a group by its two best experts: need >= 2 experts per group")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
            if not 1 <= self.num_experts_per_tok <= self.topk_group * self.n_routed_experts // self.n_group:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and the experts of the "
                    f"{self.topk_group} kept groups"
                )
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary pairs)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Numbers the cache holds per token and layer: the KV latent and the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_layers

    def layer_kind(self, layer: int) -> str:
        return SPARSE if self.n_routed_experts > 0 and layer >= self.first_k_dense_replace else DENSE

    @property
    def softmax_scale(self) -> float:
        """`qk_head_dim^-0.5`, times the YaRN mscale squared (`mscale_all_dim`) when the RoPE is scaled."""
        scale = self.qk_head_dim**-0.5
        rope = self.rope
        if rope.rope_type != "default" and rope.mscale_all_dim:
            factor = rope.factor or 1.0
            m = 1.0 if factor <= 1 else 0.1 * rope.mscale_all_dim * math.log(factor) + 1.0
            scale *= m * m
        return scale


def parse_rope_fields(cfg: dict) -> RopeConfig:
    max_pos = cfg.get("max_position_embeddings")
    if cfg.get("rope_parameters"):
        return parse_rope(cfg["rope_parameters"], theta=cfg.get("rope_theta"), max_position_embeddings=max_pos)
    return parse_rope(cfg.get("rope_scaling"), theta=cfg.get("rope_theta", 10000.0), max_position_embeddings=max_pos)


def _refuse(cfg: dict, where: str, key: str, allowed: tuple, meaning: str) -> None:
    value = cfg.get(key)
    if value is not None and value not in allowed:
        raise ConfigError(f"{where}: {key}={value!r} is not supported for deepseek_v3 ({meaning}; supported: {list(allowed)})")


def parse(cfg: dict, where: str) -> DeepseekV3Config:
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{where}: model_type {model_type!r} is not a DeepSeek-V3 config")
    _refuse(cfg, where, "scoring_func", ("sigmoid",), "expert scores are sigmoids")
    _refuse(cfg, where, "topk_method", ("noaux_tc",), "bias-corrected group-limited top-k")
    _refuse(cfg, where, "moe_layer_freq", (1,), "every layer from first_k_dense_replace on is MoE")
    _refuse(cfg, where, "hidden_act", ("silu",), "SwiGLU MLPs")
    if cfg.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true is not supported for deepseek_v3 (no released checkpoint uses it)")
    heads = int(require(cfg, "num_attention_heads", where))
    kv_heads = cfg.get("num_key_value_heads")
    if kv_heads is not None and int(kv_heads) < heads:
        raise ConfigError(f"{where}: num_key_value_heads={kv_heads} < num_attention_heads={heads}: MLA has one key per head")
    layers = int(require(cfg, "num_hidden_layers", where))
    experts = int(cfg.get("n_routed_experts") or 0)
    return DeepseekV3Config(
        model_type=model_type,
        vocab_size=int(require(cfg, "vocab_size", where)),
        hidden_size=int(require(cfg, "hidden_size", where)),
        intermediate_size=int(require(cfg, "intermediate_size", where)),
        num_layers=layers,
        num_heads=heads,
        kv_lora_rank=int(require(cfg, "kv_lora_rank", where)),
        qk_nope_head_dim=int(require(cfg, "qk_nope_head_dim", where)),
        qk_rope_head_dim=int(require(cfg, "qk_rope_head_dim", where)),
        v_head_dim=int(require(cfg, "v_head_dim", where)),
        q_lora_rank=int(cfg.get("q_lora_rank") or 0),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0) if experts else 0,
        n_routed_experts=experts,
        n_shared_experts=int(cfg.get("n_shared_experts") or 0) if experts else 0,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
        n_group=int(cfg.get("n_group") or 1) if experts else 1,
        topk_group=int(cfg.get("topk_group") or 1) if experts else 1,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        first_k_dense_replace=int(cfg.get("first_k_dense_replace") or 0),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=parse_rope_fields(cfg),
        rope_interleave=bool(cfg.get("rope_interleave", True)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        num_mtp_layers=int(cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 0)) or 0),
    )


def parse_draft_backbone(cfg: dict, where: str, num_layers: int):
    del cfg, num_layers
    raise ConfigError(f"{where}: there are no DSpark/DFlash drafts with a DeepSeek-V3 backbone; use its MTP module")


def draft_backbone_fields(backbone) -> dict:
    raise ConfigError("DeepSeek-V3 has no DSpark/DFlash draft layout")
