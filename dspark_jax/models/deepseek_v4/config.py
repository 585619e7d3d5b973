"""DeepSeek-V4 configuration: the dataclass and its `config.json` parsing in both dialects (docs/deepseek.md §5).

* Hub dialect (DeepSeek's own `config.json`): `compress_ratios` (one entry per layer, 0 = sliding only,
  4 = CSA, another value = HCA; the list may run past `num_hidden_layers` into the MTP/draft layers),
  `num_hash_layers`, `qk_rope_head_dim`, `rope_theta` for sliding-only layers, and `compress_rope_theta` with
  the YaRN `rope_scaling` for layers that compress.
* transformers-5 dialect: `layer_types` / `compress_rates` / `mlp_layer_types`, `partial_rotary_factor`,
  `rope_parameters = {"main": ..., "compress": ...}`.

Both give the same `DeepseekV4Config`. The compress RoPE's YaRN never scales cos/sin (`attention_factor`
1 unless the config says otherwise). Settings transformers' `deepseek_v4` does not compute (another scoring
function, several KV heads, several shared experts) are refused by name.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from dspark_jax.config import RopeConfig, parse_rope, require
from dspark_jax.errors import ConfigError

MODEL_TYPES = ("deepseek_v4",)
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
HASH, ROUTED = "hash_moe", "moe"
ATTENTION_TYPES = (SLIDING, CSA, HCA)
MLP_TYPES = (HASH, ROUTED)
HUB_CSA_RATIO = 4  # the hub dialect marks CSA layers by this ratio (overlapping windows plus the indexer)


@dataclasses.dataclass(frozen=True)
class DeepseekV4Config:
    """DeepSeek-V4 text decoders: mHC residual streams, shared-KV MQA with sinks over a sliding window plus
    compressed entries (CSA with the lightning indexer, or HCA), a grouped output projection and an MoE in
    every layer (hash-routed in the `hash_moe` layers). `rope_main` serves sliding-only layers, `rope_compress`
    the CSA/HCA layers with their compressors and indexers; both rotate the last `rope_head_dim` dims of a head."""

    family: ClassVar[str] = "deepseek_v4"

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    layer_types: tuple[str, ...]
    mlp_layer_types: tuple[str, ...]
    csa_ratio: int = 4
    hca_ratio: int = 128
    rope_head_dim: int = 64
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    rms_norm_eps: float = 1e-6
    rope_main: RopeConfig = RopeConfig(theta=10000.0)
    rope_compress: RopeConfig = RopeConfig(theta=160000.0)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 1048576
    num_mtp_layers: int = 0
    expert_dtype: str | None = None  # "fp4": routed experts stored as e2m1 pairs with 1x32 scales

    def __post_init__(self):
        L = self.num_layers
        if len(self.layer_types) != L or len(self.mlp_layer_types) != L:
            raise ConfigError(f"layer_types ({len(self.layer_types)}) and mlp_layer_types ({len(self.mlp_layer_types)}) "
                              f"must both have num_hidden_layers={L} entries")
        for name, types, allowed in (("layer_types", self.layer_types, ATTENTION_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, MLP_TYPES)):
            bad = sorted({t for t in types if t not in allowed})
            if bad:
                raise ConfigError(f"{name} entries {bad} are not DeepSeek-V4 layer types; use one of {list(allowed)}")
        if self.rope_head_dim % 2 or not 0 < self.rope_head_dim <= min(self.head_dim, self.index_head_dim):
            raise ConfigError(f"qk_rope_head_dim={self.rope_head_dim} must be even and at most head_dim={self.head_dim} "
                              f"and index_head_dim={self.index_head_dim}")
        if self.num_heads % self.o_groups:
            raise ConfigError(f"o_groups={self.o_groups} must divide num_attention_heads={self.num_heads}")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                              f"n_routed_experts={self.n_routed_experts}")
        for name in ("csa_ratio", "hca_ratio", "sliding_window", "hc_mult", "hc_sinkhorn_iters", "index_topk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")

    def ratio(self, layer: int) -> int:
        """Compression ratio of layer `layer` (0 for sliding-only layers)."""
        return {SLIDING: 0, CSA: self.csa_ratio, HCA: self.hca_ratio}[self.layer_types[layer]]

    def rope(self, attention_type: str) -> RopeConfig:
        return self.rope_main if attention_type == SLIDING else self.rope_compress


def _refuse(cfg: dict, where: str, key: str, allowed: tuple, meaning: str) -> None:
    value = cfg.get(key)
    if value is not None and value not in allowed:
        raise ConfigError(f"{where}: {key}={value!r} is not supported for deepseek_v4 ({meaning}; supported: {list(allowed)})")


def _types_from_ratios(ratios: list, num_layers: int, where: str) -> tuple[tuple[str, ...], int, int]:
    """Hub `compress_ratios` -> (layer types, CSA ratio, HCA ratio); entries past the main layers are ignored."""
    if len(ratios) < num_layers:
        raise ConfigError(f"{where}: compress_ratios has {len(ratios)} entries for num_hidden_layers={num_layers}")
    ratios = [int(r) for r in ratios[:num_layers]]
    hca = sorted({r for r in ratios if r not in (0, HUB_CSA_RATIO)})
    if any(r < 0 for r in hca) or len(hca) > 1:
        raise ConfigError(f"{where}: compress_ratios {sorted(set(ratios))} must hold 0 (sliding), {HUB_CSA_RATIO} (CSA) "
                          "and at most one other positive ratio (HCA)")
    types = tuple(SLIDING if r == 0 else CSA if r == HUB_CSA_RATIO else HCA for r in ratios)
    return types, HUB_CSA_RATIO, hca[0] if hca else 128


def _default_layer_types(n: int) -> tuple[str, ...]:
    """transformers' default when a config names no schedule: two HCA layers, then HCA/CSA alternating."""
    return tuple([HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))])


