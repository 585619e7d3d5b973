"""How the library's programs are compiled: `jit`, `jax.jit` plus the XLA options each platform needs.

XLA:TPU rewrites a dot whose left operand has one row into an elementwise multiply and a reduction ("dot strength
reduction"). A decoding step at one row per device (batch 1, or a data-sharded batch of one row per device) then
runs every weight product on the vector unit instead of the matrix unit: by XLA:TPU's own cycle estimates 17x
slower for a 4096 x 3072 bf16 projection, and 4x off the HBM roofline over a whole step (docs/tpu.md §6). The
option below keeps those products on the matrix unit. Options are per platform because XLA refuses an option
its backend does not know, so a program's variant is picked by the platform it is compiled for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from dspark_jax import sharding

OPTIONS: dict[str, dict[str, Any]] = {
    "tpu": {"xla_tpu_enable_dot_strength_reduction": False},
}


def options(platform: str) -> dict[str, Any]:
    """The compile options of the library's programs on `platform` ("cpu", "tpu", "gpu")."""
    return dict(OPTIONS.get(platform, {}))


class Program:
    """A jitted program with one `jax.jit` per platform, each carrying that platform's `options`.

    Calls go to the default backend's variant; `lower` picks the variant of the platform being compiled for
    (`sharding.platform()`: the active mesh's devices, so an ahead-of-time lowering under a TPU mesh gets the TPU
    options)."""

    def __init__(self, fun: Callable, **jit_kwargs):
        self._fun = fun
        self._jit_kwargs = jit_kwargs
        self._variants: dict[str, Any] = {}
        self._call = None
        functools.update_wrapper(self, fun)

    def variant(self, platform: str):
        if platform not in self._variants:
            opts = options(platform)
            extra = {"compiler_options": opts} if opts else {}
            self._variants[platform] = jax.jit(self._fun, **self._jit_kwargs, **extra)
        return self._variants[platform]

    def __call__(self, *args, **kwargs):
        if self._call is None:
            self._call = self.variant(jax.default_backend())
        return self._call(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.variant(sharding.platform()).lower(*args, **kwargs)

    def _cache_size(self) -> int:
        return sum(v._cache_size() for v in self._variants.values())


def jit(fun: Callable | None = None, **jit_kwargs):
    """`jax.jit` for the library's programs (same arguments), compiled with `options(platform)`; usable as
    `@jit`, `@jit(static_argnames=...)` or `functools.partial(jit, ...)`."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return Program(fun, **jit_kwargs)
