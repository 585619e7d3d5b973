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

from dspark_jax import compiling
from dspark_jax.errors import ConfigError

CALIBRATION_FILE = "calibration.json"
# per-position conditional acceptance assumed for an uncalibrated proposer: optimistic, so an uncalibrated
# proposer is tried and its estimate then follows what it actually achieves (update_estimate)
DEFAULT_PRIOR = 0.8
DEFAULT_DRAFT_COST = 0.5  # the proposer's cost in AR steps when not profiled (the built-in draft: ~half a step)
DEFAULT_TOKEN_COST = 0.15  # extra cost per extra verified token per row, in AR steps, when not profiled
EMA_OBSERVED = 0.4  # weight of a fresh observation in the per-row acceptance estimate
EMA_EVIDENCE = 0.1  # pull of an unverified position's estimate towards the draft's own prediction of it
# probe rounds (docs/algorithm.md §4.5): a row whose estimate says speculation does not pay is still sent
# through a whole-block round after PROBE_FIRST plain steps, then after doubling intervals up to PROBE_MAX
PROBE_FIRST = 2
PROBE_MAX = 64
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


def update_estimate(state_estimate, est, prior, proposed, accepted, active, evidence=None) -> jax.Array:
    """Fold one round into the estimate: a position that was verified and reached (every draft before it
    accepted) moves towards its outcome; a position the draft predicted (`evidence [B, K]`, negative where
    none: `round_evidence`) but that was not verified moves towards that prediction; others keep their
    value. Keeps `state_estimate`'s width."""
    B, K = est.shape
    k = jnp.arange(K)[None, :]
    observed = (k < proposed[:, None]) & (k <= accepted[:, None]) & active[:, None]
    outcome = (k < accepted[:, None]).astype(jnp.float32)
    unobserved = est  # no information: unchanged (probe rounds, not a drift, bring a row back, update_probe)
    if evidence is not None:
        unobserved = jnp.where(evidence >= 0, est + EMA_EVIDENCE * (evidence - est), unobserved)
    new = jnp.where(observed, est + EMA_OBSERVED * (outcome - est), unobserved)
    new = jnp.where(active[:, None], new, est)
    W = state_estimate.shape[1]
    if W <= K:
        return new[:, :W]
    return state_estimate.at[:, :K].set(new)


def round_evidence(proposal, temperatures: jax.Array, params) -> jax.Array | None:
    """The draft's own per-position prediction of acceptance in this round, `[B, K]` (negative: none), fed
    to `update_estimate`: the calibrated confidences `sigmoid(l_k / T_k)` of a confidence head (DSpark), else
    the largest probability of the draft's distribution at each position (DFlash, EAGLE-3, MTP) for rows
    that sample; a greedy row's draft distributions are one-hot, so they say nothing (-1)."""
    if proposal.confidence_logits is not None:
        K = proposal.confidence_logits.shape[1]
        return jax.nn.sigmoid(proposal.confidence_logits.astype(jnp.float32) / temperatures[None, :K])
    if proposal.probs is None:
        return None
    from dspark_jax.engine import sampling

    top = jnp.max(proposal.probs, axis=-1).astype(jnp.float32)
    return jnp.where(sampling.is_greedy(params.temperature)[:, None], -1.0, top)


