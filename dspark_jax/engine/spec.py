"""Speculative decoding: the compiled speculative round and the whole generation as one `while_loop`.

One round, for every row at once and inside one `jax.jit` with a static draft length `K`: the proposer
drafts `K` tokens after each row's anchor (and how many of them it proposes) -> the target verifies
`[anchor, d_1..d_K]` at per-row offsets, capturing the features the proposer reads -> rejection sampling
(`verify`) -> next token -> commit by length: both the target cache and the proposer's state were written
ahead, and `lengths` alone decides what counts (docs/caches.md) -> per-row statistics.

The engine knows the target and the proposer only through their contracts (`engine.contracts`); their
caches and state are opaque pytrees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import compiling
from dspark_jax.engine import decode, sampling
from dspark_jax.engine import schedule as sched
from dspark_jax.engine.decode import Requests
from dspark_jax.engine.schedule import ScheduleParams
from dspark_jax.engine.verify import is_stop, verify
from dspark_jax.layers import stack


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    target_cache: Any  # opaque, the target's
    proposer_state: Any  # opaque, the proposer's
    lengths: jax.Array  # i32[B] committed positions (shared by both caches)
    pending: jax.Array  # i32[B] the anchor: last sampled token, at position `lengths`, in no cache yet
    out: jax.Array  # i32[B, O] generated tokens
    count: jax.Array  # i32[B]
    done: jax.Array  # bool[B]
    rounds: jax.Array  # i32[B]
    acceptance_lengths: jax.Array  # i32[B, R] tokens gained per round (bonus included; a on a stop)
    proposal_lengths: jax.Array  # i32[B, R] drafts sent to the target per round
    accepted_lengths: jax.Array  # i32[B, R] accepted drafts per round
    req: Requests
    # f32[B, S] per-row, per-position conditional acceptance estimate from earlier rounds (negative: none yet);
    # read by `schedule="auto"` (engine/schedule.py), width S >= K or the missing positions use the prior
    acceptance_estimate: jax.Array | None = None
    # i32[B, 2] (rounds until this row's next probe round, its current probe interval): `schedule="auto"`
    # speculates now and then even where the estimate says it does not pay (engine/schedule.py, probes)
    probe: jax.Array | None = None


def _round_limit(state_lengths, req: Requests):
    """Rows keep going while their anchor position is below `prompt + max_new` (docs/algorithm.md §5.5)."""
    return state_lengths < req.prompt_lens + req.max_new


def start(target, proposer, req: Requests, K: int, capacity: int, out_len: int, chunk: int) -> SpecState:
    """Prefill the target chunk by chunk, giving each chunk (and the features the proposer reads) to the
    proposer; sample the first anchor."""
    B = req.tokens.shape[0]
    first, target_cache, proposer_state = decode.prefill(
        target, req, target.init_cache(B, capacity, max_block=K + 1), chunk=chunk, capture=proposer.feature_indices,
        consume=proposer.extend, consumer_state=proposer.init_state(B, capacity),
    )
    return begin(target_cache, proposer_state, first, req, out_len)


ESTIMATE_SLOTS = 16


def begin(target_cache, proposer_state, first: jax.Array, req: Requests, out_len: int, *,
          estimate_slots: int = ESTIMATE_SLOTS) -> SpecState:
    """The state after prefill: every row's first token sampled, no round run yet. Every per-row field of
    `SpecState` gets its initial value here (continuous batching resets a slot with it)."""
    B = first.shape[0]
    live = req.max_new > 0
    count = live.astype(jnp.int32)
    out = decode.append_tokens(jnp.full((B, out_len), decode.PAD, jnp.int32), jnp.zeros((B,), jnp.int32), first[:, None], count)
    done = ~live | is_stop(first, req.stop_ids) | ~_round_limit(req.prompt_lens, req)
    zeros = jnp.zeros((B, out_len), jnp.int32)
    return SpecState(
        target_cache=target_cache,
        proposer_state=proposer_state,
        lengths=req.prompt_lens,
        pending=first,
        out=out,
        count=count,
        done=done,
        rounds=jnp.zeros((B,), jnp.int32),
        acceptance_lengths=zeros,
        proposal_lengths=zeros,
        accepted_lengths=zeros,
        req=req,
        acceptance_estimate=jnp.full((B, estimate_slots), -1.0, jnp.float32),
        probe=jnp.full((B, 2), sched.PROBE_FIRST, jnp.int32),
    )


def _verify_block(target, proposer, state: SpecState, drafts, probs, num_proposed, T: int):
    """Verify each row's anchor and its first `T - 1` drafts (a static token budget; only the first
    `num_proposed <= T - 1` drafts count). -> (target cache, proposer state, accepted, next token, terminated).

    `T = 1` is a plain AR step: the target's next token from its own distribution (the same key as a round
    with nothing proposed), and the proposer's context extended by the anchor."""
    req = state.req
    B = state.pending.shape[0]
    verify_ids = jnp.concatenate([state.pending[:, None], drafts[:, : T - 1]], axis=1)  # [B, T]
    with jax.named_scope("target_forward"):
        hidden, target_cache, features = target(verify_ids, state.lengths, state.target_cache, capture=proposer.feature_indices)
    with jax.named_scope("target_probs"):
        p_target = sampling.probabilities(target.logits(hidden), req.sampling)  # [B, T, V]
    with jax.named_scope("accept"):
        if T == 1:
            accepted = jnp.zeros((B,), jnp.int32)
            terminated = jnp.zeros((B,), bool)
            next_token = sampling.token_at(p_target[:, 0], req.sampling, req.keys, state.lengths + 1,
                                           sampling.SALT_RESIDUAL, sampling.all_greedy(req.sampling))
        else:
            accepted, next_token, terminated = verify(
                drafts[:, : T - 1], None if probs is None else probs[:, : T - 1], p_target, jnp.minimum(num_proposed, T - 1),
                req.stop_ids, req.keys, state.lengths, greedy=sampling.all_greedy(req.sampling),
                sampler=req.sampling.sampler,
            )
    with jax.named_scope("extend"):
        proposer_state = proposer.extend(state.proposer_state, verify_ids, features, state.lengths)
    return target_cache, proposer_state, accepted, next_token, terminated


