"""Layer stacks under `lax.scan`, so compile time does not grow with depth.

A model's layers are split into `Group`s: a repeating pattern of layer kinds (one kind for uniform models,
e.g. Gemma's five sliding layers and one full layer) repeated `n` times. Each pattern position is one layer
module whose parameters carry a leading `[n]` axis (`params.Init(stack=n)`); `scan` runs the body once per
repetition, the pattern unrolled inside it. `LayerMap` tells the checkpoint rules where HF layer `i` lives:
(the parameter path prefix of its pattern position, its index on the stacked axis).

`Capture` collects hidden states at HF `output_hidden_states` indices inside the scan without keeping every
layer's output: a buffer indexed by capture slot, written only at the requested layers.

`unrolled(model)`: inside this block, the groups of `model` run as a Python loop over per-repetition
parameter slices taken once, where the block is entered. XLA:CPU copies a layer's weight slice out of the
stacked array on every scan iteration (it cannot hand a dynamic slice to its matmul), which doubles the weight
traffic of memory-bound decoding; a decode loop entered inside `unrolled` slices once per call instead, at
the price of a compile time that grows with depth again (benchmarks/README.md has both measured).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def periodic_groups(kinds: Sequence[Hashable], start: int = 0) -> list[tuple[int, tuple, int]]:
    """Split a sequence of layer kinds into `(first layer, pattern, repetitions)` groups.

    The shortest pattern that repeats at least twice from the front is taken (the whole rest when none
    does); what it leaves at the end is grouped the same way.
    """
    kinds = tuple(kinds)
    m = len(kinds)
    if m == 0:
        return []
    for p in range(1, m + 1):
        n = m // p
        if (n >= 2 or p == m) and all(kinds[i] == kinds[i % p] for i in range(n * p)):
            return [(start, kinds[:p], n)] + periodic_groups(kinds[n * p :], start + n * p)
    raise AssertionError("unreachable")


class Group(nnx.Module):
    """`n` repetitions of a pattern of layers; `layers[q]` holds pattern position q, stacked `[n, ...]`."""

    def __init__(self, layers: list[nnx.Module], start: int, n: int):
        self.layers = nnx.List(layers)
        self.start = start
        self.n = n
        self.period = len(layers)

    def layer_indices(self) -> np.ndarray:
        """HF layer index of each (repetition, pattern position): `[n, period]`."""
        return self.start + np.arange(self.n)[:, None] * self.period + np.arange(self.period)[None, :]


_UNROLLED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("unrolled_layer_groups", default=None)


@contextlib.contextmanager
def unrolled(*modules: nnx.Module):
    """Run the layer groups of `modules` unrolled, on parameter slices taken here (see the module docstring)."""
    table = dict(_UNROLLED.get() or {})
    for module in modules:
        for _, node in nnx.iter_graph(module):
            if isinstance(node, Group):
                state = nnx.state(node.layers)
                table[id(node.layers)] = [jax.tree.map(lambda a, r=r: a[r], state) for r in range(node.n)]
    token = _UNROLLED.set(table)
    try:
        yield
    finally:
        _UNROLLED.reset(token)


def scan(group: Group, fn: Callable, carry, xs=None, *, remat: bool = False):
    """`fn(layers, carry, x) -> (carry, y)` once per repetition of `group`, over its stacked parameters.

    `layers` is the tuple of pattern-position modules with one repetition's parameters; `xs` (stacked on a
    leading `[n]` axis, or None) are sliced alongside. Returns `(carry, ys)` like `lax.scan`.
    """
    graphdef, state = nnx.split(group.layers)
    sliced = (_UNROLLED.get() or {}).get(id(group.layers))
    if sliced is not None:
        ys = []
        for r, st in enumerate(sliced):
            carry, y = fn(tuple(nnx.merge(graphdef, st)), carry, None if xs is None else jax.tree.map(lambda a, r=r: a[r], xs))
            ys.append(y)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)

    def body(c, inp):
        st, x = inp
        return fn(tuple(nnx.merge(graphdef, st)), c, x)

    if remat:
        body = jax.checkpoint(body)
    return jax.lax.scan(body, carry, (state, xs))


@dataclasses.dataclass(frozen=True)
class LayerMap:
    """Where each HF layer's parameters live: `slots[i] = (parameter path prefix, index on the stacked axis)`."""

    slots: tuple[tuple[tuple, int], ...]

    @classmethod
    def of(cls, groups: Sequence[Group], prefix: tuple = ()) -> LayerMap:
        slots = {}
        for g, group in enumerate(groups):
            for r, row in enumerate(group.layer_indices()):
                for q, i in enumerate(row):
                    slots[int(i)] = ((*prefix, "groups", g, "layers", q), r)
        return cls(tuple(slots[i] for i in range(len(slots))))

    def prefixed(self, prefix: tuple) -> LayerMap:
        return LayerMap(tuple(((*prefix, *p), r) for p, r in self.slots))

    def slot(self, i: int) -> tuple[tuple, int] | None:
        return self.slots[i] if 0 <= i < len(self.slots) else None

    def layers_at(self, prefix: tuple) -> dict[int, int]:
        """Stack index -> HF layer index for one pattern-position prefix."""
        return {r: i for i, (p, r) in enumerate(self.slots) if p == prefix}

    @property
    def prefixes(self) -> set[tuple]:
        return {p for p, _ in self.slots}


class Capture:
    """Requested hidden states (HF indices: 0 = embeddings, i + 1 = output of layer i) gathered during a forward."""

    def __init__(self, indices: Sequence[int], num_layers: int):
        self.indices = tuple(int(i) for i in indices)
        self.unique = tuple(dict.fromkeys(self.indices))
        slot = np.full(num_layers + 2, -1, np.int32)
        for s, i in enumerate(self.unique):
            slot[i] = s
        self._slot = slot

    def buffer(self, x: jax.Array) -> jax.Array | None:
        if not self.unique:
            return None
        return jnp.zeros((len(self.unique),) + x.shape, x.dtype)

    def record(self, buf: jax.Array | None, index, x: jax.Array) -> jax.Array | None:
        """Store `x` as hidden state `index` (static int or traced scalar) if it was requested."""
        if buf is None:
            return None
        if isinstance(index, (int, np.integer)):
            s = int(self._slot[index])
            return buf if s < 0 else buf.at[s].set(x)
        s = jnp.asarray(self._slot)[index]
        return jax.lax.cond(
            s >= 0, lambda b: jax.lax.dynamic_update_index_in_dim(b, x, jnp.maximum(s, 0), 0), lambda b: b, buf
        )

    def features(self, buf: jax.Array | None) -> jax.Array | None:
        """`[B, T, len(indices) * D]`: the captured states concatenated in request order."""
        if buf is None:
            return None
        return jnp.concatenate([buf[self.unique.index(i)] for i in self.indices], axis=-1)
