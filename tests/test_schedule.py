"""The prefix scheduler (engine/schedule.py, docs/algorithm.md §4.4-§4.5) as a pure function, and why its
early stopping keeps speculative sampling exact: the paper's Appendix A counterexample, where a look-ahead
variant of the same walk (the best point of the whole walk, test-only here) biases the output and ours
does not. The sampling uses the engine's own `verify`."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.engine import schedule as sched
from dspark_jax.engine import verify as verify_mod
from dspark_jax.engine.sampling import row_keys

_schedule = jax.jit(sched.prefix_schedule, static_argnames=("early_stop",))


def _costs(sps):
    """Cost of verifying `n` drafts = 1 / SPS(1 + n) (one request)."""
    return jnp.asarray([1.0 / s for s in sps], jnp.float32)


def test_walk_admits_by_survival_and_stops_at_the_first_loss():
    # two rows; cost grows by 0.1 per verified draft: Theta = tau / (1 + 0.1 n)
    a = jnp.asarray([[0.9, 0.5, 0.1], [0.8, 0.7, 0.05]], jnp.float32)
    cost = 1.0 + 0.1 * jnp.arange(7, dtype=jnp.float32)
    lengths, theta = _schedule(a, jnp.array([True, True]), cost)
    # order 0.9 (r0), 0.8 (r1), 0.7 (r1), 0.5 (r0), 0.1, 0.05; Theta: 2, 2.64, 3.17, 3.38, 3.43, 3.07 -> stop
    assert lengths.tolist() == [2, 2]
    assert float(theta) == pytest.approx((2 + 0.9 + 0.8 + 0.7 + 0.5) / 1.4, rel=1e-5)
    # a cost that never pays: nobody verifies a draft
    lengths, theta = _schedule(a, jnp.array([True, True]), 1.0 + 2.0 * jnp.arange(7, dtype=jnp.float32))
    assert lengths.tolist() == [0, 0] and float(theta) == pytest.approx(2.0)


def test_dead_rows_never_influence_live_rows():
    rng = np.random.default_rng(0)
    a = np.cumprod(rng.uniform(0.3, 1.0, (6, 5)), axis=1).astype(np.float32)
    live = np.array([True, False, True, True, False, True])
    cost = 1.0 + 0.08 * jnp.arange(31, dtype=jnp.float32)
    base, theta = _schedule(jnp.asarray(a), jnp.asarray(live), cost)
    assert np.all(np.asarray(base)[~live] == 0)
    b = a.copy()
    b[~live] = 1.0  # the most tempting candidates, but in dead rows
    other, theta2 = _schedule(jnp.asarray(b), jnp.asarray(live), cost)
    assert np.asarray(other).tolist() == np.asarray(base).tolist() and float(theta2) == float(theta)


def test_admitted_set_is_a_prefix_with_ties():
    a = jnp.asarray([[1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 0.5, 0.5]], jnp.float32)
    lengths, _ = _schedule(a, jnp.array([True, True]), 1.0 + 0.01 * jnp.arange(9, dtype=jnp.float32))
    assert lengths.tolist() == [4, 4]
    # budget for exactly 3 drafts with 1.0 survival: ties go to smaller positions first
    cost = jnp.concatenate([jnp.ones(4), jnp.full((5,), 100.0)])
    lengths, _ = _schedule(a, jnp.array([True, True]), cost)
    assert sorted(lengths.tolist()) == [1, 2]


def test_global_search_differs_from_early_stopping_on_a_non_unimodal_path():
    # SPS = (1, 0.5, 0.45) of Appendix A with a confident block: stopping at the first loss keeps 0 drafts,
    # the whole walk finds 2
    a = jnp.asarray([[1.0, 1.0]], jnp.float32)
    cost = _costs([1.0, 0.5, 0.45])
    early, _ = _schedule(a, jnp.array([True]), cost, early_stop=True)
    look, theta = _schedule(a, jnp.array([True]), cost, early_stop=False)
    assert early.tolist() == [0] and look.tolist() == [2] and float(theta) == pytest.approx(1.35, rel=1e-5)


@functools.partial(jax.jit, static_argnames=("early_stop", "n", "seed"))
def _rounds(early_stop: bool, n: int, seed: int):
    """Appendix A: p_target = (0.7, 0.3) at every position, p_draft = (0.5, 0.5), SPS = (1, 0.5, 0.45);
    the confidence of draft 2 depends on draft 1 (c_2 = 1 after token 0, 0 after token 1), c_1 = 1.
    -> the frequency of each first output token over `n` independent rounds."""
    p_t = jnp.asarray([0.7, 0.3], jnp.float32)
    p_d = jnp.asarray([0.5, 0.5], jnp.float32)
    key = jax.random.key(seed)
    drafts = jax.random.bernoulli(key, 0.5, (n, 2)).astype(jnp.int32)
    c1 = jnp.ones((n,), jnp.float32)
    c2 = jnp.where(drafts[:, 0] == 0, 1.0, 0.0)
    survival = jnp.stack([c1, c1 * c2], axis=1)
    cost = _costs([1.0, 0.5, 0.45])
    lengths, _ = jax.vmap(lambda a: _schedule(a[None], jnp.array([True]), cost, early_stop=early_stop))(survival)
    lengths = lengths[:, 0]
    keys = row_keys(jnp.full((n,), seed + 1, jnp.uint32), jnp.arange(n, dtype=jnp.uint32))
    accepted, next_token, _ = verify_mod.verify(
        drafts, jnp.broadcast_to(p_d, (n, 2, 2)), jnp.broadcast_to(p_t, (n, 3, 2)), lengths,
        jnp.full((n, 1), -1, jnp.int32), keys, jnp.zeros((n,), jnp.int32),
    )
    return jnp.where(accepted > 0, drafts[:, 0], next_token), lengths


def _first_token_distribution(early_stop: bool, n: int = 40000, seed: int = 0):
    first, lengths = _rounds(early_stop, n, seed)
    return np.bincount(np.asarray(first), minlength=2) / n, np.asarray(lengths)


def test_appendix_a_counterexample_lookahead_biased_early_stopping_exact():
    n = 40000
    sigma = np.sqrt(0.7 * 0.3 / n)  # ~0.0023
    ours, ours_len = _first_token_distribution(early_stop=True, n=n)
    look, look_len = _first_token_distribution(early_stop=False, n=n)
    # the look-ahead walk verifies draft 1 exactly when it leads to a confident continuation ...
    assert set(np.unique(look_len)) == {0, 2}
    # ... which biases the first token towards 0: 0.5 + 0.5 * 0.7 = 0.85
    assert abs(look[0] - 0.85) < 5 * sigma
    assert look[0] - 0.7 > 30 * sigma
    # early stopping: the target distribution (0.7, 0.3)
    assert abs(ours[0] - 0.7) < 5 * sigma
    assert np.all(ours_len == 0)


def test_buckets_and_costs():
    assert sched.buckets(7) == (1, 4, 8)
    assert sched.buckets(1) == (1, 2)
    assert sched.buckets(4) == (1, 3, 5)
    assert int(sched.bucket_index(jnp.int32(3), 7)) == 1 and int(sched.bucket_index(jnp.int32(5), 7)) == 2
    assert int(sched.bucket_index(jnp.int32(1), 7)) == 0
    assert sched.monotone([1.0, 0.9, 1.2, 1.1]).tolist() == pytest.approx([1.0, 1.0, 1.2, 1.2])
    verify, draft = sched.constant_costs(7)
    params = sched.ScheduleParams(jnp.asarray(verify), jnp.float32(draft), jnp.ones(7), jnp.full((7,), 0.5))
    live = jnp.array([True, True, False, False])
    c = sched.round_costs(params, live, 7)
    assert c.shape == (4 * 7 + 1,)
    assert float(c[0]) == pytest.approx(1.0 + draft)  # anchors only
    assert float(c[14]) == pytest.approx(verify[-1] + draft)  # 7 drafts per live row = K + 1 tokens per row
    assert float(c[6]) == pytest.approx(verify[1] + draft)  # 3 drafts per row = 4 tokens per row
    assert np.all(np.diff(np.asarray(c)) >= 0)


def test_estimate_moves_towards_observations_and_relaxes_to_the_prior():
    prior = jnp.full((3,), 0.5)
    state_est = jnp.full((2, 4), -1.0)
    est = sched.estimate(state_est, prior, 3)
    assert np.allclose(est, 0.5)
    # row 0 verified 2 drafts, accepted 1: position 0 observed 1, position 1 observed 0, position 2 unobserved
    new = sched.update_estimate(state_est, est, prior, jnp.array([2, 0]), jnp.array([1, 0]), jnp.array([True, False]))
    assert new.shape == (2, 4)
    assert float(new[0, 0]) > 0.5 and float(new[0, 1]) < 0.5 and float(new[0, 2]) == pytest.approx(0.5)
    assert np.allclose(new[1, :3], 0.5)  # an inactive row keeps its (prior) estimate


# ------------------------------------------------------------------------------------------- in the round


def _plan(K, draft_cost=0.5, token_cost=0.15, prior=0.8):
    verify, _ = sched.constant_costs(K, token_cost=token_cost)
    return sched.ScheduleParams(jnp.asarray(verify), jnp.float32(draft_cost), jnp.ones((K,), jnp.float32),
                                jnp.full((K,), prior, jnp.float32))


@pytest.fixture(scope="module")
def mixed():
    from test_spec_greedy import CFG, DRAFT_CFG, PROMPTS, SUCCESSOR, random_target  # noqa: F401

    import dspark_jax as dj
    from dspark_jax.testing import synthetic

    target = synthetic.bigram_target(CFG, successor=SUCCESSOR, seed=1)
    draft = synthetic.oracle_draft(target, DRAFT_CFG, SUCCESSOR, accuracy=0.6, seed=3)
    plain = dj.generate(target, None, PROMPTS, max_new_tokens=28, stop_token_ids=[]).tokens
    return target, draft, PROMPTS, plain


def test_scheduled_rounds_are_lossless_and_compile_once(mixed):
    """Greedy output equals plain AR whatever the cost model makes the scheduler do (all AR steps, partial
    prefixes, whole blocks), and one compiled program serves every cost model, setting and seed."""
    import dspark_jax as dj
    from dspark_jax.engine import spec

    target, draft, prompts, plain = mixed
    K = 7
    before = spec.generate_loop._cache_size()
    seen = {}
    for name, plan in {"never": _plan(K, draft_cost=50.0), "default": _plan(K), "free": _plan(K, 0.0, 0.0, prior=1.0)}.items():
        result = dj.generate(target, draft, prompts, max_new_tokens=28, stop_token_ids=[], draft_length=K, schedule=plan)
        assert result.tokens == plain, name
        seen[name] = np.array([n for row in result.stats.proposal_lengths for n in row])
    assert spec.generate_loop._cache_size() - before == 1
    assert np.all(seen["never"] == 0)  # every round a plain AR step
    assert np.mean(seen["free"]) > 5  # verification is free: (nearly) whole blocks
    lengths = seen["default"]
    assert 0 < np.mean(lengths) < K and len(np.unique(lengths)) >= 2, np.bincount(lengths)  # AR steps and prefixes
    # sampled settings and seeds reuse the program
    dj.generate(target, draft, prompts, max_new_tokens=28, stop_token_ids=[], draft_length=K, schedule=_plan(K, 0.3),
                temperature=0.8, top_k=5, top_p=0.9, seed=3)
    assert spec.generate_loop._cache_size() - before == 1


def test_stream_with_schedule_matches_generate_and_compiles_once(mixed):
    import dspark_jax as dj
    from dspark_jax.engine import spec

    target, draft, prompts, plain = mixed
    before = spec.spec_step._cache_size()
    for temperature, seed in ((0.0, 0), (0.9, 4)):
        kwargs = dict(max_new_tokens=28, stop_token_ids=[], draft_length=7, temperature=temperature, seed=seed,
                      schedule=_plan(7))
        parts = [[] for _ in prompts]
        for fresh in dj.stream(target, draft, prompts, **kwargs):
            for i, new in enumerate(fresh):
                parts[i] += new
        assert parts == dj.generate(target, draft, prompts, **kwargs).tokens
    assert spec.spec_step._cache_size() - before == 1


def test_schedule_argument_is_checked(mixed):
    import dspark_jax as dj

    target, draft, prompts, _ = mixed
    with pytest.raises(dj.InputError, match="schedule"):
        dj.generate(target, draft, prompts, max_new_tokens=4, schedule="sometimes")


def test_cost_profile_is_monotone_in_ar_steps_and_cached_on_disk(mixed, tmp_path, monkeypatch):
    """The verify-cost profile (docs/algorithm.md §4.4): one entry per machine / target / draft / batch / K,
    profiled on first use within its time budget, read back from disk afterwards."""
    import time

    target, draft, _, _ = mixed
    monkeypatch.setenv("DSPARK_JAX_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    verify, draft_cost = sched.schedule_costs(target, draft, 2, 3, profile=True)
    assert time.perf_counter() - t0 < 60  # 15 s of timing after the compiles, on a loaded CI machine
    assert len(verify) == len(sched.buckets(3)) and verify[0] == 1.0
    assert np.all(np.diff(verify) >= 0) and draft_cost > 0
    table = json.loads((tmp_path / "verify_cost.json").read_text())
    assert [(e["batch"], e["K"]) for e in table.values()] == [(2, 3)]

    def no_profiling(*args, **kwargs):
        raise AssertionError("profiled again")

    monkeypatch.setattr(sched, "profile_costs", no_profiling)
    again = sched.schedule_costs(target, draft, 2, 3, profile=True)
    np.testing.assert_array_equal(again[0], verify)
    assert again[1] == draft_cost
    with pytest.raises(AssertionError, match="profiled again"):  # another batch size is another entry
        sched.schedule_costs(target, draft, 4, 3, profile=True)
    off, fallback = sched.schedule_costs(target, draft, 4, 3, profile=False), sched.constant_costs(3)
    np.testing.assert_array_equal(off[0], fallback[0])
    assert off[1] == fallback[1]
