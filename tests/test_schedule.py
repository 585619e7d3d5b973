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


def test_estimate_moves_towards_observations_and_keeps_unobserved_positions():
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
    # every round a plain AR step but the probe rounds (whole blocks), which back off: rounds 2, 7, 16 (28 tokens)
    assert set(np.unique(seen["never"])) <= {0, K} and np.sum(seen["never"] == K) <= 3 * len(prompts)
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


def test_probe_countdown_doubles_on_failure_and_restarts_on_success():
    live = jnp.array([True, True, True, False])
    probe = jnp.asarray([[0, 2], [0, 8], [3, 4], [0, 2]], jnp.int32)
    no = jnp.asarray(False)
    # a probe round: row 0 found acceptance (back to the first interval), row 1 did not (doubles), dead row unchanged
    after = sched.update_probe(probe, live, no, jnp.asarray(True), jnp.array([True, False, False, True]))
    assert after.tolist() == [[2, 2], [16, 16], [8, 8], [0, 2]]
    # plain steps count down; the interval is capped
    step = sched.update_probe(jnp.asarray([[5, 64], [1, 64], [0, 64], [0, 2]]), live, no, no, jnp.zeros(4, bool))
    assert step.tolist() == [[4, 64], [0, 64], [-1, 64], [0, 2]]
    capped = sched.update_probe(jnp.asarray([[0, 64]] * 4), live, no, jnp.asarray(True), jnp.zeros(4, bool))
    assert capped[:3].tolist() == [[64, 64]] * 3
    # rounds where speculation pays restart everything at the first interval
    pays = sched.update_probe(jnp.asarray([[5, 64]] * 4), live, jnp.asarray(True), no, jnp.zeros(4, bool))
    assert pays[:3].tolist() == [[2, 2]] * 3


def test_estimate_follows_the_drafts_own_predictions_where_nothing_was_verified():
    prior = jnp.full((3,), 0.5)
    est = sched.estimate(jnp.full((2, 3), -1.0), prior, 3)
    evidence = jnp.asarray([[0.9, 0.9, 0.9], [-1.0, -1.0, -1.0]])  # row 1: no prediction (a greedy DFlash row)
    new = sched.update_estimate(jnp.full((2, 3), -1.0), est, prior, jnp.array([1, 0]), jnp.array([1, 0]),
                                jnp.array([True, True]), evidence)
    assert float(new[0, 0]) == pytest.approx(0.5 + sched.EMA_OBSERVED * 0.5)  # verified: the outcome
    assert float(new[0, 1]) == pytest.approx(0.5 + sched.EMA_EVIDENCE * 0.4)  # reached, not verified: the draft's
    assert np.allclose(new[1], 0.5)


@pytest.fixture(scope="module")
def told_bad():
    """The bigram target with drafts that a pessimistic cost model and prior say never pay: one that is always
    right (accuracy 1) and one that is always wrong, each without (DFlash-like) and with (DSpark) a
    confidence head."""
    from test_spec_greedy import CFG, PROMPTS, SUCCESSOR

    import dspark_jax as dj
    from dspark_jax.testing import synthetic

    target = synthetic.bigram_target(CFG, successor=SUCCESSOR, seed=1)
    drafts = {}
    for head in (False, True):
        cfg = synthetic.draft_config_for(CFG, num_layers=1, markov_rank=32, confidence=head)
        for acc in (1.0, 0.0):
            drafts[(head, acc)] = synthetic.oracle_draft(target, cfg, SUCCESSOR, accuracy=acc, seed=3)
    plain = dj.generate(target, None, PROMPTS, max_new_tokens=40, stop_token_ids=[]).tokens
    return target, drafts, PROMPTS, plain


def _pessimistic(K=7):
    # by the prior, a round's expected 1.05 tokens never pay for drafting (0.5) + verifying: plain steps
    return _plan(K, prior=0.05)


