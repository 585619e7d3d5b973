"""STS calibration (`dspark-jax calibrate`, tools/calibrate.py; docs/algorithm.md §4.3): the metric formulas,
the temperature fit recovering a known miscalibration, the collection on a small pair, and the shipped
calibrations of the built-in drafts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dspark_jax.engine import schedule as sched
from dspark_jax.tools import calibrate as cal


def test_metrics_follow_the_reference_formulas():
    pred = np.array([0.05, 0.12, 0.55, 0.58, 0.91])
    label = np.array([0, 1, 1, 0, 1])
    # bins of width 0.05: {0.05}, {0.12}, {0.55, 0.58}, {0.91}
    expected = (abs(0.05 - 0) + abs(0.12 - 1) + abs(0.55 + 0.58 - 1) + abs(0.91 - 1)) / 5
    assert cal.ece(pred, label) == pytest.approx(expected)
    assert cal.ece_grid(np.stack([pred, pred]), label) == pytest.approx([expected, expected])
    assert cal.brier(pred, label) == pytest.approx(np.mean((pred - label) ** 2))
    assert cal.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert cal.auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == pytest.approx(0.0)
    assert cal.auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie within a fine bin counts one half
    assert np.isnan(cal.auroc([0.3, 0.4], [1, 1]))


def test_labels_leave_out_positions_after_a_stop():
    y, mask = cal.labels(np.array([0, 3, 2]), np.array([False, False, True]), 4)
    assert y.tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert mask.tolist() == [[True] * 4, [True] * 4, [True, True, False, False]]


def test_sts_recovers_a_known_temperature_and_cuts_ece():
    rng = np.random.default_rng(0)
    N, K, true_t = 20000, 3, np.array([2.5, 0.6, 1.5])
    logits = rng.normal(0.5, 2.0, (N, K))
    cond = 1.0 / (1.0 + np.exp(-logits / true_t))  # the real conditional acceptance
    accept = rng.uniform(size=(N, K)) < cond
    accepted = np.sum(np.cumprod(accept, axis=1), axis=1)
    y, mask = cal.labels(accepted, np.zeros(N, bool), K)
    temps = cal.fit_temperatures(logits[: N // 2], y[: N // 2], mask[: N // 2])
    assert np.allclose(temps, true_t, rtol=0.3), temps  # ECE minimisation is a coarse estimator
    held = slice(N // 2, None)
    before = cal.per_position(cal.survival(logits[held], [1.0] * K), y[held], mask[held])
    after = cal.per_position(cal.survival(logits[held], temps), y[held], mask[held])
    for k in range(K):
        assert after["ece"][k] < 0.025 and after["ece"][k] < before["ece"][k], (k, before["ece"], after["ece"])
    assert after["ece"][0] < 0.25 * before["ece"][0]
    # one temperature is monotone: the first position's ranking (hence AUROC) is kept
    assert after["auroc"][0] == pytest.approx(before["auroc"][0], abs=0.005)
    rates = cal.acceptance_rates(accepted, mask, K)
    assert rates[0] == pytest.approx(np.mean(cond[:, 0]), abs=0.02)


def _rounds_from_model(rng, n_prompts, rounds_per_prompt, K, true_t, stop_rate=0.0):
    """Synthetic rounds: confidence logits, and acceptances drawn from `sigmoid(l_k / true_t_k)` sequentially
    (a draft is only verified once all before it were accepted), with the stop-token truncation of the
    reference (an accepted stop at index e: a = e + 1, later positions unverified)."""
    N = n_prompts * rounds_per_prompt
    logits = rng.normal(0.8, 1.5, (N, K))
    accept = rng.uniform(size=(N, K)) < 1.0 / (1.0 + np.exp(-logits / np.asarray(true_t)))
    accepted = np.argmin(np.concatenate([accept, np.zeros((N, 1), bool)], axis=1), axis=1)  # first rejection
    stop_at = np.where(rng.uniform(size=N) < stop_rate, rng.integers(0, K, N), K)
    terminated = stop_at < accepted
    accepted = np.where(terminated, stop_at + 1, accepted)
    prompt = np.repeat(np.arange(n_prompts), rounds_per_prompt)
    return {"logits": logits, "accepted": accepted, "terminated": terminated, "prompt": prompt}


def test_prefix_labels_are_non_increasing_and_match_the_accepted_count():
    rng = np.random.default_rng(3)
    K = 7
    data = _rounds_from_model(rng, 50, 20, K, [1.0] * K, stop_rate=0.2)
    y, mask = cal.labels(data["accepted"], data["terminated"], K)
    assert np.all(np.diff(y, axis=1) <= 0)  # y_k = 1 iff drafts 1..k all accepted: once 0, 0 for good
    assert np.array_equal(y.sum(axis=1), data["accepted"])
    # a round with an accepted stop counts only its accepted positions, all labelled 1
    t = data["terminated"]
    assert np.any(t) and np.array_equal(mask[t].sum(axis=1), data["accepted"][t]) and np.all(y[t][mask[t]] == 1)
    assert np.all(mask[~t])
    surv = cal.survival_rates(y, mask)
    assert all(a >= b for a, b in zip(surv, surv[1:]))
    # conditional rates multiply up to the observed survival when no row stops
    y0, m0 = cal.labels(data["accepted"][~t], data["terminated"][~t], K)
    cond = cal.acceptance_rates(data["accepted"][~t], m0, K)
    assert np.allclose(np.cumprod(cond), cal.survival_rates(y0, m0))


def test_ece_floor_of_one_bin_is_the_binomial_mean_absolute_deviation():
    from math import comb

    n, p = 40, 0.3  # every prediction in one bin: floor = E|Binomial(n, p) / n - p|
    exact = sum(comb(n, j) * p ** j * (1 - p) ** (n - j) * abs(j / n - p) for j in range(n + 1))
    assert cal.ece_floor(np.full(n, p), draws=20000) == pytest.approx(exact, rel=0.03)
    assert cal.ece_floor(np.full(1000, 1.0 - 1e-9)) < 1e-6  # certain predictions: no noise


def test_sts_reaches_the_noise_floor_on_held_out_prompts():
    """End to end from rounds: a confidence head miscalibrated by a known temperature per position. After STS
    the held-out ECE of every position's survival must be near the floor, a fraction of the ECE before."""
    rng = np.random.default_rng(1)
    K, true_t = 5, np.array([2.0, 0.5, 3.0, 1.0, 0.7])
    data = _rounds_from_model(rng, 400, 100, K, true_t, stop_rate=0.05)
    calib, report = cal.fit_and_report(data, True)
    held_prompts = np.unique(data["prompt"][data["prompt"] % 2 == 1])
    assert report["rounds_heldout"] == 100 * len(held_prompts) and report["rounds_fit"] == 40000 - report["rounds_heldout"]
    assert np.allclose(calib.temperatures, true_t, rtol=0.25), calib.temperatures
    b, a = report["before"], report["after"]
    for k in range(K):
        assert a["ece"][k] < 2.0 * a["ece_floor"][k] + 0.003, (k, a["ece"], a["ece_floor"])
        assert abs(a["mean_pred"][k] - report["survival_heldout"][k]) < 0.01
    # (miscalibrations of successive positions can partly cancel in the survival before STS: compare means)
    assert a["ece"][0] < 0.25 * b["ece"][0] and np.mean(a["ece"]) < 0.3 * np.mean(b["ece"]), (b["ece"], a["ece"])
    assert all(x >= y for x, y in zip(report["survival_heldout"], report["survival_heldout"][1:]))
    md = cal.markdown(report)
    assert "floor" in md and "| 5 |" in md


