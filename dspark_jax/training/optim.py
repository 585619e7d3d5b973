"""Optimiser and learning-rate schedule of the reference trainer (docs/algorithm.md §6.6), in optax.

AdamW (b1 0.9, b2 0.999, eps 1e-8) on fp32 master parameters, gradients clipped to a global norm first.
Schedule over `total` optimizer steps with `W = int(warmup_ratio * total)` warm-up steps: step `i` (0-based)
uses `lr * (i + 1) / W` while `i < W`, then `lr * (1 + cos(pi * (i - W) / (total - W))) / 2` (0 at the end).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import optax


def warmup_cosine(lr: float, total: int, warmup_ratio: float):
    """The reference's per-step learning rate as an optax schedule (a function of the step count)."""
    total = max(int(total), 1)
    warmup = int(warmup_ratio * total)

    def schedule(step):
        i = jnp.asarray(step, jnp.float32)
        ramp = lr * (i + 1) / max(warmup, 1)
        progress = (i - warmup) / max(total - warmup, 1)
        decay = lr * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
        return jnp.where(i < warmup, ramp, decay)

    return schedule


@functools.cache  # one object per setting, so jitted steps taking it as static are reused
def adamw(lr: float, total: int, *, warmup_ratio: float = 0.04, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
          grad_accum: int = 1) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with `warmup_cosine`; `grad_accum > 1` averages that many micro-steps.

    The schedule counts optimizer steps, so with accumulation it advances once per `grad_accum` calls.
    """
    tx = optax.chain(
        optax.clip_by_global_norm(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else optax.identity(),
        optax.adamw(warmup_cosine(lr, total, warmup_ratio), b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay),
    )
    return optax.MultiSteps(tx, every_k_schedule=grad_accum) if grad_accum > 1 else tx
