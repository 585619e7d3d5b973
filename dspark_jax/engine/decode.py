"""Plain autoregressive decoding: prefill, one-token steps, and the whole loop as one `lax.while_loop`.

Shares the request layout with speculative decoding (`Requests`): right-padded prompts, per-row lengths,
per-row sampling settings, stop sets, token budgets and PRNG keys. A token at absolute position `p` of a row
is drawn with `fold_in(row_key, SALT_TOKEN, p)`, so a row's samples never depend on its batch mates.
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
from dspark_jax.config import SamplingParams
from dspark_jax.engine import sampling
from dspark_jax.engine.verify import is_stop
from dspark_jax.layers import stack

PAD = -1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Requests:
    """A padded batch of requests (all `[B, ...]` arrays, traced)."""

    tokens: jax.Array  # i32[B, T] right-padded prompts
    prompt_lens: jax.Array  # i32[B]
    max_new: jax.Array  # i32[B] token budget; 0 marks a padding row
    sampling: SamplingParams
    stop_ids: jax.Array  # i32[B, NS], -1 padded
    keys: jax.Array  # typed PRNG keys [B]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: Any  # the target's cache (opaque)
    lengths: jax.Array  # i32[B] tokens committed to the cache
    pending: jax.Array  # i32[B] last sampled token, not yet in the cache
    out: jax.Array  # i32[B, O] generated tokens, PAD beyond `count`
    count: jax.Array  # i32[B]
    done: jax.Array  # bool[B]
    req: Requests


def at_most_once(pred: jax.Array, fn, s):
    """`fn(s)` if `pred` else `s`, as a loop of zero or one trips. XLA updates a loop's carry in place, where a
    `lax.cond` / `lax.switch` copies every cache it carries (its branches return new buffers), which would cost
    each round the whole cache (docs/caches.md §10). `fn` must return `s`'s structure."""
    return jax.lax.while_loop(lambda c: c[0], lambda c: (jnp.zeros((), bool), fn(c[1])), (pred, s))[1]


def append_tokens(out: jax.Array, count: jax.Array, new: jax.Array, num_new: jax.Array) -> jax.Array:
    """Write the first `num_new[b]` of `new [B, W]` at `out[b, count[b]:]` (excess beyond `O` is dropped)."""
    W = new.shape[1]
    cols = count[:, None] + jnp.arange(W)[None, :]
    cols = jnp.where(jnp.arange(W)[None, :] < num_new[:, None], cols, out.shape[1])
    rows = jnp.broadcast_to(jnp.arange(out.shape[0])[:, None], cols.shape)
    return out.at[rows, cols].set(new, mode="drop")