def test_sts_fits_left_to_right_with_earlier_temperatures_fixed():
    """Position 2's head is calibrated (T = 1) and position 1's is not: the survival at 2 multiplies in
    position 1's calibrated confidence, so position 2 must come out at 1 once T_1 is fitted."""
    rng = np.random.default_rng(2)
    K, true_t = 2, np.array([3.0, 1.0])
    data = _rounds_from_model(rng, 200, 100, K, true_t)
    temps = cal.fit_temperatures(data["logits"], *cal.labels(data["accepted"], data["terminated"], K))
    assert temps[0] == pytest.approx(3.0, rel=0.2) and temps[1] == pytest.approx(1.0, rel=0.2), temps


def test_collect_and_write_on_a_small_pair(tmp_path):
    from dspark_jax.config import RopeConfig
    from dspark_jax.models.qwen3 import Qwen3Config
    from dspark_jax.testing import synthetic

    cfg = Qwen3Config(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, rope=RopeConfig(theta=1e4), max_position_embeddings=256)
    successor = synthetic.random_permutation_successor(64, seed=1)
    target = synthetic.bigram_target(cfg, successor=successor, seed=0)
    draft = synthetic.oracle_draft(target, synthetic.draft_config_for(cfg, num_layers=1, markov_rank=8), successor,
                                   accuracy=0.7, seed=2)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    calib, report = cal.calibrate(target, draft, prompts, max_new_tokens=24, batch_size=4, log=lambda m: None)
    K = draft.module.max_draft_length
    assert report["rounds_fit"] > 0 and report["rounds_heldout"] > 0
    assert len(calib.temperatures) == K and all(t > 0 for t in calib.temperatures)
    assert all(0 <= a <= 1 for a in calib.acceptance) and 0 < calib.acceptance[0] < 1
    path = cal.write(tmp_path, calib, report)
    loaded = sched.load_calibration(tmp_path)
    assert loaded.temperatures == pytest.approx(calib.temperatures, rel=1e-5)
    assert json.loads(path.read_text())["report"]["rounds_heldout"] == report["rounds_heldout"]
    assert "| position |" in cal.markdown(report)
    assert report["sampling_temperature"] == 1.0  # the default: what the confidence head predicts
    surv = [x for x in report["survival_fit"] if np.isfinite(x)]
    assert all(a >= b for a, b in zip(surv, surv[1:]))


