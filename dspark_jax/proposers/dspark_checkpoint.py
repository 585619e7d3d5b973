"""DeepSpec draft checkpoints (`Qwen3DSparkModel` / `Gemma4DSparkModel`, DSpark and DFlash) <-> `DSparkDraft`.

Keys have no `model.` prefix (docs/algorithm.md §1). The draft's layers use its family's own layer rules
under `layers.{i}.`; the draft-only tensors (`fc`, `hidden_norm`, heads) are listed here. `export_draft`
writes the same layout back (PyTorch `[out, in]` Linear weights), so a draft trained here loads in the
reference.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from converters.loading import Rule
from dspark_jax.config import read_json, require
from dspark_jax.engine.schedule import CALIBRATION_FILE, load_calibration
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.handles import Draft
from dspark_jax.layers.params import Init
from dspark_jax.models import registry
from dspark_jax.proposers.dspark import DraftConfig, DSparkDraft

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


def strip_prefix(key: str) -> str:
    """`torch.compile` checkpoints prefix keys with `_orig_mod.`; the reference strips it, so do we."""
    return key.removeprefix("_orig_mod.")


def parse_draft_config(path: Path) -> DraftConfig:
    """Parse a DeepSpec draft `config.json` (DSpark or DFlash; optional fields defaulted as the reference does)."""
    cfg = read_json(path)
    where = str(path)
    archs = cfg.get("architectures") or []
    family = registry.by_draft_architecture(archs[0] if archs else None, where)
    markov_rank = int(cfg.get("markov_rank", 0) or 0)
    head_type = str(cfg.get("markov_head_type", "vanilla") or "vanilla").lower()
    if markov_rank > 0 and head_type not in MARKOV_HEAD_TYPES:
        raise ConfigError(f"{where}: markov_head_type {head_type!r} is not one of {MARKOV_HEAD_TYPES}")
    conf = bool(cfg.get("enable_confidence_head", False))
    num_layers = int(require(cfg, "num_hidden_layers", where))
    return DraftConfig(
        backbone=family.parse_draft_backbone(cfg, where, num_layers),
        block_size=int(require(cfg, "block_size", where)),
        target_layer_ids=tuple(int(i) for i in require(cfg, "target_layer_ids", where)),
        num_target_layers=int(require(cfg, "num_target_layers", where)),
        mask_token_id=int(require(cfg, "mask_token_id", where)),
        markov_rank=markov_rank,
        markov_head_type=head_type,
        enable_confidence_head=conf,
        confidence_head_with_markov=bool(cfg.get("confidence_head_with_markov", False)) and conf,
        num_anchors=int(cfg.get("num_anchors", 512) or 512),
    )


def rules(cfg: DraftConfig) -> list[Rule]:
    family = registry.by_config(cfg.backbone)
    return [
        ("embed_tokens.weight", [(("backbone", "embed_tokens"), "copy")]),
        ("lm_head.weight", [(("backbone", "lm_head"), "copy")]),
        ("norm.weight", [(("backbone", "norm"), "copy")]),
        ("fc.weight", [(("fc",), "linear")]),
        ("hidden_norm.weight", [(("hidden_norm",), "copy")]),
        *family.layer_rules(cfg.backbone, "layers.{i}."),
        ("markov_head.markov_w1.weight", [(("markov_head", "markov_w1"), "copy")]),
        ("markov_head.markov_w2.weight", [(("markov_head", "markov_w2"), "copy")]),
        ("markov_head.gate_proj.weight", [(("markov_head", "gate_proj"), "linear")]),
        ("markov_head.gate_proj.bias", [(("markov_head", "gate_bias"), "copy")]),
        ("markov_head.joint_proj.weight", [(("markov_head", "joint_proj"), "linear")]),
        ("markov_head.joint_proj.bias", [(("markov_head", "joint_bias"), "copy")]),
        ("confidence_head.proj.weight", [(("confidence_head", "proj"), "linear")]),
        ("confidence_head.proj.bias", [(("confidence_head", "bias"), "copy")]),
    ]


def load_draft(path: str | Path, dtype="bfloat16", mesh=None) -> Draft:
    """Load a DeepSpec-layout DSpark / DFlash draft (`config.json` + safetensors)."""
    from flax import nnx

    from dspark_jax.models.loading import abstract, check_dtype, fill

    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"draft checkpoint directory {directory} does not exist")
    dt = check_dtype(dtype)
    config = parse_draft_config(directory / "config.json")
    calibration = load_calibration(directory)  # `calibration.json` beside the draft: checked now, used by schedule="auto"
    if calibration is not None and calibration.temperatures is not None and not config.enable_confidence_head:
        raise CheckpointError(f"{directory / CALIBRATION_FILE} has confidence temperatures but the draft has no confidence head")
    graphdef, state = abstract(lambda: DSparkDraft(config, Init(nnx.Rngs(0), dt)))
    params = fill(state, directory, rules(config), dtype=dt, mesh=mesh,
                  layer_map=nnx.merge(graphdef, state).layer_map(), rename=strip_prefix)
    return Draft(config=config, graphdef=graphdef, params=params, dtype=dt, directory=directory)


def config_dict(cfg: DraftConfig, base: dict | None = None, dtype: str = "bfloat16") -> dict:
    """The DeepSpec draft `config.json`: the target's config (`base`, if given) with the draft fields set.

    Optional fields follow the reference: `markov_head_type` only with a Markov head,
    `confidence_head_with_markov` only with a confidence head; `tie_word_embeddings` is always false.
    """
    out = copy.deepcopy(base) if base else {}
    for key in ("markov_head_type", "confidence_head_with_markov", "auto_map", "text_config", "rope_theta", "rope_scaling"):
        out.pop(key, None)
    backbone_fields = registry.by_config(cfg.backbone).draft_backbone_fields(cfg.backbone)
    if "rope_parameters" in backbone_fields and isinstance(out.get("rope_parameters"), dict):
        merged = dict(out["rope_parameters"])
        if any(isinstance(v, dict) for v in backbone_fields["rope_parameters"].values()):
            merged.update(backbone_fields["rope_parameters"])
            backbone_fields["rope_parameters"] = merged
    out.update(backbone_fields)
    out.update(
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
    return out


def export_draft(draft: Draft, directory, *, dtype="bfloat16", base_config: dict | None = None) -> Path:
    """Write a `Draft` in the DeepSpec layout: `config.json` + `model.safetensors` (`[out, in]` Linear weights).

    `dtype` is the stored dtype (the reference stores bf16); `dj.load_draft` reads the files back bit-exactly
    at that dtype. `base_config` is the target's `config.json` dict, which the reference copies into the
    draft's config (optional: without it only the fields the draft needs are written).
    """
    import jax.numpy as jnp

    from converters.safetensors_io import save_file
    from dspark_jax.models.loading import checkpoint_tensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_tensors(draft, rules(draft.config), dtype), directory / "model.safetensors")
    cfg = config_dict(draft.config, base_config, str(jnp.dtype(dtype)))
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return directory