@pytest.mark.parametrize("head", [False, True], ids=["dflash-like", "dspark"])
def test_auto_finds_a_draft_its_prior_wrongly_rejects(told_bad, head):
    """A draft whose fixed rounds accept whole blocks must be speculating within a few rounds under auto, even
    when its prior and cost model start out saying plain steps (the lock-out of issue 24): probe rounds
    verify it, the observed acceptance lifts its estimate, and the estimate then keeps it speculating."""
    import dspark_jax as dj

    target, drafts, prompts, plain = told_bad
    draft = drafts[(head, 1.0)]
    fixed = dj.generate(target, draft, prompts, max_new_tokens=40, stop_token_ids=[], schedule="fixed")
    assert fixed.tokens == plain and fixed.stats.mean_acceptance_length > 5
    auto = dj.generate(target, draft, prompts, max_new_tokens=40, stop_token_ids=[], schedule=_pessimistic())
    assert auto.tokens == plain
    for row in auto.stats.proposal_lengths:
        first = next(i for i, n in enumerate(row) if n > 0)
        assert first <= 2, row  # the first probe: the third round
        assert all(n > 0 for n in row[first + 6:]), row  # speculating on every round a few probes later
    assert auto.stats.mean_acceptance_length > 3


@pytest.mark.parametrize("head", [False, True], ids=["dflash-like", "dspark"])
def test_probes_of_a_useless_draft_back_off(told_bad, head):
    """An always-wrong draft under the same pessimistic start: only the probe rounds verify drafts, at
    rounds 2, 7, 16, 33 (2, 4, 8, 16 plain steps between), and the output stays exact."""
    import dspark_jax as dj

    target, drafts, prompts, plain = told_bad
    auto = dj.generate(target, drafts[(head, 0.0)], prompts, max_new_tokens=40, stop_token_ids=[],
                       schedule=_pessimistic())
    assert auto.tokens == plain
    for row in auto.stats.proposal_lengths:
        verified = [i for i, n in enumerate(row) if n > 0]
        assert verified == [i for i in (2, 7, 16, 33) if i < len(row)], row


def test_builtin_dflash_speculates_under_auto_with_the_default_cost_model(tmp_path, monkeypatch, capsys):
    """The built-in DFlash draft on a held-out math prompt (fixed rounds: tau 4.1) under the default auto schedule
    and the deterministic cost model (no stored profile): it verifies drafts within the first few rounds
    and on most rounds after (it verified none in 1,542 rounds before issue 24). `generate` says which
    cost model it used, once."""
    import dspark_jax as dj
    from dspark_jax import assets

    monkeypatch.setenv("DSPARK_JAX_PROFILE", "1")
    monkeypatch.setenv("DSPARK_JAX_CACHE", str(tmp_path))
    target = dj.load_target(dtype="float32")
    draft = dj.load_draft(assets.ROOT / "dflash_draft", dtype="float32")
    from dspark_jax.tools import batch

    held_out = batch.read_prompts(assets.ROOT / "heldout_prompts.jsonl").prompts[3]  # gsm8k
    prompt = target.tokenizer.encode(batch.prompt_text(held_out, target.tokenizer, True), add_special_tokens=False)
    kw = dict(max_new_tokens=48, stop_token_ids=[])
    fixed = dj.generate(target, draft, [prompt], schedule="fixed", **kw)
    capsys.readouterr()
    auto = dj.generate(target, draft, [prompt], **kw)
    err = capsys.readouterr().err
    assert auto.tokens == fixed.tokens
    assert err.count("cost model: compiled-program model") == 1, err
    dj.generate(target, draft, [prompt], **kw)
    assert "cost model" not in capsys.readouterr().err  # once per target, draft, batch and K
    assert not (tmp_path / "profiles.json").exists()  # nothing measured, nothing written
    row = auto.stats.proposal_lengths[0]
    assert fixed.stats.mean_acceptance_length > 3, fixed.stats.mean_acceptance_length
    assert any(n > 0 for n in row[:3]), row
    assert sum(n > 0 for n in row) >= len(row) // 2, row


def test_cost_model_is_deterministic_and_times_nothing(mixed, monkeypatch):
    """The default cost model comes from XLA's analysis of the compiled round's programs (nothing runs):
    the same inputs give the same numbers, with profiling (timing) made impossible, and verification of
    more tokens never costs less."""
    target, draft, _, _ = mixed

    def no_timing(*args, **kwargs):
        raise AssertionError("timed")

    monkeypatch.setattr(sched, "profile_costs", no_timing)
    monkeypatch.setattr(sched.time, "perf_counter", no_timing)
    monkeypatch.setenv("DSPARK_JAX_PROFILE", "1")
    monkeypatch.setattr(sched, "_MODEL_CACHE", {})
    first = sched.model_costs(target, draft, 2, 3)
    monkeypatch.setattr(sched, "_MODEL_CACHE", {})
    again = sched.schedule_costs(target, draft, 2, 3)
    assert again.source == "compiled-program model" and first.source == again.source
    assert again.verify == first.verify and again.draft == first.draft
    assert len(first.verify) == len(sched.buckets(3)) and first.verify[0] == 1.0
    assert all(b >= a for a, b in zip(first.verify, first.verify[1:])) and first.verify[-1] > 1.0
    assert first.draft > 0
    # the layer scan counts every layer: flops grow with the verified tokens
    assert first.detail["verify 4"]["flops"] > 2 * first.detail["verify 1"]["flops"]
    assert sched.schedule_costs(target, draft, 2, 3, model="constant").source == "constant model"
    with pytest.raises(dj_config_error()):
        sched.schedule_costs(target, draft, 2, 3, model="measured")