def update_probe(probe: jax.Array, live: jax.Array, pays: jax.Array, probe_round: jax.Array,
                 good: jax.Array) -> jax.Array:
    """`probe [B, 2]` = (rounds until the next probe, the interval) after a round. While speculation pays by
    the estimate no probe is needed and the interval restarts at PROBE_FIRST; after a probe round (every live
    row verified its whole proposal) a row's interval restarts at PROBE_FIRST if the probe paid (`good [B]`:
    its tokens beat the predicted cost of the round, in AR steps) and doubles otherwise, up to PROBE_MAX; a plain
    step counts down. So a draft that never pays costs one whole-block round per PROBE_MAX rounds once backed
    off, and one that does is probed every PROBE_FIRST + 1 rounds until its estimate says it pays."""
    wait, interval = probe[:, 0], probe[:, 1]
    after_probe = jnp.where(good, PROBE_FIRST, jnp.minimum(2 * interval, PROBE_MAX))
    interval = jnp.where(pays, PROBE_FIRST, jnp.where(probe_round, after_probe, interval))
    wait = jnp.where(pays | probe_round, interval, wait - 1)
    return jnp.where(live[:, None], jnp.stack([wait, interval], axis=1), probe)


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
#
# Two cost models (docs/algorithm.md §4.4). The default, `model_costs`, is deterministic: XLA's cost analysis
# (flops, bytes accessed) of the compiled verify and draft programs, lowered on abstract shapes and never run,
# turned into seconds by a fixed device model. A measured profile exists only when asked for
# (`dspark-jax profile`, `dspark_jax.profile`): it is stored on disk and then preferred for its exact key.

# device kind (lower-case substring of `jax.Device.device_kind`, first match) -> (peak flop/s, memory
# bytes/s, seconds per matrix product). Accelerators: the vendor's dense bf16 peak and HBM bandwidth, and a
# kernel launch per matrix product. XLA:CPU: effective rates fitted once to the built-in pair's measured
# profiles on a 2-core Xeon (docs/algorithm.md §4.4), one fixed triple for every CPU: small decode programs
# there cost about a fixed time per matrix product (a layer's worth of kernels around it), far more than
# their flops.
DEVICE_MODELS = (
    ("h200", (989e12, 4.8e12, 5e-6)),
    ("h100", (989e12, 3.35e12, 5e-6)),
    ("a100", (312e12, 2.0e12, 5e-6)),
    ("l4", (121e12, 0.3e12, 5e-6)),
    ("tpu v6", (918e12, 1.64e12, 5e-6)),
    ("tpu v5 lite", (197e12, 0.82e12, 5e-6)),
    ("tpu v5e", (197e12, 0.82e12, 5e-6)),
    ("tpu v5", (459e12, 2.76e12, 5e-6)),
    ("tpu v4", (275e12, 1.2e12, 5e-6)),
    ("cpu", (1e12, 1e11, 3e-5)),
)
GENERIC_ACCELERATOR = (100e12, 1.0e12, 5e-6)  # a GPU/TPU kind missing from the table
ANALYSIS_CAPACITY = 512  # cache positions of the analysed programs (the cache extent the model assumes)
PROFILES_FILE = "profiles.json"


def device_model(device=None) -> tuple[str, tuple[float, float, float]]:
    """(`platform:device_kind`, (peak flop/s, bytes/s, s per matrix product)) of `device` (default: the first)."""
    dev = device if device is not None else jax.devices()[0]
    kind = str(getattr(dev, "device_kind", "") or "")
    name = f"{dev.platform}:{kind}"
    if dev.platform == "cpu":
        return name, dict(DEVICE_MODELS)["cpu"]
    low = kind.lower()
    for sub, rates in DEVICE_MODELS:
        if sub != "cpu" and sub in low:
            return name, rates
    return name, GENERIC_ACCELERATOR


def _literal(v):
    from jax.extend.core import Literal

    return isinstance(v, Literal)


