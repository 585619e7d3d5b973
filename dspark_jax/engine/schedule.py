"""Confidence-scheduled verification (docs/algorithm.md §4.3-§4.5): how many drafts each row sends to the
target in a round, chosen for the whole batch from survival estimates and a cost model of this machine.

Pieces, all pure (the round calls them inside its compiled program):

* `prefix_schedule` — the prefix scheduler (§4.4): candidates `(row, j)` ranked by their survival
  `a_{r,j}` = P(drafts 1..j all accepted), walked in that order while the expected throughput
  `tau / cost` improves; with `early_stop=True` the walk ends at the first candidate that does not improve it,
  which is what keeps rejection sampling exact (§4.5). `early_stop=False` takes the best point of the whole
  walk: only safe on estimates that do not depend on the tokens about to be verified.
* `ScheduleParams` — the traced inputs of the scheduler: the verify-cost profile (`profile.py`-style timing
  in `cost_profile`), the proposer's cost, the STS temperatures and the per-position acceptance prior of
  a calibration (`calibration.json`, `load_calibration`).
* `round_costs` — the cost of a round as a function of how many drafts it verifies, in AR steps.
* `update_estimate` — the per-row acceptance estimate carried across rounds (the information of earlier
  rounds that decides whether a round speculates at all).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.errors import ConfigError

CALIBRATION_FILE = "calibration.json"
# per-position conditional acceptance assumed for an uncalibrated proposer: optimistic, so an uncalibrated
# proposer is tried and its estimate then follows what it actually achieves (update_estimate)
DEFAULT_PRIOR = 0.8
DEFAULT_DRAFT_COST = 0.5  # the proposer's cost in AR steps when not profiled (the built-in draft: ~half a step)
DEFAULT_TOKEN_COST = 0.15  # extra cost per extra verified token per row, in AR steps, when not profiled
EMA_OBSERVED = 0.3  # weight of a fresh observation in the per-row acceptance estimate
EMA_RELAX = 0.1  # pull of an unobserved position's estimate back towards the prior, per round
SCHEDULES = ("auto", "fixed")


def buckets(K: int) -> tuple[int, ...]:
    """Static token budgets per row a round can verify at: 1 (the anchor alone: an AR step), about half the
    block, and `K + 1` (the whole block). Each budget is one copy of the target forward in the compiled round,
    so there are few."""
    return tuple(sorted({1, (K + 2) // 2, K + 1}))


def bucket_index(tokens: jax.Array, K: int) -> jax.Array:
    """Index in `buckets(K)` of the smallest budget holding `tokens` tokens per row."""
    b = jnp.asarray(buckets(K), jnp.int32)
    return jnp.sum(b < tokens).astype(jnp.int32)


class ScheduleParams(NamedTuple):
    """Traced scheduler inputs (changing them never recompiles).

    `verify_cost[i]`: a round verifying `buckets(K)[i]` tokens per row, in AR steps (`verify_cost[0] = 1`);
    `draft_cost`: the proposer's forward, in AR steps; `temperatures [K]`: STS temperatures of the confidence
    logits (ones when uncalibrated); `prior [K]`: per-position conditional acceptance rates."""

    verify_cost: jax.Array
    draft_cost: jax.Array
    temperatures: jax.Array
    prior: jax.Array


# ------------------------------------------------------------------------------------------- the walk


def prefix_schedule(survival: jax.Array, live: jax.Array, cost: jax.Array, *, early_stop: bool = True):
    """Paper Algorithm 1 (docs/algorithm.md §4.4) for one batch.

    `survival [B, K]`: `a_{r,j}`, non-increasing in `j`; `live [B]`: rows that take part (others get 0 and
    count nowhere); `cost [B * K + 1]`: the cost of a round that verifies `n` drafts in all (plus every live
    row's anchor). -> (`lengths [B]` drafts to verify per row, the expected throughput of that choice).

    Start with every live row verifying only its anchor (`tau = R`), then admit candidates by descending `a`
    (ties: smaller `j`, then smaller row, so `(r, j)` never precedes `(r, j - 1)`), each adding `a` to `tau`.
    """
    B, K = survival.shape
    a = jnp.where(live[:, None], jnp.clip(survival.astype(jnp.float32), 0.0, 1.0), 0.0)
    flat = a.reshape(-1)
    j = jnp.tile(jnp.arange(K), B)
    r = jnp.repeat(jnp.arange(B), K)
    order = jnp.lexsort((r, j, -flat))  # last key is the primary one
    a_sorted = flat[order]
    valid = a_sorted > 0
    R = jnp.sum(live).astype(jnp.float32)
    tau = R + jnp.cumsum(jnp.where(valid, a_sorted, 0.0))
    theta = jnp.concatenate([(R / cost[0])[None], tau / cost[1:]])
    theta = jnp.where(jnp.concatenate([jnp.ones((1,), bool), valid]), theta, -jnp.inf)
    if early_stop:
        improves = theta[1:] > theta[:-1]  # candidate n improves on everything admitted before it
        n = jnp.sum(jnp.cumprod(improves.astype(jnp.int32)))
    else:
        n = jnp.argmax(theta)
    admitted = jnp.zeros((B * K,), jnp.int32).at[order].set((jnp.arange(B * K) < n).astype(jnp.int32))
    return jnp.sum(admitted.reshape(B, K), axis=1).astype(jnp.int32), theta[n]


def survival_from_logits(confidence_logits: jax.Array, temperatures: jax.Array) -> jax.Array:
    """Calibrated prefix survival `a_k = prod_{i<=k} sigmoid(l_i / T_i)` (docs/algorithm.md §4.3)."""
    c = jax.nn.sigmoid(confidence_logits.astype(jnp.float32) / temperatures[None, :])
    return jnp.cumprod(c, axis=1)


def round_costs(params: ScheduleParams, live: jax.Array, K: int, *, with_draft: bool = True) -> jax.Array:
    """`cost [B * K + 1]`: a round verifying `n` drafts in all over the live rows, in AR steps: the verify
    profile interpolated at `1 + n / R` tokens per row, plus the proposer's cost."""
    B = live.shape[0]
    R = jnp.maximum(jnp.sum(live), 1).astype(jnp.float32)
    per_row = 1.0 + jnp.arange(B * K + 1, dtype=jnp.float32) / R
    grid = jnp.asarray(buckets(K), jnp.float32)
    verify = jnp.interp(per_row, grid, params.verify_cost.astype(jnp.float32))
    return verify + (params.draft_cost if with_draft else 0.0)


def estimate(state_estimate: jax.Array, prior: jax.Array, K: int) -> jax.Array:
    """The per-row conditional acceptance estimate `[B, K]` (negative entries: no information, the prior)."""
    B, W = state_estimate.shape
    est = jnp.full((B, K), -1.0, jnp.float32).at[:, : min(W, K)].set(state_estimate[:, :K])
    return jnp.where(est < 0, prior[None, :K], est)


def update_estimate(state_estimate, est, prior, proposed, accepted, active) -> jax.Array:
    """Fold one round into the estimate: a position that was verified and reached (every draft before it
    accepted) moves towards its outcome; others relax towards the prior. Keeps `state_estimate`'s width."""
    B, K = est.shape
    k = jnp.arange(K)[None, :]
    observed = (k < proposed[:, None]) & (k <= accepted[:, None]) & active[:, None]
    outcome = (k < accepted[:, None]).astype(jnp.float32)
    new = jnp.where(observed, est + EMA_OBSERVED * (outcome - est), est + EMA_RELAX * (prior[None, :K] - est))
    new = jnp.where(active[:, None], new, est)
    W = state_estimate.shape[1]
    if W <= K:
        return new[:, :W]
    return state_estimate.at[:, :K].set(new)


# ------------------------------------------------------------------------------------------- calibration


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What `dspark-jax calibrate` fits (docs/algorithm.md §4.3): STS temperatures per position (None for a
    proposer without a confidence head) and per-position conditional acceptance rates."""

    temperatures: tuple[float, ...] | None
    acceptance: tuple[float, ...]

    def to_json(self) -> dict:
        return {"temperatures": None if self.temperatures is None else list(self.temperatures),
                "acceptance": list(self.acceptance)}


def calibration_path(directory) -> Path | None:
    """Where a draft directory's calibration lives (None: an in-memory draft)."""
    return None if directory is None else Path(directory) / CALIBRATION_FILE


def load_calibration(directory) -> Calibration | None:
    """`calibration.json` of a draft directory, validated; None if there is none."""
    path = calibration_path(directory)
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        temps = data.get("temperatures")
        acc = [float(x) for x in data["acceptance"]]
        temps = None if temps is None else [float(x) for x in temps]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a calibration file ({e})") from None
    if not acc or not all(0.0 <= x <= 1.0 for x in acc):
        raise ConfigError(f"{path}: acceptance rates must be in [0, 1]")
    if temps is not None and (len(temps) != len(acc) or not all(math.isfinite(t) and t > 0 for t in temps)):
        raise ConfigError(f"{path}: temperatures must be positive, one per position")
    return Calibration(None if temps is None else tuple(temps), tuple(acc))


def _per_position(values, K: int, fill: float) -> np.ndarray:
    out = np.full((K,), fill, np.float32)
    if values:
        v = np.asarray(values, np.float32)[:K]
        out[: len(v)] = v
        out[len(v):] = v[-1]
    return out


# ------------------------------------------------------------------------------------------- costs


def _machine_key() -> str:
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    return f"{dev.platform}:{getattr(dev, 'device_kind', '')}:{cpu}:{os.cpu_count()}"


def _fingerprint(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("DSPARK_JAX_CACHE", Path.home() / ".cache" / "dspark_jax"))


def constant_costs(K: int, draft_cost: float = DEFAULT_DRAFT_COST, token_cost: float = DEFAULT_TOKEN_COST):
    """The cheap fallback: verifying `T` tokens per row costs `1 + token_cost (T - 1)` AR steps."""
    return np.asarray([1.0 + token_cost * (t - 1) for t in buckets(K)], np.float32), float(draft_cost)


def monotone(costs) -> np.ndarray:
    """A profile forced non-decreasing (a larger budget never looks cheaper than a smaller one)."""
    return np.maximum.accumulate(np.asarray(costs, np.float64)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("target_graph", "proposer_graph", "T", "K", "what"))
def _probe(target_graph, target_params, proposer_graph, proposer_params, target_cache, proposer_state, lengths, *, T, K, what):
    from flax import nnx

    from dspark_jax.config import SamplingParams
    from dspark_jax.engine import sampling

    target, proposer = nnx.merge(target_graph, target_params), nnx.merge(proposer_graph, proposer_params)
    B = lengths.shape[0]
    params = SamplingParams(temperature=jnp.zeros((B,), jnp.float32), top_k=jnp.zeros((B,), jnp.int32),
                            top_p=jnp.ones((B,), jnp.float32), confidence_threshold=jnp.zeros((B,), jnp.float32))
    keys = sampling.row_keys(jnp.zeros((B,), jnp.uint32), jnp.arange(B, dtype=jnp.uint32))
    if what == "draft":
        proposal = proposer.propose(proposer_state, lengths % 7, lengths, params, keys, K)
        return jnp.sum(proposal.tokens) + jnp.sum(proposal.num_proposed)
    ids = (jnp.arange(T)[None, :] + lengths[:, None]) % 7
    hidden, _, features = target(ids, lengths, target_cache, capture=proposer.feature_indices)
    p = sampling.probabilities(target.logits(hidden), params)
    token = sampling.sample(keys, p[:, 0])
    new_state = proposer.extend(proposer_state, ids, features, lengths)
    return jnp.sum(token) + sum(jnp.sum(x[..., :1].astype(jnp.float32)) for x in jax.tree.leaves(new_state)[:1])


def profile_costs(target, draft, batch: int, K: int, *, capacity: int = 512, repetitions: int = 64,
                  budget_s: float = 15.0) -> tuple[np.ndarray, float]:
    """Time the verification of 1 and `K + 1` tokens per row and the proposer's forward at batch `batch` on this
    machine (interleaved; the fastest of the repetitions, since other work on the machine only ever adds time),
    in AR steps (the 1-token verification); budgets in between are interpolated. Forced monotone. Stops adding
    repetitions once `budget_s` (compiles included) is spent."""
    t_start = time.perf_counter()
    module, prop = target.module, draft.module
    target_cache = jax.jit(lambda: module.init_cache(batch, capacity, max_block=K + 1))()
    proposer_state = jax.jit(lambda: prop.init_state(batch, capacity))()
    lengths = jnp.full((batch,), capacity // 2, jnp.int32)
    args = (target.graphdef, target.params, draft.graphdef, draft.params, target_cache, proposer_state, lengths)
    arms = [("verify", 1), ("verify", K + 1), ("draft", 1)]  # three compiles; budgets between: interpolated
    for what, t in arms:  # compile (and warm) each probe
        jax.block_until_ready(_probe(*args, T=t, K=K, what=what))
    times = {arm: [] for arm in arms}
    for rep in range(repetitions):
        for arm in arms:  # interleaved
            t0 = time.perf_counter()
            jax.block_until_ready(_probe(*args, T=arm[1], K=K, what=arm[0]))
            times[arm].append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s and rep >= 1:
            break
    best = {arm: float(np.min(v)) for arm, v in times.items()}
    base = best[("verify", 1)]
    full = best[("verify", K + 1)] / base
    verify = monotone([1.0 + (full - 1.0) * (t - 1) / K for t in buckets(K)])
    return verify, best[("draft", 1)] / base


def schedule_costs(target, draft, batch: int, K: int, *, profile: bool | None = None) -> tuple[np.ndarray, float]:
    """The cost model for `batch` rows and draft length `K`: the on-disk profile of this machine, target,
    draft and dtype (profiled on first use), or the constant-ratio fallback when profiling is off
    (`profile=False`, or the environment variable `DSPARK_JAX_PROFILE=0`)."""
    if profile is None:  # by default, profile checkpoints loaded from disk (not in-memory random models)
        profile = os.environ.get("DSPARK_JAX_PROFILE", "1") != "0" and getattr(target, "directory", None) is not None
    if not profile:
        return constant_costs(K)
    key = _fingerprint("v3", _machine_key(), repr(target.config), str(target.dtype), repr(draft.config), str(draft.dtype),
                       batch, K)
    path = cache_dir() / "verify_cost.json"
    try:
        table = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        table = {}
    if key in table:
        entry = table[key]
        return np.asarray(entry["verify"], np.float32), float(entry["draft"])
    verify, draft_cost = profile_costs(target, draft, batch, K)
    table[key] = {"verify": [float(x) for x in verify], "draft": float(draft_cost), "batch": batch, "K": K,
                  "machine": _machine_key()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    except OSError:
        pass
    return verify, draft_cost


def params_for(target, draft, batch: int, K: int, *, profile: bool | None = None,
               costs: tuple[np.ndarray, float] | None = None) -> ScheduleParams:
    """Everything the compiled round needs for `schedule="auto"`, as traced arrays."""
    verify, draft_cost = costs if costs is not None else schedule_costs(target, draft, batch, K, profile=profile)
    cal = load_calibration(getattr(draft, "directory", None))
    temps = _per_position(cal.temperatures if cal is not None and cal.temperatures else None, K, 1.0)
    prior = _per_position(cal.acceptance if cal is not None else None, K, DEFAULT_PRIOR)
    return ScheduleParams(jnp.asarray(verify, jnp.float32), jnp.asarray(draft_cost, jnp.float32),
                          jnp.asarray(temps), jnp.asarray(prior))
