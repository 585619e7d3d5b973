"""Public generation API: `generate` (whole loop compiled) and `stream` (a Python loop over the compiled step).

Validates requests (`engine.inputs`: every argument type-checked, errors name it), buckets shapes (batch,
prompt length, token budget: powers of two) so a long job compiles a handful of programs, builds per-row
sampling settings, stop sets and keys, runs plain AR decoding (`draft=None`) or speculative decoding, and
returns tokens in input order with statistics.

What the output promises, per dtype:

* float32: sampled output follows the target distribution exactly under either sampler (docs/algorithm.md
  §5.7, §3.5, §3.6); greedy speculative output equals plain greedy decoding token for token; with
  `sampler="coupled"` sampled speculative output equals sampled plain decoding token for token, whatever the
  draft, K or schedule; a row's output does not depend on its batch mates or the batch size (docs/caches.md §8),
  except with `sampler="rejection"` under `schedule="auto"`, where the scheduler plans each round for the batch
  as a whole and a row's draws follow how many drafts it verified (greedy rows excepted).
* bfloat16: sampled output still follows the distribution of the target *as computed in bf16* exactly: the
  acceptance test compares the very distributions that were sampled from. But bf16 logits of a row can change
  with the shapes of the program (batch size, padded prompt length, verifying K + 1 tokens vs decoding one) by
  up to bf16's resolution, ~1e-2, where the backend's kernels depend on the shape (accelerators; on XLA:CPU far
  less), so greedy speculative output equals plain greedy decoding only up to near-ties (a top-2 gap below that
  rounding), and the same seed is guaranteed the same answers only for the same program shapes. `dspark-jax
  batch` runs every prompt in the same shapes whatever the resume point (`tools/batch.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from dspark_jax.config import SamplingParams
from dspark_jax.engine import continuous, decode, inputs, sampling, spec
from dspark_jax.errors import ConfigError, InputError
from dspark_jax.handles import Draft, Target
from dspark_jax.sharding import shard_array, to_host  # to_host: np.asarray that also gathers multi-process arrays

MIN_PROMPT_BUCKET = 16
PREFILL_CHUNK = 512  # prompt positions per prefill step (attention memory is O(chunk x capacity))
MIN_NEW_BUCKET = 16
STOP_SLOTS = 8
DEFAULT_SAMPLER = "rejection"  # `sampler=` of generate / stream / the CLI (docs/algorithm.md §3.6)


def prompt_bucket(n: int, chunk: int) -> int:
    """Prompt block length: a power of two up to one chunk, then a multiple of the chunk (no doubling)."""
    short = bucket(n, MIN_PROMPT_BUCKET)
    return short if short <= chunk else -(-n // chunk) * chunk


def bucket(n: int, minimum: int = 1) -> int:
    """The power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass
class GenerationStats:
    """Statistics of one `generate` call. Lists are per prompt, in input order.

    A round is one target forward after prefill (one AR step, or one speculative round). Acceptance
    lengths count the bonus/correction token (the paper's tau), except on a round ended by a stop token.
    `prefix_survival[i]` = P(drafts 0..i all accepted | >= i+1 proposed) (the reference's accept_rate@i);
    `conditional_acceptance[i]` = P(draft i accepted | drafts 0..i-1 accepted and draft i proposed).
    """

    rounds: list[int]
    acceptance_lengths: list[list[int]]
    proposal_lengths: list[list[int]]
    accepted_draft_lengths: list[list[int]]
    num_generated: list[int]
    finish_reasons: list[str]
    mean_acceptance_length: float
    draft_tokens_per_proposal: float
    verify_rate: float
    prefix_survival: list[float | None]
    conditional_acceptance: list[float | None]
    wall_time_s: float
    tokens_per_second: float
    slot_rounds: int = 0  # rows x rounds the compiled loops paid for (finished, empty and padding rows included)

    @classmethod
    def from_rounds(cls, acceptance, proposal, accepted, num_generated, finish_reasons, K, wall_time_s,
                    slot_rounds: int = 0) -> GenerationStats:
        acc_all = [x for row in acceptance for x in row]
        prop_all = [x for row in proposal for x in row]
        a_all = [x for row in accepted for x in row]
        rounds = len(acc_all)
        survival, conditional = [], []
        for i in range(K):
            proposed = sum(1 for n in prop_all if n > i)
            survived = sum(1 for a in a_all if a > i)
            reached = sum(1 for a, n in zip(a_all, prop_all) if a >= i and n > i)
            survival.append(survived / proposed if proposed else None)
            conditional.append(survived / reached if reached else None)
        total = sum(num_generated)
        return cls(
            rounds=[len(r) for r in acceptance],
            acceptance_lengths=acceptance,
            proposal_lengths=proposal,
            accepted_draft_lengths=accepted,
            num_generated=list(num_generated),
            finish_reasons=list(finish_reasons),
            mean_acceptance_length=sum(acc_all) / rounds if rounds else 0.0,
            draft_tokens_per_proposal=sum(prop_all) / rounds if rounds else 0.0,
            verify_rate=sum(acc_all) / (sum(prop_all) + rounds) if rounds else 0.0,
            prefix_survival=survival,
            conditional_acceptance=conditional,
            wall_time_s=wall_time_s,
            tokens_per_second=total / wall_time_s if wall_time_s > 0 else 0.0,
            slot_rounds=int(slot_rounds),
        )


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]
    stats: GenerationStats


