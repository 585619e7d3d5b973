"""Greedy speculative decoding is lossless: it equals plain greedy decoding token for token.

Batched with ragged prompts, for a random draft (tau ~ 1), an oracle draft (tau = K + 1) and a mixed one,
K in {1, 3, 7}; plus one compilation across rounds and settings, per-row independence, and `stream`.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from spec_helpers import greedy_arms, plain_greedy

import dspark_jax as dj
from dspark_jax.config import RopeConfig
from dspark_jax.engine import spec
from dspark_jax.models.qwen3 import Qwen3Config
from dspark_jax.testing import synthetic

CFG = Qwen3Config(
    model_type="qwen3",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope=RopeConfig(theta=1e6),
    max_position_embeddings=512,
)
DRAFT_CFG = synthetic.draft_config_for(CFG, num_layers=1, markov_rank=32)
SUCCESSOR = synthetic.random_permutation_successor(CFG.vocab_size, seed=5)
PROMPTS = [[3, 9, 27], list(range(40, 53)), [101], list(range(7, 33))]
NEW = 28


def random_target(seed=0, std=0.15):
    """Random weights large enough that logits are decisive (greedy far from ties)."""
    t = dj.Target.random(CFG, seed=seed)
    params = jax.tree.map(lambda x: x * (std / 0.02), t.params)
    flat = dict(__import__("flax").nnx.to_flat_state(params))
    for path, var in flat.items():
        if "norm" in str(path[-1]):
            var.set_value(np.ones(var.get_value().shape, np.float32))
    return t.with_params(params)


@pytest.fixture(scope="module")
def models():
    return greedy_arms(random_target(), synthetic.bigram_target(CFG, successor=SUCCESSOR, seed=1), DRAFT_CFG, SUCCESSOR)


@pytest.fixture(scope="module")
def plain(models):
    return plain_greedy(models, PROMPTS, NEW)


@pytest.mark.parametrize("K", [1, pytest.param(3, marks=pytest.mark.slow), 7])  # K=3 runs with -m slow
@pytest.mark.parametrize("kind", ["random", "oracle", "mixed"])
def test_greedy_speculative_equals_plain_greedy(models, plain, kind, K):
    target, draft = models[kind]
    result = dj.generate(target, draft, PROMPTS, max_new_tokens=NEW, stop_token_ids=[], draft_length=K)
    assert result.tokens == plain[kind]
    assert all(len(t) == NEW for t in result.tokens)
    tau = result.stats.mean_acceptance_length
    if kind == "oracle":
        # every round accepts all the drafts it verified plus the bonus token (schedule="auto" may verify fewer
        # than K)
        stats = result.stats
        assert all(a == n + 1 for row_a, row_n in zip(stats.acceptance_lengths, stats.proposal_lengths)
                   for a, n in zip(row_a, row_n))
        assert stats.mean_acceptance_length > 1.5 or K == 1
    elif kind == "random":
        assert tau < 1.3
    else:
        assert 1.05 < tau < K + 1 or K == 1


@pytest.mark.parametrize("kind", ["oracle", "mixed"])
def test_greedy_fixed_rounds_equal_plain_greedy(models, plain, kind):
    """`schedule="fixed"`: whole blocks every round (the reference's semantics)."""
    target, draft = models[kind]
    result = dj.generate(target, draft, PROMPTS, max_new_tokens=NEW, stop_token_ids=[], draft_length=7, schedule="fixed")
    assert result.tokens == plain[kind]
    assert all(n == 7 for row in result.stats.proposal_lengths for n in row[:-1])
    if kind == "oracle":
        assert all(all(a == 8 for a in row) for row in result.stats.acceptance_lengths)


def test_stop_tokens_cut_like_plain_greedy(models, plain):
    target, draft = models["mixed"]
    stops = [plain["mixed"][0][10], plain["mixed"][2][5]]
    ar = dj.generate(target, None, PROMPTS, max_new_tokens=NEW, stop_token_ids=stops).tokens
    sp = dj.generate(target, draft, PROMPTS, max_new_tokens=NEW, stop_token_ids=stops)
    assert sp.tokens == ar
    for row in sp.tokens:
        assert sum(t in stops for t in row) <= 1 and (row[-1] in stops or len(row) == NEW)
    assert sp.stats.finish_reasons[0] == "stop"


def test_one_compilation_across_settings(models):
    target, draft = models["mixed"]
    before = spec.generate_loop._cache_size()
    for temperature, top_k, top_p, seed, threshold in [(0.0, 0, 1.0, 0, 0.0), (0.8, 5, 0.9, 1, 0.3), (1.3, 0, 0.5, 7, 0.9)]:
        dj.generate(
            target, draft, PROMPTS, max_new_tokens=NEW, stop_token_ids=[], draft_length=3, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, confidence_threshold=threshold,
        )
    assert spec.generate_loop._cache_size() - before <= 1

    before_step = spec.spec_step._cache_size()
    rounds = 0
    for temperature, threshold in [(0.0, 0.0), (0.9, 0.5)]:
        for _ in dj.stream(target, draft, PROMPTS, max_new_tokens=12, stop_token_ids=[], draft_length=3,
                           temperature=temperature, confidence_threshold=threshold):
            rounds += 1
    assert rounds > 4
    assert spec.spec_step._cache_size() - before_step == 1


def test_row_independent_of_batch_mates(models):
    """A row's sampled output depends only on (seed, row id), not on the other rows of its batch, with fixed
    rounds. (With `schedule="auto"` a row's verified lengths depend on the batch's cost, so the same seed can
    give another, equally exact, sample; greedy output does not change.)"""
    target, draft = models["random"]
    kwargs = dict(max_new_tokens=NEW, stop_token_ids=[], draft_length=3, temperature=2.0, seed=11, schedule="fixed")
    alone = dj.generate(target, draft, [PROMPTS[1]], row_ids=[1], **kwargs).tokens[0]
    together = dj.generate(target, draft, PROMPTS, **kwargs).tokens
    assert together[1] == alone
    twins = dj.generate(target, draft, [PROMPTS[1]] * 4, **kwargs).tokens
    assert len({tuple(t) for t in twins}) > 1, "identical prompts in one batch must be independent samples"


def test_stream_yields_what_generate_returns(models):
    target, draft = models["mixed"]
    kwargs = dict(max_new_tokens=NEW, stop_token_ids=[], draft_length=7, temperature=0.7, seed=3)
    pieces = [[] for _ in PROMPTS]
    for fresh in dj.stream(target, draft, PROMPTS, **kwargs):
        for row, new in zip(pieces, fresh):
            row.extend(new)
    assert pieces == dj.generate(target, draft, PROMPTS, **kwargs).tokens


@pytest.mark.parametrize("kind", ["mixed"])
def test_unrolled_layers_give_identical_outputs(models, kind):
    """`unroll_layers` changes how the layer loop is compiled, never what it computes."""
    target, draft = models[kind]
    kwargs = dict(max_new_tokens=NEW, stop_token_ids=[], temperature=0.9, seed=5)
    for d in (None, draft):
        scanned = dj.generate(target, d, PROMPTS, **kwargs)
        unrolled = dj.generate(target, d, PROMPTS, unroll_layers=True, **kwargs)
        assert unrolled.tokens == scanned.tokens
        assert unrolled.stats.acceptance_lengths == scanned.stats.acceptance_lengths
