"""Sampled speculative decoding follows the target distribution exactly.

On a tiny vocabulary (V = 8) we draw N independent samples of the first three generated tokens (one batch
row each) and compare their empirical distribution over all 512 outcomes with the exact target
distribution, computed independently: transformers' forward of the same checkpoint over every continuation,
processed with transformers' own temperature / top-k / top-p logits warpers.

Both round kinds are checked: `schedule="fixed"` (whole blocks, or the confidence-threshold prefix) and
`schedule="auto"` (the prefix scheduler picks each row's verified length from its confidences, and a round
may run as a plain AR step), the latter with a fixed cost model so the schedule does not depend on the
machine.

Stated bound: total-variation distance <= 0.01. With N = 2**15 the TV of an exact sampler's empirical
distribution is ~0.05 (512 outcomes), so the 0.01 bound applies to the *excess* over that noise floor, which
we estimate from the exact distribution itself (mean TV of exact samplers' empirical distributions); a
chi-square goodness-of-fit test (p > 1e-4) additionally guards against systematic deviations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import qwen3
from scipy import stats as scistats
from spec_helpers import PROMPT, SETTINGS, STEPS, V, empirical, exact_distribution

import dspark_jax as dj
from dspark_jax.testing import synthetic

N = 2**15


def auto_plan(K, draft_cost=0.5, token_cost=0.15, prior=0.8):
    """A machine-independent cost model for `schedule="auto"` (engine/schedule.py)."""
    import jax.numpy as jnp

    from dspark_jax.engine import schedule as sched

    verify, _ = sched.constant_costs(K, token_cost=token_cost)
    return sched.ScheduleParams(jnp.asarray(verify), jnp.float32(draft_cost), jnp.ones((K,), jnp.float32),
                                jnp.full((K,), prior, jnp.float32))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_v8")
    hf = qwen3(
        directory, seed=3, vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )
    with torch.no_grad():  # sharper logits than the default init so the distributions are far from uniform
        hf.lm_head.weight.mul_(6.0)
    hf.save_pretrained(directory)
    target = dj.load_target(directory, dtype="float32")
    cfg = synthetic.draft_config_for(target.config, num_layers=1, markov_rank=8, target_layer_ids=(0,), mask_token_id=V - 1)
    # A draft that roughly knows the target: its Markov head encodes the target's greedy successor of each
    # token after the prompt, for 70% of the tokens, at a strength that keeps its distributions soft.
    with torch.no_grad():
        last = hf(torch.as_tensor([PROMPT + [x] for x in range(V)])).logits[:, -1]
    successor = last.argmax(-1).numpy()
    draft = synthetic.oracle_draft(target, cfg, successor, accuracy=0.7, strength=2.0, seed=4)
    return hf, target, draft


@pytest.mark.parametrize("K", [1, pytest.param(3, marks=pytest.mark.slow), 7])  # K=3 runs with -m slow
def test_speculative_sampling_matches_target(setup, K):
    hf, target, draft = setup
    rng = np.random.default_rng(K)
    for setting in SETTINGS:
        exact = exact_distribution(hf, setting).reshape(-1).astype(np.float64)
        exact /= exact.sum()
        noise = np.mean([0.5 * np.abs(rng.multinomial(N, exact) / N - exact).sum() for _ in range(20)])
        for schedule, threshold in (("fixed", 0.0), ("fixed", 0.5), ("auto", 0.0)):
            result = dj.generate(
                target, draft, [PROMPT] * N, max_new_tokens=STEPS, stop_token_ids=[], draft_length=K,
                confidence_threshold=threshold, seed=100 * K + int(10 * threshold) + (schedule == "auto"),
                schedule=auto_plan(K) if schedule == "auto" else schedule, **setting,
            )
            assert all(len(t) == STEPS for t in result.tokens)
            emp = empirical(result.tokens)
            tv = 0.5 * np.abs(emp - exact).sum()
            case = f"K={K} {setting} {schedule} threshold={threshold}"
            assert tv - noise <= 0.01, f"{case}: TV {tv:.4f} vs noise {noise:.4f}"
            support = exact > 0
            assert emp[~support].sum() == 0, "sampled a token the processed target distribution excludes"
            expected = exact * N
            common = expected >= 5  # chi-square needs expected counts >= 5: pool the rare outcomes into one bin
            observed, expected = emp[common] * N, expected[common]
            if exact[~common].sum() > 0:
                observed = np.append(observed, emp[~common].sum() * N)
                expected = np.append(expected, exact[~common].sum() * N)
            chi2 = scistats.chisquare(observed, expected)
            assert chi2.pvalue > 1e-4, f"{case}: chi-square p={chi2.pvalue:.2e}"
            # the check is only meaningful if drafts are sometimes accepted and sometimes rejected,
            # and (with a threshold) if the confidence head sometimes truncates the proposal
            firsts = [row[0] for row in result.stats.accepted_draft_lengths]
            proposed = np.mean([row[0] for row in result.stats.proposal_lengths])
            rate = np.mean([a > 0 for a in firsts])
            scheduled = np.array([n for row in result.stats.proposal_lengths for n in row])
            if schedule == "auto":
                # the scheduler verified drafts, and (K > 1) fewer than the whole block
                assert 0.02 < rate < 0.98, f"{case}: first-draft acceptance rate {rate:.3f}"
                assert (scheduled > 0).mean() > 0.05, f"{case}: {np.bincount(scheduled)}"
                if K > 1:
                    assert (scheduled < K).mean() > 0.05, f"{case}: {np.bincount(scheduled)}"
            elif threshold == 0:
                assert 0.02 < rate < 0.98, f"first-draft acceptance rate {rate:.3f}"
                assert proposed == K
            else:
                assert 0 < proposed < K, f"mean first-round proposal length {proposed:.2f}"


def test_rounds_that_fall_back_to_ar_steps_sample_the_target(setup):
    """A cost model under which speculation never pays: rounds are plain AR steps (no draft forward) but for the
    scheduler's backing-off probe rounds, and the output still follows the target distribution."""
    hf, target, draft = setup
    setting = SETTINGS[1]
    exact = exact_distribution(hf, setting).reshape(-1).astype(np.float64)
    exact /= exact.sum()
    noise = np.mean([0.5 * np.abs(np.random.default_rng(9).multinomial(N, exact) / N - exact).sum() for _ in range(20)])
    result = dj.generate(target, draft, [PROMPT] * N, max_new_tokens=STEPS, stop_token_ids=[], draft_length=3, seed=5,
                         schedule=auto_plan(3, draft_cost=50.0), **setting)
    # plain steps everywhere but the probe rounds (docs/algorithm.md §4.5), which back off when they do not pay
    rounds = [n for row in result.stats.proposal_lengths for n in row]
    assert sum(n == 0 for n in rounds) >= 0.5 * len(rounds), rounds
    gained = [a for row in result.stats.acceptance_lengths for a in row]
    assert all(a == 1 for n, a in zip(rounds, gained) if n == 0)  # a plain step gains one token
    tv = 0.5 * np.abs(empirical(result.tokens) - exact).sum()
    assert tv - noise <= 0.01, f"TV {tv:.4f} vs noise {noise:.4f}"
