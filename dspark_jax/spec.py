"""Speculative decoding: the compiled speculative step and the whole generation as one `while_loop`.

One round, for every row at once and inside one `jax.jit` with a static draft length `K`:
draft block `[pending, MASK...]` -> base logits -> sequential Markov sampling (`lax.scan`) with confidence
logits -> confidence truncation (static width, per-row proposal length) -> target verification of
`[pending, d_1..d_K]` with feature capture -> rejection sampling -> next token -> commit of both caches by
length -> per-row statistics.

Cache invariant: both caches hold exactly the committed positions `[0, lengths)`; the draft context cache
gets the K/V of each round's verified features right after verification (only the `a + 1` committed rows
count), so a round never recomputes context.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import acceptance, decode, sampling
from dspark_jax import cache as kv
from dspark_jax.acceptance import is_stop
from dspark_jax.config import SamplingParams
from dspark_jax.decode import Requests


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    target_cache: kv.KVCache
    draft_cache: kv.KVCache
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
    """Rows keep going while their anchor position is below `prompt + max_new` (reference §5.5)."""
    return state_lengths < req.prompt_lens + req.max_new


def start(target, draft, req: Requests, K: int, capacity: int, out_len: int) -> SpecState:
    """Prefill the target (capturing features), fill the draft context cache, sample the first anchor."""
    B = req.tokens.shape[0]
    first, target_cache, features = decode.prefill(
        target, req, target.init_cache(B, capacity, max_block=K + 1), capture=draft.config.hidden_state_indices
    )
    draft_cache = draft.extend_context(features, jnp.zeros((B,), jnp.int32), draft.init_cache(B, capacity))
    live = req.max_new > 0
    count = live.astype(jnp.int32)
    out = decode.append_tokens(jnp.full((B, out_len), decode.PAD, jnp.int32), jnp.zeros((B,), jnp.int32), first[:, None], count)
    done = ~live | is_stop(first, req.stop_ids) | ~_round_limit(req.prompt_lens, req)
    zeros = jnp.zeros((B, out_len), jnp.int32)
    return SpecState(
        target_cache=target_cache,
        draft_cache=draft_cache,
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


class Proposal(NamedTuple):
    drafts: jax.Array  # i32[B, K] sampled draft tokens
    probs: jax.Array  # f32[B, K, V] the distributions they were sampled from
    logits: jax.Array  # f32[B, K, V] corrected logits (base + Markov bias)
    confidence_logits: jax.Array  # f32[B, K] (zeros without a confidence head)
    num_proposed: jax.Array  # i32[B] drafts sent to the target


def propose(draft, pending, lengths, draft_cache, params: SamplingParams, keys, K: int) -> Proposal:
    """Draft `K` tokens per row after the anchors `pending [B]` at positions `lengths [B]`."""
    cfg = draft.config
    B = pending.shape[0]
    block = jnp.concatenate([pending[:, None], jnp.full((B, cfg.block_size - 1), cfg.mask_token_id, jnp.int32)], axis=1)
    with jax.named_scope("draft_block"):
        hidden = draft.block_hidden(block, lengths, draft_cache)[:, :K]  # [B, K, D]
        base = draft.base_logits(hidden)  # [B, K, V]
    markov = draft.markov_head

    def body(carry, xs):
        prev, rnn_state = carry
        k, h, logits = xs
        if markov is not None:
            bias, rnn_state = markov.step(prev, h, rnn_state)
            logits = logits + bias
        probs = sampling.probabilities(logits, params)
        token = sampling.sample(sampling.step_keys(keys, sampling.SALT_DRAFT, lengths + k + 1), probs)
        conf = draft.confidence(h, prev) if draft.confidence_head is not None else jnp.zeros((B,), jnp.float32)
        return (token, rnn_state), (token, probs, logits, conf)

    init_state = markov.initial_state(B) if markov is not None else jnp.zeros((B, 0), draft.dtype)
    with jax.named_scope("markov_loop"):
        _, (drafts, probs, logits, conf) = jax.lax.scan(
            body, (pending, init_state), (jnp.arange(K), jnp.swapaxes(hidden, 0, 1), jnp.swapaxes(base, 0, 1))
        )
    # Proposal length: the first position whose own confidence is below the threshold (reference §4.2).
    threshold = params.confidence_threshold[:, None]
    low = (jax.nn.sigmoid(conf.T) < threshold) & (threshold > 0)
    num_proposed = jnp.where(jnp.any(low, axis=1), jnp.argmax(low, axis=1), K).astype(jnp.int32)
    return Proposal(drafts.T, jnp.swapaxes(probs, 0, 1), jnp.swapaxes(logits, 0, 1), conf.T, num_proposed)


def step(target, draft, state: SpecState, K: int) -> SpecState:
    """One speculative round for every row; finished rows are left unchanged."""
    req = state.req
    B = state.pending.shape[0]
    proposal = propose(draft, state.pending, state.lengths, state.draft_cache, req.sampling, req.keys, K)
    drafts, p_draft, num_proposed = proposal.drafts, proposal.probs, proposal.num_proposed

    with jax.named_scope("verify"):
        verify_ids = jnp.concatenate([state.pending[:, None], drafts], axis=1)  # [B, K + 1]
        hidden, target_cache, features = target(
            verify_ids, state.lengths, state.target_cache, capture=draft.config.hidden_state_indices
        )
        p_target = sampling.probabilities(target.logits(hidden), req.sampling)  # [B, K + 1, V]
    accepted, next_token, terminated = acceptance.verify(
        drafts, p_draft, p_target, num_proposed, req.stop_ids, req.keys, state.lengths
    )
    with jax.named_scope("commit"):
        draft_cache = draft.extend_context(features, state.lengths, state.draft_cache)
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

        capacity = state.draft_cache.k[0].shape[1]  # the draft context cache is always linear
        done = state.done | (
            active
            & (terminated | is_stop(next_token, req.stop_ids) | ~_round_limit(lengths, req) | (lengths + K + 1 > capacity))
        )
    return dataclasses.replace(
        state,
        target_cache=target_cache,
        draft_cache=draft_cache,
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


def _merge(target_graph, target_params, draft_graph, draft_params):
    return nnx.merge(target_graph, target_params), nnx.merge(draft_graph, draft_params)


STATIC = ("target_graph", "draft_graph", "K", "capacity", "out_len")


@functools.partial(jax.jit, static_argnames=STATIC)
def generate_loop(target_graph, target_params, draft_graph, draft_params, req: Requests, *, K, capacity, out_len):
    """Prefill and run speculative rounds for every row to completion inside one compiled `while_loop`."""
    target, draft = _merge(target_graph, target_params, draft_graph, draft_params)
    state = start(target, draft, req, K, capacity, out_len)
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), lambda s: step(target, draft, s, K), state)
    return state


@functools.partial(jax.jit, static_argnames=STATIC)
def start_jit(target_graph, target_params, draft_graph, draft_params, req: Requests, *, K, capacity, out_len):
    target, draft = _merge(target_graph, target_params, draft_graph, draft_params)
    return start(target, draft, req, K, capacity, out_len)


@functools.partial(jax.jit, static_argnames=("target_graph", "draft_graph", "K"), donate_argnames=("state",))
def spec_step(target_graph, target_params, draft_graph, draft_params, state: SpecState, *, K):
    """The compiled speculative step: one round for every row of `state`."""
    target, draft = _merge(target_graph, target_params, draft_graph, draft_params)
    return step(target, draft, state, K)
