"""What a model family provides. Every family package (`dspark_jax/models/<family>/`) exports one `FAMILY`;
`models.registry` maps `model_type` values and DeepSpec draft architectures to it.

A family's model class is a pure-functional target (`engine.contracts.TargetModel`): `init_cache`,
`__call__(tokens, lengths, cache, capture=..., num_valid=...)`, `logits`, plus the pieces its drafts are
built from (`embed`, `rms_norm`, `final_norm`, `context_kv`, `block_hidden`, `layer_map`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values served by this family
    config_class: type
    parse_config: Callable[[dict, str], Any]  # config.json dict, its path -> config
    model_class: type  # `model_class(config, layers.params.Init)`
    rules: Callable[[Any], list]  # HF checkpoint rule table of a target config
    layer_rules: Callable[[Any, str], list]  # one layer's rules under a key prefix (targets and drafts)
    ignore: Callable[[Any], Callable[[str], bool]]  # keys to skip
    rename: Callable[[Any], Callable[[str], str]]  # key normalisation (e.g. multimodal prefixes)
    # DeepSpec DSpark/DFlash drafts of this family
    draft_architecture: str
    parse_draft_backbone: Callable[[dict, str, int], Any]  # draft config.json, path, draft layers -> backbone config
    draft_backbone_fields: Callable[[Any], dict]  # backbone config -> draft config.json fields
