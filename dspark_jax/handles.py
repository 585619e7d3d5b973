"""Loaded models: a config, an NNX graph definition, its parameter state, and where it came from.

`Target` and `Draft` are what `load_target` / `load_draft` / `prompt_lookup` return and what `generate`
takes. They are plain holders: the compute lives in `models/` (targets) and `proposers/` (drafts); jitted
functions receive `graphdef` as a static argument and `params` as an array argument and rebuild the module
inside (`nnx.merge`).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.layers.params import Init


@dataclasses.dataclass(frozen=True, eq=False)
class Loaded:
    config: Any
    graphdef: nnx.GraphDef
    params: nnx.State
    dtype: Any
    directory: Path | None = None

    @property
    def module(self):
        return nnx.merge(self.graphdef, self.params)

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))

    @property
    def param_bytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))

    def with_params(self, params: nnx.State):
        return dataclasses.replace(self, params=params)

    @classmethod
    def of_module(cls, module: nnx.Module, config, dtype, **kwargs):
        graphdef, params = nnx.split(module)
        return cls(config=config, graphdef=graphdef, params=params, dtype=jnp.dtype(dtype), **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class Target(Loaded):
    """A target LM. `stop_token_ids` come from the checkpoint's generation config."""

    stop_token_ids: tuple[int, ...] = ()

    @classmethod
    def random(cls, config, *, dtype="float32", seed: int = 0, stop_token_ids: tuple[int, ...] = ()) -> Target:
        """Random weights (N(0, 0.02), norms 1) for tests and benchmarks."""
        from dspark_jax.models import registry

        module = registry.by_config(config).model_class(config, Init(nnx.Rngs(seed), jnp.dtype(dtype)))
        return cls.of_module(module, config, dtype, stop_token_ids=tuple(stop_token_ids))

    @functools.cached_property
    def tokenizer(self):
        from dspark_jax.tokenizer import Tokenizer

        return Tokenizer.from_directory(self.directory)


@dataclasses.dataclass(frozen=True, eq=False)
class Draft(Loaded):
    """A proposer: a trained draft (DSpark / DFlash) or a model-free one (prompt lookup)."""

    @classmethod
    def random(cls, config, *, dtype="float32", seed: int = 0) -> Draft:
        """A DSpark / DFlash draft with random weights."""
        from dspark_jax.proposers.dspark import DSparkDraft

        return cls.of_module(DSparkDraft(config, Init(nnx.Rngs(seed), jnp.dtype(dtype))), config, dtype)
