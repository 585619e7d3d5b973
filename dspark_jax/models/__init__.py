"""Target decoders. They know nothing about drafts: a target exposes `init_cache`, `__call__` (a block at
per-row offsets, optional hidden-state capture) and `logits`."""

from __future__ import annotations

from dspark_jax.config import Gemma4Config, Qwen3Config
from dspark_jax.errors import ConfigError


def model_class(config):
    """The NNX module class for a parsed target config."""
    if isinstance(config, Qwen3Config):
        from dspark_jax.models.qwen3 import Qwen3Model

        return Qwen3Model
    if isinstance(config, Gemma4Config):
        from dspark_jax.models.gemma4 import Gemma4Model

        return Gemma4Model
    raise ConfigError(f"no target model for config type {type(config).__name__}")