def _commit(state: SpecState, K: int, capacity: int, drafts, scheduled, verified, estimate=None,
            probe=None) -> SpecState:
    """Bookkeeping after verification (docs/caches.md: `lengths` alone decides what counts)."""
    target_cache, proposer_state, accepted, next_token, terminated = verified
    req = state.req
    B = state.pending.shape[0]
    active = ~state.done
    emitted = jnp.where(terminated, accepted, accepted + 1)
    new_tokens = jnp.where(jnp.arange(K + 1)[None, :] < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), next_token[:, None])
    out = decode.append_tokens(state.out, state.count, new_tokens, jnp.where(active, emitted, 0))
    lengths = state.lengths + jnp.where(active, accepted + 1, 0)
    count = state.count + jnp.where(active, emitted, 0)
    round_idx = jnp.where(active, state.rounds, state.out.shape[1])
    rows = jnp.arange(B)

    def record(arr, value):
        return arr.at[rows, round_idx].set(value, mode="drop")

    done = state.done | (
        active
        & (terminated | is_stop(next_token, req.stop_ids) | ~_round_limit(lengths, req) | (lengths + K + 1 > capacity))
    )
    return dataclasses.replace(
        state,
        target_cache=target_cache,
        proposer_state=proposer_state,
        lengths=lengths,
        pending=jnp.where(active, next_token, state.pending),
        out=out,
        count=count,
        done=done,
        rounds=state.rounds + active.astype(jnp.int32),
        acceptance_lengths=record(state.acceptance_lengths, emitted),
        proposal_lengths=record(state.proposal_lengths, jnp.where(terminated, accepted, scheduled)),
        accepted_lengths=record(state.accepted_lengths, accepted),
        acceptance_estimate=state.acceptance_estimate if estimate is None else estimate,
        probe=state.probe if probe is None else probe,
    )