def test_bad_calibration_file_is_refused(tmp_path):
    (tmp_path / sched.CALIBRATION_FILE).write_text(json.dumps({"temperatures": [1.0, -2.0], "acceptance": [0.5, 0.5]}))
    with pytest.raises(Exception, match="positive"):
        sched.load_calibration(tmp_path)
    (tmp_path / sched.CALIBRATION_FILE).write_text(json.dumps({"acceptance": [1.5]}))
    with pytest.raises(Exception, match=r"\[0, 1\]"):
        sched.load_calibration(tmp_path)


def test_shipped_calibrations():
    from dspark_jax import assets

    dspark = sched.load_calibration(assets.DSPARK_DRAFT)
    dflash = sched.load_calibration(assets.DFLASH_DRAFT)
    assert dspark is not None and len(dspark.temperatures) == 7
    assert dflash is not None and dflash.temperatures is None and len(dflash.acceptance) == 7
    report = json.loads((assets.DSPARK_DRAFT / sched.CALIBRATION_FILE).read_text())["report"]
    # rounds sampled at temperature 1, what the confidence head predicts (docs/algorithm.md §4.3)
    assert report["sampling_temperature"] == 1.0
    assert report["rounds_heldout"] >= 10000  # a noise floor near 1 %
    surv = report["survival_heldout"]
    assert all(a >= b for a, b in zip(surv, surv[1:]))  # prefix survival: non-increasing in k
    # no temperature pinned to an edge of the grid [0.1, 10]
    assert all(0.11 < t < 9.0 for t in dspark.temperatures), dspark.temperatures
    # on the held-out prompts STS cuts every position's ECE to a fraction of before, near the noise floor
    before, after = report["before"], report["after"]
    for k in range(7):
        assert after["ece"][k] < 0.6 * before["ece"][k] and after["ece"][k] < 0.035, (k, before["ece"], after["ece"])
        assert after["ece"][k] < 5.0 * after["ece_floor"][k], (k, after["ece"], after["ece_floor"])
    assert np.mean(after["ece"]) < 0.4 * np.mean(before["ece"])
    flash = json.loads((assets.DFLASH_DRAFT / sched.CALIBRATION_FILE).read_text())["report"]
    assert flash["sampling_temperature"] == 1.0 and flash["rounds_heldout"] >= 10000
    assert all(e < 0.03 for e in flash["after"]["ece"])  # the rate product predicts the mean survival
