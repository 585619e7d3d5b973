"""The one place that dispatches on model family: `model_type` (and DeepSpec draft architecture) -> family.

Adding a family means adding its package under `dspark_jax/models/` and one line to `FAMILIES`.
"""

from __future__ import annotations

import importlib

from dspark_jax.errors import ConfigError
from dspark_jax.models.family import Family

FAMILIES = (
    "dspark_jax.models.qwen3",
    "dspark_jax.models.gemma4",
    "dspark_jax.models.deepseek_v3",
    "dspark_jax.models.deepseek_v4",
)


def families() -> list[Family]:
    return [importlib.import_module(name).FAMILY for name in FAMILIES]


def by_model_type(model_type, where: str = "config.json") -> Family:
    for family in families():
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in families() for t in f.model_types)
    raise ConfigError(f"{where}: model_type {model_type!r} is not supported as a target; supported: {supported}")


def by_draft_architecture(architecture, where: str = "config.json") -> Family:
    for family in families():
        if architecture == family.draft_architecture:
            return family
    supported = ", ".join(f.draft_architecture for f in families() if f.draft_architecture)
    raise ConfigError(f"{where}: architectures {architecture!r} is not a DSpark draft; supported: {supported}")


def by_config(config) -> Family:
    for family in families():
        if isinstance(config, family.config_class):
            return family
    raise ConfigError(f"no model family for config type {type(config).__name__}")
