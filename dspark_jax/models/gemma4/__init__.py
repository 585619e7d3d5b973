"""The Gemma 4 family: `gemma4` / `gemma4_unified` targets (multimodal wrappers or their text decoders) and
`Gemma4DSparkModel` drafts."""

from dspark_jax.models.family import Family
from dspark_jax.models.gemma4 import checkpoint, config
from dspark_jax.models.gemma4.config import FULL, SLIDING, Gemma4Config
from dspark_jax.models.gemma4.model import Gemma4Model

FAMILY = Family(
    name="gemma4",
    model_types=config.MODEL_TYPES,
    config_class=Gemma4Config,
    parse_config=config.parse,
    model_class=Gemma4Model,
    rules=checkpoint.rules,
    layer_rules=checkpoint.layer_rules,
    ignore=checkpoint.ignore,
    rename=checkpoint.rename,
    draft_architecture=config.DRAFT_ARCHITECTURE,
    parse_draft_backbone=config.parse_draft_backbone,
    draft_backbone_fields=config.draft_backbone_fields,
)

__all__ = ["FAMILY", "FULL", "SLIDING", "Gemma4Config", "Gemma4Model"]
