"""Configuration pieces shared by every family: RoPE settings, `config.json` helpers, sampling settings.

Static configs (hashable, frozen) describe architectures and compiled shapes: changing one compiles a new
program. `SamplingParams` is the traced, per-row counterpart: changing its values never recompiles.
The architecture always comes from the checkpoint's own `config.json`, parsed by its family's package
(`dspark_jax.models.<family>.config`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.errors import ConfigError, InputError


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention type (HF `rope_parameters` semantics).

    `rope_type`: "default", "yarn" (HF generic YaRN, cos/sin scaled by `attention_factor`) or
    "proportional" (Gemma 4 global layers: only the first `partial_rotary_factor * head_dim / 2`
    frequencies are non-zero, exponent denominator is the full head dim).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    max_position_embeddings: int | None = None

def read_json(path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path} not found: a checkpoint directory needs its config.json") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def require(cfg: dict, key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{where}: required field {key!r} is missing")
    return cfg[key]


def parse_rope(rope_dict: dict | None, *, theta: float | None = None, max_position_embeddings: int | None = None) -> RopeConfig:
    """One RoPE entry from a `rope_parameters` dict (5.x) or a legacy `rope_scaling` dict plus `rope_theta`."""
    d = dict(rope_dict or {})
    rope_type = d.get("rope_type") or d.get("type") or "default"
    theta = d.get("rope_theta") if d.get("rope_theta") is not None else theta
    if theta is None:
        raise ConfigError("RoPE settings need rope_theta (top-level or inside rope_parameters)")

    def opt(name, cast=float):
        return cast(d[name]) if d.get(name) is not None else None

    return RopeConfig(
        theta=float(theta),
        rope_type=str(rope_type),
        partial_rotary_factor=float(d.get("partial_rotary_factor", 1.0)),
        factor=opt("factor"),
        original_max_position_embeddings=opt("original_max_position_embeddings", int),
        attention_factor=opt("attention_factor"),
        beta_fast=opt("beta_fast"),
        beta_slow=opt("beta_slow"),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        truncate=bool(d.get("truncate", True)),
        max_position_embeddings=max_position_embeddings,
    )


def rope_dict(rope: RopeConfig) -> dict:
    """A `rope_parameters` entry that `parse_rope` reads back to the same `RopeConfig` (given the same
    `max_position_embeddings`)."""
    d = {"rope_theta": rope.theta, "rope_type": rope.rope_type}
    if rope.partial_rotary_factor != 1.0:
        d["partial_rotary_factor"] = rope.partial_rotary_factor
    for name in ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
                 "mscale_all_dim"):
        if getattr(rope, name) is not None:
            d[name] = getattr(rope, name)
    if not rope.truncate:
        d["truncate"] = False
    return d


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling settings, traced (`[B]` arrays): changing them never recompiles (`sampler`, one per
    request, is the static exception).

    temperature 0 (or anything below 1e-5, `sampling.GREEDY_TEMPERATURE`) means greedy; top_k 0 means no top-k
    filter; top_p 1 means no nucleus filter; confidence_threshold 0 proposes the whole draft block.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    confidence_threshold: jax.Array
    # static (one per request; changing it compiles another program): "rejection" (the paper's speculative
    # sampling) or "coupled" (Gumbel-max noise per position, draft-invariant; docs/algorithm.md §3.6)
    sampler: str = dataclasses.field(default="rejection", metadata=dict(static=True))

    @classmethod
    def create(
        cls,
        batch: int,
        *,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        confidence_threshold=0.0,
        sampler="rejection",
    ) -> SamplingParams:
        """Broadcast scalars or per-row sequences to `[batch]` arrays, validating every value."""
        if sampler not in ("coupled", "rejection"):
            raise InputError(f"sampler={sampler!r} is invalid: expected 'coupled' or 'rejection'")

        def column(name, value, dtype, check, expected):
            arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (batch,)) if np.ndim(value) == 0 else np.asarray(value, dtype=np.float64)
            if arr.shape != (batch,):
                raise InputError(f"{name} must be a scalar or one value per prompt ({batch}), got shape {arr.shape}")
            if not np.all(np.isfinite(arr)) or not np.all(check(arr)):
                raise InputError(f"{name}={value!r} is invalid: expected {expected}")
            return jnp.asarray(arr.astype(dtype))

        return cls(
            temperature=column("temperature", temperature, np.float32, lambda a: a >= 0, "a value >= 0 (0 = greedy)"),
            top_k=column("top_k", top_k, np.int32, lambda a: (a >= 0) & (a == np.round(a)), "an integer >= 0 (0 = off)"),
            top_p=column("top_p", top_p, np.float32, lambda a: (a > 0) & (a <= 1), "a value in (0, 1] (1 = off)"),
            confidence_threshold=column(
                "confidence_threshold", confidence_threshold, np.float32, lambda a: (a >= 0) & (a <= 1), "a value in [0, 1] (0 = off)"
            ),
            sampler=sampler,
        )
