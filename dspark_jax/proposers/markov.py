"""Low-rank Markov heads: a transition bias on the draft logits from the previously sampled token.

`e(t) = W1[t]` (`[V, R]` table), bias `= z @ W2^T` with `W2 [V, R]`:
vanilla `z = e`; gated `z = sigmoid([h ; e] Wg + bg) * e`; rnn `[g | c | o] = [s ; e ; h] Wj + bj`,
`s' = sigmoid(g) s + (1 - sigmoid(g)) tanh(c)`, `z = tanh(o)` (the bias uses the pre-update state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.layers.params import Init


class MarkovHead(nnx.Module):
    def __init__(self, cfg, init: Init):
        V, R, D = cfg.vocab_size, cfg.markov_rank, cfg.hidden_size
        self.kind = cfg.markov_head_type
        self.rank = R
        self.markov_w1 = init.normal((V, R), ("vocab", "rank"))
        self.markov_w2 = init.normal((V, R), ("vocab", "rank"))
        if self.kind == "gated":
            self.gate_proj = init.normal((D + R, R), (None, "rank"))
            self.gate_bias = init.zeros((R,), ("rank",))
        elif self.kind == "rnn":
            self.joint_proj = init.normal((2 * R + D, 3 * R), (None, None))
            self.joint_bias = init.zeros((3 * R,), (None,))

    def embed(self, prev: jax.Array) -> jax.Array:
        """`e(prev)`: `[...]` token ids -> `[..., R]`."""
        return jnp.take(self.markov_w1[...], prev, axis=0)

    def initial_state(self, batch: int) -> jax.Array:
        return jnp.zeros((batch, self.rank), self.markov_w1.dtype)

    def step(self, prev: jax.Array, h: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Bias `[B, V]` (fp32) for one block position from `prev [B]`, `h [B, D]`; returns the next state."""
        e = self.embed(prev)
        if self.kind == "vanilla":
            z = e
        elif self.kind == "gated":
            gate = jax.nn.sigmoid(jnp.concatenate([h, e], axis=-1) @ self.gate_proj[...] + self.gate_bias[...])
            z = gate.astype(e.dtype) * e
        else:
            joint = jnp.concatenate([state, e, h], axis=-1) @ self.joint_proj[...] + self.joint_bias[...]
            g, c, o = jnp.split(joint, 3, axis=-1)
            forget = jax.nn.sigmoid(g)
            state = forget * state + (1 - forget) * jnp.tanh(c)
            z = jnp.tanh(o)
        return jnp.einsum("br,vr->bv", z, self.markov_w2[...], preferred_element_type=jnp.float32), state

    def block_bias(self, prev: jax.Array, h: jax.Array) -> jax.Array:
        """Teacher-forced biases `[B, K, V]` for `prev [B, K]`, `h [B, K, D]` (recurrent state from zero)."""

        def body(state, xs):
            p, hk = xs
            bias, state = self.step(p, hk, state)
            return state, bias

        _, biases = jax.lax.scan(body, self.initial_state(prev.shape[0]), (prev.T, jnp.swapaxes(h, 0, 1)))
        return jnp.swapaxes(biases, 0, 1)


class ConfidenceHead(nnx.Module):
    """`logit_k = [h_k ; e(prev_k)] w + b` (the Markov embedding only with `confidence_head_with_markov`)."""

    def __init__(self, cfg, init: Init):
        width = cfg.hidden_size + (cfg.markov_rank if cfg.confidence_head_with_markov else 0)
        self.with_markov = cfg.confidence_head_with_markov
        self.proj = init.normal((width, 1), (None, None))
        self.bias = init.zeros((1,), (None,))

    def __call__(self, h: jax.Array, e_prev: jax.Array | None) -> jax.Array:
        """fp32 logits `[...]` from `h [..., D]` and `e_prev [..., R]`."""
        x = jnp.concatenate([h, e_prev], axis=-1) if self.with_markov else h
        return (x @ self.proj[...] + self.bias[...])[..., 0].astype(jnp.float32)
