"""RMSNorm variants. Both normalise in float32; they differ in where the cast back happens."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Llama/Qwen3 style: normalise in fp32, cast to the input dtype, *then* multiply by the weight."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rms_norm_fp32(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """Gemma 4 style: all math in fp32 (weight is a plain multiplier, optional), one cast at the end."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)
