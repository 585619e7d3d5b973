"""Continuous batching: a whole job of `N` prompts through `B` decode slots, as one compiled `while_loop`.

Every slot owns one batch row of the target cache and of the proposer state. A loop iteration:

1. **admit**: every free slot takes the next waiting prompt of the device-resident queue (`[N, T]` padded
   prompts, admitted longest first); its per-row state is reset to "not decoding";
2. **prefill**: the slots that are still prefilling run their next chunk of `chunk` prompt positions
   (their rows are gathered out of the caches, run as a `[lanes, chunk]` block at their own offsets, and
   scattered back), so a prompt costs its own length, never the longest prompt's bucket; a slot whose prompt
   ends in this chunk samples its first token and starts decoding (`spec.begin` / `decode.begin`);
3. **round**: one speculative round (or AR step) for the decoding slots, while other slots keep prefilling;
4. **retire**: slots that finished copy their tokens and statistics into the job's results and become free.

Steps 2 and 3 run as loops of zero or one trips (`decode.at_most_once`), so an iteration with nothing to prefill (or
nothing decoding) skips that work without copying the caches. Nothing here reads past the target and proposer
contracts: a cache or proposer state is any pytree whose leaves each have one batch axis, found by comparing
the shapes of `init_cache(1)` and `init_cache(2)`.

A slot is reused without clearing its rows: "write ahead, commit by length" (docs/caches.md §2) means a row
only ever reads positions below its `lengths`, and the new prompt's prefill writes every one of those
before they are read. A token at position `p` of a prompt is drawn with the prompt's own key at `p`
(docs/caches.md §8), so an answer does not depend on its slot, its neighbours or when it entered.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import compiling
from dspark_jax.engine import decode, sampling, spec
from dspark_jax.engine.decode import Requests

FREE, PREFILL, DECODE = 0, 1, 2


class Kind(NamedTuple):
    """How the loop drives one kind of decoding state (`spec.SpecState` or `decode.DecodeState`)."""

    cache_fields: tuple[str, ...]  # the state's opaque per-row caches
    init: Callable[[int], tuple]  # batch -> empty caches at the job's capacity (their shapes tell the batch axes)
    chunk: Callable  # (caches, tokens [P, C], at [P], num_valid [P]) -> (hidden [P, C, D], caches)
    begin: Callable  # (caches, first [B], req) -> state
    round: Callable  # state -> state
    logits: Callable  # hidden -> logits


def speculative(target, proposer, K: int, capacity: int, out_len: int, schedule=None) -> Kind:
    def chunk(caches, tokens, at, num_valid):
        cache, state = caches
        hidden, cache, features = target(tokens, at, cache, capture=proposer.feature_indices, num_valid=num_valid)
        return hidden, (cache, proposer.extend(state, tokens, features, at))

    return Kind(
        cache_fields=("target_cache", "proposer_state"),
        init=lambda b: (target.init_cache(b, capacity, max_block=K + 1), proposer.init_state(b, capacity)),
        chunk=chunk,
        begin=lambda caches, first, req: spec.begin(*caches, first, req, out_len),
        round=lambda s: spec.step(target, proposer, s, K, capacity, schedule=schedule),
        logits=target.logits,
    )


def autoregressive(model, capacity: int, out_len: int) -> Kind:
    def chunk(caches, tokens, at, num_valid):
        hidden, cache, _ = model(tokens, at, caches[0], num_valid=num_valid)
        return hidden, (cache,)

    return Kind(
        cache_fields=("cache",),
        init=lambda b: (model.init_cache(b, capacity, max_block=1),),
        chunk=chunk,
        begin=lambda caches, first, req: decode.begin(caches[0], first, req, out_len),
        round=lambda s: decode.step(model, s),
        logits=model.logits,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    state: Any  # the decoding state of the B slots (its `req` holds each slot's request)
    prompt: jax.Array  # i32[B] queue index of the slot's prompt (meaningless when FREE)
    phase: jax.Array  # i32[B] FREE / PREFILL / DECODE
    filled: jax.Array  # i32[B] prompt positions prefilled so far
    waiting: jax.Array  # i32[] next queue index to admit
    results: Any  # the per-row fields of `state`, one row per queue entry, written when a prompt finishes
    rounds_run: jax.Array  # i32[] rounds (AR steps) executed
    live_slot_rounds: jax.Array  # i32[] sum over rounds of the slots that advanced in it


def batch_axes(init: Callable[[int], Any]):
    """The batch axis of every leaf of `init(batch)`: the one axis whose size follows `batch`."""
    one, two = jax.eval_shape(lambda: init(1)), jax.eval_shape(lambda: init(2))

    def axis(a, b):
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if len(diff) != 1:
            raise ValueError(f"a cache leaf of shape {b.shape} at batch 2 has no single batch axis")
        return diff[0]

    return jax.tree.map(axis, one, two)


def take_rows(tree, axes, rows):
    """The rows `rows` (distinct, in range) of every leaf, each as a `dynamic_slice` along its batch axis
    (row copies: a gather or scatter over a whole cache is slow on XLA:CPU)."""
    def take(x, a):
        parts = [jax.lax.dynamic_slice_in_dim(x, rows[i], 1, axis=a) for i in range(rows.shape[0])]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=a)

    return jax.tree.map(take, tree, axes)


def put_rows(tree, axes, rows, values, keep):
    """Write row `i` of `values` back at `rows[i]` (distinct, in range) where `keep[i]`; elsewhere the row is
    left as it was."""
    def put(x, a, v):
        for i in range(rows.shape[0]):
            new = jax.lax.dynamic_slice_in_dim(v, i, 1, axis=a)
            old = jax.lax.dynamic_slice_in_dim(x, rows[i], 1, axis=a)
            x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(keep[i], new, old), rows[i], axis=a)
        return x

    return jax.tree.map(put, tree, axes, values)


def _row_fields(state, kind: Kind) -> dict:
    """The state's per-row fields (everything but the caches and the requests), `[B, ...]` each."""
    skip = set(kind.cache_fields) | {"req"}
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name not in skip}


