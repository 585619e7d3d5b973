"""The DeepSeek-V3 family: `deepseek_v3` targets with MLA and a latent cache. Their drafts are the MTP
modules stored in the target checkpoint itself (`proposers.mtp`); there is no DSpark/DFlash layout."""

from dspark_jax.models.deepseek_v3 import checkpoint, config
from dspark_jax.models.deepseek_v3.config import DeepseekV3Config
from dspark_jax.models.deepseek_v3.model import DeepseekV3Model
from dspark_jax.models.family import Family

FAMILY = Family(
    name="deepseek_v3",
    model_types=config.MODEL_TYPES,
    config_class=DeepseekV3Config,
    parse_config=config.parse,
    model_class=DeepseekV3Model,
    rules=checkpoint.rules,
    layer_rules=checkpoint.layer_rules,
    ignore=checkpoint.ignore,
    rename=checkpoint.rename,
    draft_architecture="",  # no DSpark/DFlash drafts: nothing matches (registry.by_draft_architecture)
    parse_draft_backbone=config.parse_draft_backbone,
    draft_backbone_fields=config.draft_backbone_fields,
)

__all__ = ["FAMILY", "DeepseekV3Config", "DeepseekV3Model"]