def _eval_unrolled(jaxpr, consts, *args):
    """Evaluate `jaxpr` with every `scan` replaced by its body repeated `length` times (recursing into nested
    jaxprs), so that XLA's cost analysis, which counts a loop body once, counts every trip."""
    from jax.extend.core import DropVar

    env = {}
    read = lambda v: v.val if _literal(v) else env[v]
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name, params = eqn.primitive.name, eqn.params
        if name == "scan":
            outs = _scan_unrolled(params, ins)
        elif name in ("pjit", "jit", "closed_call") and "jaxpr" in params:
            outs = _eval_unrolled(params["jaxpr"].jaxpr, params["jaxpr"].consts, *ins)
        elif name == "custom_jvp_call":
            outs = _eval_unrolled(params["call_jaxpr"].jaxpr, params["call_jaxpr"].consts, *ins)
        elif name in ("checkpoint", "remat"):
            outs = _eval_unrolled(params["jaxpr"], (), *ins)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _scan_unrolled(params, ins):
    body, n = params["jaxpr"], params["length"]
    nc, ncarry = params["num_consts"], params["num_carry"]
    consts, carry, xs = ins[:nc], list(ins[nc: nc + ncarry]), ins[nc + ncarry:]
    ys = []
    for i in (reversed(range(n)) if params["reverse"] else range(n)):
        out = _eval_unrolled(body.jaxpr, body.consts, *consts, *carry, *[x[i] for x in xs])
        carry, y = out[:ncarry], out[ncarry:]
        ys.append(y)
    if params["reverse"]:
        ys.reverse()
    n_ys = len(body.jaxpr.outvars) - ncarry
    stacked = [jnp.stack([y[k] for y in ys]) if ys else None for k in range(n_ys)]
    if not ys:
        stacked = [jnp.zeros((0,) + tuple(v.aval.shape), v.aval.dtype) for v in body.jaxpr.outvars[ncarry:]]
    return carry + stacked


def analyse(fn, *abstract_args) -> dict:
    """XLA's cost analysis of `fn` lowered for `abstract_args` (ShapeDtypeStructs; nothing is compiled or run),
    with its scans unrolled first (`_eval_unrolled`). -> {"flops", "bytes", "dots", "ops"}: flops and bytes
    accessed as XLA's HLO cost analysis counts them on the lowered (unfused) program, its matrix products
    and its operations.
    Loops left (`while`: zero-or-one-trip loops, dynamic bounds) count their body once."""
    import re

    closed = jax.make_jaxpr(fn)(*abstract_args)
    flat = jax.tree.leaves(abstract_args)
    lowered = jax.jit(lambda *xs: _eval_unrolled(closed.jaxpr, closed.consts, *xs)).lower(*flat)
    ca = lowered.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    text = lowered.as_text()
    ops, dots = len(re.findall(r"= stablehlo\.", text)), len(re.findall(r"= stablehlo\.dot_general", text))
    return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0)), "dots": dots,
            "ops": ops}


def _programs(target, draft, batch: int, K: int, capacity: int):
    """The programs a round is made of, as (name, function, abstract arguments): the target's verification of
    each budget `T` of `buckets(K)` (the forward at `T` tokens per row, its distributions, the proposer's
    context extended) and the proposer's drafting of `K` tokens."""
    from flax import nnx

    from dspark_jax.config import SamplingParams
    from dspark_jax.engine import sampling

    module, prop = target.module, draft.module
    tg, dg = target.graphdef, draft.graphdef
    cache = jax.eval_shape(lambda: module.init_cache(batch, capacity, max_block=K + 1))
    state = jax.eval_shape(lambda: prop.init_state(batch, capacity))
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    tp, dp = abstract(target.params), abstract(draft.params)

    def setting():
        params = SamplingParams(temperature=jnp.zeros((batch,), jnp.float32), top_k=jnp.zeros((batch,), jnp.int32),
                                top_p=jnp.ones((batch,), jnp.float32),
                                confidence_threshold=jnp.zeros((batch,), jnp.float32))
        return params, sampling.row_keys(jnp.zeros((batch,), jnp.uint32), jnp.arange(batch, dtype=jnp.uint32))

    def verify(T):
        def fn(tp, dp, cache, state, lengths):
            target, proposer = nnx.merge(tg, tp), nnx.merge(dg, dp)
            params, _ = setting()
            ids = (jnp.arange(T)[None, :] + lengths[:, None]) % 7
            hidden, cache, features = target(ids, lengths, cache, capture=proposer.feature_indices)
            probs = sampling.probabilities(target.logits(hidden), params)
            return probs, cache, proposer.extend(state, ids, features, lengths)
        return fn

    def propose(tp, dp, cache, state, lengths):
        proposer = nnx.merge(dg, dp)
        params, keys = setting()
        return proposer.propose(state, lengths % 7, lengths, params, keys, K)

    args = (tp, dp, cache, state, lengths)
    return [(f"verify {t}", verify(t), args) for t in buckets(K)] + [("draft", propose, args)]