def step(target, proposer, state: SpecState, K: int, capacity: int, *, schedule: ScheduleParams | None = None) -> SpecState:
    """One speculative round for every row; finished rows (`state.done`) are left unchanged.

    `schedule=None` ("fixed"): every row sends its whole proposal (the block, or its confidence-threshold
    prefix) and the target verifies `K + 1` tokens. With `ScheduleParams` ("auto", docs/algorithm.md §4.5):
    the round first decides from earlier rounds' information alone (the per-row acceptance estimate) whether
    speculation can pay for this batch; if not it runs as a plain AR step with no draft forward (the
    proposer's context is still extended). Otherwise the proposer drafts, the prefix scheduler (early
    stopping) gives each live row its number of drafts to verify, possibly 0, the round takes the smallest
    static budget of `schedule.buckets(K)` that holds them, and every live row verifies as much of its
    proposal as that budget holds."""
    req = state.req
    if schedule is None:
        with jax.named_scope("propose"):
            proposal = proposer.propose(state.proposer_state, state.pending, state.lengths, req.sampling, req.keys, K)
        with jax.named_scope("verify"):
            verified = _verify_block(target, proposer, state, proposal.tokens, proposal.probs, proposal.num_proposed, K + 1)
        with jax.named_scope("commit"):
            return _commit(state, K, capacity, proposal.tokens, proposal.num_proposed, verified)

    live = ~state.done
    est = sched.estimate(state.acceptance_estimate, schedule.prior, K)
    with jax.named_scope("schedule"):
        costs = sched.round_costs(schedule, live, K)
        # earlier rounds only: non-anticipating, so the global best of the walk is safe here (§4.5)
        lengths_est, theta_est = sched.prefix_schedule(jnp.cumprod(est, axis=1), live, costs, early_stop=False)
        R = jnp.sum(live).astype(jnp.float32)
        pays = (theta_est > R / schedule.verify_cost[0]) & jnp.any(lengths_est > 0)
        # a probe round: the estimate says no, but a live row's probe is due (round counts only: exact, §4.5)
        probe = ~pays & jnp.any(live & (state.probe[:, 0] <= 0))
        speculate = pays | probe
    B = state.pending.shape[0]

    # Both kinds of round, and each verify budget below, are loops of zero or one trips
    # (`decode.at_most_once`), not `lax.cond`/`lax.switch`: a branch would return a new copy of every cache
    # it carries, each round (docs/caches.md §10).
    def ar_round(state):
        drafts = jnp.zeros((B, K), jnp.int32)
        verified = _verify_block(target, proposer, state, drafts, None, jnp.zeros((B,), jnp.int32), 1)
        zero = jnp.zeros((B,), jnp.int32)
        new_est = sched.update_estimate(state.acceptance_estimate, est, schedule.prior, zero, zero, live)
        return _commit(state, K, capacity, drafts, zero, verified, new_est,
                       sched.update_probe(state.probe, live, pays, probe, zero > 0))

    def spec_round(state):
        with jax.named_scope("propose"):
            proposal = proposer.propose(state.proposer_state, state.pending, state.lengths, req.sampling, req.keys, K)
        with jax.named_scope("schedule"):
            if proposal.confidence_logits is not None:
                survival = sched.survival_from_logits(proposal.confidence_logits, schedule.temperatures)
            else:
                survival = jnp.cumprod(est, axis=1)
            # early stopping: admitting draft k never depends on draft k itself (§4.5)
            lengths, _ = sched.prefix_schedule(survival, live, costs, early_stop=True)
            lengths = jnp.where(live, jnp.minimum(lengths, proposal.num_proposed), 0)
            which = sched.bucket_index(jnp.max(lengths) + 1, K)
            which = jnp.where(probe, len(sched.buckets(K)) - 1, which)  # a probe verifies whole proposals
            # the budget is paid for every row: each live row verifies what it holds of its proposal (§4.5)
            budget = jnp.asarray(sched.buckets(K), jnp.int32)[which] - 1
            scheduled = jnp.where(live, jnp.minimum(budget, proposal.num_proposed), 0).astype(jnp.int32)
        with jax.named_scope("verify"):
            # the carry: the state's caches (updated in place) and the verdict (small)
            zero = jnp.zeros((B,), jnp.int32)
            carry = (state.target_cache, state.proposer_state, zero, zero, jnp.zeros((B,), bool))
            for i, t in enumerate(sched.buckets(K)):
                def verify_at(c, t=t):
                    at = dataclasses.replace(state, target_cache=c[0], proposer_state=c[1])
                    return _verify_block(target, proposer, at, proposal.tokens, proposal.probs, scheduled, t)
                carry = decode.at_most_once(which == i, verify_at, carry)
        with jax.named_scope("commit"):
            accepted = carry[2]
            evidence = sched.round_evidence(proposal, schedule.temperatures, req.sampling)
            new_est = sched.update_estimate(state.acceptance_estimate, est, schedule.prior, scheduled, accepted, live,
                                            evidence)
            # a probe that paid (its tokens beat a whole-block round's predicted cost): probe again soon
            full = schedule.draft_cost + schedule.verify_cost[-1]
            good = (scheduled > 0) & ((accepted + 1) * schedule.verify_cost[0] > full)
            return _commit(state, K, capacity, proposal.tokens, scheduled, carry, new_est,
                           sched.update_probe(state.probe, live, pays, probe, good))

    state = decode.at_most_once(speculate, spec_round, state)
    return decode.at_most_once(~speculate, ar_round, state)


