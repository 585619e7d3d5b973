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

from dspark_jax.engine import decode, sampling
from dspark_jax.engine.decode import Requests
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


def begin(target_cache, proposer_state, first: jax.Array, req: Requests, out_len: int) -> SpecState:
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
    )


def step(target, proposer, state: SpecState, K: int, capacity: int) -> SpecState:
    """One speculative round for every row; finished rows are left unchanged."""
    req = state.req
    B = state.pending.shape[0]
    with jax.named_scope("propose"):
        proposal = proposer.propose(state.proposer_state, state.pending, state.lengths, req.sampling, req.keys, K)
    drafts, num_proposed = proposal.tokens, proposal.num_proposed

    with jax.named_scope("verify"):
        verify_ids = jnp.concatenate([state.pending[:, None], drafts], axis=1)  # [B, K + 1]
        hidden, target_cache, features = target(
            verify_ids, state.lengths, state.target_cache, capture=proposer.feature_indices
        )
        p_target = sampling.probabilities(target.logits(hidden), req.sampling)  # [B, K + 1, V]
    accepted, next_token, terminated = verify(
        drafts, proposal.probs, p_target, num_proposed, req.stop_ids, req.keys, state.lengths
    )
    with jax.named_scope("commit"):
        proposer_state = proposer.extend(state.proposer_state, verify_ids, features, state.lengths)
        active = ~state.done
        emitted = jnp.where(terminated, accepted, accepted + 1)
        new_tokens = jnp.where(jnp.arange(K + 1)[None, :] < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), next_token[:, None])
        out = decode.append_tokens(state.out, state.count, new_tokens, jnp.where(active, emitted, 0))
        grow = jnp.where(active, accepted + 1, 0)
        lengths = state.lengths + grow
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
        proposal_lengths=record(state.proposal_lengths, jnp.where(terminated, accepted, num_proposed)),
        accepted_lengths=record(state.accepted_lengths, accepted),
    )


def _merge(target_graph, target_params, proposer_graph, proposer_params):
    return nnx.merge(target_graph, target_params), nnx.merge(proposer_graph, proposer_params)


STATIC = ("target_graph", "proposer_graph", "K", "capacity", "out_len", "chunk")


@functools.partial(jax.jit, static_argnames=STATIC + ("unroll_layers",))
def generate_loop(target_graph, target_params, proposer_graph, proposer_params, req: Requests, *, K, capacity, out_len,
                  chunk, unroll_layers: bool = False):
    """Prefill and run speculative rounds for every row to completion inside one compiled `while_loop`.

    `unroll_layers`: the rounds run the layers unrolled on weights sliced once (`layers.stack.unrolled`)."""
    target, proposer = _merge(target_graph, target_params, proposer_graph, proposer_params)
    state = start(target, proposer, req, K, capacity, out_len, chunk)
    with stack.unrolled(target, proposer) if unroll_layers else contextlib.nullcontext():
        return jax.lax.while_loop(lambda s: ~jnp.all(s.done), lambda s: step(target, proposer, s, K, capacity), state)


@functools.partial(jax.jit, static_argnames=STATIC)
def start_jit(target_graph, target_params, proposer_graph, proposer_params, req: Requests, *, K, capacity, out_len, chunk):
    target, proposer = _merge(target_graph, target_params, proposer_graph, proposer_params)
    return start(target, proposer, req, K, capacity, out_len, chunk)


@functools.partial(jax.jit, static_argnames=("target_graph", "proposer_graph", "K", "capacity"), donate_argnames=("state",))
def spec_step(target_graph, target_params, proposer_graph, proposer_params, state: SpecState, *, K, capacity):
    """The compiled speculative step: one round for every row of `state`."""
    target, proposer = _merge(target_graph, target_params, proposer_graph, proposer_params)
    return step(target, proposer, state, K, capacity)