def dj_config_error():
    import dspark_jax as dj

    return dj.ConfigError


def test_unrolled_analysis_counts_every_scan_trip():
    """XLA's cost analysis counts a loop body once; `analyse` unrolls scans first, so 8 trips cost 8 times 1."""
    def looped(n):
        def fn(x):
            return jax.lax.scan(lambda c, _: (c @ x, None), x, None, length=n)[0]
        return fn

    x = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    one, eight = sched.analyse(looped(1), x), sched.analyse(looped(8), x)
    assert eight["flops"] == pytest.approx(8 * one["flops"], rel=0.01)


def test_profile_is_explicit_stored_by_key_and_then_used(mixed, tmp_path, monkeypatch):
    """`measure_profile` (what `dspark-jax profile` runs) times the programs and stores them under the
    backend / device kind / models / batch / K key; `schedule_costs` then uses that profile for that key only."""
    target, draft, _, _ = mixed
    monkeypatch.setenv("DSPARK_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("DSPARK_JAX_PROFILE", "1")
    assert sched.stored_profile(target, draft, 2, 3) is None
    costs, path = sched.measure_profile(target, draft, 2, 3, budget_s=1.0)
    assert path == tmp_path / "profiles.json" and path.is_file()
    assert costs.source == f"profile {path}" and costs.verify[0] == 1.0
    used = sched.schedule_costs(target, draft, 2, 3)
    assert used.source == costs.source and used.verify == costs.verify
    assert sched.schedule_costs(target, draft, 4, 3).source == "compiled-program model"  # another batch: no profile
    entry = next(iter(json.loads(path.read_text()).values()))
    assert (entry["batch"], entry["K"], entry["backend"]) == (2, 3, jax.default_backend())


def test_cli_profile_stores_and_generate_names_it_or_explains_plain_steps(tmp_path, monkeypatch, capsys):
    """`dspark-jax profile` prints where it stored the profile and `generate` then names it; when auto runs
    plain steps for a whole call, `generate` prints the one line with the predicted round cost and the
    expected acceptance that decided it."""
    from dspark_jax.tools import cli

    monkeypatch.setenv("DSPARK_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("DSPARK_JAX_PROFILE", "1")
    assert cli.main(["profile", "--batch-size", "1", "--budget-s", "1"]) == 0
    out = capsys.readouterr().out
    assert f"stored in {tmp_path / 'profiles.json'}" in out and (tmp_path / "profiles.json").is_file()
    assert cli.main(["generate", "--prompt", "def f(x):", "--max-new-tokens", "8"]) == 0
    assert f"cost model: profile {tmp_path / 'profiles.json'}" in capsys.readouterr().err
    assert cli.main(["profile", "--batch-size", "0"]) == 2  # a clear error, nothing loaded
    assert "--batch-size" in capsys.readouterr().err

    # a cost model under which speculation never pays, and an answer too short for a probe round (the third)
    monkeypatch.setenv("DSPARK_JAX_PROFILE", "model")
    slow = sched.Costs((1.0, 30.0, 60.0), 40.0, "compiled-program model")
    monkeypatch.setattr(sched, "model_costs", lambda *a, **k: slow)
    assert cli.main(["generate", "--prompt", "def g(y):", "--max-new-tokens", "2", "--draft", "dflash"]) == 0
    out = capsys.readouterr().out
    assert "drafts verified per round (auto schedule): 0.00" in out
    line = next(x for x in out.splitlines() if x.startswith("schedule=auto chose plain AR steps"))
    assert "predicted to cost 100.00 AR steps" in line and "per-position acceptance 0.59" in line, line
