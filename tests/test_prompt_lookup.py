"""The prompt-lookup proposer: what it proposes, and that decoding with it is lossless (greedy token for
token, sampled in distribution), through the same engine as trained drafts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import qwen3
from scipy import stats as scistats
from spec_helpers import PROMPT, SETTINGS, STEPS, V, empirical, exact_distribution
from test_spec_greedy import CFG, SUCCESSOR, random_target

import dspark_jax as dj
from dspark_jax.config import SamplingParams
from dspark_jax.errors import ConfigError
from dspark_jax.testing import synthetic


def _propose(history, anchor, K=4, **kwargs):
    proposer = dj.prompt_lookup(draft_length=K, **kwargs).module
    C = 32
    state = proposer.init_state(1, C)
    state = proposer.extend(state, jnp.asarray([history], jnp.int32), None, jnp.zeros(1, jnp.int32))
    p = proposer.propose(state, jnp.asarray([anchor]), jnp.asarray([len(history)]), SamplingParams.create(1), None, K)
    n = int(p.num_proposed[0])
    return np.asarray(p.tokens[0])[:n].tolist()


def test_lookup_takes_the_latest_longest_match():
    # suffix [7, 8]: an earlier "7 8" is followed by 1 2 (first) and 3 4 (latest): the latest wins
    assert _propose([7, 8, 1, 2, 7, 8, 3, 4, 0, 7], 8) == [3, 4, 0, 7]
    # the longer n-gram decides over a more recent shorter one: "5 7 8" -> 9, though "8" alone last -> 6
    assert _propose([5, 7, 8, 9, 1, 8, 6, 2, 5, 7], 8, max_ngram=3) == [9, 1, 8, 6]
    # drafts stop where the context ends
    assert _propose([4, 5, 6, 4], 5) == [6, 4, 5]
    # nothing to copy: nothing proposed
    assert _propose([1, 2, 3], 9) == []
    # min_ngram above what matches: nothing proposed
    assert _propose([1, 2, 3, 2], 9, min_ngram=2, max_ngram=3) == []


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="max_ngram"):
        dj.prompt_lookup(max_ngram=0)
    with pytest.raises(ConfigError, match="min_ngram"):
        dj.prompt_lookup(min_ngram=3, max_ngram=2)
    target = random_target()
    with pytest.raises(ConfigError, match="confidence head"):
        dj.generate(target, dj.prompt_lookup(), [[1, 2]], max_new_tokens=4, confidence_threshold=0.5)
    with pytest.raises(ConfigError, match="maximum 3"):
        dj.generate(target, dj.prompt_lookup(draft_length=3), [[1, 2]], max_new_tokens=4, draft_length=5)


def _chain(start, n):
    out = [start]
    for _ in range(n - 1):
        out.append(int(SUCCESSOR[out[-1]]))
    return out


@pytest.fixture(scope="module")
def targets():
    return {"random": random_target(), "bigram": synthetic.bigram_target(CFG, successor=SUCCESSOR, seed=1)}


# ragged prompts; some repeat themselves (lookup finds drafts), some do not
PROMPTS = [[3, 9, 27, 3, 9, 27, 3, 9], _chain(5, 12) + [5], [101], _chain(40, 20) + _chain(40, 3)]
NEW = 28


@pytest.mark.parametrize("K", [pytest.param(1, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow), 7])  # K=1, 3 with -m slow
@pytest.mark.parametrize("kind", ["random", "bigram"])
def test_greedy_prompt_lookup_equals_plain_greedy(targets, kind, K):
    target = targets[kind]
    plain = dj.generate(target, None, PROMPTS, max_new_tokens=NEW, stop_token_ids=[]).tokens
    result = dj.generate(target, dj.prompt_lookup(draft_length=K), PROMPTS, max_new_tokens=NEW, stop_token_ids=[])
    assert result.tokens == plain
    if kind == "bigram":  # the greedy continuation repeats the prompt's chains: lookup drafts get accepted
        assert result.stats.mean_acceptance_length > 1.5 or K == 1


def test_prompt_lookup_stop_tokens_cut_like_plain_greedy(targets):
    target = targets["bigram"]
    plain = dj.generate(target, None, PROMPTS, max_new_tokens=NEW, stop_token_ids=[]).tokens
    stops = [plain[1][6], plain[3][9]]
    ar = dj.generate(target, None, PROMPTS, max_new_tokens=NEW, stop_token_ids=stops).tokens
    sp = dj.generate(target, dj.prompt_lookup(), PROMPTS, max_new_tokens=NEW, stop_token_ids=stops)
    assert sp.tokens == ar
    assert sp.stats.finish_reasons[1] == "stop"


def test_stream_with_prompt_lookup(targets):
    target = targets["bigram"]
    pieces = [[] for _ in PROMPTS]
    for fresh in dj.stream(target, dj.prompt_lookup(), PROMPTS, max_new_tokens=NEW, stop_token_ids=[]):
        for row, new in zip(pieces, fresh):
            row.extend(new)
    assert pieces == dj.generate(target, None, PROMPTS, max_new_tokens=NEW, stop_token_ids=[]).tokens


N = 2**15


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_v8_lookup")
    hf = qwen3(directory, seed=3, vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with torch.no_grad():  # sharper than the default init, soft enough that copied drafts are often accepted
        hf.lm_head.weight.mul_(2.0)
    hf.save_pretrained(directory)
    return hf, dj.load_target(directory, dtype="float32")


@pytest.mark.parametrize("K", [pytest.param(3, marks=pytest.mark.slow), 7])
def test_prompt_lookup_sampling_matches_target(tiny, K):
    """Sampled decoding with prompt lookup follows the exact processed target distribution (same bounds as
    test_spec_sampling: TV excess over the exact sampler's noise floor <= 0.01, pooled chi-square p > 1e-4)."""
    hf, target = tiny
    rng = np.random.default_rng(K)
    for setting in SETTINGS:
        exact = exact_distribution(hf, setting).reshape(-1).astype(np.float64)
        exact /= exact.sum()
        noise = np.mean([0.5 * np.abs(rng.multinomial(N, exact) / N - exact).sum() for _ in range(20)])
        result = dj.generate(target, dj.prompt_lookup(draft_length=K), [PROMPT] * N, max_new_tokens=STEPS,
                             stop_token_ids=[], seed=7 + K, **setting)
        emp = empirical(result.tokens)
        tv = 0.5 * np.abs(emp - exact).sum()
        assert tv - noise <= 0.01, f"K={K} {setting}: TV {tv:.4f} vs noise {noise:.4f}"
        assert emp[exact == 0].sum() == 0, "sampled a token the processed target distribution excludes"
        expected = exact * N
        common = expected >= 5
        observed, expected = emp[common] * N, expected[common]
        if exact[~common].sum() > 0:
            observed = np.append(observed, emp[~common].sum() * N)
            expected = np.append(expected, exact[~common].sum() * N)
        assert scistats.chisquare(observed, expected).pvalue > 1e-4
        # meaningful only if lookup proposed drafts that were sometimes accepted and sometimes rejected
        proposed = np.array([n for row in result.stats.proposal_lengths for n in row])
        accepted = np.array([a for row in result.stats.accepted_draft_lengths for a in row])
        assert (proposed > 0).mean() > 0.2
        rate = (accepted[proposed > 0] > 0).mean()
        assert 0.05 < rate < 0.95, f"acceptance of the first draft over rounds that proposed: {rate:.3f}"