def _model_key(target, draft, batch: int, K: int) -> str:
    dev, _ = device_model()
    return _fingerprint("v4", jax.default_backend(), dev, repr(target.config), str(target.dtype), repr(draft.config),
                        str(draft.dtype), batch, K)


@dataclasses.dataclass(frozen=True)
class Costs:
    """A cost model for one (backend, device kind, target, draft, batch, K): `verify[i]` the verification of
    `buckets(K)[i]` tokens per row and `draft` the proposer's forward, in AR steps; `source` says where they
    come from ("compiled-program model", "constant model" or "profile <path>"); `detail`: the analysed flops,
    bytes and seconds per program (model) or the measured seconds (profile)."""

    verify: tuple[float, ...]
    draft: float
    source: str
    detail: dict = dataclasses.field(default_factory=dict, compare=False)

    def __iter__(self):  # unpacks as (verify array, draft cost), like the constant model
        return iter((np.asarray(self.verify, np.float32), float(self.draft)))


_MODEL_CACHE: dict[str, Costs] = {}


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


@functools.partial(compiling.jit, static_argnames=("target_graph", "proposer_graph", "T", "K", "what"))
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




def model_costs(target, draft, batch: int, K: int, *, capacity: int = ANALYSIS_CAPACITY) -> Costs:
    """The deterministic cost model (docs/algorithm.md §4.4): each program of a round (`_programs`) analysed
    by XLA (`analyse`: flops, bytes accessed and matrix products, scans unrolled, nothing run) and priced by
    the device model (`device_model`) as `flops / peak + bytes / bandwidth + products * seconds per product`,
    in units of the 1-token verification (an AR step). Same backend, device kind, models, batch and K: same
    numbers. Cached in-process."""
    key = _model_key(target, draft, batch, K) + f":{capacity}"
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    dev, (peak, bandwidth, per_dot) = device_model()
    detail = {"device": dev, "peak_flops": peak, "bandwidth": bandwidth, "seconds_per_dot": per_dot,
              "capacity": capacity, "batch": batch, "K": K}
    seconds = {}
    for name, fn, args in _programs(target, draft, batch, K, capacity):
        a = analyse(fn, *args)
        seconds[name] = a["flops"] / peak + a["bytes"] / bandwidth + a["dots"] * per_dot
        detail[name] = dict(a, seconds=seconds[name])
    base = seconds["verify 1"]
    verify = monotone([seconds[f"verify {t}"] / base for t in buckets(K)])
    costs = Costs(tuple(float(x) for x in verify), float(seconds["draft"] / base), "compiled-program model", detail)
    _MODEL_CACHE[key] = costs
    return costs


def profiles_path() -> Path:
    """Where measured profiles are stored: `$DSPARK_JAX_CACHE/profiles.json` (default ~/.cache/dspark_jax)."""
    return cache_dir() / PROFILES_FILE


def _read_profiles() -> dict:
    path = profiles_path()
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, OSError):
        return {}


def stored_profile(target, draft, batch: int, K: int) -> Costs | None:
    """The measured profile stored for exactly this backend, device kind, target, draft, batch and K, if any."""
    entry = _read_profiles().get(_model_key(target, draft, batch, K))
    if entry is None:
        return None
    try:
        verify = tuple(float(x) for x in entry["verify"])
        if len(verify) != len(buckets(K)):
            return None
        return Costs(verify, float(entry["draft"]), f"profile {profiles_path()}", entry)
    except (KeyError, TypeError, ValueError):
        return None