def _where_rows(mask, new, old):
    return jax.tree.map(lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (o.ndim - 1)), n, o), new, old)


def start(kind: Kind, queue: Requests, slots: int) -> Slots:
    """`slots` empty slots over `queue`; every slot starts FREE."""
    B = slots
    caches = kind.init(B)
    req = jax.tree.map(lambda x: x[jnp.zeros((B,), jnp.int32)], queue)
    state = kind.begin(caches, jnp.zeros((B,), jnp.int32), req)
    state = dataclasses.replace(state, done=jnp.ones((B,), bool))
    N = queue.prompt_lens.shape[0]
    results = jax.tree.map(lambda x: jnp.zeros((N,) + x.shape[1:], x.dtype), _row_fields(state, kind))
    zero = jnp.zeros((), jnp.int32)
    return Slots(state, jnp.zeros((B,), jnp.int32), jnp.full((B,), FREE, jnp.int32), jnp.zeros((B,), jnp.int32), zero,
                 results, zero, zero)


def admission_order(queue: Requests, num_prompts: jax.Array) -> jax.Array:
    """Queue indices longest prompt first (ties in queue order): slots running at the same time hold prompts
    of similar length, so the row groups of attention (layers/attention.py, each read up to its longest row)
    pay for lengths close to each slot's own; and the longest answers start first."""
    N = queue.prompt_lens.shape[0]
    return jnp.argsort(jnp.where(jnp.arange(N) < num_prompts, -queue.prompt_lens, 1), stable=True).astype(jnp.int32)


def admit(s: Slots, queue: Requests, num_prompts: jax.Array, order: jax.Array) -> Slots:
    """Free slots take the next waiting prompts of `order`, in slot order."""
    free = s.phase == FREE
    rank = s.waiting + jnp.cumsum(free) - 1
    take = free & (rank < num_prompts)
    index = order[jnp.clip(rank, 0, order.shape[0] - 1)]
    req = _where_rows(take, jax.tree.map(lambda x: x[index], queue), s.state.req)
    state = dataclasses.replace(s.state, req=req, lengths=jnp.where(take, 0, s.state.lengths))
    return dataclasses.replace(
        s, state=state, prompt=jnp.where(take, index, s.prompt), phase=jnp.where(take, PREFILL, s.phase),
        filled=jnp.where(take, 0, s.filled), waiting=s.waiting + jnp.sum(take),
    )


def prefill(kind: Kind, s: Slots, *, queue: Requests, lanes: int, chunk: int, axes) -> Slots:
    """The next prompt chunk of up to `lanes` prefilling slots; slots whose prompt ends here start decoding."""
    B = s.phase.shape[0]
    prefilling = s.phase == PREFILL
    lane_slots = jnp.argsort(jnp.where(prefilling, 0, B) + jnp.arange(B))[:lanes]  # prefilling slots first
    on = prefilling[lane_slots]
    req = jax.tree.map(lambda x: x[lane_slots], s.state.req)
    at = jnp.where(on, s.filled[lane_slots], 0)  # an idle lane reads nothing (attention's used extent)
    tokens = jax.vmap(lambda row, o: jax.lax.dynamic_slice_in_dim(row, o, chunk))(req.tokens, at)
    num_valid = jnp.where(on, jnp.clip(req.prompt_lens - at, 0, chunk), 0)
    caches = tuple(getattr(s.state, f) for f in kind.cache_fields)
    hidden, rows = kind.chunk(take_rows(caches, axes, lane_slots), tokens, at, num_valid)
    caches = put_rows(caches, axes, lane_slots, rows, on)  # idle lanes write nothing back
    target_rows = jnp.where(on, lane_slots, B)

    last = req.prompt_lens - 1 - at  # the prompt's last position, if it lies in this chunk
    ends = on & (last < chunk)
    h = hidden[jnp.arange(lanes), jnp.clip(last, 0, chunk - 1)]
    probs = sampling.probabilities(kind.logits(h), req.sampling)
    first = sampling.token_at(probs, req.sampling, req.keys, req.prompt_lens, sampling.SALT_TOKEN)

    started = jnp.zeros((B,), bool).at[target_rows].set(ends, mode="drop")
    first = jnp.zeros((B,), jnp.int32).at[target_rows].set(first, mode="drop")
    fresh = kind.begin(caches, first, s.state.req)
    filled = s.filled.at[target_rows].add(chunk, mode="drop")
    # a slot still prefilling keeps `lengths` at what it has prefilled, so the rounds run meanwhile write
    # (ahead, uncommitted) only where its next chunk will write again
    kept = dataclasses.replace(s.state, lengths=jnp.where(prefilling, filled, s.state.lengths))
    state = dataclasses.replace(fresh, **_where_rows(started, _row_fields(fresh, kind), _row_fields(kept, kind)))
    return dataclasses.replace(s, state=state, filled=filled, phase=jnp.where(started, DECODE, s.phase))