def _merge(target_graph, target_params, proposer_graph, proposer_params):
    return nnx.merge(target_graph, target_params), nnx.merge(proposer_graph, proposer_params)


STATIC = ("target_graph", "proposer_graph", "K", "capacity", "out_len", "chunk")


@functools.partial(compiling.jit, static_argnames=STATIC + ("unroll_layers",))
def generate_loop(target_graph, target_params, proposer_graph, proposer_params, req: Requests, *, K, capacity, out_len,
                  chunk, unroll_layers: bool = False, schedule: ScheduleParams | None = None):
    """Prefill and run speculative rounds for every row to completion inside one compiled `while_loop`.

    `unroll_layers`: the rounds run the layers unrolled on weights sliced once (`layers.stack.unrolled`).
    `schedule`: None for fixed-length rounds, traced `ScheduleParams` for scheduled ones (`step`)."""
    target, proposer = _merge(target_graph, target_params, proposer_graph, proposer_params)
    state = start(target, proposer, req, K, capacity, out_len, chunk)
    with stack.unrolled(target, proposer) if unroll_layers else contextlib.nullcontext():
        return jax.lax.while_loop(lambda s: ~jnp.all(s.done), lambda s: step(target, proposer, s, K, capacity, schedule=schedule),
                                   state)


@functools.partial(compiling.jit, static_argnames=STATIC)
def start_jit(target_graph, target_params, proposer_graph, proposer_params, req: Requests, *, K, capacity, out_len, chunk):
    target, proposer = _merge(target_graph, target_params, proposer_graph, proposer_params)
    return start(target, proposer, req, K, capacity, out_len, chunk)


@functools.partial(compiling.jit, static_argnames=("target_graph", "proposer_graph", "K", "capacity"), donate_argnames=("state",))
def spec_step(target_graph, target_params, proposer_graph, proposer_params, state: SpecState, *, K, capacity,
              schedule: ScheduleParams | None = None):
    """The compiled speculative step: one round for every row of `state`."""
    target, proposer = _merge(target_graph, target_params, proposer_graph, proposer_params)
    return step(target, proposer, state, K, capacity, schedule=schedule)