def _ropes(cfg: dict, rope_dim: int, head_dim: int, max_pos, where: str) -> tuple[RopeConfig, RopeConfig]:
    """(main, compress) RoPE. Each rotates `rope_dim` dims, so `partial_rotary_factor` is folded into the
    dimension the frequencies are computed for (`inverse_frequencies(rope, rope_dim)`)."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        main_d, comp_d = dict(params["main"]), dict(params["compress"])
    else:
        flat = {k: v for k, v in (params or cfg.get("rope_scaling") or {}).items() if k not in ("main", "compress")}
        main_d = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
        comp_d = {**flat, "rope_theta": cfg.get("compress_rope_theta", 160000.0)}
        if (comp_d.get("rope_type") or comp_d.get("type")) == "yarn":
            comp_d.setdefault("attention_factor", 1.0)
    out = []
    for name, d in (("main", main_d), ("compress", comp_d)):
        factor = d.pop("partial_rotary_factor", None)
        if factor is not None and int(head_dim * float(factor)) != rope_dim:
            raise ConfigError(f"{where}: rope_parameters.{name}.partial_rotary_factor={factor} does not give "
                              f"qk_rope_head_dim={rope_dim} of head_dim={head_dim}")
        rope = parse_rope(d, theta=cfg.get("rope_theta", 10000.0), max_position_embeddings=max_pos)
        if rope.rope_type not in ("default", "yarn"):
            raise ConfigError(f"{where}: rope_type {rope.rope_type!r} ({name}) is not supported for deepseek_v4 "
                              "(supported: default, yarn)")
        out.append(rope)
    return out[0], out[1]


def parse(cfg: dict, where: str) -> DeepseekV4Config:
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{where}: model_type {model_type!r} is not a DeepSeek-V4 config")
    _refuse(cfg, where, "scoring_func", ("sqrtsoftplus",), "expert scores are sqrt(softplus(logits))")
    _refuse(cfg, where, "topk_method", ("noaux_tc",), "bias-corrected top-k")
    _refuse(cfg, where, "hidden_act", ("silu",), "clamped SwiGLU experts")
    _refuse(cfg, where, "num_key_value_heads", (1,), "one shared key/value head")
    _refuse(cfg, where, "n_shared_experts", (1,), "one shared expert")
    _refuse(cfg, where, "norm_topk_prob", (True,), "expert weights are always renormalised")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConfigError(f"{where}: attention_bias / mlp_bias are not supported for deepseek_v4 (no checkpoint uses them)")
    L = int(require(cfg, "num_hidden_layers", where))
    head_dim = int(require(cfg, "head_dim", where))
    if cfg.get("layer_types") is not None:
        layer_types = tuple(cfg["layer_types"])[:L]
        rates = {**{CSA: 4, HCA: 128}, **(cfg.get("compress_rates") or {})}
        csa_ratio, hca_ratio = int(rates[CSA]), int(rates[HCA])
    elif cfg.get("compress_ratios") is not None:
        layer_types, csa_ratio, hca_ratio = _types_from_ratios(list(cfg["compress_ratios"]), L, where)
    else:
        layer_types, csa_ratio, hca_ratio = _default_layer_types(L), 4, 128
    if cfg.get("mlp_layer_types") is not None:
        mlp_types = tuple(cfg["mlp_layer_types"])[:L]
    else:
        n_hash = int(cfg.get("num_hash_layers", 3) or 0)
        mlp_types = tuple([HASH] * min(L, n_hash) + [ROUTED] * max(0, L - n_hash))
    if cfg.get("qk_rope_head_dim") is not None:
        rope_dim = int(cfg["qk_rope_head_dim"])
    elif cfg.get("partial_rotary_factor") is not None:
        rope_dim = int(head_dim * float(cfg["partial_rotary_factor"]))
    else:
        rope_dim = 64
    max_pos = int(cfg.get("max_position_embeddings") or 1048576)
    rope_main, rope_compress = _ropes(cfg, rope_dim, head_dim, max_pos, where)
    q = cfg.get("quantization_config") or {}
    expert_dtype = cfg.get("expert_dtype", q.get("expert_dtype") if isinstance(q, dict) else None)
    if expert_dtype not in (None, "fp4", "fp8", "bf16"):
        raise ConfigError(f"{where}: expert_dtype={expert_dtype!r} is not supported for deepseek_v4 (fp4, fp8 or bf16)")
    return DeepseekV4Config(
        model_type=model_type,
        vocab_size=int(require(cfg, "vocab_size", where)),
        hidden_size=int(require(cfg, "hidden_size", where)),
        num_layers=L,
        num_heads=int(require(cfg, "num_attention_heads", where)),
        head_dim=head_dim,
        q_lora_rank=int(require(cfg, "q_lora_rank", where)),
        o_groups=int(require(cfg, "o_groups", where)),
        o_lora_rank=int(require(cfg, "o_lora_rank", where)),
        moe_intermediate_size=int(require(cfg, "moe_intermediate_size", where)),
        n_routed_experts=int(require(cfg, "n_routed_experts", where)),
        num_experts_per_tok=int(require(cfg, "num_experts_per_tok", where)),
        layer_types=layer_types,
        mlp_layer_types=mlp_types,
        csa_ratio=csa_ratio,
        hca_ratio=hca_ratio,
        rope_head_dim=rope_dim,
        sliding_window=int(cfg.get("sliding_window") or 128),
        index_n_heads=int(cfg.get("index_n_heads", 64)),
        index_head_dim=int(cfg.get("index_head_dim", 128)),
        index_topk=int(cfg.get("index_topk", 512)),
        hc_mult=int(cfg.get("hc_mult", 4)),
        hc_sinkhorn_iters=int(cfg.get("hc_sinkhorn_iters", 20)),
        hc_eps=float(cfg.get("hc_eps", 1e-6)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.5)),
        swiglu_limit=float(cfg.get("swiglu_limit", 10.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_main=rope_main,
        rope_compress=rope_compress,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=max_pos,
        num_mtp_layers=int(cfg.get("num_nextn_predict_layers", 0) or 0),
        expert_dtype=expert_dtype,
    )


def parse_draft_backbone(cfg: dict, where: str, num_layers: int):
    del cfg, num_layers
    raise ConfigError(f"{where}: DeepSeek-V4 DSpark drafts are not supported yet; use a model-free proposer")


def draft_backbone_fields(backbone) -> dict:
    raise ConfigError("DeepSeek-V4 has no DSpark/DFlash draft layout here yet")
