"""Parameter construction: every parameter is an `nnx.Param` that carries its logical sharding axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, std: float = INIT_STD) -> nnx.Param:
    """A parameter drawn from N(0, std^2) (the HF `initializer_range` init)."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), axes=axes)


def ones(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), axes=axes)


def zeros(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), axes=axes)
