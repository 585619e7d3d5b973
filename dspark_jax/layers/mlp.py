"""Gated MLPs (SwiGLU / GeGLU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def gated_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, act: str) -> jax.Array:
    """`down(act(x @ gate) * (x @ up))` with kernels `gate, up [D, F]`, `down [F, D]`."""
    g = jnp.einsum("btd,df->btf", x, gate)
    u = jnp.einsum("btd,df->btf", x, up)
    return jnp.einsum("btf,fd->btd", ACTIVATIONS[act](g) * u, down)