def check_pair(target: Target, draft: Draft) -> None:
    """Raise `ConfigError` if `draft` cannot serve `target` (each proposer knows its own requirements)."""
    inputs.check_models(target, draft)
    if draft is None:
        raise ConfigError("draft is None: check_pair needs a draft (dj.load_draft(...) or dj.prompt_lookup())")
    draft.module.check_target(target.config)


def _draft_length(draft: Draft, K: int | None) -> int:
    return inputs.draft_length(K, draft.module.max_draft_length)


def _as_token_lists(target: Target, prompts) -> list[list[int]]:
    return inputs.token_lists(target, prompts)


def _stop_matrix(stop_ids: Sequence[int], rows: int, vocab: int) -> np.ndarray:
    ids = list(dict.fromkeys(int(x) for x in stop_ids))
    for x in ids:
        if not 0 <= x < vocab:
            raise InputError(f"stop token id {x} is outside the vocabulary [0, {vocab})")
    slots = bucket(len(ids), STOP_SLOTS)
    mat = np.full((rows, slots), -1, np.int32)
    mat[:, : len(ids)] = ids
    return mat


def build_requests(
    target: Target,
    prompts,
    *,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    stop_token_ids,
    confidence_threshold,
    row_ids: Sequence[int] | None = None,
    extra_capacity: int = 0,
    prefill_chunk: int = PREFILL_CHUNK,
    sampler: str = "rejection",
) -> tuple[decode.Requests, list[list[int]], dict]:
    """Validate and pad a batch. -> (requests, prompt token lists, static shapes)."""
    sampler = inputs.sampler(sampler)
    token_lists = _as_token_lists(target, prompts)
    n = len(token_lists)
    checked = inputs.settings(n, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, confidence_threshold=confidence_threshold)
    row_ids = inputs.row_ids(row_ids, n)
    stop_token_ids = inputs.stop_token_ids(stop_token_ids, target.config.vocab_size)
    max_new = checked["max_new_tokens"].astype(np.int64)
    lengths = np.array([len(t) for t in token_lists])
    limit = target.config.max_position_embeddings
    over = np.nonzero(lengths + max_new > limit)[0]
    if len(over):
        i = int(over[0])
        raise InputError(
            f"prompt {i}: {lengths[i]} prompt tokens + max_new_tokens {max_new[i]} = {lengths[i] + max_new[i]} exceeds the "
            f"model's capacity of {limit} positions (max_position_embeddings); shorten the prompt or lower max_new_tokens"
        )
    B = bucket(n)
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 1:
        raise InputError(f"prefill_chunk={prefill_chunk!r} must be an integer >= 1 (prompt positions per prefill step)")
    chunk = bucket(int(prefill_chunk), MIN_PROMPT_BUCKET)
    T = prompt_bucket(int(lengths.max()), chunk)
    M = bucket(int(max_new.max()), MIN_NEW_BUCKET)
    tokens = np.zeros((B, T), np.int32)
    for i, ids in enumerate(token_lists):
        tokens[i, : len(ids)] = ids
    prompt_lens = np.ones(B, np.int32)
    prompt_lens[:n] = lengths
    budget = np.zeros(B, np.int32)
    budget[:n] = max_new

    def per_row(name):  # padding rows repeat the first prompt's settings
        arr = checked[name]
        return np.concatenate([arr, np.full(B - n, arr[0])])

    params = SamplingParams.create(
        B,
        temperature=per_row("temperature"),
        top_k=per_row("top_k"),
        top_p=per_row("top_p"),
        confidence_threshold=per_row("confidence_threshold"),
        sampler=sampler,
    )
    stops = target.stop_token_ids if stop_token_ids is None else stop_token_ids
    rows = np.arange(B) if row_ids is None else np.asarray(list(row_ids) + list(range(B - n)), np.int64)
    if rows.shape != (B,):
        raise InputError(f"row_ids must give one id per prompt ({n})")
    seeds = per_row("seed").astype(np.int64)
    if np.any(seeds < 0) or np.any(seeds >= 2**32) or np.any(rows < 0) or np.any(rows >= 2**32):
        raise InputError("seed and row ids must be integers in [0, 2**32)")
    keys = sampling.row_keys(jnp.asarray(seeds.astype(np.uint32)), jnp.asarray(rows.astype(np.uint32)))
    req = decode.Requests(
        tokens=jnp.asarray(tokens),
        prompt_lens=jnp.asarray(prompt_lens),
        max_new=jnp.asarray(budget),
        sampling=params,
        stop_ids=jnp.asarray(_stop_matrix(stops, B, target.config.vocab_size)),
        keys=keys,
    )
    mesh = _mesh_of(target)
    if mesh is not None:  # requests over the data axis, like the parameters' own placement
        req = jax.tree.map(lambda x: shard_array(x, ("batch",) + (None,) * (x.ndim - 1), mesh), req)
    shapes = {"capacity": T + M + extra_capacity + 1, "out_len": M + extra_capacity + 1, "chunk": chunk}
    return req, token_lists, shapes


