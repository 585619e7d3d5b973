"""Gated MLPs (SwiGLU / GeGLU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.layers.params import Init

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def gated_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, act: str) -> jax.Array:
    """`down(act(x @ gate) * (x @ up))` with kernels `gate, up [D, F]`, `down [F, D]`."""
    g = jnp.einsum("btd,df->btf", x, gate)
    u = jnp.einsum("btd,df->btf", x, up)
    return jnp.einsum("btf,fd->btd", ACTIVATIONS[act](g) * u, down)


class GatedMLP(nnx.Module):
    """Parameters `gate_proj, up_proj [D, F]`, `down_proj [F, D]` of a gated MLP with activation `act`."""

    def __init__(self, D: int, F: int, act: str, init: Init):
        self.gate_proj = init.normal((D, F), ("embed", "mlp"))
        self.up_proj = init.normal((D, F), ("embed", "mlp"))
        self.down_proj = init.normal((F, D), ("mlp", "embed"))
        self.act = act

    def __call__(self, x):
        return gated_mlp(x, self.gate_proj[...], self.up_proj[...], self.down_proj[...], self.act)