def prefill(model, req: Requests, cache, *, chunk: int, capture: tuple[int, ...] = (), consume=None, consumer_state=None):
    """Run the prompts in chunks of `chunk` positions; sample each row's first token.

    The prompt block `[B, T]` (T a multiple of `chunk`, or one chunk) runs as a `lax.scan` over its chunks, each
    at offset `c * chunk` on top of the cache the earlier chunks wrote, so attention memory is
    O(chunk x capacity), never O(T^2). A row whose prompt ended before a chunk writes nothing real there: its
    `num_valid` is 0 and whatever lands beyond its length is uncommitted (docs/caches.md). `consume(state,
    tokens, features, lengths) -> state` receives every chunk with the requested hidden states (a proposer's
    `extend`). -> (first token, cache, consumer state).
    """
    B, T = req.tokens.shape
    C = min(chunk, T)
    if T % C:
        raise ValueError(f"prompt block of {T} positions is not a multiple of the prefill chunk {C}")

    def run(carry, c):
        cache, last, state = carry
        at = c * C
        tokens = jax.lax.dynamic_slice_in_dim(req.tokens, at, C, axis=1)
        lengths = jnp.full((B,), at, jnp.int32)
        num_valid = jnp.clip(req.prompt_lens - at, 0, C)
        hidden, cache, features = model(tokens, lengths, cache, capture=capture, num_valid=num_valid)
        index = req.prompt_lens - 1 - at  # the row's last prompt position, if it lies in this chunk
        mine = (index >= 0) & (index < C)
        last = jnp.where(mine[:, None], hidden[jnp.arange(B), jnp.clip(index, 0, C - 1)], last)
        if consume is not None:
            state = consume(state, tokens, features, lengths)
        return (cache, last, state), None

    D = model.config.hidden_size
    with jax.named_scope("prefill"):
        carry = (cache, jnp.zeros((B, D), model.dtype), consumer_state)
        if T == C:
            carry, _ = run(carry, 0)
        else:
            carry, _ = jax.lax.scan(run, carry, jnp.arange(T // C))
    cache, last, consumer_state = carry
    probs = sampling.probabilities(model.logits(last), req.sampling)
    first = sampling.token_at(probs, req.sampling, req.keys, req.prompt_lens, sampling.SALT_TOKEN)
    return first, cache, consumer_state


def start(model, req: Requests, capacity: int, out_len: int, chunk: int) -> DecodeState:
    B = req.tokens.shape[0]
    first, cache, _ = prefill(model, req, model.init_cache(B, capacity, max_block=1), chunk=chunk)
    return begin(cache, first, req, out_len)


def begin(cache, first: jax.Array, req: Requests, out_len: int) -> DecodeState:
    """The state after prefill (every per-row field's initial value; continuous batching resets a slot with it)."""
    B = first.shape[0]
    live = req.max_new > 0
    out = jnp.full((B, out_len), PAD, jnp.int32)
    out = append_tokens(out, jnp.zeros((B,), jnp.int32), first[:, None], live.astype(jnp.int32))
    count = live.astype(jnp.int32)
    done = ~live | is_stop(first, req.stop_ids) | (count >= req.max_new)
    return DecodeState(cache=cache, lengths=req.prompt_lens, pending=first, out=out, count=count, done=done, req=req)


def step(model, state: DecodeState) -> DecodeState:
    """Feed each row's pending token, sample the next one; finished rows are left unchanged."""
    req = state.req
    hidden, cache, _ = model(state.pending[:, None], state.lengths, state.cache)
    probs = sampling.probabilities(model.logits(hidden[:, 0]), req.sampling)
    token = sampling.token_at(probs, req.sampling, req.keys, state.lengths + 1, sampling.SALT_TOKEN)
    active = ~state.done
    grow = active.astype(jnp.int32)
    out = append_tokens(state.out, state.count, token[:, None], grow)
    count = state.count + grow
    done = state.done | (active & (is_stop(token, req.stop_ids) | (count >= req.max_new)))
    return dataclasses.replace(
        state,
        cache=cache,
        lengths=state.lengths + grow,
        pending=jnp.where(active, token, state.pending),
        out=out,
        count=count,
        done=done,
    )


@functools.partial(compiling.jit, static_argnames=("graphdef", "capacity", "out_len", "chunk", "unroll_layers"))
def generate_loop(graphdef, params, req: Requests, *, capacity: int, out_len: int, chunk: int, unroll_layers: bool = False):
    """Prefill and decode every row to completion inside one compiled `while_loop`.

    `unroll_layers`: the decode loop runs the layers unrolled on weights sliced once (`layers.stack.unrolled`)."""
    model = nnx.merge(graphdef, params)
    state = start(model, req, capacity, out_len, chunk)
    with stack.unrolled(model) if unroll_layers else contextlib.nullcontext():
        state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), lambda s: step(model, s), state)
    return state.out, state.count


@functools.partial(compiling.jit, static_argnames=("graphdef", "capacity", "out_len", "chunk"))
def start_jit(graphdef, params, req: Requests, *, capacity: int, out_len: int, chunk: int) -> DecodeState:
    return start(nnx.merge(graphdef, params), req, capacity, out_len, chunk)


@functools.partial(compiling.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def step_jit(graphdef, params, state: DecodeState) -> DecodeState:
    return step(nnx.merge(graphdef, params), state)