def measure_profile(target, draft, batch: int, K: int, *, budget_s: float = 15.0) -> tuple[Costs, Path]:
    """Time the round's programs on this machine (`profile_costs`) and store the result under its key in
    `profiles_path()`. -> (the measured costs, the file written). Explicit only: nothing calls it implicitly."""
    verify, draft_cost = profile_costs(target, draft, batch, K, budget_s=budget_s)
    dev, _ = device_model()
    entry = {"verify": [float(x) for x in verify], "draft": float(draft_cost), "batch": batch, "K": K,
             "backend": jax.default_backend(), "device": dev, "machine": _machine_key(),
             "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
             "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    table = _read_profiles()
    table[_model_key(target, draft, batch, K)] = entry
    path = profiles_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)
    return Costs(tuple(entry["verify"]), entry["draft"], f"profile {path}", entry), path


def schedule_costs(target, draft, batch: int, K: int, *, model: str | None = None) -> Costs:
    """The cost model `schedule="auto"` uses for `batch` rows and draft length `K`: a stored profile for
    exactly this key if `dspark-jax profile` measured one, else the deterministic compiled-program model.
    `model="compiled"` ignores stored profiles; `model="constant"` uses the constant-ratio model (no analysis
    compiles). Unset, the environment variable `DSPARK_JAX_PROFILE` decides: `0` constant (the test suite sets
    it), `model` compiled (multi-process `batch`: every host the same numbers), else default. Nothing is timed
    here."""
    if model is None:
        model = {"0": "constant", "model": "compiled"}.get(os.environ.get("DSPARK_JAX_PROFILE", ""), "default")
    if model not in ("default", "constant", "compiled"):
        raise ConfigError(f"cost model {model!r} must be 'default', 'compiled' or 'constant'")
    if model == "constant":
        verify, draft_cost = constant_costs(K)
        return Costs(tuple(float(x) for x in verify), float(draft_cost), "constant model")
    if model == "default":
        stored = stored_profile(target, draft, batch, K)
        if stored is not None:
            return stored
    return model_costs(target, draft, batch, K)


def describe_costs(costs: Costs, batch: int, K: int) -> str:
    """The one line `generate` / `stream` print (stderr, once per target, draft, batch and K): which cost
    model `schedule="auto"` uses and what it says."""
    sizes = "/".join(str(t) for t in buckets(K))
    values = "/".join(f"{v:.2f}" for v in costs.verify)
    how = ("measured by `dspark-jax profile`" if costs.source.startswith("profile")
           else "deterministic, nothing timed; `dspark-jax profile` measures this machine instead")
    return (f"dspark-jax: schedule=auto cost model: {costs.source} ({how}); batch {batch}, K {K}: verifying "
            f"{sizes} tokens per row = {values} AR steps, drafting = {costs.draft:.2f}")


def describe_plain(plan: ScheduleParams, K: int) -> str:
    """Why a call ran plain AR steps only: the predicted cost of a whole-block round against its expected
    tokens, from the acceptance prior (the estimate every row starts from)."""
    cost = float(plan.draft_cost) + float(np.asarray(plan.verify_cost)[-1])
    prior = np.asarray(plan.prior, np.float64)[:K]
    expected = 1.0 + float(np.sum(np.cumprod(prior)))
    return (f"schedule=auto chose plain AR steps for every round: a speculative round was predicted to cost "
            f"{cost:.2f} AR steps (drafting {float(plan.draft_cost):.2f} + verifying {K + 1} tokens per row "
            f"{float(np.asarray(plan.verify_cost)[-1]):.2f}) for an expected {expected:.2f} tokens (per-position "
            f"acceptance {' '.join(f'{x:.2f}' for x in prior)}), against 1 token per AR step")


def params_for(target, draft, batch: int, K: int, *, costs=None) -> ScheduleParams:
    """Everything the compiled round needs for `schedule="auto"`, as traced arrays."""
    verify, draft_cost = costs if costs is not None else schedule_costs(target, draft, batch, K)
    cal = load_calibration(getattr(draft, "directory", None))
    temps = _per_position(cal.temperatures if cal is not None and cal.temperatures else None, K, 1.0)
    prior = _per_position(cal.acceptance if cal is not None else None, K, DEFAULT_PRIOR)
    return ScheduleParams(jnp.asarray(verify, jnp.float32), jnp.asarray(draft_cost, jnp.float32),
                          jnp.asarray(temps), jnp.asarray(prior))
