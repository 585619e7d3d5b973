"""`config.json` parsing for both dialects: hub fields (`rope_theta`, `rope_scaling`) and transformers-5
re-serialisations (`rope_parameters`). Never uses transformers' config classes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dspark_jax.config import FULL, SLIDING, DraftConfig, Gemma4Config, Qwen3Config, RopeConfig
from dspark_jax.errors import ConfigError
from dspark_jax.layers.mlp import ACTIVATIONS

TARGET_MODEL_TYPES = ("qwen3", "qwen3_moe", "gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
# Gemma 4 model types: multimodal wrappers (text decoder under `text_config`) and their text decoders.
GEMMA4_MULTIMODAL = {"gemma4": "gemma4_text", "gemma4_unified": "gemma4_unified_text"}
GEMMA4_TEXT = {"gemma4_text": "gemma4", "gemma4_unified_text": "gemma4_unified"}
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


def _gemma4_head_geometry(text: dict, layer_types: list[str], where: str) -> dict[str, tuple[int, int]]:
    """`{layer type: (head_dim, kv_heads)}` from either dialect.

    Hub: `head_dim`/`num_key_value_heads` for sliding layers, `global_head_dim` (default 512) for full layers,
    whose KV heads are `num_global_key_value_heads` only with `attention_k_eq_v`. transformers 5: the same
    full-layer values written as per-layer overrides in `per_layer_config`.
    """
    head_dim = int(text.get("head_dim") or 256)
    kv_heads = int(text.get("num_key_value_heads") or 4)
    overrides = text.get("per_layer_config")
    if overrides is None:
        global_kv = text.get("num_global_key_value_heads") if text.get("attention_k_eq_v", False) else None
        overrides = {
            i: {"head_dim": text.get("global_head_dim") or 512, **({"num_key_value_heads": global_kv} if global_kv else {})}
            for i, kind in enumerate(layer_types)
            if kind == FULL
        }
    per_layer: list[tuple[int, int]] = [(head_dim, kv_heads)] * len(layer_types)
    for key, override in dict(overrides).items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: per_layer_config key {key!r} is not a layer index") from None
        if not 0 <= i < len(layer_types) or not isinstance(override, dict):
            raise ConfigError(f"{where}: per_layer_config entry {key!r} does not name a layer of this model with a dict")
        unknown = set(override) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise ConfigError(f"{where}: per_layer_config[{key!r}] overrides {sorted(unknown)}; only head_dim and num_key_value_heads are supported")
        per_layer[i] = (int(override.get("head_dim", head_dim)), int(override.get("num_key_value_heads", kv_heads)))
    geometry: dict[str, tuple[int, int]] = {SLIDING: (head_dim, kv_heads), FULL: (head_dim, kv_heads)}
    for kind in (SLIDING, FULL):
        shapes = {per_layer[i] for i, k in enumerate(layer_types) if k == kind}
        if len(shapes) > 1:
            raise ConfigError(f"{where}: {kind} layers have different head geometries {sorted(shapes)}; not supported")
        if shapes:
            geometry[kind] = shapes.pop()
    return geometry


def parse_gemma4(cfg: dict, where: str) -> Gemma4Config:
    """Gemma 4 (`gemma4`, `gemma4_unified` multimodal configs with a `text_config`, or their `*_text` decoders).

    Missing optional fields take transformers' defaults for the model type; `gemma4_unified` has no per-layer
    inputs and no MoE block.
    """
    model_type = cfg.get("model_type")
    if model_type in GEMMA4_MULTIMODAL:
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{where}: a {model_type!r} config needs its text decoder settings under 'text_config'")
        flavor = model_type
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    else:
        text = cfg
        flavor = GEMMA4_TEXT[model_type]
        tie = cfg.get("tie_word_embeddings", True)
    unified = flavor == "gemma4_unified"
    if text.get("use_bidirectional_attention") == "all":
        raise ConfigError(f"{where}: use_bidirectional_attention='all' is an encoder setting; a target must be causal")
    if text.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true is not supported for Gemma 4 (no released checkpoint uses it)")
    layers = int(_require(text, "num_hidden_layers", where))
    layer_types = list(text.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(layers)])
    if len(layer_types) != layers or not set(layer_types) <= {SLIDING, FULL}:
        raise ConfigError(f"{where}: layer_types must list {layers} entries of {SLIDING!r} / {FULL!r}")
    layer_types[-1] = FULL  # transformers forces the last layer to full attention
    rp = text.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    max_pos = int(text.get("max_position_embeddings") or (262_144 if unified else 131_072))
    ropes = {}
    for kind in set(layer_types):
        if not isinstance(rp.get(kind), dict):
            raise ConfigError(f"{where}: rope_parameters needs an entry for {kind!r}")
        ropes[kind] = parse_rope(rp[kind], max_position_embeddings=max_pos)
    geometry = _gemma4_head_geometry(text, layer_types, where)
    activation = str(text.get("hidden_activation") or "gelu_pytorch_tanh")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{where}: hidden_activation {activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    moe = bool(text.get("enable_moe_block", False)) and not unified
    ple = 0 if unified else int(text.get("hidden_size_per_layer_input", 256) or 0)
    cap = text.get("final_logit_softcapping")
    return Gemma4Config(
        model_type=flavor,
        vocab_size=int(_require(text, "vocab_size", where)),
        hidden_size=int(_require(text, "hidden_size", where)),
        intermediate_size=int(_require(text, "intermediate_size", where)),
        num_layers=layers,
        num_heads=int(_require(text, "num_attention_heads", where)),
        layer_types=tuple(layer_types),
        sliding_window=int(text.get("sliding_window") or (1024 if unified else 512)),
        head_dim=geometry[SLIDING][0],
        num_kv_heads=geometry[SLIDING][1],
        global_head_dim=geometry[FULL][0],
        num_global_kv_heads=geometry[FULL][1],
        rope_sliding=ropes.get(SLIDING, RopeConfig(theta=10_000.0)),
        rope_full=ropes[FULL],
        attention_k_eq_v=bool(text.get("attention_k_eq_v", False)),
        final_logit_softcapping=float(cap) if cap else None,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        activation=activation,
        tie_word_embeddings=bool(tie),
        max_position_embeddings=max_pos,
        hidden_size_per_layer_input=ple,
        vocab_size_per_layer_input=int(text.get("vocab_size_per_layer_input") or 262_144) if ple else 0,
        num_kv_shared_layers=int(text.get("num_kv_shared_layers", 0) or 0),
        use_double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
        enable_moe_block=moe,
        num_experts=int(text.get("num_experts") or 0) if moe else 0,
        top_k_experts=int(text.get("top_k_experts") or 0) if moe else 0,
        moe_intermediate_size=int(text.get("moe_intermediate_size") or 0) if moe else 0,
    )


def parse_target_config(path: Path):
    """Parse a target `config.json` into the family's config dataclass."""
    cfg = read_json(path)
    model_type = cfg.get("model_type")
    if model_type in ("qwen3", "qwen3_moe"):
        return parse_qwen3(cfg, str(path))
    if model_type in GEMMA4_MULTIMODAL or model_type in GEMMA4_TEXT:
        return parse_gemma4(cfg, str(path))
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