def advance(kind: Kind, s: Slots) -> Slots:
    """One round for the decoding slots (every other slot is `done`, so the round leaves it alone). The
    layers write the caches in place and read each row only up to its own extent (docs/caches.md §10), so a
    round costs what the live rows use, not the capacity."""
    live = jnp.sum((s.phase == DECODE) & ~s.state.done)
    return dataclasses.replace(s, state=kind.round(s.state), rounds_run=s.rounds_run + 1,
                               live_slot_rounds=s.live_slot_rounds + live)


def retire(kind: Kind, s: Slots) -> Slots:
    """Finished slots hand their rows to `results` and become free."""
    finished = (s.phase == DECODE) & s.state.done
    N = s.results["count"].shape[0]
    index = jnp.where(finished, s.prompt, N)
    results = jax.tree.map(lambda r, x: r.at[index].set(x, mode="drop"), s.results, _row_fields(s.state, kind))
    # a free slot holds no length, so it does not widen the cache extent attention reads for the live ones
    state = dataclasses.replace(s.state, lengths=jnp.where(finished, 0, s.state.lengths))
    return dataclasses.replace(s, state=state, results=results, phase=jnp.where(finished, FREE, s.phase))


def lane_widths(slots: int) -> tuple[int, ...]:
    """The prefill widths compiled for `slots` slots: 1, 4, 16, ... below `slots`, and `slots` itself."""
    widths, w = [], 1
    while w < slots:
        widths.append(w)
        w *= 4
    return tuple(widths) + (slots,)


def run(kind: Kind, queue: Requests, num_prompts: jax.Array, *, slots: int, chunk: int) -> Slots:
    """The whole job: admit, prefill, round, retire until every prompt has finished.

    The prefill step runs at the smallest width of `lane_widths(slots)` that holds every slot waiting for
    its next chunk: one refilled slot costs a `[1, chunk]` block, the job's start a `[slots, chunk]` one.
    Prefill and round are skipped when there is nothing for them (`decode.at_most_once`)."""
    axes = batch_axes(kind.init)
    widths = lane_widths(slots)
    branches = [functools.partial(prefill, kind, queue=queue, lanes=w, chunk=chunk, axes=axes) for w in widths]

    order = admission_order(queue, num_prompts)

    def body(s):
        s = admit(s, queue, num_prompts, order)
        waiting = jnp.sum(s.phase == PREFILL)
        width = jnp.searchsorted(jnp.asarray(widths), waiting)
        for i, branch in enumerate(branches):
            s = decode.at_most_once((waiting > 0) & (width == i), branch, s)
        decoding = jnp.any((s.phase == DECODE) & ~s.state.done)
        s = decode.at_most_once(decoding, functools.partial(advance, kind), s)
        return retire(kind, s)

    busy = lambda s: (s.waiting < num_prompts) | jnp.any(s.phase != FREE)
    return jax.lax.while_loop(busy, body, start(kind, queue, slots))


STATIC = ("target_graph", "proposer_graph", "K", "capacity", "out_len", "chunk", "slots")


@functools.partial(compiling.jit, static_argnames=STATIC)
def spec_job(target_graph, target_params, proposer_graph, proposer_params, queue: Requests, num_prompts, schedule=None,
             *, K, capacity, out_len, chunk, slots) -> Slots:
    """A speculative job: `queue` (`[N, T]`, `T` a multiple of `chunk`) through `slots` slots; `schedule`: the
    verification scheduler's parameters (`engine.schedule`), None for fixed rounds. The scheduler sees the
    decoding slots only: every other slot is `done`."""
    target, proposer = nnx.merge(target_graph, target_params), nnx.merge(proposer_graph, proposer_params)
    kind = speculative(target, proposer, K, capacity, out_len, schedule)
    return run(kind, queue, num_prompts, slots=slots, chunk=chunk)


@functools.partial(compiling.jit, static_argnames=("target_graph", "capacity", "out_len", "chunk", "slots"))
def ar_job(target_graph, target_params, queue: Requests, num_prompts, *, capacity, out_len, chunk, slots) -> Slots:
    """A plain autoregressive job through `slots` slots."""
    kind = autoregressive(nnx.merge(target_graph, target_params), capacity, out_len)
    return run(kind, queue, num_prompts, slots=slots, chunk=chunk)
