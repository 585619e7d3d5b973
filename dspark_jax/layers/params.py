"""Parameter construction: every parameter is an `nnx.Param` that carries its logical sharding axes.

Layer stacks are built by giving a layer an `Init` with `stack=n`: each of its parameters then gets a leading
`[n]` axis named "layers", and the stack runs under `lax.scan` (`layers.stack`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02
LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class Init:
    """How a module creates its parameters: random source, dtype, and how many stacked copies (0 = unstacked)."""

    rngs: nnx.Rngs
    dtype: jnp.dtype
    stack: int = 0

    def stacked(self, n: int) -> Init:
        return dataclasses.replace(self, stack=n)

    def _shape(self, shape, axes):
        if self.stack:
            return (self.stack, *shape), (LAYERS, *axes)
        return tuple(shape), tuple(axes)

    def normal(self, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float = INIT_STD) -> nnx.Param:
        """N(0, std^2) (the HF `initializer_range` init), independent per stacked copy."""
        shape, axes = self._shape(shape, axes)
        value = std * jax.random.normal(self.rngs.params(), shape, jnp.float32)
        return nnx.Param(value.astype(self.dtype), axes=axes)

    def ones(self, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
        shape, axes = self._shape(shape, axes)
        return nnx.Param(jnp.ones(shape, self.dtype), axes=axes)

    def zeros(self, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
        shape, axes = self._shape(shape, axes)
        return nnx.Param(jnp.zeros(shape, self.dtype), axes=axes)
