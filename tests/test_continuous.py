"""Continuous batching (`generate(..., batch_size=B)`) gives every prompt the answer it gets alone.

A mixed job (prompts of 1 to 300 tokens, budgets of 1 to 128 tokens, stop tokens that really fire) runs
through fewer slots than prompts, so slots are refilled while others decode: in fp32 greedy its answers
equal one static batch of every prompt and batch-1 slots, with a tiny DSpark pair and plain AR; with
`-m slow` also static groups, the very same fixed rounds, prompt lookup, EAGLE-3 and DeepSeek MTP proposers, and a Gemma 4 target whose
sliding ring is shorter than the prompts. Sampled answers do not depend on the slot count; the job is one compiled program
whatever prompts enter and leave.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import dspark_jax as dj
from dspark_jax import assets
from dspark_jax.engine import continuous
from dspark_jax.errors import InputError
from dspark_jax.testing import mtp as synthetic_mtp
from dspark_jax.testing import synthetic, synthetic_eagle3

LENGTHS = [5, 40, 130, 17, 300, 1, 64, 200, 33, 9]
BUDGETS = [1, 20, 7, 128, 12, 2, 40, 5, 16, 64]


def _prompts(vocab: int, lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def builtin():
    return dj.load_target(assets.TARGET, dtype="float32"), dj.load_draft(assets.DSPARK_DRAFT, dtype="float32")


@pytest.fixture(scope="module")
def tiny():
    """A tiny Qwen3 bigram target with a DSpark draft right 60% of the time (partial acceptances), the mixed
    job, and a stop set chosen from the plain answers, so that stops fire mid-answer."""
    from test_spec_greedy import CFG, DRAFT_CFG, SUCCESSOR

    target = synthetic.bigram_target(CFG, successor=SUCCESSOR, seed=1)
    draft = synthetic.oracle_draft(target, DRAFT_CFG, SUCCESSOR, accuracy=0.6, seed=3)
    prompts = _prompts(CFG.vocab_size)
    free = dj.generate(target, None, prompts, max_new_tokens=BUDGETS, stop_token_ids=[])
    longest = free.tokens[BUDGETS.index(max(BUDGETS))]
    late = lambda t: t not in longest[:48]  # keep the longest answer running past 48 tokens
    stops = sorted(t for t in {row[len(row) // 2] for row in free.tokens if len(row) > 8} if late(t))[:2]
    return target, draft, prompts, stops


@pytest.mark.parametrize("with_draft", [True, False], ids=["dspark", "ar"])
def test_continuous_equals_static_and_batch_one(tiny, with_draft):
    target, draft, prompts, stops = tiny
    draft = draft if with_draft else None
    run = lambda **kw: dj.generate(target, draft, prompts, max_new_tokens=BUDGETS, stop_token_ids=stops, **kw)
    static = run()
    reasons = static.stats.finish_reasons
    assert "stop" in reasons and "length" in reasons
    assert min(len(t) for t in static.tokens) == 1 and max(len(t) for t in static.tokens) > 40
    if with_draft:
        assert 1.5 < static.stats.mean_acceptance_length < 7  # partial acceptances: ragged slots
    for kwargs in [dict(batch_size=3), dict(batch_size=1)]:
        got = run(**kwargs)
        assert got.tokens == static.tokens, kwargs
        assert got.stats.finish_reasons == reasons


@pytest.mark.slow
def test_static_groups_and_fixed_rounds(tiny):
    """Static groups of 3 give the same answers as one static batch, and with fixed rounds continuous slots
    run the very same rounds, prompt by prompt."""
    target, draft, prompts, stops = tiny
    run = lambda **kw: dj.generate(target, draft, prompts, max_new_tokens=BUDGETS, stop_token_ids=stops, **kw)
    assert run(batch_size=3, batching="static").tokens == run().tokens
    fixed = run(schedule="fixed")
    assert run(schedule="fixed", batch_size=3).stats.acceptance_lengths == fixed.stats.acceptance_lengths


def test_sampled_answers_do_not_depend_on_slots(builtin):
    target, draft = builtin
    prompts = _prompts(target.config.vocab_size)
    # fixed rounds: a sampled answer's realisation follows its round structure, which the "auto" scheduler
    # decides for the batch as a whole (the distribution is exact either way, tests/test_spec_sampling.py)
    budgets = [min(b, 16) for b in BUDGETS]  # refills still happen: 10 prompts through 2 slots
    run = lambda seed=7, **kw: dj.generate(target, draft, prompts, max_new_tokens=budgets, temperature=1.0, top_p=0.9,
                                           seed=seed, stop_token_ids=[], schedule="fixed", **kw).tokens
    alone = run()
    assert run(batch_size=2) == alone
    assert run(seed=8, batch_size=2) != alone  # the seed matters, so the equalities above could have failed


def test_one_program_whatever_enters_and_leaves(tiny):
    target, draft, _, _ = tiny
    budgets = [min(b, 24) for b in BUDGETS]
    dj.generate(target, draft, _prompts(target.config.vocab_size), max_new_tokens=budgets, batch_size=8)  # compiled before
    before = continuous.spec_job._cache_size()
    other = _prompts(target.config.vocab_size, lengths=[290, 3, 77, 12, 140, 8, 2, 60, 99, 31], seed=3)
    dj.generate(target, draft, other, max_new_tokens=budgets[::-1], batch_size=8, temperature=[0.0, 1.0] * 5, seed=2)
    assert continuous.spec_job._cache_size() == before


def test_bad_batching_arguments_are_named(builtin):
    target, draft = builtin
    with pytest.raises(InputError, match="batch_size"):
        dj.generate(target, draft, [[1, 2]], max_new_tokens=4, batch_size=0)
    with pytest.raises(InputError, match="batching"):
        dj.generate(target, draft, [[1, 2]], max_new_tokens=4, batch_size=2, batching="dynamic")
    with pytest.raises(InputError, match="needs batch_size"):
        dj.generate(target, draft, [[1, 2]], max_new_tokens=4, batching="static")


def _tiny_qwen3():
    from test_spec_greedy import CFG, random_target

    return CFG, random_target()


@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["prompt_lookup", "eagle3", "mtp"])
def test_other_proposers(proposer):
    if proposer == "mtp":
        from test_deepseek_mtp import _random_target

        target = _random_target()
        draft = synthetic_mtp.random_mtp(target, seed=2)
    else:
        cfg, target = _tiny_qwen3()
        if proposer == "eagle3":
            draft = synthetic_eagle3.random_draft(target, synthetic_eagle3.config_for(cfg, target_layer_ids=(0, 1, 2)), seed=2)
        else:
            draft = dj.prompt_lookup(draft_length=5, max_ngram=2)
    prompts = [p % target.config.vocab_size for p in map(np.asarray, _prompts(target.config.vocab_size, LENGTHS[:7], 1))]
    prompts = [np.concatenate([p, p[: len(p) // 2]]).tolist() for p in prompts]  # repeats, for prompt lookup
    budgets = BUDGETS[:7]
    plain = dj.generate(target, None, prompts, max_new_tokens=budgets, stop_token_ids=[]).tokens
    assert dj.generate(target, draft, prompts, max_new_tokens=budgets, stop_token_ids=[], batch_size=2).tokens == plain


@pytest.mark.slow
def test_gemma4_sliding_ring_shorter_than_prompts():
    from test_gemma4_spec import CFG, DRAFT_CFG, WINDOW, random_target

    target = random_target()
    draft = synthetic.random_draft(target, DRAFT_CFG, seed=2)
    lengths = [3, 25, 1, 60, 9, 41]
    assert max(lengths) > 4 * WINDOW
    prompts = _prompts(CFG.vocab_size, lengths, seed=4)
    budgets = [30, 4, 17, 1, 25, 9]
    plain = dj.generate(target, None, prompts, max_new_tokens=budgets, stop_token_ids=[]).tokens
    got = dj.generate(target, draft, prompts, max_new_tokens=budgets, stop_token_ids=[], batch_size=2, prefill_chunk=16)
    assert got.tokens == plain


def test_slot_axes_follow_the_contracts(builtin):
    """Every cache leaf has exactly one batch axis, found from `init_cache(1)` vs `init_cache(2)`."""
    target, draft = builtin
    model = nnx.merge(target.graphdef, target.params)
    axes = continuous.batch_axes(lambda b: model.init_cache(b, 64, max_block=8))
    assert set(jax.tree.leaves(axes)) == {1}  # stacked [layers, batch, slots, heads, dim]
    proposer = nnx.merge(draft.graphdef, draft.params)
    assert jax.tree.leaves(continuous.batch_axes(lambda b: proposer.init_state(b, 64)))


def _full_cache_copies(model, capacity: int, batch: int = 4, block: int = 8) -> tuple[int, int]:
    """(copies of a whole stacked cache array in the compiled program of 20 target forwards in a loop, the
    number of cache arrays)."""
    import jax.numpy as jnp

    def run(cache, lengths):
        tokens = jnp.ones((batch, block), jnp.int32)
        return jax.lax.fori_loop(0, 20, lambda i, c: model(tokens, lengths + i * block, c)[1], cache)

    cache = model.init_cache(batch, capacity, max_block=block)
    text = jax.jit(run).lower(cache, jnp.zeros((batch,), jnp.int32)).compile().as_text()
    shapes = {f"[{','.join(map(str, leaf.shape))}]" for leaf in jax.tree.leaves(cache) if capacity in leaf.shape}
    copies = sum(1 for line in text.splitlines() if " copy(" in line and any(sh in line.split("=", 1)[1][:60] for sh in shapes))
    return copies, sum(1 for leaf in jax.tree.leaves(cache) if capacity in leaf.shape)


@pytest.mark.parametrize("family", ["qwen3", "gemma4", "deepseek_v3"])
def test_forwards_write_linear_caches_in_place(family):
    """A forward writes its block into the stacked linear caches in place and reads each row only to its used
    extent (docs/caches.md §10): a loop of forwards copies no whole cache array, so a round costs what the
    rows use, not the capacity. (Before, the layer scan sliced and restacked every cache layer.)"""
    if family == "qwen3":
        from test_spec_greedy import CFG

        target = synthetic.bigram_target(CFG, successor=synthetic.random_permutation_successor(CFG.vocab_size, 5), seed=1)
    elif family == "gemma4":
        from test_gemma4_spec import random_target

        target = random_target()
    else:
        from test_deepseek_mtp import _random_target

        target = _random_target()
    model = nnx.merge(target.graphdef, target.params)
    copies, arrays = _full_cache_copies(model, 640)
    assert copies <= arrays  # at most one copy of each argument into the loop's own buffers


def _v4_bigram_target():
    from test_deepseek_v4_mtp import SPEC_CFG

    from dspark_jax.models.deepseek_v4 import DeepseekV4Config
    from dspark_jax.testing import mtp_v4

    cfg = DeepseekV4Config(**SPEC_CFG)
    return mtp_v4.bigram_target(cfg, synthetic.random_permutation_successor(cfg.vocab_size, 5), seed=1)


@pytest.mark.slow
def test_deepseek_v4_target_runs_whole_caches():
    target = _v4_bigram_target()
    prompts = [[3, 9, 27], list(range(40, 53)), [5, 6]]
    plain = dj.generate(target, None, prompts, max_new_tokens=20, stop_token_ids=[]).tokens
    assert dj.generate(target, None, prompts, max_new_tokens=20, stop_token_ids=[], batch_size=2).tokens == plain
