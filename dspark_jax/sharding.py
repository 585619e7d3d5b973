"""Logical axis names -> mesh axes. The only module that names mesh axes.

Parameters carry logical axes as NNX metadata (`nnx.Param(value, axes=(...))`); caches name theirs in
`layers/kv_cache.py` (`CACHE_AXES`), activations where they are made. Placement is declared once here
(`RULES`) and enforced in two places: loading puts parameters where their axes say (`partition_spec`), and
inside compiled programs `constrain` pins caches and activations to the mesh the program runs under
(`jax.set_mesh`, entered by the engine when the target's parameters are sharded; without a mesh it does
nothing). A dimension that the mesh axis does not divide evenly is replicated instead (a 2-KV-head model on a
4-way model axis still runs). Experts are split over the model axis (expert parallelism, `layers/moe.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"
MODEL = "model"

# Requests over `data`, tensor parallelism over `model`.
RULES: Mapping[str, str | None] = {
    "batch": DATA,
    "vocab": MODEL,
    "embed": None,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "head_dim": None,
    "mlp": MODEL,
    "experts": MODEL,
    "cache_seq": None,
    "layers": None,
    "features": None,
    "rank": None,
}


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A `(data, model)` mesh over `devices` (default: all). `data` defaults to what `model` leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def active_mesh():
    """The mesh of the `jax.set_mesh` context being traced under, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty or mesh.size <= 1 else mesh


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin `x` (logical `axes`) to the active mesh inside a compiled program; without a mesh, `x` unchanged."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(x.shape, axes, mesh))


def mesh_axis(logical: str):
    """The mesh axis a logical axis maps to (None: replicated)."""
    return RULES.get(logical)


def partition_spec(shape: tuple[int, ...], axes: tuple[str | None, ...] | None, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array with logical `axes`; indivisible or unknown axes are replicated."""
    if axes is None:
        return PartitionSpec()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    spec = []
    used = set()
    for dim, name in zip(shape, axes):
        mesh_axis = RULES.get(name) if name is not None else None
        if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis] != 0:
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def shard_params(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Place an NNX parameter state on `mesh` according to each Param's `axes` metadata."""

    def one(var):
        spec = partition_spec(var.get_value().shape, var.get_metadata().get("axes"), mesh)
        return var.replace(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_array(x: jax.Array, axes: tuple[str | None, ...], mesh: Mesh) -> jax.Array:
    """`x` placed on `mesh` by its logical `axes`. Over several processes every process passes the same value
    and keeps the shards of its own devices (a device array is brought to the host first: JAX puts only host
    data onto other processes' devices)."""
    sharding = NamedSharding(mesh, partition_spec(x.shape, axes, mesh))
    if sharding.is_fully_addressable or not isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: their data (trailing dims) travels
        data = jax.random.key_data(x)
        placed = shard_array(data, tuple(axes) + (None,) * (data.ndim - x.ndim), mesh)
        return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)


def to_host(x) -> np.ndarray:
    """`np.asarray(x)`, also for an array spread over several processes' devices (multi-host meshes): there every
    process gathers the whole value, a collective that all processes reach in the same order."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def batch_is_split() -> bool:
    """Whether the active mesh splits the `batch` axis over several devices (rows then live on different devices,
    so a program must not gather rows across them)."""
    mesh = active_mesh()
    axis = RULES["batch"]
    return mesh is not None and axis in mesh.shape and mesh.shape[axis] > 1


def platform() -> str:
    """The platform (`"cpu"`, `"tpu"`, `"gpu"`) the program being traced is compiled for: the active mesh's devices,
    else the default backend (ahead-of-time compiles for a TPU topology trace under a mesh of TPU devices)."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()
