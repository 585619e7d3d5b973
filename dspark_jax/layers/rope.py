"""Rotary position embeddings (HF "rotate-half" layout): default, YaRN and Gemma 4 proportional."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.config import RopeConfig
from dspark_jax.errors import ConfigError


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """`inv_freq [head_dim // 2]` (float32) and the cos/sin `attention_factor` of one attention type."""
    base = float(rope.theta)
    if rope.rope_type == "proportional":
        n_rot = int(rope.partial_rotary_factor * head_dim // 2)
        inv = np.zeros(head_dim // 2, np.float32)
        exponents = np.arange(0, 2 * n_rot, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        inv[:n_rot] = 1.0 / (np.float32(base) ** exponents)
        return (inv / np.float32(rope.factor or 1.0)).astype(np.float32), 1.0

    dim = int(head_dim * rope.partial_rotary_factor)
    if dim != head_dim:
        raise ConfigError(
            f"partial_rotary_factor={rope.partial_rotary_factor} with rope_type={rope.rope_type!r} is not supported "
            "(only Gemma 4 'proportional' RoPE rotates part of the head)"
        )
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    if rope.rope_type == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    if rope.rope_type != "yarn":
        raise ConfigError(f"rope_type {rope.rope_type!r} is not supported; supported: default, yarn, proportional")

    factor = rope.factor
    original = rope.original_max_position_embeddings or rope.max_position_embeddings
    if original is None:
        raise ConfigError("YaRN RoPE needs original_max_position_embeddings (or max_position_embeddings)")
    if factor is None:
        factor = rope.max_position_embeddings / original

    def mscale_of(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(mscale_of(factor, rope.mscale) / mscale_of(factor, rope.mscale_all_dim))
        else:
            attention_factor = mscale_of(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp would divide by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv.astype(np.float32), float(attention_factor)


def cos_sin(positions: jax.Array, inv_freq: np.ndarray, attention_factor: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[B, T, H]` for integer `positions [B, T]`: angles in fp32, cast to the activation dtype."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([angles, angles], axis=-1)
    return (jnp.cos(emb) * attention_factor).astype(dtype), (jnp.sin(emb) * attention_factor).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x [B, T, N, H]` with `cos/sin [B, T, H]` (rotate_half([a; b]) = [-b; a])."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
