"""Weight products."""

from __future__ import annotations

import math

import jax

from dspark_jax import sharding


def linear(x: jax.Array, kernel: jax.Array, in_dims: int = 1) -> jax.Array:
    """Contract the last `in_dims` axes of `x` with the first `in_dims` axes of `kernel`.

    Kernels keep their head axes (`[D, N, H]`, `[N, H, D]`) for sharding. On XLA:CPU both operands are flattened
    to 2-D for the product (free for contiguous arrays), because XLA:CPU runs a dot with several free kernel axes
    3-4x slower than the same product on flattened operands. Elsewhere the kernel is contracted as it is stored:
    on TPU an array is tiled over its last two axes, so flattening `[D, N, H]` to `[D, N x H]` is a re-layout
    (a copy of every layer's kernel each step, docs/tpu.md §6).
    """
    k_in, k_out = kernel.shape[:in_dims], kernel.shape[in_dims:]
    lead = x.shape[: x.ndim - in_dims]
    if sharding.platform() != "cpu":
        dims = ((tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims))), ((), ()))
        return jax.lax.dot_general(x, kernel, dims)
    y = x.reshape(lead + (math.prod(k_in),)) @ kernel.reshape(math.prod(k_in), math.prod(k_out))
    return y.reshape(lead + k_out)
