"""Top-k routed mixture of experts, dispatched with `lax.ragged_dot` over expert-sorted tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.layers.mlp import ACTIVATIONS


def softmax_topk_routing(router_logits: jax.Array, k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax in fp32 over `E` experts, top-k, optional renormalisation -> (weights [M, k] fp32, idx [M, k])."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, idx = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, idx


def routed_experts(
    x: jax.Array,
    weights: jax.Array,
    idx: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    act: str,
) -> jax.Array:
    """Sum over each token's chosen experts of `w * down_e(act(gate_e x) * up_e x)`.

    `x [M, D]`, `weights/idx [M, k]`, kernels `gate/up [E, D, F]`, `down [E, F, D]` -> `[M, D]`.
    Token copies are sorted by expert so each expert runs one dense matmul over its own tokens.
    """
    M, D = x.shape
    E = gate.shape[0]
    k = idx.shape[1]
    flat_expert = idx.reshape(-1)  # [M*k]
    order = jnp.argsort(flat_expert, stable=True)
    tokens = jnp.take(x, order // k, axis=0)  # [M*k, D]
    group_sizes = jnp.bincount(flat_expert, length=E).astype(jnp.int32)
    g = jax.lax.ragged_dot(tokens, gate, group_sizes)
    u = jax.lax.ragged_dot(tokens, up, group_sizes)
    y = jax.lax.ragged_dot((ACTIVATIONS[act](g) * u).astype(x.dtype), down, group_sizes)  # [M*k, D]
    y = jnp.zeros_like(y).at[order].set(y).reshape(M, k, D)
    return jnp.einsum("mkd,mk->md", y, weights.astype(x.dtype))
