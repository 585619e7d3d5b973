"""The DeepSeek-V4 family: `deepseek_v4` targets (Flash / Pro) with mHC streams, CSA / HCA compressed
attention and rollback-aware caches (docs/deepseek.md §5-§8)."""

from dspark_jax.models.deepseek_v4 import checkpoint, config
from dspark_jax.models.deepseek_v4.config import DeepseekV4Config
from dspark_jax.models.deepseek_v4.model import DeepseekV4Model
from dspark_jax.models.family import Family

FAMILY = Family(
    name="deepseek_v4",
    model_types=config.MODEL_TYPES,
    config_class=DeepseekV4Config,
    parse_config=config.parse,
    model_class=DeepseekV4Model,
    rules=checkpoint.rules,
    layer_rules=checkpoint.layer_rules,
    ignore=checkpoint.ignore,
    rename=checkpoint.rename,
    draft_architecture="",  # no DSpark/DFlash draft layout yet: nothing matches (registry.by_draft_architecture)
    parse_draft_backbone=config.parse_draft_backbone,
    draft_backbone_fields=config.draft_backbone_fields,
)

__all__ = ["FAMILY", "DeepseekV4Config", "DeepseekV4Model"]
