"""The Qwen3 family: dense `qwen3` and `qwen3_moe` targets, and `Qwen3DSparkModel` drafts."""

from dspark_jax.models.family import Family
from dspark_jax.models.qwen3 import checkpoint, config
from dspark_jax.models.qwen3.config import Qwen3Config
from dspark_jax.models.qwen3.model import Qwen3Model

FAMILY = Family(
    name="qwen3",
    model_types=config.MODEL_TYPES,
    config_class=Qwen3Config,
    parse_config=config.parse,
    model_class=Qwen3Model,
    rules=checkpoint.rules,
    layer_rules=checkpoint.layer_rules,
    ignore=checkpoint.ignore,
    rename=checkpoint.rename,
    draft_architecture="Qwen3DSparkModel",
    parse_draft_backbone=config.parse_draft_backbone,
    draft_backbone_fields=config.draft_backbone_fields,
)

__all__ = ["FAMILY", "Qwen3Config", "Qwen3Model"]