def _placement(target: Target):
    """The context the compiled programs run under: the target's mesh when its parameters are sharded, so caches
    and activations are placed by their logical axes (`sharding.constrain`) and experts run expert-parallel."""
    mesh = _mesh_of(target)
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _mesh_of(target: Target):
    """The mesh the target's parameters live on, if they were loaded sharded."""
    sharding = getattr(jax.tree.leaves(target.params)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def _finish(out, count, token_lists, max_new, stop_ids) -> tuple[list[list[int]], list[str]]:
    stops = set(int(x) for x in stop_ids)
    tokens, reasons = [], []
    for i in range(len(token_lists)):
        row = [int(x) for x in out[i, : count[i]]][: int(max_new[i])]
        cut = next((j for j, x in enumerate(row) if x in stops), None)
        if cut is not None:
            row = row[: cut + 1]
        tokens.append(row)
        reasons.append("stop" if cut is not None else "length")
    return tokens, reasons


def _prepare(target: Target, draft: Draft | None, prompts, draft_length, row_ids, **settings):
    """Validate a request batch. -> (K, requests, prompt token lists, static shapes, stop ids)."""
    inputs.check_models(target, draft)
    K = 0
    if draft is not None:
        check_pair(target, draft)
        K = _draft_length(draft, draft_length)
    req, token_lists, shapes = build_requests(target, prompts, row_ids=row_ids, extra_capacity=K, **settings)
    if draft is not None and not draft.module.has_confidence and bool(np.any(to_host(req.sampling.confidence_threshold) > 0)):
        raise ConfigError(
            "confidence_threshold > 0 needs a draft with a confidence head; this one has none (e.g. DFlash or prompt "
            "lookup), so every round would propose nothing. Pass confidence_threshold=0"
        )
    stops = target.stop_token_ids if settings["stop_token_ids"] is None else settings["stop_token_ids"]
    return K, req, token_lists, shapes, stops


def generate(
    target: Target,
    draft: Draft | None,
    prompts,
    *,
    max_new_tokens: int,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    seed=0,
    stop_token_ids: Sequence[int] | None = None,
    confidence_threshold=0.0,
    draft_length: int | None = None,
    row_ids: Sequence[int] | None = None,
    unroll_layers: bool = False,
    prefill_chunk: int = PREFILL_CHUNK,
    batch_size: int | None = None,
    batching: str | None = None,
    schedule: str = "auto",
    sampler: str = DEFAULT_SAMPLER,
) -> GenerationResult:
    """Generate for a batch of prompts; `draft=None` is plain autoregressive decoding.

    `prompts`: token-id lists (or 1-D integer NumPy arrays) or strings, tokenised with the target's tokenizer as
    transformers' `tokenizer(text)` does (its special tokens, e.g. Gemma's `<bos>`; no chat template: render
    one with `target.tokenizer.apply_chat_template` and pass its ids). Every argument is validated
    (`engine.inputs`): a wrong type or value raises an `InputError` / `ConfigError` that names it.
    Sampling settings may be scalars or one value per prompt; temperatures below 1e-5 are greedy.
    `stop_token_ids=None` uses the target's generation config; pass `[]` for none. `draft_length` (K)
    defaults to the draft's block size.
    `row_ids` (default 0..n-1) name each row's random stream: row i draws from `(seed, row_ids[i])` only.
    `unroll_layers=True` runs the decode loop's layers unrolled on weights sliced once per call instead of
    under `lax.scan`: faster decoding where the backend copies a scanned layer's weights every step (XLA:CPU),
    a compile time that grows with depth (`layers.stack`). Outputs are identical.
    `prefill_chunk`: prompt positions per prefill step (rounded up to a power of two >= 16); a long prompt is
    prefilled chunk by chunk inside the compiled program, with attention memory O(chunk x capacity).
    `schedule`: "auto" (default) verifies, per round and row, only the drafted prefix worth its cost on this
    machine, possibly none, and runs a plain AR step when speculation cannot pay (docs/algorithm.md §4.5);
    "fixed" verifies every row's whole proposal (the block, or its `confidence_threshold` prefix).
    Statistics' `proposal_lengths` are the drafts verified per round (the scheduled lengths).
    `sampler` (sampled rows; greedy ones are unaffected): "coupled" draws the token at each position as the
    argmax of the processed log-probabilities plus Gumbel noise keyed by (seed, row id, position), and accepts a
    draft iff it is the target's token there, so the answers are plain decoding's for the same seed whatever the
    draft, K, schedule or batch; "rejection" is the paper's speculative sampling, with higher acceptance
    (docs/algorithm.md §3.6, benchmarks/results/sampler_coupled.md). Both are exact.
    Returns tokens per prompt (input order, cut after the first stop token inclusive) and statistics.
    `batch_size` (B): run any number of prompts through B decode slots. `batching="continuous"` (the default
    with a `batch_size`) refills a slot with the next prompt as soon as its answer ends, prefilling it chunk by
    chunk over its own length while the other slots keep decoding, the whole job one compiled program
    (`engine.continuous`); `"static"` runs consecutive groups of B prompts, each to its slowest answer. Either
    way the answers are those of one call with every prompt (keys follow the row ids, not the slots).
    What holds in float32 and in bfloat16 (exactness, greedy equality, batch independence): module docstring.
    """
    mode = inputs.batching(batch_size, batching)
    if mode is not None:
        return _generate_batched(
            target, draft, prompts, mode, int(batch_size), max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids,
            confidence_threshold=confidence_threshold, draft_length=draft_length, row_ids=row_ids,
            unroll_layers=unroll_layers, prefill_chunk=prefill_chunk, schedule=schedule, sampler=sampler,
        )
    K, req, token_lists, shapes, stops = _prepare(
        target, draft, prompts, draft_length, row_ids, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, confidence_threshold=confidence_threshold,
        prefill_chunk=prefill_chunk, sampler=sampler,
    )
    plan = _schedule_params(target, draft, schedule, int(req.tokens.shape[0]), K)
    n = len(token_lists)
    max_new = to_host(req.max_new)[:n]
    t0 = time.perf_counter()
    if draft is None:
        with _placement(target):
            out, count = decode.generate_loop(target.graphdef, target.params, req, unroll_layers=bool(unroll_layers), **shapes)
        out, count = to_host(out), to_host(count)
        wall = time.perf_counter() - t0
        tokens, reasons = _finish(out, count, token_lists, max_new, stops)
        return GenerationResult(tokens=tokens, stats=_ar_stats(count[:n], tokens, reasons, wall,
                                                               (int(count.max()) - 1) * len(count)))
    with _placement(target):
        state = spec.generate_loop(target.graphdef, target.params, draft.graphdef, draft.params, req, K=K,
                                   unroll_layers=bool(unroll_layers), schedule=plan, **shapes)
    out, count = to_host(state.out), to_host(state.count)
    wall = time.perf_counter() - t0
    tokens, reasons = _finish(out, count, token_lists, max_new, stops)
    rounds = to_host(state.rounds)
    return GenerationResult(tokens=tokens, stats=_spec_stats(state, n, tokens, reasons, K, wall,
                                                             int(rounds.max()) * len(rounds)))


CONTINUOUS_CHUNK = 128  # prompt positions per slot refill step: a prompt pays for its length rounded up to this


def _generate_batched(target, draft, prompts, mode, B, *, prefill_chunk, unroll_layers, schedule, **settings) -> GenerationResult:
    """`generate` with `batch_size`: through B continuous slots, or in static groups of B."""
    n = len(prompts) if not isinstance(prompts, str) else 1
    if mode == "static":
        row_ids = inputs.row_ids(settings.pop("row_ids"), n)
        ids = list(range(n)) if row_ids is None else list(row_ids)
        per_row = {k: settings.pop(k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "confidence_threshold")}
        inputs.settings(n, **per_row)  # errors name the whole request's sizes, not one group's
        parts, t0 = [], time.perf_counter()
        for lo in range(0, n, B):
            group = {k: (v[lo: lo + B] if np.ndim(v) else v) for k, v in per_row.items()}
            parts.append(generate(target, draft, prompts[lo: lo + B], row_ids=ids[lo: lo + B], prefill_chunk=prefill_chunk,
                                  unroll_layers=unroll_layers, schedule=schedule, **group, **settings))
        return _concat(parts, time.perf_counter() - t0, draft, settings.get("draft_length"))
    draft_length = settings.pop("draft_length")
    row_ids = settings.pop("row_ids")
    chunk = min(int(prefill_chunk), CONTINUOUS_CHUNK) if isinstance(prefill_chunk, int) else prefill_chunk
    K, queue, token_lists, shapes, stops = _prepare(target, draft, prompts, draft_length, row_ids, prefill_chunk=chunk,
                                                    **settings)
    n = len(token_lists)
    shapes["chunk"] = min(shapes["chunk"], queue.tokens.shape[1])
    slots = dict(slots=bucket(min(B, n)))
    plan = _schedule_params(target, draft, schedule, slots["slots"], K)
    t0 = time.perf_counter()
    with _placement(target):
        if draft is None:
            job = continuous.ar_job(target.graphdef, target.params, queue, jnp.int32(n), **shapes, **slots)
        else:
            job = continuous.spec_job(target.graphdef, target.params, draft.graphdef, draft.params, queue, jnp.int32(n),
                                      plan, K=K, **shapes, **slots)
    results = {k: to_host(v) for k, v in job.results.items()}
    wall = time.perf_counter() - t0
    tokens, reasons = _finish(results["out"], results["count"], token_lists, to_host(queue.max_new)[:n], stops)
    paid = int(to_host(job.rounds_run)) * slots["slots"]
    if draft is None:
        return GenerationResult(tokens=tokens, stats=_ar_stats(results["count"][:n], tokens, reasons, wall, paid))
    return GenerationResult(tokens=tokens, stats=_spec_stats(results, n, tokens, reasons, K, wall, paid))


def _schedule_params(target: Target, draft: Draft | None, schedule, batch: int, K: int):
    """The traced scheduler inputs for `schedule="auto"` (None: fixed rounds, or no draft)."""
    from dspark_jax.engine import schedule as sched

    if isinstance(schedule, sched.ScheduleParams):  # an explicit cost model (tests, experiments)
        return None if draft is None else schedule
    if schedule not in ("auto", "fixed"):
        raise InputError(f"schedule={schedule!r} must be 'auto' or 'fixed'")
    if draft is None or schedule == "fixed":
        return None
    # built once per (target, draft, batch, K) and calibration file: reading the cost profile and the
    # calibration and moving them to the device cost a few milliseconds per call
    return schedule_plan(target, draft, batch, K)[0]


def schedule_plan(target: Target, draft: Draft, batch: int, K: int):
    """(`ScheduleParams`, `schedule.Costs`) of `schedule="auto"` for this target, draft, batch and K: the cost
    model (a stored `dspark-jax profile` for exactly this key, else the deterministic compiled-program model;
    `engine.schedule.schedule_costs`) and the draft's calibration. The first time per (target, draft, batch,
    K) it says on stderr, in one line, which cost model it uses."""
    from dspark_jax.engine import schedule as sched

    cal = sched.calibration_path(getattr(draft, "directory", None))
    key = (id(target), batch, K, cal.stat().st_mtime_ns if cal is not None and cal.is_file() else None)
    plans = _PLANS.setdefault(draft, {})
    ref, plan, costs = plans.get(key, (None, None, None))
    if ref is None or ref() is not target:
        costs = sched.schedule_costs(target, draft, batch, K)
        plan = sched.params_for(target, draft, batch, K, costs=costs)
        plans[key] = (weakref.ref(target), plan, costs)
        print(sched.describe_costs(costs, batch, K), file=sys.stderr, flush=True)
    return plan, costs


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # draft -> {key: (target ref, plan, Costs)}


def forget_plans(draft: Draft) -> None:
    """Drop the scheduler inputs built for `draft` (after `dspark_jax.profile` stored a new profile)."""
    _PLANS.pop(draft, None)


def _ar_stats(count, tokens, reasons, wall, slot_rounds=0) -> GenerationStats:
    steps = [[1] * max(0, int(c) - 1) for c in count]
    return GenerationStats.from_rounds(steps, [[0] * len(s) for s in steps], [[0] * len(s) for s in steps],
                                       [len(t) for t in tokens], reasons, 0, wall, slot_rounds)


def _concat(parts: list[GenerationResult], wall, draft, draft_length) -> GenerationResult:
    tokens = [t for p in parts for t in p.tokens]
    lists = [[row for p in parts for row in getattr(p.stats, f)]
             for f in ("acceptance_lengths", "proposal_lengths", "accepted_draft_lengths")]
    reasons = [r for p in parts for r in p.stats.finish_reasons]
    K = 0 if draft is None else _draft_length(draft, draft_length)
    paid = sum(p.stats.slot_rounds for p in parts)
    return GenerationResult(tokens, GenerationStats.from_rounds(*lists, [len(t) for t in tokens], reasons, K, wall, paid))


def _spec_stats(state, n, tokens, reasons, K, wall, slot_rounds=0) -> GenerationStats:
    if isinstance(state, dict):  # continuous batching's per-prompt results
        state = SimpleNamespace(**state)
    rounds = to_host(state.rounds)[:n]
    acc, prop, a = (to_host(x) for x in (state.acceptance_lengths, state.proposal_lengths, state.accepted_lengths))
    lists = [[row[: rounds[i]].tolist() for i, row in enumerate(arr[:n])] for arr in (acc, prop, a)]
    return GenerationStats.from_rounds(*lists, [len(t) for t in tokens], reasons, K, wall, slot_rounds)


def stream(
    target: Target,
    draft: Draft | None,
    prompts,
    *,
    max_new_tokens: int,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    seed=0,
    stop_token_ids: Sequence[int] | None = None,
    confidence_threshold=0.0,
    draft_length: int | None = None,
    row_ids: Sequence[int] | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    schedule: str = "auto",
    sampler: str = DEFAULT_SAMPLER,
) -> Iterator[list[list[int]]]:
    """Yield, after prefill and after every round, the tokens each prompt gained (a list per prompt).

    Runs the same compiled step as `generate` from Python, one round at a time, for notebooks and UIs.
    The concatenation of what is yielded equals `generate(...).tokens` for the same arguments. The arguments
    are validated when `stream` is called, before the first round.
    """
    K, req, token_lists, shapes, stops = _prepare(
        target, draft, prompts, draft_length, row_ids, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, confidence_threshold=confidence_threshold,
        prefill_chunk=prefill_chunk, sampler=sampler,
    )
    plan = _schedule_params(target, draft, schedule, int(req.tokens.shape[0]), K)
    return _stream_rounds(target, draft, K, req, token_lists, shapes, stops, plan)


def _stream_rounds(target, draft, K, req, token_lists, shapes, stops, plan=None) -> Iterator[list[list[int]]]:
    n = len(token_lists)
    max_new = np.asarray(req.max_new)[:n]
    stops = set(int(x) for x in stops)
    if draft is None:
        start = lambda: decode.start_jit(target.graphdef, target.params, req, **shapes)
        step = lambda s: decode.step_jit(target.graphdef, target.params, s)
    else:
        start = lambda: spec.start_jit(target.graphdef, target.params, draft.graphdef, draft.params, req, K=K, **shapes)
        step = lambda s: spec.spec_step(target.graphdef, target.params, draft.graphdef, draft.params, s, K=K,
                                        capacity=shapes["capacity"], schedule=plan)

    def advance(s):
        with _placement(target):
            return step(s)

    with _placement(target):
        state = start()
    emitted = [0] * n
    finished = [False] * n
    while True:
        out, count, done = np.asarray(state.out), np.asarray(state.count), np.asarray(state.done)
        fresh = []
        for i in range(n):
            new = []
            if not finished[i]:
                for x in out[i, emitted[i] : min(int(count[i]), int(max_new[i]))]:
                    new.append(int(x))
                    if int(x) in stops:
                        finished[i] = True
                        break
                emitted[i] += len(new)
            fresh.append(new)
        yield fresh
        if bool(np.all(done[:n])):
            return
        state = advance(state)
