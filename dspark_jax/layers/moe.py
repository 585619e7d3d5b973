"""Top-k routed mixture of experts, dispatched with `lax.ragged_dot` over expert-sorted tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dspark_jax import sharding
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
    limit: float | None = None,
) -> jax.Array:
    """Sum over each token's chosen experts of `w * down_e(act(gate_e x) * up_e x)`.

    With `limit` (DeepSeek-V4's clamped SwiGLU) the gate is clamped to `<= limit` and the up projection to
    `[-limit, limit]` before the product.

    `x [M, D]`, `weights/idx [M, k]`, kernels `gate/up [E, D, F]`, `down [E, F, D]` -> `[M, D]`.
    Token copies are sorted by expert so each expert runs one dense matmul over its own tokens. Under a mesh
    whose expert axis splits `E` (expert parallelism), each device runs its own experts on every token routed
    to them (`shard_map`; tokens stay split over the data axis) and the partial sums are added over the
    expert axis, so no device ever holds another device's experts.
    """
    mesh = sharding.active_mesh()
    axis = sharding.mesh_axis("experts")
    E = gate.shape[0]
    if mesh is None or axis not in mesh.axis_names or mesh.shape[axis] == 1 or E % mesh.shape[axis]:
        return _experts(x, weights, idx, gate, up, down, act, 0, limit)
    shards = mesh.shape[axis]
    data = sharding.mesh_axis("batch")
    rows = data if data in mesh.axis_names and x.shape[0] % mesh.shape[data] == 0 else None

    def local(x, weights, idx, gate, up, down):
        first = jax.lax.axis_index(axis) * (E // shards)
        return jax.lax.psum(_experts(x, weights, idx, gate, up, down, act, first, limit), axis)

    by_rows, by_expert = P(rows, None), P(axis, None, None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(by_rows, by_rows, by_rows, by_expert, by_expert, by_expert), out_specs=by_rows
    )(x, weights, idx, gate, up, down)


def _experts(x, weights, idx, gate, up, down, act: str, first, limit: float | None = None) -> jax.Array:
    """The routed sum over the experts `[first, first + E_local)` held in `gate/up/down [E_local, ...]`;
    copies routed elsewhere are sorted last, past every group, where `ragged_dot` leaves zeros."""
    M, D = x.shape
    E = gate.shape[0]
    k = idx.shape[1]
    local = idx - first
    mine = (local >= 0) & (local < E)
    flat_expert = jnp.where(mine, local, E).reshape(-1)  # [M*k], E = not here
    order = jnp.argsort(flat_expert, stable=True)
    tokens = jnp.take(x, order // k, axis=0)  # [M*k, D]
    group_sizes = jnp.bincount(flat_expert, length=E + 1)[:E].astype(jnp.int32)
    g = jax.lax.ragged_dot(tokens, gate, group_sizes)
    u = jax.lax.ragged_dot(tokens, up, group_sizes)
    if limit is not None:
        g, u = jnp.minimum(g, limit), jnp.clip(u, -limit, limit)
    y = jax.lax.ragged_dot((ACTIVATIONS[act](g) * u).astype(x.dtype), down, group_sizes)  # [M*k, D]
    y = jnp.zeros_like(y).at[order].set(y).reshape(M, k, D)
    return jnp.einsum("mkd,mk->md", y, jnp.where(mine, weights, 0).astype(x.dtype))
